"""TPU plans without a TPU (instructjax/tpu_plan.py, experiments.aot --topology): topology
names, the batch search, the ideal step time, the one-line error without libtpu and, where
libtpu is installed, XLA:TPU plans whose state rows are exactly the CPU plan's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructjax import memory_plan as mp
from instructjax import tpu_plan
from instructjax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    not tpu_plan.libtpu_available(),
    reason="libtpu not installed: it is kept out of the default venv (it slows and clutters "
           "every non-CPU JAX start); run these in a venv with `pip install -e '.[tpu]'`, "
           "e.g. .venv-tpu/bin/python -m pytest tests/test_tpu_plan.py")


def test_topology_names_resolve_to_chips_or_clear_errors():
    t = tpu_plan.parse_topology("v5e:8x8")
    assert (t.chips, t.chip.hbm_gib, t.chip.peak_flops) == (64, 16, 197e12)
    assert tpu_plan.parse_topology("v5p:4x4x4", num_slices=2).chips == 128
    assert tpu_plan.parse_topology("v6e:2x4").chip.device_kind == "TPU v6 lite"
    for bad in ("v5e:8x8x1", "v4:2x2", "v7x:2x2", "v5e-64", "v5e:0x2", "v6e:"):
        with pytest.raises(ConfigError, match="--topology: expected chip:shape"):
            tpu_plan.parse_topology(bad)
    with pytest.raises(ConfigError, match="--num_slices must be >= 1"):
        tpu_plan.parse_topology("v5e:2x2", num_slices=0)


def test_missing_libtpu_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(tpu_plan, "libtpu_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        tpu_plan.topology_devices(tpu_plan.parse_topology("v5e:2x2"))
    assert "\n" not in str(e.value) and "pip install -e '.[tpu]'" in str(e.value)
    # The entry point: that line alone on stderr, exit status 1, no traceback.
    argv = ["aot", "--platform=tpu", "--topology=v5e:2x2", "--model=tiny", "--batch_size=8",
            "--seq_len=16"]
    code = ("import runpy, sys\nimport instructjax.tpu_plan as t\n"
            f"t.libtpu_available = lambda: False\nsys.argv = {argv!r}\n"
            "runpy.run_module('experiments.aot', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {tpu_plan.MISSING_LIBTPU}"]


def test_find_max_batch_doubles_then_bisects():
    cfg = mp.PlanConfig(model="tiny", devices=4, batch_size=4, seq_len=16)  # unit: 4 rows

    def fake_plan(c, limit=44):
        return {"fits": c.batch_size <= limit, "peak": c.batch_size, "refused": None}

    found = tpu_plan.find_max_batch(cfg, fake_plan)
    assert (found["batch_size"], found["per_device"], found["capped"]) == (44, 11, False)
    # 1, 2, 4, 8 units fit, 16 does not; then 12 (no), 10, 11 (yes).
    assert [p["batch_size"] for p in found["probes"]] == [4, 8, 16, 32, 64, 48, 40, 44]
    assert tpu_plan.find_max_batch(cfg, lambda c: fake_plan(c, 0))["batch_size"] is None
    capped = tpu_plan.find_max_batch(cfg, lambda c: fake_plan(c, 10 ** 6), max_units=8)
    assert (capped["batch_size"], capped["capped"]) == (32, True)
    # Accumulation makes the smallest valid batch bigger: 4 devices x 2 micro-batches.
    accum = mp.PlanConfig(model="tiny", devices=4, batch_size=8, seq_len=16, grad_accum_steps=2)
    assert tpu_plan.batch_unit(accum) == 8


def test_ideal_step_time_and_mfu_bound_come_from_the_compiled_flops():
    cfg = mp.PlanConfig(model="tiny", devices=4, batch_size=8, seq_len=64)
    result = tpu_plan.add_speed({"flops_per_device": 2e9}, cfg, peak_flops=1e12)
    model_flops = cfg.model_config().flops_per_token(64) * 8 * 64
    assert result["speed"]["ideal_step_seconds"] == pytest.approx(2e-3)
    assert result["speed"]["mfu_bound"] == pytest.approx(model_flops / (4 * 2e9))
    # A program with loops has no compiled FLOPs: the ideal time is the model FLOPs' alone.
    looped = tpu_plan.add_speed({"flops_per_device": None, "has_loops": True}, cfg, 1e12)
    assert looped["speed"]["ideal_step_seconds"] == pytest.approx(model_flops / 4 / 1e12)
    assert looped["speed"]["mfu_bound"] is None
    assert "not counted" in tpu_plan.format_speed(looped)
    # v5p's devices call themselves "TPU v5"; the peak still comes from the one table.
    assert tpu_plan.peak_for("TPU v5") == tpu_plan.CHIPS["v5p"].peak_flops > 0


@needs_libtpu
def test_tpu_plan_state_rows_equal_the_cpu_plan_rows():
    cfg = mp.PlanConfig(model="llama-tiny", devices=4, batch_size=8, seq_len=64)
    devices = tpu_plan.topology_devices(tpu_plan.parse_topology("v5e:2x2"))
    assert {d.device_kind for d in devices} == {"TPU v5 lite"}
    on_tpu = mp.plan(cfg, devices)
    on_cpu = mp.plan(cfg)  # 4 of conftest's 8 virtual CPU devices
    assert on_tpu["state"]["parameters"] == on_cpu["state"]["parameters"] > 0
    assert on_tpu["state"]["optimiser state"] == on_cpu["state"]["optimiser state"] > 0
    assert on_tpu["state"] == on_cpu["state"] and on_tpu["mesh"] == on_cpu["mesh"]
    assert on_tpu["fits"] and on_tpu["refused"] is None and on_tpu["peak"] > 0
    assert on_tpu["flops_per_device"] > 0


@needs_libtpu
def test_a_program_too_big_for_hbm_is_reported_as_not_fitting(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.aot", "--platform=tpu", "--topology=v5e:2x2",
         "--model=demo", "--batch_size=16384", "--seq_len=256", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DOES NOT FIT in 16 GiB per device: the compiler refused it: RESOURCE_EXHAUSTED" \
        in proc.stdout and "Traceback" not in proc.stderr
    plan = json.loads(out.read_text())
    assert plan["fits"] is False and plan["xla"] is None and "HBM" in plan["refused"]
    assert plan["chip"]["name"] == "v5e" and plan["topology"] == "v5e:2x2 (4 chips)"
    assert plan["state"]["parameters"] > 0


@needs_libtpu
def test_multi_slice_mesh_spans_slices_with_the_data_axis():
    devices = tpu_plan.topology_devices(tpu_plan.parse_topology("v5e:2x2", num_slices=2))
    mesh = tpu_plan.slice_aware_mesh("data:2,fsdp:-1,tensor:1", devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(ConfigError, match="--num_slices=2 the data axis must be a multiple of 2"):
        tpu_plan.slice_aware_mesh("data:1,fsdp:-1,tensor:1", devices)
