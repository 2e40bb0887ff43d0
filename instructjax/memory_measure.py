"""Measuring a memory plan: run the planned program on real arrays and see what it used.

For small presets only (it allocates everything the plan only counts); memory_plan.py
builds and compiles the program, this module runs it. experiments.aot --measure prints
both side by side.
"""

from __future__ import annotations

import ctypes
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructjax.memory_plan import PlanConfig, build_program, compile_program, summarise


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
