"""A seeded generator of simple programming problems in HumanEval format, for Codex-S
training and for a held-out evaluation on problem FAMILIES never seen in training.

A family is one task idea (family_lists.py, family_strings.py) or one combination of a
predicate and an aggregate (family_compose.py); each of its variants draws names,
constants, docstring phrasing, type-hint style and solution style, so one family yields
many distinct problems. A problem is a dict with task_id ("Gen/<family>/<i>"),
prompt (imports + signature + docstring with 1-2 examples, ending in a newline),
canonical_solution (the indented body), test (`check(candidate)`: asserts on edge cases and
random inputs, expected values from the family's reference implementation), entry_point
and family. Everything depends only on the seed, so reruns give identical files.
"""

from __future__ import annotations

import copy
import itertools
import random
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

from instructjax.codex import family_compose, family_lists, family_strings
from instructjax.data.jsonl import write_jsonl_atomic

_PLAIN = {**family_lists.FAMILIES, **family_strings.FAMILIES}  # one idea each
FAMILIES = {**_PLAIN, **family_compose.FAMILIES}
assert len(FAMILIES) == sum(map(len, (family_lists.FAMILIES, family_strings.FAMILIES,
                                       family_compose.FAMILIES)))  # no name defined twice
HINT_STYLES = ("none", "builtin", "typing")  # no hints, list[int], List[int]
_MAX_MISSES = 2000  # draws in a row without a new problem: the family is exhausted
_TYPING = {"list": "List", "dict": "Dict", "tuple": "Tuple"}


def family_names() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def _hint(annotation: str, style: str) -> tuple[str, set[str]]:
    """An annotation in `style`, and the names it needs from `typing`."""
    if style == "builtin":
        return annotation, set()
    needed = set()
    optional = re.fullmatch(r"(.+) \| None", annotation)
    if optional:
        annotation = f"Optional[{optional.group(1)}]"
        needed.add("Optional")

    def swap(match):
        needed.add(_TYPING[match.group(1)])
        return _TYPING[match.group(1)] + "["
    return re.sub(r"\b(list|dict|tuple)\[", swap, annotation), needed


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def _pick_examples(pairs: list[tuple], n: int) -> list[tuple]:
    """Up to n (args, result) pairs with different results, non-empty results first, so the
    docstring's examples show what the function does rather than its trivial cases."""
    shown: list[tuple] = []
    for args, want in sorted(pairs, key=lambda pair: not pair[1]):
        if len(shown) < n and all(want != w for _, w in shown):
            shown.append((args, want))
    return shown


def _render(family: str, index: int, variant, style: str, n_examples: int,
            example_intro: str) -> tuple[tuple, dict]:
    """(identity key, problem dict) for one variant."""
    typing_names: set[str] = set()
    params = []
    for pname, annotation in variant.params:
        if style == "none":
            params.append(pname)
        else:
            hint, needed = _hint(annotation, style)
            typing_names |= needed
            params.append(f"{pname}: {hint}")
    returns = ""
    if style != "none":
        hint, needed = _hint(variant.returns, style)
        typing_names |= needed
        returns = f" -> {hint}"
    imports = list(variant.imports)
    if typing_names:
        imports.insert(0, f"from typing import {', '.join(sorted(typing_names))}")
    signature = f"def {variant.name}({', '.join(params)}){returns}:\n"
    doc_lines = textwrap.wrap(variant.doc, width=80)
    key = (tuple(imports), signature, variant.doc)

    inputs, seen = [], set()
    for args in variant.random_inputs + variant.edge_inputs:
        if repr(args) not in seen:
            seen.add(repr(args))
            inputs.append(args)
    expected = [variant.reference(*copy.deepcopy(args)) for args in inputs]
    examples = [] if not example_intro else [example_intro]
    drawn = {repr(args) for args in variant.random_inputs}
    pairs = [(args, want) for args, want in zip(inputs, expected) if repr(args) in drawn]
    for args, want in _pick_examples(pairs, n_examples):
        examples += [f">>> {_call(variant.name, args)}", repr(want)]
    docstring = '    """' + "\n    ".join(doc_lines + examples) + '\n    """\n'
    prompt = ("\n".join(imports) + "\n\n\n" if imports else "") + signature + docstring
    test = "def check(candidate):\n" + "".join(
        f"    assert {_call('candidate', args)} == {want!r}\n" for args, want in zip(inputs, expected))
    return key, {"task_id": f"Gen/{family}/{index}", "prompt": prompt,
                 "canonical_solution": variant.body, "test": test,
                 "entry_point": variant.name, "family": family}


def _family_problems(seed: int, family: str, count: int) -> list[dict]:
    builder, keys, out, misses = FAMILIES[family], set(), [], 0
    for attempt in itertools.count():
        if len(out) == count:
            return out
        if misses > _MAX_MISSES:
            raise ValueError(f"problem family {family!r} gave only {len(out)} distinct problems "
                             f"({misses} draws in a row repeated one); ask for fewer per "
                             f"family (got {count})")
        r = random.Random(f"{seed}/{family}/{attempt}")  # str seeds hash the same everywhere
        variant = builder(r)
        key, problem = _render(family, len(out), variant, r.choice(HINT_STYLES),
                               r.choice((1, 2)), r.choice(("", "", "For example:")))
        misses += 1
        if key not in keys:
            keys.add(key)
            out.append(problem)
            misses = 0
    raise AssertionError("unreachable")


def generate(seed: int, per_family: int, families: Sequence[str] | None = None) -> list[dict]:
    """`per_family` distinct problems from each family (all families by default), in family
    order. The first n problems of a family do not depend on per_family."""
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    names = family_names() if families is None else tuple(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown problem families {unknown}; choose from {list(family_names())}")
    if len(set(names)) != len(names):
        raise ValueError(f"families listed twice: {sorted(f for f in set(names) if names.count(f) > 1)}")
    return [p for family in names for p in _family_problems(seed, family, per_family)]


def split_families(seed: int, test_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train families, held-out test families). The one-idea families are split at random
    (seeded), `test_fraction` of them held out, at least one on each side; the composed
    families by `family_compose.held_out_cells`, so that a held-out combination is made of
    parts seen in training. Problems of a test family never appear in training."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    names = sorted(_PLAIN)
    random.Random(f"split/{seed}").shuffle(names)
    n_test = min(max(1, round(len(names) * test_fraction)), len(names) - 1)
    test = set(names[:n_test]) | set(family_compose.held_out_cells(seed))
    return (tuple(sorted(set(FAMILIES) - test)), tuple(sorted(test)))


def _index(problem: dict) -> int:
    """i of a problem's task_id "Gen/<family>/<i>": its place among its family's problems."""
    return int(problem["task_id"].rsplit("/", 1)[1])


def problem_splits(seed: int, per_family_train: int, per_family_test: int,
                   test_fraction: float) -> dict[str, list[dict]]:
    """{"train": problems of the training families, "test": of the held-out families,
    "new_instances": up to per_family_test more problems of each TRAINING family whose
    canonical body is the body of no training problem}. New instances ask for a known idea
    with other constants, names or phrasing: an easier held-out set than new families."""
    train_families, test_families = split_families(seed, test_fraction)
    more = generate(seed, per_family_train + per_family_test, train_families)
    train = [p for p in more if _index(p) < per_family_train]
    bodies = {p["canonical_solution"] for p in train}
    new = [p for p in more if _index(p) >= per_family_train
           and p["canonical_solution"] not in bodies]
    return {"train": train, "test": generate(seed, per_family_test, test_families),
            "new_instances": new}


def write_problem_files(out_dir: str | Path, seed: int, per_family_train: int,
                        per_family_test: int, test_fraction: float) -> dict[str, Path]:
    """Writes problems_<split>.jsonl for each split of `problem_splits` (atomically) into
    out_dir, in the format instructjax.codex.problems.load_problems reads; returns
    {split: path}."""
    splits = problem_splits(seed, per_family_train, per_family_test, test_fraction)
    paths = {split: Path(out_dir) / f"problems_{split}.jsonl" for split in splits}
    for split, problems in splits.items():
        write_jsonl_atomic(paths[split], problems)
    return paths
