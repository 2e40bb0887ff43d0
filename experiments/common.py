"""Flags shared by the language-model experiments, and the one place they become a config.

Only experiments/ read absl flags; the library sees a frozen RunConfig.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import flags

from experiments.errors import user_facing
from instructjax import config as config_lib
from instructjax.model import config as model_config

FLAGS = flags.FLAGS

# Run and parallelism.
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config. Reruns resume.")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1",
                    "Device mesh as axis:size over data,fsdp,tensor; -1 takes the remaining devices.")
flags.DEFINE_string("init_from", "", "Workdir of an earlier stage whose final params start this "
                    "run (an RL run's policy and KL reference).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("jax_distributed_auto", False, "Let jax.distributed read a TPU pod / SLURM environment.")
flags.DEFINE_integer("host_devices", 0, "CPU only: split this host into N virtual devices (testing).")

# Model.
flags.DEFINE_string("model", "demo", f"Size preset, one of: {', '.join(model_config.PRESETS)}.")
flags.DEFINE_multi_string("model_override", [], "key=value overriding a preset field, repeatable.")
flags.DEFINE_string("compute_dtype", "float32", "Activation dtype: float32 or bfloat16.")
flags.DEFINE_bool("remat", False, "Rematerialise each block in the backward pass.")
flags.DEFINE_float("dropout_rate", 0.0, "Dropout during pretraining/SFT (always off in RL).")

# Optimiser.
flags.DEFINE_float("learning_rate", 3e-4, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps.")
flags.DEFINE_enum("lr_schedule", "cosine", list(config_lib.SCHEDULES), "Decay after warmup.")
flags.DEFINE_float("final_lr_fraction", 0.1, "Final learning rate as a fraction of the peak.")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay on matrices.")
flags.DEFINE_float("adam_b1", 0.9, "Adam beta1.")
flags.DEFINE_float("adam_b2", 0.95, "Adam beta2.")
flags.DEFINE_float("grad_clip_norm", 1.0, "Global gradient-norm clip; 0 disables.")

# Loop.
flags.DEFINE_integer("steps", 1000, "Optimiser steps.")
flags.DEFINE_integer("batch_size", 32, "Global batch size in sequences.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per optimiser step.")
flags.DEFINE_float("rm_center_coef", 0.0, "Reward model: weight of (mean reward of a "
                   "prompt's responses)^2 in the loss, which keeps per-prompt offsets small.")
flags.DEFINE_enum("rm_read", "eos", list(config_lib.REWARD_READS), "Reward model: where "
                  "a response's reward is read: eos = the value at its last token (the EOS); "
                  "pooled = half that, half the mean value over the response's tokens. "
                  "Recorded in the workdir; PPO and the analysis read it from there.")
flags.DEFINE_integer("pack_rows", 0, "Reward model: pack the responses of up to --batch_size "
                     "prompts into this many rows of --seq_len (global); 0 = one padded row "
                     "per response.")
flags.DEFINE_integer("seed", 0, "The one seed; every random stream derives from it.")
flags.DEFINE_integer("log_every", 10, "Steps between metric lines.")
flags.DEFINE_integer("eval_every", 100, "Steps between evaluations.")
flags.DEFINE_integer("eval_batches", 8, "Eval batches per evaluation; 0 = the whole eval split.")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
flags.DEFINE_bool("allow_config_change", False, "Resume a run with other optimiser or loop "
                  "settings than it was started with (kept in the run record's history). "
                  "Model and data changes are always refused.")
flags.DEFINE_float("peak_flops_per_device", 0.0, "Peak FLOP/s of one device, for MFU; 0 = look up.")

# Data.
flags.DEFINE_string("data_dir", None, "Where datasets are generated/prepared (default: <workdir>/data).")
flags.DEFINE_integer("world_seed", 0, "Seed of the embedded world.")
flags.DEFINE_list("train_files", [], "Your own training JSONL, one or more files (comma-separated) "
                  "read in order, instead of the embedded world.")
flags.DEFINE_list("eval_files", [], "Your own evaluation JSONL, one or more files (with "
                  "--train_files).")
flags.DEFINE_string("tokenizer_path", "", "A sentencepiece .model to use instead of training one.")
flags.DEFINE_integer("vocab_size", 2048, "Tokenizer (and model) vocabulary size; default: "
                     "the --model preset's.")
flags.DEFINE_bool("whitespace_runs", True, "Add whitespace-run symbols to the tokenizer.")
flags.DEFINE_integer("world_pretrain_docs", 4000, "Embedded world: pretraining documents.")
flags.DEFINE_integer("world_sft_train", 4000, "Embedded world: SFT demonstrations.")
flags.DEFINE_integer("world_eval", 600, "Embedded world: held-out examples per split (600 "
                     "held-out prompts give a win rate a 95% interval of about +-0.04).")
flags.DEFINE_integer("world_prompts", 2000, "Embedded world: prompts for RM/PPO.")
flags.DEFINE_integer("data_shards", 0, "Data shards, each read by one process (0 = one per "
                     "process). Runs with the same value see the same data whatever the number "
                     "of processes, and resume on any process count that divides it.")


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise flags.ValidationError(f"--model_override={text!r}: expected key=value")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def setup_devices() -> None:
    """Applies --host_devices and starts jax.distributed; call before any JAX use."""
    import jax
    from instructjax import parallel
    if FLAGS.host_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.host_devices)
    parallel.initialize_distributed(coordinator_address=FLAGS.coordinator_address,
                                    num_processes=FLAGS.num_processes,
                                    process_id=FLAGS.process_id,
                                    auto_detect=FLAGS.jax_distributed_auto)


def model_config_from_flags(preset_name: str = "") -> model_config.ModelConfig:
    """--model (or `preset_name`, for sweeps over sizes) with the model flags applied."""
    overrides = dict(parse_override(o) for o in FLAGS.model_override)
    if FLAGS["vocab_size"].present:  # else the preset's own vocabulary
        overrides.setdefault("vocab_size", FLAGS.vocab_size)
    overrides.setdefault("compute_dtype", FLAGS.compute_dtype)
    overrides.setdefault("remat", FLAGS.remat)
    overrides.setdefault("dropout_rate", FLAGS.dropout_rate)
    try:
        return model_config.preset(preset_name or FLAGS.model, **overrides)
    except (TypeError, ValueError) as e:
        raise flags.ValidationError(f"--model/--model_override: {e}") from None


def optim_config_from_flags() -> config_lib.OptimConfig:
    return config_lib.OptimConfig(
        learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
        schedule=FLAGS.lr_schedule, final_lr_fraction=FLAGS.final_lr_fraction,
        weight_decay=FLAGS.weight_decay, b1=FLAGS.adam_b1, b2=FLAGS.adam_b2,
        grad_clip_norm=FLAGS.grad_clip_norm)


def train_config_from_flags(**overrides) -> config_lib.TrainConfig:
    return config_lib.TrainConfig(**{
        "steps": FLAGS.steps, "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
        "grad_accum_steps": FLAGS.grad_accum_steps, "seed": FLAGS.seed,
        "log_every": FLAGS.log_every, "eval_every": FLAGS.eval_every,
        "eval_batches": FLAGS.eval_batches, "checkpoint_every": FLAGS.checkpoint_every,
        "keep_checkpoints": FLAGS.keep_checkpoints,
        "peak_flops_per_device": FLAGS.peak_flops_per_device,
        "allow_config_change": FLAGS.allow_config_change, **overrides})


def data_config_from_flags(vocab_size: int = 0) -> config_lib.DataConfig:
    """The data flags; `vocab_size` is the model's, used unless --vocab_size is given."""
    if not FLAGS.workdir:
        raise flags.ValidationError("--workdir is required")
    return config_lib.DataConfig(
        data_dir=FLAGS.data_dir or os.path.join(FLAGS.workdir, "data"),
        world_seed=FLAGS.world_seed, train_files=tuple(FLAGS.train_files),
        eval_files=tuple(FLAGS.eval_files), tokenizer_path=FLAGS.tokenizer_path,
        vocab_size=FLAGS.vocab_size if FLAGS["vocab_size"].present or not vocab_size
        else vocab_size,
        whitespace_runs=FLAGS.whitespace_runs,
        world_pretrain_docs=FLAGS.world_pretrain_docs, world_sft_train=FLAGS.world_sft_train,
        world_eval=FLAGS.world_eval, world_prompts=FLAGS.world_prompts,
        data_shards=FLAGS.data_shards)


def run_config_from_flags(task: str) -> config_lib.RunConfig:
    if not FLAGS.workdir:
        raise flags.ValidationError("--workdir is required")
    model = model_config_from_flags()
    return config_lib.RunConfig(
        task=task,
        workdir=FLAGS.workdir,
        mesh=FLAGS.mesh,
        init_from=FLAGS.init_from,
        rm_center_coef=FLAGS.rm_center_coef,
        rm_read=FLAGS.rm_read,
        model=model,
        optim=optim_config_from_flags(),
        train=train_config_from_flags(pack_rows=FLAGS.pack_rows),
        data=data_config_from_flags(model.vocab_size),
    )


def experiment_main(build_config, train: str):
    """The absl main of an experiment: `build_config()` reads the flags (any ValueError is a
    bad flag); `train` ("module:function") is imported only then, so JAX starts after the
    flags and devices are set up."""
    def main(argv):
        try:
            cfg = build_config()
        except (ValueError, flags.ValidationError) as e:
            raise SystemExit(f"error: {e}") from None
        setup_devices()
        module, function = train.split(":")
        getattr(importlib.import_module(module), function)(cfg, argv=list(sys.argv))
    return user_facing(main)


def main_for(task: str):
    """The absl main of a language-model experiment."""
    return experiment_main(lambda: run_config_from_flags(task), "instructjax.train.run:train_lm")
