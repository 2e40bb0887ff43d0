"""RLHF objectives (reward ranking, DPO, PPO, PPO-ptx) against hand-computed values and
slow Python loops, plus real tiny-Transformer runs through the unchanged train step."""
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax import losses, parallel, rl_losses, rl_ops
from instructjax.config import OptimConfig
from instructjax.model.config import preset
from instructjax.model.transformer import Transformer
from instructjax.train import state as state_lib, step as step_lib


def jit(fn):
    """Jitted loss (eager dispatch of many small ops is slow on the shared CPU)."""
    return jax.jit(fn, static_argnames=("apply", "cfg"))


# --------------------------------------------------------------------------- fake models
# A bigram "policy": logits at position t depend only on tokens[t] (params = [V, V] table),
# and a unigram "value model": values[t] = vtable[tokens[t]] (params = [V]). Their log-probs
# are easy to write by hand and they still have gradients.

def bigram_apply(table, tokens, positions, segment_ids, rng):
    return jnp.asarray(table)[tokens]


def value_apply(vtable, tokens, positions, segment_ids, rng):
    return jnp.asarray(vtable)[tokens]


class CountingApply:
    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, params, tokens, positions, segment_ids, rng):
        self.shapes.append(tuple(tokens.shape))
        return self.fn(params, tokens, positions, segment_ids, rng)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - np.log(np.exp(z - z.max()).sum()) - z.max()


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _pad_rows(rng, B, T, V, min_len=2):
    tokens = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    lengths = rng.integers(min_len, T + 1, size=B)
    for b, L in enumerate(lengths):
        tokens[b, :L] = rng.integers(1, V, size=L)
        seg[b, :L] = 1
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    return tokens, positions, seg, lengths


# --------------------------------------------------------------------------- reward ranking

def _ranking_batch(rng, n_valid, K, T=7, V=20):
    B = len(n_valid)
    tokens, positions, seg, lengths = _pad_rows(rng, B * K, T, V)
    valid = np.zeros((B, K), np.int32)
    rank = np.zeros((B, K), np.int32)  # invalid entries keep rank 0 ("best"): must be ignored
    for b, n in enumerate(n_valid):
        valid[b, :n] = 1
        rank[b, :n] = rng.permutation(n)
    batch = {"tokens_BxKxT": tokens.reshape(B, K, T), "positions_BxKxT": positions.reshape(B, K, T),
             "segment_ids_BxKxT": seg.reshape(B, K, T), "rank_BxK": rank, "valid_BxK": valid}
    return batch, lengths.reshape(B, K)


@pytest.mark.parametrize("K,n_valid,center", [(4, [4, 3, 2, 0], 0.0), (9, [9, 4, 6], 0.0),
                                               (4, [4, 3, 2, 0], 0.3)])
def test_reward_ranking_loss_vs_double_loop(K, n_valid, center):
    rng = np.random.default_rng(K)
    batch, lengths = _ranking_batch(rng, n_valid, K)
    vtable = rng.normal(size=20).astype(np.float32)
    apply = CountingApply(value_apply)
    loss_sum, metrics = jit(losses.reward_ranking_loss)(
        vtable, batch, None, apply=apply, cfg=losses.RankingLossConfig(center_coef=center))
    B, T = len(n_valid), batch["tokens_BxKxT"].shape[-1]
    assert apply.shapes == [(B * K, T)]  # ONE forward pass over every response

    want, prompts, correct, n_pairs, decided, margins = 0.0, 0, 0, 0, 0, 0.0
    for b in range(B):
        r = [float(vtable[batch["tokens_BxKxT"][b, k, lengths[b, k] - 1]]) for k in range(K)]
        terms = []
        for w in range(K):
            for l in range(K):
                if (batch["valid_BxK"][b, w] and batch["valid_BxK"][b, l]
                        and batch["rank_BxK"][b, w] < batch["rank_BxK"][b, l]):
                    terms.append(-log_sigmoid(r[w] - r[l]))
                    correct += r[w] > r[l]
                    decided += r[w] != r[l]  # equal rewards (identical responses) are left out
                    margins += r[w] - r[l]
        assert len(terms) == math.comb(n_valid[b], 2)
        n_pairs += len(terms)
        if terms:
            mean_r = sum(r[:n_valid[b]]) / n_valid[b]  # the centring term, on real responses
            want += sum(terms) / len(terms) + center * mean_r ** 2
            prompts += 1
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)
    assert float(metrics["loss"][1]) == prompts
    assert float(metrics["accuracy"][0]) == correct and float(metrics["accuracy"][1]) == decided
    assert float(metrics["reward_margin"][0]) == pytest.approx(margins, rel=1e-5, abs=1e-5)


# Two prompts' responses by hand: (prompt, response + EOS) token lists, K = 3 (the second
# prompt has two real responses). Packed into an [R=2, T=12] block; padded: [B, K, T].
READ_SEQS = [[([1, 2], [3, 4, 9]), ([1, 2], [5, 9]), ([1, 2], [6, 7, 8, 9])],
             [([3], [9]), ([3], [2, 2, 9])]]
READ_PLACES = [[(0, 0), (0, 5), (1, 0)], [(0, 9), (1, 6)]]  # (row, column of the prompt)


def _read_batches():
    K, T = 3, 12
    rank = np.array([[1, 0, 2], [0, 1, 3]], np.int32)
    valid = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
    packed = {k: np.zeros((2, T), np.int32) for k in ("tokens_RxT", "positions_RxT",
                                                       "segment_ids_RxT")}
    padded = {k: np.zeros((2, K, T), np.int32) for k in ("tokens_BxKxT", "positions_BxKxT",
                                                         "segment_ids_BxKxT")}
    index, start = np.zeros((2, K), np.int32), np.zeros((2, K), np.int32)
    for b, (seqs, places) in enumerate(zip(READ_SEQS, READ_PLACES)):
        for k, ((prompt, response), (row, col)) in enumerate(zip(seqs, places)):
            ids = prompt + response
            n = len(ids)
            packed["tokens_RxT"][row, col:col + n] = ids
            packed["positions_RxT"][row, col:col + n] = np.arange(n)
            packed["segment_ids_RxT"][row, col:col + n] = 1 + packed["segment_ids_RxT"][row].max()
            index[b, k], start[b, k] = row * T + col + n - 1, row * T + col + len(prompt)
            padded["tokens_BxKxT"][b, k, :n] = ids
            padded["positions_BxKxT"][b, k, :n] = np.arange(n)
            padded["segment_ids_BxKxT"][b, k, :n] = 1
            padded.setdefault("response_start_BxK", np.zeros((2, K), np.int32))[b, k] = len(prompt)
    common = {"rank_BxK": rank, "valid_BxK": valid}
    return ({**packed, "reward_index_BxK": index, "response_start_BxK": start, **common},
            {**padded, **common})


def _ranking_loss_reference(r, rank, valid, center=0.0):
    total = 0.0
    for b in range(len(r)):
        live = [k for k in range(len(r[b])) if valid[b][k]]
        terms = [-log_sigmoid(r[b][w] - r[b][l]) for w in live for l in live
                 if rank[b][w] < rank[b][l]]
        if terms:
            mean_r = sum(r[b][k] for k in live) / len(live)
            total += sum(terms) / len(terms) + center * mean_r ** 2
    return total


@pytest.mark.parametrize("read", ["eos", "pooled"])
def test_reward_ranking_loss_reads_packed_and_padded_by_hand(read):
    vtable = np.linspace(-2.0, 3.0, 10).astype(np.float32) ** 2
    packed, padded = _read_batches()
    r = []
    for seqs in READ_SEQS:
        r.append([])
        for prompt, response in seqs:
            v = [float(vtable[t]) for t in response]  # the values of the response's tokens
            r[-1].append(v[-1] if read == "eos" else 0.5 * v[-1] + 0.5 * sum(v) / len(v))
        r[-1] += [0.0] * (3 - len(seqs))
    want = _ranking_loss_reference(r, packed["rank_BxK"], packed["valid_BxK"], center=0.2)
    cfg = losses.RankingLossConfig(read=read, center_coef=0.2)
    for batch in (packed, padded):
        got, metrics = jit(losses.reward_ranking_loss)(vtable, batch, None, apply=value_apply,
                                                       cfg=cfg)
        assert float(got) == pytest.approx(want, rel=1e-5)
        rewards, _ = losses.ranking_rewards(vtable, batch, None, apply=value_apply, read=read)
        np.testing.assert_allclose(np.asarray(rewards) * batch["valid_BxK"], r, rtol=1e-5)
    if read == "eos":  # the last token's read needs no response start
        del packed["response_start_BxK"], padded["response_start_BxK"]
        assert float(jit(losses.reward_ranking_loss)(vtable, packed, None, apply=value_apply,
                                                     cfg=cfg)[0]) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="--rm_read"):
        losses.RankingLossConfig(read="mean")


# --------------------------------------------------------------------------- DPO

def _np_seq_logp(table, tokens, mask):
    total = 0.0
    for t in range(1, len(tokens)):
        if mask[t]:
            total += np_log_softmax(table[tokens[t - 1]])[tokens[t]]
    return total


def _dpo_batch(rng, B=3, T=6, V=5):
    batch = {}
    for side in ("chosen", "rejected"):
        tokens, positions, seg, lengths = _pad_rows(rng, B, T, V, min_len=3)
        mask = np.zeros((B, T), np.float32)
        for b, L in enumerate(lengths):
            mask[b, 2:L] = 1.0  # prompt = first 2 tokens; response (incl. EOS) up to L
        batch.update({f"{side}_tokens_BxT": tokens, f"{side}_positions_BxT": positions,
                      f"{side}_segment_ids_BxT": seg, f"{side}_loss_mask_BxT": mask})
    return batch


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_loss_vs_hand_computation(smoothing):
    rng = np.random.default_rng(5)
    V, beta = 5, 0.3
    batch = _dpo_batch(rng, V=V)
    policy = rng.normal(size=(V, V)).astype(np.float32)
    ref = rng.normal(size=(V, V)).astype(np.float32)
    B = batch["chosen_tokens_BxT"].shape[0]
    seq = {(name, side): np.array([_np_seq_logp(t, batch[f"{side}_tokens_BxT"][b],
                                                batch[f"{side}_loss_mask_BxT"][b])
                                   for b in range(B)])
           for name, t in (("pi", policy), ("ref", ref)) for side in ("chosen", "rejected")}
    batch["ref_chosen_logp_B"] = seq["ref", "chosen"].astype(np.float32)
    batch["ref_rejected_logp_B"] = seq["ref", "rejected"].astype(np.float32)
    # The helper that precomputes reference log-probs agrees with the loop.
    ref_c, ref_r = jax.jit(losses.dpo_sequence_logps, static_argnames="apply")(
        ref, batch, None, apply=bigram_apply)
    np.testing.assert_allclose(ref_c, seq["ref", "chosen"], rtol=1e-5)
    np.testing.assert_allclose(ref_r, seq["ref", "rejected"], rtol=1e-5)

    cfg = losses.DPOLossConfig(beta=beta, label_smoothing=smoothing)
    apply = CountingApply(bigram_apply)
    loss_sum, metrics = jax.jit(
        lambda p, bt: losses.dpo_loss(p, bt, None, apply=apply, cfg=cfg))(policy, batch)
    assert apply.shapes == [(2 * B, 6)]  # chosen and rejected in one forward pass
    want = 0.0
    h = ((seq["pi", "chosen"] - seq["ref", "chosen"])
         - (seq["pi", "rejected"] - seq["ref", "rejected"]))
    for hb in h:
        want += -(1 - smoothing) * log_sigmoid(beta * hb) - smoothing * log_sigmoid(-beta * hb)
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)
    assert float(metrics["loss"][1]) == B
    assert float(metrics["accuracy"][0]) == np.sum(h > 0)
    assert float(metrics["reward_margin"][0]) == pytest.approx(beta * h.sum(), rel=1e-4, abs=1e-5)


def test_dpo_at_reference_is_log2():
    rng = np.random.default_rng(6)
    batch = _dpo_batch(rng)
    table = rng.normal(size=(5, 5)).astype(np.float32)
    ref_c, ref_r = jax.jit(losses.dpo_sequence_logps, static_argnames="apply")(
        table, batch, None, apply=bigram_apply)
    batch.update(ref_chosen_logp_B=ref_c, ref_rejected_logp_B=ref_r)
    loss_sum, _ = jit(losses.dpo_loss)(table, batch, None, apply=bigram_apply,
                                       cfg=losses.DPOLossConfig())
    assert float(loss_sum) == pytest.approx(3 * math.log(2.0), rel=1e-6)


# --------------------------------------------------------------------------- PPO

PV_APPLY = rl_losses.PolicyValueApply(policy=bigram_apply, value=value_apply)


def _one_token_case(*, ratio=1.0, adv=0.0, value=0.0, old_value=0.0, ret=0.0):
    """tokens [0, 1]: the prompt token 0 then ONE response token 1 whose log-prob under the
    all-zero bigram table is log 0.5; column 0 holds garbage that the mask must hide."""
    params = {"policy": np.zeros((2, 2), np.float32),
              "value": np.array([value, 999.0], np.float32)}  # V(prompt) read at position 0
    batch = {"tokens_BxT": np.array([[0, 1]], np.int32),
             "positions_BxT": np.array([[0, 1]], np.int32),
             "segment_ids_BxT": np.ones((1, 2), np.int32),
             "response_mask_BxT": np.array([[0.0, 1.0]], np.float32),
             "old_logprobs_BxT": np.array([[-1e4, math.log(0.5 / ratio)]], np.float32),
             "old_values_BxT": np.array([[123.0, old_value]], np.float32),
             "advantages_BxT": np.array([[77.0, adv]], np.float32),
             "returns_BxT": np.array([[-55.0, ret]], np.float32)}
    return params, batch


@pytest.mark.parametrize("ratio,adv,want,clipped", [
    (1.5, 1.0, -1.2, True),    # A > 0, ratio above 1 + eps: the clip caps the gain
    (1.5, -1.0, 1.5, False),   # A < 0, ratio above 1 + eps: the unclipped (worse) term wins
    (0.5, 1.0, -0.5, False),   # A > 0, ratio below 1 - eps: unclipped
    (0.5, -1.0, 0.8, True),    # A < 0, ratio below 1 - eps: clipped
    (1.1, 2.0, -2.2, False),   # inside the trust region
    (0.9, -2.0, 1.8, False),
])
def test_ppo_policy_loss_hand_computed(ratio, adv, want, clipped):
    params, batch = _one_token_case(ratio=ratio, adv=adv)
    cfg = rl_losses.PPOLossConfig(clip_eps=0.2, vf_coef=0.0)
    loss_sum, m = jit(rl_losses.ppo_loss)(params, batch, None, apply=PV_APPLY, cfg=cfg)
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)
    assert float(m["loss"][1]) == 1.0
    assert float(m["policy_loss"][0]) == pytest.approx(want, rel=1e-5)
    assert float(m["clipfrac"][0]) == float(clipped)
    assert float(m["ratio"][0]) == pytest.approx(ratio, rel=1e-5)
    r = math.log(ratio)  # approx KL(old || new) = ratio - 1 - log ratio
    assert float(m["approx_kl"][0]) == pytest.approx(ratio - 1 - r, rel=1e-4)
    assert float(m["entropy"][0]) == pytest.approx(math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("value,old_value,ret,want,clipped", [
    (0.1, 0.0, 1.0, 0.5 * 0.81, False),   # change inside the clip: plain squared error
    (0.5, 0.0, 1.0, 0.5 * 0.64, True),    # clipped to 0.2 is farther from R: max picks it
    (1.5, 0.0, 1.0, 0.5 * 0.64, True),
    (-0.5, 0.0, -1.0, 0.5 * 0.64, True),
    (0.5, 0.0, 0.3, 0.5 * 0.04, False),   # clipped value (0.2) is closer: unclipped term wins
])
def test_ppo_value_loss_hand_computed(value, old_value, ret, want, clipped):
    params, batch = _one_token_case(value=value, old_value=old_value, ret=ret)
    cfg = rl_losses.PPOLossConfig(value_clip=0.2, vf_coef=1.0)
    loss_sum, m = jit(rl_losses.ppo_loss)(params, batch, None, apply=PV_APPLY, cfg=cfg)
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)
    assert float(m["value_loss"][0]) == pytest.approx(want, rel=1e-5)
    assert float(m["value_clipfrac"][0]) == float(clipped)
    assert float(m["value_error"][0]) == pytest.approx((value - ret) ** 2, rel=1e-5)
    unclipped, _ = jit(rl_losses.ppo_loss)(params, batch, None, apply=PV_APPLY,
                                   cfg=rl_losses.PPOLossConfig(value_clip=None, vf_coef=1.0))
    assert float(unclipped) == pytest.approx(0.5 * (value - ret) ** 2, rel=1e-5)


def _ppo_batch(rng, B=3, P=3, N=4, V=6):
    """Left-padded prompts of width P then responses of up to N tokens, right-padded."""
    T = P + N
    tokens = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    resp = np.zeros((B, T), np.float32)
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        p_len, r_len = rng.integers(1, P + 1), rng.integers(1, N + 1)
        tokens[b, P - p_len:P + r_len] = rng.integers(1, V, size=p_len + r_len)
        seg[b, P - p_len:P + r_len] = 1
        positions[b, P - p_len:P + r_len] = np.arange(p_len + r_len)
        resp[b, P:P + r_len] = 1.0
    garbage = lambda: np.where(resp > 0, rng.normal(size=(B, T)), 1e4).astype(np.float32)
    return {"tokens_BxT": tokens, "positions_BxT": positions, "segment_ids_BxT": seg,
            "response_mask_BxT": resp,
            "old_logprobs_BxT": np.where(resp > 0, rng.normal(-1.8, 0.3, (B, T)),
                                         -1e4).astype(np.float32),
            "old_values_BxT": garbage(), "advantages_BxT": garbage(), "returns_BxT": garbage()}


def _token_surrogate(params, batch, b, t, cfg):
    """(log pi(tokens[b, t]), the clipped surrogate pg_t) computed by hand for one token."""
    tok = batch["tokens_BxT"]
    logp = np_log_softmax(params["policy"][tok[b, t - 1]] / cfg.temperature)[tok[b, t]]
    ratio = math.exp(logp - batch["old_logprobs_BxT"][b, t])
    a = batch["advantages_BxT"][b, t]
    return logp, max(-a * ratio, -a * min(max(ratio, 1 - cfg.clip_eps), 1 + cfg.clip_eps))


def _ppo_reference(params, batch, cfg):
    """Token-by-token loop: the value for token t is read at position t-1."""
    vtable, tok = params["value"], batch["tokens_BxT"]
    total, n = 0.0, 0
    B, T = tok.shape
    for b, t in itertools.product(range(B), range(1, T)):
        if not batch["response_mask_BxT"][b, t]:
            continue
        _, pg = _token_surrogate(params, batch, b, t, cfg)
        v = vtable[tok[b, t - 1]]
        old_v, R = batch["old_values_BxT"][b, t], batch["returns_BxT"][b, t]
        v_clip = old_v + min(max(v - old_v, -cfg.value_clip), cfg.value_clip)
        vf = 0.5 * max((v - R) ** 2, (v_clip - R) ** 2)
        total += pg + cfg.vf_coef * vf
        n += 1
    return total, n


def _pv_params(rng, V=6):
    return {"policy": rng.normal(size=(V, V)).astype(np.float32),
            "value": rng.normal(size=V).astype(np.float32)}


def test_ppo_loss_vs_token_loop_with_temperature():
    rng = np.random.default_rng(7)
    batch, params = _ppo_batch(rng), _pv_params(rng)
    cfg = rl_losses.PPOLossConfig(clip_eps=0.2, value_clip=0.2, vf_coef=0.5, temperature=0.7)
    loss_sum, m = jax.jit(lambda p, bt: rl_losses.ppo_loss(p, bt, None, apply=PV_APPLY, cfg=cfg))(
        params, batch)
    want, n = _ppo_reference(params, batch, cfg)
    assert np.isfinite(float(loss_sum))
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)
    assert float(m["loss"][1]) == n


# --------------------------------------------------------------------------- GRPO

def _grpo_reference(params, batch, cfg):
    """Token-by-token loop, per row, then aggregated as cfg.aggregate says."""
    tok = batch["tokens_BxT"]
    rows = []
    for b in range(tok.shape[0]):
        terms = []
        for t in range(1, tok.shape[1]):
            if not batch["response_mask_BxT"][b, t]:
                continue
            logp, pg = _token_surrogate(params, batch, b, t, cfg)
            d = batch["ref_logprobs_BxT"][b, t] - logp
            terms.append(pg + cfg.kl_coef * (math.exp(d) - d - 1))
        rows.append(terms)
    if cfg.aggregate == "token":
        return sum(sum(r) for r in rows), sum(len(r) for r in rows)
    return sum(sum(r) / len(r) for r in rows if r), sum(1 for r in rows if r)


@pytest.mark.parametrize("aggregate", ["token", "sequence"])
def test_grpo_loss_vs_token_loop(aggregate):
    rng = np.random.default_rng(11)
    batch, params = _ppo_batch(rng, B=4), {"policy": _pv_params(rng)["policy"]}
    resp = batch["response_mask_BxT"] > 0
    batch["ref_logprobs_BxT"] = np.where(resp, rng.normal(-1.8, 0.3, resp.shape),
                                         3e4).astype(np.float32)  # garbage off the response
    # GRPO's advantages are one number per response, on each of its tokens.
    batch["advantages_BxT"] = np.where(resp, rng.normal(size=(4, 1)), 1e4).astype(np.float32)
    cfg = rl_losses.GRPOLossConfig(clip_eps=0.2, kl_coef=0.1, aggregate=aggregate,
                                   temperature=0.8)
    apply = rl_losses.PolicyValueApply(policy=bigram_apply, value=None)
    loss_sum, m = jax.jit(lambda p, bt: rl_losses.grpo_loss(p, bt, None, apply=apply, cfg=cfg))(
        params, batch)
    want, n = _grpo_reference(params, batch, cfg)
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)
    assert float(m["loss"][1]) == n
    assert float(m["kl_ref"][0]) > 0


def test_grpo_at_the_reference_with_zero_advantage_has_zero_loss_and_kl():
    rng = np.random.default_rng(12)
    batch, params = _ppo_batch(rng), {"policy": _pv_params(rng)["policy"]}
    logp = jax.jit(lambda p: rl_ops.response_logprobs(bigram_apply(p, batch["tokens_BxT"], None,
                                                                   None, None),
                                                      batch["tokens_BxT"]))(params["policy"])
    batch.update(old_logprobs_BxT=np.asarray(logp), ref_logprobs_BxT=np.asarray(logp),
                 advantages_BxT=np.zeros_like(batch["advantages_BxT"]))
    apply = rl_losses.PolicyValueApply(policy=bigram_apply, value=None)
    loss_sum, m = rl_losses.grpo_loss(params, batch, None, apply=apply,
                                      cfg=rl_losses.GRPOLossConfig())
    assert abs(float(loss_sum)) < 1e-6 and abs(float(m["kl_ref"][0])) < 1e-6
    assert float(m["ratio"][0]) == pytest.approx(float(m["loss"][1]), rel=1e-6)


# --------------------------------------------------------------------------- PPO-ptx

def _lm_batch(rng, B=4, T=5, V=6):
    tokens = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[0, 0] = 1.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": mask}


def test_ppo_ptx_composition_gradients_and_train_step():
    rng = np.random.default_rng(8)
    params = jax.tree.map(jnp.asarray, _pv_params(rng))
    batch = {"rollout": _ppo_batch(rng), "ptx": _lm_batch(rng)}
    gamma = 2.5
    cfg = rl_losses.PPOPtxLossConfig(ppo=rl_losses.PPOLossConfig(vf_coef=0.3), gamma_ptx=gamma)

    def ppo_only(p):
        return rl_losses.ppo_loss(p, batch["rollout"], None, apply=PV_APPLY, cfg=cfg.ppo)

    def ptx_only(policy):
        return losses.lm_loss(policy, batch["ptx"], None, apply=bigram_apply, cfg=cfg.lm)

    def combined(p, bt):
        return rl_losses.ppo_ptx_loss(p, bt, None, apply=PV_APPLY, cfg=cfg)

    @jax.jit
    def everything(p, bt):
        return (jax.value_and_grad(ppo_only, has_aux=True)(p),
                jax.value_and_grad(ptx_only, has_aux=True)(p["policy"]),
                jax.value_and_grad(combined, has_aux=True)(p, bt))

    ((ppo_sum, ppo_m), g_ppo), ((ptx_sum, ptx_m), g_ptx), ((total, m), g_total) = everything(
        params, batch)
    n_ppo, n_ptx = float(ppo_m["loss"][1]), float(ptx_m["loss"][1])
    assert n_ppo != n_ptx  # the rescaling matters

    assert float(m["loss"][1]) == n_ppo
    assert float(total) / n_ppo == pytest.approx(
        float(ppo_sum) / n_ppo + gamma * float(ptx_sum) / n_ptx, rel=1e-5)
    assert float(m["ptx_loss"][0]) / float(m["ptx_loss"][1]) == pytest.approx(
        float(ptx_sum) / n_ptx, rel=1e-6)
    assert float(m["ppo_loss"][0]) == pytest.approx(float(ppo_sum), rel=1e-6)
    # Gradient of the step's mean: policy = PPO + gamma * ptx mean gradient; value = PPO only.
    np.testing.assert_allclose(g_total["policy"] / n_ppo,
                               g_ppo["policy"] / n_ppo + gamma * g_ptx / n_ptx,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_total["value"], g_ppo["value"], rtol=1e-6)
    assert np.abs(g_ptx).sum() > 0

    # The same objective through the unchanged train step: params = {'policy', 'value'},
    # apply = PolicyValueApply, a nested {'rollout', 'ptx'} batch.
    mesh = _single_device_mesh()
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    tx = state_lib.make_optimizer(optim, 3)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params))
    step = step_lib.make_train_step(
        losses.Objective(rl_losses.ppo_ptx_loss, cfg), apply=PV_APPLY, tx=tx,
        schedule=state_lib.make_schedule(optim, 3), mesh=mesh,
        state_shardings=jax.tree.map(lambda _: parallel.replicated(mesh), state))
    before = jax.device_get(params)
    state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)),
                          jax.random.key(2))
    metrics = jax.device_get(metrics)
    assert float(metrics["loss"][0]) == pytest.approx(float(total), rel=1e-6)
    assert all(np.isfinite(v) for v in losses.reduce_metrics(metrics).values()), metrics
    after = jax.device_get(state.params)
    for part in ("policy", "value"):
        assert np.abs(after[part] - before[part]).max() > 0, part


def test_ppo_ptx_under_gradient_accumulation_is_the_documented_weighting():
    rng = np.random.default_rng(9)
    params = _pv_params(rng)
    batch = {"rollout": _ppo_batch(rng, B=4), "ptx": _lm_batch(rng, B=4)}
    gamma = 1.5
    cfg = rl_losses.PPOPtxLossConfig(gamma_ptx=gamma)
    objective = losses.Objective(rl_losses.ppo_ptx_loss, cfg)
    rows = [np.arange(i, 4, 2) for i in range(2)]  # the step's i::num micro-batch split

    @jax.jit
    def run(p, bt):
        _, metrics = step_lib.accumulate_gradients(objective, PV_APPLY, p, bt, jax.random.key(0), 2)
        parts = []
        for r in rows:
            sub = jax.tree.map(lambda x: x[r], bt)
            ppo_sum, pm = rl_losses.ppo_loss(p, sub["rollout"], None, apply=PV_APPLY, cfg=cfg.ppo)
            ptx_sum, lm_m = losses.lm_loss(p["policy"], sub["ptx"], None, apply=bigram_apply,
                                           cfg=cfg.lm)
            parts.append((ppo_sum, pm["loss"][1], ptx_sum, lm_m["loss"][1]))
        return metrics, parts

    metrics, parts = run(params, batch)
    total = float(metrics["loss"][0]) / float(metrics["loss"][1])
    pieces = [tuple(float(x) for x in part) for part in parts]
    N = sum(p[1] for p in pieces)
    want = sum(p[0] for p in pieces) / N + gamma * sum(p[1] / N * p[2] / p[3] for p in pieces)
    assert total == pytest.approx(want, rel=1e-5)
    # The reported ptx loss is the exact pooled mean.
    assert float(metrics["ptx_loss"][0]) / float(metrics["ptx_loss"][1]) == pytest.approx(
        sum(p[2] for p in pieces) / sum(p[3] for p in pieces), rel=1e-5)


def test_configs_validate_and_are_registered():
    for name, fn_cfg in [*((n, losses.LOSSES[n]) for n in ("reward_ranking", "dpo")),
                         *rl_losses.RL_LOSSES.items()]:
        fn, cfg_type = fn_cfg
        cfg_type()  # defaults are valid
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg_type(), "x", 1)
    with pytest.raises(ValueError):
        rl_losses.PPOLossConfig(clip_eps=0.0)
    with pytest.raises(ValueError):
        losses.DPOLossConfig(beta=-1.0)
    with pytest.raises(ValueError):
        rl_losses.PPOPtxLossConfig(gamma_ptx=-1.0)


# --------------------------------------------------------------------------- real tiny models

def _single_device_mesh():
    return parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])


def test_reward_model_trains_through_make_train_step():
    rng = np.random.default_rng(10)
    T, K, steps = 12, 4, 6
    batch, _ = _ranking_batch(rng, [4, 3], K, T=T, V=64)
    mesh = _single_device_mesh()
    model = Transformer(preset("tiny", vocab_size=64, max_len=T), head="scalar")
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant", eps=1e-5)
    tx = state_lib.make_optimizer(optim, steps)
    state, shardings = state_lib.init_state(model, tx, mesh, T, jax.random.key(0))
    step = step_lib.make_train_step(
        losses.Objective(losses.reward_ranking_loss, losses.RankingLossConfig()),
        apply=losses.make_apply(model), tx=tx, schedule=state_lib.make_schedule(optim, steps),
        mesh=mesh, state_shardings=shardings)
    gbatch = parallel.global_batch(batch, mesh)
    history = []
    for _ in range(steps):
        state, metrics = step(state, gbatch, jax.random.key(1))
        metrics = jax.device_get(metrics)
        history.append(float(metrics["loss"][0]) / float(metrics["loss"][1]))
        assert float(metrics["loss"][1]) == 2.0
    assert all(np.isfinite(history))
    assert history[-1] < history[0] - 0.05, history


def test_grpo_composes_with_the_pretraining_mix():
    rng = np.random.default_rng(13)
    batch, params = _ppo_batch(rng), {"policy": _pv_params(rng)["policy"]}
    batch["ref_logprobs_BxT"] = batch["old_logprobs_BxT"]
    ptx = _lm_batch(rng)
    apply = rl_losses.PolicyValueApply(policy=bigram_apply, value=None)
    grpo = rl_losses.GRPOLossConfig(kl_coef=0.05)
    total, m = rl_losses.ppo_ptx_loss(params, {"rollout": batch, "ptx": ptx}, None, apply=apply,
                                      cfg=rl_losses.PPOPtxLossConfig(ppo=grpo, gamma_ptx=0.5))
    rl_sum, rm = rl_losses.grpo_loss(params, batch, None, apply=apply, cfg=grpo)
    ptx_sum, pm = losses.lm_loss(params["policy"], ptx, None, apply=bigram_apply,
                                 cfg=losses.LMLossConfig())
    want = float(rl_sum) + 0.5 * float(rm["loss"][1]) / float(pm["loss"][1]) * float(ptx_sum)
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert "kl_ref" in m and "ptx_loss" in m


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_lm_head_on_the_response_window_only_changes_nothing(algorithm):
    """response_len = N runs the policy's LM head only at the N positions that predict the
    response (rl_ops.response_logits): the same loss, metrics and gradients as the head at
    every position, on a real tiny model (entropy bonus on, so its gradient is compared too)."""
    rng = np.random.default_rng(14)
    P, N, V = 5, 4, 64
    batch = _ppo_batch(rng, B=3, P=P, N=N, V=V)
    batch["ref_logprobs_BxT"] = np.where(batch["response_mask_BxT"] > 0,
                                         batch["old_logprobs_BxT"], 0.0).astype(np.float32)
    inputs = [jnp.asarray(batch[k]) for k in ("tokens_BxT", "positions_BxT", "segment_ids_BxT")]
    policy = Transformer(preset("tiny", vocab_size=V, max_len=P + N))
    params = {"policy": policy.init(jax.random.key(0), *inputs)["params"]}
    if algorithm == "ppo":
        value = Transformer(preset("tiny", vocab_size=V, max_len=P + N), head="scalar")
        params["value"] = value.init(jax.random.key(1), *inputs)["params"]
        apply = rl_losses.PolicyValueApply.from_models(policy, value)
        loss_fn = rl_losses.ppo_loss

        def config(n):
            return rl_losses.PPOLossConfig(vf_coef=0.5, temperature=0.8, entropy_coef=0.01,
                                           response_len=n)
    else:
        apply = rl_losses.PolicyValueApply(policy=losses.make_apply(policy), value=None)
        loss_fn = rl_losses.grpo_loss

        def config(n):
            return rl_losses.GRPOLossConfig(kl_coef=0.1, temperature=0.8, response_len=n)

    def run(n):
        return jax.jit(jax.value_and_grad(
            lambda p: loss_fn(p, batch, None, apply=apply, cfg=config(n)), has_aux=True))(params)

    (whole, whole_metrics), whole_grads = run(0)
    (window, window_metrics), window_grads = run(N)
    assert float(window) == pytest.approx(float(whole), rel=1e-5)
    for name, (total, weight) in whole_metrics.items():
        assert float(window_metrics[name][0]) == pytest.approx(float(total), rel=1e-4,
                                                               abs=1e-6), name
        assert float(window_metrics[name][1]) == float(weight), name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 window_grads, whole_grads)
