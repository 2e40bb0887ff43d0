"""A PPO / PPO-ptx run: models loaded from earlier stages, the generic train loop around
the jitted iteration of `ppo.py`, checkpoints whose `params` are the policy."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from instructjax import parallel
from instructjax.config import ConfigError
from instructjax.data.jsonl import read_jsonl
from instructjax.data.tokenizer import Tokenizer
from instructjax.losses import reduce_metrics
from instructjax.model.config import ModelConfig
from instructjax.model.transformer import Transformer
from instructjax.rlhf import rollout as rollout_lib
from instructjax.rlhf.ppo import (VALUE_MODEL_CONFIG_FILE, PPOConfig, abstract_ppo_state,
                                  init_ppo_state, make_optimizer, make_ppo_iteration,
                                  rl_model_config)
from instructjax.train import checkpoint as ckpt_lib, loop, state as state_lib
from instructjax.train import workdir as wd
from instructjax.train.metrics import MetricsWriter


def load_value_model(workdir: str | Path, mesh: Mesh):
    """(value model, value params) of a PPO workdir's latest checkpoint."""
    model = Transformer(wd.load_model_config(workdir, VALUE_MODEL_CONFIG_FILE), head="scalar")
    abstract, _ = state_lib.abstract_params(model, mesh)
    return model, ckpt_lib.restore_params(workdir, abstract, field="value_params")


def rollout_models(policy: Transformer, value: Transformer, reward_from: str | Path
                   ) -> rollout_lib.RolloutModels:
    """The rollout's models: the value model's module also runs the frozen reward model,
    whose score is read as it was trained (the read recorded in `reward_from`); the value
    model itself stays per-token."""
    return rollout_lib.RolloutModels(policy=policy, value=value, reward=value,
                                     reward_read=wd.load_reward_read(reward_from))


class PPOMetricsWriter(MetricsWriter):
    """The standard writer, plus a second progress line with the RL quantities."""

    RL_KEYS = ("rollout/score", "rollout/gold_score", "rollout/kl", "rollout/beta", "rollout/response_length",
               "rollout/ended", "policy_loss", "value_loss", "clipfrac", "approx_kl", "ptx_loss")

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        super().progress(step, metrics)
        shown = "  ".join(f"{k.rsplit('/', 1)[-1]}={metrics['train/' + k]:.4g}"
                          for k in self.RL_KEYS if "train/" + k in metrics)
        if self.enabled and shown:
            logging.info("    %s", shown)


def _host_array(x) -> np.ndarray:
    """The whole global array on this host (all processes must call this together)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class GoldRollouts:
    """The gold reward of each iteration's rollouts, for the KL-vs-reward frontier (proxy
    RM score and gold score against KL show over-optimisation). Each rollout row carries its
    prompt's line in the prompt file (rollout.EncodePrompt); rows whose record has no task
    metadata (kind, answer: user prompt files) are skipped, and without any the scorer is
    off. Responses are decoded as generate() does (cut before the EOS)."""

    def __init__(self, prompt_file: str | Path | None, tokenizer: Tokenizer):
        self.tokenizer, self.tasks = tokenizer, {}
        if prompt_file:
            self.tasks = {line: r for line, r in read_jsonl(prompt_file, required={"prompt": str})
                          if isinstance(r.get("kind"), str) and isinstance(r.get("answer"), str)}
        if not self.tasks:
            logging.info("rollout/gold_score is off: %s has no task metadata (kind, answer)",
                         prompt_file or "the prompt source")

    def metrics(self, prompt_line_B, responses) -> dict[str, tuple[float, float]]:
        """{'rollout/gold_score', 'rollout/gold_correct'}: (sum, rows scored)."""
        from instructjax.data import world
        if not self.tasks:
            return {}
        lines = _host_array(prompt_line_B)
        tokens, lengths, ended = (_host_array(responses[k])
                                  for k in ("tokens_BxN", "lengths_B", "ended_B"))
        score = correct = count = 0.0
        for i, line in enumerate(lines.tolist()):
            task = self.tasks.get(line)
            if task is None:
                continue
            ids = tokens[i, :max(int(lengths[i]) - int(bool(ended[i])), 0)].tolist()
            text = self.tokenizer.decode(ids)
            score += world.gold_score(task, text)
            correct += world.judge(task, text)["correct"]
            count += 1
        if not count:
            return {}
        return {"rollout/gold_score": (score, count), "rollout/gold_correct": (correct, count)}


def _check_sizes(cfg: PPOConfig, mesh: Mesh, policy_cfg: ModelConfig, value_cfg: ModelConfig,
                 tokenizer: Tokenizer) -> None:
    dp = parallel.data_parallel_size(mesh)
    if cfg.rollout_batch_size % dp:
        raise ConfigError(f"--rollout_batch_size ({cfg.rollout_batch_size}) must be divisible "
                          f"by the data-parallel size {dp} of --mesh={cfg.mesh}")
    ptx_rows = cfg.num_updates * cfg.ptx_batch_size
    if cfg.use_ptx and ptx_rows % dp:
        raise ConfigError(f"the pretraining rows per iteration (ppo_epochs * num_minibatches * "
                          f"--ptx_batch_size = {ptx_rows}) must be divisible by the "
                          f"data-parallel size {dp}")
    for what, rows in (("minibatch (--rollout_batch_size / --num_minibatches)", cfg.minibatch_size),
                       ("--ptx_batch_size", cfg.ptx_batch_size if cfg.use_ptx else 0)):
        if rows % dp:
            logging.warning("the %s of %d rows does not divide over the data-parallel size %d: "
                            "every device computes all of its rows", what, rows, dp)
    for name, mcfg in (("--policy_from", policy_cfg), ("--reward_from", value_cfg)):
        if cfg.seq_len > mcfg.max_len:
            raise ConfigError(f"--max_prompt_len + --max_new_tokens ({cfg.seq_len}) exceeds the "
                              f"max_len {mcfg.max_len} of the {name} model")
        if tokenizer.vocab_size > mcfg.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"{name} model's vocab_size is {mcfg.vocab_size}")
    if cfg.use_ptx and cfg.ptx_seq_len > policy_cfg.max_len:
        raise ConfigError(f"--ptx_seq_len ({cfg.ptx_seq_len}) exceeds the policy's max_len "
                          f"{policy_cfg.max_len}")


def _same_tokenizer(cfg: PPOConfig) -> None:
    mine = wd.tokenizer_of(cfg.policy_from, "--policy_from")
    theirs = wd.tokenizer_of(cfg.reward_from, "--reward_from")
    if mine.read_bytes() != theirs.read_bytes():
        raise ConfigError(f"--policy_from and --reward_from use different tokenizers ({mine} vs "
                          f"{theirs}); the reward model must read the policy's tokens")


def train_ppo(cfg: PPOConfig, argv: list[str] = ()) -> dict[str, float]:
    """Runs (or resumes) PPO / PPO-ptx; returns the last iteration's metrics."""
    wd.require_role(cfg.policy_from, "lm", "--policy_from")
    wd.require_role(cfg.reward_from, "reward", "--reward_from")
    _same_tokenizer(cfg)
    policy_cfg = wd.load_model_config(cfg.policy_from)
    value_cfg = wd.load_model_config(cfg.reward_from)
    mesh = parallel.make_mesh(cfg.mesh)
    tokenizer = Tokenizer.load(Path(cfg.policy_from) / wd.TOKENIZER_FILE)
    _check_sizes(cfg, mesh, policy_cfg, value_cfg, tokenizer)
    reward_read = wd.load_reward_read(cfg.reward_from)
    files = {wd.MODEL_CONFIG_FILE: dataclasses.asdict(policy_cfg),
             VALUE_MODEL_CONFIG_FILE: dataclasses.asdict(value_cfg)}
    with wd.open_run(cfg.workdir, cfg, argv, total_steps=cfg.iterations, files=files,
                     allow_config_change=cfg.allow_config_change,
                     record_extra={"reward_read": reward_read}) as run:
        wd.copy_tokenizer(cfg.policy_from, cfg.workdir, "--policy_from")
        return _train(cfg, run, mesh, tokenizer, policy_cfg, value_cfg)


def _train(cfg: PPOConfig, run: wd.Run, mesh: Mesh, tokenizer: Tokenizer,
           policy_cfg: ModelConfig, value_cfg: ModelConfig) -> dict[str, float]:
    inputs = rollout_lib.make_inputs(cfg, tokenizer)
    policy = Transformer(rl_model_config(policy_cfg, compute_dtype=cfg.compute_dtype,
                                         remat=cfg.remat))
    value = Transformer(rl_model_config(value_cfg, compute_dtype=cfg.compute_dtype,
                                        remat=cfg.remat), head="scalar")
    models = rollout_models(policy, value, cfg.reward_from)
    # Never sample an id the tokenizer cannot decode (a model sized above its tokenizer).
    limit = tokenizer.vocab_size if tokenizer.vocab_size < policy_cfg.vocab_size else 0
    rollout_cfg = cfg.rollout_config(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                     vocab_limit=limit)
    tx, schedule = make_optimizer(cfg)
    abstract, shardings = abstract_ppo_state(policy, value, tx, mesh, cfg.init_kl_coef)
    # Each restore makes new buffers: the donated state never aliases the frozen params.
    frozen = {"reference": ckpt_lib.restore_params(cfg.policy_from, abstract.params),
              "reward": ckpt_lib.restore_params(cfg.reward_from, abstract.value_params)}
    frozen_shardings = {"reference": shardings.params, "reward": shardings.value_params}

    def fresh_state():
        logging.info("starting PPO from policy %s and reward model %s (read: %s)",
                     cfg.policy_from, cfg.reward_from, models.reward_read)
        return init_ppo_state(ckpt_lib.restore_params(cfg.policy_from, abstract.params),
                              ckpt_lib.restore_params(cfg.reward_from, abstract.value_params),
                              tx, shardings, mesh, cfg.init_kl_coef)

    checkpointer = ckpt_lib.Checkpointer(Path(cfg.workdir) / "checkpoints",
                                         keep=cfg.keep_checkpoints)
    state = loop.resume_or_init(checkpointer, abstract, fresh_state, inputs)
    iteration = make_ppo_iteration(cfg, models=models, rollout_cfg=rollout_cfg, tx=tx,
                                   schedule=schedule, mesh=mesh, state_shardings=shardings,
                                   frozen_shardings=frozen_shardings, return_responses=True)
    gold = GoldRollouts(inputs.prompt_file, tokenizer)
    last: dict[str, Any] = {}

    def train_step(state, batch, base_rng):
        state, metrics, responses = iteration(state, frozen, batch, base_rng)
        metrics = dict(metrics, **gold.metrics(batch["prompt_line"], responses))
        last["metrics"] = metrics
        return state, metrics

    writer = PPOMetricsWriter(cfg.workdir, total_steps=cfg.iterations)
    seed_key = jax.random.key(cfg.seed)
    try:
        state = loop.train_loop(state, cfg=cfg.loop_config(), train_step=train_step,
                                base_rng=jax.random.fold_in(seed_key, 2), data_iter=inputs,
                                mesh=mesh, checkpointer=checkpointer, writer=writer)
    finally:
        writer.close()
        checkpointer.close()
    final = {f"train/{k}": v for k, v in
             reduce_metrics(jax.device_get(last.get("metrics", {}))).items()}
    run.finish(int(state.step), final)
    return final
