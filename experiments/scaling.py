"""Scaling-law sweep: trains each size preset on the same data and token budget, fits
L(N) = (N / N_c)^(-alpha) to final validation loss against non-embedding parameters.

  python -m experiments.scaling --flagfile=experiments/configs/scaling_demo.flags \
      --workdir=runs/scaling

Every language-model flag of experiments/common.py applies to all sizes (--model is
replaced by each of --sizes). Sizes already finished in --workdir are read back, so
rerunning the command resumes the sweep.
"""

from absl import app, flags

from experiments import common

flags.DEFINE_list("sizes", [], "Model size presets to sweep, smallest first (see "
                  "instructjax/model/config.py PRESETS).")
flags.DEFINE_list("size_learning_rates", [], "Peak learning rate of each size, in the "
                  "order of --sizes; empty: --learning_rate for all.")
flags.DEFINE_list("seeds", [], "Train each size once per seed and fit the mean loss (the "
                  "table and plot show the spread); empty: --seed only.")
flags.DEFINE_bool("fit_irreducible", False,
                  "Also fit an irreducible loss: L = L_inf + (N / N_c)^-alpha.")
FLAGS = flags.FLAGS


def build_config():
    from instructjax.scaling import ScalingConfig
    if not FLAGS.sizes:
        raise flags.ValidationError("--sizes is required, e.g. --sizes=scale-1,scale-2,scale-3")
    try:
        rates = tuple(float(r) for r in FLAGS.size_learning_rates) or None
        seeds = tuple(int(s) for s in FLAGS.seeds)
    except ValueError:
        raise flags.ValidationError(f"--size_learning_rates / --seeds: numbers expected, got "
                                    f"{FLAGS.size_learning_rates} / {FLAGS.seeds}") from None
    return ScalingConfig(
        workdir=FLAGS.workdir, base=common.run_config_from_flags("pretrain"),
        models=tuple((name, common.model_config_from_flags(name)) for name in FLAGS.sizes),
        learning_rates=rates, seeds=seeds, irreducible=FLAGS.fit_irreducible)


if __name__ == "__main__":
    app.run(common.experiment_main(build_config, "instructjax.scaling:run_sweep"))
