"""Orbax checkpoints: train state (sharded arrays) plus JSON metadata (data-iterator state,
anything else a task needs to resume exactly).

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact and no half-written one is restored.
Restores go onto ShapeDtypeStructs that carry shardings, so a checkpoint restores onto any
mesh shape and any number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from instructjax.data import jsonl


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def replace(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Overwrites checkpoint `step`. If interrupted in between, the previous checkpoint
        is the latest again, and a rerun redoes the steps after it."""
        if step in self._manager.all_steps():
            self._manager.delete(step)
        self.save(step, state, meta)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """(state, meta) of `step` (default: latest), or None if there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()


def restore_params(workdir: str | Path, abstract_params: Any, *, field: str = "params") -> Any:
    """Final params of an earlier stage's run (its latest checkpoint), onto given shardings.

    Only the state's `field` subtree is read (a PPO run also keeps `value_params`); the
    optimiser state of the earlier run is skipped.
    """
    directory = Path(workdir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"--init_from={workdir}: no checkpoint under {directory}; run that stage first")
    item = {field: abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                           dtype=s.dtype), item),
            partial_restore=True)))
    manager.close()
    return restored["state"][field]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Process 0 writes a JSON file atomically."""
    if jax.process_index() == 0:
        jsonl.write_json_atomic(path, obj)
