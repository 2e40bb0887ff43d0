"""Mining standalone functions with doctests: static filters, and the sandbox verdict
deciding what is kept."""

import ast

import pytest

from instructjax.codex import mining
from instructjax.codex.problems import canonical_solutions, load_problems
from instructjax.codex.sandbox import SandboxConfig, check_sandbox
from instructjax.data.jsonl import write_jsonl_atomic

GOOD = '''import math
import os.path as osp


def pair_sums(xs):
    """Sums of neighbouring elements.

    >>> pair_sums([1, 2, 3])
    [3, 5]
    >>> pair_sums([])
    []
    """
    return [a + b for a, b in zip(xs, xs[1:])]


def hypotenuse(a, b=4):
    """>>> hypotenuse(3)
    5.0
    >>> hypotenuse(a=5, b=12)
    13.0
    """
    return math.hypot(a, b)
'''

BAD = '''import numpy as np
from .sibling import thing

LIMIT = 10


def _helper(x):
    return x + 1


def wrong_doctest(x):
    """>>> wrong_doctest(2)
    5
    """
    return 2 * x


def uses_numpy(x):
    """>>> uses_numpy(2)
    2
    """
    return int(np.asarray(x))


def uses_relative(x):
    """>>> uses_relative(1)
    1
    """
    return thing(x)


def uses_helper(x):
    """>>> uses_helper(1)
    2
    """
    return _helper(x)


def uses_constant(x):
    """>>> uses_constant(1)
    10
    """
    return LIMIT * x


def writes_file(x):
    """>>> writes_file(1)
    1
    """
    with open(MARKER, "w") as f:
        f.write("escaped")
    return x


def loops_forever(n):
    """>>> loops_forever(1)
    1
    """
    while n > 0:
        n += 1
    return n


def no_effect(x):
    """>>> no_effect(3)
    """
    x = x + 1


def method(self, x):
    """>>> method(1, 2)
    2
    """
    return x


def gen(n):
    """>>> gen(2)
    [0, 1]
    """
    yield from range(n)


def no_literal_example(x):
    """>>> no_literal_example(LIMIT)
    10
    """
    return x


def column_zero_comment(x):
    """>>> column_zero_comment(1)
    1
    """
# a comment at column 0 would end a Codex sample here
    return x


def no_doctest(x):
    """Just words."""
    return x
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    marker = d / "escaped.txt"
    bad = BAD.replace("open(MARKER", f"open({str(marker)!r}")
    write_jsonl_atomic(d / "code.jsonl", [
        {"text": GOOD, "path": "stdlib/goodmod.py"}, {"text": bad, "path": "purelib/pkg/badmod.py"},
        {"text": GOOD, "path": "purelib/copy/goodmod.py"},  # the same functions again
        {"text": "def broken(:\n    '''>>> broken()'''\n", "path": "x.py"}])
    return d / "code.jsonl", marker


def test_static_filters():
    bad = BAD.replace("open(MARKER", "open('/nonexistent/marker'")
    found, reasons = mining.extract_candidates(bad, "purelib/pkg/badmod.py")
    assert sorted(p["entry_point"] for p in found) == [
        "loops_forever", "no_effect", "writes_file", "wrong_doctest"]
    assert reasons == {"non_stdlib_import": 2, "module_level_reference": 2, "method_like": 1,
                       "generator": 1, "no_usable_example": 1, "stop_sequence_in_body": 1}
    good, reasons = mining.extract_candidates(GOOD, "stdlib/goodmod.py")
    assert not reasons
    by_name = {p["entry_point"]: p for p in good}
    hyp = by_name["hypotenuse"]
    assert hyp["task_id"] == "Mined/goodmod/hypotenuse"
    assert hyp["prompt"].startswith("import math\n\n\ndef hypotenuse(a, b=4):\n")
    assert "os.path" not in hyp["prompt"]  # only the imports the function uses
    assert hyp["canonical_solution"] == "    return math.hypot(a, b)\n"
    assert "assert candidate(3) == 5.0" in hyp["test"]
    assert "assert candidate(a=5, b=12) == 13.0" in hyp["test"]
    pairs = by_name["pair_sums"]
    assert pairs["prompt"].startswith("def pair_sums(xs):\n") and pairs["prompt"].endswith('    """\n')
    assert "assert candidate([]) == []" in pairs["test"]
    tight, reasons = mining.extract_candidates(GOOD, "g.py", max_body_lines=0)
    assert not tight and reasons == {"body_too_long": 2}
    _, reasons = mining.extract_candidates(GOOD, "g.py", max_prompt_chars=40)
    assert reasons == {"prompt_too_long": 2}


def test_mine_keeps_only_functions_that_pass_in_the_sandbox(corpus, tmp_path):
    check_sandbox()
    path, marker = corpus
    cfg = SandboxConfig(timeout_s=1.0, memory_mb=256, workers=2)
    problems, report = mining.mine([path], cfg, max_functions=100)
    assert sorted(p["entry_point"] for p in problems) == ["hypotenuse", "pair_sums"]
    assert report["files"] == 4 and report["kept"] == 2
    assert report["rejected"] == {
        "duplicate": 2, "file_does_not_parse": 1, "non_stdlib_import": 2,
        "module_level_reference": 2, "method_like": 1, "generator": 1, "no_usable_example": 1,
        "stop_sequence_in_body": 1,
        "sandbox_failed": 2,       # wrong doctest; writing outside the sandbox's /tmp
        "sandbox_timeout": 1,      # infinite loop
        "tests_pass_empty_body": 1}
    # 12 functions with doctests in BAD, 2 in each copy of GOOD.
    assert report["candidates"] == 12 + 2 + 2 and report["sandbox_checked"] == 6
    assert not marker.exists()  # the function ran only inside the sandbox
    write_jsonl_atomic(tmp_path / "mined.jsonl", problems)
    loaded = load_problems(tmp_path / "mined.jsonl")
    assert list(loaded) == [p["task_id"] for p in problems]
    assert canonical_solutions(tmp_path / "mined.jsonl")["Mined/goodmod/pair_sums"] == \
        "    return [a + b for a, b in zip(xs, xs[1:])]\n"
    for p in problems:
        ast.parse(p["prompt"] + p["canonical_solution"] + "\n" + p["test"])
    few, report = mining.mine([path], cfg, max_functions=1)
    assert [p["entry_point"] for p in few] == ["pair_sums"] and report["kept"] == 1
    none, report = mining.mine([path], cfg, max_functions=0)
    assert none == [] and report["sandbox_checked"] == 0
