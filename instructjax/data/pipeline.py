"""grain input pipelines: packed language-model batches, prompt-masked SFT batches and
K-way comparison batches for the reward model (`comparison_batches`, keys below).

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

import json

import grain
import numpy as np
from absl import logging
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from instructjax.data.comparisons import to_comparison
from instructjax.data.jsonl import DataError
from instructjax.data.tokenizer import Tokenizer

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class WithTokenizer:
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


class EncodeDocument(WithTokenizer):
    """{'text'} -> {'inputs','targets'}: the document's tokens + EOS, shifted by one."""

    def __call__(self, record):
        ids = self.tokenizer.encode(record["text"]) + [self.tokenizer.eos_id]
        ids = np.asarray(ids, np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}


class EncodeDemonstration(WithTokenizer):
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


def host_records(source, *, seed, shard_index, shard_count, num_epochs, shuffle):
    """This host's shard of the records, reshuffled every epoch."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"{source!r}: shard {shard_index} of {shard_count} has no examples; "
                        "the dataset is empty or smaller than the number of hosts")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def _examples(source, encode, **host_kwargs):
    return host_records(source, **host_kwargs).map(encode).filter(_has_targets).to_iter_dataset()


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


# ----------------------------------------------------------------------------- comparisons

COMPARISON_BATCH_KEYS = ("tokens_BxKxT", "positions_BxKxT", "segment_ids_BxKxT", "rank_BxK",
                         "valid_BxK", "truncated_BxK", "response_start_BxK")


class EncodeComparison(WithTokenizer):
    """One comparison (prompt, K responses, ranking) -> K rows of prompt + response + EOS.

    Rows are right-padded with pad_id to seq_len and slots K..k_max-1 are empty (all
    padding, valid 0, rank k_max). A response that does not fit is cut at seq_len and has
    no EOS (the reward is then read at its last kept token, like any sequence); such rows
    are marked in `truncated_BxK` (sum it for a metric) and counted in `self.truncated`. A prompt that leaves no room
    for a single response token is a DataError naming the example's origin file:line.
    """

    def __init__(self, tokenizer_path, seq_len: int, k_max: int):
        super().__init__(tokenizer_path)
        self.seq_len, self.k_max = seq_len, k_max
        self.truncated = 0

    def __call__(self, record):
        tok, seq_len, k_max = self.tokenizer, self.seq_len, self.k_max
        origin = record.get("origin", "<input>")
        fields = {k: v for k, v in record.items() if k not in ("origin", "meta")}
        for k in ("responses", "ranking"):  # stored as JSON text by the tfds builder
            if isinstance(fields.get(k), str):
                try:
                    fields[k] = json.loads(fields[k])
                except json.JSONDecodeError:
                    raise DataError(f"{origin}: field {k!r} is neither a list nor a JSON "
                                    f"list: {fields[k]!r:.60}") from None
        comparison = to_comparison(fields, origin)
        responses, ranking = comparison["responses"], comparison["ranking"]
        if len(responses) > k_max:
            raise DataError(f"{origin}: {len(responses)} responses, more than k_max={k_max}; "
                            "raise k_max or split the ranking")
        prompt = tok.encode(comparison["prompt"])
        if len(prompt) >= seq_len:
            raise DataError(
                f"{origin}: the prompt is {len(prompt)} tokens, which leaves no room for a "
                f"response in --seq_len={seq_len}; shorten the prompt or raise --seq_len")
        tokens = np.full((k_max, seq_len), tok.pad_id, np.int32)
        positions = np.zeros((k_max, seq_len), np.int32)
        segment_ids = np.zeros((k_max, seq_len), np.int32)
        truncated = np.zeros(k_max, np.int32)
        start = np.zeros(k_max, np.int32)
        start[:len(responses)] = len(prompt)  # the column of each response's first token
        for k, response in enumerate(responses):
            ids = prompt + tok.encode(response) + [tok.eos_id]
            if len(ids) > seq_len:
                if self.truncated == 0:
                    logging.warning("%s: response truncated to fit --seq_len=%d, without EOS "
                                    "(counted; further truncations are not logged)", origin,
                                    seq_len)
                self.truncated += 1
                truncated[k] = 1
                ids = ids[:seq_len]
            tokens[k, :len(ids)] = ids
            positions[k, :len(ids)] = np.arange(len(ids))
            segment_ids[k, :len(ids)] = 1
        rank = np.full(k_max, k_max, np.int32)
        rank[ranking] = np.arange(len(ranking))
        valid = (np.arange(k_max) < len(responses)).astype(np.int32)
        return {"tokens_BxKxT": tokens, "positions_BxKxT": positions,
                "segment_ids_BxKxT": segment_ids, "rank_BxK": rank, "valid_BxK": valid,
                "truncated_BxK": truncated, "response_start_BxK": start}


class PadBatch:
    """A final, partial batch -> batch_size elements (the extra ones empty: valid 0)."""

    def __init__(self, batch_size: int, k_max: int):
        self.batch_size, self.k_max = batch_size, k_max

    def __call__(self, batch):
        missing = self.batch_size - len(batch["valid_BxK"])
        if missing == 0:
            return batch
        out = {}
        for key, value in batch.items():
            fill = self.k_max if key == "rank_BxK" else 0
            pad = np.full((missing, *value.shape[1:]), fill, value.dtype)
            out[key] = np.concatenate([value, pad])
        return out


def comparison_batches(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                       k_max: int = 9, shuffle: bool = True, seed: int = 0,
                       shard_index: int = 0, shard_count: int = 1,
                       num_epochs: int | None = None,
                       drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of K-way comparisons for the reward model; all K responses of one prompt are
    in one batch element. Each batch is a dict of numpy arrays:

      tokens_BxKxT int32       prompt + response_k + EOS, right-padded with pad_id
      positions_BxKxT int32    0, 1, ... on real tokens, 0 on padding
      segment_ids_BxKxT int32  1 on real tokens, 0 on padding (empty slots: all 0)
      rank_BxK int32           place of response k in the ranking (0 = best); k_max if empty
      valid_BxK int32          1 for real responses, 0 for the empty slots K..k_max-1
      truncated_BxK int32      1 where the response was cut at seq_len (no EOS)
      response_start_BxK int32 column of response k's first token (the prompt's length;
                               0 for empty slots): the 'pooled' reward read needs it

    `source` holds records with "prompt", "responses" and "ranking" (lists, or JSON text as
    stored by the "comparison" tfds kind; pairwise records are converted as in
    instructjax.data.comparisons) and optionally "origin" for error messages. The
    iterator is checkpointable (get_state/set_state); each host reads shard
    `shard_index` of `shard_count`; every epoch is reshuffled (seeded). With
    drop_remainder=False (evaluation, num_epochs=1) the last batch is padded with empty
    elements (valid all 0) so every batch has the same shape.
    """
    if k_max < 2:
        raise ValueError(f"k_max must be at least 2, got {k_max}")
    ds = host_records(source, seed=seed, shard_index=shard_index, shard_count=shard_count,
                       num_epochs=num_epochs, shuffle=shuffle)
    ds = ds.map(EncodeComparison(tokenizer.path, seq_len, k_max))
    ds = ds.to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder)
    return ds if drop_remainder else ds.map(PadBatch(batch_size, k_max))
