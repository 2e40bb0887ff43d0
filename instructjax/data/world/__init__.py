"""The embedded world: a deterministic synthetic InstructGPT setting with a gold judge.

write_world() writes, atomically and only when missing or made with other settings:
  pretrain_train.jsonl / pretrain_eval.jsonl   {"text"}
  sft_train.jsonl / sft_eval.jsonl             {"id","prompt","response","kind","style","answer",
                                                "accept","constraint","demonstrator",...}
  sft_train_diligent.jsonl                     sft_train's records of the diligent demonstrators
  prompts_train.jsonl / prompts_eval.jsonl     the same without "response" (for RM / PPO / evaluation)
All prompt sets are pairwise disjoint. A share of the prompts (CONSTRAINT_RATE, by style)
carries an explicit constraint on the answer's form (constraints.py); demonstrations are
written by demonstrators of mixed diligence (demonstrators.py), who obey it only sometimes.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import random
import re
from pathlib import Path

from instructjax.data.jsonl import write_jsonl_atomic
from instructjax.data.world import constraints, corpus, demonstrators
from instructjax.data.world.corpus import make_corpus, stdlib_texts
from instructjax.data.world.facts import (COLOURS, COUNTRIES, FOODS, TOXIC_WORDS, WORDS,
                                          make_name, make_towns, unknown_names)
from instructjax.data.world.gold import gold_score, is_refusal, is_toxic, judge, normalise
from instructjax.data.world.tasks import IDK, KINDS, QUESTIONS, REFUSAL, STYLES, make_task

__all__ = ["write_world", "make_tasks", "judge", "gold_score", "normalise", "is_refusal",
           "is_toxic", "KINDS", "STYLES", "REFUSAL", "IDK"]
FILES = ("pretrain_train", "pretrain_eval", "sft_train", "sft_eval", "sft_train_diligent",
         "prompts_train", "prompts_eval")
# The share of prompts of each style that carry an explicit constraint.
CONSTRAINT_RATE = {"instruction": 0.9, "few_shot": 0.9, "continuation": 0.6}


@functools.cache
def _corpus_vocabulary() -> frozenset[str]:
    """The words the corpus holds besides the world's names: standard-library texts, the
    string literals (templates) of corpus.py, the FAQ questions and the lexicons."""
    docs, code = stdlib_texts()
    literals = [node.value for node in ast.walk(ast.parse(inspect.getsource(corpus)))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    questions = [q for pair in QUESTIONS.values() for q in pair]
    texts = [*docs, *code, *literals, *questions, *COUNTRIES, *COLOURS, *FOODS, *TOXIC_WORDS]
    return frozenset(re.findall(r"[A-Za-z]+", "\n".join(texts)))


class World:
    """The entities every split draws from."""

    def __init__(self, seed: int):
        self.seed = seed
        self.towns = make_towns(seed)
        rng = random.Random(f"people-{seed}")
        self.people = sorted({make_name(rng, 2) for _ in range(80)})
        # Real words plus made-up ones, so string tasks have thousands of distinct prompts.
        self.words = list(WORDS) + sorted({make_name(rng, 2).lower() for _ in range(600)})
        # Drawn last, so they avoid every name and word above and every word of the corpus.
        names = {name for t in self.towns for name in (t.name, t.river, *t.founder.split())}
        self.unknown = unknown_names(seed, names | set(self.people) | set(self.words) |
                                     _corpus_vocabulary(), count=300)


def make_tasks(world: World, n: int, split: str, exclude: set[str]) -> list[dict]:
    """n tasks cycling over kind x style, with prompts not in `exclude` (which grows)."""
    rng = random.Random(f"tasks-{world.seed}-{split}")
    draw_constraint = random.Random(f"constraints-{world.seed}-{split}")
    tasks = []
    combos = [(k, s) for k in KINDS for s in STYLES]
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {split} prompts; ask for fewer")
        kind, style = combos[len(tasks) % len(combos)]
        constraint = (draw_constraint.choice(constraints.NAMES)
                      if draw_constraint.random() < CONSTRAINT_RATE[style] else "")
        task = make_task(rng, kind, style, towns=world.towns, unknown=world.unknown,
                         people=world.people, words=world.words, constraint=constraint)
        if task["prompt"] in exclude:
            continue
        exclude.add(task["prompt"])
        tasks.append({"id": f"{split}-{len(tasks)}", **task})
    rng.shuffle(tasks)
    return tasks


def write_world(out_dir: str | Path, *, seed: int = 0, n_pretrain_docs: int = 4000,
                n_sft_train: int = 4000, n_sft_eval: int = 600, n_prompts: int = 2000
                ) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"{name}.jsonl" for name in FILES}
    settings = dict(seed=seed, n_pretrain_docs=n_pretrain_docs, n_sft_train=n_sft_train,
                    n_sft_eval=n_sft_eval, n_prompts=n_prompts, version=5)
    manifest = out_dir / "world.json"
    if manifest.exists() and all(p.exists() for p in paths.values()):
        if json.loads(manifest.read_text()) == settings:
            return paths
    world = World(seed)
    n_eval_docs = max(50, n_pretrain_docs // 20)
    write_jsonl_atomic(paths["pretrain_train"], ({"text": t} for t in make_corpus(
        seed, n_pretrain_docs, "train", towns=world.towns, people=world.people)))
    write_jsonl_atomic(paths["pretrain_eval"], ({"text": t} for t in make_corpus(
        seed, n_eval_docs, "eval", towns=world.towns, people=world.people)))
    seen: set[str] = set()
    pool = demonstrators.make_demonstrators(seed)
    for name, n in (("sft_train", n_sft_train), ("sft_eval", n_sft_eval)):
        demos = demonstrators.demonstrate(make_tasks(world, n, name, seen), pool, seed=seed,
                                          split=name)
        write_jsonl_atomic(paths[name], demos)
        if name == "sft_train":
            write_jsonl_atomic(paths["sft_train_diligent"], (
                d for d in demos if d["diligence"] >= demonstrators.DILIGENT_MIN))
    for name, n in (("prompts_train", n_prompts), ("prompts_eval", n_sft_eval)):
        tasks = make_tasks(world, n, name, seen)
        write_jsonl_atomic(paths[name], ({k: v for k, v in t.items() if k != "response"}
                                         for t in tasks))
    tmp = manifest.with_name("world.json.tmp")
    tmp.write_text(json.dumps(settings))
    tmp.replace(manifest)
    return paths
