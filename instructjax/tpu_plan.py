"""TPU memory plans without a TPU: memory_plan's programs compiled by XLA:TPU for a named
TPU topology, on any machine.

libtpu (`pip install -e '.[tpu]'`) can describe a topology such as v5e:8x8 as
"compile-only" devices: a mesh of them compiles with the TPU compiler, which reports the
per-chip memory analysis and FLOPs and refuses (RESOURCE_EXHAUSTED) a program that does not
fit the chip's HBM, though nothing can run. This module names the chips (HBM, peak),
resolves a topology to devices, lays a mesh over several slices, adds the compiled FLOPs'
ideal step time and MFU bound to a plan, and searches the largest batch that fits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Callable

from instructjax import parallel
from instructjax.config import ConfigError
from instructjax.train.metrics import KNOWN_PEAK_FLOPS

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str         # the generation as --topology spells it
    device_kind: str  # what JAX reports for its devices
    chip_config: str  # libtpu's chip_config_name: v4 / v5p devices are 2-core 'megacore' chips
    rank: int         # topology dimensions: 2 (AxB) or 3 (AxBxC, a 3-D torus)
    hbm_gib: float
    peak_key: str     # its entry in KNOWN_PEAK_FLOPS (dense bf16, FLOP/s)

    @property
    def peak_flops(self) -> float:
        return KNOWN_PEAK_FLOPS[self.peak_key]


# HBM per chip (GiB) from Google Cloud TPU docs, each version's system architecture page
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). Their published bf16 peaks (same pages)
# live in train/metrics.py's KNOWN_PEAK_FLOPS, which the training loop's MFU also reads.
# libtpu reports a v5p device as "TPU v5", while that table names it "TPU v5p".
CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", "megacore", 3, 32, "TPU v4"),
    Chip("v5e", "TPU v5 lite", "default", 2, 16, "TPU v5 lite"),
    Chip("v5p", "TPU v5", "megacore", 3, 95, "TPU v5p"),
    Chip("v6e", "TPU v6 lite", "default", 2, 32, "TPU v6 lite"),
)}

MISSING_LIBTPU = ("--topology needs libtpu (XLA:TPU) installed here, kept out of the default "
                  "venv: python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -e '.[tpu]', "
                  "then run with .venv-tpu/bin/python")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                 # as libtpu takes it, e.g. "v5e:8x8"
    chip: Chip
    dims: tuple[int, ...]     # chips along each axis of one slice
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.dims) * self.num_slices

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.name}{slices} ({self.chips} chips)"


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    gen, _, shape = name.partition(":")
    chip = CHIPS.get(gen)
    if chip is None or not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)*", shape) \
            or shape.count("x") + 1 != chip.rank:
        raise ConfigError(f"--topology: expected chip:shape with chip one of {', '.join(CHIPS)} "
                          "and shape AxB for v5e/v6e or AxBxC for v4/v5p (e.g. v5e:8x8, "
                          f"v5p:4x4x4), got {name!r}")
    if num_slices < 1:
        raise ConfigError(f"--num_slices must be >= 1, got {num_slices}")
    return Topology(name, chip, tuple(int(d) for d in shape.split("x")), num_slices)


def libtpu_available() -> bool:
    # JAX loads XLA:TPU from $TPU_LIBRARY_PATH or else from the libtpu package.
    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def _wraparound(chip: Chip, dims3: tuple[int, int, int]) -> tuple[bool, bool, bool]:
    """Which axes close into rings. v4/v5p slices built of whole 4x4x4 cubes are tori on all
    three axes; a v5e/v6e axis wraps only at 16 chips, the full pod's side."""
    if chip.rank == 3:
        return (all(d % 4 == 0 for d in dims3),) * 3
    return (dims3[0] == 16, dims3[1] == 16, False)


def topology_devices(topo: Topology) -> list:
    """libtpu's compile-only devices for the topology (all slices)."""
    if not libtpu_available():
        raise ConfigError(MISSING_LIBTPU)
    # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) when it loads, so a second plan or
    # a test next to a running plan would fail; compile-only devices open no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax.experimental import topologies
    dims3 = tuple(topo.dims) + (1,) * (3 - len(topo.dims))
    # Hosts hold up to 2x2x1 chips; libtpu refuses a topology they do not tile.
    bounds = (min(2, dims3[0]), min(2, dims3[1]), 1)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.name, chip_config_name=topo.chip.chip_config,
            chips_per_host_bounds=bounds, num_slices=topo.num_slices,
            wrap=_wraparound(topo.chip, dims3))
    except (jax.errors.JaxRuntimeError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--topology={topo.name}: libtpu cannot lay it out: {reason}") from None
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise ConfigError(f"--topology={topo.name}: libtpu gave {len(devices)} devices, "
                          f"expected {topo.chips}")
    return devices


def slice_aware_mesh(spec: str, devices):
    """parallel.make_mesh, except that over several slices the data axis spans them: slices
    talk over the slower data-centre network, so only data parallelism should cross it."""
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) == 1:
        return parallel.make_mesh(spec, devices)
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh
    sizes = parallel.parse_mesh_spec(spec, len(devices))
    n = len(slices)
    if sizes["data"] % n:
        raise ConfigError(f"--mesh={spec}: over --num_slices={n} the data axis must be a "
                          f"multiple of {n} (only data parallelism spans slices), e.g. "
                          f"--mesh=data:{n},fsdp:-1,tensor:1")
    per_slice = (sizes["data"] // n, sizes["fsdp"], sizes["tensor"])
    grid = mesh_utils.create_hybrid_device_mesh(per_slice, (n, 1, 1), devices=devices)
    return Mesh(grid, parallel.MESH_AXES)


def peak_for(device_kind: str, chip: Chip | None = None) -> float:
    """Peak bf16 FLOP/s of one device: the topology's chip, else the device kind's entry."""
    if chip is not None:
        return chip.peak_flops
    known = next((c for c in CHIPS.values() if c.device_kind == device_kind), None)
    return known.peak_flops if known else KNOWN_PEAK_FLOPS.get(device_kind, 0.0)


def add_speed(result: dict[str, Any], cfg, peak_flops: float) -> dict[str, Any]:
    """Adds the ideal step time (compiled FLOPs per device / peak) and, for the train task,
    the MFU bound: model FLOPs (6N + attention per token) / compiled FLOPs of all devices,
    what remat, the optimiser and the other non-model work leave at best. A program with
    loops has no compiled FLOPs (see memory_plan.summarise): its ideal step time is then the
    model FLOPs' alone (100% MFU) and there is no bound."""
    flops = result.get("flops_per_device")
    model_flops = (cfg.model_config().flops_per_token(cfg.seq_len) * cfg.batch_size * cfg.seq_len
                   if cfg.task == "train" else None)
    if not (flops or model_flops):
        return result
    speed: dict[str, Any] = {"peak_flops_per_device": peak_flops or None,
                             "model_flops": model_flops, "ideal_step_seconds": None,
                             "ideal_from": "compiled FLOPs" if flops else "model FLOPs",
                             "mfu_bound": model_flops / (flops * cfg.devices)
                             if flops and model_flops else None}
    if peak_flops:
        speed["ideal_step_seconds"] = (flops or model_flops / cfg.devices) / peak_flops
    result["speed"] = speed
    return result


def format_speed(result: dict[str, Any]) -> str:
    lines = []
    chip = result.get("chip")
    if chip:
        lines.append(f"  chip: {chip['device_kind']} ({chip['name']}), {chip['hbm_gib']:g} GiB "
                     f"HBM, {chip['peak_flops'] / 1e12:g} TFLOP/s bf16 peak; topology "
                     f"{result['topology']}")
    flops, speed = result.get("flops_per_device"), result.get("speed") or {}
    if flops:
        lines.append(f"  compiled FLOPs per step: {flops:.4g} per device, "
                     f"{flops * result['config']['devices']:.4g} in all")
    elif result.get("has_loops"):
        lines.append("  compiled FLOPs: not counted (XLA's cost analysis counts a loop's body "
                     "once, and this program loops over layers, attention blocks or tokens)")
    if speed.get("ideal_step_seconds"):
        bound = speed["mfu_bound"]
        lines.append(f"  ideal step time at peak: {speed['ideal_step_seconds']:.3g} s"
                     + (f"; MFU bound (model / compiled FLOPs): {bound:.1%}" if bound else
                        " (the model's FLOPs alone, 6N + attention per token: 100% MFU)"
                        if speed["ideal_from"] == "model FLOPs" else ""))
    return "\n".join(lines)


def batch_unit(cfg) -> int:
    """The smallest valid batch_size for cfg; its multiples are the valid ones (every rule
    on the batch is divisibility by the data-parallel size, accumulation, minibatches...)."""
    dp = cfg.data_parallel_size
    for unit in range(dp, dp * 4096 + 1, dp):
        try:
            dataclasses.replace(cfg, batch_size=unit)
            return unit
        except ConfigError:
            continue
    raise ConfigError(f"--find_max_batch: no valid --batch_size up to {dp * 4096}")


def find_max_batch(cfg, plan_fn: Callable[[Any], dict], *, max_units: int = 4096,
                   on_probe: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """The largest batch_size that fits: doubling multiples of the smallest valid batch until
    one does not fit, then bisection. plan_fn(cfg) -> a plan with 'fits'. Each probe is a
    compile, so this costs about log2(answer) + a few compiles."""
    unit = batch_unit(cfg)
    dp = cfg.data_parallel_size
    probes: list[dict] = []

    def fits(k: int) -> bool:
        result = plan_fn(dataclasses.replace(cfg, batch_size=k * unit))
        probes.append({"batch_size": k * unit, "fits": result["fits"], "peak": result["peak"],
                       "refused": result.get("refused")})
        if on_probe:
            on_probe(k * unit, result)
        return result["fits"]

    lo, hi = 0, 1  # lo fits (0: nothing yet), hi is the next probe or the first failure
    while hi <= max_units and fits(hi):
        lo, hi = hi, hi * 2
    capped = hi > max_units
    while not capped and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    best = lo * unit
    return {"batch_size": best or None, "per_device": best / dp if best else None,
            "capped": capped, "probes": probes}
