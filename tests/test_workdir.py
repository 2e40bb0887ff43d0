"""The workdir contract: one run at a time per workdir, a record that says how the run
ended, "finished" only at the last step, and pipelines that pass a stop on to their stage."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from experiments import stages
from instructjax.train import workdir as wd

ROOT = Path(__file__).resolve().parents[1]


def _record(path):
    return json.loads((Path(path) / wd.RUN_RECORD_FILE).read_text())


def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path):
    with wd.open_run(tmp_path, {"lr": 1}, ["a"], total_steps=3):
        with pytest.raises(wd.WorkdirInUse, match=f"in use by PID {os.getpid()}"):
            with wd.open_run(tmp_path, {"lr": 1}, ["b"], total_steps=3):
                pass
    with wd.open_run(tmp_path, {"lr": 1}, ["c"], total_steps=3):  # released on the way out
        pass


def test_the_lock_is_held_across_processes(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from instructjax.train import workdir as wd
        with wd.open_run({str(tmp_path)!r}, {{}}, [], total_steps=1):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(wd.WorkdirInUse, match=f"in use by PID {proc.pid}"):
            with wd.open_run(tmp_path, {}, [], total_steps=1):
                pass
    finally:
        proc.kill()
        proc.wait()
    with wd.open_run(tmp_path, {}, [], total_steps=1):  # a dead holder's lock is gone
        pass


def test_finished_only_at_the_last_step_and_the_record_says_how_it_ended(tmp_path):
    with pytest.raises(wd.RunStopped, match="stopped at step 2 of 5"):
        with wd.open_run(tmp_path, {"lr": 1}, ["first"], total_steps=5) as run:
            run.finish(2, {"loss": 1.0})
    assert not wd.is_finished(tmp_path)
    assert _record(tmp_path)["status"]["state"] == "stopped"
    assert _record(tmp_path)["status"]["step"] == 2

    with pytest.raises(ZeroDivisionError):
        with wd.open_run(tmp_path, {"lr": 1}, ["second"], total_steps=5):
            1 / 0
    assert _record(tmp_path)["status"]["state"] == "failed"
    assert "ZeroDivisionError" in _record(tmp_path)["status"]["error"]

    with wd.open_run(tmp_path, {"lr": 2}, ["third"], total_steps=5) as run:
        assert _record(tmp_path)["status"]["state"] == "running"
        run.finish(5, {"loss": 0.5})
    assert wd.is_finished(tmp_path)
    record = _record(tmp_path)
    assert record["status"]["state"] == "finished" and record["config"] == {"lr": 2}
    assert [(h["argv"], h["status"]["state"]) for h in record["history"]] == [
        (["first"], "stopped"), (["second"], "failed")]
    assert json.loads((tmp_path / wd.FINAL_EVAL_FILE).read_text()) == {"step": 5, "loss": 0.5}

    # Extending a finished run: not done until the new last step.
    with pytest.raises(wd.RunStopped):
        with wd.open_run(tmp_path, {"lr": 2}, ["fourth"], total_steps=8) as run:
            assert not wd.is_finished(tmp_path)
            run.finish(6, {})
    assert not wd.is_finished(tmp_path)


FAKE_STAGE = """
import os, signal, sys, time
from pathlib import Path
out = Path(next(a for a in sys.argv if a.startswith("--out=")).split("=", 1)[1])
def stop(signum, frame):
    out.write_text(f"{os.getpid()} {signal.Signals(signum).name}")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
out.write_text(f"{os.getpid()} started")
time.sleep(120)
"""


def _pipeline(tmp_path):
    """A pipeline process whose one stage is FAKE_STAGE; (process, the stage's report file)."""
    (tmp_path / "fake_stage.py").write_text(FAKE_STAGE)
    flagfile = tmp_path / "stage.flags"
    flagfile.write_text("")
    out = tmp_path / "stage.out"
    code = (f"from experiments.stages import run_stage; from pathlib import Path; "
            f"run_stage('fake', 'fake_stage', {str(flagfile)!r}, Path({str(tmp_path)!r}) / 'done', "
            f"['--out={out}'])")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out.exists() and out.read_text().endswith("started")):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the stage did not start: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc, out


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_pipeline_passes_a_stop_on_to_its_stage_and_exits_stopped(tmp_path, signum):
    proc, out = _pipeline(tmp_path)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == wd.EXIT_STOPPED == stages.EXIT_STOPPED
    pid, how = out.read_text().split()
    assert how == "SIGTERM"
    assert "rerun the same command to resume" in proc.stderr.read()
    assert _gone(int(pid))


def test_a_stage_does_not_outlive_a_killed_pipeline(tmp_path):
    proc, out = _pipeline(tmp_path)
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while not out.read_text().endswith("SIGTERM"):
        assert time.time() < deadline, "the stage did not get SIGTERM when its pipeline died"
        time.sleep(0.05)


def test_resuming_checks_the_settings_against_the_record(tmp_path):
    cfg = {"model": {"num_layers": 2}, "data": {"data_dir": "d"}, "optim": {"learning_rate": 1e-3},
           "train": {"steps": 10, "log_every": 5}}
    with wd.open_run(tmp_path, cfg, [], total_steps=10):
        pass
    # No checkpoint yet: anything may change.
    with wd.open_run(tmp_path, {**cfg, "model": {"num_layers": 4}}, [], total_steps=10):
        pass
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    with pytest.raises(wd.ConfigError, match=r"another model or data \(model.num_layers: 4 -> 3\)"):
        with wd.open_run(tmp_path, {**cfg, "model": {"num_layers": 3}}, [], total_steps=10):
            pass
    cfg = {**cfg, "model": {"num_layers": 4}}
    with pytest.raises(wd.ConfigError, match=r"data.data_dir: 'd' -> 'e'"):
        with wd.open_run(tmp_path, {**cfg, "data": {"data_dir": "e"}}, [], total_steps=10):
            pass
    faster = {**cfg, "optim": {"learning_rate": 3e-3}}
    with pytest.raises(wd.ConfigError, match=r"optim.learning_rate: 0.001 -> 0.003.*--allow_config_change"):
        with wd.open_run(tmp_path, faster, [], total_steps=10):
            pass
    with wd.open_run(tmp_path, {**cfg, "train": {"steps": 10, "log_every": 1}}, [], total_steps=10):
        pass  # how often it logs is free
    with wd.open_run(tmp_path, faster, [], total_steps=10, allow_config_change=True):
        pass
    record = _record(tmp_path)
    assert record["accepted_changes"] == ["optim.learning_rate: 0.001 -> 0.003"]
    assert record["history"][-1]["config"]["optim"] == {"learning_rate": 1e-3}


def test_a_stage_pointed_at_the_wrong_kind_of_run_says_so(tmp_path):
    lm, rm, old_rm = tmp_path / "sft", tmp_path / "rm", tmp_path / "old_rm"
    with wd.open_run(lm, {"task": "sft"}, [], total_steps=1):
        pass
    with wd.open_run(rm, {"task": "reward"}, [], total_steps=1,
                     files={wd.REWARD_CONFIG_FILE: {"read": "eos"}}):
        pass
    with wd.open_run(old_rm, {"task": "reward"}, [], total_steps=1):  # before reward_config.json
        pass
    assert [wd.role(d) for d in (lm, rm, old_rm)] == ["lm", "reward", "reward"]
    wd.require_role(rm, "reward", "--reward_from")
    with pytest.raises(wd.ConfigError, match=r"--reward_from=.*sft is a language-model run, not a "
                                             r"reward model"):
        wd.require_role(lm, "reward", "--reward_from")
    with pytest.raises(wd.ConfigError, match=r"--policy_from=.*old_rm is a reward-model run"):
        wd.load_trained(old_rm, mesh=None, flag="--policy_from")


def test_a_stopped_stage_is_run_again_and_a_finished_one_skipped(tmp_path, monkeypatch):
    codes = iter([wd.EXIT_STOPPED, 0])
    calls = []
    monkeypatch.setattr(stages, "run_child", lambda cmd: calls.append(cmd) or next(codes))
    flagfile = tmp_path / "stage.flags"
    flagfile.write_text("")
    done = tmp_path / wd.FINAL_EVAL_FILE  # a stopped run never writes it
    with pytest.raises(SystemExit) as stopped:
        stages.run_stage("sft", "experiments.sft", str(flagfile), done, [])
    assert stopped.value.code == wd.EXIT_STOPPED
    assert stages.run_stage("sft", "experiments.sft", str(flagfile), done, [])  # rerun: runs
    assert len(calls) == 2
    done.write_text("{}")
    assert stages.run_stage("sft", "experiments.sft", str(flagfile), done, [])  # finished
    assert len(calls) == 2


def test_a_setting_added_since_the_run_started_counts_as_its_default(tmp_path):
    # An RL run recorded before --algorithm and --group_size existed resumes as PPO; asking
    # it for another algorithm is a change of what is trained.
    from instructjax.config import OptimConfig
    from instructjax.rlhf.ppo import PPOConfig
    cfg = PPOConfig(optim=OptimConfig(learning_rate=1e-5), workdir=str(tmp_path),
                    policy_from="sft", reward_from="rm")
    with wd.open_run(tmp_path, cfg, [], total_steps=10):
        pass
    record = _record(tmp_path)
    for name in ("algorithm", "group_size"):
        del record["config"][name]
    (tmp_path / wd.RUN_RECORD_FILE).write_text(json.dumps(record))
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    with wd.open_run(tmp_path, cfg, [], total_steps=10):
        pass
    with pytest.raises(wd.ConfigError, match=r"algorithm: 'ppo' -> 'rloo'"):
        with wd.open_run(tmp_path, dataclasses.replace(cfg, algorithm="rloo", group_size=2), [],
                         total_steps=10):
            pass
