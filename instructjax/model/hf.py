"""Hugging Face checkpoints in and out: GPT2LMHeadModel and LlamaForCausalLM directories
(`config.json` + `model.safetensors`, or shards listed in `model.safetensors.index.json`).

Import streams: the target shardings come from `jax.eval_shape` of our init and the
logical-axis rules, and every array is built with `jax.make_array_from_callback`, whose
callback reads only the box of the stored tensor that holds one device's shard. No full
copy of the model, or even of one sharded tensor, is made on any device; the host holds one
tensor's shards at a time. Export gathers one tensor at a time from the mesh and writes
float32 safetensors files no bigger than `max_shard_bytes` (plus an index when there are
several), into a temporary directory renamed into place when complete.

Which tensor maps to which parameter, and how, is in model/hf_layout.py, for the unrolled
layer layout (`layer_i/...`). A scan_layers model's stacked `layers/...` params are read and
written one layer at a time through the same table (model/layout.py names the paths).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 checkpoints load)
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from instructjax import parallel
from instructjax.data.tokenizer import Tokenizer
from instructjax.model import layout as layer_layout
from instructjax.model.config import ModelConfig
from instructjax.model.hf_layout import (CONFIG_FILE, IGNORED_SUFFIXES, HFCheckpointError,
                                         Layout, config_from_hf, config_to_hf, stored_shapes,
                                         tensor_layouts)
from instructjax.model.transformer import Transformer

__all__ = ["HFCheckpointError", "read_config", "load_checkpoint", "save_checkpoint",
           "load_tokenizer", "DEFAULT_MAX_SHARD_BYTES"]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SP_TOKENIZER_FILE = "tokenizer.model"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Base-model checkpoints (GPT2Model, LlamaModel, and the original openai gpt2 files) name
# tensors without the LM wrapper's prefix.
PREFIXES = {"gpt2": "transformer.", "llama": "model."}


def read_config(hf_dir: str | Path) -> ModelConfig:
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --hf_dir must be a Hugging Face checkpoint "
                                "directory (config.json + model.safetensors)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(hf, str(path))


class _Tensors(contextlib.ExitStack):
    """The safetensors files of a checkpoint, opened lazily; tensors looked up by the LM's
    names whether or not the file carries the prefix."""

    def __init__(self, hf_dir: Path, family: str):
        super().__init__()
        self.dir = hf_dir
        index, single = hf_dir / INDEX_FILE, hf_dir / WEIGHTS_FILE
        if index.is_file():
            try:
                self.files = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFCheckpointError(f"{index}: not a safetensors index with a 'weight_map' "
                                        f"({e!r})") from None
        elif single.is_file():
            with safe_open(single, framework="numpy") as f:
                self.files = {name: WEIGHTS_FILE for name in f.keys()}
        else:
            legacy = [p.name for p in hf_dir.glob("pytorch_model*.bin")]
            hint = (f" (found {legacy}: re-save it with transformers' save_pretrained, which "
                    "writes safetensors)") if legacy else ""
            raise FileNotFoundError(f"{hf_dir}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found"
                                    f"{hint}")
        self.prefix = PREFIXES[family]
        self._open: dict[str, object] = {}

    def stored_name(self, key: str) -> str:
        if key in self.files or not key.startswith(self.prefix):
            return key
        bare = key[len(self.prefix):]
        return bare if bare in self.files else key

    def file_of(self, key: str) -> Path:
        return self.dir / self.files[self.stored_name(key)]

    def get_slice(self, key: str):
        name = self.stored_name(key)
        file = self.files[name]
        if file not in self._open:
            path = self.dir / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in {self.dir / INDEX_FILE}) not found")
            self._open[file] = self.enter_context(safe_open(path, framework="numpy"))
        return self._open[file].get_slice(name)

    def check(self, expected: dict[str, tuple[int, ...]], tied: bool) -> None:
        """Every expected tensor present with its shape, and nothing left over unread."""
        missing = [k for k in expected if self.stored_name(k) not in self.files]
        if missing:
            raise HFCheckpointError(f"{self.dir}: tensors missing from the safetensors files: "
                                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for key, shape in expected.items():
            have = tuple(self.get_slice(key).get_shape())
            if have != shape:
                raise HFCheckpointError(f"{self.file_of(key)}: tensor {self.stored_name(key)!r} "
                                        f"has shape {have}; config.json implies {shape}")
        used = {self.stored_name(k) for k in expected}
        extra = sorted(n for n in self.files if n not in used
                       and not n.endswith(IGNORED_SUFFIXES)
                       and not (tied and n == "lm_head.weight"))  # a tied copy, redundant
        if extra:
            raise HFCheckpointError(
                f"{self.dir}: tensors we have no parameter for (an unsupported variant, e.g. "
                f"biases our model does not have): {extra[:5]}{' ...' if len(extra) > 5 else ''}")


def abstract_params(cfg: ModelConfig, mesh):
    """(flat abstract params, flat NamedShardings) of our LM, without allocating anything."""
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda rng: model.init(rng, tokens, tokens, tokens)["params"],
                           jax.random.key(0))
    shardings = parallel.logical_shardings(boxed, mesh)
    return (traverse_util.flatten_dict(nn.meta.unbox(boxed)),
            traverse_util.flatten_dict(shardings))


def _sources(flat_paths, cfg: ModelConfig) -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    """Our param path -> the unrolled path(s) tensor_layouts knows it by: itself, or one per
    layer for a stacked scan_layers param (its leading axis indexes them)."""
    return {path: layer_layout.per_layer_paths(path, cfg.n_layers) or [path]
            for path in flat_paths}


def _check_tree(have, layouts: dict[tuple[str, ...], Layout], what: str) -> None:
    if set(have) != set(layouts):
        extra, missing = set(have) - set(layouts), set(layouts) - set(have)
        raise HFCheckpointError(
            f"{what}: parameters {sorted(extra)} have no Hugging Face tensor and "
            f"{sorted(missing)} are missing (only head='lm' models convert; a reward model's "
            "scalar head has no GPT2LMHeadModel/LlamaForCausalLM equivalent)")


def _read_shard(tensor_slice, layout: Layout, index) -> np.ndarray:
    box, cut = layout.source_box(index)
    return layout.select(tensor_slice[box], cut).astype(np.float32)


def load_checkpoint(hf_dir: str | Path, mesh, *, scan_layers: bool = False
                    ) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a Hugging Face checkpoint, params sharded onto `mesh`; with
    scan_layers, the config says so and the layers' params come stacked (model/layout.py)."""
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    if scan_layers:
        cfg = dataclasses.replace(cfg, scan_layers=True)
    layouts = tensor_layouts(cfg)
    abstract, shardings = abstract_params(cfg, mesh)
    sources = _sources(abstract, cfg)
    _check_tree([p for paths in sources.values() for p in paths], layouts,
                f"{hf_dir} ({cfg.family})")
    flat = {}
    with _Tensors(hf_dir, cfg.family) as tensors:
        tensors.check(stored_shapes(layouts), cfg.tie_embeddings)
        for path, unrolled in sources.items():
            parts = [(tensors.get_slice(layouts[p].key), layouts[p]) for p in unrolled]
            stacked = path not in layouts
            assert abstract[path].shape == ((len(parts),) if stacked else ()) + parts[0][1].shape
            read: dict[tuple, np.ndarray] = {}  # replicated shards: read once per tensor

            def callback(index, parts=parts, stacked=stacked, shape=abstract[path].shape,
                         read=read):
                key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
                if key not in read:
                    if stacked:  # index[0] picks layers; the rest cuts each layer's tensor
                        read[key] = np.stack([_read_shard(*parts[i], index[1:])
                                              for i in range(*index[0].indices(len(parts)))])
                    else:
                        read[key] = _read_shard(*parts[0], index)
                return read[key]

            flat[path] = jax.make_array_from_callback(abstract[path].shape, shardings[path],
                                                      callback)
    return cfg, traverse_util.unflatten_dict(flat)


def _gather(x) -> np.ndarray:
    """One parameter, whole, on the host (all processes take part in a multi-host gather)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _stored_tensor(parts: list[tuple[tuple[str, ...], Layout]], param_at) -> np.ndarray:
    """A checkpoint tensor from our parameter(s); fused parts concatenate by offset.
    `param_at(unrolled path)` gives the parameter (one layer's slice of a stacked one)."""
    parts = sorted(parts, key=lambda part: part[1].offset)
    arrays = [layout.to_stored(_gather(param_at(path)).astype(np.float32))
              for path, layout in parts]
    # Contiguous: safetensors.numpy writes a transposed view's buffer in memory order.
    return np.ascontiguousarray(arrays[0] if len(arrays) == 1 else np.concatenate(arrays, -1))


def _plan_files(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensors grouped into files of at most max_shard_bytes (a bigger tensor goes alone)."""
    files: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if files[-1] and used + size > max_shard_bytes:
            files.append([])
            used = 0
        files[-1].append(key)
        used += size
    return files


def save_checkpoint(params, cfg: ModelConfig, out_dir: str | Path, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Writes `out_dir` as a transformers checkpoint (config.json, float32 safetensors,
    the tokenizer.model when given); replaces an existing out_dir only once complete."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    out_dir = Path(out_dir).absolute()
    layouts = tensor_layouts(cfg)
    flat = traverse_util.flatten_dict(params)
    # Unrolled path -> (our path, layer index or None): a stacked param is sliced on its
    # devices one layer at a time, so no host ever holds all layers of it.
    where = {p: (path, None if p == path else i)
             for path, unrolled in _sources(flat, cfg).items() for i, p in enumerate(unrolled)}
    _check_tree(where, layouts, "params to export")

    def shape_of(p):  # one layer's shape; a stacked param must hold exactly n_layers
        path, i = where[p]
        shape = tuple(flat[path].shape)
        return shape if i is None or shape[:1] != (cfg.n_layers,) else shape[1:]

    def param_at(p):
        path, i = where[p]
        return flat[path] if i is None else flat[path][i]

    by_key: dict[str, list] = {}
    for path, layout in layouts.items():
        if shape_of(path) != layout.shape:
            raise HFCheckpointError(f"params to export: {'/'.join(where[path][0])} has shape "
                                    f"{tuple(flat[where[path][0]].shape)}; the model config "
                                    f"implies {layout.shape}"
                                    + (" per layer" if where[path][1] is not None else ""))
        by_key.setdefault(layout.key, []).append((path, layout))
    sizes = {k: 4 * math.prod(shape) for k, shape in stored_shapes(layouts).items()}
    files = _plan_files(sizes, max_shard_bytes)
    names = ([WEIGHTS_FILE] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    writer = jax.process_index() == 0
    special = {}
    if tokenizer is not None:
        special = {f"{k}_id": v if v >= 0 else None for k, v in
                   (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))}
    tmp = None
    if writer:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name, keys in zip(names, files):
            # Gathered one tensor at a time; the host holds at most one file's tensors.
            tensors = {key: _stored_tensor(by_key[key], param_at) for key in keys}
            if writer:
                save_file(tensors, tmp / name, metadata={"format": "pt"})
            del tensors
        if writer:
            if len(files) > 1:
                index = {"metadata": {"total_size": sum(sizes.values())},
                         "weight_map": {k: n for n, keys in zip(names, files) for k in keys}}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            hf = config_to_hf(cfg, **special)
            (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                shutil.copyfile(tokenizer.path, tmp / SP_TOKENIZER_FILE)
            _swap_into_place(tmp, out_dir)
    except BaseException:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp)
        raise
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Renames the complete `tmp` to `out_dir`; an older out_dir is moved aside first and
    deleted only after the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def load_tokenizer(hf_dir: str | Path) -> Tokenizer:
    """The checkpoint's sentencepiece tokenizer.model. A Hugging Face tokenizer.json (GPT-2's
    byte-level BPE and most newer models) is not converted: this says so instead."""
    hf_dir = Path(hf_dir)
    model_file = hf_dir / SP_TOKENIZER_FILE
    if model_file.is_file():
        return Tokenizer.load(model_file)
    if (hf_dir / "tokenizer.json").is_file():
        raise HFCheckpointError(
            f"{hf_dir}: has only tokenizer.json (a Hugging Face tokenizers file); instructjax "
            f"reads sentencepiece {SP_TOKENIZER_FILE} files and does not convert tokenizer.json. "
            "Provide a sentencepiece model whose ids match the checkpoint's vocabulary.")
    raise FileNotFoundError(f"{hf_dir}: no {SP_TOKENIZER_FILE} (sentencepiece) tokenizer found")
