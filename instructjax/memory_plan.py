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

Caveat: a plan compiled by XLA's CPU backend is no guide to a TPU's temporaries (the CPU
backend, for one, reduces FSDP gradients with a full-size all-reduce where GPU/TPU use a
reduce-scatter); tpu_plan.py compiles for a named TPU topology with XLA:TPU instead, and a
compiler that refuses a program too big for the device (RESOURCE_EXHAUSTED) gives a plan
that does not fit, with its message. Parameter, optimiser and batch bytes are exact on all.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructjax import parallel
from instructjax.config import ConfigError, OptimConfig
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
    algorithm: str = "ppo"  # ppo: "ppo" | "grpo" | "rloo" (rlhf/algorithms.py)
    group_size: int = 1     # ppo: responses per prompt (GRPO's / RLOO's groups)
    # ModelConfig's memory levers (model/config.py): scanned layers, attention, remat.
    scan_layers: bool = False
    attention_impl: str = "plain"
    remat_policy: str = ""

    def __post_init__(self):
        def require(ok, message):
            if not ok:
                raise ConfigError(message)
        require(self.model in model_config.PRESETS,
                f"--model: unknown preset {self.model!r}; choose one of: "
                f"{', '.join(model_config.PRESETS)}")
        require(self.task in TASKS, f"--task must be one of {TASKS}, got {self.task!r}")
        for name in ("devices", "batch_size", "grad_accum_steps", "max_new_tokens",
                     "ppo_epochs", "num_minibatches", "ptx_seq_len", "group_size"):
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
        dp = self.data_parallel_size
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

    @property
    def data_parallel_size(self) -> int:
        """Devices that split the batch: the mesh's data x fsdp axes."""
        return math.prod(parallel.parse_mesh_spec(self.mesh, self.devices)[a]
                         for a in ("data", "fsdp"))

    def model_config(self) -> model_config.ModelConfig:
        return model_config.preset(self.model, remat=self.remat, compute_dtype=self.compute_dtype,
                                   dropout_rate=0.0, scan_layers=self.scan_layers,
                                   attention_impl=self.attention_impl,
                                   remat_policy=self.remat_policy)

    def ppo_config(self):
        from instructjax.rlhf.ppo import PPOConfig
        return PPOConfig(
            optim=OptimConfig(learning_rate=1e-5),
            rollout_batch_size=self.batch_size, max_prompt_len=self.seq_len - self.max_new_tokens,
            max_new_tokens=self.max_new_tokens, ppo_epochs=self.ppo_epochs,
            num_minibatches=self.num_minibatches, grad_accum_steps=self.grad_accum_steps,
            gamma_ptx=1.0 if self.ptx_batch_size else 0.0,
            ptx_batch_size=max(self.ptx_batch_size, 1), ptx_seq_len=self.ptx_seq_len,
            compute_dtype=self.compute_dtype, remat=self.remat, algorithm=self.algorithm,
            group_size=self.group_size)


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
    from instructjax.rlhf import rollout
    from instructjax.rlhf.rl_program import build_rl_program
    ppo_cfg = cfg.ppo_config()
    model_cfg = cfg.model_config()
    policy, scalar = Transformer(model_cfg), Transformer(model_cfg, head="scalar")
    value = scalar if ppo_cfg.algo.uses_value_model else None
    models = rollout.RolloutModels(policy=policy, value=value, reward=scalar)
    program = build_rl_program(ppo_cfg, models, mesh, eos_id=_EOS, pad_id=_PAD)
    state, frozen = program.abstract_state, program.abstract_frozen
    step = program.iteration(return_responses=True)
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
    from instructjax.tpu_plan import slice_aware_mesh  # a multi-slice TPU mesh, else make_mesh
    mesh = slice_aware_mesh(cfg.mesh, devices[:cfg.devices])
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


def summarise(cfg: PlanConfig, program: Program, compiled, *, mesh,
              refused: str | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready dict: per-device bytes and whether it fits. `compiled` is None
    when the compiler refused the program for want of memory (`refused`: its message)."""
    stats = compiled.memory_analysis() if compiled is not None else None
    if compiled is not None and stats is None:
        raise RuntimeError("this XLA backend gives no memory analysis for compiled programs")
    xla = stats and {"arguments": stats.argument_size_in_bytes,
                     "outputs": stats.output_size_in_bytes, "aliased": stats.alias_size_in_bytes,
                     "temporaries": stats.temp_size_in_bytes,
                     "generated code": stats.generated_code_size_in_bytes}
    peak = xla and (xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
                    + xla["generated code"])
    budget = int(cfg.device_memory_gib * GIB)
    costs = compiled.cost_analysis() if compiled is not None else None
    hlo = compiled.as_text() if compiled is not None else ""
    # XLA's cost analysis counts a loop's body once, not once per trip, so a program that
    # loops (layers under scan, blockwise attention, decoding) reports a fraction of its FLOPs.
    loops = bool(re.search(r"\bwhile\(", hlo))
    return {
        "config": dataclasses.asdict(cfg),
        "mesh": dict(mesh.shape),
        "num_params": cfg.model_config().num_params(),
        "state": {name: bytes_per_device(tree) for name, tree in program.groups.items()},
        "donated": bytes_per_device(program.donated),
        "xla": xla,
        "collectives": collective_bytes(hlo) if compiled is not None else None,
        "flops_per_device": None if loops else (costs or {}).get("flops"),  # one device's
        "has_loops": loops,
        "peak": peak,
        "device_memory": budget,
        "fits": peak is not None and peak <= budget,
        "refused": refused,
    }


def plan(cfg: PlanConfig, devices=None) -> dict[str, Any]:
    """Builds, lowers and compiles the task's step on abstract inputs; returns `summarise`
    plus the wall time of each phase in seconds."""
    start = time.perf_counter()
    program, mesh = build_program(cfg, devices)
    lowered = program.step.lower(*program.args)
    lowered_at = time.perf_counter()
    compiled, refused = None, None
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU/GPU refuse what exceeds the memory
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        refused = str(e).strip()
    done = time.perf_counter()
    out = summarise(cfg, program, compiled, mesh=mesh, refused=refused)
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
    if result["xla"]:
        lines.append("  XLA memory analysis (temporaries: activations, gathered parameters, "
                     "gradients, workspace):")
        for name, value in result["xla"].items():
            row(name, value)
        row("peak estimate", result["peak"])
    row("device memory", result["device_memory"])
    lines.append(f"  => {'FITS' if result['fits'] else 'DOES NOT FIT'} in "
                 f"{c['device_memory_gib']:g} GiB per device" + (
                     f": the compiler refused it: {result['refused']}" if result["refused"] else ""))
    if result["collectives"]:
        lines.append("  collectives in the program (summed results, not all live at once"
                     + ("; a loop's once, not per trip):" if result.get("has_loops") else "):"))
        for name, value in result["collectives"].items():
            row(name, value)
    seconds = result.get("seconds")
    if seconds:
        lines.append(f"  (trace+lower {seconds['trace_and_lower']:.1f} s, compile "
                     f"{seconds['compile']:.1f} s)")
    return "\n".join(lines)
