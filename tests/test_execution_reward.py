"""RL from execution feedback: completions cut at stop sequences and scored by their tests in
the sandbox; the two-phase (host-scored) iteration equals the one-piece iteration; a GRPO
run from the command line on a problem file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from instructjax import parallel
from instructjax.config import ConfigError
from instructjax.data.jsonl import DataError
from instructjax.data.tokenizer import train_tokenizer
from instructjax.rlhf import execution_reward as er, rollout
from instructjax.rlhf.rl_program import build_rl_program

from fakes import tiny_world_policy
from test_ppo import (EOS, FAST_COMPILE, PAD, ppo_config, toy_inputs,  # noqa: F401
                      toy_score, world_data)
from test_rl_algorithms import ValueFreeHarness

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [
    {"task_id": "t/add", "prompt": "def add(a, b):\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"},
    {"task_id": "t/neg", "prompt": "def neg(x):\n", "entry_point": "neg",
     "test": "def check(f):\n    assert f(4) == -4\n"},
]


@pytest.fixture(scope="module")
def code_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("exec")
    texts = [p["prompt"] + "    return a + b\n" + p["test"] for p in PROBLEMS] * 40
    texts += ["def f(x):\n    while True:\n        pass\n"] * 10
    return train_tokenizer(texts, root / "tok.model", vocab_size=300)


def _rows(tokenizer, completions, ended, N=40):
    ids = [tokenizer.encode(c) + ([EOS] if e else []) for c, e in zip(completions, ended)]
    tokens = np.zeros((len(ids), N), np.int32)
    mask = np.zeros((len(ids), N), np.float32)
    for b, row in enumerate(ids):
        tokens[b, :len(row)], mask[b, :len(row)] = row, 1.0
    return tokens, mask, np.asarray(ended)


def test_completions_are_cut_at_stop_sequences_and_scored_by_their_tests(code_tokenizer,
                                                                         tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    completions = ["    return a + b\ndef junk():\n    return 0\n",  # cut at "\ndef", passes
                   "    return a - b\n",                             # fails its test
                   "    while True:\n        pass\n",                # times out
                   "    return -x\n"]                                # passes, ran to its EOS
    lines = np.array([1, 1, 1, 2])
    tokens, mask, ended = _rows(code_tokenizer, completions, [False, True, True, True])
    cfg = er.ExecutionRewardConfig(error_penalty=0.5, timeout_s=1.0, memory_mb=256, workers=2)
    with er.ExecutionReward(path, code_tokenizer, cfg) as scorer:
        out = scorer.score(lines, tokens, mask, ended)
        with pytest.raises(DataError, match="line 7, which holds no problem"):
            scorer.score(np.array([7]), tokens[:1], mask[:1], ended[:1])
    np.testing.assert_array_equal(out["score_B"], [1.0, 0.0, -0.5, 1.0])
    assert out["metrics"]["exec/passed"] == 0.5 and out["metrics"]["exec/timeout"] == 0.25
    # Row 0 was cut: its mask spells exactly the code that ran, and it counts as ended.
    kept = code_tokenizer.decode(tokens[0][out["mask_BxN"][0] > 0])
    assert kept.startswith("    return a + b") and "junk" not in kept
    assert out["ended_B"][0]
    # Uncut rows keep their mask (EOS included).
    np.testing.assert_array_equal(out["mask_BxN"][1:], mask[1:])


def test_the_two_phase_iteration_equals_the_one_piece_iteration(world_data):
    # The host computes the same toy score the one-piece iteration computes inside: the
    # resulting states must agree.
    cfg = ppo_config(algorithm="rloo", group_size=4, rollout_batch_size=16, max_prompt_len=16,
               max_new_tokens=8, gamma_ptx=0.0, init_kl_coef=0.05)
    mesh = parallel.make_mesh("data:1,fsdp:2,tensor:1", jax.devices()[:2])
    whole = ValueFreeHarness(cfg, mesh)
    models = rollout.RolloutModels(policy=whole.models.policy, value=None, reward=None,
                                   score_fn=er.given_score)
    sample_fn, learn_fn = build_rl_program(cfg, models, mesh, eos_id=EOS, pad_id=PAD
                                           ).host_scored(compiler_options=FAST_COMPILE)
    batch = parallel.global_batch(next(toy_inputs(cfg, world_data)), mesh)
    rng = jax.random.key(4)
    expected, expected_metrics = whole.iteration(whole.init_state(), whole.frozen, batch, rng)

    state = whole.init_state()
    responses = sample_fn(state, batch, rng)
    prompt, prompt_mask = rollout.repeat_groups(batch["prompt_tokens"], batch["prompt_mask"], 4)
    tokens, positions, segments, response_mask = rollout.assemble(
        prompt, prompt_mask, responses["tokens_BxN"], responses["mask_BxN"])
    score_B = toy_score(None, tokens, positions, segments, response_mask)
    got, metrics = learn_fn(state, whole.frozen["reference"], batch, responses, score_B, rng)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(got), jax.device_get(expected))
    np.testing.assert_allclose(metrics["rollout/score"][0], expected_metrics["rollout/score"][0],
                               rtol=1e-6)


def test_execution_reward_needs_a_problem_file_and_a_value_free_algorithm():
    with pytest.raises(ConfigError, match="--reward=execution scores the tests"):
        ppo_config(reward="execution", reward_from="", algorithm="ppo", prompt_file="p.jsonl")
    with pytest.raises(ConfigError, match="--reward=execution scores the tests"):
        ppo_config(reward="execution", reward_from="", algorithm="grpo", group_size=4)
    ppo_config(reward="execution", reward_from="", algorithm="grpo", group_size=4,
         prompt_file="p.jsonl")


def test_grpo_from_execution_feedback_runs_from_the_command_line(tmp_path):
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    tiny_world_policy(tmp_path, mesh)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS * 4))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "experiments.rl", f"--workdir={tmp_path / 'rl'}",
         f"--policy_from={tmp_path / 'sft'}", f"--prompt_file={problems}",
         f"--data_dir={tmp_path / 'data'}", "--reward=execution", "--algorithm=grpo",
         "--group_size=4", "--rollout_batch_size=8", "--num_minibatches=2", "--ppo_epochs=1",
         "--iterations=2", "--max_prompt_len=16", "--max_new_tokens=12", "--timeout_s=2",
         "--memory_mb=256", "--workers=2", "--log_every=1", "--checkpoint_every=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((tmp_path / "rl" / "final_eval.json").read_text())
    assert final["step"] == 2
    shares = [final[f"train/exec/{k}"] for k in ("passed", "failed", "timeout", "crashed",
                                                  "out_of_memory", "sandbox_error")]
    assert abs(sum(shares) - 1.0) < 1e-6  # every response was run
    assert final["train/time/sandbox"] > 0 and final["train/time/learn"] > 0
    record = json.loads((tmp_path / "rl" / "run_config.json").read_text())
    assert record["config"]["reward"] == "execution"
    assert not (tmp_path / "rl" / "value_model_config.json").exists()
