"""Metrics to stdout (a progress line with ETA), JSONL and TensorBoard event files.

Metric names are flat and '/'-namespaced ('train/loss', 'eval/loss'). Only process 0
writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
from absl import logging

class MetricSums:
    """Running totals of an objective's (sum, weight) metric pairs (losses.py contract) over
    steps or eval batches; `means()` divides at the end, so every mean is exact."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def add(self, metrics) -> MetricSums:
        for name, (total, weight) in jax.device_get(metrics).items():
            acc = self.totals.setdefault(name, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(weight)
        return self

    def total(self, name: str) -> float:
        return self.totals.get(name, [0.0, 0.0])[0]

    def weight(self, name: str) -> float:
        return self.totals.get(name, [0.0, 0.0])[1]

    def means(self, prefix: str = "", drop: tuple[str, ...] = ("tokens",)) -> dict[str, float]:
        return {f"{prefix}{k}": s / w if w else float("nan")
                for k, (s, w) in self.totals.items() if k not in drop}


# Peak dense bf16 FLOP/s per chip, for MFU when --peak_flops_per_device is not given.
KNOWN_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # how JAX names a v5p device
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> float:
    """Configured peak, else the table's entry for this device kind, else 0 (unknown)."""
    if override > 0:
        return override
    return KNOWN_PEAK_FLOPS.get(jax.devices()[0].device_kind, 0.0)


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, total_steps: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self._start_time = time.time()
        self._start_step: int | None = None
        self._jsonl = None
        self._tb = None
        if self.enabled:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            from tensorboardX import SummaryWriter  # imported lazily: slow to import
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            if math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """One human-readable line: step/total, a few key metrics and the ETA."""
        if not self.enabled:
            return
        if self._start_step is None:
            self._start_step, self._start_time = step, time.time()
        done = step - self._start_step
        elapsed = time.time() - self._start_time
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        keys = ("train/loss", "eval/loss", "train/tokens_per_sec", "train/mfu", "train/grad_norm",
                "train/learning_rate")
        shown = "  ".join(f"{k.split('/', 1)[1] if k.startswith('train/') else k}="
                          f"{metrics[k]:.4g}" for k in keys if k in metrics)
        logging.info("step %d/%d  %s  eta %s", step, self.total_steps, shown, _format_eta(eta))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
