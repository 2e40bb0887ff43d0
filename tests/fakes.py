"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""
import json
from pathlib import Path

import jax.numpy as jnp

from instructjax.train import checkpoint as ckpt_lib


def fake_run(workdir, tokenizer_path, model_cfg, params):
    """A finished run's workdir: tokenizer, model_config.json, a checkpoint with params."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True)
    (workdir / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    (workdir / "model_config.json").write_text(json.dumps(model_cfg.__dict__))
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints")
    ckpt.save(1, {"step": jnp.ones((), jnp.int32), "params": params}, {})
    ckpt.close()
