"""experiments.sample: a trained policy sampled on the user's own prompt file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax

from fakes import tiny_world_policy
from instructjax import parallel

ROOT = Path(__file__).resolve().parents[1]


def _sample(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "experiments.sample", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_samples_the_users_prompts(tmp_path):
    mesh = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    tiny_world_policy(tmp_path, mesh, n_sft_train=10, n_sft_eval=10, n_prompts=10)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q: What is 2 + 2?\nA:", "id": "a"}) + "\n"
                       + json.dumps({"prompt": "Once upon a time", "id": "b"}) + "\n")

    out = tmp_path / "samples.jsonl"
    result = _sample(f"--policy_from={tmp_path / 'sft'}", f"--prompt_file={prompts}",
                     f"--output={out}", "--num_samples=3", "--max_new_tokens=8",
                     "--mesh=data:1,fsdp:1,tensor:1")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(i, k) for i in "ab" for k in range(3)]
    assert all(isinstance(r["response"], str) and r["sum_logprob"] <= 0 for r in rows)
    assert len({r["response"] for r in rows if r["id"] == "a"}) > 1  # T = 1 samples differ

    # Bad input: one line naming the file and line, and nothing written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    result = _sample(f"--policy_from={tmp_path / 'sft'}", f"--prompt_file={bad}",
                     f"--output={tmp_path / 'none.jsonl'}", "--mesh=data:1,fsdp:1,tensor:1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{bad}:2" in result.stderr and not (tmp_path / "none.jsonl").exists()
