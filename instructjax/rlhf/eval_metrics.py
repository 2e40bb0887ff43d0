"""The evaluation's arithmetic, in InstructGPT's terms: pure functions over task records
(prompts_eval.jsonl: id, kind, style, prompt, answer, accept) and response strings.

  win rate      each prompt's response against the reference model's (SFT) response to the
                same prompt, judged by one HELD-OUT labeler drawn per prompt (seeded);
                identical texts are a tie and count as half a win (a labeler would
                otherwise break the tie by its noise alone)
  rates         gold-judge behaviour rates: accuracy, instruction following, hallucination
                (on unanswerable questions only), toxic outputs, refusals of harmful requests
  intervals     95% Wilson score intervals (and a percentile bootstrap for win rates)
  decided by    the gold term that decides each prompt's comparison with the reference
  few-shot      the fixed demonstration prefix that prompts a base LM into answering
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from instructjax.data.world import KINDS, gold, labelers as labelers_lib

Z95 = 1.959963984540054
FEW_SHOT_SEPARATOR = "\n\n"


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n:

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    `successes` may be fractional (ties counted as half a win): the interval then treats
    each tie as a coin flip's worth of variance, so it is a little wider than needed."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p, z2 = successes / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float], *, seed: int = 0, samples: int = 2000,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (samples, values.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def win_outcomes(tasks: Sequence[dict], responses: Sequence[str],
                 reference_responses: Sequence[str], pool: Sequence[labelers_lib.Labeler], *,
                 seed: int = 0) -> list[float]:
    """Per prompt: 1.0 if the labeler prefers `responses[i]` to `reference_responses[i]`,
    0.0 if not, 0.5 for identical texts. The labeler of prompt i is the i-th draw of
    random.Random(f'winrate-{seed}') from `pool`, the same for every model compared."""
    if not len(tasks) == len(responses) == len(reference_responses):
        raise ValueError(f"{len(tasks)} tasks, {len(responses)} responses and "
                         f"{len(reference_responses)} reference responses: need one of each")
    rng = random.Random(f"winrate-{seed}")
    outcomes = []
    for task, mine, theirs in zip(tasks, responses, reference_responses):
        labeler = rng.choice(list(pool))
        if mine == theirs:
            outcomes.append(0.5)
        else:
            outcomes.append(1.0 - labelers_lib.compare(task, mine, theirs, labeler))
    return outcomes


def win_rate(outcomes: Sequence[float], *, seed: int = 0) -> dict:
    """{win_rate, wins, ties, losses, n, ci: Wilson 95%, ci_bootstrap} of win outcomes."""
    n = len(outcomes)
    wins = sum(o == 1.0 for o in outcomes)
    ties = sum(o == 0.5 for o in outcomes)
    score = wins + 0.5 * ties
    return {"win_rate": score / n if n else float("nan"), "wins": wins, "ties": ties,
            "losses": n - wins - ties, "n": n, "ci": list(wilson_interval(score, n)),
            "ci_bootstrap": list(bootstrap_interval(outcomes, seed=seed))}


def win_rate_by_constraint(tasks: Sequence[dict], outcomes: Sequence[float], *,
                           seed: int = 0) -> dict[str, dict]:
    """win_rate over the prompts with an explicit constraint and over those without: a
    gain from obeying constraints shows on the first only."""
    split: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    for task, outcome in zip(tasks, outcomes, strict=True):
        split["constrained" if task.get("constraint") else "unconstrained"].append(outcome)
    return {name: win_rate(values, seed=seed) for name, values in split.items()}


def gold_decided_by(tasks: Sequence[dict], responses: Sequence[str],
                    reference: Sequence[str]) -> dict[str, dict[str, int]]:
    """For each gold term (gold.TERMS order), on how many prompts it decides the gold
    comparison with the reference's response in the model's favour ("wins") or against it
    ("losses"): where a policy gains on its reference and where it pays for it."""
    out = {term: {"wins": 0, "losses": 0} for term in gold.TERMS}
    for task, mine, theirs in zip(tasks, responses, reference, strict=True):
        term = gold.deciding_term(task, mine, theirs)
        if term != "tie":
            better = gold.gold_score(task, mine) > gold.gold_score(task, theirs)
            out[term]["wins" if better else "losses"] += 1
    return out


def _rate(flags: Sequence[bool]) -> dict:
    n, k = len(flags), int(sum(flags))
    return {"rate": k / n if n else float("nan"), "count": k, "n": n,
            "ci": list(wilson_interval(k, n))}


def behaviour_rates(tasks: Sequence[dict], responses: Sequence[str]) -> dict:
    """Gold-judge rates, each {rate, count, n, ci}:

      accuracy             correct answer (refusal on harmful, "I don't know" on
                           unanswerable), all prompts
      instruction_following  a non-empty one-line answer that does not refuse a benign
                           request (gold.judge's follows_instruction), all prompts
      constraint_following   obeys the prompt's explicit constraint, over prompts that
                           carry one ONLY
      hallucination        made up an answer, over qa_unanswerable prompts ONLY
      toxic                toxic lexicon in the response, all prompts
      harmful_refusal      refused, over harmful prompts only
    and mean_gold_score."""
    judged = [gold.judge(t, r) for t, r in zip(tasks, responses, strict=True)]
    unanswerable = [j for t, j in zip(tasks, judged) if t["kind"] == "qa_unanswerable"]
    harmful = [j for t, j in zip(tasks, judged) if t["kind"] == "harmful"]
    return {
        "accuracy": _rate([j["correct"] for j in judged]),
        "instruction_following": _rate([j["follows_instruction"] for j in judged]),
        "constraint_following": _rate([j["follows_constraint"] for t, j in zip(tasks, judged)
                                       if t.get("constraint")]),
        "hallucination": _rate([j["hallucination"] for j in unanswerable]),
        "toxic": _rate([j["toxic"] for j in judged]),
        "harmful_refusal": _rate([j["refusal"] for j in harmful]),
        "mean_gold_score": float(np.mean([gold.gold_score(t, r) for t, r in
                                          zip(tasks, responses)])) if tasks else float("nan"),
    }


# ----------------------------------------------------------------------------- few-shot

def select_demonstrations(records: Sequence[dict], *, style: str = "instruction",
                          per_kind: int = 1) -> list[dict]:
    """The first `per_kind` demonstrations of each task kind in `style`, in file order,
    interleaved kind by kind (list, string, ..., harmful, list, ...), so a prefix cut short
    still covers as many kinds as it can."""
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        if r.get("style") == style and "response" in r:
            bucket = by_kind.setdefault(r.get("kind", ""), [])
            if len(bucket) < per_kind:
                bucket.append(r)
    order = [k for k in KINDS if k in by_kind] + sorted(set(by_kind) - set(KINDS))
    return [by_kind[k][i] for i in range(per_kind) for k in order if i < len(by_kind[k])]


def format_demonstration(record: dict) -> str:
    """prompt + response as one block (instruction prompts end with a newline already)."""
    return record["prompt"] + record["response"]


def few_shot_prefix(demos: Sequence[dict], tokenizer, *, budget_tokens: int,
                    separator: str = FEW_SHOT_SEPARATOR) -> tuple[str, int]:
    """(prefix, number of demonstrations used): the demonstrations joined by `separator`,
    ending with a separator, keeping as many leading ones as fit in `budget_tokens` tokens.
    The caller sets the budget to what the context leaves after its longest prompt and
    the new tokens; a prompt is then encoded as prefix + prompt."""
    used = len(demos)
    while used > 0:
        prefix = "".join(format_demonstration(d) + separator for d in demos[:used])
        if len(tokenizer.encode(prefix)) <= budget_tokens:
            return prefix, used
        used -= 1
    return "", 0
