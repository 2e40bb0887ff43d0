"""Orbax checkpoints: train state (sharded arrays) plus JSON metadata (data-iterator state,
anything else a task needs to resume exactly).

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact and no half-written one is restored.
Restores go onto ShapeDtypeStructs that carry shardings, so a checkpoint restores onto any
mesh shape and any number of processes.

Each save records a fingerprint of every array (two sums of its bit patterns, mod 2^32:
exact, so independent of the mesh and reduction order); a restore recomputes them and checks
that the floats are finite. A damaged latest checkpoint (flipped or missing bytes) falls
back to the newest intact one with a warning, and the damaged ones are moved aside to
<workdir>/damaged_checkpoints/ (so the resumed run can save those steps again);
`restore_params`, which reads a finished run's weights for another stage, refuses a damaged
one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from instructjax.data import jsonl

FINGERPRINTS = "fingerprints"  # meta key: {field: {leaf path: [sum, weighted sum]}}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged bytes, wrong fingerprints, non-finite values."""


@jax.jit
def _leaf_fingerprint(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        u = x.astype(jnp.uint32)
    else:
        u = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[
            x.dtype.itemsize]).astype(jnp.uint32).ravel()
    weight = jnp.arange(u.size, dtype=jnp.uint32) % 65521 + 1  # so a swap of values shows
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weight, dtype=jnp.uint32), finite


def _fields(state: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(state):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return dict(state)


def fingerprints(tree: Any) -> tuple[dict[str, list[int]], list[str]]:
    """({leaf path: [sum, weighted sum]}, paths of leaves with non-finite values). Fetched
    leaf by leaf: queueing many sharded programs without a sync can abort on CPU."""
    out, bad = {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        a, b, finite = jax.device_get(_leaf_fingerprint(leaf))
        out[name] = [int(a), int(b)]
        if not finite:
            bad.append(name)
    return out, bad


def verify(restored: dict[str, Any], recorded: dict[str, dict] | None, where: str) -> None:
    """Raises CheckpointError unless every restored field matches its recorded fingerprints
    (checkpoints written before fingerprints were recorded are only checked for finiteness)."""
    for field, tree in restored.items():
        found, bad = fingerprints(tree)
        if bad:
            raise CheckpointError(f"{where}: non-finite values in {field}{bad[0]}"
                                  + (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""))
        expected = (recorded or {}).get(field)
        if expected is None:
            continue
        wrong = [k for k in found if expected.get(k) != found[k]]
        if wrong:
            raise CheckpointError(f"{where}: {field}{wrong[0]} does not match the fingerprint "
                                  "recorded when it was saved (damaged bytes)")


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        meta = {**meta, FINGERPRINTS: {k: fingerprints(v)[0] for k, v in _fields(state).items()}}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def replace(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Overwrites checkpoint `step`. If interrupted in between, the previous checkpoint
        is the latest again, and a rerun redoes the steps after it."""
        if step in self._manager.all_steps():
            self._manager.delete(step)
        self.save(step, state, meta)

    def _restore_verified(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        where = f"checkpoint {self.directory / str(step)}"
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax / tensorstore read or decode errors
            raise CheckpointError(f"{where} cannot be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        meta = dict(restored["meta"])
        verify(_fields(restored["state"]), meta.pop(FINGERPRINTS, None), where)
        return restored["state"], meta

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """(state, meta) of `step`, or by default of the newest intact checkpoint (a damaged
        newer one is skipped with a warning); None if there is no checkpoint."""
        if step is not None:
            return self._restore_verified(abstract_state, step)
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, candidate in enumerate(steps):
            try:
                restored = self._restore_verified(abstract_state, candidate)
            except CheckpointError as e:
                if i + 1 == len(steps):
                    raise CheckpointError(f"{e}; no intact checkpoint is left in "
                                          f"{self.directory}") from None
                logging.warning("%s; falling back to step %d", e, steps[i + 1])
            else:
                if i:
                    self._set_aside(steps[:i])
                return restored
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged checkpoints out of the manager's directory, kept for inspection."""
        aside = self.directory.parent / "damaged_checkpoints"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                if (aside / str(step)).exists():
                    shutil.rmtree(aside / str(step))
                os.replace(self.directory / str(step), aside / str(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("checkpoints set aside")
        self._manager.reload()
        logging.warning("moved the damaged checkpoint(s) of step(s) %s to %s",
                        ", ".join(map(str, steps)), aside)

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
            f"{workdir}: no checkpoint under {directory}; run (or finish) the stage that "
            "writes it first")
    item = {field: abstract_params}
    where = f"checkpoint {directory / str(step)} (the latest of {workdir})"
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=jax.tree.map(
                lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                               dtype=s.dtype), item),
                partial_restore=True),
            meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise CheckpointError(f"{where} cannot be read ({type(e).__name__}); it is damaged: "
                              "rerun the stage that wrote it") from e
    finally:
        manager.close()
    try:
        verify({field: restored["state"][field]},
               (restored["meta"] or {}).get(FINGERPRINTS), where)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; rerun the stage that wrote it") from None
    return restored["state"][field]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Process 0 writes a JSON file atomically."""
    if jax.process_index() == 0:
        jsonl.write_json_atomic(path, obj)
