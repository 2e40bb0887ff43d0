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

TPU plans without a TPU: --platform=tpu --topology=v5e:8x8 (v4, v5e, v5p, v6e; --num_slices
for multi-slice) compiles with XLA:TPU for that topology on this machine (needs libtpu:
`pip install -e '.[tpu]'` in its own venv), against the chip's HBM, and adds the compiled
FLOPs per step, the ideal step time at the chip's peak and the MFU bound:

  .venv-tpu/bin/python -m experiments.aot --platform=tpu --topology=v5e:8x8 \
      --flagfile=experiments/configs/aot_llama7b_train.flags --find_max_batch

--find_max_batch then searches the largest batch that fits (one compile per probe).
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments.errors import user_facing
from instructjax.model.config import ATTENTION_IMPLS, REMAT_POLICIES  # no JAX import

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "Size preset (instructjax/model/config.py PRESETS).")
flags.DEFINE_enum("task", "train", ["train", "ppo"], "train: the LM train step (pretraining/"
                  "SFT); ppo: one RL iteration (rollout + updates), PPO-ptx with --ptx_batch_size.")
flags.DEFINE_enum("algorithm", "ppo", ["ppo", "grpo", "rloo"], "ppo: the RL algorithm.")
flags.DEFINE_integer("group_size", 1, "ppo: responses sampled per prompt (grpo / rloo: >= 2).")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Mesh as axis:size over data,fsdp,tensor.")
flags.DEFINE_integer("devices", 8, "Devices in the mesh (virtual CPU devices unless "
                     "--platform names an accelerator).")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu", "tpu"], "cpu: a virtual mesh of CPU "
                  "devices compiled by XLA:CPU; gpu/tpu: this machine's real devices, or with "
                  "--topology a TPU topology compiled by XLA:TPU here.")
flags.DEFINE_string("topology", "", "--platform=tpu: plan for this TPU topology without a TPU, "
                    "as chip:shape, e.g. v5e:8x8, v6e:4x4, v4:2x2x4, v5p:4x4x4 (needs libtpu).")
flags.DEFINE_integer("num_slices", 1, "--topology: slices joined over the data-centre network "
                     "(the data axis of --mesh spans them).")
flags.DEFINE_bool("find_max_batch", False, "Also search the largest --batch_size that fits "
                  "(doubling, then bisection; one compile per probe).")
flags.DEFINE_integer("batch_size", None, "Global sequences per step (ppo: prompts per rollout).")
flags.DEFINE_integer("seq_len", None, "Tokens per sequence (ppo: prompt + response).")
flags.DEFINE_float("device_memory_gib", 16.0, "Memory of one device, GiB (with --topology: "
                   "the chip's HBM unless given).")
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
# The model's memory levers (instructjax/model/config.py).
flags.DEFINE_bool("scan_layers", False, "Blocks as one scan over stacked layer params.")
flags.DEFINE_enum("attention_impl", "plain", list(ATTENTION_IMPLS),
                  "plain: T x S scores; blockwise: flash-style, never stores them.")
flags.DEFINE_enum("remat_policy", "", ["", *REMAT_POLICIES],
                  "What a rematerialised block saves; empty: --remat decides (full / none).")
flags.mark_flags_as_required(["model", "batch_size", "seq_len"])


def config_from_flags(topology=None):
    from instructjax.config import ConfigError
    from instructjax.memory_plan import PlanConfig
    devices, memory = FLAGS.devices, FLAGS.device_memory_gib
    if topology is not None:
        # A topology plan uses every chip and, unless told otherwise, the chip's HBM.
        if FLAGS["devices"].present and FLAGS.devices != topology.chips:
            raise ConfigError(f"--devices={FLAGS.devices} but --topology="
                              f"{topology.describe()}; drop --devices or make them agree")
        devices = topology.chips
        memory = memory if FLAGS["device_memory_gib"].present else topology.chip.hbm_gib
    return PlanConfig(
        model=FLAGS.model, task=FLAGS.task, mesh=FLAGS.mesh, devices=devices,
        batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
        device_memory_gib=memory, remat=FLAGS.remat,
        compute_dtype=FLAGS.compute_dtype, grad_accum_steps=FLAGS.grad_accum_steps,
        max_new_tokens=FLAGS.max_new_tokens, ppo_epochs=FLAGS.ppo_epochs,
        num_minibatches=FLAGS.num_minibatches, ptx_batch_size=FLAGS.ptx_batch_size,
        ptx_seq_len=FLAGS.ptx_seq_len, algorithm=FLAGS.algorithm, group_size=FLAGS.group_size,
        scan_layers=FLAGS.scan_layers, attention_impl=FLAGS.attention_impl,
        remat_policy=FLAGS.remat_policy)


def parse_topology():
    from instructjax.config import ConfigError
    if not FLAGS.topology:
        if FLAGS.num_slices != 1:
            raise ConfigError("--num_slices needs --topology")
        return None
    if FLAGS.platform != "tpu":
        raise ConfigError(f"--topology={FLAGS.topology} plans for a TPU: add --platform=tpu")
    if FLAGS.measure:
        raise ConfigError("--measure runs the step, which a --topology plan cannot (no TPU)")
    from instructjax import tpu_plan
    return tpu_plan.parse_topology(FLAGS.topology, FLAGS.num_slices)


def main(argv):
    topology = parse_topology()
    cfg = config_from_flags(topology)
    import jax
    if FLAGS.platform == "cpu" or topology is not None:
        # CPU: the virtual mesh, as many devices as asked for, set before JAX starts.
        # Topology: libtpu's compile-only devices; JAX itself stays on the CPU.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cfg.devices if topology is None else 1)
    from instructjax import memory_measure, memory_plan, tpu_plan
    from instructjax.data.jsonl import write_json_atomic
    if topology is not None:
        devices = tpu_plan.topology_devices(topology)
    else:
        try:
            devices = jax.devices(FLAGS.platform)
        except RuntimeError as e:
            hint = " (no TPU here? plan for one with --topology)" if FLAGS.platform == "tpu" else ""
            raise SystemExit(f"error: --platform={FLAGS.platform}: {e}{hint}") from None
    peak = tpu_plan.peak_for(devices[0].device_kind, topology and topology.chip)

    def plan(c):
        result = tpu_plan.add_speed(memory_plan.plan(c, devices), c, peak)
        if topology is not None:
            chip = topology.chip
            result["topology"] = topology.describe()
            result["chip"] = {"name": chip.name, "device_kind": chip.device_kind,
                              "hbm_gib": chip.hbm_gib, "peak_flops": chip.peak_flops}
        return result

    result = plan(cfg)
    print(memory_plan.format_table(result))
    speed = tpu_plan.format_speed(result)
    if speed:
        print(speed)
    if FLAGS.measure:
        result["measured"] = memory_measure.measure(cfg, devices)
        result["measured"].pop("plan")
        print("measured on the first device:", json.dumps(result["measured"]))
    if FLAGS.find_max_batch:
        result["max_batch"] = search_max_batch(cfg, plan, result)
    if FLAGS.out:
        write_json_atomic(FLAGS.out, result)


def search_max_batch(cfg, plan, first):
    from instructjax import tpu_plan
    known = {cfg.batch_size: first}  # the plan already compiled is not compiled again

    def report(batch_size, probe):
        verdict = "fits" if probe["fits"] else "does not fit"
        detail = (f"peak {probe['peak'] / 2 ** 30:.2f} GiB" if probe["peak"] is not None
                  else f"refused: {probe['refused'].rstrip('.')}")
        print(f"  probe --batch_size={batch_size}: {verdict} ({detail}, compile "
              f"{probe['seconds']['compile']:.0f} s)", flush=True)

    print("searching the largest batch that fits (one compile per probe):", flush=True)
    found = tpu_plan.find_max_batch(
        cfg, lambda c: known[c.batch_size] if c.batch_size in known else plan(c), on_probe=report)
    if found["batch_size"] is None:
        print("=> no batch fits, not even the smallest (--batch_size="
              f"{found['probes'][0]['batch_size']})")
    else:
        at_least = "at least " if found["capped"] else ""
        print(f"=> largest batch that fits: {at_least}--batch_size={found['batch_size']} "
              f"({found['per_device']:g} per data-parallel device)")
    return found


if __name__ == "__main__":
    app.run(user_facing(main))
