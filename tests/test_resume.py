"""End to end through experiments.pretrain: a run killed with SIGKILL and resumed ends with
exactly the parameters of an uninterrupted run; bad flags give clear errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from instructjax import parallel
from instructjax.model.transformer import Transformer
from instructjax.train import checkpoint as ckpt_lib, state as state_lib
from instructjax.train import workdir as wd
from instructjax.train.workdir import load_model_config

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


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(data_dir, workdir) of an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    subprocess.run(_cmd(root / "straight", root / "data"), check=True, cwd=ROOT, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return root / "data", root / "straight"


def _start_and_wait_for_checkpoint(workdir, data_dir, step):
    proc = subprocess.Popen(_cmd(workdir, data_dir), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / str(step)).exists():  # orbax renames a finished save
        assert proc.poll() is None, "run ended before it could be stopped"
        assert time.time() < deadline, f"no checkpoint at step {step} in time"
        time.sleep(0.05)
    return proc


# SIGTERM (save, stop, resume) in CI; SIGKILL (resume from an older checkpoint) in the slow set.
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGKILL, marks=pytest.mark.slow),
                                    signal.SIGTERM])
def test_stop_then_resume_equals_uninterrupted(straight, tmp_path, signum):
    data_dir, straight_dir = straight
    stopped = tmp_path / "stopped"
    proc = _start_and_wait_for_checkpoint(stopped, data_dir, 4)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert not wd.is_finished(stopped)
    if signum == signal.SIGTERM:  # saved, said so, and exited as a preempted job
        assert proc.returncode == wd.EXIT_STOPPED, stderr
        assert "of 12 (checkpoint saved); rerun the same command to resume" in stderr
        record = json.loads((stopped / wd.RUN_RECORD_FILE).read_text())
        assert record["status"]["state"] == "stopped"
        assert str(record["status"]["step"]) in stderr

    subprocess.run(_cmd(stopped, data_dir), check=True, cwd=ROOT, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert wd.is_finished(stopped)
    a, b = _final_params(straight_dir), _final_params(stopped)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    metrics = (stopped / "metrics.jsonl").read_text()
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
    # A malformed line of the user's pretraining text is reported as the text's fault.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n{"text": "d e f"}\n{"text": 3}\n')
    result = subprocess.run(_cmd(tmp_path / "w2", tmp_path / "d", f"--train_files={bad}",
                                 f"--eval_files={bad}"),
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{bad}:3" in result.stderr and "--vocab_size" not in result.stderr, result.stderr
    # A workdir that cannot be written (sysfs refuses new entries, root or not).
    result = subprocess.run(_cmd(Path("/sys/fs/instructjax-test"), tmp_path / "d"),
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: Operation not permitted: /sys/fs/instructjax-test" in result.stderr or \
        "error: Permission denied: /sys/fs/instructjax-test" in result.stderr
