"""Damaged checkpoints: the newest intact one is restored instead (with a warning naming
both), and a finished run's damaged weights are refused with one line."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.train import checkpoint as ckpt_lib


def _state(value):
    return {"params": {"w": jnp.full((64, 64), value, jnp.float32), "b": jnp.arange(64.0)},
            "step": jnp.asarray(7, jnp.int32)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _largest_file(directory: Path) -> Path:
    files = [p for p in directory.rglob("*") if p.is_file() and "state" in p.parts]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _save(directory, states):
    ckpt = ckpt_lib.Checkpointer(directory, keep=5)
    for step, state in states.items():
        ckpt.save(step, state, {"data_iter": step})
    return ckpt


@pytest.mark.parametrize("damage", [_flip_byte, _truncate])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    ckpt = _save(tmp_path / "checkpoints", {1: _state(1.0), 2: _state(2.0)})
    damage(_largest_file(tmp_path / "checkpoints" / "2"))
    # Another stage reading this run's weights refuses the damaged ones...
    with pytest.raises(ckpt_lib.CheckpointError, match="rerun the stage that wrote it"):
        ckpt_lib.restore_params(tmp_path, _abstract(_state(0.0))["params"])
    # ...the run itself resumes from the newest intact one and sets the damaged one aside,
    state, meta = ckpt.restore(_abstract(_state(0.0)))
    assert meta == {"data_iter": 1}
    np.testing.assert_array_equal(state["params"]["w"], np.full((64, 64), 1.0, np.float32))
    assert "checkpoints/2" in caplog.text and "falling back to step 1" in caplog.text
    assert (tmp_path / "damaged_checkpoints" / "2").is_dir() and ckpt.latest_step() == 1
    # so that it can save that step again.
    ckpt.save(2, _state(3.0), {"data_iter": 2})
    ckpt.close()
    params = ckpt_lib.restore_params(tmp_path, _abstract(_state(0.0))["params"])
    np.testing.assert_array_equal(params["w"], np.full((64, 64), 3.0, np.float32))


def test_non_finite_weights_are_refused(tmp_path):
    ckpt = _save(tmp_path / "checkpoints", {1: _state(1.0), 2: _state(float("nan"))})
    with pytest.raises(ckpt_lib.CheckpointError, match=r"non-finite values in params\['w'\]"):
        ckpt_lib.restore_params(tmp_path, _abstract(_state(0.0))["params"])
    state, meta = ckpt.restore(_abstract(_state(0.0)))
    assert meta == {"data_iter": 1}
    ckpt.close()


def test_no_intact_checkpoint_left_is_one_clear_error(tmp_path):
    ckpt = _save(tmp_path / "checkpoints", {1: _state(1.0)})
    _flip_byte(_largest_file(tmp_path / "checkpoints" / "1"))
    with pytest.raises(ckpt_lib.CheckpointError, match="no intact checkpoint is left"):
        ckpt.restore(_abstract(_state(0.0)))
    ckpt.close()


def test_fingerprints_do_not_depend_on_the_mesh():
    x = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 7
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("d")))
    assert ckpt_lib.fingerprints(x) == ckpt_lib.fingerprints(sharded)
    y = x.at[3, 5].set(jnp.nextafter(x[3, 5], 10.0))  # one bit of one value
    assert ckpt_lib.fingerprints(x)[0] != ckpt_lib.fingerprints(y)[0]
