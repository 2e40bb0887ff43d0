"""Problem families over numbers and lists (plus the Variant record and helpers that
family_strings.py shares). Each builder draws one variant (function and argument names,
constants, docstring phrasing, solution style) from a seeded random.Random.

Each variant carries its canonical body as source text and, separately, a reference
implementation written another way; the tests' expected values come from the reference,
so a sandbox run of the canonical body against them checks both.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import random
from collections.abc import Callable

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "north", "quiet",
         "ember", "a", "to", "of", "banana", "kayak", "level", "sun", "moon", "cat", "garden")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    params: tuple[tuple[str, str], ...]  # (name, annotation in builtin syntax)
    returns: str
    doc: str                             # the description; examples are added later
    body: str                            # canonical solution, indented 4 spaces
    reference: Callable
    edge_inputs: tuple[tuple, ...]       # argument tuples, asserted but not shown
    random_inputs: tuple[tuple, ...]     # argument tuples; the first ones become examples
    imports: tuple[str, ...] = ()


def registrar(table: dict):
    """A decorator factory: @family("name") records a builder in `table`."""
    def family(name):
        def register(builder):
            if name in table:
                raise ValueError(f"problem family {name!r} is defined twice")
            table[name] = builder
            return builder
        return register
    return family


FAMILIES: dict[str, Callable[[random.Random], Variant]] = {}
_family = registrar(FAMILIES)


def ints(r, lo=-20, hi=40, n_lo=3, n_hi=8):
    return [r.randint(lo, hi) for _ in range(r.randint(n_lo, n_hi))]


def sentence(r, n_lo=2, n_hi=6):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(n_lo, n_hi)))


def randoms(r, make, n=5):
    return tuple(make() for _ in range(n))


@_family("sum_multiples")
def _sum_multiples(r):
    k = r.choice((2, 2, 3, 4, 5, 7))
    what = "even numbers" if k == 2 else f"multiples of {k}"
    name = r.choice(("sum_evens", "sum_of_evens", "even_total") if k == 2 else
                    (f"sum_multiples_of_{k}", "total_of_multiples", f"sum_divisible_by_{k}"))
    a = r.choice(("numbers", "nums", "values", "xs"))
    doc = r.choice((f"Return the sum of the {what} in {a}.",
                    f"Add up every element of {a} that is divisible by {k} and return the total; "
                    "an empty list gives 0."))
    body = r.choice((f"    return sum(x for x in {a} if x % {k} == 0)\n",
                     f"    total = 0\n    for x in {a}:\n        if x % {k} == 0:\n"
                     f"            total += x\n    return total\n"))
    return Variant(name, ((a, "list[int]"),), "int", doc, body,
                   lambda xs: sum(filter(lambda x: not x % k, xs)),
                   (([],), ([1],), ([k],), ([-k, 1, 2 * k],)),
                   randoms(r, lambda: (ints(r) + [k * r.randint(-3, 9)],)))


@_family("running_aggregate")
def _running_aggregate(r):
    op = r.choice(("max", "min", "sum"))
    what = {"max": "largest", "min": "smallest", "sum": "sum"}[op]
    name = r.choice((f"running_{op}", f"prefix_{op}", f"cumulative_{op}"))
    a = r.choice(("numbers", "values", "xs"))
    doc = (f"Return a list whose i-th element is the {what} of the first i + 1 elements of "
           f"{a}." if op != "sum" else f"Return the running totals of {a}: element i is "
           f"the sum of {a}[0] to {a}[i].")
    imports = ()
    if r.random() < 0.5:
        imports = ("import itertools",)
        body = f"    return list(itertools.accumulate({a}" + ("" if op == "sum" else f", {op}") + "))\n"
    else:
        step = "current + x" if op == "sum" else f"{op}(current, x)"
        body = (f"    result = []\n    for i, x in enumerate({a}):\n"
                f"        current = x if i == 0 else {step}\n"
                f"        result.append(current)\n    return result\n")
    fold = {"max": max, "min": min, "sum": sum}[op]
    ref = lambda xs: [fold(xs[:i + 1]) for i in range(len(xs))]  # noqa: E731
    return Variant(name, ((a, "list[int]"),), "list[int]", doc, body, ref,
                   (([],), ([5],), ([3, 3, 3],)), randoms(r, lambda: (ints(r),)), imports)


@_family("clamp_values")
def _clamp_values(r):
    lo, hi = r.randint(-10, 0), r.randint(1, 12)
    name = r.choice(("clamp_all", "clip_values", "limit_range"))
    a = r.choice(("values", "numbers", "xs"))
    doc = r.choice((f"Return a copy of {a} where values below {lo} become {lo} and values "
                    f"above {hi} become {hi}.",
                    f"Clamp every element of {a} into the range [{lo}, {hi}]."))
    body = r.choice((f"    return [min(max(x, {lo}), {hi}) for x in {a}]\n",
                     f"    out = []\n    for x in {a}:\n        if x < {lo}:\n            x = {lo}\n"
                     f"        elif x > {hi}:\n            x = {hi}\n        out.append(x)\n"
                     f"    return out\n"))
    ref = lambda xs: [lo if x < lo else hi if x > hi else x for x in xs]  # noqa: E731
    return Variant(name, ((a, "list[int]"),), "list[int]", doc, body, ref,
                   (([],), ([lo, hi],), ([lo - 1, hi + 1],)),
                   randoms(r, lambda: (ints(r, lo - 15, hi + 15),)))


@_family("fizzbuzz_string")
def _fizzbuzz_string(r):
    m1, m2 = r.sample((2, 3, 4, 5, 7), 2)
    w1, w2 = r.choice((("Fizz", "Buzz"), ("Foo", "Bar"), ("Ping", "Pong"), ("Tik", "Tok")))
    sep = r.choice((" ", ",", ", ", "-"))
    name = r.choice(("fizzbuzz", "number_game", "say_numbers"))
    a = r.choice(("n", "limit", "count"))
    doc = (f"Return the numbers 1 to {a} joined by {sep!r}, writing {w1!r} instead of multiples "
           f"of {m1}, {w2!r} instead of multiples of {m2} and {w1 + w2!r} instead of multiples "
           "of both.")
    body = (f"    parts = []\n    for i in range(1, {a} + 1):\n        word = ''\n"
            f"        if i % {m1} == 0:\n            word += {w1!r}\n"
            f"        if i % {m2} == 0:\n            word += {w2!r}\n"
            f"        parts.append(word or str(i))\n    return {sep!r}.join(parts)\n")

    def ref(n):
        both = w1 + w2
        return sep.join(both if i % (m1 * m2 // _gcd(m1, m2)) == 0 else w1 if i % m1 == 0
                        else w2 if i % m2 == 0 else str(i) for i in range(1, n + 1))
    return Variant(name, ((a, "int"),), "str", doc, body, ref,
                   ((0,), (1,), (m1 * m2,)), randoms(r, lambda: (r.randint(2, 16),)))


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


@_family("digit_sum")
def _digit_sum(r):
    base = r.choice((10, 10, 2, 8, 16))
    name = r.choice(("digit_sum", "sum_of_digits", f"base{base}_digit_sum"))
    a = r.choice(("n", "number", "value"))
    written = "" if base == 10 else f" written in base {base}"
    doc = r.choice((f"Return the sum of the digits of {a}{written}; the sign is ignored.",
                    f"Add up the digits of abs({a}){written} and return the total."))
    body = (f"    {a} = abs({a})\n    total = 0\n    while {a}:\n        total += {a} % {base}\n"
            f"        {a} //= {base}\n    return total\n")
    if base == 10 and r.random() < 0.5:
        body = f"    return sum(int(d) for d in str(abs({a})))\n"
    fmt = {10: "d", 2: "b", 8: "o", 16: "x"}[base]
    ref = lambda n: sum(int(d, 16) for d in format(abs(n), fmt))  # noqa: E731
    return Variant(name, ((a, "int"),), "int", doc, body, ref,
                   ((0,), (-base - 1,), (base - 1,)), randoms(r, lambda: (r.randint(-500, 5000),)))


@_family("dedupe")
def _dedupe(r):
    keep = r.choice(("first", "last"))
    kind = r.choice(("int", "str"))
    name = r.choice(("dedupe", "remove_duplicates", "unique_in_order"))
    a = r.choice(("items", "values", "xs"))
    doc = r.choice((f"Return {a} without repeated elements, keeping the {keep} occurrence of "
                    "each" + (", in their original order." if keep == "first" else
                              ", in the order those occurrences appear."),
                    f"Remove duplicates from {a}: of equal elements only the {keep} one stays, "
                    "and the kept elements keep their relative order."))
    if keep == "first":
        body = r.choice((f"    return list(dict.fromkeys({a}))\n",
                         f"    seen = set()\n    out = []\n    for x in {a}:\n        if x not in seen:\n"
                         f"            seen.add(x)\n            out.append(x)\n    return out\n"))
        ref = lambda xs: [x for i, x in enumerate(xs) if x not in xs[:i]]  # noqa: E731
    else:
        body = (f"    out = []\n    for i, x in enumerate({a}):\n        if x not in {a}[i + 1:]:\n"
                f"            out.append(x)\n    return out\n")
        ref = lambda xs: list(reversed(list(dict.fromkeys(reversed(xs)))))  # noqa: E731
    item = (lambda: r.randint(0, 6)) if kind == "int" else (lambda: r.choice("abcde"))
    return Variant(name, ((a, f"list[{kind}]"),), f"list[{kind}]", doc, body, ref,
                   (([],), ([item()] * 3,)),
                   randoms(r, lambda: ([item() for _ in range(r.randint(4, 9))],)))


@_family("rotate_list")
def _rotate_list(r):
    right = r.random() < 0.5
    name = r.choice(("rotate", "rotate_right" if right else "rotate_left", "shift_items"))
    a, k = r.choice((("items", "k"), ("xs", "n"), ("values", "steps")))
    side, moved, to = ("right", "last", "front") if right else ("left", "first", "back")
    doc = r.choice((f"Rotate {a} by {k} places to the {side}: the {moved} {k} elements move "
                    f"to the {to}. {k} may exceed the length; an empty list stays empty.",
                    f"Return a new list: {a} rotated {k} steps to the {side} (cyclically, so "
                    f"{k} can be larger than the list). An empty list gives [].",
                    f"Move the {moved} {k} elements of {a} to the {to}, wrapping {k} modulo "
                    "the length; return [] for an empty list."))
    cut = f"-{k}" if right else k
    body = (f"    if not {a}:\n        return []\n    {k} %= len({a})\n"
            f"    return {a}[{cut}:] + {a}[:{cut}]\n")

    def ref(xs, n):
        d = collections.deque(xs)
        d.rotate(n if right else -n)
        return list(d)
    return Variant(name, ((a, "list[int]"), (k, "int")), "list[int]", doc, body, ref,
                   (([], 3), ([1], 5), ([1, 2, 3], 0), ([1, 2, 3], 3)),
                   randoms(r, lambda: (ints(r, 0, 9, 3, 7), r.randint(1, 9))))


@_family("max_gap")
def _max_gap(r):
    sort = r.random() < 0.5
    name = r.choice(("max_gap", "largest_gap", "widest_step"))
    a = r.choice(("numbers", "values", "xs"))
    what = (f"two neighbouring values of {a} once it is sorted" if sort else
            f"two adjacent elements of {a}")
    doc = r.choice((f"Return the largest absolute difference between {what}",
                    f"Find the widest gap between {what} and return its size")) + \
        r.choice(("; lists with fewer than two elements give 0.",
                  ". If there are fewer than two elements, return 0."))
    body = (f"    ys = sorted({a})\n" if sort else f"    ys = {a}\n") + \
        "    best = 0\n    for i in range(1, len(ys)):\n        best = max(best, abs(ys[i] - ys[i - 1]))\n    return best\n"
    ref = lambda xs: max((abs(x - y) for x, y in itertools.pairwise(sorted(xs) if sort else xs)),  # noqa: E731
                         default=0)
    return Variant(name, ((a, "list[int]"),), "int", doc, body, ref,
                   (([],), ([4],), ([10, 0, 10],)), randoms(r, lambda: (ints(r),)))


@_family("merge_sorted")
def _merge_sorted(r):
    unique = r.random() < 0.3
    name = r.choice(("merge_sorted", "merge_lists", "combine_sorted"))
    a, b = r.choice((("a", "b"), ("left", "right"), ("first", "second")))
    doc = (r.choice((f"{a} and {b} are sorted in ascending order. Return one ascending list "
                     "with ", f"Merge the sorted lists {a} and {b} into a single sorted list "
                     "holding "))
           + ("each value that occurs in either list exactly once." if unique else
              "all of their elements (duplicates kept)."))
    if unique:
        body = f"    return sorted(set({a}) | set({b}))\n"
        ref = lambda x, y: [k for k, _ in itertools.groupby(heapq.merge(x, y))]  # noqa: E731
    else:
        body = r.choice((f"    return sorted({a} + {b})\n",
                         f"    i = j = 0\n    out = []\n    while i < len({a}) and j < len({b}):\n"
                         f"        if {a}[i] <= {b}[j]:\n            out.append({a}[i])\n            i += 1\n"
                         f"        else:\n            out.append({b}[j])\n            j += 1\n"
                         f"    return out + {a}[i:] + {b}[j:]\n"))
        ref = lambda x, y: list(heapq.merge(x, y))  # noqa: E731
    pair = lambda: (sorted(ints(r, 0, 20, 0, 5)), sorted(ints(r, 0, 20, 1, 5)))  # noqa: E731
    return Variant(name, ((a, "list[int]"), (b, "list[int]")), "list[int]", doc, body, ref,
                   (([], []), ([1, 3], []), ([2, 2], [2, 5])), randoms(r, pair))


@_family("kth_largest")
def _kth_largest(r):
    k = r.choice((1, 2, 2, 3))
    nth = {1: "largest", 2: "second largest", 3: "third largest"}[k]
    name = r.choice(("largest" if k == 1 else f"{('', '', 'second', 'third')[k]}_largest",
                     "nth_biggest", "top_distinct"))
    a = r.choice(("numbers", "values", "xs"))
    doc = r.choice((f"Return the {nth} distinct value in {a}, or None if {a} has fewer "
                    f"than {k} distinct value" + ("s." if k > 1 else "."),
                    f"Ignoring repeated values, return the {nth} number in {a}; return None "
                    "when there is no such number."))
    body = (f"    distinct = sorted(set({a}), reverse=True)\n"
            f"    if len(distinct) < {k}:\n        return None\n    return distinct[{k - 1}]\n")
    ref = lambda xs: heapq.nlargest(k, set(xs))[k - 1] if len(set(xs)) >= k else None  # noqa: E731
    return Variant(name, ((a, "list[int]"),), "int | None", doc, body, ref,
                   (([],), ([7] * 4,), ([1, 2, 3],), ([5, 5, 4, 4, 3],)),
                   randoms(r, lambda: (ints(r, 0, 12, 3, 8),)))


@_family("chunk_list")
def _chunk_list(r):
    k = r.randint(2, 5)
    drop = r.random() < 0.3
    name = r.choice(("chunk", "split_into_chunks", f"groups_of_{k}"))
    a = r.choice(("items", "xs", "values"))
    doc = (f"Split {a} into consecutive chunks of {k} elements"
           + ("; a last chunk with fewer elements is dropped." if drop else
              "; the last chunk may be shorter."))
    stop = f"len({a}) - {k} + 1" if drop else f"len({a})"
    body = f"    return [{a}[i:i + {k}] for i in range(0, {stop}, {k})]\n"

    def ref(xs):
        chunks, rest = [], list(xs)
        while rest:
            chunks.append(rest[:k])
            rest = rest[k:]
        return [c for c in chunks if not drop or len(c) == k]
    return Variant(name, ((a, "list[int]"),), "list[list[int]]", doc, body, ref,
                   (([],), ([1] * (k - 1),), (list(range(k)),), (list(range(2 * k + 1)),)),
                   randoms(r, lambda: (ints(r, 0, 9, 1, 11),)))


@_family("alternating_sum")
def _alternating_sum(r):
    plus = r.random() < 0.6
    name = r.choice(("alternating_sum", "zigzag_total", "signed_sum"))
    a = r.choice(("numbers", "values", "xs"))
    pattern = f"{a}[0] - {a}[1] + {a}[2] - ..." if plus else f"-{a}[0] + {a}[1] - {a}[2] + ..."
    doc = r.choice((f"Return the alternating sum {pattern}; an empty list gives 0.",
                    f"Add the elements of {a} with alternating signs, {pattern}, and return "
                    "the result (0 for an empty list).",
                    f"Compute {pattern} over all elements of {a}. Return 0 if {a} is empty."))
    even, odd = ("x", "-x") if plus else ("-x", "x")
    body = r.choice((f"    return sum({even} if i % 2 == 0 else {odd} for i, x in enumerate({a}))\n",
                     f"    total = 0\n    sign = {1 if plus else -1}\n    for x in {a}:\n"
                     f"        total += sign * x\n        sign = -sign\n    return total\n"))
    ref = lambda xs: (1 if plus else -1) * (sum(xs[0::2]) - sum(xs[1::2]))  # noqa: E731
    return Variant(name, ((a, "list[int]"),), "int", doc, body, ref,
                   (([],), ([5],), ([2, 2],)), randoms(r, lambda: (ints(r),)))


@_family("count_primes")
def _count_primes(r):
    inclusive = r.random() < 0.5
    name = r.choice(("count_primes", "prime_count", "number_of_primes"))
    a = r.choice(("n", "limit", "upper"))
    bound = "at most" if inclusive else "smaller than"
    doc = r.choice((f"Return how many prime numbers are {bound} {a}.",
                    f"Count the primes p with 2 <= p {'<=' if inclusive else '<'} {a}.",
                    f"How many integers {bound} {a} are prime? Return that count."))
    stop = f"{a} + 1" if inclusive else a
    body = (f"    count = 0\n    for m in range(2, {stop}):\n"
            f"        if all(m % d for d in range(2, int(m ** 0.5) + 1)):\n"
            f"            count += 1\n    return count\n")

    def ref(n):
        top = n + 1 if inclusive else n
        sieve = [True] * max(top, 2)
        sieve[0] = sieve[1] = False
        for p in range(2, top):
            for q in range(p * p, top, p):
                sieve[q] = False
        return sum(sieve[:top]) if top > 2 else 0
    return Variant(name, ((a, "int"),), "int", doc, body, ref,
                   ((0,), (1,), (2,), (3,), (7,)), randoms(r, lambda: (r.randint(4, 80),)))


@_family("first_index_above")
def _first_index_above(r):
    last = r.random() < 0.4
    name = r.choice((("last" if last else "first") + "_index_above", "find_above", "position_over"))
    a, t = r.choice((("values", "threshold"), ("xs", "limit"), ("numbers", "bound")))
    which = "last" if last else "first"
    doc = r.choice((f"Return the index of the {which} element of {a} that is greater than "
                    f"{t}, or -1 if there is none.",
                    f"Find where {a} {'last' if last else 'first'} exceeds {t}: return that "
                    "position, or -1 if no element is larger.",
                    f"Scan {a} from the {'end' if last else 'start'} and return the index of "
                    f"the first value above {t}; return -1 if none is above it."))
    order = f"range(len({a}) - 1, -1, -1)" if last else f"range(len({a}))"
    body = (f"    for i in {order}:\n        if {a}[i] > {t}:\n            return i\n"
            f"    return -1\n")

    def ref(xs, lim):
        hits = [i for i, x in enumerate(xs) if x > lim]
        return (hits[-1] if last else hits[0]) if hits else -1
    return Variant(name, ((a, "list[int]"), (t, "int")), "int", doc, body, ref,
                   (([], 0), ([1, 2], 5), ([5, 9, 5], 4)),
                   randoms(r, lambda: (ints(r, 0, 30), r.randint(5, 25))))
