"""Ahead-of-time memory plans: exact sharded state sizes, FSDP scaling, agreement with a
measured run of the same program, and clear errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from instructjax import memory_measure, memory_plan as mp
from instructjax.config import ConfigError, OptimConfig
from instructjax.model.config import preset
from instructjax.model.transformer import Transformer
from instructjax.train import state as state_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_name", ["tiny", "llama-tiny"])
def test_state_bytes_are_the_exact_sharded_sizes(model_name):
    # One device: float32 params are 4 bytes each; Adam holds 2 moments + step counters.
    one = mp.build_program(mp.PlanConfig(model=model_name, batch_size=8, seq_len=16))[0]
    params_1 = mp.bytes_per_device(one.groups["parameters"])
    assert params_1 == 4 * preset(model_name).num_params()
    assert 2 * params_1 < mp.bytes_per_device(one.groups["optimiser state"]) <= 2 * params_1 + 64
    # Eight devices (FSDP x tensor): the bytes the first device REALLY holds once the state
    # is initialised into its shards, with the optimiser of train/run.py.
    cfg = mp.PlanConfig(model=model_name, devices=8, mesh="data:1,fsdp:4,tensor:2",
                        batch_size=8, seq_len=16)
    program, mesh = mp.build_program(cfg)
    tx = state_lib.make_optimizer(OptimConfig(learning_rate=3e-4), 1000)
    state, _ = state_lib.init_state(Transformer(cfg.model_config()), tx, mesh, 16,
                                    jax.random.key(0))
    device = mesh.devices.flat[0]
    assert mp.bytes_per_device(program.groups["parameters"]) == \
        memory_measure.bytes_on_device(state.params, device)
    assert mp.bytes_per_device(program.groups["optimiser state"]) == \
        memory_measure.bytes_on_device(state.opt_state, device)


def test_collective_bytes_reads_array_and_tuple_results():
    hlo = ("  %ag = f32[8,64]{1,0} all-gather(f32[1,64]{1,0} %p), dimensions={0}\n"
           "  %ar = (f32[], bf16[4,2]{1,0}) all-reduce(%a, %b), to_apply=%add\n"
           "  %rs.1 = s32[3]{0} reduce-scatter(s32[24]{0} %c), dimensions={0}\n"
           "  %x = f32[1000]{0} add(%all-gather.2, %y)\n")
    assert mp.collective_bytes(hlo) == {"all-gather": 2048, "all-reduce": 20,
                                        "reduce-scatter": 12}


def test_fsdp_over_8_devices_divides_parameter_bytes_by_about_8():
    plans = {n: mp.bytes_per_device(mp.build_program(
        mp.PlanConfig(model="tiny", devices=n, mesh="data:1,fsdp:-1,tensor:1",
                      batch_size=8, seq_len=16))[0].groups["parameters"]) for n in (1, 8)}
    # Norm scales and biases are replicated, so slightly less than 8x; never more.
    assert plans[1] / 8 <= plans[8] <= plans[1] / 7


def test_a_plan_with_loops_reports_no_compiled_flops():
    # XLA counts a loop body once: a scanned step's FLOPs would be about 1/n_layers of them.
    plain, scanned = (mp.plan(mp.PlanConfig(model="tiny", devices=2, batch_size=4, seq_len=16,
                                            scan_layers=scan)) for scan in (False, True))
    assert not plain["has_loops"] and plain["flops_per_device"] > 0
    assert scanned["has_loops"] and scanned["flops_per_device"] is None


def _check_against_measurement(cfg, temp_tolerance, unused_argument_bytes):
    measured = memory_measure.measure(cfg)
    xla = measured["plan"]["xla"]
    # Arguments: jit drops the arguments the program never reads, nothing else.
    assert measured["arguments"] - xla["arguments"] == unused_argument_bytes
    # Outputs: XLA also counts the output tuple's table of 8-byte buffer pointers.
    assert xla["outputs"] - measured["outputs"] == 8 * measured["output_leaves"]
    # Donation: exactly the aliased bytes are freed.
    assert measured["donated_freed"] == xla["aliased"] > 0
    if temp_tolerance is not None:
        expected = measured["devices_in_process"] * (
            xla["outputs"] - xla["aliased"] + xla["temporaries"])
        assert measured["peak_rss_growth"] is not None, "no /proc peak-RSS on this system"
        ratio = measured["peak_rss_growth"] / expected
        assert abs(ratio - 1) < temp_tolerance, (measured, xla)
    return measured


def test_train_plan_agrees_with_the_measured_run():
    # A batch whose activations dwarf the runtime's own allocations, on one device so the
    # process's peak-RSS growth is that device's.
    cfg = mp.PlanConfig(model="tiny", devices=1, batch_size=64, seq_len=64)
    # The rng key (2 x uint32) is unused: dropout is off.
    _check_against_measurement(cfg, temp_tolerance=0.25, unused_argument_bytes=8)


@pytest.mark.slow  # ~25 s of CPU: compiles and runs a whole PPO-ptx iteration
def test_ppo_ptx_plan_agrees_with_the_measured_run_on_8_devices():
    cfg = mp.PlanConfig(model="tiny", task="ppo", devices=8, batch_size=16, seq_len=24,
                        max_new_tokens=4, ppo_epochs=1, num_minibatches=2, ptx_batch_size=4,
                        ptx_seq_len=16)
    # prompt_line (int32 per row, sharded over 8 devices) is only read on the host.
    measured = _check_against_measurement(cfg, temp_tolerance=None,
                                          unused_argument_bytes=4 * cfg.batch_size // 8)
    state = measured["plan"]["state"]
    # The frozen reference and reward models are on the devices too, as big as the trained ones.
    assert state["frozen reference parameters"] == state["policy parameters"]
    assert state["frozen reward parameters"] == state["value parameters"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="gpt5"), "unknown preset 'gpt5'"),
    (dict(model="tiny", mesh="data:3,fsdp:-1,tensor:1"), "not divisible by 3"),
    (dict(model="tiny", mesh="data:2,fsdp:2,tensor:1"), "uses 4 devices but 8"),
    (dict(model="tiny", batch_size=12), "multiple of --grad_accum_steps"),
    (dict(model="tiny", seq_len=4096), "--seq_len must be in"),
    (dict(model="tiny", task="ppo", seq_len=16, max_new_tokens=16), "must exceed --max_new_tokens"),
    (dict(model="tiny", task="ppo", seq_len=80, algorithm="grpo"), "--group_size >= 2"),
    (dict(model="tiny", task="ppo", seq_len=80, algorithm="rloo", group_size=3),
     r"multiple of --group_size \(3\)"),
    (dict(model="tiny", task="ppo", seq_len=80, algorithm="dpo"), "--algorithm must be one of"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    fields = dict(devices=8, batch_size=8, seq_len=16) | kwargs
    with pytest.raises(ConfigError, match=message):
        mp.PlanConfig(**fields)


def test_rl_algorithm_and_group_size_reach_the_ppo_config():
    cfg = mp.PlanConfig(model="tiny", task="ppo", devices=8, batch_size=16, seq_len=80,
                        algorithm="grpo", group_size=4)
    ppo = cfg.ppo_config()
    assert (ppo.algorithm, ppo.group_size, ppo.rollout_batch_size) == ("grpo", 4, 16)


def test_more_devices_than_jax_has_is_a_clear_error():
    with pytest.raises(ConfigError, match="--devices=16 but JAX has only 8"):
        mp.build_program(mp.PlanConfig(model="tiny", devices=16, batch_size=16, seq_len=16))


def test_entry_point_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.aot", "--model=tiny", "--task=train", "--devices=2",
         "--batch_size=4", "--seq_len=16", "--device_memory_gib=0.001", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DOES NOT FIT in 0.001 GiB" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert plan["fits"] is False and plan["peak"] > 0.001 * 2 ** 30
    assert plan["peak"] == (plan["xla"]["arguments"] + plan["xla"]["outputs"]
                            - plan["xla"]["aliased"] + plan["xla"]["temporaries"]
                            + plan["xla"]["generated code"])
    bad = subprocess.run([sys.executable, "-m", "experiments.aot", "--model=nope",
                          "--batch_size=4", "--seq_len=16"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown preset 'nope'" in bad.stderr
    # --platform names an accelerator this machine lacks: said so, not a traceback.
    if not any(d.platform == "gpu" for d in jax.devices()):
        gpu = subprocess.run([sys.executable, "-m", "experiments.aot", "--model=tiny",
                              "--platform=gpu", "--devices=1", "--batch_size=4",
                              "--seq_len=16"], cwd=ROOT, env=dict(os.environ),
                             capture_output=True, text=True, timeout=120)
        assert gpu.returncode != 0 and "error: --platform=gpu:" in gpu.stderr
