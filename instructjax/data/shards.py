"""Data shards that do not depend on the number of processes.

The records are split into `num_shards` shards (shard s holds records s::num_shards) and
every shard is its own pipeline producing batch_size / num_shards rows per step. Each
process reads a contiguous block of shards, and the global batch is the shards' rows in
shard order. So the data a run sees, and therefore its result, is the same whether 1 or 8
processes read it, and a checkpoint written by P processes resumes on any P' that divides
num_shards. The iterator state saved in a checkpoint holds every shard's position,
gathered from all processes (process 0 writes the checkpoint's JSON).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from instructjax.config import ConfigError


def resolve(num_shards: int) -> int:
    """--data_shards (0 = one per process), checked against the number of processes."""
    processes = jax.process_count()
    num_shards = num_shards or processes
    if num_shards % processes:
        raise ConfigError(f"--data_shards={num_shards} must be a multiple of the {processes} "
                          "processes (each process reads the same number of shards)")
    return num_shards


def owned(num_shards: int) -> range:
    """The shards this process reads."""
    per_process = num_shards // jax.process_count()
    start = jax.process_index() * per_process
    return range(start, start + per_process)


def split_rows(rows: int, num_shards: int, what: str) -> int:
    if rows % num_shards:
        raise ConfigError(f"{what} ({rows}) must be divisible by the {num_shards} data shards "
                          "(--data_shards, default one per process)")
    return rows // num_shards


def _concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _allgather_json(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(len(data)))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


class ShardedIterator:
    """This process's shards as one checkpointable iterator of its share of each global batch.

    get_state is a collective (every process calls it at the same step, as checkpoint saves
    are); it returns all shards' states. set_state takes the states of this process's shards.
    """

    def __init__(self, make: Callable[[int], Any], num_shards: int):
        self.num_shards = num_shards
        self._iters = {s: iter(make(s)) for s in owned(num_shards)}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return _concat([next(it) for it in self._iters.values()])

    def get_state(self) -> dict[str, Any]:
        local = {str(s): it.get_state() for s, it in self._iters.items()}
        shards = {}
        for part in _allgather_json(local):
            shards.update(part)
        return {"num_shards": self.num_shards, "shards": shards}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("num_shards") != self.num_shards:
            found = state.get("num_shards") if isinstance(state, dict) else None
            raise ConfigError(f"the checkpoint's data position is for {found} data shards, this "
                              f"run reads {self.num_shards}: resume with --data_shards={found}")
        for s, it in self._iters.items():
            it.set_state(state["shards"][str(s)])


def eval_batches(make: Callable[[int], Sequence[dict[str, np.ndarray]]], num_shards: int
                 ) -> list[dict[str, np.ndarray]]:
    """This process's share of every evaluation batch. Shards may hold different numbers of
    batches; the shorter ones are filled with all-zero batches up to the longest shard of all
    processes, so every process runs the same number of steps. Zeros are padding in every
    batch layout here (segment id 0, loss mask 0, valid 0): they count for nothing."""
    per_shard = {s: list(make(s)) for s in owned(num_shards)}
    longest = max(_allgather_json(max(len(b) for b in per_shard.values())))
    template = next(b[0] for b in per_shard.values() if b)
    for batches in per_shard.values():
        batches += [{k: np.zeros_like(v) for k, v in template.items()}
                    for _ in range(longest - len(batches))]
    return [_concat([per_shard[s][i] for s in per_shard]) for i in range(longest)]

