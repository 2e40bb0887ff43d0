"""Preference pairs from K-way comparisons, and the grain pipeline of DPO batches.

A comparison ({prompt, responses, ranking}, ranking best first; see
instructjax.data.comparisons) becomes pairs (chosen, rejected) of DISTINCT response texts.
Model samples repeat, and a repeated text may be ranked twice (labeler noise); each text
keeps its best place and the copies are dropped, so no pair compares a text with itself
(its DPO margin is 0 whatever the params: loss log 2, no gradient, a wrong "accuracy").
With the distinct texts in ranking order d_0 > d_1 > ... > d_{m-1}, `mode` picks:

  "all"         every (d_i, d_j), i < j: C(m, 2) pairs, the reward model's data
  "best"        (d_0, d_j) for j >= 1: m - 1 pairs
  "best_worst"  (d_0, d_{m-1}): one pair per comparison, the largest ranking gap

Comparisons with fewer than two distinct texts give no pair. Pairs are shuffled as
separate examples, so the pairs of one prompt spread over an epoch ("all" repeats each text
m - 1 times per epoch; InstructGPT saw its RM overfit that way, hence the other modes).

Batch keys, each a numpy array (per example, without the leading B):
  {chosen,rejected}_tokens_BxT int32       prompt + response + EOS, right-padded with pad_id
  {chosen,rejected}_positions_BxT int32    0, 1, ... on real tokens, 0 on padding
  {chosen,rejected}_segment_ids_BxT int32  1 on real tokens, 0 on padding
  {chosen,rejected}_loss_mask_BxT float32  1 on response tokens and EOS (target alignment:
                                           column t scores tokens[t]); prompt/padding 0
  valid_B int32                            0 for rows that only pad the last eval batch
A response that does not fit is cut at seq_len (no EOS), counted in `EncodePair.truncated`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

from instructjax.data.comparisons import to_comparison
from instructjax.data.jsonl import DataError
from instructjax.data.pipeline import host_records, WithTokenizer
from instructjax.data.tokenizer import Tokenizer

PAIR_MODES = ("all", "best", "best_worst")
SIDES = ("chosen", "rejected")
ROW_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
PAIR_BATCH_KEYS = tuple(f"{s}_{k}_BxT" for s in SIDES for k in ROW_KEYS) + ("valid_B",)


def preference_pairs(responses: Sequence[str], ranking: Sequence[int], mode: str = "all"
                     ) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs into `responses`, per the module docstring."""
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode must be one of {PAIR_MODES}, got {mode!r}")
    seen, distinct = set(), []  # indices of distinct texts, best first
    for index in ranking:
        if responses[index] not in seen:
            seen.add(responses[index])
            distinct.append(index)
    if len(distinct) < 2:
        return []
    if mode == "all":
        return [(w, l) for i, w in enumerate(distinct) for l in distinct[i + 1:]]
    if mode == "best":
        return [(distinct[0], l) for l in distinct[1:]]
    return [(distinct[0], distinct[-1])]


def decode_comparison(record: dict) -> dict:
    """A source record (tfds stores responses/ranking as JSON text) -> validated comparison."""
    origin = record.get("origin", "<input>")
    fields = {k: v for k, v in record.items() if k not in ("origin", "meta")}
    for k in ("responses", "ranking"):
        if isinstance(fields.get(k), str):
            try:
                fields[k] = json.loads(fields[k])
            except json.JSONDecodeError:
                raise DataError(f"{origin}: field {k!r} is neither a list nor a JSON list: "
                                f"{fields[k]!r:.60}") from None
    return to_comparison(fields, origin)


class PairSource(Sequence):
    """Random access to the preference pairs of a comparison source: item i is
    {'prompt', 'chosen', 'rejected', 'origin'}. The pair index (record, chosen, rejected)
    is built by one pass over the source, the same on every host."""

    def __init__(self, source, mode: str = "all"):
        self.source, self.mode = source, mode
        index = []
        for r in range(len(source)):
            comparison = decode_comparison(source[r])
            index += [(r, w, l) for w, l in preference_pairs(
                comparison["responses"], comparison["ranking"], mode)]
        self.index = np.asarray(index, np.int64).reshape(-1, 3)
        self.comparisons = len(source)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        r, w, l = (int(x) for x in self.index[i])
        record = self.source[r]
        comparison = decode_comparison(record)
        return {"prompt": comparison["prompt"], "chosen": comparison["responses"][w],
                "rejected": comparison["responses"][l],
                "origin": record.get("origin", "<input>")}

    def __repr__(self) -> str:
        return f"PairSource({len(self)} {self.mode!r} pairs of {self.comparisons} comparisons)"


class EncodePair(WithTokenizer):
    """{'prompt','chosen','rejected'} -> the per-example arrays of the module docstring."""

    def __init__(self, tokenizer_path, seq_len: int):
        super().__init__(tokenizer_path)
        self.seq_len = seq_len
        self.truncated = 0

    def __call__(self, pair):
        tok, T = self.tokenizer, self.seq_len
        origin = pair.get("origin", "<input>")
        prompt = tok.encode(pair["prompt"])
        if len(prompt) >= T:
            raise DataError(f"{origin}: the prompt is {len(prompt)} tokens, which leaves no room "
                            f"for a response in --seq_len={T}; shorten the prompt or raise "
                            "--seq_len")
        out = {"valid_B": np.int32(1)}
        for side in SIDES:
            ids = prompt + tok.encode(pair[side]) + [tok.eos_id]
            if len(ids) > T:
                if self.truncated == 0:
                    logging.warning("%s: response truncated to fit --seq_len=%d, without EOS "
                                    "(counted; further truncations are not logged)", origin, T)
                self.truncated += 1
                ids = ids[:T]
            n = len(ids)
            tokens = np.full(T, tok.pad_id, np.int32)
            tokens[:n] = ids
            # Column 0 is never a target, so an empty prompt still scores from token 1.
            mask = np.zeros(T, np.float32)
            mask[max(len(prompt), 1):n] = 1.0
            out[f"{side}_tokens_BxT"] = tokens
            out[f"{side}_positions_BxT"] = np.where(np.arange(T) < n, np.arange(T), 0
                                                    ).astype(np.int32)
            out[f"{side}_segment_ids_BxT"] = (np.arange(T) < n).astype(np.int32)
            out[f"{side}_loss_mask_BxT"] = mask
        return out


class PadPairs:
    """A final, partial batch -> batch_size rows; the extra rows are all zero (valid_B 0)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, batch):
        missing = self.batch_size - len(batch["valid_B"])
        if missing == 0:
            return batch
        return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()}


def pair_batches(pairs: PairSource, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 shuffle: bool = True, seed: int = 0, shard_index: int = 0,
                 shard_count: int = 1, num_epochs: int | None = None,
                 drop_remainder: bool = True) -> grain.IterDataset:
    """Fixed-shape DPO batches over `pairs` (keys in the module docstring). Each host reads
    shard `shard_index` of `shard_count`; every epoch is reshuffled (seeded); `iter()` gives
    a checkpointable iterator (get_state/set_state). drop_remainder=False (evaluation,
    num_epochs=1) pads the last batch with valid_B == 0 rows."""
    if len(pairs) == 0:
        raise DataError(f"{pairs!r}: no preference pairs (every comparison has fewer than two "
                        "distinct responses)")
    ds = host_records(pairs, seed=seed, shard_index=shard_index, shard_count=shard_count,
                       num_epochs=num_epochs, shuffle=shuffle)
    ds = ds.map(EncodePair(tokenizer.path, seq_len)).to_iter_dataset()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds if drop_remainder else ds.map(PadPairs(batch_size))
