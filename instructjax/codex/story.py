"""The Codex story's report: what the stages of `python -m experiments.codex` produced, put
side by side as one table, one JSON file and a few PNGs.

Inputs are the stages' own outputs: each training run's metrics.jsonl ("eval/loss" by step)
and each pass@k run's summary.json (experiments.passk: a temperature sweep writes one
temperature_<T>/summary.json per temperature and a summary.json over them). Nothing is
recomputed here except what compares runs: the paper's effects, checked as plain
inequalities and reported whichever way they come out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from instructjax.codex import ranking
from instructjax.data.jsonl import DataError, atomic_output, read_jsonl, write_json_atomic

RANKINGS = ("mean_logprob", "sum_logprob", "random", "oracle")


def read_eval_curve(metrics_path: str | Path, metric: str = "eval/loss") -> dict[int, float]:
    """{step: value} of `metric` in a run's metrics.jsonl. A resumed run appends to the file,
    so a step can appear twice: the last record wins."""
    path = Path(metrics_path)
    if not path.is_file():
        raise DataError(f"{path}: no metrics file; did the training stage finish?")
    curve: dict[int, float] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or metric not in record:
                continue
            step, value = record.get("step"), record[metric]
            if not isinstance(step, int) or not isinstance(value, (int, float)):
                raise DataError(f"{path}:{line_no}: expected an integer step and a number "
                                f"{metric!r}, got {step!r} and {value!r}")
            curve[step] = float(value)
    if not curve:
        raise DataError(f"{path}: no {metric!r} records; set --eval_every below --steps")
    return dict(sorted(curve.items()))


def compare_convergence(pretrained: Mapping[int, float], scratch: Mapping[int, float]) -> dict:
    """How much sooner the pretrained start gets there: the loss of both at every eval step
    they share, and the first step at which the pretrained run is already at (or below)
    the scratch run's final loss."""
    common = sorted(set(pretrained) & set(scratch))
    if not common:
        raise DataError("the two runs share no evaluation step; give them the same "
                        "--eval_every and --steps")
    target = scratch[max(scratch)]
    reached = next((s for s in sorted(pretrained) if pretrained[s] <= target), None)
    return {"common_steps": common,
            "pretrained_lower_at_every_step": all(pretrained[s] < scratch[s] for s in common),
            "scratch_final_loss": target,
            "pretrained_final_loss": pretrained[max(pretrained)],
            "pretrained_steps_to_scratch_final": reached,
            "scratch_steps": max(scratch)}


def read_passk_run(out_dir: str | Path) -> dict:
    """A pass@k run (experiments.passk --checkpoint) as {"by_temperature": {T: {...}}},
    each entry holding pass_at_k, pass_at_k_all_problems, ranking_pass_at_1, the number of
    problems sampled and skipped, and samples per problem. Sweeps and single runs alike."""
    out_dir = Path(out_dir)
    top = _read_json(out_dir / "summary.json")
    runs = ({t: out_dir / sub for t, sub in top["runs"].items()} if "runs" in top
            else {f"{top['sampling']['temperature']:g}": out_dir} if "sampling" in top
            else None)
    if runs is None:
        raise DataError(f"{out_dir / 'summary.json'}: not a sampled pass@k run (no 'runs' or "
                        f"'sampling'); run experiments.passk with --checkpoint")
    by_temperature = {}
    for t, run_dir in sorted(runs.items(), key=lambda kv: float(kv[0])):
        s = _read_json(run_dir / "summary.json")
        skipped = s.get("skipped_problems", {}).get("count", 0)
        by_temperature[t] = {
            "pass_at_k": s["pass_at_k"],
            "pass_at_k_all_problems": s.get("pass_at_k_all_problems", s["pass_at_k"]),
            "ranking_pass_at_1": s.get("ranking_pass_at_1", {}),
            "num_problems": s["num_problems"], "skipped_problems": skipped,
            "n_samples": s["samples_per_problem"]["min"],
            "pass_at_1_by_family": pass_at_1_by_family(run_dir / "results.jsonl")}
    return {"dir": str(out_dir), "by_temperature": by_temperature}


def pass_at_1_by_family(results_path: Path) -> dict[str, float]:
    """{family: mean over its problems of (passed samples / samples)} from a pass@k run's
    results.jsonl; the family of task "Gen/<family>/<i>" is "Gen/<family>" (HumanEval's
    tasks form one group). Problems skipped as too long for the context are not in it."""
    by_task: dict[str, list[bool]] = {}
    for _, record in read_jsonl(results_path, required={"task_id": str, "label": str}):
        by_task.setdefault(record["task_id"], []).append(record["label"] == "passed")
    by_family: dict[str, list[float]] = {}
    for task, passed in by_task.items():
        by_family.setdefault(task.rsplit("/", 1)[0], []).append(sum(passed) / len(passed))
    return {f: sum(v) / len(v) for f, v in sorted(by_family.items())}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found; did its stage finish?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg}); rerun its stage") from None


def curves_of(run: dict) -> dict[float, dict[int, float]]:
    """{temperature: {k: pass@k}} of a read_passk_run result."""
    return {float(t): {int(k): v for k, v in r["pass_at_k"].items()}
            for t, r in run["by_temperature"].items()}


def passk_effects(run: dict, ranking_temperature: float) -> dict:
    """Best temperature per k, and whether it rises from k = 1 to the largest k; pass@1 at
    the best temperature; the four rankings' pass@1 at `ranking_temperature`."""
    best = ranking.best_temperature_per_k(curves_of(run))
    if 1 not in best:
        raise DataError(f"{run['dir']}: no pass@1; include 1 in --k")
    t_rank = f"{ranking_temperature:g}"
    if t_rank not in run["by_temperature"]:
        raise DataError(f"{run['dir']}: no samples at the ranking temperature {t_rank}; "
                        f"sampled: {', '.join(run['by_temperature'])}")
    ranks = run["by_temperature"][t_rank]["ranking_pass_at_1"]
    k_max = max(best)
    return {"best_temperature_per_k": {str(k): b for k, b in best.items()},
            "best_pass_at_1": best[1]["pass_at_k"],
            "best_temperature_rises_with_k": (k_max > 1 and best[k_max]["temperature"]
                                              > best[1]["temperature"]),
            "largest_k": k_max,
            "ranking_temperature": ranking_temperature,
            "ranking_pass_at_1": ranks,
            "mean_logprob_beats_random": bool(ranks) and
            ranks["mean_logprob"] > ranks["random"]}


NEW_INSTANCES = "new problems of the training families"
# RL from execution feedback against Codex-S: pass@1 at a low temperature, the largest k at
# a high one (the RL literature reports the first rising while the second falls).
RL_COMPARISONS = ((0.2, "1"), (0.8, "largest"))


def pass_at(run: dict, temperature: float, k: str) -> tuple[str, float] | None:
    """(k, pass@k over all problems) at `temperature`; k "largest" = the largest k sampled
    there. None when that temperature or k was not sampled."""
    r = run["by_temperature"].get(f"{temperature:g}")
    if r is None:
        return None
    values = r["pass_at_k_all_problems"]
    k = max(values, key=int) if k == "largest" else k
    return (k, values[k]) if k in values else None


def rl_effects(runs: dict) -> dict[str, dict]:
    """{'pass@k at T = t': {'codex_s': .., 'rl': ..}} for RL_COMPARISONS ({} without an
    'rl' run)."""
    if "rl" not in runs:
        return {}
    out = {}
    for t, k in RL_COMPARISONS:
        got = {m: pass_at(runs[m], t, k) for m in ("codex_s", "rl")}
        if None not in got.values():
            out[f"pass@{got['rl'][0]} at T = {t:g}"] = {m: v for m, (_, v) in got.items()}
    return out


def build_story(*, pretrained_run: str | Path, scratch_run: str | Path,
                heldout: Mapping[str, str | Path], humaneval: Mapping[str, str | Path],
                ranking_temperature: float, stage_seconds: Mapping[str, float] | None = None,
                new_instances: Mapping[str, str | Path] | None = None,
                backtranslation: str | Path | None = None) -> dict:
    """Everything the report shows, as plain JSON-ready data. `heldout` (problems of
    held-out families), `new_instances` (optional: new problems of the training families)
    and `humaneval` map a model name to its pass@k output directory; heldout, and
    new_instances when given, must name "codex" and "codex_s". `backtranslation` is the
    output directory of experiments.backtranslate (Codex-D), if it ran."""
    sets = {"held-out families": heldout, **({NEW_INSTANCES: new_instances} if new_instances
                                             else {})}
    for title, runs in sets.items():
        missing = {"codex", "codex_s"} - set(runs)
        if missing:
            raise ValueError(f"{title}: pass@k runs missing for {sorted(missing)}")
    loss = {"pretrained": read_eval_curve(Path(pretrained_run) / "metrics.jsonl"),
            "scratch": read_eval_curve(Path(scratch_run) / "metrics.jsonl")}
    convergence = compare_convergence(loss["pretrained"], loss["scratch"])
    evaluations = {}
    claims = {"pretrained start converges faster (lower validation loss at every eval step)":
              convergence["pretrained_lower_at_every_step"]}
    for title, dirs in sets.items():
        runs = {name: read_passk_run(d) for name, d in dirs.items()}
        effects = {name: passk_effects(r, ranking_temperature) for name, r in runs.items()}
        rl = rl_effects(runs)
        evaluations[title] = {"runs": runs, "effects": effects, "rl": rl}
        for what, v in rl.items():
            claims[f"{title}: RL from execution feedback > Codex-S, {what}"] = (
                v["rl"] > v["codex_s"])
        claims[f"{title}: Codex-S pass@1 > Codex pass@1 (best temperature each)"] = (
            effects["codex_s"]["best_pass_at_1"] > effects["codex"]["best_pass_at_1"])
        for name, e in effects.items():
            claims[f"{title}: {name}: best temperature for pass@{e['largest_k']} > for "
                   "pass@1"] = e["best_temperature_rises_with_k"]
            claims[f"{title}: {name}: mean-log-prob ranking beats random (T = "
                   f"{ranking_temperature:g})"] = e["mean_logprob_beats_random"]
    return {
        "stage_seconds": dict(stage_seconds or {}),
        "loss_curves": {name: {str(s): v for s, v in c.items()} for name, c in loss.items()},
        "convergence": convergence,
        "evaluations": evaluations,
        "humaneval": {name: read_passk_run(d) for name, d in humaneval.items()},
        "backtranslation": (None if backtranslation is None
                            else read_backtranslation(backtranslation, evaluations)),
        "paper_effects": claims,
    }


def read_backtranslation(out_dir: str | Path, evaluations: Mapping) -> dict:
    """Back-translation pass@k, and Codex-S's pass@k from the original docstrings of the
    same problems at the same code temperature (when the story sampled it)."""
    s = _read_json(Path(out_dir) / "summary.json")
    if "backtranslation" not in s:
        raise DataError(f"{out_dir}/summary.json: not an experiments.backtranslate summary")
    t = f"{s['backtranslation']['code_temperature']:g}"
    new = evaluations.get(NEW_INSTANCES)  # build_story checked it has codex_s
    original = new["runs"]["codex_s"]["by_temperature"].get(t) if new else None
    return {"pass_at_k": s["pass_at_k"], "num_problems": s["num_problems"],
            "n_samples": s["backtranslation"]["n_samples"], "code_temperature": float(t),
            "docstring_temperature": s["backtranslation"]["docstring_temperature"],
            "original_docstrings_pass_at_k": original["pass_at_k"] if original else None}


def _row(cells, widths) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_story(story: dict) -> str:
    """The printed report: loss curves, pass@k by temperature, best temperature per k,
    rankings, Codex vs Codex-S, HumanEval and the paper's effects."""
    lines = []
    if story["stage_seconds"]:
        lines.append("stage times (s, when each stage last ran): " + ", ".join(
            f"{n} {s:.0f}" for n, s in story["stage_seconds"].items()))
    lines += ["", "validation loss on code, by step (Codex fine-tuned vs from scratch)"]
    loss = story["loss_curves"]
    steps = sorted({int(s) for c in loss.values() for s in c})
    widths = (8, 12, 12)
    lines.append(_row(("step", "pretrained", "scratch"), widths))
    for s in steps:
        lines.append(_row((s, _f(loss["pretrained"].get(str(s))), _f(loss["scratch"].get(str(s)))),
                          widths))
    sections = [(f"generated problems, {title}", ev["runs"])
                for title, ev in story["evaluations"].items()]
    for title, runs in sections + [("HumanEval", story["humaneval"])]:
        for name, run in runs.items():
            lines += ["", f"{title}: {name} pass@k by temperature (over all problems; "
                      f"ones skipped as too long for the context count as failures)"]
            lines += _passk_rows(run)
    for title, ev in story["evaluations"].items():
        lines += ["", f"best temperature per k ({title})"]
        for name, e in ev["effects"].items():
            lines.append(f"  {name:<8} " + ", ".join(
                f"k={k}: T={b['temperature']:g} ({b['pass_at_k']:.3f})"
                for k, b in e["best_temperature_per_k"].items()))
        lines += ["", f"pass@1 picking one of n samples ({title})"]
        widths = (10, 6, 13, 12, 8, 8)
        lines.append(_row(("model", "T", *RANKINGS), widths))
        for name, e in ev["effects"].items():
            r = e["ranking_pass_at_1"]
            lines.append(_row((name, f"{e['ranking_temperature']:g}",
                               *(_f(r.get(k)) for k in RANKINGS)), widths))
        t = next(iter(ev["effects"].values()))["ranking_temperature"]
        by_family = {n: r["by_temperature"][f"{t:g}"]["pass_at_1_by_family"]
                     for n, r in ev["runs"].items()}
        lines += ["", f"pass@1 by family at T = {t:g} ({title}): " + ", ".join(by_family)]
        for family in sorted({f for v in by_family.values() for f in v}):
            lines.append(f"  {family:<28} " + "  ".join(_f(v.get(family))
                                                       for v in by_family.values()))
        lines += ["", f"Codex vs Codex-S, pass@1 at the best temperature ({title}): " +
                  ", ".join(f"{n} {e['best_pass_at_1']:.3f}" for n, e in ev["effects"].items())]
        for what, v in ev.get("rl", {}).items():
            lines.append(f"RL from execution feedback vs Codex-S, {what} ({title}): "
                         f"rl {v['rl']:.3f}, codex_s {v['codex_s']:.3f}")
    bt = story.get("backtranslation")
    if bt:
        lines += ["", f"Codex-D by back-translation ({bt['num_problems']} {NEW_INSTANCES}, "
                  f"{bt['n_samples']} docstrings each at T = {bt['docstring_temperature']:g}, "
                  f"code at T = {bt['code_temperature']:g}): " + ", ".join(
                      f"pass@{k} {v:.3f}" for k, v in bt["pass_at_k"].items())]
        if bt["original_docstrings_pass_at_k"]:
            lines.append("  Codex-S from the original docstrings at that T (the problems whose "
                         "prompts fit): " +
                         ", ".join(f"pass@{k} {v:.3f}" for k, v in
                                   bt["original_docstrings_pass_at_k"].items()
                                   if k in bt["pass_at_k"]))
    lines += ["", "the paper's effects here:"]
    lines += [f"  [{'yes' if ok else 'no '}] {claim}" for claim, ok in
              story["paper_effects"].items()]
    return "\n".join(lines)


def _passk_rows(run: dict) -> list[str]:
    ks = sorted({int(k) for r in run["by_temperature"].values() for k in r["pass_at_k"]})
    widths = (6, 9, 9, 4, *([9] * len(ks)))
    rows = [_row(("T", "problems", "skipped", "n", *(f"pass@{k}" for k in ks)), widths)]
    for t, r in run["by_temperature"].items():
        # over all problems: the ones skipped as too long for the context count as failures
        rows.append(_row((t, r["num_problems"] + r["skipped_problems"], r["skipped_problems"],
                          r["n_samples"], *(_f(r["pass_at_k_all_problems"].get(str(k)))
                                            for k in ks)), widths))
    return rows


_SHORT = {"held-out families": "new families", NEW_INSTANCES: "new problems"}


def _label(name: str, title: str, story: dict) -> str:
    """A model's name in plots: with its problem set once there is more than one."""
    return name if len(story["evaluations"]) == 1 else f"{name}\n({_SHORT.get(title, title)})"


def write_story(story: dict, out_dir: str | Path) -> dict[str, Path]:
    """story.json, story.txt and the plots (loss curves, best temperature per k, pass@1 by
    ranking) into out_dir; the per-model pass@k-vs-k plots stay where experiments.passk
    wrote them and are listed in story.json."""
    from instructjax.codex import story_plots
    out = Path(out_dir)
    effects = [(t, n, e) for t, ev in story["evaluations"].items()
               for n, e in ev["effects"].items()]
    written = {"loss_curves": story_plots.plot_loss_curves(
        {"fine-tuned from the base LM": story["loss_curves"]["pretrained"],
         "from scratch": story["loss_curves"]["scratch"]}, out / "loss_curves.png"),
        "best_temperature": story_plots.plot_best_temperature(
            {_label(n, t, story): e["best_temperature_per_k"] for t, n, e in effects},
            out / "best_temperature_per_k.png"),
        "ranking": story_plots.plot_rankings(
            {_label(n, t, story): e["ranking_pass_at_1"] for t, n, e in effects},
            out / "ranking_pass_at_1.png", temperature=effects[0][2]["ranking_temperature"])}
    passk_plots = {f"passk_vs_k_{n}_{_SHORT.get(t, t).replace(' ', '_')}":
                   Path(r["dir"]) / "passk_vs_k.png"
                   for t, ev in story["evaluations"].items() for n, r in ev["runs"].items()}
    record = {**story, "plots": {**{k: str(v) for k, v in written.items()},
                                 **{k: str(v) for k, v in passk_plots.items() if v.exists()}}}
    write_json_atomic(out / "story.json", record)
    with atomic_output(out / "story.txt") as f:
        f.write(format_story(story) + "\n")
    return {**written, "json": out / "story.json", "text": out / "story.txt"}
