"""PPO / PPO-ptx against a reward model, starting from an SFT policy (InstructGPT step 3):
`experiments.rl`, whose defaults are PPO's (--algorithm=ppo).

  python -m experiments.ppo --flagfile=experiments/configs/demo_ppo.flags \
      --init_from=runs/demo/sft --reward_from=runs/demo/reward --workdir=runs/demo/ppo
"""

from absl import app

from experiments.rl import main

if __name__ == "__main__":
    app.run(main)
