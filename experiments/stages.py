"""Running a pipeline's stages: each stage is an experiment script in its own subprocess,
with its own flagfile; a stage whose final output exists is skipped, so a rerun resumes.

A training stage writes its final output only when it reached its last step. SIGTERM or
SIGINT to the pipeline goes to the running stage (once; a second signal is passed on too,
which stops the stage at once); the stage saves a checkpoint and exits with
workdir.EXIT_STOPPED, and so does the pipeline. A stage dies with the pipeline
(PR_SET_PDEATHSIG), so no stage is left training on its own.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from pathlib import Path

from absl import logging

EXIT_STOPPED = 143  # = instructjax.train.workdir.EXIT_STOPPED (not imported: it starts JAX)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the stage's process, before exec: SIGTERM when the pipeline's process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_child(cmd: list[str]) -> int:
    """Runs `cmd` in its own process group, passing on SIGTERM / SIGINT; its exit status."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum, frame):
        logging.warning("%s received: passing it on to the running stage (PID %d)",
                        signal.Signals(signum).name, proc.pid)
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_stage(name: str, module: str, flagfile: str, done: Path, args: list[str], *,
              flag: str = "", timings: dict[str, float] | None = None) -> bool:
    """Runs one stage unless `done` exists; False when the stage is not configured.

    `flag` names the flag that gave `flagfile` (default --<name>_flags), for messages;
    `timings`, when given, receives the stage's wall-clock seconds (0 when skipped)."""
    flag = flag or f"{name}_flags"
    if timings is not None:
        timings[name] = 0.0
    if done.exists():
        logging.info("stage %s: done already (%s), skipping", name, done)
        return True
    if not flagfile:
        logging.info("stage %s: no --%s, left out", name, flag)
        return False
    if not Path(flagfile).exists():
        raise SystemExit(f"error: --{flag}={flagfile!r} does not name a flagfile")
    cmd = [sys.executable, "-m", module, f"--flagfile={flagfile}", *args]
    logging.info("stage %s: %s", name, " ".join(cmd))
    start = time.time()
    code = run_child(cmd)
    if code == EXIT_STOPPED:
        print(f"stopped: stage {name} saved a checkpoint and stopped; rerun the same command "
              "to resume", file=sys.stderr)
        raise SystemExit(EXIT_STOPPED)
    if code != 0:
        raise SystemExit(f"error: stage {name} failed (exit {code}); its output is above. "
                         "Rerun to resume.")
    elapsed = time.time() - start
    logging.info("stage %s: finished in %.0f s", name, elapsed)
    if timings is not None:
        timings[name] = elapsed
    return True
