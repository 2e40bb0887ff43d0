"""Simulated labelers: they rank K responses to a task by the gold score plus their own noise.

Model (one labeler L, one task t, responses y_1..y_K):

    s_L(y) = gold_score(t, y) + sum_f w_L[kind(t), f] * feature_f(y) + beta_L * G_L(t, y)

and the ranking sorts s_L best first. G_L(t, y) is a standard Gumbel variable drawn from a
hash of (labeler seed, task id, response text, occurrence of that text in the set), so a
ranking is deterministic given the labeler, the task id and the responses, and ties in the
gold score are broken by the noise, never by index (identical texts get their own draw
through the occurrence number). Gumbel noise makes each labeler's ranking a Plackett-Luce
draw with utilities s/beta, hence every pairwise choice a Bradley-Terry one,
P(a beats b) = sigmoid((s_a - s_b) / beta): the model the reward model fits.
w_L is a small per-labeler taste on some task kinds (likes longer or shorter answers, is
more or less lenient with refusals, hedges or extra lines), so labelers disagree
systematically as well as at random; beta_L = NOISE_SCALE * a per-labeler factor in
[0.8, 1.25] (some labelers are more careful than others).

Calibration: NOISE_SCALE was chosen by `calibrate_noise` (bisection on the scale) so that
two different training labelers order the same way 73% of the response pairs of
`perturbed_responses` sets (K = 4..9, resembling model samples: the gold answer and
reformatted versions of it, near misses, rambling extra lines, refusals, "I don't know",
made-up answers, compliance with harmful requests, toxic text, garbage and empty text;
half of them obeying the prompt's explicit constraint where it has one) on
1,200 world tasks (`make_tasks(World(0), 1200, "calibration", set())`): InstructGPT reports
72.6 +- 1.5% inter-annotator agreement. Measured (response sets drawn with random.Random(0),
K = 4..9, 23,196 distinct response pairs): NOISE_SCALE = 0.4469 gives a mean agreement of
0.730 over the 28 pairs of 8 training labelers; held-out vs training labelers 0.734; a
labeler orders pairs with different gold scores as gold does 0.86 of the time. About 12% of
the distinct pairs tie in gold score (e.g. two equally wrong, equally fluent answers);
those the noise and the tastes decide. Agreement depends on the mix of responses (sets with more near-identical
answers agree less): to calibrate on real model samples instead, run `calibrate_noise` on
them and pass its scale as `noise_scale` (experiments.comparisons does).

Training and held-out pools are disjoint: different id prefixes ("train-", "heldout-") and
noise seeds drawn from different streams (checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from collections.abc import Sequence

import numpy as np

from instructjax.data.world import constraints
from instructjax.data.world.facts import COUNTRIES, TOXIC_WORDS, WORDS
from instructjax.data.world.gold import gold_score, is_refusal, normalise, says_idk
from instructjax.data.world.tasks import IDK, KINDS, REFUSAL

__all__ = ["Labeler", "NOISE_SCALE", "training_labelers", "heldout_labelers", "labeler_score",
           "rank", "compare", "agreement", "gold_agreement", "perturbed_responses",
           "label_comparisons", "mean_pool_agreement", "calibrate_noise"]

# Gumbel scale in gold-score units; see the module docstring for how it was calibrated.
NOISE_SCALE = 0.4469
BIAS_SCALE = 0.08  # std of a labeler's taste weights
FEATURES = ("length", "refusal", "idk", "period", "extra_lines")


@dataclasses.dataclass(frozen=True)
class Labeler:
    id: str
    seed: int
    beta: float  # Gumbel scale of this labeler's noise
    # (kind, feature, weight): taste terms added to the gold score on tasks of that kind.
    taste: tuple[tuple[str, str, float], ...] = ()


def _make_pool(prefix: str, n: int, seed: int, noise_scale: float) -> list[Labeler]:
    if n < 1:
        raise ValueError(f"a labeler pool needs at least one labeler, got n={n}")
    rng = random.Random(f"labelers-{prefix}-{seed}")
    pool = []
    for i in range(n):
        taste = []
        for kind in KINDS:
            for feature in rng.sample(FEATURES, 2):
                if rng.random() < 0.5:
                    taste.append((kind, feature, round(rng.gauss(0.0, BIAS_SCALE), 4)))
        pool.append(Labeler(id=f"{prefix}-{i}", seed=rng.getrandbits(63),
                            beta=noise_scale * rng.uniform(0.8, 1.25), taste=tuple(taste)))
    return pool


def training_labelers(n: int = 8, *, seed: int = 0,
                      noise_scale: float = NOISE_SCALE) -> list[Labeler]:
    """The labelers whose rankings train the reward model."""
    return _make_pool("train", n, seed, noise_scale)


def heldout_labelers(n: int = 4, *, seed: int = 0,
                     noise_scale: float = NOISE_SCALE) -> list[Labeler]:
    """Labelers who never produce training data: they judge win rates in evaluation."""
    pool = _make_pool("heldout", n, seed, noise_scale)
    train_seeds = {lab.seed for lab in training_labelers(max(n, 64), seed=seed)}
    if train_seeds & {lab.seed for lab in pool}:  # 63-bit seeds: never in practice
        raise RuntimeError(f"held-out labeler seeds collide with training ones (seed={seed})")
    return pool


def _features(response: str) -> dict[str, float]:
    line = normalise(response)
    return {"length": min(len(line.split()), 20) / 20.0,
            "refusal": float(is_refusal(response)),
            "idk": float(says_idk(response)),
            "period": float(response.rstrip().endswith(".")),
            "extra_lines": float(len(response.strip().split("\n")) > 1)}


def _gumbel(labeler: Labeler, task_key: str, response: str, occurrence: int) -> float:
    digest = hashlib.blake2b(f"{labeler.seed}\0{task_key}\0{occurrence}\0{response}".encode(),
                             digest_size=8).digest()
    u = (int.from_bytes(digest, "little") + 0.5) / 2.0 ** 64
    return -math.log(-math.log(u))


def _task_key(task: dict) -> str:
    return str(task["id"]) if "id" in task else task["prompt"]


def labeler_score(task: dict, response: str, labeler: Labeler, occurrence: int = 0) -> float:
    """The labeler's perceived quality of `response` (higher is better)."""
    kind = task["kind"]
    score = gold_score(task, response)
    if labeler.taste:
        feats = _features(response)
        score += sum(w * feats[f] for k, f, w in labeler.taste if k == kind)
    if labeler.beta:
        score += labeler.beta * _gumbel(labeler, _task_key(task), response, occurrence)
    return score


def _occurrences(responses: Sequence[str]) -> list[tuple[str, int]]:
    """(response, how many times the same text came before it)."""
    seen: dict[str, int] = {}
    out = []
    for r in responses:
        out.append((r, seen.get(r, 0)))
        seen[r] = seen.get(r, 0) + 1
    return out


def _scores(task: dict, responses: Sequence[str], labeler: Labeler) -> list[float]:
    return [labeler_score(task, r, labeler, o) for r, o in _occurrences(responses)]


def rank(task: dict, responses: Sequence[str], labeler: Labeler) -> list[int]:
    """A permutation of range(len(responses)), best first."""
    if not responses:
        raise ValueError("rank needs at least one response")
    scores = _scores(task, responses, labeler)
    return sorted(range(len(responses)), key=lambda i: -scores[i])


def compare(task: dict, response_a: str, response_b: str, labeler: Labeler) -> int:
    """0 if the labeler prefers response_a, 1 if response_b (never a tie)."""
    return rank(task, [response_a, response_b], labeler)[0]


def _orders(ranking: Sequence[int]) -> list[int]:
    position = [0] * len(ranking)
    for place, index in enumerate(ranking):
        position[index] = place
    return position


def agreement(labeler_a: Labeler, labeler_b: Labeler, tasks: Sequence[dict],
              response_sets: Sequence[Sequence[str]]) -> float:
    """The fraction of response pairs (all pairs within each set, pooled) that the two
    labelers order the same way. Pairs of identical texts are left out: there is no
    preference to agree on (sampled sets repeat short answers often)."""
    return float(_pairwise_agreement(_preferences([labeler_a, labeler_b], tasks,
                                                  response_sets))[0, 1])


def _distinct_pairs(response_sets: Sequence[Sequence[str]]):
    """(left, right): flat indices of every pair of different texts within a set, left first."""
    left, right, offset = [], [], 0
    for responses in response_sets:
        i, j = np.triu_indices(len(responses), 1)
        distinct = np.asarray([responses[a] != responses[b] for a, b in zip(i, j)], bool)
        left.append(i[distinct] + offset)
        right.append(j[distinct] + offset)
        offset += len(responses)
    if not offset or not sum(map(len, left)):
        raise ValueError("agreement needs at least one set with two different responses")
    return np.concatenate(left), np.concatenate(right)


def _score_parts(pool: Sequence[Labeler], tasks: Sequence[dict],
                 response_sets: Sequence[Sequence[str]]):
    """([labelers, responses] scores without noise, [labelers, responses] noise): exactly
    labeler_score's two parts, with the gold score and features computed once per response
    (not once per labeler and pair of labelers)."""
    flat = [(t, r, o) for t, rs in zip(tasks, response_sets, strict=True)
            for r, o in _occurrences(rs)]
    gold = np.asarray([gold_score(t, r) for t, r, _ in flat])
    feats = [_features(r) for _, r, _ in flat]
    kinds = [t["kind"] for t, _, _ in flat]
    base = np.asarray([gold + np.asarray([sum(w * f[name] for k, name, w in labeler.taste
                                              if k == kind) for f, kind in zip(feats, kinds)])
                       for labeler in pool])
    noise = np.asarray([[labeler.beta * _gumbel(labeler, _task_key(t), r, o) if labeler.beta
                         else 0.0 for t, r, o in flat] for labeler in pool])
    return base, noise


def _preferences(pool: Sequence[Labeler], tasks: Sequence[dict],
                 response_sets: Sequence[Sequence[str]]):
    """[labelers, distinct pairs] bool: whether each labeler ranks the pair's left response
    first (as `rank` does: ties go to the earlier response)."""
    base, noise = _score_parts(pool, tasks, response_sets)
    left, right = _distinct_pairs(response_sets)
    scores = base + noise
    return scores[:, left] >= scores[:, right]


def _pairwise_agreement(preferences):
    """[labelers, labelers]: the share of pairs each two labelers order alike."""
    p = preferences.astype(np.float64)
    return (p @ p.T + (1 - p) @ (1 - p).T) / p.shape[1]


def gold_agreement(labeler: Labeler, tasks: Sequence[dict],
                   response_sets: Sequence[Sequence[str]]) -> float:
    """The fraction of pairs with different gold scores that the labeler orders as gold."""
    same = total = 0
    for task, responses in zip(tasks, response_sets, strict=True):
        position = _orders(rank(task, responses, labeler))
        gold = [gold_score(task, r) for r in responses]
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                if gold[i] != gold[j]:
                    same += (position[i] < position[j]) == (gold[i] > gold[j])
                    total += 1
    return same / max(total, 1)


# ----------------------------------------------------------------------------- responses


def gold_response(task: dict) -> str:
    """The demonstration if the task has one, else the answer rendered in the task's style."""
    if "response" in task:
        return task["response"]
    answer = task["answer"]
    if task["style"] == "instruction":
        response = answer
    elif task["style"] == "continuation" and task["kind"] not in ("qa_unanswerable", "harmful"):
        response = f" {answer}."
    else:
        response = f" {answer}"
    return constraints.wrap(task["constraint"], response) if task.get("constraint") else response


def _garbage(rng: random.Random) -> str:
    pool = WORDS + ["the", "of", "and", "is", "a", "to", "in", "that", "it", "was", "def",
                    "return", "(", ")", ":", "=", "1", "Q", "A", "Input", "Output"]
    return " ".join(rng.choice(pool) for _ in range(rng.randint(2, 14)))


def _near_miss(task: dict, rng: random.Random) -> str:
    """A wrong answer close to the right one: changed numbers, truncated or shuffled lists,
    half-spelled words, another town's fact, an off-by-one count."""
    answer = task["answer"]
    items = answer.split()
    numbers = [i for i, item in enumerate(items) if re.fullmatch(r"-?[\d,]+", item)]
    choice = rng.randrange(4)
    if numbers and choice == 0:
        i = rng.choice(numbers)
        value = int(items[i].replace(",", "")) + rng.choice([-10, -2, -1, 1, 2, 10])
        items[i] = f"{value:,}" if "," in items[i] else str(value)
        return " ".join(items)
    if len(items) > 2 and choice == 1:
        return " ".join(items[:rng.randint(1, len(items) - 1)])  # a truncated list
    if len(items) > 1 and choice == 2:
        shuffled = items[:]
        while shuffled == items:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    if len(answer) > 2 and choice == 3 and task["kind"] == "string":
        return answer[:rng.randint(1, len(answer) - 1)]
    if task["kind"] == "qa":
        return rng.choice(COUNTRIES + WORDS).capitalize()
    return _garbage(rng) if not items else " ".join(items + [rng.choice(WORDS)])


def _one_response(task: dict, rng: random.Random) -> str:
    kind, answer, gold = task["kind"], task["answer"], gold_response(task)
    lead = "" if task["style"] == "instruction" else " "
    r = rng.random()
    if r < 0.22:
        return gold
    if r < 0.32:  # the right answer, formatted or phrased otherwise
        return lead + rng.choice([answer.lower(), answer + ".", answer + "!",
                                  f"The answer is {answer}.", f"{answer}, I think.",
                                  f"{answer}. That is my final answer, thank you."])
    if r < 0.42:  # the right answer, then rambling on
        return gold + "\n" + rng.choice(["Input: " + _garbage(rng), "Q: " + _garbage(rng),
                                         _garbage(rng), "I hope this helps!"])
    if r < 0.64:  # near misses, or for unanswerable/harmful kinds what a model would say
        if kind == "qa_unanswerable":
            return lead + rng.choice(COUNTRIES + [f"{rng.randint(1, 399) * 100:,}"]) + "."
        if kind == "harmful":
            return lead + rng.choice(["Sure, here it is.", "First, wait until night.",
                                      f"you are a {rng.choice(WORDS)}.", "Go to the river."])
        return lead + _near_miss(task, rng)
    if r < 0.71:
        return lead + REFUSAL
    if r < 0.78:
        return lead + IDK
    if r < 0.81:
        return lead + f"you {rng.choice(TOXIC_WORDS)}."
    if r < 0.84:
        return rng.choice(["", " ", "\n"])
    return lead + _garbage(rng)


def perturbed_responses(task: dict, rng: random.Random, k: int) -> list[str]:
    """k distinct responses resembling samples of a small instruction-tuned model; on a
    prompt with an explicit constraint, half of them obey it."""
    out: list[str] = []
    for _ in range(50 * k):
        response = _one_response(task, rng)
        if task.get("constraint"):
            name = task["constraint"]
            response = constraints.unwrap(name, response)
            if response.strip() and rng.random() < 0.5:
                response = constraints.wrap(name, response)
        if response not in out:
            out.append(response)
        if len(out) == k:
            return out
    while len(out) < k:  # tasks with few plausible responses: pad with garbage
        response = " " + _garbage(rng) + f" {len(out)}"
        if response not in out:
            out.append(response)
    return out


def label_comparisons(tasks: Sequence[dict], response_sets: Sequence[Sequence[str]],
                      labelers: Sequence[Labeler], *, seed: int = 0) -> list[dict]:
    """Comparison records (see instructjax.data.comparisons), one labeler drawn per task."""
    rng = random.Random(f"assign-{seed}")
    records = []
    for task, responses in zip(tasks, response_sets, strict=True):
        labeler = rng.choice(list(labelers))
        record = {"prompt": task["prompt"], "responses": list(responses),
                  "ranking": rank(task, responses, labeler), "labeler": labeler.id,
                  "kind": task["kind"]}
        if "id" in task:
            record["id"] = task["id"]
        records.append(record)
    return records


def mean_pool_agreement(pool: Sequence[Labeler], tasks: Sequence[dict],
                        response_sets: Sequence[Sequence[str]]) -> float:
    """The mean of `agreement` over all pairs of different labelers in the pool."""
    if len(pool) < 2:
        raise ValueError("agreement within a pool needs at least two labelers")
    matrix = _pairwise_agreement(_preferences(pool, tasks, response_sets))
    return float(matrix[np.triu_indices(len(pool), 1)].mean())


def calibrate_noise(tasks: Sequence[dict], response_sets: Sequence[Sequence[str]], *,
                    target: float = 0.73, n_labelers: int = 8, seed: int = 0,
                    steps: int = 24) -> tuple[float, float]:
    """Bisection on the noise scale until training labelers agree on `target` of the pairs
    (mean over labeler pairs, as `mean_pool_agreement`). Returns (noise_scale, agreement).

    A labeler's seed, taste and relative noise factor do not depend on the scale, so the
    noiseless scores and the Gumbel draws are computed once and each step only rescales."""
    pool = training_labelers(n_labelers, seed=seed, noise_scale=1.0)
    base, noise = _score_parts(pool, tasks, response_sets)
    left, right = _distinct_pairs(response_sets)
    upper = np.triu_indices(len(pool), 1)

    def mean_agreement(scale: float) -> float:
        scores = base + scale * noise
        return float(_pairwise_agreement(scores[:, left] >= scores[:, right])[upper].mean())

    lo, hi = 0.01, 5.0
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if mean_agreement(mid) > target else (lo, mid)
    scale = math.sqrt(lo * hi)
    return scale, mean_agreement(scale)
