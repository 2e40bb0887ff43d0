"""Supervised fine-tuning on demonstrations (prompt -> response), loss on the response + EOS.

  python -m experiments.sft --flagfile=experiments/configs/demo_sft.flags \
      --init_from=runs/base --workdir=runs/sft
"""

from absl import app

from experiments import common

if __name__ == "__main__":
    app.run(common.main_for("sft"))
