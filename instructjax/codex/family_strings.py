"""Problem families over strings (see family_lists.py for the Variant record)."""

from __future__ import annotations

import collections
import itertools
import random
import string
from collections.abc import Callable

from instructjax.codex.family_lists import Variant, randoms, registrar, sentence

FAMILIES: dict[str, Callable[[random.Random], Variant]] = {}
_family = registrar(FAMILIES)


@_family("reverse_words")
def _reverse_words(r):
    sep = r.choice((" ", " ", "-", ", ", "/"))
    name = r.choice(("reverse_words", "words_backwards", "flip_word_order"))
    a = r.choice(("sentence", "text", "s"))
    doc = r.choice((f"Return the words of {a} in reverse order, joined by {sep!r}.",
                    f"Split {a} on whitespace and join the words back with {sep!r}, last word "
                    "first."))
    body = r.choice((f"    return {sep!r}.join(reversed({a}.split()))\n",
                     f"    words = {a}.split()\n    words.reverse()\n    return {sep!r}.join(words)\n"))
    return Variant(name, ((a, "str"),), "str", doc, body,
                   lambda s: sep.join(s.split()[::-1]),
                   (("",), ("one",), ("  many   spaces  here ",)),
                   randoms(r, lambda: (sentence(r),)))


@_family("count_letters")
def _count_letters(r):
    desc, letters = r.choice((("vowels", "aeiou"), ("vowels (y counts as one)", "aeiouy"),
                              ("one of the letters 'r', 's' or 't'", "rst"),
                              ("one of the letters 'a', 'e' or 'n'", "aen")))
    fold = r.random() < 0.5
    name = r.choice(("count_vowels" if "vowel" in desc else "count_letters", "letter_count",
                     "how_many"))
    a = r.choice(("text", "word", "s"))
    doc = (f"Count the characters of {a} that are {desc}"
           + ("; upper and lower case count alike." if fold else "; only lowercase counts."))
    source = f"{a}.lower()" if fold else a
    body = r.choice((f"    return sum(1 for c in {source} if c in {letters!r})\n",
                     f"    count = 0\n    for c in {source}:\n        if c in {letters!r}:\n"
                     f"            count += 1\n    return count\n"))
    ref = lambda s: len([c for c in (s.lower() if fold else s) if letters.find(c) >= 0])  # noqa: E731
    cased = lambda: (" ".join(w.upper() if r.random() < 0.3 else w  # noqa: E731
                              for w in sentence(r).split()),)
    return Variant(name, ((a, "str"),), "int", doc, body, ref,
                   (("",), (letters.upper() + letters,), ("xyz",)), randoms(r, cased))


@_family("caesar_shift")
def _caesar_shift(r):
    k = r.randint(1, 25)
    upper = r.random() < 0.5
    name = r.choice(("caesar", "shift_letters", "encode_shift"))
    a = r.choice(("text", "message", "s"))
    doc = (f"Shift every {'letter' if upper else 'lowercase letter'} of {a} {k} places "
           f"forward in the alphabet, wrapping around after 'z'"
           + (" (and 'Z'; case is kept)" if upper else "") + "; other characters stay.")
    body = (f"    out = []\n    for c in {a}:\n        if 'a' <= c <= 'z':\n"
            f"            out.append(chr((ord(c) - ord('a') + {k}) % 26 + ord('a')))\n")
    if upper:
        body += (f"        elif 'A' <= c <= 'Z':\n"
                 f"            out.append(chr((ord(c) - ord('A') + {k}) % 26 + ord('A')))\n")
    body += "        else:\n            out.append(c)\n    return ''.join(out)\n"
    low, up = string.ascii_lowercase, string.ascii_uppercase
    src, dst = low + (up if upper else ""), low[k:] + low[:k] + (up[k:] + up[:k] if upper else "")
    ref = lambda s: s.translate(str.maketrans(src, dst))  # noqa: E731
    return Variant(name, ((a, "str"),), "str", doc, body, ref,
                   (("",), ("xyz XYZ!",), ("Hello, World",)),
                   randoms(r, lambda: (sentence(r, 1, 4),)))


@_family("is_palindrome")
def _is_palindrome(r):
    mode = r.choice(("exact", "case", "alnum"))
    name = r.choice(("is_palindrome", "reads_same_backwards", "palindrome_check"))
    a = r.choice(("text", "s", "word"))
    rule = {"exact": "comparing characters exactly", "case": "treating upper and lower case "
            "alike", "alnum": "keeping only letters and digits and ignoring case"}[mode]
    doc = r.choice((f"Return True if {a} reads the same forwards and backwards, {rule}.",
                    f"Check whether {a} is a palindrome, {rule}; return a bool.",
                    f"Is {a} a palindrome ({rule})? Return True or False."))
    body = {"exact": f"    return {a} == {a}[::-1]\n",
            "case": f"    t = {a}.lower()\n    return t == t[::-1]\n",
            "alnum": f"    t = [c.lower() for c in {a} if c.isalnum()]\n    return t == t[::-1]\n"}[mode]

    def ref(s):
        t = s if mode == "exact" else "".join(c for c in s.lower() if mode == "case" or c.isalnum())
        return all(t[i] == t[-1 - i] for i in range(len(t) // 2))
    pal = lambda: (r.choice(("level", "Kayak", "No lemon, no melon", "abcba", "Step on no pets",  # noqa: E731
                             "stone", "river", "ab", "Abba", "race car")),)
    return Variant(name, ((a, "str"),), "bool", doc, body, ref,
                   (("",), ("a",), ("Aa",), ("a,a",), ("ab",)), randoms(r, pal))


@_family("char_histogram")
def _char_histogram(r):
    keep = r.choice(("letters", "nonspace"))
    fold = r.random() < 0.5
    name = r.choice(("char_histogram", "count_chars", "letter_frequencies"))
    a = r.choice(("text", "s", "sentence"))
    what = "letter" if keep == "letters" else "character other than whitespace"
    doc = (f"Return a dict mapping each {what} in {a} to the number of times it occurs"
           + (", counting upper and lower case as the same lowercase letter." if fold else "."))
    test = "c.isalpha()" if keep == "letters" else "not c.isspace()"
    body = (f"    counts = {{}}\n    for c in {a}{'.lower()' if fold else ''}:\n        if {test}:\n"
            f"            counts[c] = counts.get(c, 0) + 1\n    return counts\n")
    ref = lambda s: dict(collections.Counter(  # noqa: E731
        c for c in (s.lower() if fold else s) if (c.isalpha() if keep == "letters" else c.strip())))
    return Variant(name, ((a, "str"),), "dict[str, int]", doc, body, ref,
                   (("",), ("Aa a!",), ("  ",)),
                   randoms(r, lambda: (sentence(r, 1, 3).capitalize() + r.choice(("", "!", " 42")),)))


@_family("count_long_words")
def _count_long_words(r):
    k = r.randint(2, 6)
    strict = r.random() < 0.5
    name = r.choice(("count_long_words", "long_word_count", "words_over"))
    a = r.choice(("sentence", "text", "s"))
    cond = f"more than {k}" if strict else f"at least {k}"
    doc = f"Count the words of {a} (separated by whitespace) that have {cond} characters."
    op = ">" if strict else ">="
    body = f"    return sum(1 for w in {a}.split() if len(w) {op} {k})\n"
    ref = lambda s: len([w for w in s.split() if len(w) > (k if strict else k - 1)])  # noqa: E731
    return Variant(name, ((a, "str"),), "int", doc, body, ref,
                   (("",), ("x" * k,), ("  " + "y" * (k + 1) + "  ",)),
                   randoms(r, lambda: (sentence(r, 2, 7),)))


@_family("run_length_encode")
def _run_length_encode(r):
    fmt = r.choice(("compact", "pairs"))
    name = r.choice(("run_length_encode", "rle", "compress_runs"))
    a = r.choice(("text", "s", "chars"))
    if fmt == "compact":
        doc = r.choice((f"Run-length encode {a}: each run of a repeated character becomes "
                        "the character followed by the length of the run.",
                        f"Compress {a} by writing each maximal run of equal characters as the "
                        "character and then its count (also for runs of length 1)."))
        returns, emit, finish = "str", "out.append({a}[i] + str(j - i))", "''.join(out)"
        ref = lambda s: "".join(c + str(len(list(g))) for c, g in itertools.groupby(s))  # noqa: E731
    else:
        doc = r.choice((f"Return the runs of repeated characters in {a} as a list of "
                        "(character, run length) tuples.",
                        f"Group consecutive equal characters of {a}; return one (char, count) "
                        "tuple per group, in order."))
        returns, emit, finish = "list[tuple[str, int]]", "out.append(({a}[i], j - i))", "out"
        ref = lambda s: [(c, len(list(g))) for c, g in itertools.groupby(s)]  # noqa: E731
    body = (f"    out = []\n    i = 0\n    while i < len({a}):\n        j = i\n"
            f"        while j < len({a}) and {a}[j] == {a}[i]:\n            j += 1\n"
            f"        {emit.format(a=a)}\n        i = j\n    return {finish}\n")
    runs = lambda: ("".join(r.choice("abc") * r.randint(1, 4) for _ in range(r.randint(1, 5))),)  # noqa: E731
    return Variant(name, ((a, "str"),), returns, doc, body, ref,
                   (("",), ("z",), ("aaaa",), ("abab",)), randoms(r, runs))


@_family("title_case")
def _title_case(r):
    small = r.random() < 0.4
    name = r.choice(("title_case", "capitalize_words", "headline"))
    a = r.choice(("text", "sentence", "s"))
    doc = (r.choice((f"Return {a} with the words (separated by single spaces) capitalized: "
                     "first letter upper case, the rest lower case",
                     f"Capitalize each space-separated word of {a} (upper-case first letter, "
                     "lower-case rest)",
                     f"Convert {a} to title case word by word, splitting on single spaces"))
           + ("; the words 'a', 'of' and 'to' stay all lower case unless they come first."
              if small else "."))
    if small:
        body = (f"    words = {a}.split(' ')\n    out = []\n    for i, w in enumerate(words):\n"
                f"        if i > 0 and w.lower() in ('a', 'of', 'to'):\n            out.append(w.lower())\n"
                f"        else:\n            out.append(w[:1].upper() + w[1:].lower())\n"
                f"    return ' '.join(out)\n")
    else:
        body = f"    return ' '.join(w[:1].upper() + w[1:].lower() for w in {a}.split(' '))\n"

    def ref(s):
        words = s.split(" ")
        return " ".join(w.lower() if small and i and w.lower() in ("a", "of", "to") else w.capitalize()
                        for i, w in enumerate(words))
    mixed = lambda: (" ".join(w.upper() if r.random() < 0.3 else w for w in sentence(r).split()),)  # noqa: E731
    return Variant(name, ((a, "str"),), "str", doc, body, ref,
                   (("",), ("a",), ("OF the TO",)), randoms(r, mixed))
