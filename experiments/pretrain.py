"""Pretrains a language model on a text corpus (default: the embedded world's corpus).

  python -m experiments.pretrain --flagfile=experiments/configs/demo_pretrain.flags --workdir=runs/base
"""

from absl import app

from experiments import common

if __name__ == "__main__":
    app.run(common.main_for("pretrain"))
