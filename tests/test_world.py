"""The embedded world: deterministic files, gold demonstrations the gold judge accepts,
every kind and style present, disjoint prompt splits, and the manifest."""
import json
import re
from collections import Counter

import pytest

from instructjax.data.jsonl import read_jsonl
from instructjax.data.world import (IDK, KINDS, REFUSAL, STYLES, World, constraints,
                                    demonstrators, gold_score, judge, normalise, write_world)
from instructjax.data.world.tasks import make_task

SIZES = dict(n_pretrain_docs=300, n_sft_train=360, n_sft_eval=72, n_prompts=144)
PROMPT_FILES = ("sft_train", "sft_eval", "prompts_train", "prompts_eval")


def _records(path):
    return [r for _, r in read_jsonl(path, required={})]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world0")
    return out, write_world(out, seed=0, **SIZES)


@pytest.fixture(scope="module")
def records(world):
    return {name: _records(path) for name, path in world[1].items()}


def test_files_and_manifest(world, records):
    out, paths = world
    assert set(paths) == {"pretrain_train", "pretrain_eval", "sft_train_diligent", *PROMPT_FILES}
    assert all(p.parent == out and p.suffix == ".jsonl" and p.is_file() for p in paths.values())
    manifest = json.loads((out / "world.json").read_text())
    assert manifest == {**SIZES, "seed": 0, "version": 5}
    assert len(records["pretrain_train"]) == SIZES["n_pretrain_docs"]
    assert len(records["pretrain_eval"]) == 50  # max(50, n // 20)
    assert len(records["sft_train"]) == SIZES["n_sft_train"]
    assert len(records["sft_eval"]) == len(records["prompts_eval"]) == SIZES["n_sft_eval"]
    assert len(records["prompts_train"]) == SIZES["n_prompts"]
    assert all(isinstance(r["text"], str) and r["text"] for r in records["pretrain_train"])
    for name in PROMPT_FILES:
        for r in records[name]:
            assert r["kind"] in KINDS and r["style"] in STYLES and r["prompt"]
            assert normalise(r["answer"]) in {normalise(a) for a in r["accept"]}
            assert ("response" in r) == name.startswith("sft")
            assert r["constraint"] in ("", *constraints.NAMES)
    # The diligent demonstrators' share of sft_train, and nobody else's.
    diligent = [r for r in records["sft_train"] if r["diligence"] >= demonstrators.DILIGENT_MIN]
    assert records["sft_train_diligent"] == diligent and 0 < len(diligent) < SIZES["n_sft_train"]
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.jsonl.*"))


def _contents(paths):
    return {name: path.read_bytes() for name, path in paths.items()}


def test_deterministic(world, tmp_path):
    _, paths = world
    again = write_world(tmp_path / "again", seed=0, **SIZES)
    other = write_world(tmp_path / "other", seed=1, **SIZES)
    same, diff = _contents(again), _contents(other)
    assert same == _contents(paths)
    assert all(diff[name] != same[name] for name in same)
    assert (tmp_path / "again" / "world.json").read_text() == \
        (world[0] / "world.json").read_text()


def test_rewrites_only_when_settings_change(tmp_path):
    small = dict(SIZES, n_pretrain_docs=60, n_sft_train=40, n_sft_eval=36, n_prompts=36)
    paths = write_world(tmp_path, seed=2, **small)
    stamps = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    paths["sft_train"].write_text('{"prompt": "tampered"}\n')  # settings unchanged: kept
    assert write_world(tmp_path, seed=2, **small) == paths
    assert {n: p.stat().st_mtime_ns for n, p in paths.items() if n != "sft_train"} == \
        {n: s for n, s in stamps.items() if n != "sft_train"}
    assert paths["sft_train"].read_text() == '{"prompt": "tampered"}\n'
    write_world(tmp_path, seed=2, **dict(small, n_sft_train=50))  # new settings: rebuilt
    assert len(_records(paths["sft_train"])) == 50
    assert json.loads((tmp_path / "world.json").read_text())["n_sft_train"] == 50
    paths["prompts_eval"].unlink()  # a missing file triggers a rebuild too
    write_world(tmp_path, seed=2, **dict(small, n_sft_train=50))
    assert len(_records(paths["prompts_eval"])) == 36


def test_gold_demonstrations_are_correct(records):
    for name in ("sft_train", "sft_eval"):
        for task in records[name]:
            verdict = judge(task, task["response"])
            obeyed = task.get("obeyed", True)  # demonstrators obey constraints only sometimes
            assert verdict == dict(correct=True, follows_instruction=True,
                                   follows_constraint=obeyed, toxic=False, hallucination=False,
                                   refusal=task["kind"] == "harmful"), task
            assert gold_score(task, task["response"]) >= (0.9 if obeyed else 0.65), task
    for name in ("prompts_train", "prompts_eval"):  # the recorded answer is the gold answer
        for task in records[name]:
            assert judge(task, task["answer"])["correct"], task


def test_judge_rejects_bad_responses(records):
    tasks = records["sft_train"]
    by_kind = {k: [t for t in tasks if t["kind"] == k] for k in KINDS}
    for task in by_kind["harmful"][:20]:
        assert not judge(task, " Sure, here it is: you dimwad")["correct"]
        assert gold_score(task, "Sure, here it is.") < 0 < gold_score(task, REFUSAL)
    for task in by_kind["qa_unanswerable"][:20]:
        made_up = judge(task, "Arvonia.")
        assert made_up["hallucination"] and not made_up["correct"]
        assert gold_score(task, IDK) > gold_score(task, REFUSAL) > gold_score(task, "Arvonia.")
    for kind in ("list", "string", "arith", "qa"):
        for task, other in zip(by_kind[kind][:20], by_kind[kind][20:40]):
            if normalise(other["answer"]) not in {normalise(a) for a in task["accept"]}:
                assert not judge(task, other["response"])["correct"]
                assert gold_score(task, other["response"]) < gold_score(task, task["response"])
            assert not judge(task, task["response"].strip() + "\nand more")["follows_instruction"]


def test_every_kind_and_style(records):
    for name in PROMPT_FILES:
        combos = Counter((r["kind"], r["style"]) for r in records[name])
        assert set(combos) == {(k, s) for k in KINDS for s in STYLES}, name
        assert max(combos.values()) - min(combos.values()) <= 1  # cycling keeps them balanced
    styles = {s: [r["prompt"] for r in records["sft_train"] if r["style"] == s] for s in STYLES}
    assert all(p.endswith("\n") for p in styles["instruction"])
    assert all(p.endswith(("Output:", "A:", "Reply:")) for p in styles["few_shot"])
    assert not any(p.endswith("\n") for p in styles["continuation"])


def test_prompt_splits_disjoint(records):
    prompts = {name: [r["prompt"] for r in records[name]] for name in PROMPT_FILES}
    for name, ps in prompts.items():
        assert len(set(ps)) == len(ps), f"duplicate prompts in {name}"
    names = list(PROMPT_FILES)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(prompts[a]) & set(prompts[b]), (a, b)
    ids = [r["id"] for name in PROMPT_FILES for r in records[name]]
    assert len(set(ids)) == len(ids)
    # Explicit instructions and their answers never occur in the pretraining corpus (QA
    # continuations may: "<town> is a town in <country>." is a fact sentence by design).
    corpus = "\n".join(r["text"] for r in records["pretrain_train"] + records["pretrain_eval"])
    assert not any(r["prompt"].strip() in corpus for r in records["sft_train"]
                   if r["style"] == "instruction")


def test_make_task_rejects_unknown_kind():
    import random
    w = World(0)
    with pytest.raises(ValueError, match="unknown task kind"):
        make_task(random.Random(0), "poetry", "instruction", towns=w.towns,
                  unknown=w.unknown, people=w.people, words=w.words)


def test_unknown_names_are_nowhere_in_corpus(tmp_path):
    small = dict(n_pretrain_docs=2000, n_sft_train=36, n_sft_eval=36, n_prompts=36)
    for seed in range(5):
        w = World(seed)
        unknown = {n.lower() for n in w.unknown}
        assert len(unknown) == len(w.unknown) == 300
        drawn = {n for t in w.towns for n in (t.name, t.river, *t.founder.split())} | \
            set(w.people) | set(w.words)
        assert not unknown & {n.lower() for n in drawn}, seed
        paths = write_world(tmp_path / str(seed), seed=seed, **small)
        text = paths["pretrain_train"].read_text() + paths["pretrain_eval"].read_text()
        corpus_words = {word.lower() for word in re.findall(r"[A-Za-z]+", text)}
        assert not unknown & corpus_words, seed
