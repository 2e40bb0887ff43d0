"""Hugging Face checkpoints <-> instructjax workdirs (`python -m experiments.convert`).

An imported workdir holds what later stages read from `--init_from` / `load_trained`: an
orbax checkpoint whose state has `params`, model_config.json and tokenizer.model, plus
model.flags (the model as flags, to layer onto a stage's flagfile) and conversion.json
(source, argv, library versions). The tensor mapping itself lives in model/hf.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from absl import logging

from instructjax import parallel
from instructjax.config import ConfigError
from instructjax.data.jsonl import atomic_output
from instructjax.data.tokenizer import Tokenizer
from instructjax.model import hf
from instructjax.model.config import ModelConfig
from instructjax.model.transformer import Transformer
from instructjax.train import checkpoint as ckpt_lib, state as state_lib
from instructjax.train.workdir import (MODEL_CONFIG_FILE, RUNTIME_FIELDS, TOKENIZER_FILE,
                                       library_versions, load_model_config)

DIRECTIONS = ("ours", "hf")
MODEL_FLAGS_FILE = "model.flags"
# Any preset works as the base: model.flags overrides every field it sets.
BASE_PRESET = {"gpt2": "gpt2-124m", "llama": "llama-7b"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    to: str  # "ours": hf_dir -> workdir; "hf": workdir -> hf_dir
    hf_dir: str
    workdir: str
    mesh: str = "data:1,fsdp:-1,tensor:1"
    tokenizer_path: str = ""  # a sentencepiece model to use instead of hf_dir's
    require_tokenizer: bool = True
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES
    overwrite: bool = False  # --to=hf: replace a non-empty hf_dir

    def __post_init__(self):
        if self.to not in DIRECTIONS:
            raise ConfigError(f"--to must be one of {DIRECTIONS}, got {self.to!r}")
        if not self.hf_dir or not self.workdir:
            raise ConfigError("--hf_dir and --workdir are both required")
        if self.max_shard_bytes <= 0:
            raise ConfigError(f"--max_shard_mb must be > 0, got {self.max_shard_bytes} bytes")


def model_flags(cfg: ModelConfig) -> list[str]:
    """Flags that rebuild `cfg` in a stage (experiments/common.py --model/--model_override)."""
    fields = dataclasses.asdict(cfg)
    return [f"--model={BASE_PRESET[cfg.family]}"] + [
        f"--model_override={k}={v}" for k, v in fields.items() if k not in RUNTIME_FIELDS]


def _tokenizer(cfg: ConvertConfig, model_cfg: ModelConfig) -> Tokenizer | None:
    try:
        tokenizer = (Tokenizer.load(cfg.tokenizer_path) if cfg.tokenizer_path
                     else hf.load_tokenizer(cfg.hf_dir))
    except (hf.HFCheckpointError, FileNotFoundError) as e:
        if cfg.require_tokenizer:
            raise ConfigError(f"{e}. Pass --tokenizer_path=<sentencepiece .model>, or "
                              "--norequire_tokenizer to convert the weights alone (stages then "
                              "need --tokenizer_path; load_trained needs tokenizer.model)") from None
        logging.warning("converting without a tokenizer: %s", e)
        return None
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the "
                          f"model's vocab_size is {model_cfg.vocab_size}")
    if tokenizer.pad_id < 0 or tokenizer.pad_id == tokenizer.eos_id:
        logging.warning("tokenizer %s has pad id %d (eos %d): instructjax pipelines expect a "
                        "distinct pad id", tokenizer.path, tokenizer.pad_id, tokenizer.eos_id)
    return tokenizer


def import_to_workdir(cfg: ConvertConfig, argv: list[str] = ()) -> ModelConfig:
    workdir = Path(cfg.workdir)
    checkpoints = workdir / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise ConfigError(f"--workdir={workdir} already holds checkpoints; convert into a new "
                          "directory")
    model_cfg = hf.read_config(cfg.hf_dir)
    tokenizer = _tokenizer(cfg, model_cfg)
    mesh = parallel.make_mesh(cfg.mesh)
    model_cfg, params = hf.load_checkpoint(cfg.hf_dir, mesh)
    checkpointer = ckpt_lib.Checkpointer(checkpoints, keep=1)
    try:
        checkpointer.save(0, {"params": params}, {"converted_from": str(Path(cfg.hf_dir).absolute())})
    finally:
        checkpointer.close()
    ckpt_lib.write_json_atomic(workdir / MODEL_CONFIG_FILE, dataclasses.asdict(model_cfg))
    if jax.process_index() == 0:
        if tokenizer is not None:
            with atomic_output(workdir / TOKENIZER_FILE, "wb") as f:
                f.write(tokenizer.path.read_bytes())
        with atomic_output(workdir / MODEL_FLAGS_FILE) as f:
            f.write(f"# The model converted from {Path(cfg.hf_dir).absolute()}: layer after a "
                    f"stage flagfile, with --init_from={workdir.absolute()}\n")
            f.write("\n".join(model_flags(model_cfg)) + "\n")
    ckpt_lib.write_json_atomic(workdir / "conversion.json", {
        "config": dataclasses.asdict(cfg), "argv": list(argv), "versions": library_versions(),
        "tokenizer": str(tokenizer.path) if tokenizer else None})
    logging.info("imported %s (%s, %d params) into %s", cfg.hf_dir, model_cfg.family,
                 model_cfg.num_params(), workdir)
    return model_cfg


def export_workdir(cfg: ConvertConfig) -> Path:
    """The latest params of a finished LM run (or an imported workdir) -> hf_dir."""
    out_dir = Path(cfg.hf_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"--hf_dir={cfg.hf_dir} is not empty: choose a new directory, or add "
                          "--overwrite to replace it (only once the new checkpoint is complete)")
    model_cfg = load_model_config(cfg.workdir)
    mesh = parallel.make_mesh(cfg.mesh)
    abstract, _ = state_lib.abstract_params(Transformer(model_cfg), mesh)
    params = ckpt_lib.restore_params(cfg.workdir, abstract)
    tokenizer_file = Path(cfg.tokenizer_path or Path(cfg.workdir) / TOKENIZER_FILE)
    tokenizer = Tokenizer.load(tokenizer_file) if tokenizer_file.is_file() else None
    if tokenizer is None:
        logging.warning("%s not found: exporting the weights without a tokenizer", tokenizer_file)
    out = hf.save_checkpoint(params, model_cfg, cfg.hf_dir, max_shard_bytes=cfg.max_shard_bytes,
                             tokenizer=tokenizer)
    logging.info("exported %s to %s", cfg.workdir, out)
    return out


def convert(cfg: ConvertConfig, argv: list[str] = ()) -> None:
    if cfg.to == "ours":
        import_to_workdir(cfg, argv)
    else:
        export_workdir(cfg)

