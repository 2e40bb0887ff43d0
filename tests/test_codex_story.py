"""The Codex story's report: loss curves read from metrics files (resumed runs, bad lines),
the convergence comparison, pass@k runs read back (sweeps and single runs), the table and
the plots, on synthetic stage outputs; and (slow) the whole story end to end on a tiny model,
then a rerun that skips every stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructjax.codex import passk, ranking, story
from instructjax.data.jsonl import DataError

ROOT = Path(__file__).resolve().parents[1]


def _write_metrics(path: Path, curve: dict[int, float], extra_lines=()):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step, loss in curve.items():
            f.write(json.dumps({"step": step, "train/loss": loss + 0.1}) + "\n")
            f.write(json.dumps({"step": step, "eval/loss": loss, "eval/accuracy": 0.5}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def _summary(passed_per_problem, temperature, skipped=0):
    """A per-temperature summary as experiments.passk writes it, built with the library's own
    pass@k and ranking functions from pass flags and log-probs per problem."""
    task_ids, labels, flags, sums, means = [], [], [], [], []
    for j, row in enumerate(passed_per_problem):
        flags.append([ok for ok, _ in row])
        # log-probs: a passing sample gets the higher mean, so mean-log-prob ranking finds it
        means.append([lp for _, lp in row])
        sums.append([lp * (i + 1) for i, (_, lp) in enumerate(row)])
        for ok, _ in row:
            task_ids.append(f"Gen/{'odd' if j % 2 else 'even'}/{j}")
            labels.append("passed" if ok else "failed")
    s = passk.summarize(task_ids, labels, (1, 2, 4))
    s["ranking_pass_at_1"] = ranking.compare_rankings(flags, sums, means)
    s["sampling"] = {"temperature": temperature}
    s["skipped_problems"] = {"count": skipped, "task_ids": [f"long/{i}" for i in range(skipped)]}
    if skipped:
        total = s["num_problems"] + skipped
        s["pass_at_k_all_problems"] = {k: v * s["num_problems"] / total
                                       for k, v in s["pass_at_k"].items()}
    return s


def _write_run(out: Path, rows, temperature, skipped=0):
    """summary.json and results.jsonl of one temperature, as experiments.passk writes them."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(_summary(rows, temperature, skipped)))
    with open(out / "results.jsonl", "w") as f:
        for j, row in enumerate(rows):
            for i, (ok, _) in enumerate(row):
                record = {"task_id": f"Gen/{'odd' if j % 2 else 'even'}/{j}", "sample_index": i,
                          "label": "passed" if ok else "failed"}
                f.write(json.dumps(record) + "\n")


def _write_sweep(out: Path, by_temperature: dict[float, list]):
    runs = {}
    for t, rows in by_temperature.items():
        sub = out / f"temperature_{t:g}"
        _write_run(sub, rows, t)
        runs[f"{t:g}"] = sub.name
    (out / "summary.json").write_text(json.dumps({"runs": runs}))


# Codex: low temperature solves one problem reliably, high temperature solves more problems
# once in a while (so the best temperature rises with k). Mean log-prob prefers passing samples.
F, P = (False, -2.0), (True, -0.5)
CODEX = {0.2: [[P, P, P, P], [F, F, F, F], [F, F, F, F]],
         0.8: [[P, F, F, P], [F, F, P, F], [F, P, F, F]]}
CODEX_S = {0.2: [[P, P, P, P], [P, P, F, P], [F, F, F, F]],
           0.8: [[P, F, P, P], [F, P, P, F], [F, P, F, F]]}


@pytest.fixture
def stage_outputs(tmp_path):
    _write_metrics(tmp_path / "codex", {10: 3.0, 20: 2.6, 30: 2.4})
    _write_metrics(tmp_path / "scratch", {10: 5.0, 20: 3.4, 30: 2.8})
    _write_sweep(tmp_path / "passk" / "codex", CODEX)
    _write_sweep(tmp_path / "passk" / "codex_s", CODEX_S)
    _write_sweep(tmp_path / "passk_new" / "codex", CODEX_S)  # another set: other results
    _write_sweep(tmp_path / "passk_new" / "codex_s", CODEX)
    _write_run(tmp_path / "passk" / "humaneval", [[F, P], [F, F]], 0.2, skipped=2)
    return tmp_path


FAMILIES = "held-out families"


def _build(root, **kw):
    return story.build_story(
        pretrained_run=root / "codex", scratch_run=root / "scratch",
        heldout={"codex": root / "passk" / "codex", "codex_s": root / "passk" / "codex_s"},
        humaneval={"codex_s": root / "passk" / "humaneval"}, ranking_temperature=0.8,
        stage_seconds={"base": 12.0}, **kw)


def test_eval_curve_takes_the_last_record_of_a_resumed_step(tmp_path):
    _write_metrics(tmp_path, {10: 3.0, 20: 2.5},
                   extra_lines=[json.dumps({"step": 20, "eval/loss": 2.25}), ""])
    assert story.read_eval_curve(tmp_path / "metrics.jsonl") == {10: 3.0, 20: 2.25}


def test_eval_curve_errors_name_the_file_and_line(tmp_path):
    _write_metrics(tmp_path, {10: 3.0}, extra_lines=["{not json"])
    with pytest.raises(DataError, match=r"metrics\.jsonl:3: not JSON"):
        story.read_eval_curve(tmp_path / "metrics.jsonl")
    _write_metrics(tmp_path, {})
    with pytest.raises(DataError, match="no 'eval/loss' records"):
        story.read_eval_curve(tmp_path / "metrics.jsonl")
    with pytest.raises(DataError, match="no metrics file"):
        story.read_eval_curve(tmp_path / "missing" / "metrics.jsonl")


def test_convergence_compares_shared_steps():
    pretrained = {10: 3.0, 20: 2.6, 30: 2.4}
    out = story.compare_convergence(pretrained, {10: 5.0, 20: 3.4, 30: 2.7})
    assert out["pretrained_lower_at_every_step"]
    assert out["pretrained_steps_to_scratch_final"] == 20  # 2.6 <= scratch final 2.7
    out = story.compare_convergence(pretrained, {10: 5.0, 20: 2.5, 30: 2.5})
    assert not out["pretrained_lower_at_every_step"]  # scratch is lower at step 20
    assert out["pretrained_steps_to_scratch_final"] == 30
    with pytest.raises(DataError, match="share no evaluation step"):
        story.compare_convergence({10: 1.0}, {20: 1.0})


def test_story_reports_the_effects_the_stage_outputs_show(stage_outputs):
    result = _build(stage_outputs, new_instances={
        m: stage_outputs / "passk_new" / m for m in ("codex", "codex_s")})
    assert list(result["evaluations"]) == [FAMILIES, story.NEW_INSTANCES]
    effects = result["evaluations"][FAMILIES]["effects"]
    for name, sweep in (("codex", CODEX), ("codex_s", CODEX_S)):
        curves = {t: {int(k): v for k, v in _summary(rows, t)["pass_at_k"].items()}
                  for t, rows in sweep.items()}
        best = ranking.best_temperature_per_k(curves)
        assert effects[name]["best_pass_at_1"] == best[1]["pass_at_k"]
        assert effects[name]["best_temperature_rises_with_k"] == (
            best[4]["temperature"] > best[1]["temperature"])
    assert effects["codex"]["best_temperature_rises_with_k"]  # T=0.2 at k=1, 0.8 at k=4
    assert effects["codex_s"]["best_pass_at_1"] > effects["codex"]["best_pass_at_1"]
    assert effects["codex"]["mean_logprob_beats_random"]
    # problems 0 and 2 form family "even", problem 1 "odd": mean of per-problem pass rates
    by_family = result["evaluations"][FAMILIES]["runs"]["codex_s"]["by_temperature"]["0.8"][
        "pass_at_1_by_family"]
    assert by_family == {"Gen/even": pytest.approx((3 / 4 + 1 / 4) / 2), "Gen/odd": 0.5}
    claims = result["paper_effects"]
    assert claims["pretrained start converges faster (lower validation loss at every eval step)"]
    assert claims[f"{FAMILIES}: Codex-S pass@1 > Codex pass@1 (best temperature each)"]
    # The new-instance set holds the two sweeps swapped: Codex-S does worse there.
    assert not claims[f"{story.NEW_INSTANCES}: Codex-S pass@1 > Codex pass@1 (best "
                      "temperature each)"]
    assert claims[f"{story.NEW_INSTANCES}: codex_s: best temperature for pass@4 > for pass@1"]
    human = result["humaneval"]["codex_s"]["by_temperature"]["0.2"]
    assert human["skipped_problems"] == 2 and human["num_problems"] == 2
    # skipped problems count as failures over all problems: pass@1 0.25 over the 2 sampled
    assert human["pass_at_k_all_problems"]["1"] == pytest.approx(0.125)


def test_story_table_and_files(stage_outputs):
    result = _build(stage_outputs)
    text = story.format_story(result)
    for row in ("validation loss on code", f"generated problems, {FAMILIES}: codex pass@k",
                f"generated problems, {FAMILIES}: codex_s pass@k", "HumanEval: codex_s pass@k",
                f"best temperature per k ({FAMILIES})", "pass@1 picking one of n samples",
                "Codex vs Codex-S", "the paper's effects here:", "stage times (s",
                f"pass@1 by family at T = 0.8 ({FAMILIES}): codex, codex_s"):
        assert row in text, row
    lines = text.splitlines()
    header = lines.index("validation loss on code, by step (Codex fine-tuned vs from scratch)")
    assert lines[header + 2].split() == ["10", "3.000", "5.000"]
    written = story.write_story(result, stage_outputs / "story")
    for key in ("loss_curves", "best_temperature", "ranking"):
        assert written[key].read_bytes()[:4] == b"\x89PNG", key
    saved = json.loads(written["json"].read_text())
    assert saved["loss_curves"]["scratch"] == {"10": 5.0, "20": 3.4, "30": 2.8}
    assert set(saved["plots"]) >= {"loss_curves", "best_temperature", "ranking"}
    assert written["text"].read_text().strip() == text
    assert not list((stage_outputs / "story").glob("*.tmp"))


def test_story_errors_name_what_is_missing(stage_outputs):
    with pytest.raises(DataError, match="no samples at the ranking temperature 0.6"):
        story.build_story(
            pretrained_run=stage_outputs / "codex", scratch_run=stage_outputs / "scratch",
            heldout={m: stage_outputs / "passk" / m for m in ("codex", "codex_s")},
            humaneval={}, ranking_temperature=0.6)
    (stage_outputs / "passk" / "codex" / "temperature_0.8" / "summary.json").unlink()
    with pytest.raises(DataError, match=r"temperature_0\.8/summary\.json: not found"):
        _build(stage_outputs)
    with pytest.raises(ValueError, match="codex_s"):
        story.build_story(pretrained_run=stage_outputs / "codex",
                          scratch_run=stage_outputs / "scratch",
                          heldout={"codex": stage_outputs / "passk" / "codex"}, humaneval={},
                          ranking_temperature=0.8)


TINY = ["--model=tiny", "--model_override=max_len=512", "--vocab_size=512", "--log_every=2",
        "--eval_batches=1"]
STAGES = {
    "corpus": ["--flagfile=experiments/configs/code_corpus.flags", "--max_files=60",
               "--max_bytes=400000", "--validation_fraction=0.2"],
    "base": TINY + ["--steps=4", "--batch_size=4", "--seq_len=128", "--eval_every=4",
                    "--checkpoint_every=4", "--world_pretrain_docs=150", "--world_sft_train=20",
                    "--world_eval=20", "--world_prompts=20"],
    "codex": TINY + ["--steps=4", "--batch_size=4", "--seq_len=128", "--eval_every=2",
                     "--checkpoint_every=4", "--learning_rate=1e-3", "--warmup_steps=1"],
    "codex_data": ["--flagfile=experiments/configs/codex_data.flags", "--per_family_train=2",
                   "--per_family_test=1", "--max_mined=4",
                   "--max_prompt_chars=250"],
    "codex_s": TINY + ["--steps=2", "--batch_size=4", "--seq_len=512", "--eval_every=2",
                       "--checkpoint_every=2"],
    "passk": ["--temperatures=0.2,0.8", "--n_samples=2", "--k=1,2", "--max_new_tokens=12",
              "--batch_size=16"],
    "passk_new": ["--temperatures=0.8", "--n_samples=2", "--k=1,2", "--max_new_tokens=12",
                  "--batch_size=16"],
    "codex_d": TINY + ["--steps=2", "--batch_size=4", "--seq_len=512", "--eval_every=2",
                       "--checkpoint_every=2"],
    "backtranslation": ["--n_samples=2", "--k=1,2", "--temperature=0.8",
                        "--max_docstring_tokens=8", "--max_new_tokens=12", "--batch_size=16"],
    "humaneval": ["--temperature=0.2", "--n_samples=1", "--k=1", "--max_new_tokens=12",
                  "--batch_size=64"],
    "rl": ["--algorithm=grpo", "--group_size=2", "--rollout_batch_size=4", "--iterations=2",
           "--num_minibatches=1", "--ppo_epochs=1", "--max_prompt_len=128",
           "--max_new_tokens=12", "--timeout_s=2", "--memory_mb=256", "--workers=2",
           "--checkpoint_every=2", "--reward=execution"],
}
ALL_STAGES = ("corpus", "base", "codex", "scratch", "codex_data", "codex_s", "rl",
              "passk_codex", "passk_new_codex", "passk_codex_s", "passk_new_codex_s",
              "passk_rl", "passk_new_rl", "codex_d", "backtranslation", "humaneval")


def _story(tmp_path, flagfiles):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "experiments.codex", f"--workdir={tmp_path / 'run'}",
           "--ranking_temperature=0.8",
           *(f"--{name}_flags={path}" for name, path in flagfiles.items())]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_codex_story_runs_every_stage_then_skips_them(tmp_path):
    flagfiles = {}
    for name, lines in STAGES.items():
        flagfiles[name] = tmp_path / f"{name}.flags"
        flagfiles[name].write_text("\n".join(lines) + "\n")
    first = _story(tmp_path, flagfiles)
    run = tmp_path / "run"
    for path in ("code_corpus/report.json", "base/final_eval.json", "codex/final_eval.json",
                 "scratch/final_eval.json", "codex_data/report.json", "codex_s/final_eval.json",
                 "passk/codex/summary.json", "passk/codex_s/summary.json",
                 "passk_new/codex/summary.json", "passk_new/codex_s/summary.json",
                 "codex_d/final_eval.json", "backtranslation/summary.json",
                 "backtranslation/docstrings.jsonl",
                 "passk/humaneval_codex_s/summary.json", "rl/final_eval.json",
                 "passk/rl/summary.json", "passk_new/rl/summary.json"):
        assert (run / path).is_file(), path
    # RL is rewarded on the training families' problems only, which share no task with the
    # held-out families or the new problems it is evaluated on.
    rl_config = json.loads((run / "rl" / "run_config.json").read_text())["config"]
    assert rl_config["prompt_file"] == str(run / "codex_data" / "problems_train.jsonl")
    rewarded = {json.loads(l)["task_id"] for l in open(rl_config["prompt_file"])}
    for held_out in ("problems_test.jsonl", "problems_new_instances.jsonl"):
        assert not rewarded & {json.loads(l)["task_id"] for l in
                               open(run / "codex_data" / held_out)}, held_out
    # the from-scratch run shares the base's tokenizer but not its weights
    assert (run / "scratch" / "tokenizer.model").read_bytes() == \
        (run / "base" / "tokenizer.model").read_bytes()
    scratch_argv = json.loads((run / "scratch" / "run_config.json").read_text())["argv"]
    assert not any(a.startswith("--init_from=") and a != "--init_from=" for a in scratch_argv)
    saved = json.loads((run / "story" / "story.json").read_text())
    assert set(saved["stage_seconds"]) == set(ALL_STAGES)
    assert all(s > 0 for s in saved["stage_seconds"].values()), saved["stage_seconds"]
    assert list(saved["loss_curves"]["pretrained"]) == ["2", "4"]
    for title, temperatures in ((FAMILIES, ["0.2", "0.8"]), (story.NEW_INSTANCES, ["0.8"])):
        evaluation = saved["evaluations"][title]
        for model in ("codex", "codex_s", "rl"):
            sweep = evaluation["runs"][model]["by_temperature"]
            assert list(sweep) == temperatures
            assert all(r["n_samples"] == 2 and 0 <= r["pass_at_k"]["1"] <= 1
                       for r in sweep.values())
            assert set(evaluation["effects"][model]["ranking_pass_at_1"]) == {
                "mean_logprob", "sum_logprob", "random", "oracle"}
    human = saved["humaneval"]["codex_s"]["by_temperature"]["0.2"]
    assert human["num_problems"] + human["skipped_problems"] == 164
    # Back-translation: 2 docstrings -> 2 programs per new problem, compared with Codex-S
    # from the original docstrings at the same temperature (0.8, sampled by passk_new).
    bt = saved["backtranslation"]
    assert bt["n_samples"] == 2 and bt["code_temperature"] == 0.8
    assert set(bt["pass_at_k"]) == {"1", "2"} and bt["original_docstrings_pass_at_k"] == (
        saved["evaluations"][story.NEW_INSTANCES]["runs"]["codex_s"]["by_temperature"]["0.8"]
        ["pass_at_k"])
    assert "Codex-D by back-translation" in first.stdout
    for png in ("loss_curves.png", "best_temperature_per_k.png", "ranking_pass_at_1.png"):
        assert (run / "story" / png).read_bytes()[:4] == b"\x89PNG", png
    for row in ("validation loss on code", f"generated problems, {FAMILIES}: codex pass@k",
                f"generated problems, {story.NEW_INSTANCES}: codex_s pass@k",
                "HumanEval: codex_s pass@k", "best temperature per k",
                "pass@1 picking one of n samples", "the paper's effects here:"):
        assert row in first.stdout, row
    # A rerun finds every stage done, keeps the recorded stage times and rebuilds the report.
    second = _story(tmp_path, flagfiles)
    assert second.stderr.count("done already") == len(ALL_STAGES), second.stderr[-3000:]
    again = json.loads((run / "story" / "story.json").read_text())
    assert again["stage_seconds"] == saved["stage_seconds"]


# RL after Codex-S: more reliable at T = 0.2, fewer problems ever solved at T = 0.8.
RL = {0.2: [[P, P, P, P], [P, P, P, P], [F, F, F, F]],
      0.8: [[P, P, P, P], [P, P, P, F], [F, F, F, F]]}


def test_story_compares_rl_with_codex_s_as_measured(stage_outputs):
    _write_sweep(stage_outputs / "passk" / "rl", RL)
    runs = {m: stage_outputs / "passk" / m for m in ("codex", "codex_s", "rl")}
    result = story.build_story(pretrained_run=stage_outputs / "codex",
                               scratch_run=stage_outputs / "scratch", heldout=runs,
                               humaneval={}, ranking_temperature=0.8)

    def measured(model, t, k):
        return json.loads((runs[model] / f"temperature_{t}" / "summary.json").read_text())[
            "pass_at_k"][k]

    rl = result["evaluations"][FAMILIES]["rl"]
    assert rl == {"pass@1 at T = 0.2": {m: measured(m, "0.2", "1") for m in ("codex_s", "rl")},
                  "pass@4 at T = 0.8": {m: measured(m, "0.8", "4") for m in ("codex_s", "rl")}}
    claims = result["paper_effects"]
    assert claims[f"{FAMILIES}: RL from execution feedback > Codex-S, pass@1 at T = 0.2"]
    assert not claims[f"{FAMILIES}: RL from execution feedback > Codex-S, pass@4 at T = 0.8"]
    assert "RL from execution feedback vs Codex-S, pass@4 at T = 0.8" in story.format_story(result)


def test_story_reports_backtranslation_next_to_original_docstrings(stage_outputs):
    out = stage_outputs / "backtranslation"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({
        "pass_at_k": {"1": 0.25, "2": 0.5}, "num_problems": 3,
        "backtranslation": {"n_samples": 4, "code_temperature": 0.8,
                            "docstring_temperature": 0.8}}))
    result = _build(stage_outputs, backtranslation=out, new_instances={
        m: stage_outputs / "passk_new" / m for m in ("codex", "codex_s")})
    bt = result["backtranslation"]
    assert bt["pass_at_k"] == {"1": 0.25, "2": 0.5}
    assert bt["original_docstrings_pass_at_k"] == _summary(CODEX[0.8], 0.8)["pass_at_k"]
    assert "Codex-D by back-translation (3 new problems" in story.format_story(result)
    (out / "summary.json").write_text(json.dumps({"pass_at_k": {}}))
    with pytest.raises(DataError, match="not an experiments.backtranslate summary"):
        _build(stage_outputs, backtranslation=out)
