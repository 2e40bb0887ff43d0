"""Memory plan: does a step fit? Compiles (never runs, never allocates) the real train step
or PPO / PPO-ptx iteration of a size preset on a virtual mesh of CPU devices and prints
XLA's per-device memory analysis against a per-device memory budget.

  python -m experiments.aot --flagfile=experiments/configs/aot_llama7b_ppo_ptx.flags
  python -m experiments.aot --model=gpt2-1.5b --task=train --devices=64 --batch_size=64 \
      --seq_len=1024 --remat --compute_dtype=bfloat16 --device_memory_gib=16 --out=plan.json

--measure also runs the step once on real arrays (small presets only) and prints what the
first device really held, to check the plan against. --platform=gpu (or tpu) plans with the
accelerator's own compiler on the real devices of this machine instead of a virtual mesh;
with --measure it also reads the device allocator's peak.
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments.errors import user_facing

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "Size preset (instructjax/model/config.py PRESETS).")
flags.DEFINE_enum("task", "train", ["train", "ppo"], "train: the LM train step (pretraining/"
                  "SFT); ppo: one PPO iteration (rollout + updates), PPO-ptx with --ptx_batch_size.")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Mesh as axis:size over data,fsdp,tensor.")
flags.DEFINE_integer("devices", 8, "Devices in the mesh (virtual CPU devices unless "
                     "--platform names an accelerator).")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu", "tpu"], "cpu: a virtual mesh of CPU "
                  "devices compiled by XLA:CPU; gpu/tpu: this machine's real devices.")
flags.DEFINE_integer("batch_size", None, "Global sequences per step (ppo: prompts per rollout).")
flags.DEFINE_integer("seq_len", None, "Tokens per sequence (ppo: prompt + response).")
flags.DEFINE_float("device_memory_gib", 16.0, "Memory of one device, GiB.")
flags.DEFINE_bool("remat", False, "Rematerialise each block in the backward pass.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16", "float16"],
                  "Activation dtype.")
flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per optimiser update.")
flags.DEFINE_integer("max_new_tokens", 64, "ppo: response tokens sampled per prompt.")
flags.DEFINE_integer("ppo_epochs", 4, "ppo: passes over each rollout batch.")
flags.DEFINE_integer("num_minibatches", 4, "ppo: optimiser updates per epoch.")
flags.DEFINE_integer("ptx_batch_size", 0, "ppo: pretraining rows per update (PPO-ptx); 0 = plain PPO.")
flags.DEFINE_integer("ptx_seq_len", 128, "ppo: tokens per pretraining row.")
flags.DEFINE_string("out", "", "Also write the plan as JSON here (atomically).")
flags.DEFINE_bool("measure", False, "Also run the step once and measure (small presets only).")
flags.mark_flags_as_required(["model", "batch_size", "seq_len"])


def config_from_flags():
    from instructjax.memory_plan import PlanConfig
    return PlanConfig(
        model=FLAGS.model, task=FLAGS.task, mesh=FLAGS.mesh, devices=FLAGS.devices,
        batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
        device_memory_gib=FLAGS.device_memory_gib, remat=FLAGS.remat,
        compute_dtype=FLAGS.compute_dtype, grad_accum_steps=FLAGS.grad_accum_steps,
        max_new_tokens=FLAGS.max_new_tokens, ppo_epochs=FLAGS.ppo_epochs,
        num_minibatches=FLAGS.num_minibatches, ptx_batch_size=FLAGS.ptx_batch_size,
        ptx_seq_len=FLAGS.ptx_seq_len)


def main(argv):
    from instructjax.config import ConfigError
    try:
        cfg = config_from_flags()
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    import jax
    if FLAGS.platform == "cpu":
        # The virtual mesh: CPU devices, as many as asked for, set before JAX starts.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cfg.devices)
    try:
        devices = jax.devices(FLAGS.platform)
    except RuntimeError as e:
        raise SystemExit(f"error: --platform={FLAGS.platform}: {e}") from None
    from instructjax import memory_plan
    from instructjax.data.jsonl import write_json_atomic
    try:
        result = memory_plan.plan(cfg, devices)
        print(memory_plan.format_table(result))
        if FLAGS.measure:
            result["measured"] = memory_plan.measure(cfg, devices)
            result["measured"].pop("plan")
            print("measured on the first device:", json.dumps(result["measured"]))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if FLAGS.out:
        write_json_atomic(FLAGS.out, result)


if __name__ == "__main__":
    app.run(user_facing(main))
