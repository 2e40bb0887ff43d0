"""Composed problem families: select the numbers of a list that satisfy a predicate, then
aggregate them. Each (aggregate, predicate) cell of the grid is its own family
("sum_positive", "count_below", ...), so a train/test split can hold out whole cells
while every predicate and every aggregate still appears in training: a held-out family
asks for a new combination of known parts, the kind of generalisation HumanEval tests
(its problems are new compositions of familiar operations). See `held_out_cells`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from instructjax.codex.family_lists import Variant, ints, randoms

AGGREGATES = ("sum", "count", "keep", "largest")
PREDICATES = ("positive", "negative", "odd", "above", "below")


def _predicate(r: random.Random, pred: str) -> tuple[str, str, str, Callable[[int], bool]]:
    """(adjective phrase for "the ... numbers", name part, condition on x, reference)."""
    if pred == "positive":
        return "positive", r.choice(("positive", "positives")), "x > 0", lambda x: x > 0
    if pred == "negative":
        return "negative", r.choice(("negative", "negatives")), "x < 0", lambda x: x < 0
    if pred == "odd":
        return "odd", r.choice(("odd", "odds")), r.choice(("x % 2 == 1", "x % 2 != 0")), \
            lambda x: x % 2 == 1
    # k = 0 is left out: "above 0" / "below 0" would be the positive / negative cells.
    k = r.randint(1, 20) if pred == "above" else r.choice([k for k in range(-5, 16) if k])
    word = "above" if pred == "above" else "below"
    comparison = "greater" if pred == "above" else "less"
    named = (f"{word}_{k}", f"{comparison}_than_{k}") if k >= 0 else ()
    name = r.choice((*named, word))  # a negative k cannot be part of an identifier
    if pred == "above":
        return f"greater than {k}", name, f"x > {k}", lambda x: x > k
    return f"less than {k}", name, f"x < {k}", lambda x: x < k


def _phrase(adjective: str, noun: str) -> str:
    """ "positive numbers" / "numbers greater than 5"."""
    return f"{noun} {adjective}" if " " in adjective else f"{adjective} {noun}"


def _variant(r: random.Random, agg: str, pred: str) -> Variant:
    adjective, pred_name, cond, keep = _predicate(r, pred)
    a = r.choice(("numbers", "nums", "values", "xs"))
    what = _phrase(adjective, r.choice(("numbers", "elements", "values")))
    loop = r.random() < 0.5
    if agg == "sum":
        name = r.choice(("sum", "total")) + "_" + pred_name
        doc = r.choice((f"Return the sum of the {what} in {a}.",
                        f"Add up the {what} in {a} and return the total (0 if there are none)."))
        if loop:
            body = (f"    total = 0\n    for x in {a}:\n        if {cond}:\n"
                    f"            total += x\n    return total\n")
        else:
            body = f"    return sum(x for x in {a} if {cond})\n"
        ref, returns = (lambda xs: sum(x for x in xs if keep(x))), "int"
    elif agg == "count":
        name = r.choice(("count", "num", "how_many")) + "_" + pred_name
        doc = r.choice((f"Return how many {what} there are in {a}.",
                        f"Count the {what} in {a}."))
        if loop:
            body = (f"    count = 0\n    for x in {a}:\n        if {cond}:\n"
                    f"            count += 1\n    return count\n")
        else:
            body = r.choice((f"    return sum(1 for x in {a} if {cond})\n",
                             f"    return len([x for x in {a} if {cond}])\n"))
        ref, returns = (lambda xs: sum(1 for x in xs if keep(x))), "int"
    elif agg == "keep":
        name = r.choice(("keep", "filter", "only")) + "_" + pred_name
        doc = r.choice((f"Return a list of the {what} in {a}, in their original order.",
                        f"Keep only the {what} of {a} and return them as a new list."))
        if loop:
            body = (f"    result = []\n    for x in {a}:\n        if {cond}:\n"
                    f"            result.append(x)\n    return result\n")
        else:
            body = f"    return [x for x in {a} if {cond}]\n"
        ref, returns = (lambda xs: [x for x in xs if keep(x)]), "list[int]"
    elif agg == "largest":
        name = r.choice(("largest", "max")) + "_" + pred_name
        doc = r.choice((f"Return the largest of the {what} in {a}, or None if there are none.",
                        f"Find the biggest of the {what} in {a}; return None when {a} has none."))
        if loop:
            body = (f"    best = None\n    for x in {a}:\n"
                    f"        if {cond} and (best is None or x > best):\n"
                    f"            best = x\n    return best\n")
        else:
            body = (f"    chosen = [x for x in {a} if {cond}]\n"
                    f"    return max(chosen) if chosen else None\n")
        ref = lambda xs: max((x for x in xs if keep(x)), default=None)  # noqa: E731
        returns = "int | None"
    else:
        raise ValueError(f"unknown aggregate {agg!r}; aggregates are {AGGREGATES}")
    return Variant(name, ((a, "list[int]"),), returns, doc, body, ref,
                   (([],), ([0],), ([-3, 0, 3],), ([21, -6, 5],)),
                   randoms(r, lambda: (ints(r),)))


def _builder(agg: str, pred: str) -> Callable[[random.Random], Variant]:
    return lambda r: _variant(r, agg, pred)


FAMILIES: dict[str, Callable[[random.Random], Variant]] = {
    f"{agg}_{pred}": _builder(agg, pred) for agg in AGGREGATES for pred in PREDICATES}


def held_out_cells(seed: int) -> tuple[str, ...]:
    """One cell per predicate, the aggregates taken in a seeded cyclic order: every predicate
    keeps len(AGGREGATES) - 1 training cells and every aggregate at least
    len(PREDICATES) - 2, so each part of a held-out cell is seen in training."""
    preds, aggs = list(PREDICATES), list(AGGREGATES)
    rng = random.Random(f"compose-split/{seed}")
    rng.shuffle(preds)
    rng.shuffle(aggs)
    return tuple(sorted(f"{aggs[i % len(aggs)]}_{p}" for i, p in enumerate(preds)))
