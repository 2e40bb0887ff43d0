"""The reward-model stage end to end: a tiny LM's trunk gets a scalar head, trains on
K-way comparisons (HH-RLHF-style pairs for evaluation), and ends normalised so the
training responses score mean 0 — and stays so when the finished run is started again."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from instructjax import parallel
from instructjax.data import builders, pipeline
from instructjax.train.run import NORMALISE_BATCHES
from instructjax.train.workdir import load_trained

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model=tiny", "--model_override=max_len=256", "--vocab_size=512", "--batch_size=8",
          "--log_every=2", "--warmup_steps=1", "--world_pretrain_docs=150", "--world_sft_train=50",
          "--world_eval=20", "--world_prompts=20", "--host_devices=4"]


def _run(*args, common=COMMON):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", *args, *common], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _comparisons(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = int(rng.integers(4, 10))
            good = f" {i % 7} apples."
            responses = [good] + [f" {'x' * int(rng.integers(1, 9))}!" for _ in range(k - 1)]
            order = rng.permutation(k)
            shuffled = [responses[j] for j in order]
            ranking = sorted(range(k), key=lambda j: (order[j] != 0, j))  # the good one first
            f.write(json.dumps({"prompt": f"How many apples in box {i}?", "responses": shuffled,
                                "ranking": ranking}) + "\n")


def test_reward_model_trains_and_is_normalised(tmp_path):
    data = tmp_path / "data"
    _run("experiments.pretrain", f"--workdir={tmp_path / 'lm'}", f"--data_dir={data}",
         "--steps=4", "--seq_len=64", "--checkpoint_every=4", "--eval_every=4", "--eval_batches=1")
    # The comparisons stage on the world's prompts: K in [4, 9] samples, each ranked.
    _run("experiments.comparisons", f"--policy_from={tmp_path / 'lm'}", f"--data_dir={data}",
         "--train_prompts=6", "--eval_prompts=3", "--max_new_tokens=6", common=[])
    for split, n in (("train", 6), ("eval", 3)):
        rows = [json.loads(line) for line in (data / f"comparisons_{split}.jsonl").open()]
        assert len(rows) == n
        for row in rows:
            assert 4 <= len(row["responses"]) <= 9
            assert sorted(row["ranking"]) == list(range(len(row["responses"])))
            assert row["labeler"].startswith("train" if split == "train" else "heldout")
    assert "labeler_agreement" in json.loads((data / "comparisons_stats.json").read_text())["eval"]

    # Training comparisons in two files (two rounds of labelling), read as one split.
    train = [tmp_path / "cmp_train_1.jsonl", tmp_path / "cmp_train_2.jsonl"]
    heldout = tmp_path / "cmp_eval.jsonl"
    _comparisons(train[0], 32, seed=0)
    _comparisons(train[1], 32, seed=1)
    with open(heldout, "w") as f:  # HH-RLHF's pairwise format loads as K = 2
        for i in range(16):
            prompt = f"\n\nHuman: How many apples in box {i}?\n\nAssistant:"
            f.write(json.dumps({"chosen": prompt + f" {i % 7} apples.",
                                "rejected": prompt + " xxx!"}) + "\n")
    reward = ["experiments.reward", f"--workdir={tmp_path / 'rm'}", f"--data_dir={data}",
              f"--init_from={tmp_path / 'lm'}", f"--train_files={train[0]},{train[1]}",
              f"--eval_files={heldout}",
              "--steps=16", "--seq_len=64", "--pack_rows=24", "--learning_rate=3e-3",
              "--checkpoint_every=8",
              "--eval_every=16", "--weight_decay=0"]
    _run(*reward)
    final = json.loads((tmp_path / "rm" / "final_eval.json").read_text())
    assert final["eval/accuracy"] > 0.9  # the good answer is easy to tell here

    def mean_training_reward():
        mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
        model, params, tokenizer = load_trained(tmp_path / "rm", mesh, head="scalar")
        source = builders.jsonl_data_source({"train": train}, kind="comparison",
                                            data_dir=data / "tfds")["train"]
        total = count = 0.0
        for batch in itertools.islice(pipeline.comparison_batches(
                source, tokenizer, seq_len=64, batch_size=8, shuffle=False, num_epochs=1,
                drop_remainder=False), NORMALISE_BATCHES):
            B, K, T = batch["tokens_BxKxT"].shape
            seg = batch["segment_ids_BxKxT"].reshape(B * K, T)
            values = model.apply({"params": params}, batch["tokens_BxKxT"].reshape(B * K, T),
                                 batch["positions_BxKxT"].reshape(B * K, T), seg)
            last = np.maximum(seg.sum(-1) - 1, 0)
            reward = np.asarray(values)[np.arange(B * K), last]
            valid = batch["valid_BxK"].reshape(-1) > 0
            total += reward[valid].sum()
            count += valid.sum()
        return total / count

    assert abs(mean_training_reward()) < 1e-4
    _run(*reward)  # a finished run started again keeps its normalisation
    assert abs(mean_training_reward()) < 1e-4
