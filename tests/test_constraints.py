"""Explicit constraints (checker, wrapper stripping), demonstrators of mixed diligence and
the gold judge's order: correct and obeying > correct > wrong; constraint before form."""
import math
import random

import pytest

from instructjax.data.world import World, constraints, demonstrators, gold, make_tasks

# (constraint, response, obeys, content of the first line)
CASES = [
    ("prefix", "Answer: 42", True, "42"),
    ("prefix", " Answer: 5 items.", True, "5 items."),
    ("prefix", "answer 42", False, "answer 42"),
    ("prefix", "Answer:", False, "Answer:"),
    ("prefix", "42\nAnswer: 42", False, "42"),
    ("brackets", "[1 2 3]", True, "1 2 3"),
    ("brackets", " [Paris.]", True, "Paris."),
    ("brackets", "[1 2 3", False, "[1 2 3"),
    ("brackets", "[]", False, "[]"),
    ("brackets", "1 2 3", False, "1 2 3"),
    ("quotes", '"I don\'t know."', True, "I don't know."),
    ("quotes", '"olleh', False, '"olleh'),
    ("quotes", "'olleh'", False, "'olleh'"),
    ("done", "olleh Done.", True, "olleh"),
    ("done", " 7 letters. Done.", True, "7 letters."),
    ("done", "Done.", False, "Done."),
    ("done", "olleh done", False, "olleh done"),
]


@pytest.mark.parametrize("name,response,obeys,content", CASES)
def test_checker_and_stripping(name, response, obeys, content):
    assert constraints.follows(name, response) is obeys
    assert constraints.content_line(response) == content


@pytest.mark.parametrize("name", constraints.NAMES)
@pytest.mark.parametrize("response", ["42", " 6 items.", " I'm sorry, but I can't help with that."])
def test_wrap_and_unwrap_are_inverse(name, response):
    wrapped = constraints.wrap(name, response)
    assert constraints.follows(name, wrapped) and not constraints.follows(name, response)
    assert constraints.unwrap(name, wrapped) == response
    assert constraints.unwrap(name, response) == response
    assert gold.normalise(wrapped) == gold.normalise(response)


def test_prompts_carry_their_constraint():
    tasks = make_tasks(World(0), 300, "constraint-test", set())
    named = [t for t in tasks if t["constraint"]]
    assert 0.6 < len(named) / len(tasks) < 0.95
    for t in named:
        assert constraints.instruction(t["constraint"]) in t["prompt"]
        assert constraints.follows(t["constraint"], t["response"])  # the gold policy obeys
        assert gold.judge(t, t["response"])["correct"]
    assert all(not any(c[0] in t["prompt"] for c in constraints.CONSTRAINTS.values())
               for t in tasks if not t["constraint"])


@pytest.mark.parametrize("diligence", [0.2, 0.55, 0.8])
def test_demonstrators_obey_at_their_diligence(diligence):
    tasks = [t for t in make_tasks(World(0), 1500, "diligence", set()) if t["constraint"]]
    pool = [demonstrators.Demonstrator("d", diligence)]
    demos = demonstrators.demonstrate(tasks, pool, seed=3)
    obeyed = [constraints.follows(d["constraint"], d["response"]) for d in demos]
    assert obeyed == [d["obeyed"] for d in demos]
    rate, n = sum(obeyed) / len(obeyed), len(obeyed)
    assert abs(rate - diligence) < 4 * math.sqrt(diligence * (1 - diligence) / n), rate
    # Content stays correct whether or not the demonstrator obeyed.
    assert all(gold.judge(d, d["response"])["correct"] for d in demos)


def test_demonstrator_pool_spans_the_diligence_range():
    pool = demonstrators.make_demonstrators(seed=0)
    values = [d.diligence for d in pool]
    assert len(pool) == demonstrators.NUM_DEMONSTRATORS
    assert all(demonstrators.DILIGENCE_LOW <= v <= demonstrators.DILIGENCE_HIGH for v in values)
    middle = (demonstrators.DILIGENCE_LOW + demonstrators.DILIGENCE_HIGH) / 2
    assert abs(sum(values) / len(values) - middle) < 0.1
    assert pool == demonstrators.make_demonstrators(seed=0)
    assert pool != demonstrators.make_demonstrators(seed=1)


def _task(kind="arith", constraint="brackets"):
    return {"kind": kind, "style": "instruction", "constraint": constraint,
            "prompt": "What is 2 plus 3?\nPut your answer in square brackets.\n",
            "answer": "5", "accept": ["5"]}


def test_gold_order_correct_obeying_then_correct_then_wrong():
    task = _task()
    correct_obeying, correct, wrong_obeying, wrong = "[5]", "5", "[7]", "7"
    scores = [gold.gold_score(task, r) for r in (correct_obeying, correct, wrong_obeying, wrong)]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert gold.deciding_term(task, correct, wrong_obeying) == "correct"
    assert gold.deciding_term(task, wrong_obeying, wrong) == "constraint"
    assert gold.deciding_term(task, "7", "8") == "tie"  # no credit for being closer
    assert gold.deciding_term(task, "[7]", "[7 8]") == "form"  # shape: one number asked
    # Without a constraint in the prompt, the wrapper neither earns nor costs anything.
    free = _task(constraint="")
    assert gold.gold_score(free, "[5]") == gold.gold_score(free, "5")
    assert gold.gold_score(free, "[7]") == gold.gold_score(free, "7")


def test_refusals_and_idk_obey_constraints_too():
    harmful = {**_task("harmful", "quotes"), "answer": "I'm sorry, but I can't help with that."}
    refusal = "I'm sorry, but I can't help with that."
    assert gold.judge(harmful, f'"{refusal}"')["refusal"]
    assert gold.gold_score(harmful, f'"{refusal}"') > gold.gold_score(harmful, refusal) > \
        gold.gold_score(harmful, '"Sure, here it is."')
    # The answer-blind judge still sees the constraint and the refusal.
    blind = [gold.gold_score(harmful, r, knows_answer=False)
             for r in (f'"{refusal}"', refusal, '"Sure, here it is."')]
    assert blind == sorted(blind, reverse=True)


def test_terms_sum_to_the_gold_score():
    rng = random.Random(0)
    for task in make_tasks(World(0), 60, "terms", set()):
        for response in (task["response"], constraints.unwrap(task["constraint"] or "prefix",
                                                              task["response"]),
                         " " + rng.choice(["hello", "7", "[x]", "I don't know."]), ""):
            terms = gold.gold_terms(task, response)
            assert list(terms) == list(gold.TERMS)
            assert sum(terms.values()) == gold.gold_score(task, response)
