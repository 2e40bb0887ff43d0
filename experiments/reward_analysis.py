"""How far a reward model is from the labelers, and what it can buy: pairwise accuracy by
task kind on the held-out comparisons next to judges that know more or less than it, and
the win rate of best-of-n sampling picked by it or by the gold score.

  python -m experiments.reward_analysis --workdir=runs/demo

--workdir is a finished `experiments.instructgpt` run (data/, sft/, reward/ under it);
--data_dir, --policy_from and --reward_from name the parts of another layout. Prints a
table and writes it as JSON to --out (default <workdir>/reward_analysis.json).
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from experiments.errors import user_facing

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished instructgpt run: data/, sft/, reward/ under it.")
flags.DEFINE_string("data_dir", None, "The world's data (default <workdir>/data).")
flags.DEFINE_string("policy_from", None, "The SFT run that wrote the comparisons (default <workdir>/sft).")
flags.DEFINE_string("reward_from", None, "The reward model's run (default <workdir>/reward).")
flags.DEFINE_string("out", None, "JSON output (default <workdir>/reward_analysis.json).")
flags.DEFINE_integer("best_of", 8, "Most samples per prompt for best-of-n.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (the evaluation's).")
flags.DEFINE_integer("max_new_tokens", 32, "Response length limit (the evaluation's).")
flags.DEFINE_integer("seq_len", 192, "Tokens of prompt + response the reward model reads.")
flags.DEFINE_integer("num_prompts", 0, "Held-out prompts for best-of-n (0 = all).")
flags.DEFINE_integer("seed", 0, "Sampling and labeler seed (the evaluation's).")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Device mesh.")


def main(argv):
    workdir = Path(FLAGS.workdir) if FLAGS.workdir else None
    paths = {}
    for flag, default in (("data_dir", "data"), ("policy_from", "sft"), ("reward_from", "reward"),
                          ("out", "reward_analysis.json")):
        value = getattr(FLAGS, flag) or (workdir / default if workdir else None)
        if value is None:
            raise SystemExit(f"error: give --workdir or --{flag}")
        paths[flag] = Path(value)
    for flag in ("data_dir", "policy_from", "reward_from"):
        if not paths[flag].exists():
            raise SystemExit(f"error: --{flag} {paths[flag]} does not exist; run the pipeline "
                             "(python -m experiments.instructgpt) first")
    for name in ("prompts_eval.jsonl", "comparisons_eval.jsonl", "comparisons_stats.json"):
        if not (paths["data_dir"] / name).exists():
            raise SystemExit(f"error: {paths['data_dir'] / name} not found: --data_dir must hold "
                             "the world's prompts and the comparisons stage's output")
    from instructjax import parallel
    from instructjax.data.jsonl import write_json_atomic
    from instructjax.rlhf import reward_analysis
    result = reward_analysis.analyse(
        data_dir=paths["data_dir"], policy_dir=paths["policy_from"],
        reward_dir=paths["reward_from"], mesh=parallel.make_mesh(FLAGS.mesh),
        best_of=FLAGS.best_of, temperature=FLAGS.temperature,
        max_new_tokens=FLAGS.max_new_tokens, seq_len=FLAGS.seq_len, seed=FLAGS.seed,
        num_prompts=FLAGS.num_prompts)
    write_json_atomic(paths["out"], result)
    print(reward_analysis.format_report(result))
    print(f"\nwritten to {paths['out']}")


if __name__ == "__main__":
    app.run(user_facing(main, also=(ValueError,)))
