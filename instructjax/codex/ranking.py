"""Picking one of n samples per problem (Codex paper, Figure 1 / section 3.3), and the
temperature-sweep plot of pass@k against k (Codex paper, Figure 6).

Each ranking function takes, per problem, a boolean array of which samples passed and
returns pass@1 averaged over problems when exactly one sample per problem is submitted:

  by score (mean or sum log-probability): the highest-scoring sample; a tie between
      several top samples counts as a uniform choice among them (expected value, exact);
  random:  expected value over a uniform choice, c / n, computed exactly;
  oracle:  1 if any sample passed (an upper bound: pass@n).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from instructjax.data.jsonl import atomic_output


def _check(passed: Sequence, scores: Sequence | None = None) -> list[np.ndarray]:
    if not len(passed):
        raise ValueError("no problems to rank")
    out = []
    for j, p in enumerate(passed):
        p = np.asarray(p, dtype=bool).reshape(-1)
        if p.size == 0:
            raise ValueError(f"problem {j} has no samples")
        if scores is not None:
            s = np.asarray(scores[j], dtype=np.float64).reshape(-1)
            if s.shape != p.shape:
                raise ValueError(f"problem {j}: {p.size} pass flags but {s.size} scores")
            if np.any(np.isnan(s)):
                raise ValueError(f"problem {j}: a score is NaN")
        out.append(p)
    return out


def pass1_by_score(passed: Sequence, scores: Sequence) -> float:
    """Mean over problems of [the sample with the highest score passed] (ties: expected)."""
    flags = _check(passed, scores)
    total = 0.0
    for p, s in zip(flags, scores):
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        top = s == s.max()
        total += np.count_nonzero(p & top) / np.count_nonzero(top)
    return total / len(flags)


def pass1_random(passed: Sequence) -> float:
    """Mean over problems of c / n: pass@1 of a uniformly random pick, in expectation."""
    flags = _check(passed)
    return float(np.mean([np.count_nonzero(p) / p.size for p in flags]))


def pass1_oracle(passed: Sequence) -> float:
    """Mean over problems of [any sample passed]."""
    flags = _check(passed)
    return float(np.mean([bool(p.any()) for p in flags]))


def compare_rankings(passed: Sequence, sum_logprobs: Sequence, mean_logprobs: Sequence
                     ) -> dict[str, float]:
    """pass@1 of the four ways to pick one sample per problem (Codex Figure 1)."""
    return {"mean_logprob": pass1_by_score(passed, mean_logprobs),
            "sum_logprob": pass1_by_score(passed, sum_logprobs),
            "random": pass1_random(passed),
            "oracle": pass1_oracle(passed)}


def best_temperature_per_k(curves: Mapping[float, Mapping[int, float]]
                           ) -> dict[int, dict[str, float]]:
    """{k: {"temperature": t, "pass_at_k": v}} of the best temperature for each k.

    `curves` maps temperature -> {k: pass@k}; a k missing at some temperature (k > n there)
    is judged over the temperatures that have it. Ties go to the lower temperature.
    """
    best: dict[int, dict[str, float]] = {}
    for t in sorted(curves):
        for k, v in curves[t].items():
            if k not in best or v > best[k]["pass_at_k"]:
                best[k] = {"temperature": float(t), "pass_at_k": float(v)}
    return dict(sorted(best.items()))


def plot_passk_vs_k(curves: Mapping[float, Mapping[int, float]], path: str | Path, *,
                    title: str = "pass@k against k by sampling temperature") -> Path:
    """Writes a PNG: one pass@k-vs-k line per temperature (log-scale k), and the envelope
    of the best temperature per k (dashed). Written to a temporary file, then renamed."""
    if not curves or not any(curves.values()):
        raise ValueError("no pass@k values to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    temps = sorted(curves)
    colors = _colors(len(temps))
    for t, color in zip(temps, colors):
        ks = sorted(curves[t])
        if ks:
            ax.plot(ks, [curves[t][k] for k in ks], marker="o", color=color, label=f"T = {t:g}")
    best = best_temperature_per_k(curves)
    if len(temps) > 1:
        ks = sorted(best)
        ax.plot(ks, [best[k]["pass_at_k"] for k in ks], linestyle="--", color="black",
                linewidth=1, label="best T per k")
    ax.set_xscale("log")
    all_ks = sorted({k for c in curves.values() for k in c})
    ax.set_xticks(all_ks, [str(k) for k in all_ks])  # plain k labels, not 2x10^0
    ax.minorticks_off()
    ax.set_xlabel("k (number of samples)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()

    path = Path(path)
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def _colors(count: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["coolwarm"]  # cold = low temperature, warm = high
    return [cmap(0.5 if count == 1 else i / (count - 1)) for i in range(count)]

