"""Reward model: the SFT model with its unembedding replaced by a scalar head, trained on
K-way rankings (all C(K,2) pairs of a prompt in one batch element, one forward pass per
response), then shifted so the SFT policy's outputs score 0 on average.

  python -m experiments.comparisons --policy_from=runs/sft --data_dir=runs/data
  python -m experiments.reward --flagfile=experiments/configs/demo_reward.flags \
      --init_from=runs/sft --data_dir=runs/data --workdir=runs/rm

Your own comparisons (`{"prompt", "responses", "ranking"}` per line, or pairwise
`{"chosen", "rejected"}` as in HH-RLHF, loaded as K = 2): --train_files/--eval_files.
"""

from absl import app

from experiments import common

if __name__ == "__main__":
    app.run(common.main_for("reward"))
