"""Samples a trained policy (pretraining, SFT, DPO or PPO workdir) on your own prompts.

  python -m experiments.sample --policy_from=runs/demo/ppo_ptx \
      --prompt_file=my_prompts.jsonl --output=runs/my_samples.jsonl --num_samples=4

--prompt_file holds one {"prompt": ...} per line (other fields are kept). --output gets one
line per sample, written atomically: the input record plus "response", "sample" (0..n-1),
"sum_logprob", "mean_logprob" (under the sampling temperature) and "ended" (the policy
produced its EOS or a --stop string within --max_new_tokens).
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.errors import user_facing

FLAGS = flags.FLAGS
flags.DEFINE_string("policy_from", None, "Workdir of the policy to sample from.")
flags.DEFINE_string("prompt_file", None, "JSONL with a \"prompt\" field per line.")
flags.DEFINE_string("output", None, "JSONL to write the samples to.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("max_new_tokens", 64, "Response length limit in tokens.")
flags.DEFINE_list("stop", [], "Strings that end a response (comma-separated; \\n escapes).")
flags.DEFINE_integer("batch_size", 32, "Prompts sampled together.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("mesh", "data:-1,fsdp:1,tensor:1", "Device mesh for sampling.")


def main(argv):
    for name in ("policy_from", "prompt_file", "output"):
        if not getattr(FLAGS, name):
            raise SystemExit(f"error: --{name} is required")
    if FLAGS.num_samples < 1:
        raise SystemExit(f"error: --num_samples must be >= 1, got {FLAGS.num_samples}")
    import jax
    from instructjax import parallel
    from instructjax.data.jsonl import DataError, read_jsonl, write_jsonl_atomic
    from instructjax.rlhf.generate import generate
    from instructjax.sampling import SamplingConfig
    from instructjax.train.workdir import load_trained
    records = [r for _, r in read_jsonl(FLAGS.prompt_file, required={"prompt": str})]
    if not records:
        raise DataError(f"{FLAGS.prompt_file}: no prompts")
    mesh = parallel.make_mesh(FLAGS.mesh)
    model, params, tokenizer = load_trained(FLAGS.policy_from, mesh, flag="--policy_from")
    sampling = SamplingConfig(max_new_tokens=FLAGS.max_new_tokens, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id, temperature=FLAGS.temperature,
                              top_p=FLAGS.top_p)
    stop = tuple(s.encode().decode("unicode_escape") for s in FLAGS.stop)
    out = []
    for k in range(FLAGS.num_samples):
        generations = generate(params, model, tokenizer, [r["prompt"] for r in records],
                               sampling=sampling, mesh=mesh, batch_size=FLAGS.batch_size,
                               rng=jax.random.fold_in(jax.random.key(FLAGS.seed), k),
                               stop=stop)
        out += [(i, dict(r, response=g.text, sample=k, sum_logprob=g.sum_logprob,
                         mean_logprob=g.mean_logprob, ended=g.ended))
                for i, (r, g) in enumerate(zip(records, generations))]
    out = [row for _, row in sorted(out, key=lambda x: (x[0], x[1]["sample"]))]
    write_jsonl_atomic(FLAGS.output, out)
    print(f"{len(out)} samples ({FLAGS.num_samples} per prompt) of {len(records)} prompts "
          f"written to {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
    app.run(user_facing(main, also=(ValueError,)))
