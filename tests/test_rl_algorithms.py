"""Value-free RL (GRPO, RLOO) through the same iteration as PPO: group sampling, outcome
advantages against a numpy reference, learning a toy reward, exact resume, bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax import parallel
from instructjax.config import ConfigError, OptimConfig
from instructjax.model.config import preset
from instructjax.model.transformer import Transformer
from instructjax.rlhf import rl_state, rollout
from instructjax.rlhf.rl_program import build_rl_program
from instructjax.train import state as state_lib

from test_ppo import (EOS, FAST_COMPILE, PAD, ppo_config, random_batch,  # noqa: F401
                      run_with_checkpoints, toy_inputs, toy_score, world_data)

MODEL = preset("tiny", vocab_size=512, max_len=64)


class ValueFreeHarness:
    """Policy + frozen reference and reward, no value model, the jitted iteration."""

    def __init__(self, cfg, mesh, score_fn=toy_score, seed=0):
        self.cfg, self.mesh = cfg, mesh
        policy, reward = Transformer(MODEL), Transformer(MODEL, head="scalar")
        self.models = rollout.RolloutModels(policy=policy, value=None, reward=reward,
                                            score_fn=score_fn)
        self.program = build_rl_program(cfg, self.models, mesh, eos_id=EOS, pad_id=PAD)
        self.abstract, self.shardings = self.program.abstract_state, self.program.state_shardings
        self.lm_params = state_lib.init_params_sharded(policy, mesh, 2, jax.random.key(seed))[0]
        # Fresh buffers: the state is donated every iteration, the frozen params not.
        self.frozen = {"reference": jax.tree.map(jnp.copy, self.lm_params),
                       "reward": rl_state.init_scalar_from_lm(
                           self.lm_params, self.program.abstract_frozen["reward"],
                           jax.random.key(seed + 1))}
        self.iteration = self.program.iteration(compiler_options=FAST_COMPILE)

    def init_state(self):
        return self.program.init_state(jax.tree.map(jnp.copy, self.lm_params), {})


def _group_reference(reward, G, how):
    r = np.asarray(reward, np.float64).reshape(-1, G)
    if how == "grpo":
        return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)).ravel()
    return (r - (r.sum(1, keepdims=True) - r) / (G - 1)).ravel()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_outcome_advantages_follow_the_group_of_each_prompt(algorithm):
    G, beta, penalty = 4, 0.3, -1.0
    cfg = ppo_config(algorithm=algorithm, group_size=G, rollout_batch_size=8, gamma_ptx=0.0,
               init_kl_coef=beta, no_eos_penalty=penalty, max_new_tokens=6)
    rcfg = cfg.rollout_config(eos_id=EOS, pad_id=PAD)
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    policy, reward = Transformer(MODEL), Transformer(MODEL, head="scalar")
    models = rollout.RolloutModels(policy=policy, value=None, reward=reward,
                                   score_fn=toy_score)
    lm = state_lib.init_params_sharded(policy, mesh, 2, jax.random.key(0))[0]
    # A reference other than the policy, so the KL is not zero.
    ref = state_lib.init_params_sharded(policy, mesh, 2, jax.random.key(5))[0]
    batch = random_batch(ppo_config(rollout_batch_size=2, gamma_ptx=0.0), 512)  # 2 prompts
    out, stats = jax.jit(lambda p, f, t, m: rollout.rollout(
        p, f, t, m, jax.random.key(3), beta, models=models, cfg=rcfg))(
        {"policy": lm, "value": {}}, {"reference": ref, "reward": {}},
        batch["prompt_tokens"], batch["prompt_mask"])
    out, stats = jax.device_get((out, stats))
    P = batch["prompt_tokens"].shape[1]
    tokens = out["tokens_BxT"]
    assert tokens.shape[0] == 2 * G
    for g in range(2):  # each prompt sampled G times in adjacent rows
        assert (tokens[g * G:(g + 1) * G, :P] == batch["prompt_tokens"][g]).all()
    assert "old_values_BxT" not in out and "returns_BxT" not in out
    np.testing.assert_array_equal(out["ref_logprobs_BxT"][:, P:], stats["ref_logprobs_BxN"])

    reward_B = np.where(stats["ended_B"], stats["score_B"], penalty)
    if algorithm == "rloo":  # the sequence KL is part of RLOO's reward
        reward_B = reward_B - beta * stats["kl_B"]
        assert np.abs(stats["kl_B"]).max() > 1e-3
    expected_B = _group_reference(reward_B, G, algorithm)
    mask = out["response_mask_BxT"][:, P:] > 0
    adv = out["advantages_BxT"][:, P:]
    for b in range(2 * G):
        np.testing.assert_allclose(adv[b][mask[b]], expected_B[b], rtol=1e-4, atol=1e-5)
        assert (adv[b][~mask[b]] == 0).all()


@pytest.fixture(scope="module")
def grpo(world_data):
    cfg = ppo_config(algorithm="grpo", group_size=4, rollout_batch_size=32, max_prompt_len=16,
               max_new_tokens=8, ppo_epochs=2, num_minibatches=2, gamma_ptx=0.1,
               ptx_batch_size=4, ptx_seq_len=32, no_eos_penalty=None, iterations=10,
               init_kl_coef=0.01,
               optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant",
                                 eps=1e-5))
    return ValueFreeHarness(cfg, parallel.make_mesh("data:1,fsdp:2,tensor:1", jax.devices()[:2]))


def test_grpo_learns_the_toy_reward_without_a_value_model(grpo, world_data):
    state, inputs = grpo.init_state(), toy_inputs(grpo.cfg, world_data)
    assert state.value_params == {}
    scores = []
    for _ in range(grpo.cfg.iterations):
        state, metrics = grpo.iteration(state, grpo.frozen, parallel.global_batch(
            next(inputs), grpo.mesh), jax.random.key(0))
        metrics = jax.device_get(metrics)
        assert np.isfinite(float(metrics["loss"][0]))
        assert "value_loss" not in metrics and float(metrics["kl_ref"][1]) > 0
        scores.append(float(metrics["rollout/score"][0]))
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores


def test_grpo_resume_is_exact(grpo, world_data, tmp_path):
    straight = run_with_checkpoints(grpo, world_data, tmp_path / "straight", 4, 4)
    run_with_checkpoints(grpo, world_data, tmp_path / "resumed", 2, 4)
    resumed = run_with_checkpoints(grpo, world_data, tmp_path / "resumed", 4, 4)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


@pytest.mark.parametrize("overrides, message", [
    (dict(algorithm="grpo", group_size=1), "--algorithm=grpo needs --group_size >= 2"),
    (dict(algorithm="rloo", group_size=3), "must be a multiple of --group_size (3)"),
    (dict(algorithm="grpo", group_size=4, kl_target=6.0), "leave --kl_target empty"),
    (dict(algorithm="a2c"), "--algorithm must be one of ppo, grpo, rloo"),
])
def test_bad_algorithm_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ppo_config(**overrides)
