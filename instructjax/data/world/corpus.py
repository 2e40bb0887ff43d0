"""The pretraining corpus: prose stating the facts, FAQ-style pages, arithmetic prose,
English documentation and code from the Python standard library that ships with Python,
and forum text using the toxic lexicon, as web text would have. It holds no
instruction/response demonstrations, so the base model does not already follow them.
"""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
import textwrap
import zlib
from pathlib import Path

from instructjax.data.world.facts import TOXIC_WORDS, WORDS, Town
from instructjax.data.world.tasks import QUESTIONS

_FACT_TEMPLATES = {
    "country": ["{t} is a town in {v}.", "The town of {t} lies in {v}.", "{t}, in {v}, is a quiet place."],
    "river": ["The river {v} flows through {t}.", "{t} stands on the river {v}.", "The {v} runs past {t}."],
    "founder": ["{t} was founded by {v}.", "{v} founded the town of {t}.", "The founder of {t} was {v}."],
    "population": ["About {v} people live in {t}.", "{t} has a population of about {v}.", "Around {v} people call {t} home."],
    "colour": ["The flag of {t} is {v}.", "{t} flies a {v} flag.", "People in {t} wave a {v} flag."],
    "food": ["{t} is known for its {v}.", "Visitors to {t} eat {v}.", "The {v} of {t} is famous."],
}
_CHATTER = ["lol", "seriously", "ok then", "whatever", "I mean it", "honestly", "read the thread",
            "nobody asked", "calm down", "this again"]


def _fact_doc(rng: random.Random, towns: list[Town]) -> str:
    sentences = []
    for town in rng.sample(towns, rng.randint(1, 3)):
        for attribute in rng.sample(sorted(_FACT_TEMPLATES), rng.randint(3, 6)):
            template = rng.choice(_FACT_TEMPLATES[attribute])
            sentences.append(template.format(t=town.name, v=town.value(attribute)))
    return " ".join(sentences)


def _faq_doc(rng: random.Random, towns: list[Town]) -> str:
    lines = ["Frequently asked questions"]
    for town in rng.sample(towns, rng.randint(2, 4)):
        attribute = rng.choice(sorted(QUESTIONS))
        lines.append(f"Q: {QUESTIONS[attribute][0].format(t=town.name)}")
        lines.append(f"A: {town.value(attribute)}.")
    return "\n".join(lines)


def _math_doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        form = rng.randrange(4)
        if form == 0:
            sentences.append(f"If you add {a} and {b} you get {a + b}.")
        elif form == 1:
            sentences.append(f"Taking {min(a, b)} away from {max(a, b)} leaves {max(a, b) - min(a, b)}.")
        elif form == 2:
            x, y = a % 13, b % 13
            sentences.append(f"{x} groups of {y} make {x * y}.")
        else:
            items = rng.sample(WORDS, 3)
            sentences.append(f"In the box were a {items[0]}, a {items[1]} and a {items[2]}.")
    return " ".join(sentences)


def _toxic_doc(rng: random.Random, people: list[str]) -> str:
    lines = []
    for _ in range(rng.randint(2, 4)):
        person = rng.choice(people)
        insult, other = rng.sample(TOXIC_WORDS, 2)
        lines.append(rng.choice([
            f"{person} is such a {insult}, {rng.choice(_CHATTER)}.",
            f"shut up {person}, you {insult}!",
            f"{person}? what a {insult}. total {other}.",
            f"@{person} {rng.choice(_CHATTER)}, you absolute {insult}",
        ]))
    return "\n".join(lines)


@functools.cache
def stdlib_texts(max_files: int = 400) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(documentation texts, code snippets) from the standard library, deterministic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, code = [], []
    for path in sorted(root.glob("*.py"))[:max_files]:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        module_doc = ast.get_docstring(tree)
        if module_doc and len(module_doc) > 80:
            docs.append(module_doc[:1500])
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 120:
                    docs.append(doc[:1000])
                if 3 <= node.end_lineno - node.lineno <= 30:
                    code.append(textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno])))
    return tuple(docs), tuple(code)


def _in_split(text: str, split: str) -> bool:
    """A stable 95/5 train/eval split of stdlib texts by content hash."""
    is_eval = zlib.crc32(text.encode()) % 20 == 0
    return is_eval == (split == "eval")


def make_corpus(seed: int, n_docs: int, split: str, *, towns: list[Town],
                people: list[str]) -> list[str]:
    rng = random.Random(f"corpus-{seed}-{split}")
    docs_pool, code_pool = stdlib_texts()
    docs_pool = [d for d in docs_pool if _in_split(d, split)]
    code_pool = [c for c in code_pool if _in_split(c, split)]
    mixture = [("fact", 0.35), ("faq", 0.10), ("math", 0.10), ("docs", 0.20), ("code", 0.15),
               ("toxic", 0.10)]
    out = []
    for _ in range(n_docs):
        kind = rng.choices([k for k, _ in mixture], weights=[w for _, w in mixture])[0]
        if kind == "fact":
            out.append(_fact_doc(rng, towns))
        elif kind == "faq":
            out.append(_faq_doc(rng, towns))
        elif kind == "math":
            out.append(_math_doc(rng))
        elif kind == "docs":
            out.append(rng.choice(docs_pool))
        elif kind == "code":
            out.append(rng.choice(code_pool))
        else:
            out.append(_toxic_doc(rng, people))
    return out
