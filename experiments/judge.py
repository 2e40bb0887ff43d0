"""Policies against each other on your own prompts, judged by a trained reward model (the
setting to use when there are no labelers; see instructjax/rlhf/rm_judge.py for what it
can and cannot say).

  python -m experiments.judge --policies=sft=runs/demo/sft,ppo=runs/demo/ppo_ptx \
      --reference=sft --reward_from=runs/demo/reward --prompt_file=my_prompts.jsonl \
      --output_dir=runs/judged

Prints the win-rate table and writes judge.json (the table) and judge_samples.jsonl (every
response with its reward) to --output_dir, atomically.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from experiments.errors import user_facing

FLAGS = flags.FLAGS
flags.DEFINE_list("policies", [], "name=workdir pairs, comma-separated.")
flags.DEFINE_string("reference", None, "The policy the others are compared with (a name).")
flags.DEFINE_string("reward_from", None, "Workdir of the judging reward model.")
flags.DEFINE_string("prompt_file", None, "JSONL with a \"prompt\" field per line.")
flags.DEFINE_string("output_dir", None, "Where judge.json and judge_samples.jsonl go.")
flags.DEFINE_integer("max_prompts", 0, "Judge only the first N prompts (0 = all).")
flags.DEFINE_integer("max_new_tokens", 64, "Response length limit in tokens.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature of every policy.")
flags.DEFINE_integer("seq_len", 256, "Prompt + response tokens the reward model reads.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("mesh", "data:-1,fsdp:1,tensor:1", "Device mesh.")


def main(argv):
    for name in ("policies", "reference", "reward_from", "prompt_file", "output_dir"):
        if not getattr(FLAGS, name):
            raise SystemExit(f"error: --{name} is required")
    policies = {}
    for item in FLAGS.policies:
        name, sep, workdir = item.partition("=")
        if not sep or not name or not workdir:
            raise SystemExit(f"error: --policies: {item!r} is not name=workdir")
        policies[name] = workdir
    from instructjax import parallel
    from instructjax.data.jsonl import DataError, read_jsonl, write_json_atomic, write_jsonl_atomic
    from instructjax.rlhf import rm_judge
    prompts = [r["prompt"] for _, r in read_jsonl(FLAGS.prompt_file, required={"prompt": str})]
    prompts = prompts[:FLAGS.max_prompts or None]
    if not prompts:
        raise DataError(f"{FLAGS.prompt_file}: no prompts")
    result = rm_judge.judge(policies, FLAGS.reference, FLAGS.reward_from, prompts,
                            mesh=parallel.make_mesh(FLAGS.mesh),
                            max_new_tokens=FLAGS.max_new_tokens,
                            temperature=FLAGS.temperature, seed=FLAGS.seed,
                            seq_len=FLAGS.seq_len)
    out = Path(FLAGS.output_dir)
    write_jsonl_atomic(out / "judge_samples.jsonl", result.pop("samples"))
    write_json_atomic(out / "judge.json", result)
    print(rm_judge.format_table(result))


if __name__ == "__main__":
    app.run(user_facing(main, also=(ValueError,)))
