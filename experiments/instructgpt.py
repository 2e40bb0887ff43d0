"""The InstructGPT pipeline on the embedded world, stage by stage:

  pretrain -> SFT (and SFT on the diligent demonstrators only, a baseline) -> comparisons
  (K samples per prompt, ranked by simulated labelers) -> reward model -> PPO and PPO-ptx
  (and DPO on the same comparisons) -> evaluation

Each stage runs as its own experiment script in a subprocess with its own flagfile; a stage
whose final output exists is skipped, and an interrupted stage resumes from its checkpoint.
A stage whose flagfile flag is empty is left out (with the stages that need it).

  python -m experiments.instructgpt --flagfile=experiments/configs/demo.flags
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags, logging

from experiments.errors import user_facing
from experiments.stages import run_stage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root directory; each stage gets a subdirectory.")
flags.DEFINE_string("pretrain_flags", None, "Flagfile of the pretraining stage.")
flags.DEFINE_string("sft_flags", None, "Flagfile of the SFT stage.")
flags.DEFINE_string("sft_diligent_flags", "", "Flagfile of the baseline SFT on the diligent "
                    "demonstrators' demonstrations only (sft_train_diligent.jsonl).")
flags.DEFINE_string("comparisons_flags", "", "Flagfile of the comparisons stage.")
flags.DEFINE_string("reward_flags", "", "Flagfile of the reward-model stage.")
flags.DEFINE_string("ppo_flags", "", "Flagfile of the PPO stage (no pretraining mix).")
flags.DEFINE_string("ppo_ptx_flags", "", "Flagfile of the PPO-ptx stage.")
flags.DEFINE_string("dpo_flags", "", "Flagfile of the DPO stage.")
flags.DEFINE_integer("report_prompts", 128, "Held-out prompts sampled for the report.")
flags.DEFINE_integer("report_seq_len", 128, "Sequence length for held-out losses in the report.")
flags.DEFINE_float("report_temperature", 1.0, "Sampling temperature of every model in the "
                   "report (the policies were optimised at the rollout temperature).")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Mesh for the report stage.")


def run_stages(root: Path) -> dict[str, Path]:
    """Every configured stage in order; returns the workdirs of the policies to evaluate."""
    data = root / "data"
    d = {name: root / name for name in ("pretrain", "sft", "sft_diligent", "reward", "ppo",
                                        "ppo_ptx", "dpo")}

    def train(name, module, extra):
        return run_stage(name, module, getattr(FLAGS, f"{name}_flags"),
                         d[name] / "final_eval.json",
                         [f"--workdir={d[name]}", f"--data_dir={data}", *extra])

    train("pretrain", "experiments.pretrain", [])
    train("sft", "experiments.sft", [f"--init_from={d['pretrain']}"])
    policies = {"base": d["pretrain"], "sft": d["sft"]}
    # The filtering baseline: if it matches PPO-ptx, RL added nothing beyond choosing data.
    if train("sft_diligent", "experiments.sft", [
            f"--init_from={d['pretrain']}", f"--train_files={data / 'sft_train_diligent.jsonl'}",
            f"--eval_files={data / 'sft_eval.jsonl'}"]):
        policies["sft_diligent"] = d["sft_diligent"]
    if not run_stage("comparisons", "experiments.comparisons", FLAGS.comparisons_flags,
                     data / "comparisons_stats.json",
                     [f"--policy_from={d['sft']}", f"--data_dir={data}"]):
        return policies
    if train("reward", "experiments.reward", [f"--init_from={d['sft']}"]):
        for name in ("ppo", "ppo_ptx"):
            if train(name, "experiments.rl", [f"--init_from={d['sft']}",
                                               f"--reward_from={d['reward']}"]):
                policies[name] = d[name]
    if train("dpo", "experiments.dpo", [f"--init_from={d['sft']}"]):
        policies["dpo"] = d["dpo"]
    return policies


def main(argv):
    if not FLAGS.workdir:
        raise SystemExit("error: --workdir is required")
    root = Path(FLAGS.workdir)
    policies = run_stages(root)

    # JAX starts only now, after the stage subprocesses.
    from instructjax import parallel
    from instructjax.rlhf import evaluate, plots
    start = time.time()
    results = evaluate.evaluate_policies(
        policies, data_dir=root / "data", mesh=parallel.make_mesh(FLAGS.mesh), reference="sft",
        prompted=("base",), num_prompts=FLAGS.report_prompts,
        temperature=FLAGS.report_temperature, pretrain_seq_len=FLAGS.report_seq_len)
    print(evaluate.format_table(results))
    written = evaluate.write_results(results, root)
    ppo_runs = {name: policies[name] for name in ("ppo", "ppo_ptx") if name in policies}
    written.update(plots.write_all(results, ppo_runs, root))
    logging.info("evaluation (%.0f s) written: %s", time.time() - start,
                 ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    app.run(user_facing(main))
