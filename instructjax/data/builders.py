"""tensorflow-datasets builders over local JSONL files, stored as ArrayRecord.

`jsonl_data_source` validates the files (errors name file:line; a split may be several
files, read in order), prepares them once under
`data_dir/<kind>-<content hash>/` and returns random-access sources (tfds.data_source
semantics) that grain reads. The hash covers each file's resolved path and contents, so
changed contents, or the same contents at another path, give a new build.
Each example keeps its origin "path:line" and its other JSON fields as a JSON string
`meta`, so later stages can name the source line of a bad example and read task metadata.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from instructjax import parallel
from instructjax.config import ConfigError, DataConfig
from instructjax.data.comparisons import read_comparisons
from instructjax.data.jsonl import read_jsonl

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "sft": ("prompt", "response"),
    "prompt": ("prompt",),
    # K-way rankings (see instructjax.data.comparisons): native, generic pairwise and HH-RLHF
    # lines, detected per line; "responses" and "ranking" are stored as JSON lists.
    "comparison": ("prompt", "responses", "ranking"),
}


Files = Mapping[str, "str | Path | Sequence[str | Path]"]


def split_paths(files: Files) -> dict[str, tuple[Path, ...]]:
    """{split: (path, ...)} from {split: path or sequence of paths}."""
    return {split: tuple(map(Path, [paths] if isinstance(paths, (str, Path)) else paths))
            for split, paths in files.items()}


def _content_hash(files: Mapping[str, tuple[Path, ...]], kind: str) -> str:
    digest = hashlib.sha256(kind.encode())
    for split in sorted(files):
        for path in files[split]:
            # The path too: a build's "origin" fields name the file it was built from.
            digest.update(f"\0{split}\0{path.resolve()}\0".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds  # slow import: only when a dataset is built
    tfds.disable_progress_bar()

    class JsonlDataset(tfds.core.GeneratorBasedBuilder):
        """Examples from local JSONL files: each split one or more files."""
        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, files: Mapping[str, tuple[Path, ...]], kind: str, **kwargs):
            self._files = files
            self._kind = kind
            super().__init__(**kwargs)

        def _info(self):
            names = KIND_FIELDS[self._kind] + ("origin", "meta")
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({n: tfds.features.Text() for n in names}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(paths) for split, paths in self._files.items()}

        def _generate_examples(self, paths):
            # Keys: the line number in the first file, as with one file (tfds orders examples
            # by key), then offset by a billion per further file.
            for i, path in enumerate(paths):
                for line, example in _examples(path, self._kind):
                    yield i * 10**9 + line, example

    return JsonlDataset


def _examples(path: Path, kind: str) -> Iterator[tuple[int, dict]]:
    fields = KIND_FIELDS[kind]
    if kind == "comparison":
        yield from _comparison_examples(path, fields)
        return
    for line, record in read_jsonl(path, required={f: str for f in fields}):
        meta = {k: v for k, v in record.items() if k not in fields}
        example = {f: record[f] for f in fields}
        example.update(origin=f"{path}:{line}", meta=json.dumps(meta, ensure_ascii=False))
        yield line, example


def _comparison_examples(path, fields):
    for line, record in read_comparisons(path):
        meta = {k: v for k, v in record.items() if k not in fields}
        example = {"prompt": record["prompt"],
                   "responses": json.dumps(record["responses"], ensure_ascii=False),
                   "ranking": json.dumps(record["ranking"]),
                   "origin": f"{path}:{line}", "meta": json.dumps(meta, ensure_ascii=False)}
        yield line, example


class DecodedSource(Sequence):
    """A tfds data source whose text features come back as str (tfds gives bytes)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        index, n = operator.index(index), len(self)
        if not -n <= index < n:  # the ArrayRecord source raises ValueError, not IndexError
            raise IndexError(f"index {index} out of range for {n} examples")
        record = self._source[index % n]
        return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"DecodedSource({len(self)} examples)"


def jsonl_data_source(files: Files, *, kind: str,
                      data_dir: str | Path) -> dict[str, DecodedSource]:
    """{split: random-access source of dicts} for JSONL `files` ({split: path or paths})."""
    if kind not in KIND_FIELDS:
        raise ValueError(f"kind must be one of {sorted(KIND_FIELDS)}, got {kind!r}")
    files = split_paths(files)
    for split, paths in files.items():
        if not paths:
            raise ValueError(f"split {split!r} has no files")
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file (split {split!r})")
    builder_dir = Path(data_dir) / f"{kind}-{_content_hash(files, kind)}"
    builder = _builder_class()(files=files, kind=kind, data_dir=str(builder_dir))
    parallel.process_zero_first(lambda: builder.download_and_prepare(file_format="array_record"),
                                str(builder_dir))
    return {split: DecodedSource(builder.as_data_source(split=split)) for split in files}


def world_files(data: DataConfig) -> dict[str, Path]:
    """The embedded world's JSONL files, generated once (deterministically) into data_dir."""
    from instructjax.data import world
    return parallel.process_zero_first(lambda: world.write_world(
        data.data_dir, seed=data.world_seed, n_pretrain_docs=data.world_pretrain_docs,
        n_sft_train=data.world_sft_train, n_sft_eval=data.world_eval,
        n_prompts=data.world_prompts), f"world in {data.data_dir}")


def comparison_files(data_dir: str | Path) -> dict[str, str]:
    """The comparisons stage's files in data_dir (reward model and DPO)."""
    data_dir = Path(data_dir)
    out = {split: data_dir / f"comparisons_{split}.jsonl" for split in ("train", "eval")}
    for path in out.values():
        if not path.exists():
            raise ConfigError(f"{path} not found: run experiments.comparisons with "
                              f"--data_dir={data_dir} first, or pass --train_files/--eval_files")
    return {k: str(v) for k, v in out.items()}
