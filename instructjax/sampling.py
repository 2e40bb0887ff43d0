"""Jitted sampling: one prefill over left-padded prompts, then a `lax.while_loop` decode
with the KV cache that stops as soon as every row has produced EOS.

Per-token log-probs are log_softmax(logits / temperature) over the FULL tempered
distribution, before top-p truncation: PPO's ratio and KL terms use the policy's tempered
distribution (InstructGPT / lm-human-preferences), not the truncated sampler. With
temperature 0 (greedy) they are log-probs at temperature 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from instructjax.model.transformer import Transformer, init_cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int
    eos_id: int
    pad_id: int
    temperature: float = 1.0  # 0.0 = greedy
    top_p: float = 1.0
    # Ids >= vocab_limit are never sampled (0: none excluded): a model whose embedding is
    # larger than its tokenizer must not produce ids the tokenizer cannot decode.
    vocab_limit: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def left_pad(token_lists: list[list[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligns each prompt in a [B, P] array; mask is 1 on real tokens."""
    longest = max((len(t) for t in token_lists), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a prompt of {longest} tokens does not fit the prompt length {length}")
    tokens = np.full((len(token_lists), length), pad_id, np.int32)
    mask = np.zeros((len(token_lists), length), np.int32)
    for i, t in enumerate(token_lists):
        if t:
            tokens[i, length - len(t):] = t
            mask[i, length - len(t):] = 1
    return tokens, mask


def positions_from_mask(mask_BxT: jax.Array) -> jax.Array:
    """0, 1, 2, ... over real tokens; 0 on left padding."""
    return jnp.maximum(jnp.cumsum(mask_BxT, axis=-1) - 1, 0).astype(jnp.int32)


def _top_p_filter(logits_BxV: jax.Array, top_p: float) -> jax.Array:
    """Keeps the smallest set of tokens whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return logits_BxV  # no sort: it costs more than the rest of the sampling step
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # The cutoff is the logit of the first token at which the mass reaches top_p.
    index_B = jnp.sum(cum_BxV < top_p, axis=-1, keepdims=True)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, index_B, axis=-1)
    return jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)


def _inverse_cdf(logp_BxV: jax.Array, rng) -> jax.Array:
    """One draw per row from softmax(logp_BxV) (unnormalised is fine; -inf = excluded).

    One uniform per row against the running sum of probabilities, instead of the V Gumbel
    draws of jax.random.categorical: those random bits and the argmax over them took about
    a tenth of a decode step (bench-512, CPU). The chosen index is the first whose
    cumulative mass reaches u * total with u in (0, 1], so a token of zero probability is
    never chosen."""
    probs_BxV = jnp.exp(logp_BxV - jnp.max(logp_BxV, axis=-1, keepdims=True))
    cum_BxV = jnp.cumsum(probs_BxV, axis=-1)
    u_Bx1 = 1.0 - jax.random.uniform(rng, (logp_BxV.shape[0], 1), jnp.float32)
    index_B = jnp.sum(cum_BxV < u_Bx1 * cum_BxV[:, -1:], axis=-1)
    return jnp.minimum(index_B, logp_BxV.shape[-1] - 1)


def choose_token(logits_BxV, rng, cfg: SamplingConfig):
    """(token_B, logprob_B) under the tempered distribution."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if 0 < cfg.vocab_limit < logits_BxV.shape[-1]:
        logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < cfg.vocab_limit, logits_BxV,
                               -jnp.inf)
    if cfg.temperature == 0.0:
        token_B = jnp.argmax(logits_BxV, axis=-1)
        logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        logp_BxV = jax.nn.log_softmax(logits_BxV / cfg.temperature, axis=-1)
        # Top-p on log-probs equals top-p on tempered logits (a per-row shift).
        token_B = _inverse_cdf(_top_p_filter(logp_BxV, cfg.top_p), rng)
    return token_B.astype(jnp.int32), jnp.take_along_axis(logp_BxV, token_B[:, None], -1)[:, 0]


def sample(params, prompt_BxP, prompt_mask_BxP, rng, *, model: Transformer, cfg: SamplingConfig
           ) -> dict[str, jax.Array]:
    """Returns tokens_BxN, logprobs_BxN, mask_BxN (1 up to and including the first EOS),
    lengths_B and ended_B (EOS produced). Wrap in jax.jit with static model and cfg."""
    B, P = prompt_BxP.shape
    N = cfg.max_new_tokens
    prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
    params_in = {"params": params}
    cache = init_cache(model.cfg, B, P + N)
    # Prompts are left-padded, so slot P - 1 holds every row's last real token: the prefill
    # computes logits there only (not at all P positions over the whole vocabulary).
    logits_Bx1xV, cache = model.apply(params_in, prompt_BxP, positions_from_mask(prompt_mask_BxP),
                                      prompt_mask_BxP, cache=cache, cache_index=0,
                                      head_at_BxU=jnp.full((B, 1), P - 1, jnp.int32))
    next_position_B = jnp.sum(prompt_mask_BxP, axis=-1).astype(jnp.int32)
    token_B, logp_B = choose_token(logits_Bx1xV[:, 0], jax.random.fold_in(rng, 0), cfg)

    tokens_BxN = jnp.full((B, N), cfg.pad_id, jnp.int32).at[:, 0].set(token_B)
    logprobs_BxN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(logp_B)
    mask_BxN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(1.0)
    done_B = token_B == cfg.eos_id

    def cond(carry):
        step, _, _, _, done_B, _, _ = carry
        return (step < N) & ~jnp.all(done_B)

    def body(carry):
        step, tokens_BxN, logprobs_BxN, mask_BxN, done_B, cache, position_B = carry
        prev_B = tokens_BxN[:, step - 1]
        logits_Bx1xV, cache = model.apply(params_in, prev_B[:, None], position_B[:, None],
                                          jnp.ones((B, 1), jnp.int32), cache=cache,
                                          cache_index=P + step - 1)
        token_B, logp_B = choose_token(logits_Bx1xV[:, 0], jax.random.fold_in(rng, step), cfg)
        token_B = jnp.where(done_B, cfg.pad_id, token_B)
        live_B = (~done_B).astype(jnp.float32)
        tokens_BxN = tokens_BxN.at[:, step].set(token_B)
        logprobs_BxN = logprobs_BxN.at[:, step].set(logp_B * live_B)
        mask_BxN = mask_BxN.at[:, step].set(live_B)
        done_B = done_B | (token_B == cfg.eos_id)
        return step + 1, tokens_BxN, logprobs_BxN, mask_BxN, done_B, cache, position_B + 1

    carry = (jnp.int32(1), tokens_BxN, logprobs_BxN, mask_BxN, done_B, cache, next_position_B)
    _, tokens_BxN, logprobs_BxN, mask_BxN, done_B, _, _ = jax.lax.while_loop(cond, body, carry)
    return {"tokens_BxN": tokens_BxN, "logprobs_BxN": logprobs_BxN, "mask_BxN": mask_BxN,
            "lengths_B": jnp.sum(mask_BxN, axis=-1).astype(jnp.int32), "ended_B": done_B}
