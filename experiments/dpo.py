"""DPO: the SFT policy trained directly on the reward model's comparison data, with no
reward model and no sampling (Rafailov et al. 2023). The SFT model is also the reference.

  python -m experiments.comparisons --policy_from=runs/sft --data_dir=runs/data
  python -m experiments.dpo --flagfile=experiments/configs/demo_dpo.flags \
      --init_from=runs/sft --data_dir=runs/data --workdir=runs/dpo

Your own comparisons (`{"prompt", "responses", "ranking"}` per line, or pairwise
`{"chosen", "rejected"}` as in HH-RLHF): --train_files/--eval_files. The model and tokenizer
come from --init_from, so the flags that choose a model or tokenizer are rejected here.
--batch_size counts preference pairs (two sequences each).
"""

from __future__ import annotations


from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS

flags.DEFINE_float("dpo_beta", 0.1, "DPO beta: strength of the implicit KL to the reference.")
flags.DEFINE_float("dpo_label_smoothing", 0.0, "Probability that a label is flipped "
                   "(conservative DPO); 0 = plain DPO.")
flags.DEFINE_enum("dpo_pairs", "all", ["all", "best", "best_worst"],
                  "Pairs from a K-way ranking of distinct responses: all C(K,2), best vs each "
                  "other, or best vs worst (see instructjax/data/pairs.py).")
flags.DEFINE_float("epochs", 0.0, "Passes over the training pairs; sets the step count "
                   "(replaces --steps). 0 = use --steps.")

# experiments/common.py flags that have no meaning here.
REJECTED = {
    "model": "the model comes from --init_from",
    "model_override": "the model comes from --init_from",
    "tokenizer_path": "the tokenizer comes from --init_from",
    "vocab_size": "the tokenizer comes from --init_from",
    "dropout_rate": "dropout is off in DPO (policy and reference log-probs are compared)",
    "pack_rows": "DPO batches are one padded row per sequence",
}


def config_from_flags():
    from instructjax.rlhf.dpo_run import DPOConfig
    for name, why in REJECTED.items():
        if name in FLAGS and FLAGS[name].present:
            raise ValueError(f"--{name} does not apply to DPO: {why}")
    if FLAGS.epochs and FLAGS["steps"].present:
        raise ValueError("give --epochs or --steps, not both (add --epochs=0 to use --steps)")
    if not FLAGS.workdir:
        raise ValueError("--workdir is required")
    # Not common.run_config_from_flags: that checks --seq_len against the --model preset,
    # and DPO's model is the --init_from one (checked in train_dpo).
    return DPOConfig(
        workdir=FLAGS.workdir, init_from=FLAGS.init_from or "", mesh=FLAGS.mesh,
        beta=FLAGS.dpo_beta, label_smoothing=FLAGS.dpo_label_smoothing, pairs=FLAGS.dpo_pairs,
        epochs=FLAGS.epochs, remat=FLAGS.remat,
        compute_dtype=FLAGS.compute_dtype if FLAGS["compute_dtype"].present else "",
        optim=common.optim_config_from_flags(), train=common.train_config_from_flags(),
        data=common.data_config_from_flags())


main = common.experiment_main(config_from_flags, "instructjax.rlhf.dpo_run:train_dpo")


if __name__ == "__main__":
    app.run(main)
