"""Packed K-way comparison batches for the reward model.

A prompt + response sequence averages ~40 tokens in the demo, while the padded layout
[B, k_max, seq_len] reserves k_max * seq_len per prompt: ~85% of its compute is padding.
Here the sequences of whole prompts are packed first-fit into a fixed [rows, seq_len]
block (segment ids keep them apart; positions restart per sequence); `reward_index_BxK`
points at each response's last real token in the flattened block and `response_start_BxK`
at its first response token (after the prompt). A batch holds as many whole prompts as
fit, up to `max_prompts`, so all K responses of a prompt stay in one batch element and
every response still gets exactly one forward pass. Keys:

  tokens_RxT, positions_RxT, segment_ids_RxT int32   the packed block (segment 0 = padding)
  reward_index_BxK int32  flat index r * seq_len + t of response k's last token, over the
                          GLOBAL block (this host's rows follow the rows of lower hosts)
  response_start_BxK int32  flat index of response k's first token (after its prompt), over
                          the same global block (the 'pooled' reward read)
  rank_BxK, valid_BxK, truncated_BxK int32   as in pipeline.comparison_batches
"""

from __future__ import annotations

import grain
import numpy as np

from instructjax.data.jsonl import DataError
from instructjax.data.pipeline import EncodeComparison, host_records

PACKED_COMPARISON_KEYS = ("tokens_RxT", "positions_RxT", "segment_ids_RxT", "reward_index_BxK",
                          "response_start_BxK", "rank_BxK", "valid_BxK", "truncated_BxK")


def _first_fit(lengths: list[int], fill: np.ndarray, seq_len: int) -> list[int] | None:
    """A row for each sequence (longest placed first) given the rows' current `fill`, or
    None if they do not all fit."""
    trial = fill.copy()
    rows = [0] * len(lengths)
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        free = np.nonzero(trial + lengths[k] <= seq_len)[0]
        if len(free) == 0:
            return None
        rows[k] = int(free[0])
        trial[rows[k]] += lengths[k]
    return rows


class _PackedIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, *, rows: int, seq_len: int,
                 max_prompts: int, k_max: int, row_offset: int, pad_id: int):
        super().__init__(parent)
        self.rows, self.seq_len, self.max_prompts, self.k_max = rows, seq_len, max_prompts, k_max
        self.row_offset, self.pad_id = row_offset, pad_id
        # A record read but not yet placed (it did not fit): the state to restore is the
        # parent's state from before reading it, so a restored iterator reads it again.
        self._pending = None
        self._state_before_pending = None

    def _next_record(self):
        if self._pending is None:
            state = self._parent.get_state()
            self._pending = next(self._parent)
            self._state_before_pending = state
        return self._pending

    def __next__(self):
        R, T, B, K = self.rows, self.seq_len, self.max_prompts, self.k_max
        tokens = np.full((R, T), self.pad_id, np.int32)
        positions = np.zeros((R, T), np.int32)
        segment_ids = np.zeros((R, T), np.int32)
        index = np.zeros((B, K), np.int32)
        response_start = np.zeros((B, K), np.int32)
        rank = np.full((B, K), K, np.int32)
        valid = np.zeros((B, K), np.int32)
        truncated = np.zeros((B, K), np.int32)
        fill = np.zeros(R, np.int64)
        segments = np.zeros(R, np.int32)
        b = 0
        while b < B:
            try:
                record = self._next_record()
            except StopIteration:
                break
            lengths = record["segment_ids_BxKxT"].sum(-1)
            live = [k for k in range(K) if record["valid_BxK"][k]]
            placed = _first_fit([int(lengths[k]) for k in live], fill, T)
            if placed is None:
                if b == 0:
                    raise DataError(
                        f"one prompt's {len(live)} responses ({int(lengths.sum())} tokens) do "
                        f"not fit into --pack_rows={R} rows of --seq_len={T}; raise --pack_rows")
                break
            for k, r in zip(live, placed):
                n, start = int(lengths[k]), int(fill[r])
                segments[r] += 1
                tokens[r, start:start + n] = record["tokens_BxKxT"][k, :n]
                positions[r, start:start + n] = np.arange(n)
                segment_ids[r, start:start + n] = segments[r]
                index[b, k] = (self.row_offset + r) * T + start + n - 1
                response_start[b, k] = ((self.row_offset + r) * T + start
                                        + int(record["response_start_BxK"][k]))
                fill[r] += n
            rank[b], valid[b], truncated[b] = (record["rank_BxK"], record["valid_BxK"],
                                               record["truncated_BxK"])
            self._pending = None
            b += 1
        if b == 0:
            raise StopIteration
        return {"tokens_RxT": tokens, "positions_RxT": positions,
                "segment_ids_RxT": segment_ids, "reward_index_BxK": index,
                "response_start_BxK": response_start, "rank_BxK": rank,
                "valid_BxK": valid, "truncated_BxK": truncated}

    def get_state(self):
        parent = (self._state_before_pending if self._pending is not None
                  else self._parent.get_state())
        return {"parent": parent}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = None


class _PackedDataset(grain.IterDataset):

    def __init__(self, parent: grain.IterDataset, **kwargs):
        super().__init__(parent)
        self.kwargs = kwargs

    def __iter__(self):
        return _PackedIterator(self._parent.__iter__(), **self.kwargs)


def packed_comparison_batches(source, tokenizer, *, seq_len: int, rows: int, max_prompts: int,
                              k_max: int = 9, shuffle: bool = True, seed: int = 0,
                              shard_index: int = 0, shard_count: int = 1,
                              num_epochs: int | None = None) -> grain.IterDataset:
    """Batches of up to `max_prompts` whole comparisons packed into [rows, seq_len] per host
    (keys in the module docstring). The iterator is checkpointable; the last batch of a
    finite pass is partial (valid 0 on the missing prompts), never dropped."""
    if rows < 1 or max_prompts < 1:
        raise ValueError(f"rows and max_prompts must be >= 1, got {rows}, {max_prompts}")
    ds = host_records(source, seed=seed, shard_index=shard_index, shard_count=shard_count,
                       num_epochs=num_epochs, shuffle=shuffle)
    ds = ds.map(EncodeComparison(tokenizer.path, seq_len, k_max)).to_iter_dataset()
    return _PackedDataset(ds, rows=rows, seq_len=seq_len, max_prompts=max_prompts, k_max=k_max,
                          row_offset=shard_index * rows, pad_id=tokenizer.pad_id)
