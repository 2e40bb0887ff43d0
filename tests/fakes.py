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


def tiny_world_policy(root, mesh, *, n_sft_train=30, n_sft_eval=12, n_prompts=20):
    """A small world in root/data, a 512-piece tokenizer trained on it and an untrained tiny
    policy written as the finished run root/sft; returns (world files, model config, params)."""
    import jax
    from instructjax.data.jsonl import read_jsonl
    from instructjax.data.tokenizer import train_tokenizer
    from instructjax.data.world import write_world
    from instructjax.model.config import preset
    from instructjax.model.transformer import Transformer
    from instructjax.train import state as state_lib
    root = Path(root)
    files = write_world(root / "data", n_pretrain_docs=150, n_sft_train=n_sft_train,
                        n_sft_eval=n_sft_eval, n_prompts=n_prompts)
    texts = [r["text"] for _, r in read_jsonl(files["pretrain_train"], required={"text": str})]
    train_tokenizer(texts, root / "tokenizer.model", vocab_size=512)
    cfg = preset("tiny", vocab_size=512, max_len=128)
    params = state_lib.init_params_sharded(Transformer(cfg), mesh, 2, jax.random.key(0))[0]
    fake_run(root / "sft", root / "tokenizer.model", cfg, params)
    return files, cfg, params
