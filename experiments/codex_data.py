"""Codex-S / Codex-D data: generated problems (train families and held-out families) and
standalone functions with doctests mined from the code corpus, all checked in the sandbox.

  python -m experiments.code_corpus --flagfile=experiments/configs/code_corpus.flags
  python -m experiments.codex_data --flagfile=experiments/configs/codex_data.flags \
      [--out_dir=runs/codex_data]

Writes problems_train.jsonl / problems_test.jsonl (HumanEval format; score held-out
families with `experiments.passk --problems=.../problems_test.jsonl`), mined_problems.jsonl,
codex_s_{train,eval}.jsonl and codex_d_{train,eval}.jsonl ("sft" records for
`experiments.sft --train_files/--eval_files`) and report.json. A rerun with the same
settings and inputs reuses the outputs. See instructjax/codex/codex_data.py.
"""

from __future__ import annotations

from absl import app, flags

from experiments.errors import user_facing
from instructjax.codex import codex_data, sandbox

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "runs/codex_data", "Output directory.")
flags.DEFINE_integer("seed", 0, "Seed of the problem generator and the family split.")
flags.DEFINE_list("corpus_files", [], "Code corpus JSONL files ({'text', 'path'}) to mine.")
flags.DEFINE_integer("per_family_train", 30, "Generated problems per training family.")
flags.DEFINE_integer("per_family_test", 10, "Generated problems per held-out family.")
flags.DEFINE_float("test_fraction", 0.25, "Share of problem families held out for testing.")
flags.DEFINE_integer("max_mined", 200, "Keep at most this many mined functions; 0 = no mining.")
flags.DEFINE_float("mined_eval_fraction", 0.1, "Share of mined functions in the eval files.")
flags.DEFINE_integer("max_body_lines", 40, "Skip mined functions with longer bodies.")
flags.DEFINE_integer("max_prompt_chars", 2000, "Skip mined functions with longer prompts.")
flags.DEFINE_string("sandbox", "bwrap", "bwrap (isolated) or none (UNSAFE: runs code directly).")
flags.DEFINE_float("timeout_s", 3.0, "Wall-clock limit per sandboxed test run.")
flags.DEFINE_integer("memory_mb", 512, "Memory limit per sandboxed test run.")
flags.DEFINE_integer("workers", 0, "Parallel sandboxed test runs; 0 = one per CPU core.")


def config_from_flags() -> codex_data.CodexDataConfig:
    if FLAGS.sandbox not in ("bwrap", "none"):
        raise ValueError(f"--sandbox={FLAGS.sandbox}: choose bwrap or none")
    sandbox_cfg = sandbox.SandboxConfig(mode=FLAGS.sandbox, timeout_s=FLAGS.timeout_s,
                                        memory_mb=FLAGS.memory_mb, workers=FLAGS.workers)
    return codex_data.CodexDataConfig(
        out_dir=FLAGS.out_dir, seed=FLAGS.seed, corpus_files=tuple(FLAGS.corpus_files),
        per_family_train=FLAGS.per_family_train, per_family_test=FLAGS.per_family_test,
        test_fraction=FLAGS.test_fraction, max_mined=FLAGS.max_mined,
        mined_eval_fraction=FLAGS.mined_eval_fraction, max_body_lines=FLAGS.max_body_lines,
        max_prompt_chars=FLAGS.max_prompt_chars, sandbox=sandbox_cfg)


def main(argv):
    cfg = config_from_flags()
    report = codex_data.build_codex_data(cfg, progress=print)
    print(codex_data.format_report(report))
    print(f"wrote {cfg.out_dir}/: {', '.join(codex_data.OUTPUTS)}")


if __name__ == "__main__":
    app.run(user_facing(main, also=(ValueError, OSError)))
