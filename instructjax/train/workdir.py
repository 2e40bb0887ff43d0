"""A run's workdir: the files a run leaves, who may write them, and when it counts as done.

  tokenizer.model     the run's tokenizer (trained, or copied from the run it started from)
  model_config.json   the ModelConfig its checkpoints hold (value_model_config.json: PPO's
                      value model)
  reward_config.json  reward models only: how the reward is read (rl_ops.read_reward)
  run_config.json     the run record: resolved config, argv, library versions, devices,
                      status (running / stopped / failed / finished, with the step) and one
                      entry per earlier start of the run in `history`
  checkpoints/        orbax checkpoints (train/checkpoint.py)
  metrics.jsonl       one row per logged step (train/metrics.py)
  final_eval.json     written only when the run reached its last step: orchestrators,
                      sweeps and reruns take it as "this stage is done"
  .lock               held (flock) by the run using the workdir; it names the run's PID

Every training stage runs inside `open_run` (the lock, the record, the status) and ends
with `Run.finish`; a run stopped by SIGTERM/SIGINT raises `RunStopped` from the loop, and
the experiment exits with EXIT_STOPPED and says how to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from instructjax.config import ConfigError
from instructjax.model.config import ModelConfig
from instructjax.train.checkpoint import write_json_atomic

TOKENIZER_FILE = "tokenizer.model"
MODEL_CONFIG_FILE = "model_config.json"
REWARD_CONFIG_FILE = "reward_config.json"  # a reward model's {"read": rl_ops.read_reward mode}
RUN_RECORD_FILE = "run_config.json"
FINAL_EVAL_FILE = "final_eval.json"
LOCK_FILE = ".lock"
EXIT_STOPPED = 143  # 128 + SIGTERM, what a job scheduler expects of a preempted job

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
             "grain", "sentencepiece", "absl-py", "numpy")


class RunStopped(Exception):
    """The run saved a checkpoint and stopped before its last step (SIGTERM, SIGINT or a
    preemption notice)."""

    def __init__(self, workdir: str | Path, step: int, total: int):
        self.workdir, self.step, self.total = str(workdir), step, total
        super().__init__(f"{workdir}: stopped at step {step} of {total} (checkpoint saved); "
                         "rerun the same command to resume")


class WorkdirInUse(ConfigError):
    pass


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def is_finished(workdir: str | Path) -> bool:
    return (Path(workdir) / FINAL_EVAL_FILE).exists()


def load_record(workdir: str | Path) -> dict[str, Any] | None:
    path = Path(workdir) / RUN_RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def load_model_config(workdir: str | Path, file: str = MODEL_CONFIG_FILE) -> ModelConfig:
    path = Path(workdir) / file
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a finished run?")
    return ModelConfig(**json.loads(path.read_text()))


def load_reward_read(workdir: str | Path) -> str:
    """How the reward model in `workdir` was trained to be read ('eos' or 'pooled', see
    rl_ops.read_reward), so PPO and the analysis read it the same way. Workdirs written
    before the read was recorded (no reward_config.json) were trained with 'eos'."""
    path = Path(workdir) / REWARD_CONFIG_FILE
    return json.loads(path.read_text())["read"] if path.exists() else "eos"


def role(workdir: str | Path) -> str | None:
    """'reward' for a reward model's workdir, 'lm' for another run's (pretraining, SFT, DPO,
    PPO), None when the workdir has no run record to tell (imports, hand-made workdirs)."""
    if (Path(workdir) / REWARD_CONFIG_FILE).exists():
        return "reward"
    record = load_record(workdir)
    if record is None:
        return None
    return "reward" if record.get("config", {}).get("task") == "reward" else "lm"


def require_role(workdir: str | Path, wanted: str, flag: str) -> None:
    """One clear line when a stage is pointed at the wrong kind of run."""
    found = role(workdir)
    if found in (wanted, None):
        return
    if wanted == "reward":
        raise ConfigError(f"{flag}={workdir} is a language-model run, not a reward model: "
                          "pass the workdir of an experiments.reward run")
    raise ConfigError(f"{flag}={workdir} is a reward-model run: pass the workdir of a "
                      "language-model run (pretraining, SFT, DPO or PPO)")


def load_trained(workdir: str | Path, mesh, *, head: str = "lm", flag: str = "--workdir"):
    """(model, params, tokenizer) of a finished run, params sharded onto `mesh`; `head`
    'lm' for a language model, 'scalar' for a reward model (`flag` names the workdir in
    errors)."""
    require_role(workdir, "reward" if head == "scalar" else "lm", flag)
    from instructjax.data.tokenizer import Tokenizer
    from instructjax.model.transformer import Transformer
    from instructjax.train import checkpoint as ckpt_lib, state as state_lib
    model = Transformer(load_model_config(workdir), head=head)
    params = ckpt_lib.restore_params(workdir, state_lib.abstract_params(model, mesh)[0])
    return model, params, Tokenizer.load(Path(workdir) / TOKENIZER_FILE)


# Model fields a run may set differently from the run it starts from (--init_from).
RUNTIME_FIELDS = ("compute_dtype", "remat", "dropout_rate")


def check_init_from_model(model: ModelConfig, init_from: str | Path) -> None:
    """The model built from --model/--model_override must be the one --init_from trained."""
    theirs = dataclasses.asdict(load_model_config(init_from))
    ours = dataclasses.asdict(model)
    differ = [f"{k}={ours[k]} (theirs {theirs.get(k)})" for k in ours
              if k not in RUNTIME_FIELDS and ours[k] != theirs.get(k)]
    if differ:
        raise ConfigError(f"the model of --model/--model_override/--vocab_size differs from the "
                          f"--init_from={init_from} model in {', '.join(differ)}: set those "
                          f"flags to match {Path(init_from) / MODEL_CONFIG_FILE}")


def tokenizer_of(source_workdir: str | Path, flag: str) -> Path:
    """The tokenizer file of an earlier run named by `flag`."""
    source = Path(source_workdir) / TOKENIZER_FILE
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: is {flag}={source_workdir} the workdir "
                                "of a finished run?")
    return source


def copy_tokenizer(source_workdir: str | Path, workdir: str | Path, flag: str) -> Path:
    """Copies an earlier run's tokenizer into `workdir`; returns the copy's path."""
    source = tokenizer_of(source_workdir, flag)
    target = Path(workdir) / TOKENIZER_FILE
    if jax.process_index() == 0 and source.absolute() != target.absolute():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


# Settings a resumed run may change freely: where it runs and how often it logs and saves;
# the tokenizer's path (its bytes are checked against the workdir's copy instead).
FREE_FIELDS = frozenset({"workdir", "mesh", "log_every", "eval_every", "eval_batches",
                         "checkpoint_every", "keep_checkpoints", "peak_flops_per_device",
                         "compute_dtype", "remat", "allow_config_change", "tokenizer_path"})
# What is trained, on what: never changed under a run's checkpoints.
FIXED_FIELDS = ("model", "data", "task", "init_from", "policy_from", "reward_from",
                "prompt_file", "ptx_file", "rm_read", "algorithm", "group_size")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def field_defaults(config: Any) -> dict[str, Any]:
    """{'field' or 'nested.field': default} of a config dataclass, as recorded (JSON)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in field_defaults(value).items()})
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out))


def check_resume(workdir: Path, recorded: dict[str, Any], config: dict[str, Any],
                 allow_change: bool, defaults: dict[str, Any] | None = None) -> list[str]:
    """Compares a resumed run's config with the recorded one: model or data changes are
    refused, other changes need allow_change. Returns the accepted changes. A setting added
    to the code after the run started is not in its record: it counts as its default (new
    settings default to the old behaviour)."""
    old, new = _flatten(recorded), _flatten(config)
    for key, value in (defaults or {}).items():
        if key not in old and key in new:
            old[key] = value
    changed = [k for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and k.rsplit(".", 1)[-1] not in FREE_FIELDS]
    show = ", ".join
    fixed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed
             if k.split(".", 1)[0] in FIXED_FIELDS]
    if fixed:
        raise ConfigError(f"{workdir} holds checkpoints of another model or data ({show(fixed)}); "
                          "use a new --workdir, or the settings it was started with "
                          f"({workdir / RUN_RECORD_FILE})")
    other = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
    if other and not allow_change:
        raise ConfigError(f"resuming {workdir} with changed settings ({show(other)}); add "
                          "--allow_config_change to accept them (the earlier settings stay in "
                          "the run record's history), or use the settings it was started with")
    return other


class _Lock:
    """An advisory flock on workdir/.lock, taken by process 0 (the others share its
    filesystem and its fate). Released by the kernel if the process dies."""

    def __init__(self, workdir: Path):
        self.path, self.fd = workdir / LOCK_FILE, None
        if jax.process_index() != 0:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirInUse(f"workdir {workdir} is in use by PID {holder} (another run); "
                               "wait for it to end or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (a rename race otherwise)
            self.fd = None


@dataclasses.dataclass
class Run:
    """A started run: its workdir, the record being kept, and the number of steps it ends at."""
    workdir: Path
    record: dict[str, Any]
    total_steps: int

    def set_status(self, state: str, step: int | None = None, **extra) -> None:
        self.record["status"] = {"state": state, "step": step, "total": self.total_steps,
                                 "time": time.time(), **extra}
        write_json_atomic(self.workdir / RUN_RECORD_FILE, self.record)

    def finish(self, step: int, metrics: dict[str, Any]) -> None:
        """Writes final_eval.json (the "done" marker) and marks the record finished."""
        if step < self.total_steps:
            raise RunStopped(self.workdir, step, self.total_steps)
        write_json_atomic(self.workdir / FINAL_EVAL_FILE, {"step": step, **metrics})
        self.set_status("finished", step)


def has_checkpoints(workdir: str | Path) -> bool:
    directory = Path(workdir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


@contextlib.contextmanager
def open_run(workdir: str | Path, config: Any, argv: list[str], *, total_steps: int,
             allow_config_change: bool = False, record_extra: dict[str, Any] | None = None,
             files: dict[str, Any] | None = None):
    """Locks `workdir`, writes the run record (status "running") and the JSON `files`
    ({name: object}), and yields a `Run`. On the way out the record says "stopped" (with
    the step) after a RunStopped and "failed" (with the error) after any other exception.

    A run that resumes from checkpoints must have the recorded model and data, and the
    recorded optimiser and loop settings unless `allow_config_change` (check_resume); the
    earlier records stay in `history`.
    """
    workdir = Path(workdir)
    lock = _Lock(workdir)
    try:
        defaults = field_defaults(config) if dataclasses.is_dataclass(config) else {}
        config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
        config = json.loads(json.dumps(config))  # as recorded (tuples become lists)
        previous = load_record(workdir)
        changes = []
        if previous is not None and has_checkpoints(workdir):
            changes = check_resume(workdir, previous.get("config", {}), config,
                                   allow_config_change, defaults)
        history = []
        if previous is not None:
            history = previous.pop("history", [])
            history.append(previous)
            if (previous.get("status", {}).get("total") != total_steps  # a longer run: not done
                    and jax.process_index() == 0):
                (workdir / FINAL_EVAL_FILE).unlink(missing_ok=True)
        record = {"config": config, **(record_extra or {}), "argv": list(argv),
                  "accepted_changes": changes,
                  "versions": library_versions(),
                  "devices": [str(d) for d in jax.devices()[:8]],
                  "device_count": jax.device_count(), "process_count": jax.process_count(),
                  "pid": os.getpid(), "started": time.time(), "history": history}
        run = Run(workdir, record, total_steps)
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
        for name, obj in (files or {}).items():
            write_json_atomic(workdir / name, obj)
        run.set_status("running")
        try:
            yield run
        except RunStopped as e:
            run.set_status("stopped", e.step)
            raise
        except BaseException as e:
            run.set_status("failed", error=f"{type(e).__name__}: {e}"[:500])
            raise
    finally:
        lock.release()
