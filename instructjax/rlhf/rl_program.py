"""The RL program, assembled in one place for the run (ppo_run.py), the memory plan
(memory_plan.py), the benchmark (benchmarks/ppo_iteration.py) and the tests:

    program = build_rl_program(cfg, models, mesh, eos_id=tokenizer.eos_id, pad_id=...)
    state = program.init_state(policy_params, value_params)  # or restore program.abstract_state
    step = program.iteration()       # (state, frozen, batch, base_rng) -> (state, metrics)
    sample, learn = program.host_scored()  # the two halves around rewards scored on the host

Only the hyper-parameters of `cfg` (ppo.PPOConfig) are read here, never its run paths. An
algorithm (algorithms.py) changes the advantages and the objective; the program is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from instructjax import parallel, rl_ops
from instructjax.rl_losses import PolicyValueApply
from instructjax.rlhf import rollout as rollout_lib
from instructjax.rlhf.ppo import PTX_KEYS, PPOConfig, ppo_update
from instructjax.rlhf.rl_state import PPOState, abstract_ppo_state, init_ppo_state
from instructjax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class RLProgram:
    """The parts of the RL iteration on one mesh. abstract_state / state_shardings: the
    PPOState (value_params {} without a value model); abstract_frozen / frozen_shardings:
    the frozen {'reference'} policy params and, with a reward model, its {'reward'} params."""
    cfg: PPOConfig
    models: rollout_lib.RolloutModels
    rollout_cfg: rollout_lib.RolloutConfig
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: PPOState
    state_shardings: Any
    abstract_frozen: dict[str, Any]
    frozen_shardings: dict[str, Any]

    def init_state(self, policy_params, value_params) -> PPOState:
        """A fresh state from starting params, which must not share buffers with the frozen
        params (the state is donated every iteration)."""
        return init_ppo_state(policy_params, value_params, self.tx, self.state_shardings,
                              self.mesh, self.cfg.init_kl_coef)

    def iteration(self, *, return_responses: bool = False,
                  compiler_options: dict[str, Any] | None = None) -> parallel.ShardedJit:
        """(state, frozen, batch, base_rng) -> (state, metrics), one RL iteration, jitted with
        explicit shardings and the state donated. frozen = {'reference', 'reward'} params;
        batch = a PPOInputs dict after parallel.global_batch. metrics: name -> (sum, weight).
        compiler_options go to XLA for this program (tests lower the optimisation level).
        return_responses: also return the rollout's responses, (state, metrics, responses)
        with responses = {tokens_BxN, lengths_B (incl. EOS), ended_B} sharded like the batch
        (for host-side scoring, e.g. the gold reward of the over-optimisation frontier)."""
        models, rollout_cfg = self.models, self.rollout_cfg
        learn = _learner(self.cfg, models, self.tx, self.schedule, self.mesh)

        def iteration(state: PPOState, frozen, batch, base_rng):
            rng = jax.random.fold_in(base_rng, state.step)
            ppo_batch, stats = rollout_lib.rollout(
                state.trainable, frozen, batch["prompt_tokens"], batch["prompt_mask"],
                jax.random.fold_in(rng, 0), state.kl["beta"], models=models, cfg=rollout_cfg)
            new_state, metrics = learn(state, batch, rng, ppo_batch, stats)
            if not return_responses:
                return new_state, metrics
            P = batch["prompt_tokens"].shape[1]
            responses = {"tokens_BxN": ppo_batch["tokens_BxT"][:, P:],
                         "lengths_B": stats["lengths_B"].astype(jnp.int32),
                         "ended_B": stats["ended_B"]}
            return new_state, metrics, responses

        rep, rows = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        return parallel.ShardedJit(
            iteration, self.mesh,
            in_shardings=(self.state_shardings, self.frozen_shardings, rows, rep),
            out_shardings=(self.state_shardings, rep) + ((rows,) if return_responses else ()),
            donate_argnums=(0,), compiler_options=compiler_options)

    def host_scored(self, *, compiler_options: dict[str, Any] | None = None):
        """The same iteration in two jitted halves, for rewards computed on the host between
        them (execution feedback: execution_reward.py):

          sample(state, batch, base_rng) -> responses {tokens_BxN, mask_BxN, ended_B, logprobs_BxN}
          learn(state, reference, batch, responses, score_B, base_rng) -> (state, metrics)

        learn scores `responses` (whose mask and ended flags the host may have cut, e.g. at a
        stop sequence) with the host's score_B and updates; models.score_fn must return its
        reward params, which is what score_B is passed as. Same random streams as the
        one-piece iteration; the state is donated to learn only."""
        cfg, models, rollout_cfg = self.cfg, self.models, self.rollout_cfg
        learn = _learner(cfg, models, self.tx, self.schedule, self.mesh)

        def sample_phase(state: PPOState, batch, base_rng):
            rng = jax.random.fold_in(base_rng, state.step)
            _, _, out = rollout_lib.sample_responses(
                state.params, batch["prompt_tokens"], batch["prompt_mask"],
                jax.random.fold_in(rng, 0), models=models, cfg=rollout_cfg)
            return {k: out[k] for k in ("tokens_BxN", "mask_BxN", "ended_B", "logprobs_BxN")}

        def learn_phase(state: PPOState, reference, batch, responses, score_B, base_rng):
            rng = jax.random.fold_in(base_rng, state.step)
            prompt_BxP, prompt_mask_BxP = rollout_lib.repeat_groups(
                batch["prompt_tokens"], batch["prompt_mask"], cfg.group_size)
            ppo_batch, stats = rollout_lib.score_rollout(
                state.trainable, {"reference": reference, "reward": score_B}, prompt_BxP,
                prompt_mask_BxP, responses["tokens_BxN"], responses["mask_BxN"],
                responses["ended_B"], state.kl["beta"], models=models, cfg=rollout_cfg)
            stats["sampler_logprobs_BxN"] = responses["logprobs_BxN"]
            return learn(state, batch, rng, ppo_batch, stats)

        rep, rows = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        sample_fn = parallel.ShardedJit(
            sample_phase, self.mesh, in_shardings=(self.state_shardings, rows, rep),
            out_shardings=rows, compiler_options=compiler_options)
        learn_fn = parallel.ShardedJit(
            learn_phase, self.mesh,
            in_shardings=(self.state_shardings, self.frozen_shardings["reference"], rows, rows,
                          rows, rep),
            out_shardings=(self.state_shardings, rep), donate_argnums=(0,),
            compiler_options=compiler_options)
        return sample_fn, learn_fn


def build_rl_program(cfg: PPOConfig, models: rollout_lib.RolloutModels, mesh: Mesh, *,
                     eos_id: int, pad_id: int, vocab_limit: int = 0) -> RLProgram:
    """The RL iteration of `cfg`'s algorithm for these models on `mesh` (nothing is
    allocated: the states are abstract until init_state or a checkpoint restore)."""
    tx, schedule = make_optimizer(cfg)
    abstract, shardings = abstract_ppo_state(models.policy, models.value, tx, mesh,
                                             cfg.init_kl_coef)
    abstract_frozen = {"reference": abstract.params}
    frozen_shardings = {"reference": shardings.params}
    if models.reward is not None:
        abstract_frozen["reward"], frozen_shardings["reward"] = state_lib.abstract_params(
            models.reward, mesh)
    return RLProgram(cfg=cfg, models=models,
                     rollout_cfg=cfg.rollout_config(eos_id=eos_id, pad_id=pad_id,
                                                    vocab_limit=vocab_limit),
                     mesh=mesh, tx=tx, schedule=schedule, abstract_state=abstract,
                     state_shardings=shardings, abstract_frozen=abstract_frozen,
                     frozen_shardings=frozen_shardings)


def _learner(cfg: PPOConfig, models: rollout_lib.RolloutModels, tx, schedule, mesh: Mesh):
    """(state, batch, rng, ppo_batch, stats) -> (state, metrics): the update after a
    rollout, its metrics and the KL controller's step."""
    apply = PolicyValueApply.from_models(models.policy, models.value)

    def learn(state: PPOState, batch, rng, ppo_batch, stats):
        beta = state.kl["beta"]
        ptx = {k: batch[f"ptx_{k}"] for k in PTX_KEYS} if cfg.use_ptx else None
        params, opt_state, metrics = ppo_update(
            state.trainable, state.opt_state, ppo_batch, ptx, jax.random.fold_in(rng, 1),
            cfg=cfg, apply=apply, tx=tx, mesh=mesh)
        metrics.update(rollout_lib.rollout_metrics(stats, beta, cfg.algo.kl_in_reward))
        one = jnp.ones((), jnp.float32)
        metrics["learning_rate"] = (jnp.asarray(schedule(state.step * cfg.num_updates),
                                                jnp.float32), one)
        metrics["param_norm"] = (optax.tree.norm(params["policy"]), one)
        metrics["tokens"] = (jnp.sum(stats["lengths_B"]), one)  # generated tokens
        kl = rl_ops.kl_controller_update(state.kl, jnp.mean(stats["kl_B"]),
                                         ppo_batch["tokens_BxT"].shape[0],
                                         target=cfg.kl_target, horizon=cfg.kl_horizon)
        return PPOState(step=state.step + 1, params=params["policy"],
                        value_params=params["value"], opt_state=opt_state, kl=kl), metrics

    return learn


def make_optimizer(cfg: PPOConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """One optimiser over {'policy', 'value'}; the schedule counts optimiser updates
    (iterations * ppo_epochs * num_minibatches)."""
    total = cfg.iterations * cfg.num_updates
    return state_lib.make_optimizer(cfg.optim, total), state_lib.make_schedule(cfg.optim, total)
