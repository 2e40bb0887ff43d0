"""The main job end to end on a tiny model: pretrain -> SFT, diligent-only SFT ->
comparisons -> RM -> PPO, PPO-ptx, DPO -> evaluation, then a rerun that skips every stage (slow: its own command)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model=tiny", "--model_override=max_len=256", "--vocab_size=512", "--log_every=2",
         "--eval_batches=1", "--host_devices=2"]
STAGES = {
    "pretrain": MODEL + ["--steps=6", "--batch_size=8", "--seq_len=128", "--checkpoint_every=6",
                         "--eval_every=6", "--world_pretrain_docs=150", "--world_sft_train=60",
                         "--world_eval=40", "--world_prompts=60"],
    "sft": MODEL + ["--steps=6", "--batch_size=8", "--seq_len=256", "--checkpoint_every=6",
                    "--eval_every=6"],
    "sft_diligent": MODEL + ["--steps=2", "--batch_size=8", "--seq_len=256",
                             "--checkpoint_every=2", "--eval_every=2"],
    "comparisons": ["--train_prompts=16", "--eval_prompts=8", "--max_new_tokens=8"],
    "reward": MODEL + ["--steps=3", "--batch_size=4", "--pack_rows=12", "--seq_len=256",
                       "--checkpoint_every=3", "--eval_every=3", "--rm_center_coef=0.1"],
    "ppo": ["--iterations=2", "--rollout_batch_size=4", "--max_prompt_len=48",
            "--max_new_tokens=8", "--num_minibatches=2", "--ppo_epochs=1", "--log_every=1",
            "--checkpoint_every=2", "--host_devices=2"],
    "ppo_ptx": ["--iterations=2", "--rollout_batch_size=4", "--max_prompt_len=48",
                "--max_new_tokens=8", "--num_minibatches=2", "--ppo_epochs=1", "--log_every=1",
                "--checkpoint_every=2", "--gamma_ptx=1.0", "--ptx_batch_size=2",
                "--ptx_seq_len=64", "--host_devices=2"],
    "dpo": ["--steps=2", "--batch_size=4", "--seq_len=256", "--dpo_pairs=best_worst",
            "--checkpoint_every=2", "--eval_every=2", "--log_every=1", "--host_devices=2"],
}


def _main_job(tmp_path, flagfiles):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "experiments.instructgpt", f"--workdir={tmp_path / 'run'}",
           "--report_prompts=12", "--report_seq_len=128",
           *(f"--{name}_flags={path}" for name, path in flagfiles.items())]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_main_job_runs_every_stage_then_skips_them(tmp_path):
    flagfiles = {}
    for name, lines in STAGES.items():
        flagfiles[name] = tmp_path / f"{name}.flags"
        flagfiles[name].write_text("\n".join(lines) + "\n")
    first = _main_job(tmp_path, flagfiles)
    run = tmp_path / "run"
    results = json.loads((run / "eval.json").read_text())
    assert results["settings"]["order"] == ["base", "sft", "sft_diligent", "ppo",
                                                    "ppo_ptx", "dpo"]
    for name, entry in results["models"].items():
        assert 0.0 <= entry["win_rate"]["win_rate"] <= 1.0, name
        assert entry["win_rate"]["n"] == 12
        for rate in ("hallucination", "toxic", "instruction_following",
                     "constraint_following"):
            assert 0.0 <= entry["rates"][rate]["rate"] <= 1.0
        assert entry["pretrain_loss"] > 0
    assert results["models"]["sft"]["win_rate"]["win_rate"] == 0.5  # against itself: ties
    for png in ("eval_bars.png", "frontier.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    assert "win vs sft" in first.stdout
    # A rerun finds every stage done and only evaluates again.
    second = _main_job(tmp_path, flagfiles)
    assert second.stderr.count("done already") == 8, second.stderr[-3000:]
