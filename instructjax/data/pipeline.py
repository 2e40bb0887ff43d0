"""grain input pipelines: packed language-model batches and prompt-masked SFT batches.

Every batch is a dict of numpy arrays with exactly these keys:
  inputs int32 [B,T]     targets int32 [B,T]     positions int32 [B,T]
  segment_ids int32 [B,T] (0 = padding; 1, 2, ... = sequences packed into the row)
  loss_mask float32 [B,T] (1 where the target counts)

Targets are shifted within each document before packing, so no position ever predicts a
token of another document. Iterators are checkpointable (`get_state`/`set_state`, JSON
state); each host reads a disjoint shard (`shard_index`/`shard_count`); shuffling is seeded
and every epoch is reshuffled. The callables below are top-level classes, so grain worker
processes can pickle them.
"""

from __future__ import annotations

import grain
import numpy as np
from absl import logging
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from instructjax.data.jsonl import DataError
from instructjax.data.tokenizer import Tokenizer

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class _WithTokenizer:
    """Loads the tokenizer lazily from its path, so instances pickle to worker processes."""

    def __init__(self, tokenizer_path):
        self.tokenizer_path = str(tokenizer_path)
        self._tokenizer = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "_tokenizer": None}


class EncodeDocument(_WithTokenizer):
    """{'text'} -> {'inputs','targets'}: the document's tokens + EOS, shifted by one."""

    def __call__(self, record):
        ids = self.tokenizer.encode(record["text"]) + [self.tokenizer.eos_id]
        ids = np.asarray(ids, np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}


class EncodeDemonstration(_WithTokenizer):
    """{'prompt','response'} -> inputs/targets/loss_mask of prompt + response + EOS, with
    the loss on the response tokens and the EOS only."""

    def __init__(self, tokenizer_path, seq_len: int):
        super().__init__(tokenizer_path)
        self.seq_len = seq_len
        self.truncated = 0

    def __call__(self, record):
        tok = self.tokenizer
        prompt = tok.encode(record["prompt"])
        response = tok.encode(record["response"]) + [tok.eos_id]
        if len(prompt) >= self.seq_len:
            raise DataError(
                f"{record.get('origin', '<input>')}: the prompt is {len(prompt)} tokens, which "
                f"leaves no room for a response in --seq_len={self.seq_len}; shorten the prompt "
                "or raise --seq_len")
        ids = np.asarray(prompt + response, np.int32)
        if len(ids) > self.seq_len + 1:
            if self.truncated == 0:
                logging.warning("%s: response truncated to fit --seq_len=%d (counted; "
                                "further truncations are not logged)", record.get("origin"),
                                self.seq_len)
            self.truncated += 1
            ids = ids[: self.seq_len + 1]
        mask = (np.arange(len(ids) - 1) >= len(prompt) - 1).astype(np.float32)
        return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask}


def _has_targets(example) -> bool:
    return len(example["targets"]) > 0


class FromPacked:
    """grain's packed features -> the batch format above."""

    def __call__(self, packed):
        segment_ids = packed["inputs_segment_ids"].astype(np.int32)
        mask = (segment_ids > 0).astype(np.float32)
        if "loss_mask" in packed:
            mask = mask * packed["loss_mask"].astype(np.float32)
        return {"inputs": packed["inputs"].astype(np.int32),
                "targets": packed["targets"].astype(np.int32),
                "positions": packed["inputs_positions"].astype(np.int32),
                "segment_ids": segment_ids, "loss_mask": mask}


class PadOne:
    """One example -> a row padded to seq_len (segment id 1 on real tokens)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, example):
        n, pad = len(example["inputs"]), self.seq_len - len(example["inputs"])
        mask = example.get("loss_mask", np.ones(n, np.float32))
        return {"inputs": np.pad(example["inputs"], (0, pad)),
                "targets": np.pad(example["targets"], (0, pad)),
                "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
                "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
                "loss_mask": np.pad(mask.astype(np.float32), (0, pad))}


def _examples(source, encode, *, seed, shard_index, shard_count, num_epochs, shuffle):
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"{source!r}: shard {shard_index} of {shard_count} has no examples; "
                        "the dataset is empty or smaller than the number of hosts")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs).map(encode).filter(_has_targets).to_iter_dataset()


def lm_dataset(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
               shuffle: bool = True) -> grain.IterDataset:
    """Documents concatenated then split into rows of seq_len (a long document continues in
    the next row as a new segment, positions restarting at 0)."""
    ds = _examples(source, EncodeDocument(tokenizer.path), seed=seed, shard_index=shard_index,
                   shard_count=shard_count, num_epochs=num_epochs, shuffle=shuffle)
    ds = ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})
    return ds.map(FromPacked()).batch(batch_size, drop_remainder=True)


def sft_dataset(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                shuffle: bool = True, pack: bool = True) -> grain.IterDataset:
    """Demonstrations, packed first-fit into rows of seq_len (or one per row)."""
    ds = _examples(source, EncodeDemonstration(tokenizer.path, seq_len), seed=seed,
                   shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                   shuffle=shuffle)
    if pack:
        ds = FirstFitPackIterDataset(
            ds, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
            num_packing_bins=batch_size, seed=seed, shuffle_bins=shuffle).map(FromPacked())
    else:
        ds = ds.map(PadOne(seq_len))
    return ds.batch(batch_size, drop_remainder=True)


def eval_batches(source, tokenizer: Tokenizer, *, kind: str, seq_len: int, batch_size: int,
                 shard_index: int = 0, shard_count: int = 1) -> list[dict[str, np.ndarray]]:
    """One deterministic pass with fixed shapes: the last batch is padded with empty rows."""
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=0, shard_index=shard_index,
                  shard_count=shard_count, num_epochs=1, shuffle=False)
    if kind == "lm":
        ds = _examples(source, EncodeDocument(tokenizer.path), seed=0, shard_index=shard_index,
                       shard_count=shard_count, num_epochs=1, shuffle=False)
        ds = ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})
        rows = list(ds.map(FromPacked()))
    elif kind == "sft":
        ds = sft_dataset(source, tokenizer, **{**common, "batch_size": 1}, pack=False)
        rows = [{k: v[0] for k, v in b.items()} for b in ds]
    else:
        raise ValueError(f"kind must be 'lm' or 'sft', got {kind!r}")
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: np.stack([r[k] for r in chunk]) for k in BATCH_KEYS}
        missing = batch_size - len(chunk)
        if missing:
            batch = {k: np.concatenate([v, np.zeros((missing, seq_len), v.dtype)])
                     for k, v in batch.items()}
        batches.append(batch)
    return batches
