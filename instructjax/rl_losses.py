"""The RL objectives (same contract as losses.py): PPO's clipped surrogate with a value
loss, GRPO's clipped surrogate with the KL to the reference in the loss, and the
pretraining-mix term (InstructGPT's PPO-ptx) that composes with either.

Per-token arrays use TARGET alignment (see rl_ops): column t is about tokens[:, t] as the
token being predicted, scored from the model output at t-1; column 0 is never a target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instructjax import rl_ops
from instructjax.losses import LMLossConfig, LossFn, Metrics, lm_loss, make_apply, pair


def clipped_surrogate(logp_BxT, old_logp_BxT, adv_BxT, on_BxT, clip_eps: float):
    """PPO's per-token pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)) with
    r_t = exp(log pi - log pi_old); returns (pg, 1 where the clip was active, r)."""
    # Off the response the log-ratio is forced to 0 so exp() cannot overflow into inf * 0.
    ratio_BxT = jnp.exp(jnp.where(on_BxT, logp_BxT - old_logp_BxT, 0.0))
    pg1_BxT = -adv_BxT * ratio_BxT
    pg2_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps)
    return jnp.maximum(pg1_BxT, pg2_BxT), (pg2_BxT > pg1_BxT).astype(jnp.float32), ratio_BxT


def approx_kl(old_logp_BxT, logp_BxT, on_BxT):
    """KL(pi_old || pi) per token for tokens sampled from pi_old: k3 with r = pi / pi_old."""
    return rl_ops.kl_k3(old_logp_BxT, jnp.where(on_BxT, logp_BxT, old_logp_BxT))


@dataclasses.dataclass(frozen=True)
class PolicyValueApply:
    """The `apply` PPO objectives receive: `.policy(params, tokens, positions, segment_ids, rng)`
    -> logits_BxTxV and `.value(...)` -> values_BxT, each called with its own sub-tree of
    params = {'policy': ..., 'value': ...}."""
    policy: Callable
    value: Callable

    @classmethod
    def from_models(cls, policy_model, value_model) -> PolicyValueApply:
        return cls(policy=make_apply(policy_model), value=make_apply(value_model))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOLossConfig:
    """clip_eps: policy ratio clip. value_clip: clip of the value change (None = unclipped).
    vf_coef: value-loss weight. temperature: the sampling temperature (log-probs come from
    logits / temperature). entropy_coef: entropy bonus (InstructGPT: 0). response_len: the
    rows' last response_len tokens hold every response token, so the LM head runs only
    there (rl_ops.response_logits); 0 = at every position."""
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    temperature: float = 1.0
    entropy_coef: float = 0.0
    response_len: int = 0

    def __post_init__(self):
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"value_clip must be > 0 or None, got {self.value_clip}")
        if self.vf_coef < 0 or self.entropy_coef < 0:
            raise ValueError("vf_coef and entropy_coef must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.response_len < 0:
            raise ValueError(f"response_len must be >= 0, got {self.response_len}")


def ppo_loss(params, batch: Mapping[str, jax.Array], rng, *, apply: PolicyValueApply,
             cfg: PPOLossConfig) -> tuple[jax.Array, Metrics]:
    """PPO clipped surrogate + clipped value loss, summed over response tokens.

    batch (all [B, T], one row = left-padded prompt then response, right-padded after EOS):
      tokens_BxT, positions_BxT, segment_ids_BxT   the model inputs
      response_mask_BxT   1 at t iff tokens[t] is a generated token (EOS included), i.e. the
                          TARGET alignment of rl_ops: entry t is scored from the logits and
                          value-head output at position t - 1 (the state in which tokens[t]
                          was sampled); prompt, padding and column 0 are 0
      old_logprobs_BxT    rollout policy's tempered log pi_old(tokens[t] | tokens[:t])
      old_values_BxT      rollout value V_old(tokens[:t]) (rl_ops.align_to_targets of the
                          value model's output)
      advantages_BxT      GAE advantages, already whitened;  returns_BxT  GAE returns

    With ratio_t = exp(log pi(t) - log pi_old(t)), m the response mask:
      pg_t    = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))
      vclip_t = V_old,t + clip(V_t - V_old,t, -vc, vc)
      vf_t    = 0.5 max((V_t - R_t)^2, (vclip_t - R_t)^2)
      loss_sum = sum_t m_t (pg_t + vf_coef vf_t - entropy_coef H_t),  denominator = sum_t m_t

    Dropout is off (both models run deterministic; `rng` is unused), as RL requires."""
    del rng
    tokens_BxT, positions_BxT = batch["tokens_BxT"], batch["positions_BxT"]
    segment_ids_BxT = batch["segment_ids_BxT"]
    mask_BxT = batch["response_mask_BxT"].astype(jnp.float32)
    on_BxT = mask_BxT > 0
    logits, first = rl_ops.response_logits(apply.policy, params["policy"], tokens_BxT,
                                           positions_BxT, segment_ids_BxT, cfg.response_len)
    values_BxT = rl_ops.align_to_targets(
        apply.value(params["value"], tokens_BxT, positions_BxT, segment_ids_BxT, None)
        .astype(jnp.float32))
    logp_BxT = rl_ops.response_logprobs(logits, tokens_BxT, cfg.temperature, first_target=first)
    old_logp_BxT = batch["old_logprobs_BxT"].astype(jnp.float32)
    old_values_BxT = batch["old_values_BxT"].astype(jnp.float32)
    adv_BxT = batch["advantages_BxT"].astype(jnp.float32)
    returns_BxT = batch["returns_BxT"].astype(jnp.float32)

    pg_BxT, clipped_BxT, ratio_BxT = clipped_surrogate(logp_BxT, old_logp_BxT, adv_BxT, on_BxT,
                                                       cfg.clip_eps)

    vf_unclipped_BxT = jnp.square(values_BxT - returns_BxT)
    if cfg.value_clip is None:
        vf_BxT = 0.5 * vf_unclipped_BxT
        vf_clipped_on_BxT = jnp.zeros_like(vf_BxT)
    else:
        v_clipped_BxT = old_values_BxT + jnp.clip(values_BxT - old_values_BxT,
                                                  -cfg.value_clip, cfg.value_clip)
        vf_clipped_BxT = jnp.square(v_clipped_BxT - returns_BxT)
        vf_BxT = 0.5 * jnp.maximum(vf_unclipped_BxT, vf_clipped_BxT)
        vf_clipped_on_BxT = (vf_clipped_BxT > vf_unclipped_BxT).astype(jnp.float32)

    entropy_BxT = rl_ops.entropy_from_logits(logits, cfg.temperature, first_target=first,
                                             seq_len=tokens_BxT.shape[1])
    if cfg.entropy_coef == 0:  # a metric only: keep it out of the backward pass
        entropy_BxT = jax.lax.stop_gradient(entropy_BxT)
    per_token_BxT = pg_BxT + cfg.vf_coef * vf_BxT - cfg.entropy_coef * entropy_BxT
    loss_sum = rl_ops.masked_sum(per_token_BxT, mask_BxT)
    n = jnp.sum(mask_BxT)

    def msum(x):
        return rl_ops.masked_sum(jax.lax.stop_gradient(x), mask_BxT)

    return loss_sum, {
        "loss": (loss_sum, n),
        "policy_loss": (msum(pg_BxT), n),
        "value_loss": (msum(vf_BxT), n),
        "clipfrac": (msum(clipped_BxT), n),
        "value_clipfrac": (msum(vf_clipped_on_BxT), n),
        "approx_kl": (msum(approx_kl(old_logp_BxT, logp_BxT, on_BxT)), n),
        "ratio": (msum(ratio_BxT), n),
        "entropy": (msum(entropy_BxT), n),
        "value_error": (msum(vf_unclipped_BxT), n),
        "tokens": pair(jnp.sum(segment_ids_BxT != 0), 1.0),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOLossConfig:
    """clip_eps: policy ratio clip. kl_coef: beta of the KL to the reference, in the loss
    (k3 estimator). aggregate: 'token' averages over every response token of the batch
    (DAPO), 'sequence' over each response's tokens, then over responses (the GRPO paper).
    temperature: the sampling temperature. response_len: as in PPOLossConfig."""
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    aggregate: str = "token"
    temperature: float = 1.0
    response_len: int = 0

    def __post_init__(self):
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.aggregate not in ("token", "sequence"):
            raise ValueError(f"aggregate must be 'token' or 'sequence', got {self.aggregate!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.response_len < 0:
            raise ValueError(f"response_len must be >= 0, got {self.response_len}")


def grpo_loss(params, batch: Mapping[str, jax.Array], rng, *, apply: PolicyValueApply,
              cfg: GRPOLossConfig) -> tuple[jax.Array, Metrics]:
    """GRPO (Shao et al. 2024): no value model; the advantage of a response (group-relative,
    leave-one-out, ..., rl_ops) is on every one of its tokens, and the KL to the frozen
    reference is a loss term rather than a reward:

      l_t = pg_t + kl_coef * k3_t,   k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
      'token':    loss_sum = sum_{b,t} m l,              denominator = sum_{b,t} m
      'sequence': loss_sum = sum_b (sum_t m l / n_b),    denominator = rows with n_b > 0

    batch: tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT, old_logprobs_BxT,
    ref_logprobs_BxT, advantages_BxT (as in ppo_loss, target alignment). Uses
    params['policy'] only."""
    del rng
    tokens_BxT = batch["tokens_BxT"]
    mask_BxT = batch["response_mask_BxT"].astype(jnp.float32)
    on_BxT = mask_BxT > 0
    logits, first = rl_ops.response_logits(apply.policy, params["policy"], tokens_BxT,
                                           batch["positions_BxT"], batch["segment_ids_BxT"],
                                           cfg.response_len)
    logp_BxT = rl_ops.response_logprobs(logits, tokens_BxT, cfg.temperature, first_target=first)
    old_logp_BxT = batch["old_logprobs_BxT"].astype(jnp.float32)
    ref_BxT = jnp.where(on_BxT, batch["ref_logprobs_BxT"].astype(jnp.float32), logp_BxT)
    pg_BxT, clipped_BxT, ratio_BxT = clipped_surrogate(
        logp_BxT, old_logp_BxT, batch["advantages_BxT"].astype(jnp.float32), on_BxT, cfg.clip_eps)
    kl_BxT = rl_ops.kl_k3(logp_BxT, ref_BxT)
    per_token_BxT = pg_BxT + cfg.kl_coef * kl_BxT
    if cfg.aggregate == "token":
        weight_BxT, n = mask_BxT, jnp.sum(mask_BxT)
    else:
        n_B = jnp.sum(mask_BxT, axis=-1)
        weight_BxT = mask_BxT / jnp.maximum(n_B, 1.0)[:, None]
        n = jnp.sum(n_B > 0).astype(jnp.float32)
    loss_sum = jnp.sum(per_token_BxT * weight_BxT)

    def wsum(x):
        return jnp.sum(jax.lax.stop_gradient(x) * weight_BxT)

    return loss_sum, {
        "loss": (loss_sum, n),
        "policy_loss": (wsum(pg_BxT), n),
        "kl_ref": (wsum(kl_BxT), n),
        "clipfrac": (wsum(clipped_BxT), n),
        "approx_kl": (wsum(approx_kl(old_logp_BxT, logp_BxT, on_BxT)), n),
        "ratio": (wsum(ratio_BxT), n),
        "tokens": pair(jnp.sum(batch["segment_ids_BxT"] != 0), 1.0),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOPtxLossConfig:
    """PPO-ptx: `ppo` (a PPOLossConfig, or a GRPOLossConfig for GRPO-ptx) and `lm` configure
    the two parts; gamma_ptx weighs the pretraining log-likelihood (InstructGPT's gamma; 0
    gives the RL objective alone)."""
    ppo: PPOLossConfig | GRPOLossConfig = dataclasses.field(default_factory=PPOLossConfig)
    lm: LMLossConfig = dataclasses.field(default_factory=LMLossConfig)
    gamma_ptx: float = 1.0

    def __post_init__(self):
        if self.gamma_ptx < 0:
            raise ValueError(f"gamma_ptx must be >= 0, got {self.gamma_ptx}")


def ppo_ptx_loss(params, batch: Mapping[str, Any], rng, *, apply: PolicyValueApply,
                 cfg: PPOPtxLossConfig) -> tuple[jax.Array, Metrics]:
    """PPO-ptx = `ppo_loss` + gamma_ptx * `lm_loss` of the policy on a pretraining batch, in
    one objective and one step. batch = {'rollout': ppo batch, 'ptx': lm batch}.

    The step divides everything by ONE denominator (the PPO token count n_ppo), so the ptx sum
    is rescaled by the constant c = stop_gradient(n_ppo / n_ptx):

        loss_sum = S_ppo + gamma_ptx * c * S_ptx,   denominator = n_ppo
        loss_sum / n_ppo = S_ppo / n_ppo + gamma_ptx * S_ptx / n_ptx       (exact, one batch)

    i.e. mean PPO loss per response token + gamma_ptx * mean pretraining NLL per token; the
    ptx term sends gradients into params['policy'] only. Under gradient accumulation with
    micro-batches i the step computes  sum_i S_ppo,i / N + gamma_ptx * sum_i w_i S_ptx,i / n_ptx,i
    with w_i = n_ppo,i / N, N = sum_i n_ppo,i: the PPO part stays exact, the ptx part becomes
    an average of the micro-batch ptx means weighted by each micro-batch's share of response
    tokens (weights sum to 1; exact when n_ppo,i / n_ptx,i is the same for every micro-batch,
    e.g. fixed-size packed ptx batches and equal response-token counts). Data parallelism is
    unaffected: under jit the sums are global. A micro-batch with no response tokens gives its
    ptx term weight 0. Metrics: the PPO metrics plus 'ptx_loss' (the exact pooled mean NLL
    incl. z-loss) and 'ptx/<lm metric>'. Both parts run without dropout."""
    rl_loss = grpo_loss if isinstance(cfg.ppo, GRPOLossConfig) else ppo_loss
    ppo_sum, metrics = rl_loss(params, batch["rollout"], rng, apply=apply, cfg=cfg.ppo)
    ptx_sum, ptx_metrics = lm_loss(params["policy"], batch["ptx"], None, apply=apply.policy,
                                   cfg=cfg.lm)
    n_ppo, n_ptx = metrics["loss"][1], ptx_metrics["loss"][1]
    scale = jax.lax.stop_gradient(n_ppo / jnp.maximum(n_ptx, 1e-9))
    loss_sum = ppo_sum + cfg.gamma_ptx * scale * ptx_sum
    metrics = dict(metrics, loss=(loss_sum, n_ppo), ppo_loss=(ppo_sum, n_ppo),
                   ptx_loss=ptx_metrics["loss"])
    metrics.update({f"ptx/{k}": v for k, v in ptx_metrics.items() if k != "loss"})
    return loss_sum, metrics


RL_LOSSES: dict[str, tuple[LossFn, type]] = {
    "ppo": (ppo_loss, PPOLossConfig),
    "grpo": (grpo_loss, GRPOLossConfig),
    "ppo_ptx": (ppo_ptx_loss, PPOPtxLossConfig),
}
