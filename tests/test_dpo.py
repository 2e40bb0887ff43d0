"""DPO: pairs from K-way rankings, prompt-masked pair batches, the row-masked eval, and a tiny
end-to-end run (through the unchanged train step) that learns an easy preference and
resumes exactly."""
import json
import math
import shutil

import jax
import numpy as np
import pytest

from instructjax import parallel
from instructjax.config import DataConfig, OptimConfig, TrainConfig
from instructjax.data import pairs as pairs_lib
from instructjax.data.jsonl import DataError
from instructjax.data.tokenizer import train_tokenizer
from instructjax.losses import DPOLossConfig, Objective, dpo_loss, make_apply
from instructjax.model import config as model_config
from instructjax.model.transformer import Transformer
from instructjax.train import checkpoint as ckpt_lib, state as state_lib
from instructjax.rlhf.dpo_run import DPOConfig, make_add_reference, make_row_masked_eval, train_dpo
from instructjax.train.workdir import MODEL_CONFIG_FILE, TOKENIZER_FILE, load_trained

SEQ_LEN = 48


def _prompt(i):
    return f"How many apples in box {i}?"


def _texts():
    return [f"{_prompt(i)} {i % 7} apples. xxx! xx! x!" for i in range(200)]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A stand-in for an SFT workdir: tokenizer, model config, one checkpoint of the tiny
    model (random init is enough: DPO only needs a policy and a reference)."""
    path = tmp_path_factory.mktemp("sft")
    train_tokenizer(_texts(), path / TOKENIZER_FILE, vocab_size=300)
    cfg = model_config.preset("tiny")
    (path / MODEL_CONFIG_FILE).write_text(json.dumps(
        {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}))
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    tx = state_lib.make_optimizer(OptimConfig(learning_rate=1e-3), 1)
    state, _ = state_lib.init_state(Transformer(cfg), tx, mesh, SEQ_LEN, jax.random.key(0))
    checkpointer = ckpt_lib.Checkpointer(path / "checkpoints")
    checkpointer.save(0, state, {})
    checkpointer.close()
    return path


def test_preference_pairs_by_hand():
    responses = ["a", "b", "a", "c", "d"]
    ranking = [2, 1, 0, 4, 3]  # best first: a(2) > b(1) > a(0, a copy: dropped) > d(4) > c(3)
    assert pairs_lib.preference_pairs(responses, ranking, "all") == [
        (2, 1), (2, 4), (2, 3), (1, 4), (1, 3), (4, 3)]
    assert pairs_lib.preference_pairs(responses, ranking, "best") == [(2, 1), (2, 4), (2, 3)]
    assert pairs_lib.preference_pairs(responses, ranking, "best_worst") == [(2, 3)]
    assert pairs_lib.preference_pairs(["same", "same", "same"], [1, 0, 2], "all") == []
    with pytest.raises(ValueError, match="pair mode"):
        pairs_lib.preference_pairs(responses, ranking, "random")


def test_pair_source_reads_json_and_pairwise_records():
    records = [
        {"prompt": "p0", "responses": json.dumps(["x", "y", "z"]), "ranking": "[1, 2, 0]",
         "origin": "f.jsonl:1", "meta": "{}"},
        {"prompt": "p1", "responses": ["u", "u"], "ranking": [0, 1]},  # no distinct pair
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
         "rejected": "\n\nHuman: hi\n\nAssistant: go"},
    ]
    source = pairs_lib.PairSource(records, "all")
    assert len(source) == 4
    assert [source[i]["chosen"] + ">" + source[i]["rejected"] for i in range(3)] == [
        "y>z", "y>x", "z>x"]
    assert source[0]["origin"] == "f.jsonl:1"
    assert source[3] == {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello",
                         "rejected": " go", "origin": "<input>"}


def test_loss_mask_is_exactly_response_and_eos(sft_dir):
    encode = pairs_lib.EncodePair(sft_dir / TOKENIZER_FILE, SEQ_LEN)
    tok = encode.tokenizer
    pair = {"prompt": _prompt(3), "chosen": " 3 apples.", "rejected": " xxx!"}
    out = encode(pair)
    prompt = tok.encode(pair["prompt"])
    for side in pairs_lib.SIDES:
        response = tok.encode(pair[side]) + [tok.eos_id]
        n = len(prompt) + len(response)
        tokens, mask = out[f"{side}_tokens_BxT"], out[f"{side}_loss_mask_BxT"]
        assert tokens.shape == mask.shape == (SEQ_LEN,)
        np.testing.assert_array_equal(tokens[:n], prompt + response)
        assert np.all(tokens[n:] == tok.pad_id)
        # Target alignment: mask[t] scores tokens[t]; exactly the response tokens and EOS.
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(len(prompt), n))
        assert tokens[np.flatnonzero(mask)[-1]] == tok.eos_id
        np.testing.assert_array_equal(out[f"{side}_segment_ids_BxT"], np.arange(SEQ_LEN) < n)
        np.testing.assert_array_equal(out[f"{side}_positions_BxT"][:n], np.arange(n))
        assert np.all(out[f"{side}_positions_BxT"][n:] == 0)

    long = encode({**pair, "chosen": " apples" * SEQ_LEN})
    assert encode.truncated == 1 and long["chosen_loss_mask_BxT"][-1] == 1
    assert tok.eos_id not in long["chosen_tokens_BxT"]
    with pytest.raises(DataError, match=r"f.jsonl:7: the prompt is \d+ tokens.*--seq_len"):
        encode({**pair, "prompt": "apples " * SEQ_LEN, "origin": "f.jsonl:7"})


def _comparison_rows(n, seed):
    """Easy preference: the right count of apples beats any shouting (the order among the
    shouts is arbitrary, so only 'best' pairs have a preference to learn)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(2, 5))
        good = f" {i % 7} apples."
        responses = [good] + [f" {'x' * int(rng.integers(1, 4))}!" for _ in range(k - 1)]
        order = rng.permutation(k)
        shuffled = [responses[j] for j in order]
        ranking = sorted(range(k), key=lambda j: (order[j] != 0, j))  # the good one first
        rows.append({"prompt": _prompt(i), "responses": shuffled, "ranking": ranking})
    return rows


def test_pair_batches_pad_and_resume(sft_dir):
    from instructjax.data.tokenizer import Tokenizer
    tok = Tokenizer.load(sft_dir / TOKENIZER_FILE)
    source = pairs_lib.PairSource(_comparison_rows(5, seed=1), "best_worst")
    batches = list(pairs_lib.pair_batches(source, tok, seq_len=SEQ_LEN, batch_size=4,
                                          shuffle=False, num_epochs=1, drop_remainder=False))
    assert [b["valid_B"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert set(batches[1]) == set(pairs_lib.PAIR_BATCH_KEYS)
    assert not batches[1]["chosen_loss_mask_BxT"][1:].any()

    it = iter(pairs_lib.pair_batches(source, tok, seq_len=SEQ_LEN, batch_size=2, seed=3))
    next(it)
    saved = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses an epoch boundary
    it2 = iter(pairs_lib.pair_batches(source, tok, seq_len=SEQ_LEN, batch_size=2, seed=3))
    it2.set_state(saved)
    for want in expected:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_row_masked_eval_ignores_padding_rows(sft_dir):
    from instructjax.data.tokenizer import Tokenizer
    tok = Tokenizer.load(sft_dir / TOKENIZER_FILE)
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    model = Transformer(model_config.preset("tiny"))
    apply = make_apply(model)
    abstract, shardings = state_lib.abstract_params(model, mesh)
    ref = ckpt_lib.restore_params(sft_dir, abstract)
    params = jax.tree.map(lambda x: x * 1.05, ref)  # a policy that differs from the reference
    source = pairs_lib.PairSource(_comparison_rows(5, seed=2), "best_worst")
    padded = next(iter(pairs_lib.pair_batches(source, tok, seq_len=SEQ_LEN, batch_size=8,
                                              shuffle=False, num_epochs=1,
                                              drop_remainder=False)))
    add_ref = make_add_reference(apply, mesh, shardings)
    objective = Objective(dpo_loss, DPOLossConfig(beta=0.5))
    evaluate = make_row_masked_eval(objective, apply=apply, mesh=mesh, params_shardings=shardings)
    masked = jax.device_get(evaluate(params, add_ref(ref, padded)))
    real = {k: v[:5] for k, v in padded.items()}
    _, direct = jax.jit(lambda p, b: objective(p, b, None, apply=apply))(
        params, add_ref(ref, real))
    for name, (total, weight) in jax.device_get(direct).items():
        np.testing.assert_allclose(masked[name][0], total, rtol=1e-5, atol=1e-5)
        if name != "tokens":  # a count: (sum, 1) per call, so per row under the mask
            np.testing.assert_allclose(masked[name][1], weight)


def _config(workdir, sft_dir, files, **train):
    return DPOConfig(
        workdir=str(workdir), init_from=str(sft_dir), beta=0.5, pairs="best",
        data=DataConfig(data_dir=str(workdir.parent / "data"), train_files=(files[0],),
                        eval_files=(files[1],)),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=1, weight_decay=0.0),
        train=TrainConfig(**{"steps": 8, "batch_size": 8, "seq_len": SEQ_LEN, "log_every": 2,
                             "eval_every": 100, "eval_batches": 0, "checkpoint_every": 4,
                             **train}))


def test_dpo_learns_an_easy_preference_and_resumes_exactly(tmp_path, sft_dir):
    files = []
    for split, n, seed in (("train", 48, 0), ("eval", 10, 1)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _comparison_rows(n, seed)))
        files.append(str(path))
    workdir = tmp_path / "dpo"
    cfg = _config(workdir, sft_dir, files)
    final = train_dpo(cfg)
    assert json.loads((workdir / "final_eval.json").read_text())["step"] == 8
    # At step 0 policy == reference: loss log 2, margin 0. Eight steps later:
    assert final["eval/loss"] < math.log(2) - 0.2, final
    assert final["eval/accuracy"] > 0.9, final
    assert final["eval/reward_chosen"] > final["eval/reward_rejected"]
    assert final["eval/pairs"] > 10  # 'best' pairs: K - 1 per comparison

    # The workdir is a finished LM run for later stages.
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    _, params, tokenizer = load_trained(workdir, mesh)
    assert tokenizer.vocab_size <= 300
    want = jax.device_get(params)

    # Lose the last checkpoint: the rerun resumes at step 4 and ends bit-identical.
    shutil.rmtree(workdir / "checkpoints" / "8")
    assert train_dpo(cfg) == final
    got = jax.device_get(load_trained(workdir, mesh)[1])
    jax.tree.map(np.testing.assert_array_equal, got, want)
