"""PPO / PPO-ptx: one iteration on different meshes, exact resume, the rollout's reward
bookkeeping under left padding, and a toy reward that PPO must learn."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax import parallel, rl_ops
from instructjax.config import OptimConfig
from instructjax.data import world
from instructjax.data.jsonl import read_jsonl
from instructjax.data.pipeline import lm_dataset
from instructjax.data.tokenizer import train_tokenizer
from instructjax.model.config import preset
from instructjax.model.transformer import Transformer
from instructjax.rlhf import ppo, ppo_run, rl_inputs, rl_state, rollout
from instructjax.rlhf.rl_program import build_rl_program
from instructjax.sampling import left_pad
from instructjax.train import checkpoint as ckpt_lib, loop, state as state_lib
from instructjax.train.metrics import MetricsWriter

from fakes import fake_run

ROOT = Path(__file__).resolve().parents[1]
EOS, PAD = 1, 0
# Tests compile more than they run: a lower XLA optimisation level compiles ~40% faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def ppo_config(**overrides):
    fields = dict(# eps well above float noise (see test_train): Adam must not amplify rounding.
                  optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant",
                                    eps=1e-5),
                  rollout_batch_size=16, max_prompt_len=8, max_new_tokens=8, ppo_epochs=2,
                  num_minibatches=2, gamma_ptx=1.0, ptx_batch_size=8, ptx_seq_len=16,
                  init_kl_coef=0.05)
    fields.update(overrides)
    return ppo.PPOConfig(**fields)


class Harness:
    """Models, initial state, frozen params and the jitted iteration on one mesh."""

    def __init__(self, cfg, mesh, model_cfg, score_fn=None, seed=0, host_params=None):
        self.cfg, self.mesh = cfg, mesh
        policy, value = Transformer(model_cfg), Transformer(model_cfg, head="scalar")
        self.models = rollout.RolloutModels(policy=policy, value=value, reward=value,
                                            score_fn=score_fn)
        self.program = build_rl_program(cfg, self.models, mesh, eos_id=EOS, pad_id=PAD)
        self.rollout_cfg = self.program.rollout_cfg
        self.abstract, self.shardings = self.program.abstract_state, self.program.state_shardings
        if host_params is None:  # initialise into this mesh's shards
            self.lm_params = state_lib.init_params_sharded(policy, mesh, 2,
                                                           jax.random.key(seed))[0]
            self.rm_params = rl_state.init_scalar_from_lm(
                self.lm_params, self.abstract.value_params, jax.random.key(seed + 1))
        else:  # the same numbers as another harness, placed onto this mesh
            self.lm_params = jax.device_put(host_params[0], self.shardings.params)
            self.rm_params = jax.device_put(host_params[1], self.shardings.value_params)
        self.frozen = {"reference": self._lm(), "reward": self._rm()}
        self.iteration = self.program.iteration(compiler_options=FAST_COMPILE)

    # Fresh buffers on each call: the state is donated every iteration, the frozen params not.
    def _lm(self):
        return jax.tree.map(jnp.copy, self.lm_params)

    def _rm(self):
        return jax.tree.map(jnp.copy, self.rm_params)

    def init_state(self):
        return self.program.init_state(self._lm(), self._rm())

    def step(self, state, batch, base_rng):
        return self.iteration(state, self.frozen, parallel.global_batch(batch, self.mesh),
                              base_rng)


def random_batch(cfg, vocab, seed=0):
    rng = np.random.default_rng(seed)
    B, P = cfg.rollout_batch_size, cfg.max_prompt_len
    prompts = [list(rng.integers(3, vocab, n)) for n in rng.integers(1, P + 1, B)]
    tokens, mask = left_pad(prompts, PAD, P)
    R, T = cfg.num_updates * cfg.ptx_batch_size, cfg.ptx_seq_len
    return {"prompt_tokens": tokens, "prompt_mask": mask,
            "ptx_inputs": rng.integers(3, vocab, (R, T)).astype(np.int32),
            "ptx_targets": rng.integers(3, vocab, (R, T)).astype(np.int32),
            "ptx_positions": np.tile(np.arange(T, dtype=np.int32), (R, 1)),
            "ptx_segment_ids": np.ones((R, T), np.int32),
            "ptx_loss_mask": np.ones((R, T), np.float32)}


# ----------------------------------------------------------------------------- (a) meshes

def test_one_iteration_same_on_every_mesh():
    # PPO-ptx at temperature 0.7: the recomputed, tempered log-probs must be the sampler's.
    cfg = ppo_config(temperature=0.7)
    model_cfg = preset("tiny", vocab_size=64, max_len=32, n_layers=1)
    batch = random_batch(cfg, 64)
    host_params = None

    def run(mesh):
        nonlocal host_params
        h = Harness(cfg, mesh, model_cfg, host_params=host_params)
        host_params = host_params or jax.device_get((h.lm_params, h.rm_params))
        state, metrics = h.step(h.init_state(), batch, jax.random.key(7))
        return jax.device_get(metrics), jax.device_get(state)

    ref_metrics, ref_state = run(parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1]))
    assert ref_metrics["rollout/sampler_logprob_mismatch"][0] < 1e-5
    assert ref_metrics["rollout/kl"][0] == 0.0  # the first rollout's policy is the reference
    assert float(ref_metrics["ptx_loss"][1]) == cfg.num_updates * cfg.ptx_batch_size * 16
    for spec in ("data:2,fsdp:4,tensor:1", "data:1,fsdp:2,tensor:4"):
        metrics, state = run(parallel.make_mesh(spec))
        # Identical samples: the same tokens were generated and scored.
        for name in ("tokens", "rollout/response_length", "rollout/ended"):
            assert metrics[name][0] == ref_metrics[name][0], (spec, name)
        for name, (total, weight) in ref_metrics.items():
            np.testing.assert_allclose(metrics[name][0], total, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{spec} {name}")
            np.testing.assert_allclose(metrics[name][1], weight, rtol=1e-6, err_msg=spec)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, err_msg=spec),
                     state, ref_state)
    assert int(ref_state.step) == 1


# ----------------------------------------------------------------------------- (c) rollout

def test_rollout_scores_last_real_token_and_penalises_missing_eos():
    cfg = ppo_config(max_prompt_len=6, max_new_tokens=4, no_eos_penalty=-3.0, temperature=0.8)
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    h = Harness(cfg, mesh, preset("tiny", vocab_size=64, max_len=32, n_layers=1))
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [15, 16]]
    responses = [[20, 21, EOS], [22, 23, 24, 25], [EOS], [26, 27, 28, 29]]
    ended = [True, False, True, False]
    prompt_BxP, prompt_mask_BxP = left_pad(prompts, PAD, 6)
    response_BxN = np.full((4, 4), PAD, np.int32)
    response_mask_BxN = np.zeros((4, 4), np.float32)
    for i, r in enumerate(responses):
        response_BxN[i, :len(r)], response_mask_BxN[i, :len(r)] = r, 1
    beta = 0.1
    params = {"policy": h._lm(), "value": h._rm()}
    frozen = dict(h.frozen, reference=jax.tree.map(lambda x: x + 0.01 * jnp.sin(x), h._lm()))
    batch, stats = jax.jit(lambda *a: rollout.score_rollout(
        *a, models=h.models, cfg=h.rollout_cfg))(
        params, frozen, prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN,
        np.asarray(ended), beta)
    batch, stats = jax.device_get((batch, stats))

    # The obviously-right answer: each prompt + response at the START of a row (positions
    # 0, 1, ...; right padding, which causal attention never sees), one row at a time.
    rows = [p + r for p, r in zip(prompts, responses)]
    right_BxL = np.zeros((4, 10), np.int32)
    seg_BxL = np.zeros((4, 10), np.int32)
    for i, ids in enumerate(rows):
        right_BxL[i, :len(ids)], seg_BxL[i, :len(ids)] = ids, 1
    pos_BxL = np.tile(np.arange(10, dtype=np.int32), (4, 1))

    @jax.jit
    def reference_outputs(policy, ref, value, reward):
        def run(model, p):
            return model.apply({"params": p}, right_BxL, pos_BxL, seg_BxL)
        return (jax.nn.log_softmax(run(h.models.policy, policy) / cfg.temperature),
                jax.nn.log_softmax(run(h.models.policy, ref) / cfg.temperature),
                run(h.models.value, value), run(h.models.reward, reward))

    logp_all, ref_all, values_all, rm_all = jax.device_get(reference_outputs(
        params["policy"], frozen["reference"], params["value"], h.frozen["reward"]))

    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, n, start = rows[i], len(response), len(prompt)
        logp, ref, values = logp_all[i], ref_all[i], values_all[i]
        want_score = rm_all[i, len(ids) - 1]
        np.testing.assert_allclose(stats["score_B"][i], want_score, rtol=1e-5, atol=1e-6)
        want_logp = [logp[start + j - 1, ids[start + j]] for j in range(n)]
        want_ref = [ref[start + j - 1, ids[start + j]] for j in range(n)]
        np.testing.assert_allclose(batch["old_logprobs_BxT"][i, 6:6 + n], want_logp, atol=1e-5)
        np.testing.assert_allclose(batch["old_values_BxT"][i, 6:6 + n],
                                   values[start - 1:start - 1 + n], atol=1e-5)
        assert np.all(batch["old_logprobs_BxT"][i, 6 + n:] == 0)
        kl = np.asarray(want_logp) - np.asarray(want_ref)
        final = want_score if ended[i] else -3.0
        want_rewards = -beta * kl
        want_rewards[-1] += final
        np.testing.assert_allclose(stats["rewards_BxN"][i, :n], want_rewards, atol=1e-5)
        np.testing.assert_allclose(stats["rewards_BxN"][i, n:], 0.0)
        np.testing.assert_allclose(stats["penalised_score_B"][i], final, rtol=1e-6)
        np.testing.assert_allclose(stats["kl_B"][i], kl.sum(), atol=1e-5)
    mask = response_mask_BxN
    adv = batch["advantages_BxT"][:, 6:]
    np.testing.assert_allclose(rl_ops.masked_mean(adv, mask), 0.0, atol=1e-5)
    np.testing.assert_allclose(rl_ops.masked_var(adv, mask), 1.0, atol=1e-4)
    assert np.all(batch["response_mask_BxT"][:, :6] == 0)
    np.testing.assert_array_equal(batch["response_mask_BxT"][:, 6:], mask)

    # The reference policy's mean log-probability per response token joins the score.
    with_ref = dataclasses.replace(h.rollout_cfg, reference_logprob_coef=0.5)
    _, stats_ref = jax.device_get(jax.jit(lambda *a: rollout.score_rollout(
        *a, models=h.models, cfg=with_ref))(
        params, frozen, prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN,
        np.asarray(ended), beta))
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, start = rows[i], len(prompt)
        mean_ref = np.mean([ref_all[i][start + j - 1, ids[start + j]] for j in range(len(response))])
        np.testing.assert_allclose(stats_ref["score_B"][i], stats["score_B"][i] + 0.5 * mean_ref,
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- toy reward

def toy_score(reward_params, tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT):
    """Toy reward: the fraction of response tokens with an even id (about 0.5 at the start;
    neutral towards the pretraining mix, which favours no parity)."""
    del reward_params, positions_BxT, segment_ids_BxT
    hit = (tokens_BxT % 2 == 0).astype(jnp.float32)
    return rl_ops.masked_mean(hit, response_mask_BxT, axis=-1)


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_world")
    files = world.write_world(root / "data", n_pretrain_docs=150, n_sft_train=50,
                              n_sft_eval=20, n_prompts=40)
    texts = [r["text"] for _, r in read_jsonl(files["pretrain_train"], required={"text": str})]
    tokenizer = train_tokenizer(texts, root / "tokenizer.model", vocab_size=512)
    prompts = [{"prompt": r["prompt"]}
               for _, r in read_jsonl(files["prompts_train"], required={"prompt": str})]
    return {"root": root, "files": files, "tokenizer": tokenizer, "prompts": prompts,
            "texts": [{"text": t} for t in texts]}


@pytest.fixture(scope="module")
def toy(world_data):
    """One compiled PPO-ptx iteration on the toy reward, shared by the tests below."""
    cfg = ppo_config(rollout_batch_size=32, max_prompt_len=16, max_new_tokens=8, ppo_epochs=2,
               num_minibatches=2, gamma_ptx=0.1, ptx_batch_size=4, ptx_seq_len=32,
               no_eos_penalty=None, iterations=10,
               optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant",
                                 eps=1e-5))
    mesh = parallel.make_mesh("data:1,fsdp:2,tensor:1", jax.devices()[:2])
    return Harness(cfg, mesh, preset("tiny", vocab_size=512, max_len=64), score_fn=toy_score)


def toy_inputs(cfg, data):
    tok = data["tokenizer"]
    prompts = rl_inputs.prompt_dataset(data["prompts"], tok, max_prompt_len=cfg.max_prompt_len,
                                     batch_size=cfg.rollout_batch_size, seed=0)
    ptx = lm_dataset(data["texts"], tok, seq_len=cfg.ptx_seq_len,
                     batch_size=cfg.num_updates * cfg.ptx_batch_size, seed=1)
    return rl_inputs.PPOInputs(iter(prompts), iter(ptx))


def test_toy_reward_rises_and_kl_grows_from_zero(toy, world_data):
    state, inputs = toy.init_state(), toy_inputs(toy.cfg, world_data)
    scores, kls = [], []
    for _ in range(toy.cfg.iterations):
        state, metrics = toy.step(state, next(inputs), jax.random.key(0))
        metrics = jax.device_get(metrics)
        scores.append(float(metrics["rollout/score"][0]))
        kls.append(float(metrics["rollout/kl"][0]))
        assert np.isfinite(float(metrics["loss"][0]))
    assert kls[0] == 0.0  # the first rollout comes from the reference policy itself
    assert all(np.isfinite(kls)) and np.mean(kls[-3:]) > 0.05, kls
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores


def run_with_checkpoints(h, data, workdir, steps, total):
    """`steps` iterations of harness `h` through the train loop, checkpointing every 2 into
    `workdir` (resuming what is there); returns the state on the host."""
    inputs = toy_inputs(h.cfg, data)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints")
    state = loop.resume_or_init(ckpt, h.abstract, h.init_state, inputs)
    writer = MetricsWriter(workdir, total_steps=total)
    try:
        state = loop.train_loop(
            state, cfg=dataclasses.replace(h.cfg.loop_config(), steps=steps,
                                           checkpoint_every=2, log_every=1),
            train_step=lambda s, b, r: h.iteration(s, h.frozen, b, r),
            base_rng=jax.random.key(11), data_iter=inputs, mesh=h.mesh,
            checkpointer=ckpt, writer=writer)
    finally:
        writer.close()
        ckpt.close()
    return jax.device_get(state)


def test_resume_in_process_is_exact(toy, world_data, tmp_path):
    straight = run_with_checkpoints(toy, world_data, tmp_path / "straight", 4, 4)
    run_with_checkpoints(toy, world_data, tmp_path / "resumed", 2, 4)
    resumed = run_with_checkpoints(toy, world_data, tmp_path / "resumed", 4, 4)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    # The PPO workdir's checkpoints are LM checkpoints: restore_params gives the policy.
    policy = ckpt_lib.restore_params(tmp_path / "resumed", toy.abstract.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(policy), straight.params)


# ----------------------------------------------------------------------------- end to end

def _ppo_cmd(workdir, data_dir, sft, rm, *extra):
    return [sys.executable, "-m", "experiments.rl", f"--workdir={workdir}",
            f"--data_dir={data_dir}", f"--init_from={sft}", f"--reward_from={rm}",
            "--world_pretrain_docs=150", "--world_sft_train=50", "--world_eval=20",
            "--world_prompts=40", "--iterations=6", "--rollout_batch_size=8",
            "--max_prompt_len=16", "--max_new_tokens=6", "--ppo_epochs=2", "--num_minibatches=2",
            "--gamma_ptx=1.0", "--ptx_batch_size=4", "--ptx_seq_len=32", "--learning_rate=1e-3",
            "--warmup_steps=1", "--checkpoint_every=2", "--log_every=1", "--host_devices=2",
            *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def stage_dirs(world_data):
    root, tok = world_data["root"], world_data["root"] / "tokenizer.model"
    model_cfg = preset("tiny", vocab_size=512, max_len=64)
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    lm_params = state_lib.init_params_sharded(Transformer(model_cfg), mesh, 2,
                                              jax.random.key(0))[0]
    scalar_abstract = state_lib.abstract_params(Transformer(model_cfg, head="scalar"), mesh)[0]
    rm_params = rl_state.init_scalar_from_lm(lm_params, scalar_abstract, jax.random.key(1))
    fake_run(root / "sft", tok, model_cfg, lm_params)
    fake_run(root / "rm", tok, model_cfg, rm_params)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_sigkill_then_resume_equals_uninterrupted(stage_dirs, tmp_path, algorithm):
    data, sft, rm = stage_dirs / "data", stage_dirs / "sft", stage_dirs / "rm"
    extra = (f"--algorithm={algorithm}", f"--group_size={1 if algorithm == 'ppo' else 2}")
    straight = tmp_path / "straight"
    subprocess.run(_ppo_cmd(straight, data, sft, rm, *extra), check=True, cwd=ROOT, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_ppo_cmd(killed, data, sft, rm, *extra), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "4").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint at iteration 4 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(_ppo_cmd(killed, data, sft, rm, *extra), check=True, cwd=ROOT, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)

    from instructjax.train.workdir import load_trained
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    _, a, _ = load_trained(straight, mesh)
    _, b, _ = load_trained(killed, mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
    if algorithm == "ppo":
        va = ppo_run.load_value_model(straight, mesh)[1]
        vb = ppo_run.load_value_model(killed, mesh)[1]
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(va), jax.device_get(vb))
    assert json.loads((killed / "final_eval.json").read_text())["step"] == 6
    run_config = json.loads((killed / "run_config.json").read_text())
    assert run_config["config"]["gamma_ptx"] == 1.0 and "jax" in run_config["versions"]


def test_bad_settings_give_clear_errors(tmp_path):
    with pytest.raises(ppo.ConfigError, match=r"--rollout_batch_size \(9\) must be a multiple"):
        ppo_config(rollout_batch_size=9)
    with pytest.raises(ppo.ConfigError, match="--kl_target must be > 0"):
        ppo_config(kl_target=0.0)
    with pytest.raises(ppo.ConfigError, match="--temperature must be > 0"):
        ppo_config(temperature=0.0)
    sft, rm = tmp_path / "sft_nope", tmp_path / "rm_nope"
    for extra, message in [
            (["--steps=3"], "error: --steps does not apply to RL: use --iterations"),
            ([], f"error: {sft / 'model_config.json'} not found")]:
        result = subprocess.run(_ppo_cmd(tmp_path / "w", tmp_path / "data", sft, rm, *extra),
                                cwd=ROOT,
                                env=_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr, result.stderr
