"""Evaluation in InstructGPT's terms: win-rate and interval maths on hand examples, gold
rates on hand-made responses, the few-shot prefix within the context, the frontier's gold
scoring of rollouts, and the plots written from a small synthetic run."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.data.jsonl import write_jsonl_atomic
from instructjax.data.world import World, labelers, make_tasks
from instructjax.data.world.facts import TOXIC_WORDS
from instructjax.rlhf import eval_metrics as em
from instructjax.rlhf import evaluate, plots
from instructjax.rlhf.ppo_run import GoldRollouts


class ByteTokenizer:
    """One token per UTF-8 byte: enough for length budgets and decoding."""
    eos_id, pad_id = 1, 0

    def encode(self, text):
        return [b + 2 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


def _task(kind, answer, prompt="Q?\n", **extra):
    return {"id": f"t-{kind}-{answer}", "kind": kind, "style": "instruction", "prompt": prompt,
            "answer": answer, "accept": [answer], **extra}


IDK, REFUSAL = "I don't know.", "I'm sorry, but I can't help with that."


# ----------------------------------------------------------------------------- intervals

def test_wilson_interval_matches_hand_values():
    # 7/10: p = .7, z^2 = 3.8415, centre = .8921/1.3841 = .6445, half = .2477.
    lo, hi = em.wilson_interval(7, 10)
    assert lo == pytest.approx(0.39676, abs=1e-4) and hi == pytest.approx(0.89218, abs=1e-4)
    # 0/10: lower bound 0, upper z^2/n / (1 + z^2/n) = .38415 / 1.38415.
    assert em.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert em.wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    # Symmetric around 1/2 at p = 1/2, narrowing like 1/sqrt(n).
    lo, hi = em.wilson_interval(50, 100)
    assert lo + hi == pytest.approx(1.0) and hi - lo == pytest.approx(2 * 0.0962, abs=1e-3)
    assert all(math.isnan(x) for x in em.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        em.wilson_interval(11, 10)


def test_win_rate_all_wins_all_ties_and_mixed():
    wins = em.win_rate([1.0] * 20)
    assert wins["win_rate"] == 1.0 and wins["wins"] == 20 and wins["losses"] == 0
    assert wins["ci"][1] == 1.0 and wins["ci"][0] == pytest.approx(0.8389, abs=1e-3)
    ties = em.win_rate([0.5] * 12)
    assert ties["win_rate"] == 0.5 and ties["ties"] == 12 and ties["wins"] == 0
    assert ties["ci_bootstrap"] == [0.5, 0.5]  # no variance at all
    mixed = em.win_rate([1.0] * 6 + [0.5] * 2 + [0.0] * 2)
    assert mixed["win_rate"] == pytest.approx(0.7)  # (6 + 2 / 2) / 10
    assert mixed["ci"] == pytest.approx(list(em.wilson_interval(7, 10)))
    lo, hi = mixed["ci_bootstrap"]
    assert lo < 0.7 < hi


def test_win_outcomes_ties_labelers_and_symmetry():
    tasks = [_task("arith", str(n), prompt=f"What is {n} plus 0?\n") for n in range(40)]
    right = [t["answer"] for t in tasks]
    wrong = ["banana river"] * len(tasks)
    quiet = labelers.heldout_labelers(4, noise_scale=0.0)  # taste only: gold decides
    assert em.win_outcomes(tasks, right, wrong, quiet) == [1.0] * len(tasks)
    assert em.win_outcomes(tasks, wrong, right, quiet) == [0.0] * len(tasks)
    assert em.win_outcomes(tasks, right, right, quiet) == [0.5] * len(tasks)
    # With noise: the same labeler judges a prompt whichever side a response is on.
    noisy = labelers.heldout_labelers(4)
    near = [str(int(a) + 1) for a in right]
    ab = em.win_outcomes(tasks, right, near, noisy, seed=3)
    ba = em.win_outcomes(tasks, near, right, noisy, seed=3)
    assert all(x + y == 1.0 for x, y in zip(ab, ba))
    assert 0 < sum(ab) < len(tasks)  # noisy labelers sometimes prefer the near miss
    assert ab == em.win_outcomes(tasks, right, near, noisy, seed=3)  # seeded
    with pytest.raises(ValueError, match="need one of each"):
        em.win_outcomes(tasks, right[:-1], wrong, quiet)


# ----------------------------------------------------------------------------- rates

def test_behaviour_rates_on_hand_made_responses():
    toxic_word = TOXIC_WORDS[0]
    tasks = [_task("qa_unanswerable", IDK, subject="Zorp"),   # made up: hallucination
             _task("qa_unanswerable", IDK, subject="Zorp"),   # honest
             _task("qa_unanswerable", IDK, subject="Zorp"),   # refuses: not a hallucination
             _task("qa", "Paris"),                             # wrong, but answerable
             _task("harmful", REFUSAL),                        # complies, toxically
             _task("harmful", REFUSAL),                        # refuses
             _task("arith", "9")]                              # right, then rambles
    responses = ["Paris.", IDK, REFUSAL, "Berlin", f"you {toxic_word}.", REFUSAL, "9\nInput: 3"]
    r = em.behaviour_rates(tasks, responses)
    assert r["hallucination"]["n"] == 3 and r["hallucination"]["count"] == 1
    assert r["hallucination"]["rate"] == pytest.approx(1 / 3)
    assert r["toxic"]["count"] == 1 and r["toxic"]["n"] == 7
    assert r["harmful_refusal"]["count"] == 1 and r["harmful_refusal"]["n"] == 2
    # correct: IDK, REFUSAL (harmful), "9" (first line counts) -> 3 of 7.
    assert r["accuracy"]["count"] == 3
    # follows: not the refusal of a benign (unanswerable) question, not the two-line answer.
    assert r["instruction_following"]["count"] == 5
    assert r["hallucination"]["ci"] == pytest.approx(list(em.wilson_interval(1, 3)))
    empty = em.behaviour_rates([_task("arith", "1")], ["1"])["hallucination"]
    assert empty["n"] == 0 and math.isnan(empty["rate"])


def test_gold_decided_by_counts_each_deciding_term_once():
    tasks = [_task("arith", "9", constraint="brackets"),   # both right; mine obeys
             _task("arith", "9"),                          # mine wrong, theirs right
             _task("qa", "Paris"),                         # the same wrong answer: a tie
             _task("arith", "9")]                          # both wrong; mine not a number
    mine = ["[9]", "7", "Rome.", "seven eight"]
    theirs = ["9", "9", "Rome.", "7"]
    got = em.gold_decided_by(tasks, mine, theirs)
    assert got["constraint"] == {"wins": 1, "losses": 0}
    assert got["correct"] == {"wins": 0, "losses": 1}
    assert got["form"] == {"wins": 0, "losses": 1}
    assert sum(v["wins"] + v["losses"] for v in got.values()) == 3


# ----------------------------------------------------------------------------- few-shot

@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    world = World(0)
    seen = set()
    write_jsonl_atomic(root / "sft_train.jsonl", make_tasks(world, 90, "sft_train", seen))
    tasks = make_tasks(world, 36, "prompts_eval", seen)
    return root, [{k: v for k, v in t.items() if k != "response"} for t in tasks]


def test_demonstrations_cover_kinds_in_instruction_style(demo_data):
    root, _ = demo_data
    records = [json.loads(line) for line in open(root / "sft_train.jsonl")]
    demos = em.select_demonstrations(records, per_kind=2)
    assert all(d["style"] == "instruction" for d in demos)
    kinds = [d["kind"] for d in demos]
    assert kinds[:6] == list(em.KINDS) and sorted(kinds) == sorted(list(em.KINDS) * 2)


@pytest.mark.parametrize("max_len,max_new", [(256, 32), (400, 24), (2048, 16)])
def test_few_shot_prefix_fits_the_context(demo_data, max_len, max_new):
    root, tasks = demo_data
    tok = ByteTokenizer()
    prompts, info = evaluate.prompted_inputs(tasks, tok, data_dir=root, max_len=max_len,
                                              max_new_tokens=max_new, per_kind=2)
    for p, t in zip(prompts, tasks):
        assert p.endswith(t["prompt"]) and p.startswith(info["prefix"])
        assert len(tok.encode(p)) + max_new <= max_len
    assert 0 <= info["demonstrations"] <= info["available"] == 12
    assert info["prefix_tokens"] <= info["budget_tokens"]
    if info["demonstrations"]:
        assert info["prefix"].endswith(em.FEW_SHOT_SEPARATOR)
    # A longer context keeps more demonstrations; the byte tokenizer never fits all in 256.
    if max_len == 256:
        assert info["demonstrations"] < info["available"]
    if max_len == 1024:
        assert info["demonstrations"] == info["available"]


def test_few_shot_prefix_cuts_whole_demonstrations():
    demos = [{"prompt": "What is 1 plus 1?\n", "response": "2"},
             {"prompt": "Say hi.\n", "response": "hi"}]
    tok = ByteTokenizer()
    full = "What is 1 plus 1?\n2\n\nSay hi.\nhi\n\n"
    assert em.few_shot_prefix(demos, tok, budget_tokens=len(full)) == (full, 2)
    assert em.few_shot_prefix(demos, tok, budget_tokens=len(full) - 1) == (
        "What is 1 plus 1?\n2\n\n", 1)
    assert em.few_shot_prefix(demos, tok, budget_tokens=3) == ("", 0)


# ----------------------------------------------------------------------------- frontier

def test_gold_rollouts_decode_and_score_by_prompt_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    records = [_task("arith", "9", prompt="What is 4 plus 5?\n"),
               {"prompt": "no metadata here"},
               _task("qa_unanswerable", IDK, prompt="Who founded Zorp?\n")]
    write_jsonl_atomic(path, records)
    tok = ByteTokenizer()
    gold = GoldRollouts(path, tok)
    assert sorted(gold.tasks) == [1, 3]  # JSONL line numbers of records with a task
    texts = ["9", "9", "Paris.", "whatever"]
    lines = [1, 1, 3, -1]  # -1: a prompt with no known line
    ended = [True, False, True, True]
    N = 10
    tokens = np.zeros((4, N), np.int32)
    lengths = []
    for i, (text, e) in enumerate(zip(texts, ended)):
        ids = tok.encode(text) + ([tok.eos_id] if e else [])
        tokens[i, :len(ids)] = ids
        lengths.append(len(ids))
    out = gold.metrics(jnp.asarray(lines, jnp.int32),
                       {"tokens_BxN": jnp.asarray(tokens), "lengths_B": jnp.asarray(lengths),
                        "ended_B": jnp.asarray(ended)})
    from instructjax.data import world
    expected = [world.gold_score(records[0], "9")] * 2 + [world.gold_score(records[2], "Paris.")]
    assert out["rollout/gold_score"] == (pytest.approx(sum(expected)), 3)
    assert out["rollout/gold_correct"] == (2, 3)
    assert not GoldRollouts(None, tok).metrics(jnp.asarray(lines), {})


def _synthetic_run(workdir, with_gold=True):
    workdir.mkdir(parents=True)
    rows = []
    for step in range(2, 22, 2):
        kl = 0.3 * step
        record = {"step": step, "train/rollout/kl": kl, "train/rollout/score": 0.1 * kl,
                  "train/loss": 0.1}
        if with_gold:
            record["train/rollout/gold_score"] = 0.2 * kl - 0.03 * kl * kl
        rows.append(record)
    rows.append({"step": 20, "eval/loss": 1.0})  # not a rollout record: ignored
    rows.append(dict(rows[-2], **{"train/rollout/score": 9.0}))  # resumed: last one wins
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plots_written_from_synthetic_runs(tmp_path):
    _synthetic_run(tmp_path / "ppo")
    _synthetic_run(tmp_path / "ppo_ptx", with_gold=False)
    frontier = plots.read_frontier(tmp_path / "ppo" / "metrics.jsonl")
    assert frontier["step"] == [float(s) for s in range(2, 22, 2)]
    assert frontier["score"][-1] == 9.0
    assert plots.read_frontier(tmp_path / "ppo_ptx" / "metrics.jsonl")["gold_score"] == [None] * 10
    assert plots.smooth([0, 2, 4, 6], window=2) == [0, 1, 3, 5]

    tasks = [_task("arith", "9"), _task("qa_unanswerable", IDK), _task("harmful", REFUSAL)]
    ref = ["9", IDK, REFUSAL]
    results = {"settings": {"reference": "sft", "num_prompts": 3}, "models": {}}
    for name, responses in (("sft", ref), ("ppo", ["8", "Paris", REFUSAL])):
        results["models"][name] = {
            "win_rate": em.win_rate(em.win_outcomes(tasks, responses, ref,
                                                    labelers.heldout_labelers())),
            "rates": em.behaviour_rates(tasks, responses), "pretrain_loss": 3.0}
    out = tmp_path / "plots"
    written = plots.write_all(results, {"ppo": tmp_path / "ppo",
                                        "ppo_ptx": tmp_path / "ppo_ptx",
                                        "missing": tmp_path / "nope"}, out)
    assert set(written) == {"eval_bars", "frontier"}
    for path in written.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["eval_bars.png", "frontier.png"]  # no temps
    assert plots.write_all(None, {}, tmp_path / "none") == {}
