"""Where a reward model stands against the labelers it imitates, on the embedded world.

Three measurements, on held-out prompts and held-out labelers:

  pairs      pairwise accuracy by task kind on the held-out comparisons (distinct response
             pairs; a tie scores half) of the reward model, of the policy's own
             log-likelihood of each response (what the reward model starts from) and of
             three judges that know more or less than it could: the gold score, the gold
             score without the answers (`gold_score(knows_answer=False)`: form, honesty,
             harmlessness) and correctness alone (then form).
             The same pairs grouped by the first gold term on which the two responses
             differ (gold.deciding_term): which preferences are visible without the answer.
  best_of_n  the policy's win rate against its own evaluation samples when it draws n
             responses per prompt and keeps the one the reward model (or the likelihood,
             the gold score, or the answer-blind gold score) likes best: what the reward
             model can buy without any training, and what a perfect or an answer-blind
             judge could.
  probes     the reward model's, the likelihood's and the gold judge's change of score when
             the policy's evaluation samples are edited the way RL drifts (reward_probes).
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from instructjax import parallel, rl_ops
from instructjax.data.comparisons import ranks, read_comparisons
from instructjax.data.jsonl import read_jsonl
from instructjax.data.world import gold, labelers as labelers_lib
from instructjax.losses import make_apply, token_log_probs
from instructjax.rlhf import eval_metrics, reward_probes
from instructjax.rlhf.evaluate import labeler_noise
from instructjax.rlhf.generate import generate
from instructjax.sampling import SamplingConfig
from instructjax.train.workdir import load_reward_read, load_trained

Judge = Callable[[dict, str], float]
JUDGES: dict[str, Judge] = {
    "gold": gold.gold_score,
    "no_answers": lambda task, r: gold.gold_score(task, r, knows_answer=False),
    "correctness": lambda task, r: (float(gold.judge(task, r)["correct"])
                                    + 1e-3 * gold.gold_score(task, r, knows_answer=False)),
}


def _scalar_values(values, tokens):
    return values


def _next_token_logprobs(logits, tokens):  # value at t: log p(tokens[t + 1] | tokens[:t + 1])
    return token_log_probs(logits[:, :-1], tokens[:, 1:])


@functools.cache
def _compiled(model, per_token: Callable) -> Callable:
    """One jitted forward per (model, reader), reused across calls."""
    apply = make_apply(model)
    return jax.jit(lambda p, t, pos, seg: per_token(apply(p, t, pos, seg), t))


def _forward(model_params_tok, prompts: Sequence[str], responses: Sequence[str], *, mesh,
             seq_len: int, per_token: Callable, batch_size: int = 64
             ) -> list[tuple[int, int, np.ndarray]]:
    """(prompt length, row length, per_token(model output, tokens)[row]) for each prompt +
    response + EOS (cut to seq_len), run right-padded in batches."""
    model, params, tok = model_params_tok
    run = _compiled(model, per_token)
    dp = parallel.data_parallel_size(mesh)
    batch_size = max(dp, batch_size // dp * dp)
    sharding = parallel.batch_sharding(mesh)
    rows = []
    for p, r in zip(prompts, responses, strict=True):
        prompt = tok.encode(p)
        rows.append((len(prompt), (prompt + tok.encode(r) + [tok.eos_id])[:seq_len]))
    out: list[tuple[int, int, np.ndarray]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = np.full((batch_size, seq_len), tok.pad_id, np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)
        for i, (_, ids) in enumerate(chunk):
            tokens[i, :len(ids)], segments[i, :len(ids)] = ids, 1
        positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
        values = jax.device_get(run(params, *(jax.device_put(a, sharding)
                                              for a in (tokens, positions, segments))))
        out += [(prompt_len, len(ids), values[i]) for i, (prompt_len, ids) in enumerate(chunk)]
    return out


def reward_scores(reward, prompts: Sequence[str], responses: Sequence[str], *, mesh,
                  seq_len: int, read: str = "eos") -> list[float]:
    """The reward model's score of each prompt + response, read as training reads it
    (rl_ops.read_reward) from the rows prompt + response + EOS: 'eos' = at the last real
    token, 'pooled' = also averaged over the response and EOS (a prompt cut at seq_len
    leaves the last token as the response). reward = (model with the scalar head, params,
    tokenizer); `read` as recorded in its workdir (train.workdir.load_reward_read)."""
    rows = _forward(reward, prompts, responses, mesh=mesh, seq_len=seq_len,
                    per_token=_scalar_values)
    if not rows:
        return []
    values_BxT = np.stack([v for _, _, v in rows])
    t_T = np.arange(values_BxT.shape[1])
    real_BxT = np.stack([t_T < n for _, n, _ in rows])
    response_BxT = np.stack([(t_T >= min(p, n - 1)) & (t_T < n) for p, n, _ in rows])
    return np.asarray(rl_ops.read_reward(values_BxT, real_BxT, response_BxT, read)).tolist()


def policy_log_likelihoods(policy, prompts: Sequence[str], responses: Sequence[str], *, mesh,
                           seq_len: int) -> list[float]:
    """log pi(response + EOS | prompt) under a language model: the policy's own judgement,
    the baseline a reward model trained from it should beat."""
    rows = _forward(policy, prompts, responses, mesh=mesh, seq_len=seq_len,
                    per_token=_next_token_logprobs)
    return [float(np.sum(v[prompt_len - 1:n - 1])) for prompt_len, n, v in rows]


def by_kind(task: dict, response_a: str, response_b: str) -> tuple[str, ...]:
    return task["kind"], "all"


def by_deciding_term(task: dict, response_a: str, response_b: str) -> tuple[str, ...]:
    return gold.deciding_term(task, response_a, response_b), "all"


def pair_accuracies(tasks: Sequence[dict], records: Sequence[dict],
                    scores: Mapping[str, Sequence[Sequence[float]]],
                    groups: Callable[[dict, str, str], Sequence[str]] = by_kind
                    ) -> dict[str, dict]:
    """{group: {'pairs': n, name: accuracy}}: how often each scorer (name -> per record,
    per response scores) orders a pair of distinct responses as the record's ranking does;
    equal scores count half. `groups(task, a, b)` names the groups a pair counts in: its
    task kind and 'all' (by_kind), or the gold term that decides it (by_deciding_term)."""
    hits: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r, (task, record) in enumerate(zip(tasks, records, strict=True)):
        place = ranks(record["ranking"])
        responses = record["responses"]
        for a, b in itertools.combinations(range(len(responses)), 2):
            if responses[a] == responses[b]:
                continue
            better, worse = (a, b) if place[a] < place[b] else (b, a)
            for kind in groups(task, responses[a], responses[b]):
                hits[kind]["pairs"] += 1
                for name, s in scores.items():
                    diff = s[r][better] - s[r][worse]
                    hits[kind][name] += 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0
    return {kind: {"pairs": int(h["pairs"]),
                   **{name: h[name] / h["pairs"] for name in scores}}
            for kind, h in sorted(hits.items())}


def judge_scores(tasks: Sequence[dict], response_sets: Sequence[Sequence[str]]
                 ) -> dict[str, list[list[float]]]:
    return {name: [[judge(t, r) for r in rs] for t, rs in zip(tasks, response_sets)]
            for name, judge in JUDGES.items()}


def best_of_n(tasks: Sequence[dict], candidates: Sequence[Sequence[str]],
              reference: Sequence[str], pickers: Mapping[str, np.ndarray],
              pool: Sequence[labelers_lib.Labeler], *, ns: Sequence[int], seed: int = 0
              ) -> dict[str, dict[int, dict]]:
    """{picker: {n: {win_rate, accuracy}}}: candidates[j][i] is draw j for prompt i;
    pickers[name][j, i] its score; the first n draws compete, the best is judged against
    reference[i] by the held-out labelers exactly as the evaluation judges models."""
    out: dict[str, dict[int, dict]] = {}
    for name, score_NxP in pickers.items():
        out[name] = {}
        for n in ns:
            best = np.argmax(np.asarray(score_NxP)[:n], axis=0)
            picks = [candidates[j][i] for i, j in enumerate(best)]
            wins = eval_metrics.win_outcomes(tasks, picks, reference, pool, seed=seed)
            out[name][n] = {"win_rate": float(np.mean(wins)),
                            "accuracy": float(np.mean([gold.judge(t, p)["correct"]
                                                       for t, p in zip(tasks, picks)]))}
    return out


def sample_draws(policy, prompts: Sequence[str], *, n: int, temperature: float,
                 max_new_tokens: int, mesh, seed: int) -> list[list[str]]:
    """n + 1 responses per prompt: draw 0 with key `seed` and the evaluation's settings
    (so it is the policy's evaluation sample), draws 1..n with keys seed + 1 ...: the
    candidates."""
    model, params, tok = policy
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              eos_id=tok.eos_id, pad_id=tok.pad_id)
    return [[g.text for g in generate(params, model, tok, list(prompts), sampling=sampling,
                                      mesh=mesh, rng=jax.random.key(seed + j),
                                      stop=(eval_metrics.FEW_SHOT_SEPARATOR,))]
            for j in range(n + 1)]


def _held_out(data_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(held-out prompts' tasks, held-out comparison records, the task of each record)."""
    tasks = [t for _, t in read_jsonl(data_dir / "prompts_eval.jsonl",
                                      required={"id": str, "prompt": str, "kind": str,
                                                "answer": str})]
    by_id = {t["id"]: t for t in tasks}
    path = data_dir / "comparisons_eval.jsonl"
    records, record_tasks = [], []
    for line, record in read_comparisons(path):
        if record.get("id") not in by_id:
            raise ValueError(f"{path}:{line}: no 'id' of a prompt of prompts_eval.jsonl; this "
                             "analysis needs the world's comparisons (experiments.comparisons)")
        records.append(record)
        record_tasks.append(by_id[record["id"]])
    return tasks, records, record_tasks


def analyse(*, data_dir: str | Path, policy_dir: str | Path, reward_dir: str | Path, mesh,
            best_of: int = 8, temperature: float = 1.0, max_new_tokens: int = 32,
            seq_len: int = 192, seed: int = 0, num_prompts: int = 0) -> dict:
    """The measurements (module docstring) for the world in data_dir (prompts, held-out
    comparisons and their stats), the policy that wrote the comparisons and its reward
    model. Sampling settings and seed are the evaluation's, so the reference responses
    are the policy's own evaluation samples. JSON-serialisable."""
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    data_dir = Path(data_dir)
    tasks, records, record_tasks = _held_out(data_dir)
    stats = json.loads((data_dir / "comparisons_stats.json").read_text())
    reward = load_trained(reward_dir, mesh, head="scalar")
    policy = load_trained(policy_dir, mesh)
    sizes = [len(r["responses"]) for r in records]
    offsets = np.cumsum([0, *sizes])
    pair_prompts = [t["prompt"] for t, k in zip(record_tasks, sizes) for _ in range(k)]
    pair_responses = [x for r in records for x in r["responses"]]
    score_as_trained = functools.partial(reward_scores, read=load_reward_read(reward_dir))
    learnt = {"reward_model": (score_as_trained, reward),
              "policy_loglik": (policy_log_likelihoods, policy)}
    scores = {}
    for name, (scorer, model) in learnt.items():
        flat = scorer(model, pair_prompts, pair_responses, mesh=mesh, seq_len=seq_len)
        scores[name] = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    scores.update(judge_scores(record_tasks, [r["responses"] for r in records]))

    tasks = tasks[:num_prompts] if num_prompts else tasks
    prompts = [t["prompt"] for t in tasks]
    draws = sample_draws(policy, prompts, n=best_of, temperature=temperature,
                         max_new_tokens=max_new_tokens, mesh=mesh, seed=seed)
    reference, candidates = draws[0], draws[1:]
    pickers = {name: np.reshape(scorer(model, prompts * best_of, sum(candidates, []),
                                       mesh=mesh, seq_len=seq_len), (best_of, len(prompts)))
               for name, (scorer, model) in learnt.items()}
    for name in ("gold", "no_answers"):  # a perfect judge, and one blind to the answers
        pickers[name] = np.array([[JUDGES[name](t, r) for t, r in zip(tasks, c)]
                                  for c in candidates])
    probes = reward_probes.run_probes(tasks, reference, {
        name: functools.partial(scorer, model, mesh=mesh, seq_len=seq_len)
        for name, (scorer, model) in learnt.items()})
    noise_scale, label_seed, _ = labeler_noise(data_dir)
    pool = labelers_lib.heldout_labelers(seed=label_seed, noise_scale=noise_scale)
    ns = sorted({n for n in (1, 2, 4, 8, 16, 32) if n < best_of} | {best_of})
    return {"pairs": pair_accuracies(record_tasks, records, scores),
            "decided_by": pair_accuracies(record_tasks, records, scores, by_deciding_term),
            "labeler_agreement": stats["eval"]["labeler_agreement"],
            "best_of_n": best_of_n(tasks, candidates, reference, pickers, pool, ns=ns,
                                   seed=seed),
            "probes": probes,
            "policy": str(policy_dir), "reward_model": str(reward_dir),
            "temperature": temperature, "prompts": len(tasks)}


def format_report(result: dict) -> str:
    pairs = result["pairs"]
    names = ["reward_model", "policy_loglik", *JUDGES]
    lines = [f"Held-out comparisons: pairwise accuracy against the held-out labelers "
             f"(distinct pairs; their agreement with each other: "
             f"{result['labeler_agreement']:.3f})",
             f"{'kind':16s} {'pairs':>6s} " + " ".join(f"{n:>12s}" for n in names)]
    for kind, row in pairs.items():
        lines.append(f"{kind:16s} {row['pairs']:6d} "
                     + " ".join(f"{row[n]:12.3f}" for n in names))
    decided = result["decided_by"]
    total = decided["all"]["pairs"]
    blind = sum(row["pairs"] for term, row in decided.items()
                if term not in ("all", "tie", *gold.ANSWER_TERMS))
    lines += ["", f"The same pairs by the first gold term on which the two responses differ "
              f"(share of pairs; answer-blind terms decide {blind / total:.1%})",
              f"{'decided by':16s} {'share':>6s} " + " ".join(f"{n:>12s}" for n in names)]
    for term in (*gold.TERMS, "tie", "all"):
        if term in decided:
            row = decided[term]
            lines.append(f"{term:16s} {row['pairs'] / total:6.1%} "
                         + " ".join(f"{row[n]:12.3f}" for n in names))
    bon = result["best_of_n"]
    ns = list(next(iter(bon.values())))
    lines += ["", f"Best of n {result['policy']} samples (T={result['temperature']}) against "
              f"its evaluation samples, judged by the held-out labelers "
              f"({result['prompts']} prompts): win rate (gold accuracy)",
              f"{'picked by':16s} " + " ".join(f"{'n=' + str(n):>14s}" for n in ns)]
    for name, row in bon.items():
        lines.append(f"{name:16s} " + " ".join(
            f"{row[n]['win_rate']:7.3f} ({row[n]['accuracy']:.2f})" for n in ns))
    if result.get("probes"):
        lines += ["", f"Probes: edits of the {result['policy']} evaluation samples; mean change "
                  "of each judge's score (share of edits it scores higher)"]
        lines += reward_probes.format_probes(result["probes"],
                                             ["reward_model", "policy_loglik", "gold"])
    return "\n".join(lines)
