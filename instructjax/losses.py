"""Every training objective, as a pure function with one signature:

    loss_fn(params, batch, rng, *, apply, cfg) -> (loss_sum, metrics)

- `apply(params, tokens_BxT, positions_BxT, segment_ids_BxT, rng)` runs the model; `rng`
  None means deterministic (no dropout). The RL objectives (rl_losses.py) get a
  `PolicyValueApply` instead and params {'policy': ..., 'value': ...}.
- `loss_sum` is the UNREDUCED sum being minimised. `metrics` maps names to (sum, weight)
  pairs of scalars and always contains `metrics['loss'] == (loss_sum, denominator)`.
  The train step sums gradients and pairs over micro-batches and hosts, then divides by
  the summed denominator, so gradient accumulation and multi-host reduction are exact.
  Reported metric values are sum / weight.

New objectives are added to `LOSSES` (RL ones to `rl_losses.RL_LOSSES`); the train step
never changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instructjax import rl_ops
from instructjax.config import REWARD_READS

Metrics = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[..., tuple[jax.Array, Metrics]]


def make_apply(model) -> Callable:
    """Binds a Flax module into the `apply` callable every loss receives."""

    def apply(params, tokens_BxT, positions_BxT, segment_ids_BxT, rng=None, **kwargs):
        if rng is None:
            return model.apply({"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT,
                               deterministic=True, **kwargs)
        return model.apply({"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT,
                           deterministic=False, rngs={"dropout": rng}, **kwargs)

    return apply


def token_log_probs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """log p(target_t | context) in float32: log_softmax(logits)[target]."""
    logits = logits_BxTxV.astype(jnp.float32)
    lse_BxT = jax.nn.logsumexp(logits, axis=-1)
    picked_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return picked_BxT - lse_BxT


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMLossConfig:
    """Next-token cross-entropy. z_loss adds z * log(Z)^2 per token (PaLM) for stability."""
    z_loss: float = 0.0


def lm_loss(params, batch: Mapping[str, jax.Array], rng, *, apply, cfg: LMLossConfig
            ) -> tuple[jax.Array, Metrics]:
    """Masked next-token negative log-likelihood.

    loss_sum = sum_{b,t} m_bt * (-log p(y_bt | x_b,<=t) + z * logZ_bt^2),  denominator = sum m_bt

    Used for pretraining (mask = real tokens) and SFT (mask = response tokens + EOS).
    """
    logits_BxTxV = apply(params, batch["inputs"], batch["positions"], batch["segment_ids"], rng)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    targets_BxT = batch["targets"]
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    nll_sum = jnp.sum((lse_BxT - picked_BxT) * mask_BxT)
    loss_sum = nll_sum + cfg.z_loss * jnp.sum(jnp.square(lse_BxT) * mask_BxT)
    denominator = jnp.sum(mask_BxT)
    correct = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT).astype(jnp.float32)
    return loss_sum, {
        "loss": (loss_sum, denominator),
        "nll": (nll_sum, denominator),
        "accuracy": (jnp.sum(correct * mask_BxT), denominator),
        # Every real input token is processed (prompt included), so throughput counts them all.
        "tokens": (jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32), jnp.ones(())),
    }


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss function together with its config, the unit the train step consumes."""
    fn: LossFn
    cfg: Any

    def __call__(self, params, batch, rng, *, apply):
        return self.fn(params, batch, rng, apply=apply, cfg=self.cfg)




# ============================================================================ RLHF objectives
# Per-token arrays use TARGET alignment (see rl_ops): column t is about tokens[:, t] as the
# token being predicted, scored from the model output at t-1; column 0 is never a target.


def pair(total, weight) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(total, jnp.float32), jnp.asarray(weight, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankingLossConfig:
    """InstructGPT reward-model loss over K-way rankings. The pairwise loss leaves each
    prompt's mean reward free, so an RM can carry large per-prompt offsets that PPO's value
    function must then learn before advantages mean anything; center_coef > 0 adds
    center_coef * (mean_k r_bk)^2 per prompt to pull them to 0 (TRL's
    center_rewards_coefficient, K-way). The bias that centres SFT outputs at 0 overall is
    fitted after training, by the RM trainer. read: how a response's reward is read from the
    per-token values (rl_ops.read_reward: 'eos' or 'pooled')."""
    center_coef: float = 0.0
    read: str = "eos"

    def __post_init__(self):
        if self.center_coef < 0:
            raise ValueError(f"--rm_center_coef must be >= 0, got {self.center_coef}")
        if self.read not in REWARD_READS:
            raise ValueError(f"--rm_read must be one of {REWARD_READS}, got {self.read!r}")


def ranking_rewards(params, batch: Mapping[str, jax.Array], rng, *, apply, read: str
                    ) -> tuple[jax.Array, jax.Array]:
    """(reward_BxK, segment_ids): ONE forward pass, r_bk = rl_ops.read_reward under `read`.
    Padded: tokens/positions/segment_ids_BxKxT (prompt + response_k + EOS, right-padded,
    segment 0 = pad) run as [B*K, T], response_start_BxK = column of the first response token.
    Packed: tokens/positions/segment_ids_RxT, reward_index_BxK / response_start_BxK = flat
    index of each response's last / first token. response_start_BxK is read for 'pooled' only."""
    pooled = read == "pooled"
    if "reward_index_BxK" in batch:  # packed layout (data/comparison_packing.py)
        segment_ids = batch["segment_ids_RxT"]
        values_RxT = apply(params, batch["tokens_RxT"], batch["positions_RxT"], segment_ids, rng)
        return rl_ops.packed_read_reward(values_RxT, batch["reward_index_BxK"],
                                         batch["response_start_BxK"] if pooled else None,
                                         read), segment_ids
    tokens_BxKxT = batch["tokens_BxKxT"]
    B, K, T = tokens_BxKxT.shape
    segment_ids = batch["segment_ids_BxKxT"].reshape(B * K, T)
    values_BKxT = apply(params, tokens_BxKxT.reshape(B * K, T),
                        batch["positions_BxKxT"].reshape(B * K, T), segment_ids, rng)
    response_BKxT = (rl_ops.response_mask_from_start(batch["response_start_BxK"].reshape(-1),
                                                     segment_ids) if pooled else None)
    reward_BKx = rl_ops.read_reward(values_BKxT, segment_ids != 0, response_BKxT, read)
    return reward_BKx.reshape(B, K), segment_ids


def reward_ranking_loss(params, batch: Mapping[str, jax.Array], rng, *, apply,
                        cfg: RankingLossConfig) -> tuple[jax.Array, Metrics]:
    """InstructGPT RM loss: all C(K, 2) pairs of a K-way ranking in one batch element.

    batch: the responses (either layout of `ranking_rewards`, read as cfg.read), rank_BxK
    (0 = best), valid_BxK (padding responses 0). `apply` runs a head='scalar' model, ONE
    forward pass over every response.

        P_b      = {(w, l) : valid_bw, valid_bl, rank_bw < rank_bl}     (ties give no pair)
        loss_b   = 1/|P_b| * sum_{(w,l) in P_b} -log sigmoid(r_bw - r_bl)
                   + center_coef * (mean_{k valid} r_bk)^2
        loss_sum = sum_b loss_b,   denominator = #{b : |P_b| > 0}

    so every prompt weighs the same whatever its K (the paper's 1/C(K,2) normalisation), and
    prompts that are pure batch padding (no valid pair) count for nothing."""
    reward_BxK, segment_ids = ranking_rewards(params, batch, rng, apply=apply, read=cfg.read)
    valid_BxK = batch["valid_BxK"].astype(bool)
    rank_BxK = batch["rank_BxK"]
    pair_BxKxK = (valid_BxK[:, :, None] & valid_BxK[:, None, :]
                  & (rank_BxK[:, :, None] < rank_BxK[:, None, :])).astype(jnp.float32)  # [b, w, l]
    margin_BxKxK = reward_BxK[:, :, None] - reward_BxK[:, None, :]
    n_pairs_B = jnp.sum(pair_BxKxK, axis=(1, 2))
    pair_loss_B = jnp.sum(-jax.nn.log_sigmoid(margin_BxKxK) * pair_BxKxK, axis=(1, 2))
    has_pairs_B = (n_pairs_B > 0).astype(jnp.float32)
    valid_f = valid_BxK.astype(jnp.float32)
    mean_reward_B = jnp.sum(reward_BxK * valid_f, 1) / jnp.maximum(jnp.sum(valid_f, 1), 1.0)
    loss_B = (pair_loss_B / jnp.maximum(n_pairs_B, 1.0)
              + cfg.center_coef * jnp.square(mean_reward_B) * has_pairs_B)
    loss_sum = jnp.sum(loss_B)
    denominator = jnp.sum(has_pairs_B)
    # Identical responses get identical rewards: no preference to get right, so accuracy
    # leaves them out, as the labelers' agreement does.
    decided_BxKxK = pair_BxKxK * (margin_BxKxK != 0)
    return loss_sum, {
        "loss": pair(loss_sum, denominator),
        "accuracy": pair(jnp.sum((margin_BxKxK > 0) * pair_BxKxK), jnp.sum(decided_BxKxK)),
        "reward_mean": pair(jnp.sum(reward_BxK * valid_f), jnp.sum(valid_f)),
        "reward_margin": pair(jnp.sum(margin_BxKxK * pair_BxKxK), jnp.sum(n_pairs_B)),
        "tokens": pair(jnp.sum(segment_ids != 0), 1.0),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOLossConfig:
    """beta: strength of the implicit KL to the reference. label_smoothing eps: probability
    that a label is flipped (conservative DPO); 0 is plain DPO."""
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"dpo beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def dpo_sequence_logps(params, batch: Mapping[str, jax.Array], rng, *, apply
                       ) -> tuple[jax.Array, jax.Array]:
    """(chosen_logp_B, rejected_logp_B): sum over loss-mask tokens of log p(token | prefix),
    one forward pass over chosen and rejected stacked to [2B, T]. Used by `dpo_loss` and, with
    the reference params, to precompute ref_chosen_logp_B / ref_rejected_logp_B."""
    def both(name):
        return jnp.concatenate([batch[f"chosen_{name}_BxT"], batch[f"rejected_{name}_BxT"]], 0)

    tokens_2BxT = both("tokens")
    logits = apply(params, tokens_2BxT, both("positions"), both("segment_ids"), rng)
    logp_2BxT = rl_ops.response_logprobs(logits, tokens_2BxT, 1.0)
    seq_2B = rl_ops.masked_sum(logp_2BxT, both("loss_mask"), axis=-1)
    B = batch["chosen_tokens_BxT"].shape[0]
    return seq_2B[:B], seq_2B[B:]


def dpo_loss(params, batch: Mapping[str, jax.Array], rng, *, apply, cfg: DPOLossConfig
             ) -> tuple[jax.Array, Metrics]:
    """Direct preference optimisation (Rafailov et al. 2023) on comparison pairs.

    batch: chosen_{tokens,positions,segment_ids,loss_mask}_BxT and the same for rejected_
    (prompt + response + EOS, right-padded, both padded to the same T; loss_mask is 1 on the
    response tokens incl. EOS in target alignment), ref_chosen_logp_B, ref_rejected_logp_B.

        h_b      = (pi_c - ref_c) - (pi_r - ref_r)           (sequence log-prob sums)
        loss_b   = -(1 - eps) log sigmoid(beta h_b) - eps log sigmoid(-beta h_b)
        loss_sum = sum_b loss_b,   denominator = B (pairs)"""
    pi_c_B, pi_r_B = dpo_sequence_logps(params, batch, rng, apply=apply)
    reward_c_B = cfg.beta * (pi_c_B - batch["ref_chosen_logp_B"].astype(jnp.float32))
    reward_r_B = cfg.beta * (pi_r_B - batch["ref_rejected_logp_B"].astype(jnp.float32))
    logits_B = reward_c_B - reward_r_B
    eps = cfg.label_smoothing
    loss_B = -(1.0 - eps) * jax.nn.log_sigmoid(logits_B) - eps * jax.nn.log_sigmoid(-logits_B)
    loss_sum = jnp.sum(loss_B)
    n = jnp.asarray(loss_B.shape[0], jnp.float32)
    return loss_sum, {
        "loss": pair(loss_sum, n),
        "accuracy": pair(jnp.sum(logits_B > 0), n),
        "reward_chosen": pair(jnp.sum(reward_c_B), n),
        "reward_rejected": pair(jnp.sum(reward_r_B), n),
        "reward_margin": pair(jnp.sum(logits_B), n),
        "tokens": pair(jnp.sum(batch["chosen_segment_ids_BxT"] != 0)
                        + jnp.sum(batch["rejected_segment_ids_BxT"] != 0), 1.0),
    }


LOSSES: dict[str, tuple[LossFn, type]] = {
    "lm": (lm_loss, LMLossConfig),
    "reward_ranking": (reward_ranking_loss, RankingLossConfig),
    "dpo": (dpo_loss, DPOLossConfig),
}  # RL objectives: rl_losses.RL_LOSSES


def reduce_metrics(metrics: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """(sum, weight) pairs -> plain float means (host side)."""
    out = {}
    for name, (total, weight) in metrics.items():
        weight = float(weight)
        out[name] = float(total) / weight if weight else float("nan")
    return out
