"""Every entry point: a failure the user caused is one `error:` line and exit status 1
(`--traceback` shows the traceback instead); a stopped run exits 143."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import errors
from instructjax.config import ConfigError
from instructjax.data.jsonl import DataError
from instructjax.train.checkpoint import CheckpointError
from instructjax.train.workdir import EXIT_STOPPED, RunStopped

ROOT = Path(__file__).resolve().parents[1]


def _raise(e):
    def main(argv):
        raise e
    return main


@pytest.mark.parametrize("error, expected", [
    (DataError("f.jsonl:3: not JSON"), "error: f.jsonl:3: not JSON"),
    (ConfigError("--mesh: bad"), "error: --mesh: bad"),
    (CheckpointError("step 4 is damaged"), "error: step 4 is damaged"),
    (FileNotFoundError("x.model not found"), "error: x.model not found"),
    (OSError(errno.ENOSPC, "No space left on device", "/w/ckpt"),
     "error: No space left on device: /w/ckpt (ENOSPC)"),
])
def test_user_errors_become_one_line(error, expected):
    with pytest.raises(SystemExit) as exit_info:
        errors.user_facing(_raise(error))(["prog"])
    assert str(exit_info.value.code).startswith(expected)


@pytest.mark.parametrize("error", [KeyError("bug"), ValueError("bug"),
                                   OSError(errno.EIO, "I/O error")])
def test_anything_else_keeps_its_traceback(error):
    with pytest.raises(type(error)):
        errors.user_facing(_raise(error))(["prog"])


def test_an_entry_point_can_own_more_error_types():
    with pytest.raises(SystemExit, match="error: prompt too long"):
        errors.user_facing(_raise(ValueError("prompt too long")), also=(ValueError,))(["prog"])


def test_a_stopped_run_exits_143(capsys):
    with pytest.raises(SystemExit) as exit_info:
        errors.user_facing(_raise(RunStopped("runs/w", 3, 9)))(["prog"])
    assert exit_info.value.code == EXIT_STOPPED == 143
    assert "stopped: runs/w: stopped at step 3 of 9" in capsys.readouterr().err


def test_stray_arguments_are_refused():
    with pytest.raises(SystemExit, match=r"unexpected arguments: \['extra'\]"):
        errors.user_facing(_raise(AssertionError("not reached")))(["prog", "extra"])


# (entry point, arguments): each fails on something the user gave it.
ENTRY_POINTS = [
    ("pretrain", ["--workdir=/sys/fs/instructjax-test"]),
    ("sft", ["--workdir={tmp}/w", "--init_from={tmp}/missing"]),
    ("ppo", ["--init_from={tmp}/missing", "--reward_from={tmp}/missing", "--workdir={tmp}/w"]),
    ("dpo", ["--init_from={tmp}/missing", "--workdir={tmp}/w"]),
    ("sample", ["--policy_from={tmp}/missing", "--prompt_file={tmp}/p.jsonl",
                "--output={tmp}/o.jsonl"]),
    ("judge", ["--policies=a={tmp}/missing", "--reference=a", "--reward_from={tmp}/missing",
               "--prompt_file={tmp}/p.jsonl", "--output_dir={tmp}/o"]),
    ("comparisons", ["--policy_from={tmp}/missing", "--data_dir={tmp}/missing"]),
    ("reward_analysis", ["--workdir={tmp}/missing"]),
    ("convert", ["--to=hf", "--workdir={tmp}/missing", "--hf_dir={tmp}/hf"]),
    ("passk", ["--problems={tmp}/missing", "--out={tmp}/o"]),
    ("from_pairs", ["--input={tmp}/p.jsonl", "--out_dir={tmp}/o"]),
    ("code_corpus", ["--out_dir=/sys/fs/instructjax-test"]),
]


def _run(module, args, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", f"experiments.{module}",
                           *(a.format(tmp=tmp_path) for a in args)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module, args", ENTRY_POINTS, ids=[m for m, _ in ENTRY_POINTS])
def test_each_entry_point_reports_a_user_error_in_one_line(module, args, tmp_path):
    result = _run(module, args, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, result.stderr


def test_traceback_flag_shows_the_traceback(tmp_path):
    result = _run("sample", ["--policy_from={tmp}/missing", "--prompt_file={tmp}/p.jsonl",
                             "--output={tmp}/o.jsonl", "--traceback"], tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


def test_old_flag_names_still_work_with_a_warning(tmp_path):
    # RL's --policy_from is now --init_from, passk's --checkpoint --policy_from.
    rl = _run("rl", ["--policy_from={tmp}/missing", "--reward_from={tmp}/missing",
                     "--workdir={tmp}/w"], tmp_path)
    assert "--policy_from is deprecated: use --init_from" in rl.stderr, rl.stderr
    assert rl.returncode == 1 and "missing" in rl.stderr.splitlines()[-1], rl.stderr
    passk = _run("passk", ["--checkpoint={tmp}/missing", "--out={tmp}/o", "--sandbox=none"],
                 tmp_path)
    assert "--checkpoint is deprecated: use --policy_from" in passk.stderr, passk.stderr
    assert passk.stderr.splitlines()[-1].startswith("error: --policy_from="), passk.stderr
    both = _run("rl", ["--policy_from={tmp}/a", "--init_from={tmp}/b", "--workdir={tmp}/w"],
                tmp_path)
    assert both.returncode == 1
    assert "--policy_from is the deprecated name of --init_from" in both.stderr, both.stderr
