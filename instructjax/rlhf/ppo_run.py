"""An RL run (PPO / PPO-ptx / GRPO / RLOO): models loaded from earlier stages, the generic
train loop around the jitted iteration of `ppo.py` (or its two halves around the sandbox
for execution rewards), checkpoints whose `params` are the policy."""

from __future__ import annotations

import contextlib
import dataclasses
import time
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
from instructjax.rlhf import rl_inputs, rollout as rollout_lib
from instructjax.rlhf.execution_reward import ExecutionReward, given_score
from instructjax.rlhf.ppo import VALUE_MODEL_CONFIG_FILE, PPOConfig, rl_model_config
from instructjax.rlhf.rl_program import build_rl_program
from instructjax.train import checkpoint as ckpt_lib, stage as stage_lib, state as state_lib
from instructjax.train import workdir as wd
from instructjax.train.metrics import MetricsWriter


def load_value_model(workdir: str | Path, mesh: Mesh):
    """(value model, value params) of a PPO workdir's latest checkpoint."""
    model = Transformer(wd.load_model_config(workdir, VALUE_MODEL_CONFIG_FILE), head="scalar")
    abstract, _ = state_lib.abstract_params(model, mesh)
    return model, ckpt_lib.restore_params(workdir, abstract, field="value_params")


def rollout_models(policy: Transformer, value: Transformer | None, reward: Transformer,
                   reward_from: str | Path) -> rollout_lib.RolloutModels:
    """The rollout's models: the frozen reward model's score is read as it was trained (the
    read recorded in `reward_from`); the value model (None for value-free algorithms) stays
    per-token. Both are the reward model's architecture."""
    return rollout_lib.RolloutModels(policy=policy, value=value, reward=reward,
                                     reward_read=wd.load_reward_read(reward_from))


class PPOMetricsWriter(MetricsWriter):
    """The standard writer, plus a second progress line with the RL quantities."""

    RL_KEYS = ("rollout/score", "rollout/gold_score", "rollout/kl", "rollout/beta",
               "rollout/response_length", "rollout/ended", "policy_loss", "value_loss",
               "clipfrac", "approx_kl", "ptx_loss", "exec/passed", "exec/timeout",
               "time/sample", "time/sandbox", "time/learn")

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
    prompt's line in the prompt file (rl_inputs.EncodePrompt); rows whose record has no task
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

    def metrics(self, prompt_line_P, responses, group_size: int = 1
                ) -> dict[str, tuple[float, float]]:
        """{'rollout/gold_score', 'rollout/gold_correct'}: (sum, rows scored). Response rows
        come in groups of group_size per prompt."""
        from instructjax.data import world
        if not self.tasks:
            return {}
        lines = np.repeat(_host_array(prompt_line_P), group_size)
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


def _check_sizes(cfg: PPOConfig, mesh: Mesh, policy_cfg: ModelConfig,
                 value_cfg: ModelConfig | None, tokenizer: Tokenizer) -> None:
    dp = parallel.data_parallel_size(mesh)
    if cfg.prompts_per_iteration % dp:
        raise ConfigError(f"the prompts per iteration (--rollout_batch_size / --group_size = "
                          f"{cfg.prompts_per_iteration}) must be divisible by the "
                          f"data-parallel size {dp} of --mesh={cfg.mesh}")
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
    for name, mcfg in (("--init_from", policy_cfg), ("--reward_from", value_cfg)):
        if mcfg is None:  # no reward model
            continue
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
    mine = wd.tokenizer_of(cfg.policy_from, "--init_from")
    theirs = wd.tokenizer_of(cfg.reward_from, "--reward_from")
    if mine.read_bytes() != theirs.read_bytes():
        raise ConfigError(f"--init_from and --reward_from use different tokenizers ({mine} vs "
                          f"{theirs}); the reward model must read the policy's tokens")


def train_ppo(cfg: PPOConfig, argv: list[str] = ()) -> dict[str, float]:
    """Runs (or resumes) an RL run (PPO / PPO-ptx / GRPO / RLOO, reward from a reward model
    or from execution); returns the last iteration's metrics."""
    cfg.check_run_paths()
    wd.require_role(cfg.policy_from, "lm", "--init_from")
    policy_cfg = wd.load_model_config(cfg.policy_from)
    value_cfg, extra = None, {}
    if cfg.reward == "model":
        wd.require_role(cfg.reward_from, "reward", "--reward_from")
        _same_tokenizer(cfg)
        value_cfg = wd.load_model_config(cfg.reward_from)
        extra["reward_read"] = wd.load_reward_read(cfg.reward_from)
    elif jax.process_count() > 1:
        raise ConfigError("--reward=execution runs in one process for now (the sandbox scores "
                          "the whole batch on this host)")
    mesh = parallel.make_mesh(cfg.mesh)
    tokenizer = Tokenizer.load(Path(cfg.policy_from) / wd.TOKENIZER_FILE)
    _check_sizes(cfg, mesh, policy_cfg, value_cfg, tokenizer)
    files = {wd.MODEL_CONFIG_FILE: dataclasses.asdict(policy_cfg)}
    if cfg.algo.uses_value_model:
        files[VALUE_MODEL_CONFIG_FILE] = dataclasses.asdict(value_cfg)
    with wd.open_run(cfg.workdir, cfg, argv, total_steps=cfg.iterations, files=files,
                     allow_config_change=cfg.allow_config_change, record_extra=extra) as run:
        wd.copy_tokenizer(cfg.policy_from, cfg.workdir, "--init_from")
        return _train(cfg, run, mesh, tokenizer, policy_cfg, value_cfg)


def _train(cfg: PPOConfig, run: wd.Run, mesh: Mesh, tokenizer: Tokenizer,
           policy_cfg: ModelConfig, value_cfg: ModelConfig | None) -> dict[str, float]:
    with contextlib.ExitStack() as resources:  # the sandbox's workers, for execution rewards
        stage = rl_stage(cfg, mesh, tokenizer, policy_cfg, value_cfg, resources)
        return stage_lib.run_stage(run, stage, loop_cfg=cfg.loop_config(), mesh=mesh)


def rl_stage(cfg: PPOConfig, mesh: Mesh, tokenizer: Tokenizer, policy_cfg: ModelConfig,
             value_cfg: ModelConfig | None, resources: contextlib.ExitStack) -> stage_lib.Stage:
    """The parts of an RL run: the frozen reference (and reward model), the program of
    rl_program.py (one jitted iteration, or two halves around the sandbox), and the last
    iteration's metrics as the final record."""
    inputs = rl_inputs.make_inputs(cfg, tokenizer)
    policy = Transformer(rl_model_config(policy_cfg, compute_dtype=cfg.compute_dtype,
                                         remat=cfg.remat))
    # The reward model's module also runs the value model (initialised from it).
    scalar = None if value_cfg is None else Transformer(
        rl_model_config(value_cfg, compute_dtype=cfg.compute_dtype, remat=cfg.remat),
        head="scalar")
    value = scalar if cfg.algo.uses_value_model else None
    models = (rollout_models(policy, value, scalar, cfg.reward_from) if scalar is not None else
              rollout_lib.RolloutModels(policy=policy, value=None, reward=None,
                                        score_fn=given_score))
    # Never sample an id the tokenizer cannot decode (a model sized above its tokenizer).
    limit = tokenizer.vocab_size if tokenizer.vocab_size < policy_cfg.vocab_size else 0
    program = build_rl_program(cfg, models, mesh, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, vocab_limit=limit)
    # Each restore makes new buffers: the donated state never aliases the frozen params.
    frozen = {name: ckpt_lib.restore_params(source, program.abstract_frozen[name])
              for name, source in (("reference", cfg.policy_from), ("reward", cfg.reward_from))
              if name in program.abstract_frozen}

    def fresh_state(init_key):
        logging.info("starting %s from policy %s, reward: %s", cfg.algorithm, cfg.policy_from,
                     f"{cfg.reward_from} (read: {models.reward_read})" if scalar is not None
                     else f"execution of {cfg.prompt_file}")
        value_params = (ckpt_lib.restore_params(cfg.reward_from, program.abstract_frozen["reward"])
                        if value is not None else {})
        return program.init_state(
            ckpt_lib.restore_params(cfg.policy_from, program.abstract_state.params), value_params)

    last: dict[str, Any] = {}
    if scalar is not None:
        iteration = program.iteration(return_responses=True)
        gold = GoldRollouts(inputs.prompt_file, tokenizer)

        def train_step(state, batch, base_rng):
            state, metrics, responses = iteration(state, frozen, batch, base_rng)
            metrics = dict(metrics, **gold.metrics(batch["prompt_line"], responses,
                                                   cfg.group_size))
            last["metrics"] = metrics
            return state, metrics
    else:
        scorer = resources.enter_context(ExecutionReward(inputs.prompt_file, tokenizer,
                                                         cfg.execution))
        train_step = _host_scored_step(cfg, mesh, scorer, frozen["reference"], last,
                                       program.host_scored())

    def final_metrics(state):
        return {f"train/{k}": v for k, v in
                reduce_metrics(jax.device_get(last.get("metrics", {}))).items()}

    return stage_lib.Stage(abstract_state=program.abstract_state, fresh_state=fresh_state,
                           data_iter=inputs, train_step=train_step, writer=PPOMetricsWriter,
                           final_metrics=final_metrics)


def _host_scored_step(cfg: PPOConfig, mesh: Mesh, scorer: ExecutionReward, reference, last,
                      phases):
    """The train step of a host-scored run: sample (jitted), run the tests (host, the
    sandbox's workers in parallel), learn (jitted); each phase's seconds in the metrics."""
    sample_fn, learn_fn = phases
    sharding = parallel.batch_sharding(mesh)

    def train_step(state, batch, base_rng):
        t0 = time.perf_counter()
        responses = jax.device_get(sample_fn(state, batch, base_rng))
        t1 = time.perf_counter()
        lines = np.repeat(_host_array(batch["prompt_line"]), cfg.group_size)
        scored = scorer.score(lines, responses["tokens_BxN"], responses["mask_BxN"],
                              responses["ended_B"])
        t2 = time.perf_counter()
        responses.update(mask_BxN=scored["mask_BxN"], ended_B=scored["ended_B"])
        state, metrics = learn_fn(state, reference, batch, jax.device_put(responses, sharding),
                                  jax.device_put(scored["score_B"], sharding), base_rng)
        jax.block_until_ready(state)
        t3 = time.perf_counter()
        one = np.float32(1.0)
        metrics = dict(metrics, **{k: (np.float32(v), one)
                                   for k, v in scored["metrics"].items()},
                       **{"time/sample": (np.float32(t1 - t0), one),
                          "time/sandbox": (np.float32(t2 - t1), one),
                          "time/learn": (np.float32(t3 - t2), one)})
        last["metrics"] = metrics
        return state, metrics

    return train_step
