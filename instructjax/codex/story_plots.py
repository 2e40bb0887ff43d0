"""The Codex story's plots (PNG, written atomically): validation-loss curves of the
fine-tuned and from-scratch runs, the best sampling temperature per k, and pass@1 under each
way of picking one sample. The pass@k-vs-k plot per temperature is ranking.plot_passk_vs_k.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from instructjax.data.jsonl import atomic_output

RANKING_LABELS = {"mean_logprob": "mean log-prob", "sum_logprob": "sum log-prob",
                  "random": "random", "oracle": "oracle (pass@n)"}


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def plot_loss_curves(curves: Mapping[str, Mapping], path: str | Path) -> Path:
    """One validation-loss-by-step line per run; `curves` maps a label to {step: loss}
    (steps may be strings, as read back from JSON)."""
    if not curves or not all(curves.values()):
        raise ValueError("every loss curve needs at least one point")
    fig, ax = _figure()
    for label, curve in curves.items():
        points = sorted((int(s), float(v)) for s, v in curve.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("Code validation loss: pretrained start vs from scratch")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_best_temperature(best: Mapping[str, Mapping], path: str | Path) -> Path:
    """Best sampling temperature against k, one line per model; `best` maps a model to
    {k: {"temperature": t, "pass_at_k": v}} (ranking.best_temperature_per_k)."""
    if not best or not all(best.values()):
        raise ValueError("no best temperatures to plot")
    fig, ax = _figure()
    all_ks = set()
    for name, per_k in best.items():
        ks = sorted(int(k) for k in per_k)
        all_ks.update(ks)
        temps = [per_k[str(k)]["temperature"] if str(k) in per_k else per_k[k]["temperature"]
                 for k in ks]
        ax.plot(ks, temps, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.minorticks_off()
    ax.set_xlabel("k (number of samples)")
    ax.set_ylabel("best sampling temperature")
    ax.set_title("Best temperature for pass@k")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_rankings(rankings: Mapping[str, Mapping[str, float]], path: str | Path, *,
                  temperature: float) -> Path:
    """Grouped bars: pass@1 when one of n samples (drawn at `temperature`) is picked by each
    ranking, per model."""
    if not rankings or not all(rankings.values()):
        raise ValueError("no ranking results to plot (were log-probs recorded?)")
    fig, ax = _figure()
    names = list(rankings)
    width = 0.8 / len(RANKING_LABELS)
    for i, (key, label) in enumerate(RANKING_LABELS.items()):
        xs = [j + (i - (len(RANKING_LABELS) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [rankings[n].get(key, 0.0) for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("pass@1")
    top = max(v for r in rankings.values() for v in r.values())
    ax.set_ylim(0, min(1.0, max(0.05, top * 1.2)))  # tiny models: small values stay visible
    ax.set_title(f"Picking one of n samples (T = {temperature:g})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)
