"""The unbiased pass@k estimator of the Codex paper (Chen et al., 2021, eq. 1).

For one problem with n samples of which c pass the unit tests,

    pass@k = 1 - C(n - c, k) / C(n, k)
           = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

is the probability that at least one of k samples drawn without replacement from the n
passes. The product form needs no binomial coefficient (those overflow float64 near
n = 1030) and every factor lies in [0, 1), so it is stable for n in the tens of thousands.
Equivalently, 1 - exp(sum log1p(-k / i)); we evaluate the product in log space with
log1p, which keeps full relative precision when pass@k is close to 0 or 1.

k > n: the estimator is undefined (one cannot draw k of n samples). `pass_at_k` returns
NaN for such problems; `mean_pass_at_k` raises `ValueError` unless told to skip them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_int_array(name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold whole numbers, got {value!r}")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def pass_at_k(n, c, k: int) -> np.ndarray:
    """Per-problem unbiased pass@k.

    Args:
      n: samples per problem, an int or an integer array of shape [P] (may differ per problem).
      c: passing samples per problem, same shape as n (0 <= c <= n).
      k: the k of pass@k, an int >= 1.

    Returns:
      float64 array of shape [P] (or a 0-d array for scalar inputs). Problems with k > n
      get NaN (undefined; see the module docstring).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    n = _as_int_array("n", n)
    c = _as_int_array("c", c)
    if n.shape != c.shape:
        raise ValueError(f"n and c must have the same shape, got {n.shape} and {c.shape}")
    if np.any(n < 1):
        raise ValueError("every problem needs n >= 1 samples")
    if np.any((c < 0) | (c > n)):
        raise ValueError("need 0 <= c <= n for every problem")
    k = int(k)
    flat_n, flat_c = n.reshape(-1), c.reshape(-1)
    out = np.zeros(flat_n.shape, dtype=np.float64)
    out[flat_n - flat_c < k] = 1.0  # every k-subset holds a passing sample
    out[k > flat_n] = np.nan
    rows = np.flatnonzero((flat_n - flat_c >= k) & (flat_c > 0))
    if rows.size:
        # Chunks of rows keep the zero-padded [rows, max c] block of factors near 4M floats.
        per_chunk = max(1, _BLOCK // int(flat_c[rows].max()))
        for start in range(0, rows.size, per_chunk):
            chunk = rows[start:start + per_chunk]
            width = int(flat_c[chunk].max())
            t = np.arange(width, dtype=np.float64)[None, :]
            first = (flat_n[chunk] - flat_c[chunk] + 1).astype(np.float64)[:, None]
            factors = np.log1p(-k / (first + t))  # every i >= n - c + 1 > k: finite
            factors[t >= flat_c[chunk][:, None]] = 0.0  # padding past this row's c
            log_fail = factors.sum(axis=1)  # log C(n-c,k)/C(n,k); numpy sums pairwise
            out[chunk] = -np.expm1(log_fail)
    return out.reshape(n.shape)


_BLOCK = 1 << 22


def mean_pass_at_k(n, c, ks: Sequence[int], *, skip_undefined: bool = False) -> dict[int, float]:
    """Mean over problems of pass@k, for each k in ks.

    A k larger than some problem's n raises ValueError, or, with skip_undefined=True, is
    left out of the result (callers report which k were skipped).
    """
    n = _as_int_array("n", n).reshape(-1)
    c = _as_int_array("c", c).reshape(-1)
    if n.size == 0:
        raise ValueError("no problems to score")
    result: dict[int, float] = {}
    for k in ks:
        per_problem = pass_at_k(n, c, k)
        if np.any(np.isnan(per_problem)):
            if skip_undefined:
                continue
            raise ValueError(f"pass@{k} is undefined: some problems have fewer than {k} "
                             f"samples (min n = {int(n.min())})")
        result[int(k)] = float(np.mean(per_problem))
    return result


def parse_ks(text: str) -> tuple[int, ...]:
    """Parses "1,10,100" into (1, 10, 100); raises ValueError for k <= 0 or junk."""
    ks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            k = int(part)
        except ValueError:
            raise ValueError(f"k values must be integers, got {part!r}") from None
        if k <= 0:
            raise ValueError(f"k values must be >= 1, got {k}")
        ks.append(k)
    if not ks:
        raise ValueError("give at least one k value")
    return tuple(sorted(set(ks)))


def counts_by_problem(task_ids: Sequence[str], passed: Sequence[bool]
                      ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(task ids in first-seen order, n per task, c per task) from per-sample outcomes."""
    if len(task_ids) != len(passed):
        raise ValueError(f"{len(task_ids)} task ids but {len(passed)} outcomes")
    index: dict[str, int] = {}
    n: list[int] = []
    c: list[int] = []
    for task_id, ok in zip(task_ids, passed):
        j = index.setdefault(task_id, len(index))
        if j == len(n):
            n.append(0)
            c.append(0)
        n[j] += 1
        c[j] += bool(ok)
    return list(index), np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64)


def summarize(task_ids: Sequence[str], labels: Sequence[str], ks: Sequence[int], *,
              passed_label: str = "passed", all_labels: Sequence[str] = ()) -> dict:
    """The pass@k summary of per-sample outcomes (one task id and label per sample).

    k values above the fewest samples any problem has are skipped, with a note saying so.
    `all_labels` pre-fills label_counts with zeros so every label shows.
    """
    if len(task_ids) != len(labels):
        raise ValueError(f"{len(task_ids)} task ids but {len(labels)} labels")
    if not len(task_ids):
        raise ValueError("no samples to score")
    ids, n, c = counts_by_problem(task_ids, [label == passed_label for label in labels])
    means = mean_pass_at_k(n, c, ks, skip_undefined=True)
    counts = {label: 0 for label in all_labels}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return {
        "pass_at_k": {str(k): v for k, v in means.items()},
        "skipped_k": {str(k): f"needs >= {k} samples per problem; the fewest is {int(n.min())}"
                      for k in ks if k not in means},
        "num_problems": len(ids), "num_samples": len(labels),
        "samples_per_problem": {"min": int(n.min()), "max": int(n.max())},
        "label_counts": counts,
    }
