"""PNG plots of an evaluation (evaluate.evaluate_policies) and of PPO runs' frontiers.

  frontier.png     for each PPO run (PPO, PPO-ptx): the RM's (proxy) score and the gold
                   score of the rollouts against their KL from the SFT policy, over
                   training (from the run's metrics.jsonl: train/rollout/score,
                   train/rollout/gold_score, train/rollout/kl). Proxy rising while gold
                   stalls or falls is over-optimisation of the reward model.
  eval_bars.png    the evaluation table as grouped bars: win rate against the reference
                   (95% Wilson interval), accuracy, instruction following, hallucination on
                   unanswerable questions, toxic outputs; held-out pretraining loss apart.

matplotlib through the object API (no pyplot state), rendered by Agg, written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from instructjax.data.jsonl import atomic_output  # noqa: E402

KL, SCORE, GOLD = "train/rollout/kl", "train/rollout/score", "train/rollout/gold_score"
BARS = (("win rate", None), ("accuracy", "accuracy"),
        ("follows\ninstructions", "instruction_following"),
        ("follows\nconstraints", "constraint_following"),
        ("hallucination\n(unanswerable)", "hallucination"), ("toxic", "toxic"),
        ("refuses\n(harmful)", "harmful_refusal"))


def read_frontier(metrics_file: str | Path) -> dict[str, list[float]]:
    """{step, kl, score, gold_score} over the logged PPO steps (the last record of a step
    wins: a resumed run appends). gold_score holds None where it was not logged."""
    by_step: dict[int, dict] = {}
    with open(metrics_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if KL in record and SCORE in record:
                    by_step[int(record["step"])] = record
    steps = sorted(by_step)

    def column(key):
        values = [by_step[s].get(key) for s in steps]
        return [float(v) if isinstance(v, (int, float)) else None for v in values]

    return {"step": [float(s) for s in steps], "kl": column(KL), "score": column(SCORE),
            "gold_score": column(GOLD)}


def smooth(values, window: int = 0) -> list[float]:
    """Trailing moving average over `window` log steps (0: about an eighth of the run):
    one rollout batch is a noisy estimate, the trend is what shows over-optimisation."""
    window = window or max(1, len(values) // 8)
    sums = np.cumsum(np.concatenate([[0.0], np.asarray(values, np.float64)]))
    return [float((sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window))
            for i in range(len(values))]


def _save(fig: Figure, path: Path) -> Path:
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_frontier(ppo_workdirs: Mapping[str, str | Path], path: str | Path) -> Path:
    """Two panels sharing the KL axis: RM score (left) and gold score (right) of the
    rollouts, one line per run: a faint marker per logged step (the first circled) and the
    moving average of (KL, score) over steps (`smooth`)."""
    fig = Figure(figsize=(11, 4.2))
    ax_rm, ax_gold = fig.subplots(1, 2, sharex=True)
    for i, (name, workdir) in enumerate(ppo_workdirs.items()):
        data = read_frontier(Path(workdir) / "metrics.jsonl")
        colour = f"C{i}"
        for ax, key in ((ax_rm, "score"), (ax_gold, "gold_score")):
            points = [(k, v) for k, v in zip(data["kl"], data[key])
                      if k is not None and v is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o", color=colour, markersize=3, alpha=0.35)
            ax.plot(smooth(xs), smooth(ys), "-", color=colour, linewidth=1.8, label=name)
            ax.plot(xs[:1], ys[:1], "o", color=colour, markersize=8, fillstyle="none")
    ax_rm.set_title("reward model (proxy) score")
    ax_gold.set_title("gold score")
    for ax in (ax_rm, ax_gold):
        ax.set_xlabel("KL(policy || SFT) of the rollouts, nats per response")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    ax_rm.set_ylabel("mean score of the rollouts")
    fig.suptitle("PPO over training: proxy vs gold reward against KL (points: logged steps, "
                 "circle: first; lines: moving averages)")
    return _save(fig, Path(path))


def plot_eval_bars(results: dict, path: str | Path) -> Path:
    """Grouped bars per metric (one bar per model, 95% intervals as error bars) and the
    held-out pretraining loss (the alignment tax) in a second panel."""
    models = results["models"]
    names = results["settings"].get("order", list(models))
    ref = results["settings"]["reference"]
    fig = Figure(figsize=(12, 4.2))
    ax, ax_loss = fig.subplots(1, 2, gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        m = models[name]
        values, lows, highs = [], [], []
        for _, key in BARS:
            entry = m["win_rate"] if key is None else m["rates"][key]
            value = entry["win_rate"] if key is None else entry["rate"]
            lo, hi = entry["ci"]
            values.append(value)
            lows.append(max(value - lo, 0.0) if lo == lo else 0.0)  # NaN-safe
            highs.append(max(hi - value, 0.0) if hi == hi else 0.0)
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(BARS))]
        ax.bar(xs, values, width, yerr=[lows, highs], capsize=2, label=name, color=f"C{j}")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(BARS)), [label for label, _ in BARS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction (95% interval)")
    ax.set_title(f"held-out prompts (n = {results['settings']['num_prompts']}); "
                 f"win rate against {ref}, dashed = 0.5")
    ax.legend(fontsize=8, ncol=min(len(names), 6), loc="upper center",
              bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax_loss.bar(range(len(names)), [models[n]["pretrain_loss"] for n in names],
                color=[f"C{j}" for j in range(len(names))])
    ax_loss.set_xticks(range(len(names)), names, fontsize=8, rotation=30)
    ax_loss.set_title("pretraining loss (held-out)")
    return _save(fig, Path(path))


def write_all(results: dict | None, ppo_workdirs: Mapping[str, str | Path],
              out_dir: str | Path) -> dict[str, Path]:
    """eval_bars.png (when `results` is given) and frontier.png (when PPO runs are given,
    their metrics.jsonl present) into out_dir; returns {name: path} of what was written."""
    out_dir = Path(out_dir)
    written = {}
    if results is not None:
        written["eval_bars"] = plot_eval_bars(results, out_dir / "eval_bars.png")
    runs = {n: w for n, w in ppo_workdirs.items() if (Path(w) / "metrics.jsonl").exists()}
    if runs:
        written["frontier"] = plot_frontier(runs, out_dir / "frontier.png")
    return written
