"""Evaluation of trained policies on held-out data of the embedded world.

So far: held-out demonstration loss and gold-judged greedy samples for any set of models
(the base model and the SFT model in the demo).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from instructjax import parallel
from instructjax.data import builders, pipeline
from instructjax.data.jsonl import read_jsonl
from instructjax.losses import LMLossConfig, Objective, lm_loss, make_apply, reduce_metrics
from instructjax.rlhf.generate import generate
from instructjax.sampling import SamplingConfig
from instructjax.train import step as step_lib
from instructjax.train.run import load_trained


def heldout_loss(model, params, tokenizer, source, *, kind: str, seq_len: int, batch_size: int,
                 mesh) -> float:
    """Mean per-token loss of `params` over one pass of `source` (masked as for training)."""
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    eval_step = step_lib.make_eval_step(Objective(lm_loss, LMLossConfig()),
                                        apply=make_apply(model), mesh=mesh,
                                        params_shardings=params_sh)
    totals = {"loss": [0.0, 0.0]}
    for batch in pipeline.eval_batches(source, tokenizer, kind=kind, seq_len=seq_len,
                                       batch_size=batch_size):
        s, w = jax.device_get(eval_step(params, parallel.global_batch(batch, mesh)))["loss"]
        totals["loss"][0] += float(s)
        totals["loss"][1] += float(w)
    return reduce_metrics(totals)["loss"]


@dataclasses.dataclass
class ModelReport:
    name: str
    heldout_loss: float
    gold_accuracy: float       # fraction of held-out prompts answered correctly (gold judge)
    mean_gold_score: float
    responses: list[str]


def compare_models(workdirs: dict[str, str | Path], sft_eval_file: str | Path, *, mesh,
                   data_dir: str | Path, seq_len: int, num_prompts: int = 64,
                   max_new_tokens: int = 32, seed: int = 0) -> list[ModelReport]:
    """Held-out demonstration loss and greedy-sample accuracy of each model under the gold judge."""
    from instructjax.data import world
    tasks = [record for _, record in read_jsonl(sft_eval_file, required={"prompt": str, "response": str})]
    tasks = tasks[:num_prompts]
    source = builders.jsonl_data_source({"eval": sft_eval_file}, kind="sft",
                                        data_dir=Path(data_dir) / "tfds")["eval"]
    reports = []
    for name, workdir in workdirs.items():
        model, params, tokenizer = load_trained(workdir, mesh)
        loss = heldout_loss(model, params, tokenizer, source, kind="sft", seq_len=seq_len,
                            batch_size=32, mesh=mesh)
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        gens = generate(params, model, tokenizer, [t["prompt"] for t in tasks], sampling=sampling,
                        mesh=mesh, rng=jax.random.key(seed))
        judged = [world.judge(t, g.text) for t, g in zip(tasks, gens)]
        scores = [world.gold_score(t, g.text) for t, g in zip(tasks, gens)]
        reports.append(ModelReport(
            name=name, heldout_loss=loss,
            gold_accuracy=float(np.mean([j["correct"] for j in judged])),
            mean_gold_score=float(np.mean(scores)), responses=[g.text for g in gens]))
    return reports


def format_report(reports: list[ModelReport], sft_eval_file: str | Path, num_rows: int = 6) -> str:
    tasks = [record for _, record in read_jsonl(sft_eval_file, required={"prompt": str})]
    lines = ["model        held-out loss   gold accuracy   mean gold score"]
    for r in reports:
        lines.append(f"{r.name:<12} {r.heldout_loss:>13.4f}   {r.gold_accuracy:>13.1%}   "
                     f"{r.mean_gold_score:>15.3f}")
    # Show a spread of task kinds, not the first few of one kind.
    seen, rows = set(), []
    for i, t in enumerate(tasks[:len(reports[0].responses)]):
        key = (t.get("kind"), t.get("style"))
        if key not in seen:
            seen.add(key)
            rows.append(i)
        if len(rows) == num_rows:
            break
    for i in rows:
        t = tasks[i]
        lines.append("")
        lines.append(f"[{t.get('kind')}/{t.get('style')}] prompt: {t['prompt']!r}")
        lines.append(f"  {'gold':<10} {t.get('response', '')!r}")
        for r in reports:
            lines.append(f"  {r.name:<10} {r.responses[i]!r}")
    return "\n".join(lines)
