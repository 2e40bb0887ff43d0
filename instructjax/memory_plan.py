"""Ahead-of-time memory plans: will this step fit on these chips?

`plan(cfg, devices)` builds the REAL jitted step of a task -- the train step of
train/step.py with the optimiser of train/state.py, or the PPO / PPO-ptx iteration of
rlhf/ppo.py exactly as ppo_run.py calls it -- lowers it on abstract inputs only
(`jax.eval_shape` state, `ShapeDtypeStruct`s carrying the logical shardings), compiles it,
and reads XLA's memory analysis. Nothing the size of the model is ever allocated, so a
7B-parameter plan runs on a laptop over a virtual mesh of CPU devices.

All numbers are bytes PER DEVICE. Parameter / optimiser / batch rows come from the
sharded abstract shapes; arguments, outputs, aliased (donated buffers reused for outputs),
temporaries (activations, all-gathered parameters, gradients, workspace) and generated
code come from XLA. The peak estimate is arguments + outputs - aliased + temporaries +
generated code: everything the program needs live at once, counting a donated buffer once.
The summed results of the program's collectives show how much of the temporaries are
gathered parameters (all-gather) and unsharded gradients (all-reduce).

Caveat: the plan is compiled by XLA's CPU backend; TPU/GPU compilers fuse and schedule
differently (the CPU backend, for one, reduces FSDP gradients with a full-size all-reduce
where GPU/TPU use a reduce-scatter), so read temporaries as an estimate. Parameter,
optimiser, argument, output and aliased bytes are exact.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructjax import parallel
from instructjax.config import ConfigError, DataConfig, OptimConfig
from instructjax.losses import LMLossConfig, Objective, lm_loss, make_apply
from instructjax.model import config as model_config
from instructjax.model.transformer import Transformer
from instructjax.train import state as state_lib, step as step_lib

TASKS = ("train", "ppo")
GIB = 1024 ** 3
# PPO needs token ids for EOS and PAD; their values do not change any shape.
_EOS, _PAD = 1, 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """What to plan. train: `batch_size` rows of `seq_len` tokens. ppo: `batch_size`
    prompts (rollout batch) of seq_len - max_new_tokens tokens, max_new_tokens sampled,
    ppo_epochs * num_minibatches updates; ptx_batch_size > 0 adds PPO-ptx's pretraining
    rows (ptx_batch_size per update, ptx_seq_len tokens)."""
    model: str
    task: str = "train"
    mesh: str = "data:1,fsdp:-1,tensor:1"
    devices: int = 1
    batch_size: int
    seq_len: int
    device_memory_gib: float = 16.0
    remat: bool = False
    compute_dtype: str = "float32"
    grad_accum_steps: int = 1
    max_new_tokens: int = 64
    ppo_epochs: int = 4
    num_minibatches: int = 4
    ptx_batch_size: int = 0
    ptx_seq_len: int = 128

    def __post_init__(self):
        def require(ok, message):
            if not ok:
                raise ConfigError(message)
        require(self.model in model_config.PRESETS,
                f"--model: unknown preset {self.model!r}; choose one of: "
                f"{', '.join(model_config.PRESETS)}")
        require(self.task in TASKS, f"--task must be one of {TASKS}, got {self.task!r}")
        for name in ("devices", "batch_size", "grad_accum_steps", "max_new_tokens",
                     "ppo_epochs", "num_minibatches", "ptx_seq_len"):
            require(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        require(self.ptx_batch_size >= 0, "--ptx_batch_size must be >= 0 (0 = plain PPO)")
        require(self.device_memory_gib > 0, "--device_memory_gib must be > 0")
        try:
            model = self.model_config()
        except ValueError as e:
            raise ConfigError(f"--compute_dtype: {e}") from None
        require(1 < self.seq_len <= model.max_len,
                f"--seq_len must be in [2, {model.max_len}] (the max_len of {self.model}), "
                f"got {self.seq_len}")
        dp = math.prod(parallel.parse_mesh_spec(self.mesh, self.devices)[a]
                       for a in ("data", "fsdp"))
        if self.task == "train":
            require(self.batch_size % (self.grad_accum_steps * dp) == 0,
                    f"--batch_size ({self.batch_size}) must be a multiple of --grad_accum_steps "
                    f"({self.grad_accum_steps}) x the data-parallel size {dp} of --mesh")
        else:
            require(self.seq_len > self.max_new_tokens,
                    f"--seq_len ({self.seq_len}) must exceed --max_new_tokens "
                    f"({self.max_new_tokens}): the rest is the prompt")
            require(self.batch_size % dp == 0,
                    f"--batch_size (rollout batch, {self.batch_size}) must be a multiple of the "
                    f"data-parallel size {dp} of --mesh")
            require(self.ptx_seq_len <= model.max_len, f"--ptx_seq_len exceeds max_len "
                    f"{model.max_len}")
            rows = self.ptx_batch_size * self.ppo_epochs * self.num_minibatches
            require(rows % dp == 0, f"pretraining rows per iteration (--ptx_batch_size x "
                    f"--ppo_epochs x --num_minibatches = {rows}) must be a multiple of the "
                    f"data-parallel size {dp}")
            self.ppo_config()  # PPOConfig checks the rest (minibatch / accumulation sizes)

    def model_config(self) -> model_config.ModelConfig:
        return model_config.preset(self.model, remat=self.remat, compute_dtype=self.compute_dtype,
                                   dropout_rate=0.0)

    def ppo_config(self):
        from instructjax.rlhf.ppo import PPOConfig
        # The paths are never read: the plan only needs the shapes and the objective.
        return PPOConfig(
            workdir="<memory-plan>", policy_from="<memory-plan>", reward_from="<memory-plan>",
            data=DataConfig(data_dir="<memory-plan>"), optim=OptimConfig(learning_rate=1e-5),
            rollout_batch_size=self.batch_size, max_prompt_len=self.seq_len - self.max_new_tokens,
            max_new_tokens=self.max_new_tokens, ppo_epochs=self.ppo_epochs,
            num_minibatches=self.num_minibatches, grad_accum_steps=self.grad_accum_steps,
            gamma_ptx=1.0 if self.ptx_batch_size else 0.0,
            ptx_batch_size=max(self.ptx_batch_size, 1), ptx_seq_len=self.ptx_seq_len,
            compute_dtype=self.compute_dtype, remat=self.remat)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings (the
    largest shard of each leaf; shards are even under parallel.logical_shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _struct(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _lm_batch(rows: int, seq_len: int, sharding, prefix: str = "") -> dict:
    """The abstract LM batch (pipeline.FromPacked's keys and dtypes)."""
    keys = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
            "segment_ids": jnp.int32, "loss_mask": jnp.float32}
    return {prefix + k: _struct((rows, seq_len), dtype, sharding) for k, dtype in keys.items()}


def _abstract_rng(mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return _struct(key.shape, key.dtype, parallel.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted step and its abstract arguments; `groups` names the argument bytes."""
    step: Any
    args: tuple
    groups: dict[str, Any]
    donated: Any  # the donated argument (the train state)


def train_program(cfg: PlanConfig, mesh) -> Program:
    """The LM train step of train/run.py (pretraining / SFT) on abstract inputs."""
    model = Transformer(cfg.model_config(), head="lm")
    optim = OptimConfig(learning_rate=3e-4)
    tx = state_lib.make_optimizer(optim, total_steps=1000)
    schedule = state_lib.make_schedule(optim, total_steps=1000)
    state, shardings = state_lib.abstract_state(model, tx, mesh, cfg.seq_len)
    step = step_lib.make_train_step(Objective(lm_loss, LMLossConfig()), apply=make_apply(model),
                                    tx=tx, schedule=schedule, mesh=mesh,
                                    state_shardings=shardings,
                                    grad_accum_steps=cfg.grad_accum_steps)
    batch = _lm_batch(cfg.batch_size, cfg.seq_len, parallel.batch_sharding(mesh))
    return Program(step, (state, batch, _abstract_rng(mesh)),
                   {"parameters": state.params, "optimiser state": state.opt_state,
                    "batch": batch}, donated=state)


def ppo_program(cfg: PlanConfig, mesh) -> Program:
    """The PPO / PPO-ptx iteration of rlhf/ppo_run.py on abstract inputs: rollout (sampling,
    policy/reference/value/reward forward passes) and all PPO updates. The policy and value
    models share the preset (the value model starts as the reward model)."""
    from instructjax.rlhf import ppo, rl_state, rollout
    ppo_cfg = cfg.ppo_config()
    model_cfg = cfg.model_config()
    policy, value = Transformer(model_cfg), Transformer(model_cfg, head="scalar")
    models = rollout.RolloutModels(policy=policy, value=value, reward=value)
    tx, schedule = ppo.make_optimizer(ppo_cfg)
    state, shardings = rl_state.abstract_ppo_state(policy, value, tx, mesh, ppo_cfg.init_kl_coef)
    frozen = {"reference": state.params, "reward": state.value_params}
    step = ppo.make_ppo_iteration(
        ppo_cfg, models=models, rollout_cfg=ppo_cfg.rollout_config(eos_id=_EOS, pad_id=_PAD),
        tx=tx, schedule=schedule, mesh=mesh, state_shardings=shardings,
        frozen_shardings={"reference": shardings.params, "reward": shardings.value_params},
        return_responses=True)
    rows = parallel.batch_sharding(mesh)
    prompt_len = ppo_cfg.max_prompt_len
    batch = {"prompt_tokens": _struct((cfg.batch_size, prompt_len), jnp.int32, rows),
             "prompt_mask": _struct((cfg.batch_size, prompt_len), jnp.int32, rows),
             "prompt_line": _struct((cfg.batch_size,), jnp.int32, rows)}
    if cfg.ptx_batch_size:
        batch.update(_lm_batch(ppo_cfg.num_updates * cfg.ptx_batch_size, cfg.ptx_seq_len, rows,
                               prefix="ptx_"))
    return Program(step, (state, frozen, batch, _abstract_rng(mesh)),
                   {"policy parameters": state.params, "value parameters": state.value_params,
                    "optimiser state": state.opt_state,
                    "frozen reference parameters": frozen["reference"],
                    "frozen reward parameters": frozen["reward"], "batch": batch},
                   donated=state)


def build_program(cfg: PlanConfig, devices=None) -> tuple[Program, Any]:
    """(the task's Program, its mesh) on the first cfg.devices of `devices`."""
    devices = list(jax.devices() if devices is None else devices)
    if cfg.devices > len(devices):
        raise ConfigError(f"--devices={cfg.devices} but JAX has only {len(devices)} devices; "
                          "on CPU set jax_num_cpu_devices before JAX starts (experiments.aot "
                          "does this from --devices)")
    mesh = parallel.make_mesh(cfg.mesh, devices[:cfg.devices])
    return (train_program if cfg.task == "train" else ppo_program)(cfg, mesh), mesh


def compile_program(program: Program):
    return program.step.lower(*program.args).compile()


_HLO_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16)\[([\d,]*)\]")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Summed result bytes of each kind of collective in an optimised HLO module: how much
    the compiled program gathers (FSDP parameters) and reduces (gradients). Not all of it is
    live at once, but it shows where temporaries come from."""
    out = dict.fromkeys(_COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        for op in _COLLECTIVES:
            if f" {op}(" in line:
                # The result type sits between '=' and the op name; operands come after.
                result_type = line.partition(" = ")[2].rpartition(f" {op}(")[0]
                for dtype, dims in _HLO_ARRAY.findall(result_type):
                    bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
                    out[op] += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return out


def summarise(cfg: PlanConfig, program: Program, compiled, *, mesh) -> dict[str, Any]:
    """The plan as a JSON-ready dict: per-device bytes and whether it fits."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this XLA backend gives no memory analysis for compiled programs")
    xla = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
           "generated code": stats.generated_code_size_in_bytes}
    peak = (xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
            + xla["generated code"])
    budget = int(cfg.device_memory_gib * GIB)
    return {
        "config": dataclasses.asdict(cfg),
        "mesh": dict(mesh.shape),
        "num_params": cfg.model_config().num_params(),
        "state": {name: bytes_per_device(tree) for name, tree in program.groups.items()},
        "donated": bytes_per_device(program.donated),
        "xla": xla,
        "collectives": collective_bytes(compiled.as_text()),
        "peak": peak,
        "device_memory": budget,
        "fits": peak <= budget,
    }


def plan(cfg: PlanConfig, devices=None) -> dict[str, Any]:
    """Builds, lowers and compiles the task's step on abstract inputs; returns `summarise`
    plus the wall time of each phase in seconds."""
    start = time.perf_counter()
    program, mesh = build_program(cfg, devices)
    lowered = program.step.lower(*program.args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    out = summarise(cfg, program, compiled, mesh=mesh)
    out["seconds"] = {"trace_and_lower": round(lowered_at - start, 2),
                      "compile": round(done - lowered_at, 2)}
    return out


def format_table(result: dict[str, Any]) -> str:
    """A per-device table for people (the JSON holds the same numbers)."""
    c = result["config"]
    mesh = ",".join(f"{k}:{v}" for k, v in result["mesh"].items())
    lines = [f"memory plan: {c['model']} ({result['num_params'] / 1e9:.3g}B params), "
             f"task={c['task']}{' (ptx)' if c['task'] == 'ppo' and c['ptx_batch_size'] else ''}"
             f", mesh {mesh} ({c['devices']} devices), batch {c['batch_size']} x "
             f"{c['seq_len']}, {c['compute_dtype']}, remat={c['remat']}",
             "per device:"]

    def row(name, value):
        lines.append(f"  {name:<30} {value / GIB:10.3f} GiB  {value:>16,d} B")

    for name, value in result["state"].items():
        row(name, value)
    lines.append("  XLA memory analysis:")
    for name, value in result["xla"].items():
        row(name, value)
    row("peak estimate", result["peak"])
    row("device memory", result["device_memory"])
    lines.append(f"  => {'FITS' if result['fits'] else 'DOES NOT FIT'} in "
                 f"{c['device_memory_gib']:g} GiB per device")
    lines.append("  collectives in the program (summed results, not all live at once):")
    for name, value in result["collectives"].items():
        row(name, value)
    seconds = result.get("seconds")
    if seconds:
        lines.append(f"  (trace+lower {seconds['trace_and_lower']:.1f} s, compile "
                     f"{seconds['compile']:.1f} s)")
    return "\n".join(lines)


# ============================================================================ measurement

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Resets the process's peak-RSS mark (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bytes_on_device(tree, device) -> int:
    """Bytes of the live arrays of `tree` stored on `device` (measured, not planned)."""
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) if not x.is_deleted()
               for s in x.addressable_shards if s.device == device)


def materialise(abstract_tree):
    """Real arrays (filled with ones; random keys from seed 0) in the abstract shardings."""
    def make(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), leaf.sharding)
        return jax.device_put(np.ones(leaf.shape, leaf.dtype), leaf.sharding)
    return jax.tree.map(make, abstract_tree)


def _release_free_heap() -> None:
    """Returns freed heap pages to the OS, so the step's allocations show up as RSS growth
    instead of silently reusing pages earlier work left resident (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(cfg: PlanConfig, devices=None) -> dict[str, Any]:
    """Runs the planned program on real arrays (small presets only) and measures, on the
    mesh's first device, the argument bytes, the output bytes and the donated bytes freed
    (from the live arrays), plus the process's peak resident-memory growth during the call
    (Linux), which covers every device's outputs not aliased to inputs and XLA's temporaries.
    The measured call is the second one: the first pays one-off runtime set-up. Returns the
    plan of the same compiled program under 'plan'."""
    program, mesh = build_program(cfg, devices)
    compiled = compile_program(program)
    device = mesh.devices.flat[0]
    args = materialise(program.args)
    # Warm-up call; its new state (output 0) is the donated argument of the measured call.
    args = (jax.block_until_ready(compiled(*args))[0],) + tuple(args[1:])
    arguments = bytes_on_device(args, device)
    _release_free_heap()
    rss_before = _status_kib("VmRSS")
    peak_ok = _reset_peak_rss()
    outputs = jax.block_until_ready(compiled(*args))
    peak_growth = (_status_kib("VmHWM") - rss_before) * 1024 if peak_ok else None
    # Accelerators: the allocator's peak since start (both calls; each holds the same).
    stats = device.memory_stats() if device.platform != "cpu" else None
    return {"plan": summarise(cfg, program, compiled, mesh=mesh),
            "device_peak_bytes_in_use": (stats or {}).get("peak_bytes_in_use"),
            "arguments": arguments, "outputs": bytes_on_device(outputs, device),
            "donated_freed": arguments - bytes_on_device(args, device),
            "output_leaves": len(jax.tree.leaves(outputs)),
            "peak_rss_growth": peak_growth, "devices_in_process": len(mesh.devices.flat)}
