"""RL rollouts: sample -> score -> rewards -> advantages (GAE, or an outcome estimator).

Everything here runs inside the one jitted RL iteration (instructjax/rlhf/ppo.py); the
host-side inputs are in rl_inputs.py.

Shape legend: B rollout batch, P prompt length (left-padded), N response length
(max_new_tokens), T = P + N, V vocabulary.

A rollout row is [prompt_BxP | response_BxN]: the prompt right-aligned (left padding,
segment 0), the response after it (tokens after the first EOS are padding, segment 0).
Segment ids are 1 on real tokens, so one forward pass over the row sees exactly what the
sampler saw; positions come from the mask (0, 1, ... over real tokens). Per-token arrays use
the TARGET alignment of instructjax.rl_ops: column t is about tokens[:, t] as the token being
predicted, so the response columns are P..T-1 and the first response token is scored from the
model outputs at the last prompt position.

Models (all deterministic: dropout is off in RL):
  policy    head='lm'      trainable, starts as the SFT model
  value     head='scalar'  trainable, starts as the reward model (incl. its scalar head);
                           absent for value-free algorithms (GRPO, RLOO: algorithms.py)
  reference head='lm'      frozen SFT params (KL penalty)
  reward    head='scalar'  frozen RM; the score is read from its per-token outputs as it
                           was trained (rl_ops.read_reward: 'eos' = at the last real token
                           of prompt + response, the EOS when produced; 'pooled' also
                           averages over the response's tokens)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from instructjax import rl_ops
from instructjax.config import REWARD_READS
from instructjax.losses import make_apply
from instructjax.model.transformer import Transformer
from instructjax.sampling import SamplingConfig, positions_from_mask, sample

# (reward_params, tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT) -> score_B
ScoreFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """max_new_tokens / temperature / top_p: the sampler (log-probs always come from the full
    tempered distribution). no_eos_penalty: the score given to responses without EOS within
    max_new_tokens (None: keep the RM score). gamma / lam: GAE. advantages: None = GAE with
    the value model; else an outcome estimator (reward_B, group_size) -> advantage_B over
    groups of group_size adjacent rows (algorithms.py). kl_in_reward: -beta * KL is part
    of the reward (per token for GAE, summed over the response for outcome estimators).
    reference_logprob_coef: adds this times the reference (SFT) policy's mean log-probability
    per response token to the score: the SFT model's own judgement of form and fluency,
    length-neutral (README: the demo's reward model is below chance there)."""
    max_new_tokens: int
    eos_id: int
    pad_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    no_eos_penalty: float | None = -1.0
    whiten_advantages: bool = True
    vocab_limit: int = 0  # the tokenizer's size when the model's vocabulary is larger
    advantages: Callable | None = None
    group_size: int = 1
    kl_in_reward: bool = True
    reference_logprob_coef: float = 0.0

    def __post_init__(self):
        if self.eos_id == self.pad_id:
            raise ValueError("PAD must differ from EOS (EOS is a real, scored token)")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, eos_id=self.eos_id,
                              pad_id=self.pad_id, temperature=self.temperature, top_p=self.top_p,
                              vocab_limit=self.vocab_limit)


@dataclasses.dataclass(frozen=True)
class RolloutModels:
    """The four models' modules. `score_fn` replaces the reward model's score (toy rewards
    in tests, programmatic rewards); None means `reward_model_score`, read as `reward_read`
    (the read the reward model was trained with: train.workdir.load_reward_read)."""
    policy: Transformer
    value: Transformer | None   # None: a value-free algorithm
    reward: Transformer | None  # None: score_fn scores without a model
    score_fn: ScoreFn | None = None
    reward_read: str = "eos"

    def __post_init__(self):
        if self.reward is None and self.score_fn is None:
            raise ValueError("RolloutModels: give a reward model or a score_fn")
        if self.policy.head != "lm" or any(m is not None and m.head != "scalar"
                                           for m in (self.value, self.reward)):
            raise ValueError("RolloutModels: the policy needs head='lm', the value and reward "
                             "models head='scalar'")
        if self.reward_read not in REWARD_READS:
            raise ValueError(f"reward_read must be one of {REWARD_READS}, got "
                             f"{self.reward_read!r}")

    def score(self, reward_params, tokens_BxT, positions_BxT, segment_ids_BxT,
              response_mask_BxT) -> jax.Array:
        if self.score_fn is not None:
            return self.score_fn(reward_params, tokens_BxT, positions_BxT, segment_ids_BxT,
                                 response_mask_BxT)
        return reward_model_score(make_apply(self.reward), reward_params, tokens_BxT,
                                  positions_BxT, segment_ids_BxT, response_mask_BxT,
                                  read=self.reward_read)


def reward_model_score(apply_rm, reward_params, tokens_BxT, positions_BxT, segment_ids_BxT,
                       response_mask_BxT=None, *, read: str = "eos") -> jax.Array:
    """score_B = rl_ops.read_reward of the RM's outputs: 'eos' = at the last real token
    (segment != 0) of each row, the EOS when the response ended, else its last sampled
    token; 'pooled' also averages over response_mask_BxT (1 on the response's tokens, EOS
    included). Works under left and right padding."""
    values_BxT = apply_rm(reward_params, tokens_BxT, positions_BxT, segment_ids_BxT, None)
    return rl_ops.read_reward(values_BxT.astype(jnp.float32), segment_ids_BxT != 0,
                              response_mask_BxT, read)


def assemble(prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN):
    """(tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT) of prompt + response."""
    tokens_BxT = jnp.concatenate([prompt_BxP, response_BxN], axis=1).astype(jnp.int32)
    segment_ids_BxT = jnp.concatenate([prompt_mask_BxP.astype(jnp.int32),
                                       (response_mask_BxN > 0).astype(jnp.int32)], axis=1)
    response_mask_BxT = jnp.concatenate([jnp.zeros(prompt_BxP.shape, jnp.float32),
                                         response_mask_BxN.astype(jnp.float32)], axis=1)
    return tokens_BxT, positions_from_mask(segment_ids_BxT), segment_ids_BxT, response_mask_BxT


def score_rollout(params, frozen, prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN,
                  ended_B, beta, *, models: RolloutModels, cfg: RolloutConfig
                  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Forward passes, rewards and advantages of given responses.

    params {'policy', 'value'} (trainable), frozen {'reference', 'reward'}. Returns
    (ppo_batch, stats): ppo_batch is exactly what the objective reads, all [B, T]; for
    GAE (rl_losses.ppo_loss):

      old_logprobs   log pi_old(tokens[t] | tokens[:t]) at the sampling temperature, from a
                     full forward pass (not the sampler's), target-aligned
      old_values     align_to_targets(value model output)
      rewards        r_t = -beta (log pi_old - log pi_ref)_t + s * [t = last response token],
                     s = RM score (+ reference_logprob_coef * mean_t log pi_ref), or
                     cfg.no_eos_penalty when the response has no EOS
      advantages     GAE(gamma, lam) over the response, whitened over all response tokens
      returns        GAE returns (value targets)

    With an outcome estimator (cfg.advantages; rl_losses.grpo_loss) there are no values
    or returns: the response's reward R_b = s_b (- beta * kl_b when cfg.kl_in_reward) gives
    advantage A_b = cfg.advantages(R, group_size)_b on each of its tokens, unwhitened, and
    the batch carries ref_logprobs (for a KL term in the loss) instead.

    stats are per-row / per-token diagnostics (score_B, penalised score_B, kl_B, ...)."""
    P = prompt_BxP.shape[1]
    tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT = assemble(
        prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN)
    mask_BxN = response_mask_BxN.astype(jnp.float32)
    policy_apply, value_apply = make_apply(models.policy), make_apply(models.value)

    def logprobs(apply, p):
        logits, first = rl_ops.response_logits(apply, p, tokens_BxT, positions_BxT,
                                               segment_ids_BxT, response_BxN.shape[1])
        return rl_ops.response_logprobs(logits, tokens_BxT, cfg.temperature,
                                        first_target=first) * response_mask_BxT

    logp_BxT = logprobs(policy_apply, params["policy"])
    ref_logp_BxT = logprobs(policy_apply, frozen["reference"])
    score_B = models.score(frozen["reward"], tokens_BxT, positions_BxT, segment_ids_BxT,
                           response_mask_BxT).astype(jnp.float32)
    logp_BxN, ref_logp_BxN = logp_BxT[:, P:], ref_logp_BxT[:, P:]
    if cfg.reference_logprob_coef:
        score_B = score_B + cfg.reference_logprob_coef * rl_ops.masked_mean(
            ref_logp_BxN, mask_BxN, axis=-1)
    reward_beta = beta if cfg.kl_in_reward else 0.0
    rewards_BxN, kl_B = rl_ops.per_token_rewards(score_B, logp_BxN, ref_logp_BxN, mask_BxN,
                                                 reward_beta, ended_B, cfg.no_eos_penalty)
    if cfg.advantages is None:  # GAE with the value model
        values_BxT = rl_ops.align_to_targets(
            value_apply(params["value"], tokens_BxT, positions_BxT, segment_ids_BxT, None)
            .astype(jnp.float32)) * response_mask_BxT
        values_BxN = values_BxT[:, P:]
        advantages_BxN, returns_BxN = rl_ops.gae(rewards_BxN, values_BxN, mask_BxN, cfg.gamma,
                                                 cfg.lam)
        raw_advantages_BxN = advantages_BxN
        if cfg.whiten_advantages:
            advantages_BxN = rl_ops.masked_whiten(advantages_BxN, mask_BxN)
    else:  # one outcome reward per response, compared within its group
        reward_B = jnp.sum(rewards_BxN, axis=-1)
        advantages_BxN = rl_ops.broadcast_to_tokens(cfg.advantages(reward_B, cfg.group_size),
                                                    mask_BxN)
        raw_advantages_BxN = advantages_BxN
        values_BxN = returns_BxN = jnp.zeros_like(mask_BxN)

    def to_T(x_BxN):
        return jnp.concatenate([jnp.zeros((x_BxN.shape[0], P), jnp.float32), x_BxN], axis=1)

    ppo_batch = {
        "tokens_BxT": tokens_BxT, "positions_BxT": positions_BxT,
        "segment_ids_BxT": segment_ids_BxT, "response_mask_BxT": response_mask_BxT,
        "old_logprobs_BxT": jax.lax.stop_gradient(logp_BxT),
        "advantages_BxT": jax.lax.stop_gradient(to_T(advantages_BxN)),
    }
    if cfg.advantages is None:
        ppo_batch["old_values_BxT"] = jax.lax.stop_gradient(values_BxT)
        ppo_batch["returns_BxT"] = jax.lax.stop_gradient(to_T(returns_BxN))
    else:
        ppo_batch["ref_logprobs_BxT"] = jax.lax.stop_gradient(ref_logp_BxT)
    penalised_B = score_B if cfg.no_eos_penalty is None else jnp.where(
        jnp.asarray(ended_B, bool), score_B, jnp.float32(cfg.no_eos_penalty))
    stats = {"score_B": score_B, "penalised_score_B": penalised_B, "kl_B": kl_B,
             "rewards_BxN": rewards_BxN, "values_BxN": values_BxN, "logprobs_BxN": logp_BxN,
             "ref_logprobs_BxN": ref_logp_BxN, "raw_advantages_BxN": raw_advantages_BxN,
             "returns_BxN": returns_BxN, "ended_B": jnp.asarray(ended_B, bool),
             "lengths_B": jnp.sum(mask_BxN, axis=-1)}
    return ppo_batch, stats


def repeat_groups(prompt_BxP, prompt_mask_BxP, group_size: int):
    """Each prompt group_size times, in adjacent rows (B = prompts * group_size)."""
    if group_size == 1:
        return prompt_BxP, prompt_mask_BxP
    return tuple(jnp.repeat(x, group_size, axis=0) for x in (prompt_BxP, prompt_mask_BxP))


def sample_responses(policy_params, prompt_BxP, prompt_mask_BxP, rng, *, models: RolloutModels,
                     cfg: RolloutConfig):
    """(prompts repeated into groups, their mask, the sampler's output: tokens_BxN, mask_BxN,
    logprobs_BxN, ended_B)."""
    prompt_BxP, prompt_mask_BxP = repeat_groups(prompt_BxP, prompt_mask_BxP, cfg.group_size)
    out = sample(policy_params, prompt_BxP, prompt_mask_BxP, rng, model=models.policy,
                 cfg=cfg.sampling)
    return prompt_BxP, prompt_mask_BxP, out


def rollout(params, frozen, prompt_BxP, prompt_mask_BxP, rng, beta, *, models: RolloutModels,
            cfg: RolloutConfig) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Samples group_size responses per left-padded prompt from the current policy, then
    `score_rollout`. stats also hold the sampler's own log-probs (`sampler_logprobs_BxN`),
    which must match the recomputed ones up to float error: a cheap check that the
    rollout row (positions, segments) is what the sampler saw."""
    prompt_BxP, prompt_mask_BxP, out = sample_responses(
        params["policy"], prompt_BxP, prompt_mask_BxP, rng, models=models, cfg=cfg)
    response_BxN = jax.lax.stop_gradient(out["tokens_BxN"])
    batch, stats = score_rollout(params, frozen, prompt_BxP, prompt_mask_BxP, response_BxN,
                                 out["mask_BxN"], out["ended_B"], beta, models=models, cfg=cfg)
    stats["sampler_logprobs_BxN"] = out["logprobs_BxN"]
    return batch, stats


def rollout_metrics(stats: dict[str, jax.Array], beta, kl_in_reward: bool = True
                    ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per-iteration rollout scalars as (value, 1) pairs (the train loop averages them over
    its logging window). The non-score reward is 0 when the KL is in the loss instead."""
    mask_BxN = (stats["lengths_B"][:, None] > jnp.arange(stats["rewards_BxN"].shape[1])
                ).astype(jnp.float32)
    one = jnp.ones((), jnp.float32)

    def mean(x):
        return jnp.mean(jnp.asarray(x, jnp.float32)), one

    def token_mean(x):
        return rl_ops.masked_mean(x, mask_BxN), one

    kl_BxN = (stats["logprobs_BxN"] - stats["ref_logprobs_BxN"]) * mask_BxN
    mismatch = jnp.max(jnp.abs(stats["sampler_logprobs_BxN"] - stats["logprobs_BxN"]) * mask_BxN) \
        if "sampler_logprobs_BxN" in stats else jnp.zeros((), jnp.float32)
    return {
        "rollout/score": mean(stats["score_B"]),
        "rollout/score_penalised": mean(stats["penalised_score_B"]),
        "rollout/kl": mean(stats["kl_B"]),
        "rollout/kl_k3": mean(rl_ops.masked_sum(rl_ops.kl_k3(stats["logprobs_BxN"],
                                                             stats["ref_logprobs_BxN"]),
                                                mask_BxN, axis=-1)),
        "rollout/kl_per_token_max": (jnp.max(kl_BxN), one),
        "rollout/nonscore_reward": mean(-jnp.asarray(beta if kl_in_reward else 0.0,
                                                     jnp.float32) * stats["kl_B"]),
        "rollout/beta": (jnp.asarray(beta, jnp.float32), one),
        "rollout/response_length": mean(stats["lengths_B"]),
        "rollout/ended": mean(stats["ended_B"]),
        "rollout/value": token_mean(stats["values_BxN"]),
        "rollout/return": token_mean(stats["returns_BxN"]),
        "rollout/advantage_raw": token_mean(stats["raw_advantages_BxN"]),
        "rollout/logprob": token_mean(stats["logprobs_BxN"]),
        "rollout/sampler_logprob_mismatch": (mismatch, one),
    }
