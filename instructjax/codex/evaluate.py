"""Sampling completions from our models and scoring them by functional correctness: the
library half of `python -m experiments.passk`.

Prompts that do not fit the model's context with max_new_tokens new tokens are SKIPPED
(not cut from the left, which would drop the function signature); callers report them.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

from instructjax.codex import passk, ranking, sandbox
from instructjax.codex.problems import STOP, Sample, truncate
from instructjax.config import ConfigError
from instructjax.data.jsonl import DataError, write_json_atomic, write_jsonl_atomic

ERROR_CHARS = 500  # of a sandbox error message kept in results.jsonl


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How completions are drawn from a trained model (--policy_from)."""
    checkpoint: str
    n_samples: int
    temperatures: tuple[float, ...]
    top_p: float
    max_new_tokens: int
    batch_size: int
    seed: int
    mesh: str

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"--n_samples must be >= 1, got {self.n_samples}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be >= 0, got {list(self.temperatures)}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"--temperatures has duplicates: {list(self.temperatures)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        for name in ("model_config.json", "tokenizer.model"):
            if not (Path(self.checkpoint) / name).exists():
                raise ValueError(f"--policy_from={self.checkpoint}: no {name}; is it the workdir "
                                 f"of a finished run?")


def machine_info(sandbox_mode: str) -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "sandbox_mode": sandbox_mode}


def settings_record(sandbox_cfg) -> dict:
    """The sandbox settings and the machine, as every summary records them."""
    return {"sandbox": {"mode": sandbox_cfg.mode, "timeout_s": sandbox_cfg.timeout_s,
                        "memory_mb": sandbox_cfg.memory_mb, "workers": sandbox_cfg.workers},
            "machine": machine_info(sandbox_cfg.mode)}


def score(evaluator, sandbox_cfg, problems: dict, samples: list, ks: tuple[int, ...],
          out: Path, extra: dict | None = None, progress=None) -> dict:
    """Runs every sample's tests; writes results.jsonl and summary.json into `out`."""
    sampled = {s.task_id for s in samples}
    missing = [t for t in problems if t not in sampled]
    if missing:
        raise DataError(f"{len(missing)} of {len(problems)} problems have no samples (first: "
                        f"{missing[0]!r}); pass a --problems file with just the problems sampled")
    start = time.time()
    jobs = [(problems[s.task_id], s.completion, s.sample_index) for s in samples]
    results = evaluator.run(jobs, progress=progress)
    if [(r.task_id, r.sample_index) for r in results] != [(s.task_id, s.sample_index)
                                                          for s in samples]:
        raise RuntimeError("the sandbox returned results out of job order")
    elapsed = time.time() - start
    write_jsonl_atomic(out / "results.jsonl", (
        {"task_id": r.task_id, "sample_index": r.sample_index, "label": r.label,
         "duration_s": round(r.duration_s, 4), "error": r.error[:ERROR_CHARS]} for r in results))

    passed = [r.label == "passed" for r in results]
    summary = passk.summarize([r.task_id for r in results], [r.label for r in results], ks,
                              all_labels=sandbox.LABELS)
    summary.update({
        **settings_record(sandbox_cfg),
        "eval_seconds": round(elapsed, 2),
    })
    if all(s.sum_logprob is not None and s.mean_logprob is not None for s in samples):
        by_task: dict[str, list] = {}
        for s, ok in zip(samples, passed):
            by_task.setdefault(s.task_id, []).append((ok, s.sum_logprob, s.mean_logprob))
        rows = list(by_task.values())
        summary["ranking_pass_at_1"] = ranking.compare_rankings(
            [[r[0] for r in row] for row in rows], [[r[1] for r in row] for row in rows],
            [[r[2] for r in row] for row in rows])
    summary.update(extra or {})
    if "skipped_problems" in summary and summary["skipped_problems"]["count"]:
        scored = summary["num_problems"]
        total = scored + summary["skipped_problems"]["count"]
        summary["pass_at_k_all_problems"] = {
            k: v * scored / total for k, v in summary["pass_at_k"].items()}
    write_json_atomic(out / "summary.json", summary)
    return summary


def sample_completions(cfg: SampleConfig, problems: dict) -> tuple[dict, list[str]]:
    """{temperature: [Sample]} drawn from the model, and the task ids skipped as too long."""
    import jax  # only here: scoring alone never starts JAX

    from instructjax import parallel
    from instructjax.rlhf.generate import generate
    from instructjax.sampling import SamplingConfig
    from instructjax.train.workdir import load_trained

    mesh = parallel.make_mesh(cfg.mesh)
    model, params, tokenizer = load_trained(cfg.checkpoint, mesh)
    limit = model.cfg.max_len - cfg.max_new_tokens
    if limit < 1:
        raise ConfigError(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in "
                         f"the model's context of {model.cfg.max_len} tokens")
    fits = {t: len(tokenizer.encode(p.prompt)) <= limit for t, p in problems.items()}
    kept = [t for t in problems if fits[t]]
    skipped = [t for t in problems if not fits[t]]
    if not kept:
        raise ConfigError(f"no prompt fits the model's context: {model.cfg.max_len} tokens less "
                         f"--max_new_tokens={cfg.max_new_tokens}; lower --max_new_tokens")
    prompts = [problems[t].prompt for t in kept for _ in range(cfg.n_samples)]
    key = jax.random.key(cfg.seed)
    out = {}
    for i, temperature in enumerate(cfg.temperatures):
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id, temperature=temperature,
                                  top_p=cfg.top_p)
        generations = generate(params, model, tokenizer, prompts, sampling=sampling, mesh=mesh,
                               rng=jax.random.fold_in(key, i), batch_size=cfg.batch_size,
                               stop=STOP)
        out[temperature] = [
            Sample(task_id=kept[j // cfg.n_samples], sample_index=j % cfg.n_samples,
                   completion=truncate(g.text), sum_logprob=g.sum_logprob,
                   mean_logprob=g.mean_logprob, temperature=temperature)
            for j, g in enumerate(generations)]
    return out, skipped
