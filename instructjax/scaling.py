"""Scaling-law sweeps: train several model sizes on the same data and token budget, then
fit the final validation loss against non-embedding parameters.

    L(N) = (N / N_c)^(-alpha)              (Kaplan et al. 2020; the Codex paper, fig. 4)
    L(N) = L_inf + (N / N_c)^(-alpha)      (with an irreducible loss, `irreducible=True`)

Both are fitted by least squares on log L, so every point weighs by its relative error.
Standard errors come from the Jacobian at the optimum: cov = s^2 (J^T J)^-1 with
s^2 = RSS / (points - parameters) (NaN when no points are spare). They assume independent
residuals of one scale; with five or six points they are rough, hence printed.

`run_sweep` trains each size through the ordinary pretraining run (train.run.train_lm),
one workdir per size under the sweep's workdir, all sharing one tokenizer and one prepared
dataset. A size whose run has finished is read back, not retrained, so rerunning the same
command resumes an interrupted sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from instructjax.config import ConfigError, RunConfig
from instructjax.data.jsonl import atomic_output, write_json_atomic
from instructjax.model.config import ModelConfig

RESULTS_FILE = "scaling.json"
PLOT_FILE = "scaling.png"
FINAL_EVAL = "final_eval.json"
TIMING_FILE = "sweep_timing.json"
LOSS_KEY = "eval/loss"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    """A sweep: `base` is the pretraining run every size shares (data, optimiser, steps,
    batch); `models` are (preset name, model config) pairs, trained in this order."""
    workdir: str
    base: RunConfig
    models: tuple[tuple[str, ModelConfig], ...]
    # One peak learning rate per size (else base's for all): the best rate falls with
    # width, and one rate for all sizes makes the largest ones unstable or the smallest slow.
    learning_rates: tuple[float, ...] | None = None
    # Seeds to train each size with (default: base's one seed). With several, a size's loss
    # is their mean and its spread is reported: at small budgets the seed alone can move
    # a small model's loss as much as a size step does.
    seeds: tuple[int, ...] = ()
    irreducible: bool = False

    def __post_init__(self):
        names = [name for name, _ in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"--sizes: each size once, got {names}")
        if len(names) < (3 if self.irreducible else 2):
            raise ConfigError(f"--sizes: fitting {3 if self.irreducible else 2} parameters "
                              f"needs at least as many sizes, got {names}")
        counts = [m.num_params(non_embedding=True) for _, m in self.models]
        if len(set(counts)) != len(counts):
            raise ConfigError(f"--sizes: two sizes have the same non-embedding parameter "
                              f"count ({dict(zip(names, counts))}); a fit needs distinct N")
        if self.learning_rates is not None and (
                len(self.learning_rates) != len(names) or min(self.learning_rates) <= 0):
            raise ConfigError(f"--size_learning_rates: one positive rate per size in --sizes "
                              f"({len(names)}), got {list(self.learning_rates)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: each seed once, got {list(self.seeds)}")
        for name, model in self.models:
            if self.base.train.seq_len > model.max_len:
                raise ConfigError(f"--seq_len ({self.base.train.seq_len}) exceeds the max_len "
                                  f"({model.max_len}) of size {name}")
        if self.base.task != "pretrain" or self.base.init_from:
            raise ConfigError("a scaling sweep trains each size from scratch on the "
                              "pretraining task; drop --init_from")


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    alpha_se: float
    log10_n_c: float  # in logs: a nearly flat fit puts N_c beyond float range
    log10_n_c_se: float
    l_inf: float  # 0 without the irreducible term
    l_inf_se: float
    rms_log_residual: float
    points: int

    @property
    def n_c(self) -> float:
        return 10.0 ** self.log10_n_c if self.log10_n_c < 300 else math.inf

    def predict(self, n) -> np.ndarray:
        log10_n = np.log10(np.asarray(n, np.float64))
        return self.l_inf + 10.0 ** (-self.alpha * (log10_n - self.log10_n_c))

    def describe(self) -> str:
        text = (f"L(N) = (N / {self.n_c:.3g})^(-{self.alpha:.4f} +- {self.alpha_se:.4f})"
                f"  [log10 N_c = {self.log10_n_c:.2f} +- {self.log10_n_c_se:.2f}]")
        if self.l_inf:
            text = text.replace("L(N) = ", f"L(N) = {self.l_inf:.3f} +- {self.l_inf_se:.3f} + ")
        return f"{text}, rms log residual {self.rms_log_residual:.4f} over {self.points} points"

    def to_json(self) -> dict:
        """Fields plus N_c; NaN (no error estimate) and inf as null, which JSON can hold."""
        out = {**dataclasses.asdict(self), "n_c": self.n_c}
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in out.items()}


def _jacobian_se(jac: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    dof = len(residuals) - jac.shape[1]
    if dof <= 0:  # an exact fit through as many points as parameters: no error estimate
        return np.full(jac.shape[1], np.nan)
    s2 = float(residuals @ residuals) / dof
    cov = s2 * np.linalg.pinv(jac.T @ jac)
    return np.sqrt(np.maximum(np.diag(cov), 0.0))


def fit_power_law(n, loss, *, irreducible: bool = False) -> PowerLawFit:
    """Least squares on log L over parameters theta = (alpha, ln N_c[, L_inf])."""
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    if n.shape != loss.shape or n.ndim != 1:
        raise ValueError(f"n and loss must be 1-D of one length, got {n.shape} and {loss.shape}")
    if np.any(n <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError(f"parameter counts and losses must be positive and finite, got "
                         f"n={n.tolist()} loss={loss.tolist()}")
    need = 3 if irreducible else 2
    if len(n) < need:
        raise ValueError(f"need at least {need} points, got {len(n)} (and one more for "
                         "standard errors)")
    x, y = np.log(n), np.log(loss)
    # The pure power law is linear in log space: y = -alpha x + alpha ln N_c.
    slope, intercept = np.polyfit(x, y, 1)
    alpha, ln_nc = -slope, intercept / -slope if slope else 0.0
    if not irreducible:
        theta = np.array([alpha, ln_nc])
        residuals = y - (-alpha * (x - ln_nc))
        jac = np.stack([-(x - ln_nc), np.full_like(x, alpha)], axis=1)  # d model / d theta
        se = _jacobian_se(jac, residuals)
        l_inf, l_inf_se = 0.0, 0.0
    else:
        from scipy.optimize import least_squares  # scipy ships with jax

        def model_residuals(theta):
            a, c, l0 = theta
            return np.log(l0 + np.exp(-a * (x - c))) - y

        # Start from the pure power law minus a guess of half the smallest loss.
        l0 = 0.5 * float(loss.min())
        start_y = np.log(loss - l0)
        s, i = np.polyfit(x, start_y, 1)
        start = np.array([max(-s, 1e-3), i / -s if s else x.mean(), l0])
        sol = least_squares(model_residuals, start, method="trf",
                            bounds=([1e-6, -np.inf, 0.0], [np.inf, np.inf, float(loss.min())]))
        theta, residuals = sol.x, -sol.fun
        se = _jacobian_se(sol.jac, residuals)
        l_inf, l_inf_se = float(theta[2]), float(se[2])
    return PowerLawFit(alpha=float(theta[0]), alpha_se=float(se[0]),
                       log10_n_c=float(theta[1] / math.log(10)),
                       log10_n_c_se=float(se[1] / math.log(10)),
                       l_inf=l_inf, l_inf_se=l_inf_se,
                       rms_log_residual=float(np.sqrt(np.mean(residuals ** 2))), points=len(n))


# ----------------------------------------------------------------------------- the sweep


def _finished_loss(workdir: Path, steps: int) -> float | None:
    path = workdir / FINAL_EVAL
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return float(record[LOSS_KEY]) if record.get("step") == steps and LOSS_KEY in record else None


def _flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}


def check_same_config(run_cfg: RunConfig, name: str) -> None:
    """A size's workdir from an earlier sweep must hold the run we would start now: else
    its checkpoints or final loss belong to other data, optimiser or token budget."""
    path = Path(run_cfg.workdir) / "run_config.json"
    if not path.exists():
        return
    recorded = _flatten(json.loads(path.read_text())["config"])
    wanted = _flatten(json.loads(json.dumps(dataclasses.asdict(run_cfg), default=str)))
    differ = sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k))
    if differ:
        changes = ", ".join(f"{k}: {recorded.get(k)!r} then, {wanted.get(k)!r} now"
                            for k in differ[:5])
        raise ConfigError(f"size {name}: {run_cfg.workdir} holds a run with other settings "
                          f"({changes}); use a new --workdir for a different sweep")


def size_run_config(cfg: ScalingConfig, index: int, tokenizer_path: str,
                    seed: int | None = None) -> RunConfig:
    """The pretraining run of size `index` (and `seed`): the shared run with this model,
    learning rate and seed, its own workdir (<size>, or <size>/seed_<s> when the sweep has
    several seeds), the sweep's tokenizer and the sweep's prepared data."""
    name, model = cfg.models[index]
    data = dataclasses.replace(cfg.base.data, tokenizer_path=tokenizer_path)
    optim = cfg.base.optim
    if cfg.learning_rates is not None:
        optim = dataclasses.replace(optim, learning_rate=cfg.learning_rates[index])
    train = cfg.base.train if seed is None else dataclasses.replace(cfg.base.train, seed=seed)
    workdir = Path(cfg.workdir) / name
    if len(cfg.seeds) > 1:
        workdir = workdir / f"seed_{seed}"
    return dataclasses.replace(cfg.base, model=model, data=data, optim=optim, train=train,
                               workdir=str(workdir))


def _train_or_read(run_cfg: RunConfig, name: str, argv, writes: bool) -> dict:
    """One run's final loss and timing: read back when it has finished, else trained."""
    from absl import logging
    from instructjax.train import run as run_lib

    run_dir = Path(run_cfg.workdir)
    check_same_config(run_cfg, name)
    loss = _finished_loss(run_dir, run_cfg.train.steps)
    timing = {"seconds": None, "cpu_seconds": None}
    if loss is None:
        logging.info("scaling sweep: training %s, seed %d (%d non-embedding parameters)", name,
                     run_cfg.train.seed, run_cfg.model.num_params(non_embedding=True))
        # CPU time too: on a shared machine wall time says little about the cost.
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = float(run_lib.train_lm(run_cfg, argv)[LOSS_KEY])
        timing = {"seconds": time.perf_counter() - start,
                  "cpu_seconds": time.process_time() - start_cpu}
        if writes:
            write_json_atomic(run_dir / TIMING_FILE, timing)
    elif (run_dir / TIMING_FILE).exists():
        timing = json.loads((run_dir / TIMING_FILE).read_text())
    return {"loss": loss, **timing}


def _total(values):
    return None if any(v is None for v in values) else sum(values)


def run_sweep(cfg: ScalingConfig, argv: list[str] = ()) -> dict:
    """Trains (or reads back) every size (and seed), fits, prints the table, writes JSON
    and PNG."""
    import jax
    from instructjax.train import run as run_lib

    writes = jax.process_index() == 0  # multi-process runs: one writer, as train_lm does
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if writes:
        write_json_atomic(workdir / "sweep_config.json", {
            "config": dataclasses.asdict(cfg), "argv": list(argv)})
    # One tokenizer for all sizes (else their losses are not comparable): trained once
    # into the sweep's workdir, or --tokenizer_path.
    files = run_lib.dataset_files(cfg.base)
    tokenizer = run_lib.resolve_tokenizer(dataclasses.replace(cfg.base, workdir=str(workdir)),
                                          files)
    tokens = cfg.base.train.steps * cfg.base.train.batch_size * cfg.base.train.seq_len
    rows = []
    for index, (name, model) in enumerate(cfg.models):
        runs_cfg = [size_run_config(cfg, index, str(tokenizer.path), seed)
                    for seed in (cfg.seeds or (None,))]
        runs = [_train_or_read(r, name, argv, writes) for r in runs_cfg]
        losses = [r["loss"] for r in runs]
        rows.append({"size": name, "non_embedding_params": model.num_params(non_embedding=True),
                     "params": model.num_params(),
                     "learning_rate": runs_cfg[0].optim.learning_rate,
                     "eval_loss": float(np.mean(losses)),
                     "seeds": [r.train.seed for r in runs_cfg], "eval_losses": losses,
                     "eval_loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else None,
                     "train_seconds": _total([r["seconds"] for r in runs]),
                     "train_cpu_seconds": _total([r["cpu_seconds"] for r in runs]),
                     "workdir": str(Path(cfg.workdir) / name)})
    fit = fit_power_law([r["non_embedding_params"] for r in rows],
                        [r["eval_loss"] for r in rows], irreducible=cfg.irreducible)
    result = {"fit": fit.to_json(), "fit_formula": fit.describe(), "sizes": rows,
              "tokens_per_size": tokens, "steps": cfg.base.train.steps,
              "tokenizer": str(tokenizer.path)}
    if writes:
        write_json_atomic(workdir / RESULTS_FILE, result)
        plot_fit(rows, fit, workdir / PLOT_FILE, tokens=tokens)
        print(format_table(rows, fit))
    return result


def format_table(rows: list[dict], fit: PowerLawFit) -> str:
    """One line per size; with several seeds, the loss is their mean and `sd` their
    standard deviation."""
    seeds = any(r["eval_loss_std"] is not None for r in rows)
    lines = [f"{'size':<10} {'non-emb params':>15} {'params':>12} {'eval loss':>10} "
             + (f"{'sd':>7} " if seeds else "") + f"{'fit':>8} {'train s':>8} {'cpu s':>8}"]
    for r in rows:
        seconds, cpu = ("-" if r[k] is None else f"{r[k]:.0f}"
                        for k in ("train_seconds", "train_cpu_seconds"))
        sd = f"{r['eval_loss_std']:>7.4f} " if seeds else ""
        lines.append(f"{r['size']:<10} {r['non_embedding_params']:>15,} {r['params']:>12,} "
                     f"{r['eval_loss']:>10.4f} {sd}"
                     f"{float(fit.predict(r['non_embedding_params'])):>8.4f}"
                     f" {seconds:>8} {cpu:>8}")
    lines.append(f"fit: {fit.describe()}")
    lines.append(f"fitted exponent alpha = {fit.alpha:.4f} +- {fit.alpha_se:.4f}")
    return "\n".join(lines)


def plot_fit(rows: list[dict], fit: PowerLawFit, path: str | Path, *, tokens: int) -> Path:
    """Log-log: each size's final validation loss and the fitted curve (Agg, atomic)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    n = np.array([r["non_embedding_params"] for r in rows], np.float64)
    loss = np.array([r["eval_loss"] for r in rows], np.float64)
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    ax.loglog(grid, fit.predict(grid), "-", color="C1",
              label=f"fit: alpha = {fit.alpha:.3f} ± {fit.alpha_se:.3f}, N_c = {fit.n_c:.2g}"
              + (f", L_inf = {fit.l_inf:.2f}" if fit.l_inf else ""))
    sd = [r["eval_loss_std"] for r in rows]
    if all(v is not None for v in sd):
        ax.errorbar(n, loss, yerr=sd, fmt="o", color="C0", capsize=3,
                    label=f"final validation loss (mean ± sd over {len(rows[0]['seeds'])} seeds)")
    else:
        ax.loglog(n, loss, "o", color="C0", label="final validation loss")
    for r in rows:
        ax.annotate(r["size"], (r["non_embedding_params"], r["eval_loss"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.3g"))  # plain numbers: the losses span a narrow range
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"Loss vs model size, {tokens / 1e6:.2f}M training tokens each")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    return path
