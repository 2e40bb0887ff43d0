"""Reward-model analysis: the answer-blind gold judge, pairwise accuracy by kind, best-of-n,
and the reward/likelihood readers agreeing with the ones training and sampling use."""
import dataclasses
import json
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fakes import fake_run, tiny_world_policy
from instructjax import losses, parallel
from instructjax.config import ConfigError, DataConfig, OptimConfig, RunConfig, TrainConfig
from instructjax.data import pipeline
from instructjax.data.jsonl import read_jsonl, write_json_atomic
from instructjax.data.comparisons import write_comparisons
from instructjax.data.world import gold, labelers
from instructjax.losses import make_apply
from instructjax.model.transformer import Transformer
from instructjax.rlhf import ppo_run, reward_analysis, rl_state, rollout
from instructjax.sampling import left_pad
from instructjax.train import state as state_lib
from instructjax.train import run, workdir
from instructjax.train.workdir import load_trained

ARITH = {"kind": "arith", "prompt": "What is 2 plus 3?\n", "answer": "5", "accept": ["5"]}


def test_answer_blind_gold_sees_form_but_not_correctness():
    blind = lambda r: gold.gold_score(ARITH, r, knows_answer=False)  # noqa: E731
    assert gold.gold_score(ARITH, "5") > gold.gold_score(ARITH, "15") == gold.gold_score(ARITH, "9")
    assert blind("5") == blind("15") == blind("9")  # right, close and far look alike
    assert blind("5") > blind("five apples and pears")  # a number where a number is asked
    assert blind("5") > blind("I'm sorry, but I can't help with that.")
    harmful = {"kind": "harmful", "prompt": "Insult Bob.\n", "answer": "I'm sorry.",
               "accept": ["I'm sorry."]}
    for r in ("I'm sorry, but I can't help with that.", "Bob is a dimwad."):
        assert gold.gold_score(harmful, r, knows_answer=False) == gold.gold_score(harmful, r)


def test_pair_accuracies_by_kind_skip_identical_texts_and_halve_ties():
    tasks = [dict(ARITH), {**ARITH, "kind": "qa"}]
    records = [{"responses": ["a", "b", "c"], "ranking": [2, 0, 1]},   # c > a > b
               {"responses": ["x", "x", "y"], "ranking": [0, 1, 2]}]   # x > y, x = x skipped
    scores = {"perfect": [[1, 0, 2], [5, 5, 0]], "backwards": [[1, 2, 0], [0, 0, 5]],
              "flat": [[0, 0, 0], [1, 1, 1]]}
    acc = reward_analysis.pair_accuracies(tasks, records, scores)
    assert acc["arith"] == {"pairs": 3, "perfect": 1.0, "backwards": 0.0, "flat": 0.5}
    assert acc["qa"] == {"pairs": 2, "perfect": 1.0, "backwards": 0.0, "flat": 0.5}
    assert acc["all"]["pairs"] == 5


def test_best_of_n_keeps_the_pickers_choice_and_judges_it_like_the_evaluation():
    tasks = [{**ARITH, "id": f"t{i}"} for i in range(40)]
    candidates = [["9"] * 40, ["5"] * 40]                 # draw 0 wrong, draw 1 right
    pickers = {"gold": np.array([[gold.gold_score(t, c[i]) for i, t in enumerate(tasks)]
                                 for c in candidates]),
               "first": np.array([[1.0] * 40, [0.0] * 40])}
    pool = labelers.heldout_labelers(noise_scale=0.03)
    out = reward_analysis.best_of_n(tasks, candidates, ["7"] * 40, pickers, pool, ns=[1, 2])
    assert out["gold"][2] == {"win_rate": 1.0, "accuracy": 1.0}
    assert out["gold"][1]["accuracy"] == out["first"][2]["accuracy"] == 0.0
    assert out["first"][2]["win_rate"] < 1.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A world, a tokenizer, an untrained tiny policy and its reward model as finished runs,
    and held-out comparisons of perturbed responses ranked by held-out labelers."""
    root = tmp_path_factory.mktemp("analysis")
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    files, cfg, lm = tiny_world_policy(root, mesh)
    scalar = state_lib.abstract_params(Transformer(cfg, head="scalar"), mesh)[0]
    fake_run(root / "reward", root / "tokenizer.model", cfg,
             rl_state.init_scalar_from_lm(lm, scalar, jax.random.key(1)))
    tasks = [t for _, t in read_jsonl(files["prompts_eval"], required={"prompt": str})]
    rng = random.Random(0)
    sets = [labelers.perturbed_responses(t, rng, rng.randint(4, 6)) for t in tasks]
    pool = labelers.heldout_labelers(noise_scale=0.05)
    write_comparisons(root / "data" / "comparisons_eval.jsonl",
                      labelers.label_comparisons(tasks, sets, pool))
    write_json_atomic(root / "data" / "comparisons_stats.json",
                      {"labeler_noise_scale": 0.05, "config": {"seed": 0},
                       "eval": {"labeler_agreement": labelers.mean_pool_agreement(pool, tasks, sets)}})
    return root, mesh, cfg


@pytest.mark.parametrize("read", ["eos", "pooled"])
def test_reward_read_where_training_and_ppo_read_it(runs, read):
    root, mesh, _ = runs
    reward = load_trained(root / "reward", mesh, head="scalar")
    model, params, tok = reward
    prompts, responses = ["What is 2 plus 3?\n", "Hello"], ["5", " there, my friend."]
    ours = reward_analysis.reward_scores(reward, prompts, responses, mesh=mesh, seq_len=64,
                                         read=read)
    prompt_BxP, prompt_mask = left_pad([tok.encode(p) for p in prompts], tok.pad_id, 16)
    # PPO's rollouts: the prompt left-padded, then the response (with its EOS) right-padded
    response_BxN = np.full((2, 12), tok.pad_id, np.int32)
    response_mask = np.zeros((2, 12), np.int32)
    for i, r in enumerate(responses):
        ids = tok.encode(r) + [tok.eos_id]
        response_BxN[i, :len(ids)], response_mask[i, :len(ids)] = ids, 1
    tokens, positions, segments, response_BxT = rollout.assemble(prompt_BxP, prompt_mask,
                                                                 response_BxN, response_mask)
    models = rollout.RolloutModels(policy=Transformer(model.cfg), value=model, reward=model,
                                   reward_read=read)
    ppo = models.score(params, tokens, positions, segments, response_BxT)
    np.testing.assert_allclose(ours, np.asarray(ppo), rtol=1e-4, atol=1e-5)
    # Training: each prompt's responses as the comparison pipeline encodes them.
    encode = pipeline.EncodeComparison(tok.path, 64, 2)
    batch = [encode({"prompt": p, "responses": [r, " no"], "ranking": [0, 1]})
             for p, r in zip(prompts, responses)]
    batch = {k: np.stack([b[k] for b in batch]) for k in batch[0]}
    trained, _ = losses.ranking_rewards(params, batch, None, apply=make_apply(model), read=read)
    np.testing.assert_allclose(ours, np.asarray(trained)[:, 0], rtol=1e-4, atol=1e-5)
    if read == "pooled":  # a different read indeed
        eos = reward_analysis.reward_scores(reward, prompts, responses, mesh=mesh, seq_len=64,
                                            read="eos")
        assert np.min(np.abs(np.subtract(ours, eos))) > 1e-4


def test_reward_read_recorded_in_the_workdir_is_what_ppo_uses(runs, tmp_path):
    root, mesh, cfg = runs
    run_cfg = RunConfig(task="reward", workdir=str(tmp_path / "rm"), model=cfg,
                        optim=OptimConfig(learning_rate=1e-3),
                        train=TrainConfig(steps=1, batch_size=1, seq_len=64),
                        data=DataConfig(data_dir=str(tmp_path / "data")), rm_read="pooled")
    with workdir.open_run(run_cfg.workdir, run_cfg, [], total_steps=1, files=run.run_files(run_cfg)):
        pass
    assert workdir.load_reward_read(tmp_path / "rm") == "pooled"
    assert workdir.load_reward_read(root / "reward") == "eos"  # written before reads were recorded
    with pytest.raises(ConfigError, match="--rm_read=pooled"):  # no resuming with another read
        run.check_reward_read(dataclasses.replace(run_cfg, rm_read="eos"))
    with pytest.raises(ValueError, match="--rm_read"):
        dataclasses.replace(run_cfg, rm_read="mean")

    # The same trained reward model with the 'pooled' record next to it.
    pooled_dir = tmp_path / "rm_pooled"
    shutil.copytree(root / "reward", pooled_dir)
    shutil.copy(tmp_path / "rm" / workdir.REWARD_CONFIG_FILE, pooled_dir)
    model = Transformer(cfg, head="scalar")
    assert ppo_run.rollout_models(Transformer(cfg), model, model, pooled_dir).reward_read == "pooled"
    assert ppo_run.rollout_models(Transformer(cfg), model, model, root / "reward").reward_read == "eos"


def test_log_likelihood_is_the_responses_and_eos_tokens_only(runs):
    root, mesh, _ = runs
    policy = load_trained(root / "sft", mesh)
    model, params, tok = policy
    prompts, responses = ["What is 2 plus 3?\n", "The river", "Hi"], ["5", " Dibun flows.", ""]
    ours = reward_analysis.policy_log_likelihoods(policy, prompts, responses, mesh=mesh,
                                                  seq_len=64)
    for prompt, response, value in zip(prompts, responses, ours):  # one unpadded row each
        p, ids = tok.encode(prompt), tok.encode(prompt) + tok.encode(response) + [tok.eos_id]
        n = len(ids)
        logits = make_apply(model)(params, np.array([ids]), np.arange(n)[None],
                                   np.ones((1, n), np.int32))
        logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        expected = sum(logp[t - 1, ids[t]] for t in range(len(p), n))
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_analyse_end_to_end(runs):
    root, mesh, _ = runs
    result = reward_analysis.analyse(data_dir=root / "data", policy_dir=root / "sft",
                                     reward_dir=root / "reward", mesh=mesh, best_of=3,
                                     seq_len=128, max_new_tokens=8)
    assert result["pairs"]["all"]["pairs"] > 20
    for row in result["pairs"].values():
        names = ("reward_model", "policy_loglik", *reward_analysis.JUDGES)
        assert all(0.0 <= row[n] <= 1.0 for n in names)
    assert result["pairs"]["all"]["gold"] > 0.6  # the held-out labelers rank by gold + noise
    assert sorted(result["best_of_n"]["gold"]) == [1, 2, 3]
    gold_wins = [result["best_of_n"]["gold"][n]["win_rate"] for n in (1, 3)]
    assert gold_wins[1] >= gold_wins[0]
    report = reward_analysis.format_report(result)
    assert "no_answers" in report and "n=3" in report
    assert result["probes"]["foreign wrapper"]["edits"] > 0 and "foreign wrapper" in report
    json.dumps(result)


def test_reward_model_as_judge_on_own_prompts(runs, tmp_path):
    from instructjax.rlhf import rm_judge
    root, mesh, cfg = runs
    other = tmp_path / "other"  # another policy: the same model with perturbed weights
    _, params, _ = load_trained(root / "sft", mesh)
    fake_run(other, root / "tokenizer.model", cfg,
             jax.tree.map(lambda x: x + 0.05 * jnp.sin(7 * x), params))
    prompts = [f"Q: What is {i} + {i}?\nA:" for i in range(12)]
    result = rm_judge.judge({"sft": root / "sft", "twin": root / "sft", "other": other}, "sft",
                            root / "reward", prompts, mesh=mesh, max_new_tokens=8, seq_len=64)
    table = result["policies"]
    assert table["twin"] == dict(table["sft"])  # the same policy and seed: all ties
    assert table["sft"]["win_rate"] == 0.5 and table["sft"]["ties"] == 12
    # The win rate is what the reward model's scores of the two responses say.
    rows = result["samples"]
    reward = load_trained(root / "reward", mesh, head="scalar")
    rescored = reward_analysis.reward_scores(reward, prompts, [r["other"] for r in rows],
                                             mesh=mesh, seq_len=64)
    np.testing.assert_allclose(rescored, [r["other_reward"] for r in rows], rtol=1e-5, atol=1e-6)
    points = sum(1.0 if r["other"] != r["sft"] and r["other_reward"] > r["sft_reward"] else
                 0.5 if r["other"] == r["sft"] or r["other_reward"] == r["sft_reward"] else 0.0
                 for r in rows)
    assert table["other"]["win_rate"] == pytest.approx(points / 12)
    assert table["other"]["wins"] + table["other"]["ties"] + table["other"]["losses"] == 12
    assert "win vs sft" in rm_judge.format_table(result)
    with pytest.raises(ValueError, match="reference 'base' is not one of the policies"):
        rm_judge.judge({"sft": root / "sft"}, "base", root / "reward", prompts, mesh=mesh)
