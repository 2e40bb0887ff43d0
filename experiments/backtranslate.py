"""Codex-D by back-translation: Codex-D writes docstrings for each problem's signature +
body, Codex-S writes code from them, the sandbox scores that code (pass@k over the n
docstrings per problem).

  python -m experiments.backtranslate --docstring_checkpoint=runs/codex/codex_d \
      --code_checkpoint=runs/codex/codex_s \
      --problems=runs/codex/codex_data/problems_new_instances.jsonl --out=runs/codex/backtranslation

Writes docstrings.jsonl (each docstring and the program written from it), results.jsonl and
summary.json into --out.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from absl import app, flags

from experiments.errors import user_facing

FLAGS = flags.FLAGS
flags.DEFINE_string("docstring_checkpoint", None, "Workdir of the Codex-D model.")
flags.DEFINE_string("code_checkpoint", None, "Workdir of the Codex-S model.")
flags.DEFINE_string("problems", None, "Problem file with canonical solutions (JSONL).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("n_samples", 10, "Docstrings per problem (one program each).")
flags.DEFINE_float("docstring_temperature", 0.8, "Codex-D sampling temperature.")
flags.DEFINE_float("temperature", 0.2, "Codex-S sampling temperature.")
flags.DEFINE_integer("max_docstring_tokens", 64, "Tokens sampled per docstring.")
flags.DEFINE_integer("max_new_tokens", 96, "Tokens sampled per program.")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
flags.DEFINE_string("k", "1,10", "Comma-separated k values; those above n are skipped.")
flags.DEFINE_integer("batch_size", 64, "Sequences per sampling batch.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("mesh", "data:-1,fsdp:1,tensor:1", "Device mesh for sampling.")
flags.DEFINE_string("sandbox", "bwrap", "bwrap (isolated) or none (UNSAFE: runs code directly).")
flags.DEFINE_float("timeout_s", 3.0, "Wall-clock limit per program's test run.")
flags.DEFINE_integer("memory_mb", 1024, "Memory limit per test run.")
flags.DEFINE_integer("workers", 0, "Parallel test runs; 0 = one per CPU core.")
flags.mark_flags_as_required(["docstring_checkpoint", "code_checkpoint", "problems", "out"])


def main(argv):
    from instructjax.codex import backtranslate as bt, evaluate, passk, sandbox
    from instructjax.codex.sandbox import Problem
    from instructjax.data.jsonl import write_jsonl_atomic
    ks = passk.parse_ks(FLAGS.k)
    cfg = bt.BacktranslationConfig(
        docstring_checkpoint=FLAGS.docstring_checkpoint, code_checkpoint=FLAGS.code_checkpoint,
        n_samples=FLAGS.n_samples, docstring_temperature=FLAGS.docstring_temperature,
        code_temperature=FLAGS.temperature, max_docstring_tokens=FLAGS.max_docstring_tokens,
        max_code_tokens=FLAGS.max_new_tokens, top_p=FLAGS.top_p, batch_size=FLAGS.batch_size,
        seed=FLAGS.seed, mesh=FLAGS.mesh)
    sandbox_cfg = sandbox.SandboxConfig(mode=FLAGS.sandbox, timeout_s=FLAGS.timeout_s,
                                        memory_mb=FLAGS.memory_mb, workers=FLAGS.workers)
    problems = bt.load_problem_dicts(FLAGS.problems)
    if FLAGS.sandbox == "bwrap":  # fail before sampling
        sandbox.check_sandbox()
    samples, records, skipped = bt.backtranslate(cfg, problems)
    out = Path(FLAGS.out)
    write_jsonl_atomic(out / "docstrings.jsonl", records)
    scored = {t: Problem(task_id=t, prompt=p["prompt"], test=p["test"],
                         entry_point=p["entry_point"])
              for t, p in problems.items() if t not in skipped}
    with sandbox.Evaluator(sandbox_cfg) as evaluator:
        summary = evaluate.score(evaluator, sandbox_cfg, scored, samples, ks, out, {
            "problems": FLAGS.problems, "backtranslation": dataclasses.asdict(cfg),
            "skipped_problems": {"count": len(skipped), "task_ids": skipped,
                                 "reason": "prompt longer than a model's context"},
            "argv": sys.argv})
    print(f"back-translation over {summary['num_problems']} problems (n = {FLAGS.n_samples}, "
          f"{len(skipped)} skipped): " + ", ".join(
              f"pass@{k} {v:.4f}" for k, v in summary["pass_at_k"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(user_facing(main, also=(ValueError,)))
