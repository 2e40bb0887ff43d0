"""Simulated labelers (agreement calibration, disjoint pools, determinism), the comparison
format (native, generic pairwise, HH-RLHF), the "comparison" tfds kind and
comparison_batches for the reward model."""
import dataclasses
import json
import random
import re

import numpy as np
import pytest

from instructjax.data.builders import jsonl_data_source
from instructjax.data.comparison_packing import PACKED_COMPARISON_KEYS, packed_comparison_batches
from instructjax.data.comparisons import (HH_MARKER, ranks, read_comparisons, to_comparison,
                                          write_comparisons)
from instructjax.data.jsonl import DataError, write_jsonl_atomic
from instructjax.data.pipeline import COMPARISON_BATCH_KEYS, comparison_batches
from instructjax.data.tokenizer import train_tokenizer
from instructjax.data.world import World, gold_score, make_tasks
from instructjax.data.world.labelers import (agreement, compare, gold_agreement,
                                             gold_response, heldout_labelers,
                                             label_comparisons, mean_pool_agreement,
                                             perturbed_responses, rank,
                                             training_labelers)


@pytest.fixture(scope="module")
def world_sets():
    """700 world tasks with 4..9 model-like responses each (about 9,000 response pairs)."""
    tasks = make_tasks(World(0), 700, "labelers", set())
    rng = random.Random(7)
    return tasks, [perturbed_responses(t, rng, rng.randint(4, 9)) for t in tasks]


# ----------------------------------------------------------------------------- labelers


def test_training_labelers_agree_about_73_percent(world_sets):
    tasks, sets = world_sets
    pairs = sum(len(s) * (len(s) - 1) // 2 for s in sets)
    assert pairs > 8000  # standard error of an agreement near 0.73: well under 1%
    train, held = training_labelers(), heldout_labelers()
    assert agreement(train[0], train[0], tasks, sets) == 1.0
    value = agreement(train[0], train[1], tasks, sets)
    assert 0.68 <= value <= 0.78, value
    # Another pair of training labelers, and a held-out vs a training labeler, too.
    assert 0.68 <= agreement(train[2], train[5], tasks, sets) <= 0.78
    assert 0.68 <= agreement(held[0], train[3], tasks, sets) <= 0.78


def test_agreement_is_the_share_of_pairs_two_rankings_order_alike(world_sets):
    """The vectorised count against the definition: each labeler's `rank` of each set,
    identical texts left out, ties in score (noiseless labelers) ranked as `rank` does."""
    tasks, sets = world_sets[0][:80], world_sets[1][:80]
    a, b, c = training_labelers()[:3]
    quiet = dataclasses.replace(a, beta=0.0)
    for x, y in ((a, b), (quiet, b), (quiet, dataclasses.replace(b, beta=0.0, taste=()))):
        same = total = 0
        for task, responses in zip(tasks, sets):
            px, py = ({r: place for place, r in enumerate(rank(task, responses, lab))}
                      for lab in (x, y))
            for i in range(len(responses)):
                for j in range(i + 1, len(responses)):
                    if responses[i] != responses[j]:
                        same += (px[i] < px[j]) == (py[i] < py[j])
                        total += 1
        assert agreement(x, y, tasks, sets) == pytest.approx(same / total, abs=1e-12)
    pool = [a, b, c]
    pairs = [agreement(p, q, tasks, sets) for p, q in ((a, b), (a, c), (b, c))]
    assert mean_pool_agreement(pool, tasks, sets) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_pools_disjoint_and_deterministic():
    train, held = training_labelers(8), heldout_labelers(4)
    assert len(train) == 8 and len(held) == 4
    ids = [lab.id for lab in train + held]
    seeds = [lab.seed for lab in train + held]
    assert len(set(ids)) == len(ids) and len(set(seeds)) == len(seeds)
    assert all(i.startswith("train-") for i in ids[:8])
    assert all(i.startswith("heldout-") for i in ids[8:])
    assert training_labelers(8) == train and heldout_labelers(4) == held
    assert training_labelers(3, seed=1)[0].seed != train[0].seed
    assert any(lab.taste for lab in train)  # labelers have their own taste
    with pytest.raises(ValueError, match="at least one"):
        training_labelers(0)


def test_rankings_deterministic_and_ties_broken_by_noise(world_sets):
    tasks, sets = world_sets
    a, b = training_labelers(2)
    differ = 0
    for task, responses in zip(tasks[:200], sets[:200]):
        ranking = rank(task, responses, a)
        assert sorted(ranking) == list(range(len(responses)))
        assert rank(dict(task), list(responses), training_labelers(1)[0]) == ranking
        # The noise belongs to the text, not its index: reversing the list reverses indices.
        back = rank(task, responses[::-1], a)
        assert [len(responses) - 1 - i for i in back] == ranking
        differ += rank(task, responses, b) != ranking
    assert differ > 50
    # Equal gold scores (here identical texts) are ordered by the noise, not by index.
    first_wins = [rank(t, [gold_response(t)] * 2, a)[0] == 0 for t in tasks[:300]]
    assert 0.35 < np.mean(first_wins) < 0.65
    # The ranking depends on the task id too: the same responses to a renamed task.
    renamed = [rank({**t, "id": "other-" + t["id"]}, s, a) != rank(t, s, a)
               for t, s in zip(tasks[:100], sets[:100])]
    assert sum(renamed) > 20


def test_labelers_prefer_gold_over_garbage(world_sets):
    tasks, sets = world_sets
    rng = random.Random(3)
    train = training_labelers(4)
    garbage = [" ".join(rng.choice(["lamp", "the", "of", "def", "(", "river", "Q"])
                        for _ in range(rng.randint(3, 10))) for _ in tasks]
    wins = [compare(t, gold_response(t), g, lab) == 0 and compare(t, g, gold_response(t), lab) == 1
            for t, g in zip(tasks[:300], garbage) for lab in train]
    assert np.mean(wins) > 0.95
    assert all(gold_score(t, gold_response(t)) >= 0.9 for t in tasks[:300])
    assert 0.78 < gold_agreement(train[0], tasks, sets) < 0.95  # noisy, but gold on average


def test_label_comparisons_write_and_read(world_sets, tmp_path):
    tasks, sets = world_sets
    records = label_comparisons(tasks[:40], sets[:40], training_labelers(), seed=0)
    write_comparisons(tmp_path / "c.jsonl", records)
    back = [r for _, r in read_comparisons(tmp_path / "c.jsonl")]
    assert back == records
    assert {r["labeler"] for r in back} <= {lab.id for lab in training_labelers()}
    assert ranks([2, 0, 1]) == [1, 2, 0]


# ----------------------------------------------------------------------------- format


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
BAD_COMPARISONS = [  # (bad row, what the error says after "<path>:<line>: ")
    ({**GOOD, "ranking": [0, 0, 1]}, "'ranking' [0, 0, 1] is not a permutation of 0..2"),
    ({**GOOD, "ranking": [0, 1]}, "'ranking' [0, 1] is not a permutation"),
    ({**GOOD, "ranking": [0, 1, 3]}, "'ranking' [0, 1, 3] is not a permutation"),
    ({**GOOD, "ranking": [0, 1, True]}, "field 'ranking' must be a list of integers"),
    ({**GOOD, "ranking": "0 1 2"}, "field 'ranking' must be a list of integers"),
    ({**GOOD, "responses": []}, "field 'responses' is empty"),
    ({**GOOD, "responses": ["a"], "ranking": [0]}, "1 responses; a comparison needs 2 to 9"),
    ({**GOOD, "responses": list("abcdefghij"), "ranking": list(range(10))}, "10 responses"),
    ({**GOOD, "responses": ["a", 2, "c"]}, "responses[1] must be a string, got int"),
    ({**GOOD, "responses": "abc"}, "field 'responses' must be a list of strings, got str"),
    ({**GOOD, "prompt": None}, "field 'prompt' must be a string, got null"),
    ({"responses": ["a", "b"], "ranking": [0, 1]}, "missing field 'prompt'"),
    ({"prompt": "p"}, "missing field 'responses'"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "field 'rejected' must be a string"),
    ({**GOOD, "chosen": "a", "rejected": "b"}, "the record has both 'responses' and"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi there"},
     "field 'rejected' has no '\\n\\nAssistant:' turn"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: ho\n\nAssistant: no"},
     "'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' (first "
     "difference at character 10: 'i"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]', "malformed JSON"),
]


@pytest.mark.parametrize("row,message", BAD_COMPARISONS)
def test_read_comparisons_errors_name_file_and_line(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [GOOD, "", row])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: {message}")):
        list(read_comparisons(path))


def test_native_and_pairwise_rows(tmp_path):
    hh_prompt = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 plus 2?\n\nAssistant:"
    rows = [
        {**GOOD, "id": 7, "labeler": "train-1", "kind": "arith"},
        {"prompt": "p", "responses": ["same", "same"], "ranking": [1, 0]},  # duplicates: ok
        {"prompt": "", "responses": ["", "x"], "ranking": [0, 1]},  # empty texts: ok
        {"chosen": hh_prompt + " 4.", "rejected": hh_prompt + " 5.", "id": "hh-1"},
        {"prompt": "Q?", "chosen": " yes", "rejected": " no", "source": "x"},
    ]
    got = list(read_comparisons(_write(tmp_path / "mixed.jsonl", rows)))
    assert [line for line, _ in got] == [1, 2, 3, 4, 5]
    got = [r for _, r in got]
    assert got[:3] == rows[:3]
    assert got[3] == {"prompt": hh_prompt, "responses": [" 4.", " 5."], "ranking": [0, 1],
                      "id": "hh-1"}
    assert got[4] == {"prompt": "Q?", "responses": [" yes", " no"], "ranking": [0, 1],
                      "source": "x"}
    # The split is at the LAST marker of each transcript: a reply that itself contains the
    # marker makes the two prompts differ, which is an error, not a silent mis-split.
    bad = {"chosen": hh_prompt + " 4.", "rejected": hh_prompt + " 5, and\n\nAssistant: 6"}
    with pytest.raises(DataError, match=r"^f\.jsonl:9: 'chosen' and 'rejected' differ"):
        to_comparison(bad, "f.jsonl:9")


def test_hh_rows_load_as_k2(tmp_path):
    p1 = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 plus 2?\n\nAssistant:"
    p2 = "\n\nHuman: Tell me a joke.\n\nAssistant:"
    path = _write(tmp_path / "hh.jsonl", [{"chosen": p1 + " 4.", "rejected": p1 + " 5."},
                                          {"chosen": p2 + " Why did...", "rejected": p2}])
    got = [r for _, r in read_comparisons(path)]
    assert got == [{"prompt": p1, "responses": [" 4.", " 5."], "ranking": [0, 1]},
                   {"prompt": p2, "responses": [" Why did...", ""], "ranking": [0, 1]}]


# ----------------------------------------------------------------------------- builder + batches


@pytest.fixture(scope="module")
def built(tmp_path_factory, world_sets):
    d = tmp_path_factory.mktemp("cmp")
    tasks, sets = world_sets
    records = label_comparisons(tasks[:30], sets[:30], training_labelers(), seed=0)
    write_jsonl_atomic(d / "native.jsonl", records)
    p = "\n\nHuman: Where is Kroufak?\n\nAssistant:"
    write_jsonl_atomic(d / "hh.jsonl", [{"chosen": p + f" In Arvonia {i}.",
                                         "rejected": p + " I don't know."} for i in range(5)])
    texts = [t["prompt"] + r for t, rs in zip(tasks, sets) for r in rs] + [p] * 5
    tok = train_tokenizer(texts, d / "tok.model", vocab_size=500)
    src = jsonl_data_source({"train": d / "native.jsonl", "hh": d / "hh.jsonl"},
                            kind="comparison", data_dir=d / "tfds")
    return d, records, src, tok


def _fitting_len(records, tok):  # the longest prompt + response + EOS
    return max(len(tok.encode(r["prompt"] + x)) + 1 for r in records for x in r["responses"])


def test_builder_round_trip_comparison(built):
    d, records, src, _ = built
    assert len(src["train"]) == len(records) and len(src["hh"]) == 5
    by_line = {}
    for r in src["train"]:
        path, line = r["origin"].rsplit(":", 1)
        assert path == str(d / "native.jsonl")
        by_line[int(line)] = r
    for line, rec in enumerate(records, start=1):
        r = by_line[line]
        assert r["prompt"] == rec["prompt"]
        assert json.loads(r["responses"]) == rec["responses"]
        assert json.loads(r["ranking"]) == rec["ranking"]
        assert json.loads(r["meta"]) == {"labeler": rec["labeler"], "kind": rec["kind"],
                                         "id": rec["id"]}
    hh = sorted(src["hh"], key=lambda r: r["origin"])
    assert hh[0]["prompt"].endswith(HH_MARKER) and json.loads(hh[0]["ranking"]) == [0, 1]
    assert json.loads(hh[0]["responses"]) == [" In Arvonia 0.", " I don't know."]


def test_builder_validates_at_build_time(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "ranking": [1, 1, 0]}])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: 'ranking' [1, 1, 0]")):
        jsonl_data_source({"train": path}, kind="comparison", data_dir=tmp_path / "tfds")


def test_comparison_batches(built):
    d, records, src, tok = built
    seq_len, k_max, bsz = _fitting_len(records, tok) + 3, 9, 4
    by_prompt = {r["prompt"]: r for r in records}
    batches = list(comparison_batches(src["train"], tok, seq_len=seq_len, batch_size=bsz,
                                      k_max=k_max, shuffle=False, num_epochs=1,
                                      drop_remainder=False))
    assert len(batches) == -(-len(records) // bsz)  # last batch padded, not dropped
    seen = 0
    for b in batches:
        assert set(b) == set(COMPARISON_BATCH_KEYS)
        for k in ("tokens_BxKxT", "positions_BxKxT", "segment_ids_BxKxT"):
            assert b[k].shape == (bsz, k_max, seq_len) and b[k].dtype == np.int32
        for k in ("rank_BxK", "valid_BxK", "truncated_BxK", "response_start_BxK"):
            assert b[k].shape == (bsz, k_max) and b[k].dtype == np.int32
        for e in range(bsz):
            valid = b["valid_BxK"][e]
            n = int(valid.sum())
            assert np.all(valid == (np.arange(k_max) < n))  # real responses first
            if n == 0:  # a padding element of the last batch
                assert np.all(b["segment_ids_BxKxT"][e] == 0)
                assert np.all(b["rank_BxK"][e] == k_max)
                continue
            seen += 1
            seg = b["segment_ids_BxKxT"][e]
            # The prompt: the common prefix of the rows, identical to a record's prompt.
            first = b["tokens_BxKxT"][e, 0][seg[0] > 0]
            record = next(r for p, r in by_prompt.items()
                          if tok.encode(p) == first[:len(tok.encode(p))].tolist())
            prompt = tok.encode(record["prompt"])
            assert n == len(record["responses"])
            # rank/valid consistency: the ranks of the real slots are a permutation.
            rank_k = b["rank_BxK"][e]
            assert sorted(rank_k[:n]) == list(range(n)) and np.all(rank_k[n:] == k_max)
            assert [int(i) for i in np.argsort(rank_k[:n])] == record["ranking"]
            for k in range(k_max):
                row, s, pos = b["tokens_BxKxT"][e, k], seg[k], b["positions_BxKxT"][e, k]
                length = int(s.sum())
                assert np.all(s[:length] == 1) and np.all(s[length:] == 0)
                assert np.all(pos[:length] == np.arange(length)) and np.all(pos[length:] == 0)
                assert np.all(row[length:] == tok.pad_id)
                if k >= n:
                    assert length == 0 and b["response_start_BxK"][e, k] == 0
                    continue
                assert row[:len(prompt)].tolist() == prompt
                assert b["response_start_BxK"][e, k] == len(prompt)
                assert row[length - 1] == tok.eos_id and b["truncated_BxK"][e, k] == 0
                assert tok.decode(row[len(prompt):length - 1]) == record["responses"][k]
    assert seen == len(records)


def test_comparison_truncation_and_long_prompt(tmp_path, built):
    _, _, _, tok = built
    rows = [{"prompt": "What is 2 plus 2?\n", "responses": ["4", "four " * 40, "5"],
             "ranking": [0, 2, 1], "origin": "x.jsonl:1"}]
    prompt = tok.encode(rows[0]["prompt"])
    seq_len = len(prompt) + 6
    ds = comparison_batches(rows, tok, seq_len=seq_len, batch_size=1, k_max=4, shuffle=False,
                            num_epochs=1)
    (b,) = list(ds)
    assert b["truncated_BxK"][0].tolist() == [0, 1, 0, 0]
    long_row = b["tokens_BxKxT"][0, 1]
    assert b["segment_ids_BxKxT"][0, 1].sum() == seq_len  # filled, cut, and no EOS
    assert tok.eos_id not in long_row.tolist()
    assert long_row.tolist() == (prompt + tok.encode("four " * 40))[:seq_len]
    assert b["rank_BxK"][0].tolist() == [0, 2, 1, 4] and b["valid_BxK"][0].tolist() == [1, 1, 1, 0]
    # A prompt that leaves no room for a response: the error names its origin.
    with pytest.raises(DataError, match="^" + re.escape("x.jsonl:1: the prompt is ")):
        list(comparison_batches(rows, tok, seq_len=len(prompt), batch_size=1, shuffle=False,
                                num_epochs=1))
    with pytest.raises(DataError, match=r"^x\.jsonl:1: 3 responses, more than k_max=2"):
        list(comparison_batches(rows, tok, seq_len=64, batch_size=1, k_max=2, shuffle=False,
                                num_epochs=1))
    # Raw pairwise rows work as sources too.
    hh = [{"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant:"}]
    (b,) = list(comparison_batches(hh, tok, seq_len=32, batch_size=1, k_max=2, num_epochs=1))
    assert b["valid_BxK"].tolist() == [[1, 1]] and b["rank_BxK"].tolist() == [[0, 1]]


def test_comparison_iterator_state_resumes_exactly(built):
    _, records, src, tok = built
    seq_len = _fitting_len(records, tok)
    ds = comparison_batches(src["train"], tok, seq_len=seq_len, batch_size=4, seed=3)
    it, fresh = iter(ds), iter(ds)
    for _ in range(5):
        next(it)
    fresh.set_state(json.loads(json.dumps(it.get_state())))  # checkpoints hold JSON
    for _ in range(10):  # 30 records in batches of 4: crosses an epoch boundary
        a, b = next(it), next(fresh)
        for k in COMPARISON_BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    other = next(iter(comparison_batches(src["train"], tok, seq_len=seq_len, batch_size=4, seed=4)))
    assert not np.array_equal(next(iter(ds))["tokens_BxKxT"], other["tokens_BxKxT"])
    shards = [comparison_batches(src["train"], tok, seq_len=seq_len, batch_size=1, shuffle=False,
                                 num_epochs=1, shard_index=i, shard_count=3) for i in range(3)]
    assert sum(len(list(s)) for s in shards) == len(src["train"])


# ----------------------------------------------------------------------------- packed batches


def _packed(src, tok, seq_len, rows, max_prompts, **kw):
    return packed_comparison_batches(src, tok, seq_len=seq_len, rows=rows,
                                     max_prompts=max_prompts, **kw)


def test_packed_batches_hold_every_response_once(built):
    _, records, src, tok = built
    seq_len = _fitting_len(records, tok)
    batches = list(_packed(src["train"], tok, seq_len, rows=12, max_prompts=5, shuffle=False,
                           num_epochs=1))
    by_prompt = {r["prompt"]: r for r in records}
    seen = []
    for b in batches:
        assert set(b) == set(PACKED_COMPARISON_KEYS)
        assert b["tokens_RxT"].shape == (12, seq_len) and b["rank_BxK"].shape == (5, 9)
        flat_tokens, flat_seg = b["tokens_RxT"].reshape(-1), b["segment_ids_RxT"].reshape(-1)
        flat_pos = b["positions_RxT"].reshape(-1)
        for e in range(5):
            n = int(b["valid_BxK"][e].sum())
            if n == 0:
                continue
            texts, spans = [], []
            for k in range(n):
                end = int(b["reward_index_BxK"][e, k])
                start = end - int(flat_pos[end])
                assert flat_tokens[end] == tok.eos_id  # the reward is read at the EOS
                assert np.all(flat_seg[start:end + 1] == flat_seg[end]) and flat_seg[end] > 0
                assert np.all(flat_pos[start:end + 1] == np.arange(end - start + 1))
                assert start // seq_len == end // seq_len  # never across rows
                texts.append(tok.decode(flat_tokens[start:end]))
                spans.append((start, int(b["response_start_BxK"][e, k]), end))
            record = next(r for p, r in by_prompt.items() if texts[0].startswith(p))
            assert texts == [record["prompt"] + x for x in record["responses"]]
            for (start, first, end), response in zip(spans, record["responses"]):
                # the 'pooled' read's span: the response's first token .. its EOS
                assert flat_tokens[start:first].tolist() == tok.encode(record["prompt"])
                assert tok.decode(flat_tokens[first:end]) == response
            assert [int(i) for i in np.argsort(b["rank_BxK"][e][:n])] == record["ranking"]
            seen.append(record["prompt"])
    assert sorted(seen) == sorted(by_prompt)
    assert max(np.max(b["segment_ids_RxT"]) for b in batches) > 1  # rows really are packed
    # The bound on rows is respected: a prompt that cannot fit is a clear error.
    with pytest.raises(DataError, match="raise --pack_rows"):
        list(_packed(src["train"], tok, seq_len, rows=1, max_prompts=5, shuffle=False,
                     num_epochs=1))


def test_packed_indices_are_over_the_global_block(built):
    _, records, src, tok = built
    seq_len, rows = _fitting_len(records, tok), 12
    kw = dict(shuffle=False, num_epochs=1, shard_count=2)
    for shard in range(2):
        for b in _packed(src["train"], tok, seq_len, rows=rows, max_prompts=5, shard_index=shard,
                         **kw):
            live = b["valid_BxK"] > 0
            for key in ("reward_index_BxK", "response_start_BxK"):  # this host's rows
                assert np.all(b[key][live] // (rows * seq_len) == shard)
            local_end = b["reward_index_BxK"][live] - shard * rows * seq_len
            local_first = b["response_start_BxK"][live] - shard * rows * seq_len
            assert np.all(b["tokens_RxT"].reshape(-1)[local_end] == tok.eos_id)
            assert np.all(local_first // seq_len == local_end // seq_len)
            assert np.all((local_first <= local_end)
                          & (b["positions_RxT"].reshape(-1)[local_first] > 0))


def test_packed_iterator_state_resumes_exactly(built):
    _, records, src, tok = built
    ds = _packed(src["train"], tok, _fitting_len(records, tok), rows=12, max_prompts=6, seed=3)
    it, fresh = iter(ds), iter(ds)
    for _ in range(4):
        next(it)
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    for _ in range(12):  # crosses epoch boundaries
        a, b = next(it), next(fresh)
        for k in PACKED_COMPARISON_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("read", ["eos", "pooled"])
def test_packed_ranking_loss_equals_padded(built, read):
    """The same comparisons through the packed and the padded layouts give the same loss,
    accuracy and rewards (one forward pass each, a tiny scalar-head model), for each read."""
    import jax
    from instructjax.losses import RankingLossConfig, make_apply, reward_ranking_loss
    from instructjax.model.config import ModelConfig
    from instructjax.model.transformer import Transformer
    _, records, src, tok = built
    seq_len = _fitting_len(records, tok)
    cfg = ModelConfig(family="gpt2", vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                      d_ff=64, max_len=seq_len)
    model = Transformer(cfg, head="scalar")
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32),
                        np.arange(4)[None].astype(np.int32), np.ones((1, 4), np.int32))["params"]
    apply = make_apply(model)
    loss = jax.jit(lambda p, b: reward_ranking_loss(p, b, None, apply=apply,
                                                    cfg=RankingLossConfig(read=read)))
    n = len(records)
    padded = next(iter(comparison_batches(src["train"], tok, seq_len=seq_len, batch_size=n,
                                          shuffle=False, num_epochs=1)))
    packed = next(iter(_packed(src["train"], tok, seq_len, rows=n * 9, max_prompts=n,
                               shuffle=False, num_epochs=1)))
    assert int(packed["valid_BxK"].sum()) == int(padded["valid_BxK"].sum())
    (s_pad, m_pad), (s_pack, m_pack) = loss(params, padded), loss(params, packed)
    np.testing.assert_allclose(s_pack, s_pad, rtol=1e-5)
    for k in m_pad:
        if k != "tokens":
            np.testing.assert_allclose(m_pack[k], m_pad[k], rtol=1e-5, atol=1e-6)
    if read == "pooled":  # a different read indeed
        eos = reward_ranking_loss(params, padded, None, apply=apply, cfg=RankingLossConfig())
        assert abs(float(eos[1]["reward_mean"][0]) - float(m_pad["reward_mean"][0])) > 1e-3


def test_simulated_labelers_refuse_a_users_prompts_before_sampling(tmp_path):
    from instructjax.rlhf.comparisons import ComparisonConfig, make_comparisons
    own = tmp_path / "prompts.jsonl"
    own.write_text('{"prompt": "Write a haiku about rain."}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:1: missing field 'kind'.*"
                                        r"experiments.sample and rank them yourselves"):
        # The policy does not exist: the prompts are checked before anything is loaded.
        make_comparisons(tmp_path / "no_policy", {"train": own, "eval": own}, tmp_path,
                         num_prompts={"train": 0, "eval": 0}, cfg=ComparisonConfig(), mesh=None)
