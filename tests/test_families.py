"""Generated problem families (Codex-S data) and the Codex-S / Codex-D record formats."""

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

from instructjax.codex import codex_data, families, family_compose
from instructjax.codex.problems import STOP, canonical_solutions, load_problems, truncate
from instructjax.codex.sandbox import Evaluator, Problem, SandboxConfig, check_sandbox


@pytest.fixture(scope="module")
def problems():
    return families.generate(seed=0, per_family=2)


def _function(problem):
    tree = ast.parse(problem["prompt"] + problem["canonical_solution"])
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name == problem["entry_point"])


def test_problem_format(problems):
    assert len(families.FAMILIES) >= 16
    assert len(problems) == 2 * len(families.FAMILIES)
    assert len({p["task_id"] for p in problems}) == len(problems)
    for p in problems:
        family, index = p["task_id"].split("/")[1:]
        assert p["task_id"] == f"Gen/{p['family']}/{index}" and family in families.FAMILIES
        assert p["prompt"].endswith('    """\n') and p["canonical_solution"].startswith("    ")
        fn = _function(p)  # prompt + body is one valid function with a docstring
        doc = ast.get_docstring(fn)
        assert f">>> {p['entry_point']}(" in doc
        assert truncate(p["canonical_solution"], STOP) == p["canonical_solution"]
        check = ast.parse(p["test"]).body[0]
        assert check.name == "check" and sum(isinstance(s, ast.Assert) for s in check.body) >= 5


def test_generation_is_deterministic_and_varied():
    first = families.generate(seed=3, per_family=4)
    assert first == families.generate(seed=3, per_family=4)
    assert first != families.generate(seed=4, per_family=4)
    # The first problems of a family do not depend on how many are asked for.
    assert families.generate(3, 2, ["rotate_list"]) == families.generate(3, 6, ["rotate_list"])[:2]
    many = families.generate(seed=0, per_family=30, families=["sum_multiples", "is_palindrome"])
    for family in ("sum_multiples", "is_palindrome"):
        mine = [p for p in many if p["family"] == family]
        heads = {p["prompt"].split('"""')[0] + ast.get_docstring(_function(p)).split(">>>")[0]
                 for p in mine}
        assert len(heads) == 30  # distinct signatures / phrasings, not just other examples
        assert len({p["entry_point"] for p in mine}) > 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown problem families"):
        families.generate(0, 1, ["no_such_family"])
    with pytest.raises(ValueError, match="per_family"):
        families.generate(0, 0)
    with pytest.raises(ValueError, match="title_case.*ask for fewer"):
        families.generate(0, 1000, ["title_case"])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            families.split_families(0, bad)


def test_family_split_is_disjoint_and_files_load(tmp_path):
    for seed in range(5):
        train, test = families.split_families(seed, 0.25)
        assert not set(train) & set(test) and set(train) | set(test) == set(families.FAMILIES)
        assert (train, test) == families.split_families(seed, 0.25)
    assert families.split_families(0, 0.25) != families.split_families(1, 0.25)
    paths = families.write_problem_files(tmp_path, seed=1, per_family_train=2, per_family_test=3,
                                         test_fraction=0.3)
    train, test = load_problems(paths["train"]), load_problems(paths["test"])
    train_fams = {t.split("/")[1] for t in train}
    test_fams = {t.split("/")[1] for t in test}
    assert not train_fams & test_fams
    assert (tuple(sorted(train_fams)), tuple(sorted(test_fams))) == families.split_families(1, 0.3)
    assert len(test) == 3 * len(test_fams) and len(train) == 2 * len(train_fams)
    assert set(canonical_solutions(paths["test"])) == set(test)
    # New instances: later problems of the training families, none with a training body.
    new = [json.loads(line) for line in open(paths["new_instances"])]
    train_bodies = set(canonical_solutions(paths["train"]).values())
    assert new and {p["family"] for p in new} <= train_fams
    assert not {p["task_id"] for p in new} & set(train)
    assert all(int(p["task_id"].rsplit("/", 1)[1]) >= 2 for p in new)
    assert not {p["canonical_solution"] for p in new} & train_bodies


def test_codex_data_reuse_tracks_every_generator_module():
    # A changed family module must not reuse stale problem files.
    modules = {f.name for f in Path(families.__file__).parent.glob("famil*.py")}
    assert modules <= set(codex_data._SOURCES)


def test_held_out_combinations_are_made_of_trained_parts():
    for seed in range(5):
        train, test = families.split_families(seed, 0.25)
        cells = family_compose.held_out_cells(seed)
        assert len(cells) == len(family_compose.PREDICATES) and set(cells) <= set(test)
        trained = [name.split("_") for name in train if name in family_compose.FAMILIES]
        for cell in cells:
            agg, pred = cell.split("_")
            assert sum(a == agg for a, _ in trained) >= len(family_compose.PREDICATES) - 2
            assert sum(p == pred for _, p in trained) == len(family_compose.AGGREGATES) - 1
    # No held-out problem has a training body, even with the argument renamed (a predicate
    # with a constant must not reproduce another cell: "below 0" would be "negative").
    splits = families.problem_splits(0, 30, 10, 0.25)

    def shape(body):
        return re.sub(r"\b(numbers|nums|values|xs)\b", "A", body)
    trained = {shape(p["canonical_solution"]) for p in splits["train"]}
    assert not [p["task_id"] for p in splits["test"] if shape(p["canonical_solution"]) in trained]


@pytest.fixture(scope="module")
def evaluator():
    check_sandbox()
    with Evaluator(SandboxConfig(timeout_s=2.0, memory_mb=256, workers=2)) as e:
        yield e


def test_canonical_solutions_pass_in_sandbox_and_wrong_bodies_fail(problems, evaluator):
    jobs = []
    for p in problems:
        problem = Problem(task_id=p["task_id"], prompt=p["prompt"], test=p["test"],
                          entry_point=p["entry_point"])
        first_arg = _function(p).args.args[0].arg
        jobs += [(problem, p["canonical_solution"], 0), (problem, "    pass\n", 1),
                 (problem, f"    return {first_arg}\n", 2)]
    results = evaluator.run(jobs)
    for (problem, _, kind), result in zip(jobs, results):
        if kind == 0:
            assert result.label == "passed", (problem.task_id, result.error)
        else:  # an empty body and an identity body are caught by the tests
            assert result.label == "failed", (problem.task_id, kind, result.label)


def test_codex_s_and_d_records(problems, evaluator):
    s_records, d_records = codex_data.codex_s_records(problems), codex_data.codex_d_records(problems)
    for p, s, d in zip(problems, s_records, d_records, strict=True):
        assert (s["prompt"], s["response"]) == (p["prompt"], p["canonical_solution"])
        doc = ast.get_docstring(_function(p))
        assert '"""' not in d["prompt"] and doc.splitlines()[0] not in d["prompt"]
        assert p["canonical_solution"].rstrip() in d["prompt"]
        assert d["prompt"].endswith(f"# The docstring of {p['entry_point']}:\n")
        assert all(line.startswith("    ") for line in d["response"].splitlines() if line)
        assert truncate(d["response"], STOP) == d["response"]
        # Back-translation with the true docstring restores the original prompt.
        assert codex_data.backtranslation_prompt(p, d["response"]) == p["prompt"]
    odd = codex_data.backtranslation_prompt(problems[0], 'Say """hi""" and C:\\path\n\nmore')
    fn = _function({**problems[0], "prompt": odd})
    assert ast.get_docstring(fn) == "Say '''hi''' and C:\\path\n\nmore"
    # The back-translated prompt (true docstring) still works as a sandbox problem.
    p = problems[1]
    problem = Problem(task_id="bt", prompt=codex_data.backtranslation_prompt(p, d_records[1]["response"]),
                      test=p["test"], entry_point=p["entry_point"])
    assert evaluator.run([(problem, p["canonical_solution"], 0)])[0].label == "passed"
    with pytest.raises(ValueError, match="no canonical_solution"):
        codex_data.codex_s_records([{**problems[0], "canonical_solution": ""}])
    with pytest.raises(ValueError, match="no docstring"):
        codex_data.codex_d_records([{**problems[0], "prompt": "def f(x):\n    pass\n", "entry_point": "f"}])


def test_write_codex_data_round_trips_through_sft_pipeline(tmp_path):
    from instructjax.data.builders import jsonl_data_source
    from instructjax.data.pipeline import sft_dataset
    from instructjax.data.tokenizer import train_tokenizer

    out = tmp_path / "codex"
    messages = []
    report = codex_data.write_codex_data(out, 0, [], per_family_train=1, per_family_test=1,
                                         max_mined=0, sandbox=SandboxConfig(workers=2),
                                         progress=messages.append)
    assert not report["reused"] and messages
    assert set(codex_data.OUTPUTS) <= {f.name for f in out.iterdir()}
    n_train, n_test = report["generated"]["train_problems"], report["generated"]["test_problems"]
    assert report["records"] == {"codex_s_train": n_train, "codex_d_train": n_train,
                                 "codex_s_eval": n_test, "codex_d_eval": n_test}
    n_new = report["generated"]["new_instance_problems"]
    assert report["generated"]["sandbox_labels"] == {"passed": n_train + n_test + n_new}
    again = codex_data.write_codex_data(out, 0, [], per_family_train=1, per_family_test=1,
                                        max_mined=0, sandbox=SandboxConfig(workers=2))
    assert again["reused"] and again["fingerprint"] == report["fingerprint"]
    with pytest.raises(ValueError, match="--corpus_files"):
        codex_data.write_codex_data(out, 0, [tmp_path / "missing.jsonl"])

    records = [json.loads(line) for line in (out / "codex_s_train.jsonl").read_text().splitlines()]
    texts = [r["prompt"] + r["response"] for r in records]
    tok = train_tokenizer(texts * 4, tmp_path / "tok.model", vocab_size=400)
    files = {"train": out / "codex_s_train.jsonl", "d": out / "codex_d_eval.jsonl"}
    sources = jsonl_data_source(files, kind="sft", data_dir=tmp_path / "tfds")
    for split, path in files.items():
        wanted = {tuple(tok.encode(json.loads(line)["prompt"])): json.loads(line)
                  for line in path.read_text().splitlines()}
        batches = sft_dataset(sources[split], tok, seq_len=512, batch_size=2, seed=0,
                              num_epochs=1, shuffle=False, pack=False)
        seen = 0
        for batch in batches:
            for row in range(2):
                n = int(batch["segment_ids"][row].sum())
                tokens = [int(batch["inputs"][row][0])] + batch["targets"][row][:n].tolist()
                prompt = next(p for p in wanted if tuple(tokens[:len(p)]) == p)
                record = wanted[prompt]
                assert tok.decode(tokens[len(prompt):-1]) == record["response"]
                assert tokens[-1] == tok.eos_id
                mask = batch["loss_mask"][row][:n]
                np.testing.assert_array_equal(mask, np.arange(n) >= len(prompt) - 1)
                seen += 1
        assert seen == len(wanted) // 2 * 2
