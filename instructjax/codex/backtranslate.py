"""Codex-D evaluated by back-translation (the Codex paper, section 6): Codex-D writes a
docstring for each problem from its signature and canonical body; Codex-S writes code from
the signature and that docstring; the problem's own tests score the code. With n docstrings
per problem this gives pass@k of the round trip, read next to Codex-S from the original
docstrings (the same code model, the same temperature).

Problems are HumanEval-format dicts WITH a canonical_solution (Codex-D reads it), such as
the generated problem files of experiments.codex_data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from instructjax.codex.codex_data import backtranslation_prompt, codex_d_prompt
from instructjax.codex.problems import (STOP, Sample, canonical_solutions, load_problems,
                                        truncate)
from instructjax.data.jsonl import DataError


@dataclasses.dataclass(frozen=True, kw_only=True)
class BacktranslationConfig:
    docstring_checkpoint: str           # Codex-D's workdir
    code_checkpoint: str                # Codex-S's workdir
    n_samples: int = 10                 # docstrings per problem (one program each)
    docstring_temperature: float = 0.8
    code_temperature: float = 0.2
    max_docstring_tokens: int = 64
    max_code_tokens: int = 96
    top_p: float = 0.95
    batch_size: int = 64
    seed: int = 0
    mesh: str = "data:-1,fsdp:1,tensor:1"

    def __post_init__(self):
        for name in ("n_samples", "max_docstring_tokens", "max_code_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("docstring_temperature", "code_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for flag, path in (("docstring_checkpoint", self.docstring_checkpoint),
                           ("code_checkpoint", self.code_checkpoint)):
            if not (Path(path) / "model_config.json").exists():
                raise ValueError(f"--{flag}={path}: no model_config.json; is it the workdir "
                                 "of a finished run?")


def load_problem_dicts(path: str | Path) -> dict[str, dict]:
    """task_id -> problem dict (HumanEval fields), each with its canonical_solution."""
    problems, solutions = load_problems(path), canonical_solutions(path)
    missing = [t for t in problems if t not in solutions]
    if missing:
        raise DataError(f"{path}: back-translation needs a canonical_solution in every "
                        f"problem; {len(missing)} have none (first: {missing[0]!r})")
    return {t: {"task_id": t, "prompt": p.prompt, "test": p.test, "entry_point": p.entry_point,
                "canonical_solution": solutions[t]} for t, p in problems.items()}


def _sample(checkpoint, prompts, *, temperature, max_new_tokens, cfg, seed_offset, stop):
    """One Generation per prompt from `checkpoint`; None for a prompt that is None or does
    not fit the model's context."""
    import jax

    from instructjax import parallel
    from instructjax.rlhf.generate import generate
    from instructjax.sampling import SamplingConfig
    from instructjax.train.workdir import load_trained

    mesh = parallel.make_mesh(cfg.mesh)
    model, params, tokenizer = load_trained(checkpoint, mesh)
    limit = model.cfg.max_len - max_new_tokens
    fits = [p is not None and len(tokenizer.encode(p)) <= limit for p in prompts]
    kept = [p for p, ok in zip(prompts, fits) if ok]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id, temperature=temperature, top_p=cfg.top_p)
    out = iter(generate(params, model, tokenizer, kept, sampling=sampling, mesh=mesh,
                        rng=jax.random.fold_in(jax.random.key(cfg.seed), seed_offset),
                        batch_size=cfg.batch_size, stop=stop) if kept else [])
    return [next(out) if ok else None for ok in fits]


def backtranslate(cfg: BacktranslationConfig, problems: dict[str, dict]
                  ) -> tuple[list[Sample], list[dict], list[str]]:
    """(code samples for scoring, one record per docstring, task ids skipped because a
    Codex-D prompt or every back-translated prompt was too long for its model)."""
    ids = [t for t in problems for _ in range(cfg.n_samples)]
    docs = _sample(cfg.docstring_checkpoint, [codex_d_prompt(problems[t]) for t in ids],
                   temperature=cfg.docstring_temperature, max_new_tokens=cfg.max_docstring_tokens,
                   cfg=cfg, seed_offset=0, stop=())
    prompts = [backtranslation_prompt(problems[t], d.text) if d else None
               for t, d in zip(ids, docs)]
    codes = _sample(cfg.code_checkpoint, prompts,
                    temperature=cfg.code_temperature, max_new_tokens=cfg.max_code_tokens,
                    cfg=cfg, seed_offset=1, stop=STOP)
    usable = {t for t, p, c in zip(ids, prompts, codes) if p is not None and c is not None}
    samples, records = [], []
    for j, (t, d, p, c) in enumerate(zip(ids, docs, prompts, codes)):
        if t not in usable:
            continue
        # A docstring or program that did not fit counts as a failed round trip.
        completion = truncate(c.text) if p is not None and c is not None else ""
        samples.append(Sample(task_id=t, sample_index=j % cfg.n_samples, completion=completion,
                              temperature=cfg.code_temperature))
        records.append({"task_id": t, "sample_index": j % cfg.n_samples,
                        "docstring": d.text if d else None, "completion": completion})
    skipped = [t for t in problems if t not in usable]
    return samples, records, skipped
