"""The world's fact base: fictional towns with a few attributes each, plus lexicons.

Everything is derived from a seed with a local random.Random; nothing global.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gl", "kr", "pl", "st", "tr", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k"]

COUNTRIES = ["Arvonia", "Belmark", "Corvessa", "Dunmora", "Estria", "Falwen"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]
FOODS = ["fish stew", "plum cake", "barley bread", "goat cheese", "honey buns", "onion soup",
         "smoked eel", "berry pie"]
# Made-up, mild insults standing in for a toxic lexicon.
TOXIC_WORDS = ["grumblewit", "snotbucket", "dimwad", "bogbrain", "muckface", "toadspit",
               "dunderskull", "slimeball", "numbnut", "wartnose"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "pencil", "window",
         "candle", "forest", "bread", "mirror", "rocket", "violin", "button", "planet", "turtle",
         "ladder", "basket", "dragon", "pepper", "silver", "harbor", "meadow", "lantern"]
ATTRIBUTES = ("country", "river", "founder", "population", "colour", "food")


_NAME_SHAPE = re.compile("(?:(?:{})(?:{})){{2,3}}(?:{})".format(
    "|".join(sorted(_ONSETS, key=len, reverse=True)), "|".join(sorted(_VOWELS, key=len, reverse=True)),
    "|".join(c for c in sorted(set(_CODAS), key=len, reverse=True) if c)) + "?", re.IGNORECASE)


def is_name_shaped(word: str) -> bool:
    """Whether `word` could be one of the world's names (its syllable grammar)."""
    return _NAME_SHAPE.fullmatch(word) is not None


def make_name(rng: random.Random, syllables: int) -> str:
    name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (name + rng.choice(_CODAS)).capitalize()


@dataclasses.dataclass(frozen=True)
class Town:
    name: str
    country: str
    river: str
    founder: str
    population: int
    colour: str
    food: str

    def value(self, attribute: str) -> str:
        value = getattr(self, attribute)
        return f"{value:,}" if attribute == "population" else str(value)


def make_towns(seed: int, count: int = 160) -> list[Town]:
    """Towns with unique names; a separate pool of never-mentioned names is `unknown_names`."""
    rng = random.Random(f"towns-{seed}")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = make_name(rng, rng.choice([2, 2, 3]))
        if name not in seen and len(name) <= 10:
            seen.add(name)
            names.append(name)
    towns = []
    for name in names:
        towns.append(Town(
            name=name, country=rng.choice(COUNTRIES), river=make_name(rng, 2),
            founder=f"{make_name(rng, 2)} {make_name(rng, 2)}",
            population=rng.randrange(1, 400) * 100, colour=rng.choice(COLOURS),
            food=rng.choice(FOODS)))
    return towns


def unknown_names(seed: int, taken: Iterable[str], count: int = 60) -> list[str]:
    """Town-like names that appear nowhere in the corpus (questions about them are
    unanswerable: the honest answer is "I don't know."). `taken` holds every name and word
    the corpus may contain; a name matching one of them in any letter case is skipped."""
    rng = random.Random(f"unknown-{seed}")
    seen = {word.lower() for word in taken}
    out: list[str] = []
    while len(out) < count:
        name = make_name(rng, 2)
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out
