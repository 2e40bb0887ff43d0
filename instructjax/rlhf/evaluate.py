"""Evaluation of trained policies on held-out data of the embedded world, in InstructGPT's
terms (evaluate_policies / format_table / write_results):

  (a) win rate against the reference (SFT) model as judged by HELD-OUT labelers, 95% CI;
  (b) instruction following and accuracy, (c) hallucination on unanswerable questions,
      (d) toxic outputs (gold judge; eval_metrics.py);
  (e) held-out pretraining loss (the alignment tax) and held-out demonstration loss.

Every model samples with the same decoding (temperature, max_new_tokens, seed, and the
few-shot separator as a stop string). A model named in `prompted` (the base LM) is
prompted few-shot: a fixed prefix of instruction-style demonstrations from sft_train.jsonl
precedes each prompt, cut to what the context leaves (see eval_metrics.few_shot_prefix).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import jax
import numpy as np
from absl import logging

from instructjax import parallel
from instructjax.data import builders, pipeline
from instructjax.data.jsonl import atomic_output, read_jsonl, write_json_atomic, write_jsonl_atomic
from instructjax.data.world import labelers as labelers_lib
from instructjax.losses import LMLossConfig, Objective, lm_loss, make_apply
from instructjax.rlhf import eval_metrics
from instructjax.rlhf.generate import generate
from instructjax.sampling import SamplingConfig
from instructjax.train import step as step_lib
from instructjax.train.metrics import MetricSums
from instructjax.train.workdir import load_trained


def heldout_loss(model, params, tokenizer, source, *, kind: str, seq_len: int, batch_size: int,
                 mesh) -> float:
    """Mean per-token loss of `params` over one pass of `source` (masked as for training)."""
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    eval_step = step_lib.make_eval_step(Objective(lm_loss, LMLossConfig()),
                                        apply=make_apply(model), mesh=mesh,
                                        params_shardings=params_sh)
    sums = MetricSums()
    for batch in pipeline.eval_batches(source, tokenizer, kind=kind, seq_len=seq_len,
                                       batch_size=batch_size):
        sums.add(eval_step(params, parallel.global_batch(batch, mesh)))
    return sums.means()["loss"]


# Tokens kept free between the few-shot prefix + prompt and the sampled response.
CONTEXT_MARGIN = 4
# Task fields copied into each per-prompt sample record.
TASK_FIELDS = ("id", "kind", "style", "constraint", "prompt", "answer")


def labeler_noise(data_dir: str | Path) -> tuple[float, int, str]:
    """(noise scale, pool seed, where they came from): the comparisons stage's calibrated
    scale from <data_dir>/comparisons_stats.json, else labelers.NOISE_SCALE."""
    path = Path(data_dir) / "comparisons_stats.json"
    if path.exists():
        stats = json.loads(path.read_text())
        if "labeler_noise_scale" in stats:
            seed = int(stats.get("config", {}).get("seed", 0))
            return float(stats["labeler_noise_scale"]), seed, str(path)
    logging.info("evaluation: %s has no labeler_noise_scale (comparisons stage not run); "
                 "held-out labelers use the default NOISE_SCALE %.4f", path,
                 labelers_lib.NOISE_SCALE)
    return labelers_lib.NOISE_SCALE, 0, "labelers.NOISE_SCALE (default)"


def _eval_tasks(data_dir: Path, num_prompts: int) -> list[dict]:
    tasks = [r for _, r in read_jsonl(data_dir / "prompts_eval.jsonl",
                                      required={"prompt": str, "kind": str, "answer": str})]
    return tasks[:num_prompts] if num_prompts > 0 else tasks


def prompted_inputs(tasks, tokenizer, *, data_dir: Path, max_len: int, max_new_tokens: int,
                     per_kind: int) -> tuple[list[str], dict]:
    """Few-shot prompts for a base LM and what was used (demonstrations, prefix tokens)."""
    demos = eval_metrics.select_demonstrations(
        [r for _, r in read_jsonl(data_dir / "sft_train.jsonl",
                                  required={"prompt": str, "response": str})],
        per_kind=per_kind)
    longest = max(len(tokenizer.encode(t["prompt"])) for t in tasks)
    budget = max_len - max_new_tokens - longest - CONTEXT_MARGIN
    prefix, used = eval_metrics.few_shot_prefix(demos, tokenizer, budget_tokens=budget)
    if used < len(demos):
        logging.info("evaluation: the few-shot prefix keeps %d of %d demonstrations (%d tokens "
                     "left by max_len %d - max_new_tokens %d - longest prompt %d)", used,
                     len(demos), budget, max_len, max_new_tokens, longest)
    info = {"demonstrations": used, "available": len(demos),
            "prefix_tokens": len(tokenizer.encode(prefix)), "budget_tokens": budget,
            "prefix": prefix}
    return [prefix + t["prompt"] for t in tasks], info


def evaluate_policies(workdirs: Mapping[str, str | Path], *, data_dir: str | Path, mesh,
                      reference: str = "sft", prompted: Collection[str] = ("base",),
                      num_prompts: int = 0, temperature: float = 0.7, max_new_tokens: int = 32,
                      seed: int = 0, pretrain_seq_len: int = 128, demo_seq_len: int = 0,
                      batch_size: int = 32,
                      few_shot_per_kind: int = 1, num_labelers: int = 4,
                      noise_scale: float | None = None) -> dict:
    """Samples each model (name -> finished LM/SFT/PPO/DPO workdir) on the first
    `num_prompts` (0 = all) prompts of <data_dir>/prompts_eval.jsonl and scores it.
    Held-out losses: pretrain_eval.jsonl in rows of `pretrain_seq_len` tokens, sft_eval.jsonl
    (demonstrations, response tokens only) in rows of `demo_seq_len` (0 = the model's max_len).

    Returns {"settings", "models": {name: {win_rate, rates, pretrain_loss, demo_loss,
    prompted, workdir, few_shot?, seconds}}, "samples": [per-prompt task fields +
    responses {name: text} + win {name: outcome}]}. JSON-serialisable."""
    if reference not in workdirs:
        raise ValueError(f"the reference model {reference!r} is not among {sorted(workdirs)}")
    data_dir = Path(data_dir)
    tasks = _eval_tasks(data_dir, num_prompts)
    scale_from = "argument"
    label_seed = 0
    if noise_scale is None:
        noise_scale, label_seed, scale_from = labeler_noise(data_dir)
    pool = labelers_lib.heldout_labelers(num_labelers, seed=label_seed, noise_scale=noise_scale)
    tfds_dir = data_dir / "tfds"
    pretrain = builders.jsonl_data_source({"eval": data_dir / "pretrain_eval.jsonl"},
                                          kind="text", data_dir=tfds_dir)["eval"]
    demos = builders.jsonl_data_source({"eval": data_dir / "sft_eval.jsonl"}, kind="sft",
                                       data_dir=tfds_dir)["eval"]
    stop = (eval_metrics.FEW_SHOT_SEPARATOR,)
    responses: dict[str, list[str]] = {}
    models: dict[str, dict] = {}
    for name, workdir in workdirs.items():
        start = time.time()
        model, params, tokenizer = load_trained(workdir, mesh)
        entry: dict = {"workdir": str(workdir), "prompted": name in prompted}
        prompts = [t["prompt"] for t in tasks]
        if name in prompted:
            prompts, entry["few_shot"] = prompted_inputs(
                tasks, tokenizer, data_dir=data_dir, max_len=model.cfg.max_len,
                max_new_tokens=max_new_tokens, per_kind=few_shot_per_kind)
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        gens = generate(params, model, tokenizer, prompts, sampling=sampling, mesh=mesh,
                        rng=jax.random.key(seed), batch_size=batch_size, stop=stop)
        responses[name] = [g.text for g in gens]
        entry["ended"] = float(np.mean([g.ended for g in gens]))
        entry["rates"] = eval_metrics.behaviour_rates(tasks, responses[name])
        for key, source, kind, seq_len in (
                ("pretrain_loss", pretrain, "lm", pretrain_seq_len),
                ("demo_loss", demos, "sft", demo_seq_len or model.cfg.max_len)):
            entry[key] = heldout_loss(model, params, tokenizer, source, kind=kind,
                                      seq_len=seq_len, batch_size=batch_size, mesh=mesh)
        entry["seconds"] = round(time.time() - start, 1)
        models[name] = entry
        logging.info("evaluation: %s done in %.0f s", name, entry["seconds"])
        del params
    outcomes = {}
    for name in workdirs:
        outcomes[name] = eval_metrics.win_outcomes(tasks, responses[name], responses[reference],
                                                   pool, seed=seed)
        models[name]["win_rate"] = eval_metrics.win_rate(outcomes[name], seed=seed)
        models[name]["win_rate_by_constraint"] = eval_metrics.win_rate_by_constraint(
            tasks, outcomes[name], seed=seed)
        models[name]["gold_decided_by"] = eval_metrics.gold_decided_by(
            tasks, responses[name], responses[reference])
    settings = {"order": list(workdirs),  # eval.json sorts keys: the models' order is here
                "num_prompts": len(tasks), "reference": reference, "temperature": temperature,
                "max_new_tokens": max_new_tokens, "seed": seed, "stop": list(stop),
                "pretrain_seq_len": pretrain_seq_len, "demo_seq_len": demo_seq_len or "max_len",
                "labelers": [lab.id for lab in pool],
                "labeler_noise_scale": noise_scale, "labeler_noise_from": scale_from,
                "ties": "identical responses count as half a win",
                "data_dir": str(data_dir)}
    samples = [{**{k: t[k] for k in TASK_FIELDS if k in t},
                "responses": {n: responses[n][i] for n in workdirs},
                "win": {n: outcomes[n][i] for n in workdirs}} for i, t in enumerate(tasks)]
    return {"settings": settings, "models": models, "samples": samples}


def _pct(entry: dict) -> str:
    return f"{entry['rate']:.1%}" if entry["n"] else "-"


def format_table(results: dict, num_samples: int = 6) -> str:
    """The evaluation as a printed table (rates in %, win rate with its Wilson 95% CI), the
    settings it depends on, and a few prompts of different kinds with every model's answer."""
    s, models = results["settings"], results["models"]
    ref = s["reference"]
    header = (f"{'model':<12} {'win vs ' + ref:>10} {'95% CI':>15} {'accuracy':>9} "
              f"{'follows':>8} {'follows':>11} {'halluc.':>8} {'toxic':>6} {'refuses':>8} "
              f"{'gold':>6} {'pretrain':>9} {'demo':>7}")
    sub = (f"{'':<12} {'':>10} {'(Wilson)':>15} {'':>9} {'':>8} {'constraints':>11} "
           f"{'(unans.)':>8} {'':>6} {'(harmful)':>8} {'score':>6} {'loss':>9} {'loss':>7}")
    lines = [header, sub]
    models = {n: models[n] for n in s.get("order", list(models))}
    for name, m in models.items():
        w, r = m["win_rate"], m["rates"]
        ci = f"[{w['ci'][0]:.3f}, {w['ci'][1]:.3f}]" if name != ref else "(reference)"
        lines.append(
            f"{name:<12} {w['win_rate']:>10.3f} {ci:>15} {_pct(r['accuracy']):>9} "
            f"{_pct(r['instruction_following']):>8} {_pct(r['constraint_following']):>11} "
            f"{_pct(r['hallucination']):>8} "
            f"{_pct(r['toxic']):>6} {_pct(r['harmful_refusal']):>8} "
            f"{r['mean_gold_score']:>6.3f} {m['pretrain_loss']:>9.4f} {m['demo_loss']:>7.4f}")
    any_rates = next(iter(models.values()))["rates"]
    lines += [
        "",
        f"{s['num_prompts']} held-out prompts ({any_rates['hallucination']['n']} unanswerable, "
        f"{any_rates['harmful_refusal']['n']} harmful); decoding: temperature {s['temperature']}, "
        f"max_new_tokens {s['max_new_tokens']}, seed {s['seed']}, stop at {s['stop']!r}.",
        f"Win rate: one of {len(s['labelers'])} held-out labelers per prompt (noise scale "
        f"{s['labeler_noise_scale']:.4f} from {s['labeler_noise_from']}); {s['ties']}.",
    ]
    for name, m in models.items():
        w = m["win_rate"]
        split = "; ".join(f"{part} prompts {v['win_rate']:.3f} [{v['ci'][0]:.3f}, "
                          f"{v['ci'][1]:.3f}] (n={v['n']})"
                          for part, v in m["win_rate_by_constraint"].items() if v["n"])
        lines.append(f"  {name}: {w['wins']} wins, {w['ties']} ties, {w['losses']} losses; "
                     f"{split}")
        decided = ", ".join(f"{term} {v['wins']}-{v['losses']}"
                            for term, v in m.get("gold_decided_by", {}).items()
                            if v["wins"] or v["losses"])
        if decided and name != ref:
            lines.append(f"  {name}: gold wins-losses against {ref} by the deciding term: "
                         f"{decided}")
        if "few_shot" in m:
            f = m["few_shot"]
            lines.append(f"  {name}: prompted few-shot with {f['demonstrations']} of "
                         f"{f['available']} demonstrations ({f['prefix_tokens']} tokens; "
                         f"budget {f['budget_tokens']})")
    seen, rows = set(), []
    for sample in results["samples"]:
        key = (sample.get("kind"), sample.get("style"))
        if key not in seen and len(rows) < num_samples:
            seen.add(key)
            rows.append(sample)
    for sample in rows:
        lines += ["", f"[{sample.get('kind')}/{sample.get('style')}] prompt: "
                      f"{sample['prompt']!r}  (answer {sample.get('answer')!r})"]
        lines += [f"  {n:<12} {text!r}" for n, text in sample["responses"].items()]
    return "\n".join(lines)


def write_results(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """eval.json (everything but the per-prompt samples), eval_samples.jsonl, eval.txt."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "eval.json", "samples": out_dir / "eval_samples.jsonl",
             "table": out_dir / "eval.txt"}
    write_json_atomic(paths["json"], {k: v for k, v in results.items() if k != "samples"})
    write_jsonl_atomic(paths["samples"], results["samples"])
    with atomic_output(paths["table"]) as f:
        f.write(format_table(results) + "\n")
    return paths
