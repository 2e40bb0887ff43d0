"""End to end through experiments.pretrain: a run killed with SIGKILL and resumed ends with
exactly the parameters of an uninterrupted run; bad flags give clear errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from instructjax import parallel
from instructjax.model.transformer import Transformer
from instructjax.train import checkpoint as ckpt_lib, state as state_lib
from instructjax.train.run import load_model_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _cmd(workdir, data_dir, *extra):
    return [sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}",
            f"--data_dir={data_dir}", "--model=tiny", "--vocab_size=512", f"--steps={STEPS}",
            "--batch_size=8", "--seq_len=64", "--checkpoint_every=4", "--eval_every=6",
            "--eval_batches=1", "--log_every=2", "--warmup_steps=2", "--learning_rate=3e-3",
            "--world_pretrain_docs=150", "--world_sft_train=50", "--world_eval=20",
            "--world_prompts=20", "--host_devices=4", *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _final_params(workdir):
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    model = Transformer(load_model_config(workdir))
    return jax.device_get(ckpt_lib.restore_params(workdir, state_lib.abstract_params(model, mesh)[0]))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    data_dir = tmp_path / "data"
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight, data_dir), check=True, cwd=ROOT, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, data_dir), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "8").exists():  # orbax renames a finished save into place
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint at step 8 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final_eval.json").exists()

    subprocess.run(_cmd(killed, data_dir), check=True, cwd=ROOT, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    a, b = _final_params(straight), _final_params(killed)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    metrics = (killed / "metrics.jsonl").read_text()
    assert '"step": 12' in metrics


def test_bad_flags_give_clear_errors(tmp_path):
    result = subprocess.run(_cmd(tmp_path / "w", tmp_path / "d", "--mesh=data:3,fsdp:-1"),
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--mesh=data:3,fsdp:-1: 4 devices are not divisible by 3" in result.stderr
    result = subprocess.run(_cmd(tmp_path / "w", tmp_path / "d", "--seq_len=100000"),
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "exceeds the model's max_len" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run(_cmd(tmp_path / "w", tmp_path / "d", "--vocab_size=300"),
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--vocab_size=300: cannot train a 300-piece tokenizer" in result.stderr
