"""PPO rollouts (sample -> score -> rewards -> GAE) and the prompt / pretraining-mix inputs.

Everything here runs inside the one jitted PPO iteration (instructjax/rlhf/ppo.py), except
the host-side data iterators at the bottom.

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
  value     head='scalar'  trainable, starts as the reward model (incl. its scalar head)
  reference head='lm'      frozen SFT params (KL penalty)
  reward    head='scalar'  frozen RM; the score is read from its per-token outputs as it
                           was trained (rl_ops.read_reward: 'eos' = at the last real token
                           of prompt + response, the EOS when produced; 'pooled' also
                           averages over the response's tokens)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from instructjax import rl_ops
from instructjax.config import REWARD_READS
from instructjax.data import builders, pipeline, shards
from instructjax.data.jsonl import DataError
from instructjax.data.tokenizer import Tokenizer
from instructjax.losses import make_apply
from instructjax.model.transformer import Transformer
from instructjax.sampling import SamplingConfig, positions_from_mask, sample

# (reward_params, tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT) -> score_B
ScoreFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """max_new_tokens / temperature / top_p: the sampler (log-probs always come from the full
    tempered distribution). no_eos_penalty: the score given to responses without EOS within
    max_new_tokens (None: keep the RM score). gamma / lam: GAE."""
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
    value: Transformer
    reward: Transformer
    score_fn: ScoreFn | None = None
    reward_read: str = "eos"

    def __post_init__(self):
        if self.policy.head != "lm" or self.value.head != "scalar" or self.reward.head != "scalar":
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
    (ppo_batch, stats): ppo_batch is exactly what rl_losses.ppo_loss reads, all [B, T]:

      old_logprobs   log pi_old(tokens[t] | tokens[:t]) at the sampling temperature, from a
                     full forward pass (not the sampler's), target-aligned
      old_values     align_to_targets(value model output)
      rewards        r_t = -beta (log pi_old - log pi_ref)_t + s * [t = last response token],
                     s = RM score, or cfg.no_eos_penalty when the response has no EOS
      advantages     GAE(gamma, lam) over the response, whitened over all response tokens
      returns        GAE returns (value targets)

    stats are per-row / per-token diagnostics (score_B, penalised score_B, kl_B, ...)."""
    P = prompt_BxP.shape[1]
    tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT = assemble(
        prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN)
    mask_BxN = response_mask_BxN.astype(jnp.float32)
    policy_apply, value_apply = make_apply(models.policy), make_apply(models.value)

    def logprobs(apply, p):
        logits_BxTxV = apply(p, tokens_BxT, positions_BxT, segment_ids_BxT, None)
        return rl_ops.response_logprobs(logits_BxTxV, tokens_BxT, cfg.temperature) \
            * response_mask_BxT

    logp_BxT = logprobs(policy_apply, params["policy"])
    ref_logp_BxT = logprobs(policy_apply, frozen["reference"])
    values_BxT = rl_ops.align_to_targets(
        value_apply(params["value"], tokens_BxT, positions_BxT, segment_ids_BxT, None)
        .astype(jnp.float32)) * response_mask_BxT
    score_B = models.score(frozen["reward"], tokens_BxT, positions_BxT, segment_ids_BxT,
                           response_mask_BxT).astype(jnp.float32)

    logp_BxN, ref_logp_BxN, values_BxN = (x[:, P:] for x in (logp_BxT, ref_logp_BxT, values_BxT))
    rewards_BxN, kl_B = rl_ops.per_token_rewards(score_B, logp_BxN, ref_logp_BxN, mask_BxN, beta,
                                                 ended_B, cfg.no_eos_penalty)
    advantages_BxN, returns_BxN = rl_ops.gae(rewards_BxN, values_BxN, mask_BxN, cfg.gamma,
                                             cfg.lam)
    raw_advantages_BxN = advantages_BxN
    if cfg.whiten_advantages:
        advantages_BxN = rl_ops.masked_whiten(advantages_BxN, mask_BxN)

    def to_T(x_BxN):
        return jnp.concatenate([jnp.zeros((x_BxN.shape[0], P), jnp.float32), x_BxN], axis=1)

    ppo_batch = {
        "tokens_BxT": tokens_BxT, "positions_BxT": positions_BxT,
        "segment_ids_BxT": segment_ids_BxT, "response_mask_BxT": response_mask_BxT,
        "old_logprobs_BxT": jax.lax.stop_gradient(logp_BxT),
        "old_values_BxT": jax.lax.stop_gradient(values_BxT),
        "advantages_BxT": jax.lax.stop_gradient(to_T(advantages_BxN)),
        "returns_BxT": jax.lax.stop_gradient(to_T(returns_BxN)),
    }
    penalised_B = score_B if cfg.no_eos_penalty is None else jnp.where(
        jnp.asarray(ended_B, bool), score_B, jnp.float32(cfg.no_eos_penalty))
    stats = {"score_B": score_B, "penalised_score_B": penalised_B, "kl_B": kl_B,
             "rewards_BxN": rewards_BxN, "values_BxN": values_BxN, "logprobs_BxN": logp_BxN,
             "ref_logprobs_BxN": ref_logp_BxN, "raw_advantages_BxN": raw_advantages_BxN,
             "returns_BxN": returns_BxN, "ended_B": jnp.asarray(ended_B, bool),
             "lengths_B": jnp.sum(mask_BxN, axis=-1)}
    return ppo_batch, stats


def rollout(params, frozen, prompt_BxP, prompt_mask_BxP, rng, beta, *, models: RolloutModels,
            cfg: RolloutConfig) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Samples one response per left-padded prompt from the current policy, then
    `score_rollout`. stats also hold the sampler's own log-probs (`sampler_logprobs_BxN`),
    which must match the recomputed ones up to float error: a cheap check that the
    rollout row (positions, segments) is what the sampler saw."""
    out = sample(params["policy"], prompt_BxP, prompt_mask_BxP, rng, model=models.policy,
                 cfg=cfg.sampling)
    response_BxN = jax.lax.stop_gradient(out["tokens_BxN"])
    batch, stats = score_rollout(params, frozen, prompt_BxP, prompt_mask_BxP, response_BxN,
                                 out["mask_BxN"], out["ended_B"], beta, models=models, cfg=cfg)
    stats["sampler_logprobs_BxN"] = out["logprobs_BxN"]
    return batch, stats


def rollout_metrics(stats: dict[str, jax.Array], beta) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per-iteration rollout scalars as (value, 1) pairs (the train loop averages them over
    its logging window)."""
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
        "rollout/nonscore_reward": mean(-jnp.asarray(beta, jnp.float32) * stats["kl_B"]),
        "rollout/beta": (jnp.asarray(beta, jnp.float32), one),
        "rollout/response_length": mean(stats["lengths_B"]),
        "rollout/ended": mean(stats["ended_B"]),
        "rollout/value": token_mean(stats["values_BxN"]),
        "rollout/return": token_mean(stats["returns_BxN"]),
        "rollout/advantage_raw": token_mean(stats["raw_advantages_BxN"]),
        "rollout/logprob": token_mean(stats["logprobs_BxN"]),
        "rollout/sampler_logprob_mismatch": (mismatch, one),
    }


# ============================================================================ host-side inputs

class EncodePrompt:
    """{'prompt'} -> left-padded prompt_tokens [P] int32 and prompt_mask [P] int32.

    Prompts longer than P keep their LAST P tokens (the end of a prompt is what the response
    continues); `prompt_truncated` marks them. `prompt_line` is the record's line in its
    JSONL file (from the tfds source's "origin" field; -1 when unknown), so the host can
    find the task behind each rollout row (ppo_run's gold score). Loads the tokenizer lazily
    from its path, so instances pickle to grain worker processes."""

    def __init__(self, tokenizer_path, max_prompt_len: int):
        self.tokenizer_path, self.max_prompt_len = str(tokenizer_path), max_prompt_len
        self._tokenizer = None

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "max_prompt_len": self.max_prompt_len,
                "_tokenizer": None}

    def __call__(self, record):
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        ids = self._tokenizer.encode(record["prompt"])
        if not ids:
            raise DataError(f"{record.get('origin', '<input>')}: empty prompt; the policy needs "
                            "at least one prompt token to condition on")
        P = self.max_prompt_len
        kept = ids[-P:]
        tokens = np.full(P, self._tokenizer.pad_id, np.int32)
        mask = np.zeros(P, np.int32)
        tokens[P - len(kept):], mask[P - len(kept):] = kept, 1
        line = str(record.get("origin", "")).rsplit(":", 1)[-1]
        return {"prompt_tokens": tokens, "prompt_mask": mask,
                "prompt_truncated": np.int32(len(ids) > P),
                "prompt_line": np.int32(int(line) if line.isdigit() else -1)}


def prompt_dataset(source, tokenizer: Tokenizer, *, max_prompt_len: int, batch_size: int,
                   seed: int, shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """Endless, seeded-shuffled batches of left-padded prompts (keys prompt_tokens,
    prompt_mask, prompt_truncated; [batch_size, P]). `source`: any random-access sequence of
    {'prompt': str} records (a tfds source from builders.jsonl_data_source kind 'prompt', or
    a list). Checkpointable through the iterator's get_state/set_state."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"{source!r}: shard {shard_index} of {shard_count} has no prompts")
    ds = ds.shuffle(seed=seed).repeat(None).map(EncodePrompt(tokenizer.path, max_prompt_len))
    return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


class PPOInputs:
    """One PPO iteration's host batch: the prompts and, for PPO-ptx, the pretraining rows of
    all its updates, as ONE flat dict of numpy arrays (parallel.global_batch shards the
    leading dim of every entry):

      prompt_tokens, prompt_mask    [B, P]
      prompt_line                   [B] line of each prompt in `prompt_file` (-1 unknown)
      ptx_<key>                     [U * ptx_batch, T_ptx] for each lm_dataset key (inputs,
                                    targets, positions, segment_ids, loss_mask); update u
                                    uses rows u::U (see ppo.split_ptx)

    get_state/set_state combine both iterators' (JSON) states, so a resumed run reads the
    same data as an uninterrupted one."""

    def __init__(self, prompts, ptx=None, prompt_file: str | None = None):
        self.prompts, self.ptx, self.prompt_file = prompts, ptx, prompt_file

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = {k: v for k, v in next(self.prompts).items() if k != "prompt_truncated"}
        if self.ptx is not None:
            batch.update({f"ptx_{k}": v for k, v in next(self.ptx).items()})
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"prompts": self.prompts.get_state(),
                "ptx": None if self.ptx is None else self.ptx.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None:
            if state.get("ptx") is None:
                raise ValueError("the checkpoint has no pretraining-data position: it was "
                                 "written by a run without ptx (--gamma_ptx=0)")
            self.ptx.set_state(state["ptx"])


def _input_files(cfg) -> tuple[str, str]:
    """(prompt JSONL, pretraining JSONL): the flags, else the embedded world's files."""
    prompt_file, ptx_file = cfg.prompt_file, cfg.ptx_file
    if not prompt_file or (cfg.use_ptx and not ptx_file):
        from instructjax.train.run import world_files
        files = world_files(cfg.data)
        prompt_file = prompt_file or str(files["prompts_train"])
        ptx_file = ptx_file or str(files["pretrain_train"])
    return prompt_file, ptx_file


def make_inputs(cfg, tokenizer: Tokenizer) -> PPOInputs:
    """This host's PPOInputs for a ppo.PPOConfig: the prompt file (and the pretraining file
    for PPO-ptx) through tfds sources and grain, each host reading its own shard."""
    prompt_file, ptx_file = _input_files(cfg)
    tfds_dir = Path(cfg.data.data_dir) / "tfds"
    num_shards = shards.resolve(cfg.data.data_shards)
    prompts = builders.jsonl_data_source({"train": prompt_file}, kind="prompt",
                                         data_dir=tfds_dir)["train"]
    per_shard = shards.split_rows(cfg.rollout_batch_size, num_shards, "--rollout_batch_size")
    prompt_iter = shards.ShardedIterator(
        lambda s: prompt_dataset(prompts, tokenizer, max_prompt_len=cfg.max_prompt_len,
                                 batch_size=per_shard, seed=cfg.seed, shard_index=s,
                                 shard_count=num_shards), num_shards)
    ptx_iter = None
    if cfg.use_ptx:
        texts = builders.jsonl_data_source({"train": ptx_file}, kind="text",
                                           data_dir=tfds_dir)["train"]
        rows = shards.split_rows(cfg.num_updates * cfg.ptx_batch_size, num_shards,
                                 "the pretraining rows per iteration (ppo_epochs * "
                                 "num_minibatches * --ptx_batch_size)")
        ptx_iter = shards.ShardedIterator(
            lambda s: pipeline.lm_dataset(texts, tokenizer, seq_len=cfg.ptx_seq_len,
                                          batch_size=rows, seed=cfg.seed + 1, shard_index=s,
                                          shard_count=num_shards), num_shards)
    return PPOInputs(prompt_iter, ptx_iter, prompt_file=prompt_file)
