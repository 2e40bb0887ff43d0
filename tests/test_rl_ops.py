"""RL math against slow, obviously-correct Python references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax import rl_ops


def _run_mask(rng, B, N, lengths=None, offsets=None):
    lengths = rng.integers(0, N + 1, size=B) if lengths is None else np.asarray(lengths)
    offsets = np.zeros(B, int) if offsets is None else np.asarray(offsets)
    mask = np.zeros((B, N), np.float32)
    for b in range(B):
        mask[b, offsets[b]:offsets[b] + lengths[b]] = 1.0
    return mask, lengths, offsets


def _gae_reference(rewards, values, lengths, offsets, gamma, lam):
    B, N = rewards.shape
    adv, ret = np.zeros((B, N)), np.zeros((B, N))
    for b in range(B):
        start, L = offsets[b], lengths[b]
        last = 0.0
        for i in reversed(range(L)):
            t = start + i
            next_value = values[b, t + 1] if i + 1 < L else 0.0  # episode ends after the run
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_reverse_loop(gamma, lam):
    rng = np.random.default_rng(int(gamma * 100 + lam * 10))
    B, N = 6, 9
    mask, lengths, offsets = _run_mask(rng, B, N, lengths=[0, 1, 4, 9, 7, 2])
    rewards = rng.normal(size=(B, N)).astype(np.float32)
    values = rng.normal(size=(B, N)).astype(np.float32)
    adv, ret = jax.jit(rl_ops.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, lengths, offsets, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)
    np.testing.assert_allclose(ret, (ref_adv + values) * mask, atol=1e-5)


def test_gae_after_left_padded_prompt():
    # The response run may start after prompt columns ([B, T] layout); values/rewards outside
    # the run (garbage here) must not leak in.
    rng = np.random.default_rng(1)
    B, T = 4, 10
    mask, lengths, offsets = _run_mask(rng, B, T, lengths=[3, 5, 1, 0], offsets=[4, 4, 9, 4])
    rewards = np.where(mask > 0, rng.normal(size=(B, T)), 1e3).astype(np.float32)
    values = np.where(mask > 0, rng.normal(size=(B, T)), -1e3).astype(np.float32)
    adv, ret = rl_ops.gae(rewards, values, mask, 1.0, 0.95)
    ref_adv, ref_ret = _gae_reference(rewards, values, lengths, offsets, 1.0, 0.95)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-4)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-4)


def test_masked_mean_and_whiten():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 5.0, size=(4, 7)).astype(np.float32)
    mask, _, _ = _run_mask(rng, 4, 7, lengths=[7, 3, 0, 5])
    sel = x[mask > 0]
    assert float(rl_ops.masked_mean(x, mask)) == pytest.approx(sel.mean(), rel=1e-5)
    assert float(rl_ops.masked_var(x, mask)) == pytest.approx(sel.var(), rel=1e-5)
    np.testing.assert_allclose(rl_ops.masked_mean(x, mask, axis=-1)[2], 0.0)  # empty row, no NaN
    w = np.asarray(jax.jit(rl_ops.masked_whiten)(x, mask))
    assert w[mask > 0].mean() == pytest.approx(0.0, abs=1e-5)
    assert w[mask > 0].var() == pytest.approx(1.0, rel=1e-4)
    assert np.all(w[mask == 0] == 0.0)
    np.testing.assert_allclose(w[mask > 0], (sel - sel.mean()) / math.sqrt(sel.var() + 1e-8),
                               rtol=1e-4, atol=1e-5)
    # Masked entries are ignored: changing them changes nothing.
    x2 = np.where(mask > 0, x, 1e6).astype(np.float32)
    np.testing.assert_allclose(rl_ops.masked_whiten(x2, mask), w, rtol=1e-5, atol=1e-6)
    # shift_mean=False rescales but keeps the mean.
    w_keep = np.asarray(rl_ops.masked_whiten(x, mask, shift_mean=False))
    assert w_keep[mask > 0].mean() == pytest.approx(sel.mean(), rel=1e-4)
    assert w_keep[mask > 0].var() == pytest.approx(1.0, rel=1e-4)


def test_kl_controller_hand_computed():
    state = rl_ops.kl_controller_init(0.1)
    update = jax.jit(rl_ops.kl_controller_update, static_argnames=("target", "horizon"))
    kw = dict(target=6.0, horizon=10000.0)
    # error = 7/6 - 1 = 1/6 (inside the clip): beta = 0.1 * (1 + (1/6) * 512 / 10000)
    assert float(update(state, 7.0, 512, **kw)["beta"]) == pytest.approx(
        0.1 * (1 + 512 / 60000), rel=1e-6)
    # error = 12/6 - 1 = 1 -> clipped to 0.2: 0.1 * 1.01024
    assert float(update(state, 12.0, 512, **kw)["beta"]) == pytest.approx(0.101024, rel=1e-6)
    # error = 0/6 - 1 = -1 -> clipped to -0.2: 0.1 * 0.98976
    assert float(update(state, 0.0, 512, **kw)["beta"]) == pytest.approx(0.098976, rel=1e-6)
    # Exactly on target: unchanged.
    assert float(update(state, 6.0, 512, **kw)["beta"]) == pytest.approx(0.1, rel=1e-6)
    # Fixed controller.
    fixed = rl_ops.kl_controller_update(state, 100.0, 512, target=None)
    assert float(fixed["beta"]) == pytest.approx(0.1)
    # Repeated updates compose (a pure function of the state pytree).
    s = state
    for _ in range(3):
        s = update(s, 12.0, 512, **kw)
    assert float(s["beta"]) == pytest.approx(0.1 * 1.01024 ** 3, rel=1e-5)
    assert jax.tree.structure(s) == jax.tree.structure(state) and s["beta"].dtype == jnp.float32
    with pytest.raises(ValueError):
        rl_ops.kl_controller_update(state, 1.0, 1, target=6.0, horizon=None)


@pytest.mark.parametrize("penalty", [-1.0, None])
def test_per_token_rewards_match_loop(penalty):
    rng = np.random.default_rng(3)
    B, N, beta = 5, 6, 0.05
    mask, lengths, _ = _run_mask(rng, B, N, lengths=[6, 2, 0, 4, 1])
    logp = rng.normal(-2, 1, size=(B, N)).astype(np.float32)
    ref = rng.normal(-2, 1, size=(B, N)).astype(np.float32)
    score = rng.normal(size=B).astype(np.float32)
    ended = np.array([False, True, False, True, True])
    rewards, kl = jax.jit(rl_ops.per_token_rewards, static_argnums=(6,))(
        score, logp, ref, mask, beta, ended, penalty)
    want_r, want_kl = np.zeros((B, N)), np.zeros(B)
    for b in range(B):
        s = score[b] if (ended[b] or penalty is None) else penalty
        for t in range(lengths[b]):
            want_r[b, t] = -beta * (logp[b, t] - ref[b, t])
            want_kl[b] += logp[b, t] - ref[b, t]
        if lengths[b] > 0:
            want_r[b, lengths[b] - 1] += s
    np.testing.assert_allclose(rewards, want_r, atol=1e-6)
    np.testing.assert_allclose(kl, want_kl, atol=1e-5)


def test_last_token_values_left_and_right_padding():
    values = np.arange(12, dtype=np.float32).reshape(2, 6) * 10
    right = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = np.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    both = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])  # second row: nothing real
    f = jax.jit(rl_ops.last_token_values)
    np.testing.assert_allclose(f(values, right), [20, 110])
    np.testing.assert_allclose(f(values, left), [50, 110])
    np.testing.assert_allclose(f(values, both), [20, 0])
    np.testing.assert_array_equal(rl_ops.last_index(right), [2, 5])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0, 0.0])
def test_response_logprobs_and_entropy_vs_explicit_softmax(temperature):
    rng = np.random.default_rng(4)
    B, T, V = 2, 5, 7
    logits = rng.normal(0, 3, size=(B, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    out = np.asarray(rl_ops.response_logprobs(jnp.asarray(logits), tokens, temperature))
    ent = np.asarray(rl_ops.entropy_from_logits(jnp.asarray(logits), temperature))
    t_eff = temperature or 1.0  # greedy sampling scores at temperature 1
    assert out.dtype == np.float32 and out.shape == (B, T)
    for b in range(B):
        assert out[b, 0] == 0.0 and ent[b, 0] == 0.0
        for t in range(1, T):
            z = logits[b, t - 1].astype(np.float64) / t_eff
            p = np.exp(z) / np.exp(z).sum()
            assert out[b, t] == pytest.approx(math.log(p[tokens[b, t]]), abs=1e-5)
            assert ent[b, t] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)


@pytest.mark.parametrize("first_target", [1, 2, 4])
def test_logprobs_and_entropy_of_a_logit_window(first_target):
    """Logits of positions first_target - 1 .. T - 2 only (the head run on the response's
    window) give the whole sequence's values from first_target on and zeros before."""
    rng = np.random.default_rng(5)
    B, T, V = 2, 6, 7
    logits = jnp.asarray(rng.normal(0, 3, size=(B, T, V)).astype(np.float32))
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    window = logits[:, first_target - 1:T - 1]
    for fn, kw in ((rl_ops.response_logprobs, {}), (rl_ops.entropy_from_logits, {"seq_len": T})):
        args = (tokens,) if fn is rl_ops.response_logprobs else ()
        whole = np.asarray(fn(logits, *args, 0.7))
        part = np.asarray(fn(window, *args, 0.7, first_target=first_target, **kw))
        assert part.shape == (B, T)
        np.testing.assert_array_equal(part[:, :first_target], 0.0)
        np.testing.assert_allclose(part[:, first_target:], whole[:, first_target:], rtol=1e-6)


def test_response_logprobs_bfloat16_logits_are_float32():
    logits = jax.ShapeDtypeStruct((1, 3, 4), jnp.bfloat16)
    out = jax.eval_shape(rl_ops.response_logprobs, logits, jnp.zeros((1, 3), jnp.int32), 0.7)
    assert out.dtype == jnp.float32


def test_align_to_targets():
    x = jnp.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(rl_ops.align_to_targets(x), [[0.0, 1.0, 2.0]])


def test_kl_estimators_exact_expectations():
    # Enumerate a categorical: E_{x~p}[k1] = E_{x~p}[k3] = KL(p || q) exactly; k3 >= 0 pointwise.
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    kl = float(np.sum(p * np.log(p / q)))
    logp, logq = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    k1 = np.asarray(rl_ops.kl_k1(logp, logq))
    k3 = np.asarray(rl_ops.kl_k3(logp, logq))
    assert float(np.sum(p * k1)) == pytest.approx(kl, rel=1e-5)
    assert float(np.sum(p * k3)) == pytest.approx(kl, rel=1e-5)
    assert np.all(k3 >= 0)
    r = logq - logp
    np.testing.assert_allclose(k3, np.exp(r) - 1 - r, rtol=1e-5)
    np.testing.assert_allclose(rl_ops.kl_k2(logp, logq), 0.5 * (logp - logq) ** 2, rtol=1e-6)
    # Sequence sums over masked tokens.
    mask = np.array([[1, 1, 0, 0]], np.float32)
    np.testing.assert_allclose(rl_ops.sequence_kl(logp[None], logq[None], mask, "k3"),
                               [k3[0] + k3[1]], rtol=1e-6)
    np.testing.assert_allclose(rl_ops.sequence_kl(logp[None], logq[None], mask),
                               [k1[0] + k1[1]], rtol=1e-6)


# --------------------------------------------------------------------------- reward reads

def _pooled_reference(values, response_mask):
    """0.5 * value at the last response token + 0.5 * mean value over the response."""
    out = []
    for v, m in zip(values.tolist(), response_mask.tolist()):
        picked = [x for x, on in zip(v, m) if on]
        out.append(0.5 * picked[-1] + 0.5 * sum(picked) / len(picked) if picked else 0.0)
    return out


# Columns 0..6; P = prompt token, R = response token (EOS last), . = padding.
READ_VALUES = np.array([[1, 2, 3, 4, 5, 6, 7],
                        [10, 20, 30, 40, 50, 60, 70],
                        [-1, -2, -4, -8, -16, -32, -64],
                        [3, 1, 4, 1, 5, 9, 2],
                        [5, 5, 5, 5, 5, 5, 5]], np.float32)
READ_REAL = np.array([[1, 1, 1, 1, 1, 0, 0],    # right-padded: P P R R R . .
                      [0, 0, 1, 1, 1, 1, 1],    # left-padded:  . . P P R R R
                      [1, 1, 1, 0, 0, 0, 0],    # a one-token response: P P R . . . .
                      [0, 1, 1, 1, 1, 0, 0],    # both:         . P R R R . .
                      [0, 0, 0, 0, 0, 0, 0]])   # no tokens at all
READ_START = np.array([2, 4, 2, 2, 0])            # column of each row's first response token
READ_RESPONSE = np.array([[0, 0, 1, 1, 1, 0, 0],
                          [0, 0, 0, 0, 1, 1, 1],
                          [0, 0, 1, 0, 0, 0, 0],
                          [0, 0, 1, 1, 1, 0, 0],
                          [0, 0, 0, 0, 0, 0, 0]])


def test_pooled_response_values_vs_loop_and_by_hand():
    got = jax.jit(rl_ops.pooled_response_values)(READ_VALUES, READ_RESPONSE)
    np.testing.assert_allclose(got, _pooled_reference(READ_VALUES, READ_RESPONSE), rtol=1e-6)
    # by hand: row 0 = 0.5 * 5 + 0.5 * (3 + 4 + 5) / 3; the one-token row is its value
    np.testing.assert_allclose(got, [4.5, 65.0, -4.0, 2.5 + 10 / 6, 0.0], rtol=1e-6)
    # A mean off by one token (the last prompt token in, or the EOS out) shows.
    shifted = np.roll(READ_RESPONSE, -1, axis=1)
    assert not np.allclose(_pooled_reference(READ_VALUES, shifted), got)
    # Adding c to every value (the RM's bias) adds c to the read.
    np.testing.assert_allclose(rl_ops.pooled_response_values(READ_VALUES + 2.5, READ_RESPONSE)
                               - got, [2.5, 2.5, 2.5, 2.5, 0.0], rtol=1e-6)


def test_read_reward_and_response_mask_from_start():
    mask = rl_ops.response_mask_from_start(READ_START, READ_REAL)
    np.testing.assert_array_equal(mask, READ_RESPONSE)
    eos = rl_ops.read_reward(READ_VALUES, READ_REAL, None, "eos")
    np.testing.assert_allclose(eos, [5, 70, -4, 5, 0])
    np.testing.assert_allclose(rl_ops.read_reward(READ_VALUES, READ_REAL, mask, "pooled"),
                               _pooled_reference(READ_VALUES, READ_RESPONSE), rtol=1e-6)
    with pytest.raises(ValueError, match="'eos' or 'pooled'"):
        rl_ops.read_reward(READ_VALUES, READ_REAL, mask, "mean")


def test_packed_read_reward_vs_loop():
    rng = np.random.default_rng(5)
    R, T = 3, 8
    values = rng.normal(size=(R, T)).astype(np.float32) * 10 + 50  # large prefix sums
    flat = values.reshape(-1)
    # (first response token, last token) per response, flat; spans stay in their row, one
    # response starts at column 0 of a row (an empty prompt), one is a single token.
    start = np.array([[1, 5, 8], [11, 16, 23]], np.int32)
    end = np.array([[3, 7, 10], [14, 21, 23]], np.int32)
    got = jax.jit(rl_ops.packed_read_reward, static_argnums=(3,))(values, end, start, "pooled")
    want = [[0.5 * flat[e] + 0.5 * sum(flat[s:e + 1].tolist()) / (e - s + 1)
             for s, e in zip(srow, erow)] for srow, erow in zip(start, end)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(rl_ops.packed_read_reward(values, end, None, "eos"), flat[end])
    off = rl_ops.packed_read_reward(values, end, start + 1, "pooled")  # one token short
    assert not np.allclose(off, want, rtol=1e-5)


# --- value-free advantage estimators against Python loops -------------------------------

def _loop_grpo(rewards, g, scale):
    out = []
    for start in range(0, len(rewards), g):
        group = rewards[start:start + g]
        mean = sum(group) / g
        std = (sum((r - mean) ** 2 for r in group) / (g - 1)) ** 0.5
        out += [(r - mean) / (std + 1e-6) if scale else r - mean for r in group]
    return out


def _loop_rloo(rewards, g):
    out = []
    for start in range(0, len(rewards), g):
        group = rewards[start:start + g]
        out += [r - (sum(group) - r) / (g - 1) for r in group]
    return out


@pytest.mark.parametrize("group_size", [2, 4])
def test_group_estimators_match_python_loops(group_size):
    rewards = np.random.default_rng(group_size).normal(size=4 * group_size).tolist()
    for scale in (True, False):
        np.testing.assert_allclose(
            rl_ops.group_relative_advantages(np.asarray(rewards), group_size, scale_by_std=scale),
            _loop_grpo(rewards, group_size, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rl_ops.leave_one_out_advantages(np.asarray(rewards), group_size),
                               _loop_rloo(rewards, group_size), rtol=1e-5, atol=1e-6)


def test_a_group_of_identical_rewards_has_zero_advantage():
    rewards = np.asarray([0.7] * 4 + [1.0, 2.0, 3.0, 4.0], np.float32)
    for advantages in (rl_ops.group_relative_advantages(rewards, 4),
                       rl_ops.group_relative_advantages(rewards, 4, scale_by_std=False),
                       rl_ops.leave_one_out_advantages(rewards, 4)):
        np.testing.assert_array_equal(np.asarray(advantages)[:4], 0.0)
        assert np.all(np.diff(np.asarray(advantages)[4:]) > 0)
    with pytest.raises(ValueError, match="group_size must be >= 2 and divide the batch 8"):
        rl_ops.group_relative_advantages(rewards, 3)


def test_running_baseline_and_token_broadcast():
    adv, b = rl_ops.running_baseline_advantages(np.asarray([1.0, 3.0]), np.nan, decay=0.5)
    np.testing.assert_allclose(adv, [-1.0, 1.0])
    assert float(b) == pytest.approx(2.0)  # the first batch's mean
    adv, b = rl_ops.running_baseline_advantages(np.asarray([4.0, 6.0]), b, decay=0.5)
    np.testing.assert_allclose(adv, [2.0, 4.0])
    assert float(b) == pytest.approx(0.5 * 2.0 + 0.5 * 5.0)
    mask = np.asarray([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(rl_ops.broadcast_to_tokens(np.asarray([2.0, -1.0]), mask),
                                  [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
