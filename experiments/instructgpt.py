"""The InstructGPT pipeline on the embedded world, stage by stage:

  pretrain -> SFT -> report (held-out losses, gold-judged samples of base vs SFT)

Each stage runs as its own experiment script in a subprocess with its own flagfile and
workdir under --workdir; a stage whose final evaluation exists is skipped, and an
interrupted stage resumes from its checkpoint. Later stages (comparisons, reward model,
PPO, PPO-ptx) are added here as they land.

  python -m experiments.instructgpt --flagfile=experiments/configs/demo.flags
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from experiments.log_filters import quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root directory; each stage gets a subdirectory.")
flags.DEFINE_string("pretrain_flags", None, "Flagfile of the pretraining stage.")
flags.DEFINE_string("sft_flags", None, "Flagfile of the SFT stage.")
flags.DEFINE_integer("report_prompts", 128, "Held-out prompts sampled for the report.")
flags.DEFINE_integer("report_seq_len", 128, "Sequence length for held-out losses in the report.")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Mesh for the report stage.")


def run_stage(name: str, module: str, flagfile: str, workdir: Path, extra: list[str]) -> None:
    if (workdir / "final_eval.json").exists():
        logging.info("stage %s: done already (%s), skipping", name, workdir)
        return
    if not flagfile or not Path(flagfile).exists():
        raise SystemExit(f"error: --{name}_flags={flagfile!r} does not name a flagfile")
    cmd = [sys.executable, "-m", module, f"--flagfile={flagfile}", f"--workdir={workdir}", *extra]
    logging.info("stage %s: %s", name, " ".join(cmd))
    start = time.time()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"error: stage {name} failed (exit {result.returncode}); its output is "
                         f"above and its workdir is {workdir}. Rerun to resume.")
    logging.info("stage %s: finished in %.0f s", name, time.time() - start)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    quiet_library_logs()
    root = Path(FLAGS.workdir)
    data = root / "data"
    run_stage("pretrain", "experiments.pretrain", FLAGS.pretrain_flags, root / "pretrain",
              [f"--data_dir={data}"])
    run_stage("sft", "experiments.sft", FLAGS.sft_flags, root / "sft",
              [f"--data_dir={data}", f"--init_from={root / 'pretrain'}"])

    # JAX starts only now, after the stage subprocesses.
    from instructjax import parallel
    from instructjax.data.jsonl import atomic_output, write_json_atomic
    from instructjax.rlhf import evaluate
    mesh = parallel.make_mesh(FLAGS.mesh)
    sft_eval = data / "sft_eval.jsonl"
    reports = evaluate.compare_models(
        {"base": root / "pretrain", "sft": root / "sft"}, sft_eval, mesh=mesh, data_dir=data,
        seq_len=FLAGS.report_seq_len, num_prompts=FLAGS.report_prompts)
    table = evaluate.format_report(reports, sft_eval)
    print(table)
    summary = {r.name: {"heldout_sft_loss": r.heldout_loss, "gold_accuracy": r.gold_accuracy,
                        "mean_gold_score": r.mean_gold_score} for r in reports}
    write_json_atomic(root / "report.json", summary)
    with atomic_output(root / "report.txt") as f:
        f.write(table + "\n")
    logging.info("report written to %s", root / "report.txt")


if __name__ == "__main__":
    app.run(main)
