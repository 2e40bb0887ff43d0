"""The Codex story, stage by stage:

  code corpus -> base LM (embedded world; whitespace-run tokenizer) -> Codex (base fine-tuned
  on code) and the same model from scratch -> Codex-S data (generated problems, mined
  functions) -> Codex-S (Codex fine-tuned on standalone functions) -> optionally RL: GRPO
  from execution feedback on the training families' problems -> pass@k on generated
  problems of held-out families and on new problems of the training families (temperature
  sweeps, rankings) and on HumanEval; Codex-D (docstrings) by back-translation -> the report

Each stage runs as its own experiment script in a subprocess with its own flagfile; a stage
whose final output exists is skipped, and an interrupted training stage resumes from its
checkpoint. The report (story/story.txt, story.json and PNGs) is rebuilt on every run.

  python -m experiments.codex --flagfile=experiments/configs/codex_demo.flags
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from experiments.errors import user_facing
from experiments.stages import run_stage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root directory; each stage gets a subdirectory.")
flags.DEFINE_string("corpus_flags", None, "Flagfile of experiments.code_corpus.")
flags.DEFINE_string("base_flags", None, "Flagfile of the base LM's pretraining.")
flags.DEFINE_string("codex_flags", None, "Flagfile of the code fine-tuning; the from-scratch "
                    "run uses it too (same model, same steps).")
flags.DEFINE_string("codex_data_flags", None, "Flagfile of experiments.codex_data.")
flags.DEFINE_string("codex_s_flags", None, "Flagfile of the Codex-S fine-tuning.")
flags.DEFINE_string("codex_d_flags", "", "Flagfile of the Codex-D fine-tuning (docstrings "
                    "from signature + body); empty = Codex-D left out.")
flags.DEFINE_string("backtranslation_flags", "", "Flagfile of experiments.backtranslate "
                    "(Codex-D docstrings -> Codex-S code -> tests, on the new problems of the "
                    "training families); used with --codex_d_flags.")
flags.DEFINE_string("rl_flags", "", "Flagfile of experiments.rl from execution feedback "
                    "(starts from Codex-S; rewarded on the training problems only); empty = "
                    "left out.")
flags.DEFINE_string("passk_flags", None, "Flagfile of experiments.passk on the held-out "
                    "generated problems (a temperature sweep).")
flags.DEFINE_string("passk_new_flags", "", "Flagfile of experiments.passk on new problems "
                    "of the training families; empty = left out.")
flags.DEFINE_string("humaneval_flags", "", "Flagfile of experiments.passk on HumanEval "
                    "(Codex-S); empty = left out.")
flags.DEFINE_float("ranking_temperature", 0.8, "Temperature whose samples the rankings "
                   "(mean/sum log-prob, random, oracle) are compared at; must be sampled.")

STAGE_SECONDS = "stage_seconds.json"
# The only problems the RL stage is rewarded on: the training families' (codex_data).
RL_PROBLEMS = "problems_train.jsonl"


def models(with_rl: bool) -> tuple[str, ...]:
    """The models whose pass@k the story measures."""
    return ("codex", "codex_s", "rl") if with_rl else ("codex", "codex_s")


def run_stages(root: Path) -> dict[str, float]:
    """Every stage in order; returns the seconds each took in this invocation."""
    seconds: dict[str, float] = {}
    data, corpus, base = root / "data", root / "code_corpus", root / "base"
    codex_data = root / "codex_data"

    def stage(name, module, flagfile, done, args, flag=""):
        if not run_stage(name, module, flagfile, done, args, flag=flag, timings=seconds):
            raise SystemExit(f"error: --{flag or name + '_flags'} is required")

    def train(name, module, flagfile, args, flag=""):
        stage(name, module, flagfile, root / name / "final_eval.json",
              [f"--workdir={root / name}", f"--data_dir={data}", *args], flag)

    stage("corpus", "experiments.code_corpus", FLAGS.corpus_flags, corpus / "report.json",
          [f"--out_dir={corpus}"])
    train("base", "experiments.pretrain", FLAGS.base_flags, [])
    code = [f"--train_files={corpus / 'code_train.jsonl'}",
            f"--eval_files={corpus / 'code_validation.jsonl'}"]
    train("codex", "experiments.pretrain", FLAGS.codex_flags, [f"--init_from={base}", *code])
    train("scratch", "experiments.pretrain", FLAGS.codex_flags,
          [f"--tokenizer_path={base / 'tokenizer.model'}", *code], flag="codex_flags")
    # codex_data writes report.json last; mining reads this workdir's corpus.
    stage("codex_data", "experiments.codex_data", FLAGS.codex_data_flags,
          codex_data / "report.json", [f"--out_dir={codex_data}", "--corpus_files=" + ",".join(
              str(corpus / f) for f in ("code_train.jsonl", "code_validation.jsonl"))])
    train("codex_s", "experiments.sft", FLAGS.codex_s_flags, [
        f"--init_from={root / 'codex'}", f"--train_files={codex_data / 'codex_s_train.jsonl'}",
        f"--eval_files={codex_data / 'codex_s_eval.jsonl'}"])
    if FLAGS.rl_flags:
        train("rl", "experiments.rl", FLAGS.rl_flags, [
            f"--init_from={root / 'codex_s'}", f"--prompt_file={codex_data / RL_PROBLEMS}"],
            flag="rl_flags")
    for model in models(bool(FLAGS.rl_flags)):
        out = root / "passk" / model
        stage(f"passk_{model}", "experiments.passk", FLAGS.passk_flags, out / "summary.json",
              [f"--policy_from={root / model}", f"--problems={codex_data / 'problems_test.jsonl'}",
               f"--out={out}"], flag="passk_flags")
        if FLAGS.passk_new_flags:
            out = root / "passk_new" / model
            stage(f"passk_new_{model}", "experiments.passk", FLAGS.passk_new_flags,
                  out / "summary.json", [f"--policy_from={root / model}", "--problems="
                                         f"{codex_data / 'problems_new_instances.jsonl'}",
                                         f"--out={out}"], flag="passk_new_flags")
    if FLAGS.codex_d_flags:
        train("codex_d", "experiments.sft", FLAGS.codex_d_flags, [
            f"--init_from={root / 'codex'}", f"--train_files={codex_data / 'codex_d_train.jsonl'}",
            f"--eval_files={codex_data / 'codex_d_eval.jsonl'}"])
        out = root / "backtranslation"
        stage("backtranslation", "experiments.backtranslate", FLAGS.backtranslation_flags,
              out / "summary.json", [f"--docstring_checkpoint={root / 'codex_d'}",
                                     f"--code_checkpoint={root / 'codex_s'}", "--problems="
                                     f"{codex_data / 'problems_new_instances.jsonl'}",
                                     f"--out={out}"])
    if FLAGS.humaneval_flags:
        out = root / "passk" / "humaneval_codex_s"
        stage("humaneval", "experiments.passk", FLAGS.humaneval_flags, out / "summary.json",
              [f"--policy_from={root / 'codex_s'}", f"--out={out}"])
    return seconds


def record_seconds(root: Path, seconds: dict[str, float]) -> dict[str, float]:
    """Merges this invocation's stage times into the workdir's record (a skipped stage keeps
    the time it took when it ran), so the report shows every stage's cost."""
    from instructjax.data.jsonl import write_json_atomic
    path = root / STAGE_SECONDS
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded.update({name: round(s, 1) for name, s in seconds.items() if s > 0})
    write_json_atomic(path, recorded)
    return {name: recorded.get(name, 0.0) for name in seconds}


def main(argv):
    if not FLAGS.workdir:
        raise SystemExit("error: --workdir is required")
    root = Path(FLAGS.workdir)
    seconds = record_seconds(root, run_stages(root))

    from instructjax.codex import story
    humaneval = ({"codex_s": root / "passk" / "humaneval_codex_s"} if FLAGS.humaneval_flags
                 else {})
    result = story.build_story(
        pretrained_run=root / "codex", scratch_run=root / "scratch",
        heldout={m: root / "passk" / m for m in models(bool(FLAGS.rl_flags))},
        humaneval=humaneval,
        new_instances=({m: root / "passk_new" / m for m in models(bool(FLAGS.rl_flags))}
                       if FLAGS.passk_new_flags else None),
        backtranslation=(root / "backtranslation" if FLAGS.codex_d_flags
                         and FLAGS.backtranslation_flags else None),
        ranking_temperature=FLAGS.ranking_temperature, stage_seconds=seconds)
    written = story.write_story(result, root / "story")
    print(story.format_story(result))
    print("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    app.run(user_facing(main, also=(ValueError,)))
