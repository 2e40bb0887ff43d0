"""Multi-process runs through jax.distributed: 2 local processes with 4 CPU devices each,
started by launch/local.sh, against one process with 8 devices. With the same --data_shards
the data, the losses and the parameters are the same, and checkpoints move between the two
process counts in both directions."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from instructjax import parallel
from instructjax.model.transformer import Transformer
from instructjax.rlhf import rl_state
from instructjax.train import checkpoint as ckpt_lib, state as state_lib
from instructjax.train.workdir import load_model_config, load_trained

from fakes import fake_run

ROOT = Path(__file__).resolve().parents[1]
SHARDS = "--data_shards=2"
TIMEOUT = 300


def _pretrain_flags(workdir, data_dir, steps, *extra):
    return [f"--workdir={workdir}", f"--data_dir={data_dir}", "--model=tiny", "--vocab_size=512",
            f"--steps={steps}", "--batch_size=8", "--seq_len=64", "--checkpoint_every=3",
            "--eval_every=3", "--eval_batches=2", "--log_every=1", "--warmup_steps=0",
            "--lr_schedule=constant", "--learning_rate=3e-3", "--world_pretrain_docs=150",
            "--world_sft_train=50", "--world_eval=20", "--world_prompts=40", SHARDS, *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _one_process(module, flags):
    result = subprocess.run([sys.executable, "-m", module, "--host_devices=8", *flags], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]


def _two_processes(module, flags, log_dir):
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), NPROC="2", DEVICES_PER_PROC="4", PORT=str(port), LOG_DIR=str(log_dir),
               PYTHON=sys.executable)
    result = subprocess.run([str(ROOT / "launch" / "local.sh"), module, *flags], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=TIMEOUT)
    logs = "".join(p.read_text()[-2000:] for p in sorted(Path(log_dir).glob("*.log")))
    assert result.returncode == 0, result.stderr + logs
    return logs


def _losses(workdir):
    """step -> train loss, from metrics.jsonl (every step must appear exactly once)."""
    losses = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            assert record["step"] not in losses, f"step {record['step']} logged twice"
            losses[record["step"]] = record["train/loss"]
    return losses


def _params(workdir):
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    model = Transformer(load_model_config(workdir))
    return jax.device_get(ckpt_lib.restore_params(workdir, state_lib.abstract_params(model, mesh)[0]))


def _assert_same_params(a, b, atol):
    # Cross-process all-reduces may sum in another order than in-process ones: gradients
    # agree to float32 rounding, which Adam's normalisation can turn into visible update
    # differences where a gradient is ~0. `atol` stays far below one update (the lr).
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=atol), a, b)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, 8 devices, 6 steps (checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp("multihost")
    _one_process("experiments.pretrain", _pretrain_flags(root / "single", root / "data", 6))
    return root


def test_two_processes_equal_one_and_checkpoints_move_between_them(single, tmp_path):
    reference = _losses(single / "single")
    tokenizer = f"--tokenizer_path={single / 'single' / 'tokenizer.model'}"
    data = single / "data"

    # 2 processes, 3 steps, then 1 process resumes their checkpoint to step 6.
    two_then_one = tmp_path / "two_then_one"
    _two_processes("experiments.pretrain", _pretrain_flags(two_then_one, data, 3, tokenizer),
                   tmp_path / "logs_a")
    first = _losses(two_then_one)
    assert sorted(first) == [1, 2, 3]  # process 0 alone writes metrics
    np.testing.assert_allclose([first[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)],
                               rtol=1e-5)
    _one_process("experiments.pretrain", _pretrain_flags(two_then_one, data, 6, tokenizer)
                 + ["--allow_config_change"])  # the same run, made longer
    _assert_same_params(_params(two_then_one), _params(single / "single"), 1e-5)

    # 1 process's checkpoint at step 3, resumed by 2 processes to step 6.
    one_then_two = tmp_path / "one_then_two"
    shutil.copytree(single / "single", one_then_two)
    shutil.rmtree(one_then_two / "checkpoints" / "6")
    (one_then_two / "final_eval.json").unlink()
    (one_then_two / "metrics.jsonl").write_text("")
    _two_processes("experiments.pretrain", _pretrain_flags(one_then_two, data, 6, tokenizer),
                   tmp_path / "logs_b")
    resumed = _losses(one_then_two)
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [reference[s] for s in (4, 5, 6)],
                               rtol=1e-5)
    _assert_same_params(_params(one_then_two), _params(single / "single"), 1e-5)
    assert json.loads((one_then_two / "final_eval.json").read_text())["step"] == 6


# Slow set (about a minute each): multi-process runs stay in CI through the pretraining test
# above; these check the RL program on 2 processes, with and without a value model.
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rl_iteration_two_processes_equals_one(single, tmp_path, algorithm):
    lm = single / "single"
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    model, lm_params, _ = load_trained(lm, mesh)
    scalar = state_lib.abstract_params(Transformer(model.cfg, head="scalar"), mesh)[0]
    fake_run(tmp_path / "rm", lm / "tokenizer.model", model.cfg,
             rl_state.init_scalar_from_lm(lm_params, scalar, jax.random.key(1)))

    def flags(workdir):
        return [f"--workdir={workdir}", f"--data_dir={single / 'data'}", f"--init_from={lm}",
                f"--reward_from={tmp_path / 'rm'}", "--world_pretrain_docs=150",
                "--world_sft_train=50", "--world_eval=20", "--world_prompts=40", "--iterations=1",
                f"--rollout_batch_size={8 if algorithm == 'ppo' else 16}",
                "--max_prompt_len=16", "--max_new_tokens=6",
                "--ppo_epochs=2", "--num_minibatches=2", "--gamma_ptx=1.0", "--ptx_batch_size=4",
                "--ptx_seq_len=32", "--learning_rate=1e-3", "--warmup_steps=0", "--log_every=1",
                SHARDS, f"--algorithm={algorithm}",
                f"--group_size={1 if algorithm == 'ppo' else 2}"]

    _one_process("experiments.rl", flags(tmp_path / "one"))
    _two_processes("experiments.rl", flags(tmp_path / "two"), tmp_path / "logs")
    one, two = _ppo_metrics(tmp_path / "one"), _ppo_metrics(tmp_path / "two")
    assert one.keys() == two.keys() and "train/policy_loss" in one
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    _, policy_one, _ = load_trained(tmp_path / "one", mesh)
    _, policy_two, _ = load_trained(tmp_path / "two", mesh)
    _assert_same_params(jax.device_get(policy_two), jax.device_get(policy_one), 5e-5)


def _ppo_metrics(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    record = next(r for r in lines if r["step"] == 1 and "train/loss" in r)
    return {k: v for k, v in record.items() if k.startswith("train/") and not k.endswith("_sec")}


def test_launchers_check_their_environment_and_dry_run():
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "NPROC"))}

    def launch(script, env):
        return subprocess.run(["bash", str(ROOT / "launch" / script), "experiments.pretrain",
                               "--workdir=w"], cwd=ROOT, capture_output=True, text=True,
                              env=clean | env, timeout=30)

    missing = launch("slurm.sbatch", {})
    assert missing.returncode != 0 and "SLURM_JOB_NODELIST is not set" in missing.stderr
    slurm = launch("slurm.sbatch", {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "node7",
                                    "SLURM_NNODES": "2", "SLURM_JOB_ID": "5"})
    assert slurm.returncode == 0, slurm.stderr
    assert "--coordinator_address=node7:12355" in slurm.stdout and "--num_processes=2" in slurm.stdout
    tpu = launch("tpu_vm.sh", {"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "z"})
    assert tpu.returncode == 0 and "--worker=all" in tpu.stdout
    assert "--jax_distributed_auto" in tpu.stdout
    local = launch("local.sh", {"DRY_RUN": "1", "NPROC": "2"})
    assert local.returncode == 0 and local.stdout.count("--process_id=") == 2
