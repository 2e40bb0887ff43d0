"""Device mesh, the logical-axis rules table, sharding helpers and multi-host set-up.

Every parameter and activation carries logical axis names (see model/transformer.py);
`LOGICAL_RULES` maps them to the three mesh axes:

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimiser state sharded (ZeRO-3 style)
  tensor  Megatron-style tensor parallelism over heads, MLP width and vocabulary

Moving from FSDP to FSDP+TP is a change of `--mesh`, never of code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructjax.config import ConfigError

T = TypeVar("T")

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("head_dim", None),
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("pos", None),
    ("norm", None),
    ("scalar", None),
    # The stacked layer axis of scan_layers params: every device holds all layers' shards
    # (scan slices one layer per iteration; sharding it would gather a layer per step).
    ("layers", None),
)


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """Parses 'data:1,fsdp:-1,tensor:1' into axis sizes; -1 takes the remaining devices."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition(":")
        if not sep or name not in MESH_AXES:
            raise ConfigError(
                f"--mesh: bad entry {part!r} in {spec!r}; expected axis:size with axis one of "
                f"{MESH_AXES}, e.g. --mesh=data:1,fsdp:-1,tensor:1")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh: size of {name!r} must be an integer, got {value!r}") from None
    for name in MESH_AXES:
        sizes.setdefault(name, 1)
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"--mesh: at most one axis may be -1, got {spec!r}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ConfigError(f"--mesh: sizes must be positive or -1, got {spec!r}")
    if free:
        if num_devices % fixed:
            raise ConfigError(f"--mesh={spec}: {num_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"--mesh={spec} uses {math.prod(sizes.values())} devices but {num_devices} are "
            "available; use -1 for one axis to take the rest")
    return {n: sizes[n] for n in MESH_AXES}


def make_mesh(spec: str, devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) laid out for the physical topology."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[n] for n in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _divisible_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide (e.g. 2 KV heads over tensor=4)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def logical_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of (possibly LogicallyPartitioned-boxed) abstract arrays.

    Leaves without logical names are replicated. Dims a mesh axis does not divide evenly
    are replicated rather than failing, so odd shapes (GQA, small vocabularies) still run.
    """
    logical = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    unboxed = nn.meta.unbox(abstract_tree)

    def to_sharding(spec, leaf):
        spec = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, _divisible_spec(spec, leaf.shape, mesh))

    return jax.tree.map(to_sharding, mesh_specs, unboxed,
                        is_leaf=lambda x: isinstance(x, P) or x is None)


def sharding_context(mesh: Mesh):
    """Mesh + logical rules; active while a function is traced, activation constraints
    (nn.with_logical_constraint in the model) take effect. Enter it outside jax.jit."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack


class ShardedJit:
    """jax.jit whose tracing (first call, or .lower for ahead-of-time compilation) happens
    inside `sharding_context(mesh)`."""

    def __init__(self, fn, mesh: Mesh, **jit_kwargs):
        self.mesh = mesh
        self.jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        with sharding_context(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with sharding_context(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-host numpy batches into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def process_zero_first(prepare: Callable[[], T], what: str) -> T:
    """Runs `prepare` on process 0, then, after a barrier, on the others, which find its
    output ready where the file system is shared and make their own copy where it is not.
    For steps that write files (dataset generation and preparation) so that processes never
    write the same files at the same time."""
    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils
    result = prepare() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"prepared: {what}")
    return result if jax.process_index() == 0 else prepare()


def initialize_distributed(*, coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, auto_detect: bool = False) -> None:
    """Starts jax.distributed when the run spans several processes.

    Explicit arguments come from the launchers in launch/; `auto_detect` lets jax read a
    cluster's own environment (TPU pod metadata, SLURM). A single-process run starts nothing.
    """
    if auto_detect:
        jax.distributed.initialize()
    elif (num_processes or 1) > 1:
        if coordinator_address is None or process_id is None:
            raise ConfigError("--num_processes > 1 needs --coordinator_address and --process_id "
                             "(or use --jax_distributed_auto on a TPU pod / SLURM cluster)")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        return
    logging.info("jax.distributed: process %d of %d, %d global devices",
                 jax.process_index(), jax.process_count(), jax.device_count())
