"""Codex-D back-translation: clear errors for problem files and settings it cannot use.
(The whole round trip -- Codex-D docstrings, Codex-S code, sandbox scores -- runs in the
slow Codex story test, tests/test_codex_story.py.)"""
import json

import pytest

from instructjax.codex import backtranslate as bt
from instructjax.codex.codex_data import backtranslation_prompt, codex_d_prompt
from instructjax.data.jsonl import DataError

PROBLEM = {"task_id": "Gen/x/0", "entry_point": "add",
           "prompt": 'def add(a, b):\n    """Return a + b."""\n',
           "canonical_solution": "    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


def test_problem_file_needs_canonical_solutions(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(PROBLEM) + "\n")
    assert bt.load_problem_dicts(good) == {"Gen/x/0": PROBLEM}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROBLEM) + "\n" + json.dumps(
        {k: v for k, v in PROBLEM.items() if k != "canonical_solution"} | {"task_id": "y"}))
    with pytest.raises(DataError, match=r"bad\.jsonl: .*canonical_solution.*1 have none .*'y'"):
        bt.load_problem_dicts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(PROBLEM) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2"):
        bt.load_problem_dicts(broken)


def test_round_trip_prompts_keep_the_signature_and_drop_the_original_docstring():
    d_prompt = codex_d_prompt(PROBLEM)
    assert d_prompt.startswith("def add(a, b):\n    return a + b") and "Return a + b" not in d_prompt
    s_prompt = backtranslation_prompt(PROBLEM, "    Sum of both.\n")
    assert s_prompt == 'def add(a, b):\n    """Sum of both.\n    """\n'
    compile(s_prompt + PROBLEM["canonical_solution"], "<prompt>", "exec")


def test_config_names_the_bad_flag(tmp_path):
    for name, value in (("n_samples", 0), ("code_temperature", -1.0), ("max_code_tokens", 0)):
        with pytest.raises(ValueError, match=f"--{name}"):
            bt.BacktranslationConfig(docstring_checkpoint=str(tmp_path),
                                     code_checkpoint=str(tmp_path), **{name: value})
    with pytest.raises(ValueError, match="--docstring_checkpoint=.*no model_config.json"):
        bt.BacktranslationConfig(docstring_checkpoint=str(tmp_path), code_checkpoint=str(tmp_path))
