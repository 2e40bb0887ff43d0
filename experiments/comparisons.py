"""Comparison data for the reward model: K in [--k_min, --k_max] responses per prompt
sampled from the SFT policy, ranked by simulated labelers of the embedded world (training
labelers for the training split, a disjoint held-out pool for the evaluation split).

  python -m experiments.comparisons --policy_from=runs/sft --data_dir=runs/data

Writes comparisons_train.jsonl, comparisons_eval.jsonl and comparisons_stats.json (with
the held-out labelers' agreement: the ceiling for the reward model's accuracy) into
--data_dir, next to the world's prompt files.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from experiments.errors import user_facing

FLAGS = flags.FLAGS
flags.DEFINE_string("policy_from", None, "Workdir of the SFT run to sample from.")
flags.DEFINE_string("data_dir", None, "The world's data directory (prompts in, comparisons out).")
flags.DEFINE_integer("train_prompts", 1000, "Training prompts to compare (0 = all).")
flags.DEFINE_integer("eval_prompts", 200, "Held-out prompts to compare (0 = all).")
flags.DEFINE_integer("k_min", 4, "Fewest responses per prompt.")
flags.DEFINE_integer("k_max", 9, "Most responses per prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("max_new_tokens", 32, "Response length limit in tokens.")
flags.DEFINE_integer("seed", 0, "Seed of sampling, K and labeler assignment.")
flags.DEFINE_string("mesh", "data:-1,fsdp:1,tensor:1", "Device mesh for sampling.")


def main(argv):
    if not FLAGS.policy_from or not FLAGS.data_dir:
        raise SystemExit("error: --policy_from and --data_dir are required")
    data_dir = Path(FLAGS.data_dir)
    prompt_files = {"train": data_dir / "prompts_train.jsonl", "eval": data_dir / "prompts_eval.jsonl"}
    for path in prompt_files.values():
        if not path.exists():
            raise SystemExit(f"error: {path} not found: --data_dir must hold the world's prompt "
                             "files (written by the pretraining stage)")
    from instructjax import parallel
    from instructjax.rlhf.comparisons import ComparisonConfig, make_comparisons
    cfg = ComparisonConfig(k_min=FLAGS.k_min, k_max=FLAGS.k_max, temperature=FLAGS.temperature,
                           max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed)
    stats = make_comparisons(
        FLAGS.policy_from, prompt_files, data_dir, cfg=cfg, mesh=parallel.make_mesh(FLAGS.mesh),
        num_prompts={"train": FLAGS.train_prompts, "eval": FLAGS.eval_prompts})
    print(json.dumps({k: stats[k] for k in ("train", "eval")}, indent=2))


if __name__ == "__main__":
    app.run(user_facing(main, also=(ValueError,)))
