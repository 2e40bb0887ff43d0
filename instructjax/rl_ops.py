"""RL math for RLHF: masked statistics, GAE, KL estimators, per-token rewards, the adaptive
KL controller, tempered log-probs and the reward model's reads. Small pure functions, float32
throughout, masks explicit, every one jit-able (Python-level arguments such as `temperature`,
`target`, `horizon`, `read` are static configuration).

Shape legend: B batch, N response length, T full sequence length (prompt + response), V vocab.

Token alignment ("target alignment", used by every per-token array here and in the PPO batch):
index t refers to the token tokens[:, t] as the thing being PREDICTED. So

    logprobs_BxT[b, t] = log pi(tokens[b, t] | tokens[b, :t])   (read from logits[b, t-1])
    values_BxT[b, t]   = V(tokens[b, :t])  (value-head output at position t-1, the state in
                                            which tokens[b, t] was chosen)
    mask_BxT[b, t]     = 1 iff tokens[b, t] is a response token (EOS included)

Column 0 has no predecessor and is always 0. `align_to_targets` moves a per-position model
output (values, logits-derived quantities) into this alignment. Arrays over the response only
(`_BxN`, as the sampler returns them) are the same thing with the prompt columns dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WHITEN_EPS = 1e-8


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# --------------------------------------------------------------------------- masked statistics

def masked_sum(x, mask, axis=None) -> jax.Array:
    """sum_i m_i x_i (float32)."""
    return jnp.sum(_f32(x) * _f32(mask), axis=axis)


def masked_mean(x, mask, axis=None) -> jax.Array:
    """mean = sum_i m_i x_i / sum_i m_i; 0 where sum_i m_i == 0 (no NaN for empty masks)."""
    x, mask = _f32(x), _f32(mask)
    count = jnp.sum(mask, axis=axis)
    total = jnp.sum(x * mask, axis=axis)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def masked_var(x, mask, axis=None) -> jax.Array:
    """Population variance over masked entries: sum_i m_i (x_i - mean)^2 / sum_i m_i.

    (The biased estimator, as lm-human-preferences' `whiten` uses via tf.nn.moments, so the
    whitened entries have masked variance exactly 1 up to eps.)"""
    mean = masked_mean(x, mask, axis=axis)
    if axis is not None:
        mean = jnp.expand_dims(mean, axis)
    return masked_mean(jnp.square(_f32(x) - mean), mask, axis=axis)


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = WHITEN_EPS) -> jax.Array:
    """Whitens over ALL masked entries of the batch:

        w_i = (x_i - mu) / sqrt(var + eps)            (shift_mean=True)
        w_i = (x_i - mu) / sqrt(var + eps) + mu       (shift_mean=False: rescale only)

    with mu, var the masked mean and population variance. Masked-out entries never enter
    mu or var and are returned as 0."""
    x, mask = _f32(x), _f32(mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --------------------------------------------------------------------------- alignment helpers

def align_to_targets(x_BxT: jax.Array) -> jax.Array:
    """out[:, t] = x[:, t-1], out[:, 0] = 0: a per-position model output (e.g. the value
    head's values_BxT) moved to target alignment (see the module docstring)."""
    pad = jnp.zeros_like(x_BxT[:, :1])
    return jnp.concatenate([pad, x_BxT[:, :-1]], axis=1)


def last_index(mask_BxT: jax.Array) -> jax.Array:
    """Index of the last position with mask == 1 in each row (any padding layout: left,
    right or both). Rows without a 1 give T - 1; callers use `jnp.any(mask, -1)` to tell."""
    mask = jnp.asarray(mask_BxT) != 0
    T = mask.shape[-1]
    return (T - 1 - jnp.argmax(mask[..., ::-1], axis=-1)).astype(jnp.int32)


def last_token_values(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """values_B[b] = values[b, t_b] with t_b = max{t : mask[b, t] == 1}.

    Works with left padding (prompts for generation), right padding (RM inputs) and both.
    Rows with no real token return 0."""
    index_B = last_index(mask_BxT)
    picked_B = jnp.take_along_axis(_f32(values_BxT), index_B[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.any(jnp.asarray(mask_BxT) != 0, axis=-1), picked_B, 0.0)


# --------------------------------------------------------------------------- reward reads
# How a reward model's per-POSITION outputs values_BxT (the scalar head after reading
# tokens[:, :t + 1]; not target-aligned) become one reward per row. Training, PPO's scoring
# and the analysis must use the same read. Both reads are affine in the values with weights
# summing to 1: adding c to every value (the RM's bias normalisation) adds c to the reward.

def pooled_response_values(values_BxT: jax.Array, response_mask_BxT: jax.Array) -> jax.Array:
    """The 'pooled' read: half the value at the response's last token (the EOS when it
    ended), half the mean value over the response's tokens (EOS included, prompt excluded):

        last_b = max{t : m_bt = 1}
        r_b    = 0.5 * v[b, last_b]  +  0.5 * sum_t m_bt v_bt / sum_t m_bt

    m = response_mask, 1 on the response's tokens. Any padding layout; rows without a
    response token give 0."""
    return 0.5 * last_token_values(values_BxT, response_mask_BxT) + 0.5 * masked_mean(
        values_BxT, response_mask_BxT, axis=-1)


def response_mask_from_start(start_B: jax.Array, real_mask_BxT: jax.Array) -> jax.Array:
    """m[b, t] = 1 iff real[b, t] and t >= start_b: the response tokens of right-padded
    prompt + response rows whose response starts at column start_b (the prompt length)."""
    T = real_mask_BxT.shape[-1]
    after_B = jnp.arange(T)[None, :] >= jnp.asarray(start_B)[:, None]
    return (after_B & (jnp.asarray(real_mask_BxT) != 0)).astype(jnp.float32)


def read_reward(values_BxT: jax.Array, real_mask_BxT: jax.Array, response_mask_BxT,
                read: str) -> jax.Array:
    """reward_B under `read`: 'eos' = the value at the last real token (`last_token_values`:
    the EOS when the response ended; response_mask unused, may be None), 'pooled' =
    `pooled_response_values` over response_mask."""
    if read == "eos":
        return last_token_values(values_BxT, real_mask_BxT)
    if read == "pooled":
        return pooled_response_values(values_BxT, response_mask_BxT)
    raise ValueError(f"reward read must be 'eos' or 'pooled', got {read!r}")


def packed_read_reward(values_RxT: jax.Array, end_BxK: jax.Array, start_BxK, read: str
                       ) -> jax.Array:
    """`read_reward` over a packed block: response (b, k) spans the flat indices
    s = start_BxK[b, k] .. e = end_BxK[b, k] of values_RxT.reshape(-1) (its first and last
    token, in one row). With v the flat values and cs the cumulative sum ALONG EACH ROW
    (a row's partial sums stay small, so float32 keeps the differences exact enough):

        eos:     r = v[e]
        pooled:  r = 0.5 * v[e] + 0.5 * (cs[e] - cs[s] + v[s]) / (e - s + 1)

    start_BxK is read only for 'pooled' (None is fine for 'eos')."""
    flat = _f32(values_RxT).reshape(-1)
    end_BxK = jnp.asarray(end_BxK)
    if read == "eos":
        return flat[end_BxK]
    if read != "pooled":
        raise ValueError(f"reward read must be 'eos' or 'pooled', got {read!r}")
    start_BxK = jnp.asarray(start_BxK)
    cs = jnp.cumsum(_f32(values_RxT), axis=-1).reshape(-1)
    span_sum_BxK = cs[end_BxK] - cs[start_BxK] + flat[start_BxK]
    count_BxK = jnp.maximum(end_BxK - start_BxK + 1, 1).astype(jnp.float32)
    return 0.5 * flat[end_BxK] + 0.5 * span_sum_BxK / count_BxK


# --------------------------------------------------------------------------- log-probs

def _tempered(logits_BxTxV, temperature):
    logits = _f32(logits_BxTxV)
    # Temperature 0 (greedy sampling) scores at temperature 1, as the sampler does.
    if isinstance(temperature, (int, float)) and temperature == 0:
        return logits
    return logits / temperature


def response_logits(apply_policy, params, tokens_BxT, positions_BxT, segment_ids_BxT,
                    response_len: int = 0) -> tuple[jax.Array, int]:
    """(logits_BxWxV, first_target) for response_logprobs / entropy_from_logits: with
    response_len = N > 0 the LM head runs only at the N positions that predict the last N
    tokens (T - N - 1 .. T - 2), not at the prompt's, whose logits no RL loss reads; with 0,
    at every position (first_target 1)."""
    B, T = tokens_BxT.shape
    if not response_len:
        return apply_policy(params, tokens_BxT, positions_BxT, segment_ids_BxT, None), 1
    if response_len >= T:
        raise ValueError(f"response_len ({response_len}) must be shorter than the rows ({T})")
    first = T - response_len
    head_at_BxN = jnp.broadcast_to(jnp.arange(first - 1, T - 1, dtype=jnp.int32), (B, response_len))
    return apply_policy(params, tokens_BxT, positions_BxT, segment_ids_BxT, None,
                        head_at_BxU=head_at_BxN), first


def _scored_window(logits_BxWxV, T: int, first_target: int):
    """The logits that predict tokens[first_target:]: positions first_target - 1 .. T - 2."""
    if first_target < 1:
        raise ValueError(f"first_target must be >= 1, got {first_target}")
    return logits_BxWxV[:, :T - first_target]


def _front_pad(x_BxW, T: int) -> jax.Array:
    return jnp.concatenate([jnp.zeros((x_BxW.shape[0], T - x_BxW.shape[1]), x_BxW.dtype), x_BxW],
                           axis=1)


def response_logprobs(logits_BxWxV: jax.Array, tokens_BxT: jax.Array, temperature=1.0, *,
                      first_target: int = 1) -> jax.Array:
    """Target-aligned tempered log-probs of the tokens actually in the sequence:

        logprobs_BxT[b, t] = log_softmax(logits at position t-1 / temperature)[tokens[b, t]]
                             for t >= first_target, else 0

    logits_BxWxV start at position first_target - 1: the whole sequence's (first_target 1)
    or the window response_logits returns. float32, over the full tempered distribution (no
    top-p truncation), matching the sampler's per-token log-probs. temperature == 0 means
    temperature 1 (greedy sampling)."""
    T = tokens_BxT.shape[1]
    scaled_BxWxV = _tempered(_scored_window(logits_BxWxV, T, first_target), temperature)
    targets_BxW = tokens_BxT[:, first_target:]
    lse_BxW = jax.nn.logsumexp(scaled_BxWxV, axis=-1)
    picked_BxW = jnp.take_along_axis(scaled_BxWxV, targets_BxW[..., None], axis=-1)[..., 0]
    return _front_pad(picked_BxW - lse_BxW, T)


def entropy_from_logits(logits_BxWxV: jax.Array, temperature=1.0, *, first_target: int = 1,
                        seq_len: int | None = None) -> jax.Array:
    """Target-aligned entropy of the tempered next-token distribution, [B, seq_len]:
    H[b, t] = -sum_v p_v log p_v with p = softmax(logits at position t-1 / temperature) for
    t >= first_target, else 0. Logits as in response_logprobs; seq_len defaults to W (the
    whole sequence's logits)."""
    T = logits_BxWxV.shape[1] if seq_len is None else seq_len
    logp_BxWxV = jax.nn.log_softmax(
        _tempered(_scored_window(logits_BxWxV, T, first_target), temperature), axis=-1)
    return _front_pad(-jnp.sum(jnp.exp(logp_BxWxV) * logp_BxWxV, axis=-1), T)


# --------------------------------------------------------------------------- KL estimators

def kl_k1(logprobs, ref_logprobs) -> jax.Array:
    """k1 = log pi(x) - log pi_ref(x): unbiased for KL(pi || pi_ref) under x ~ pi, can be < 0.
    This is the per-token KL in InstructGPT's reward."""
    return _f32(logprobs) - _f32(ref_logprobs)


def kl_k2(logprobs, ref_logprobs) -> jax.Array:
    """k2 = 0.5 * (log pi(x) - log pi_ref(x))^2: biased, low variance, >= 0."""
    return 0.5 * jnp.square(_f32(logprobs) - _f32(ref_logprobs))


def kl_k3(logprobs, ref_logprobs) -> jax.Array:
    """k3 = exp(r) - 1 - r with r = log pi_ref(x) - log pi(x) (Schulman, "Approximating KL
    divergence"): unbiased for KL(pi || pi_ref) under x ~ pi and always >= 0."""
    r = _f32(ref_logprobs) - _f32(logprobs)
    return jnp.expm1(r) - r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def sequence_kl(logprobs_BxN, ref_logprobs_BxN, mask_BxN, estimator: str = "k1") -> jax.Array:
    """kl_B[b] = sum_t mask[b, t] * k(logp[b, t], ref[b, t]) for estimator k in k1/k2/k3."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    return masked_sum(KL_ESTIMATORS[estimator](logprobs_BxN, ref_logprobs_BxN), mask_BxN, axis=-1)


# --------------------------------------------------------------------------- rewards

def per_token_rewards(score_B, logprobs_BxN, ref_logprobs_BxN, mask_BxN, beta, ended_B,
                      no_eos_penalty=None) -> tuple[jax.Array, jax.Array]:
    """InstructGPT per-token reward and the per-sequence sampled KL.

        s_b        = score_b                 if ended_b (EOS produced)
                   = no_eos_penalty          otherwise (None: keep score_b)
        r[b, t]    = -beta * (logp[b, t] - ref[b, t]) * mask[b, t]  +  s_b * [t == last_b]
        kl_B[b]    = sum_t mask[b, t] * (logp[b, t] - ref[b, t])     (k1, for the controller)

    last_b is the last position with mask == 1 (the EOS, if any). Rows with an empty mask get
    no score. Returns (rewards_BxN, kl_B), float32."""
    mask = _f32(mask_BxN)
    kl_BxN = kl_k1(logprobs_BxN, ref_logprobs_BxN) * mask
    score_B = _f32(score_B)
    if no_eos_penalty is not None:
        score_B = jnp.where(jnp.asarray(ended_B, bool), score_B, _f32(no_eos_penalty))
    N = mask.shape[-1]
    has_token_B = jnp.any(mask != 0, axis=-1)
    at_last_BxN = jax.nn.one_hot(last_index(mask), N, dtype=jnp.float32) * has_token_B[:, None]
    rewards_BxN = -_f32(beta) * kl_BxN + score_B[:, None] * at_last_BxN
    return rewards_BxN, jnp.sum(kl_BxN, axis=-1)


# --------------------------------------------------------------------------- GAE

def gae(rewards_BxN, values_BxN, mask_BxN, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016), reverse `lax.scan` over time.

        delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}
        R_t     = A_t + V_t                      (the value targets)

    with m the response mask and m_N = 0, so the bootstrap value after the last response token
    is 0 (the episode ends there). A response's tokens are a contiguous run of mask == 1 (from
    column 0 for `_BxN` arrays; a run after a left-padded prompt works too). Entries with mask
    0 get A = R = 0. Returns (advantages_BxN, returns_BxN), float32."""
    r_NxB = _f32(rewards_BxN).T
    v_NxB = _f32(values_BxN).T
    m_NxB = _f32(mask_BxN).T

    def step(carry, xs):
        next_value_B, next_adv_B = carry  # already multiplied by m_{t+1}
        r_B, v_B, m_B = xs
        delta_B = r_B + gamma * next_value_B - v_B
        adv_B = (delta_B + gamma * lam * next_adv_B) * m_B
        return (v_B * m_B, adv_B), adv_B

    zeros_B = jnp.zeros(r_NxB.shape[1], jnp.float32)
    _, adv_NxB = jax.lax.scan(step, (zeros_B, zeros_B), (r_NxB, v_NxB, m_NxB), reverse=True)
    advantages_BxN = adv_NxB.T
    returns_BxN = (advantages_BxN + _f32(values_BxN)) * _f32(mask_BxN)
    return advantages_BxN, returns_BxN


# --------------------------------------------------------------------------- value-free advantages
# Outcome rewards (one scalar per response) of G responses to each prompt, laid out as
# B = P * G rows with a prompt's G responses adjacent. Each estimator returns the per-row
# advantage A_B; `broadcast_to_tokens` spreads it over the response's tokens.

def _groups(reward_B, group_size: int) -> jax.Array:
    reward_B = _f32(reward_B)
    if group_size < 2 or reward_B.shape[0] % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch {reward_B.shape[0]}, "
                         f"got {group_size}")
    return reward_B.reshape(-1, group_size)


def group_relative_advantages(reward_B, group_size: int, *, scale_by_std: bool = True,
                              eps: float = 1e-6) -> jax.Array:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean_g r) / (std_g r + eps), with the group's
    sample standard deviation (n - 1); scale_by_std=False keeps r_i - mean_g r (as Dr. GRPO
    argues, the std rescales each prompt by how uncertain its rewards are)."""
    r_PxG = _groups(reward_B, group_size)
    centred_PxG = r_PxG - jnp.mean(r_PxG, axis=-1, keepdims=True)
    if scale_by_std:
        centred_PxG = centred_PxG / (jnp.std(r_PxG, axis=-1, ddof=1, keepdims=True) + eps)
    return centred_PxG.reshape(-1)


def leave_one_out_advantages(reward_B, group_size: int) -> jax.Array:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): each response's baseline is the mean
    reward of the OTHER G - 1 responses to its prompt, A_i = r_i - sum_{j!=i} r_j / (G - 1)
    = G / (G - 1) * (r_i - mean_g r). Unbiased, since the baseline does not depend on r_i."""
    r_PxG = _groups(reward_B, group_size)
    others_PxG = (jnp.sum(r_PxG, axis=-1, keepdims=True) - r_PxG) / (group_size - 1)
    return (r_PxG - others_PxG).reshape(-1)


def running_baseline_advantages(reward_B, baseline, decay: float = 0.9
                                ) -> tuple[jax.Array, jax.Array]:
    """REINFORCE with a moving-average baseline: A_i = r_i - b, then
    b' = decay * b + (1 - decay) * mean r (b starts at the first batch's mean when it is
    NaN). Returns (A_B, b'); the baseline is carried with the train state."""
    reward_B = _f32(reward_B)
    mean = jnp.mean(reward_B)
    b = jnp.where(jnp.isnan(_f32(baseline)), mean, _f32(baseline))
    return reward_B - b, decay * b + (1.0 - decay) * mean


def broadcast_to_tokens(advantage_B, mask_BxN) -> jax.Array:
    """A_B on every response token (mask == 1), 0 elsewhere."""
    return _f32(advantage_B)[:, None] * _f32(mask_BxN)


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce")


# --------------------------------------------------------------------------- KL controller

def kl_controller_init(beta: float) -> dict[str, jax.Array]:
    """Controller state: a pytree {'beta': f32 scalar}, checkpointable with the train state."""
    return {"beta": jnp.asarray(beta, jnp.float32)}


def kl_controller_update(state, observed_kl, n_steps, *, target: float | None,
                         horizon: float | None = None) -> dict[str, jax.Array]:
    """Adaptive KL controller (Ziegler et al. 2019, lm-human-preferences' AdaptiveKLController):

        e    = clip(observed_kl / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    observed_kl is the mean per-sequence KL of the rollout batch (sum over tokens); n_steps the
    number of samples (episodes) it covers. target None is the fixed controller: beta unchanged."""
    if target is None:
        return {"beta": jnp.asarray(state["beta"], jnp.float32)}
    if horizon is None or horizon <= 0:
        raise ValueError(f"the adaptive KL controller needs horizon > 0, got {horizon}")
    if target <= 0:
        raise ValueError(f"KL target must be > 0, got {target}")
    error = jnp.clip(_f32(observed_kl) / target - 1.0, -0.2, 0.2)
    beta = _f32(state["beta"]) * (1.0 + error * _f32(n_steps) / horizon)
    return {"beta": beta}
