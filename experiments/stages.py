"""Running a pipeline's stages: each stage is an experiment script in its own subprocess,
with its own flagfile; a stage whose final output exists is skipped, so a rerun resumes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from absl import logging


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
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"error: stage {name} failed (exit {result.returncode}); its output is "
                         f"above. Rerun to resume.")
    elapsed = time.time() - start
    logging.info("stage %s: finished in %.0f s", name, elapsed)
    if timings is not None:
        timings[name] = elapsed
    return True
