"""RL iteration throughput and where its time goes (sampling, scoring, update), for PPO
and the value-free algorithms; our sampler vs Hugging Face `generate`.

  python -m benchmarks.ppo_iteration                           # demo model, batch 32
  python -m benchmarks.ppo_iteration --algorithm=grpo --group_size=4 --nohf
  python -m benchmarks.ppo_iteration --execution_run=runs/codex/rl   # a finished run's split
  python -m benchmarks.ppo_iteration --model=bench-512 --batch_size=16 --prompt_len=128
  python -m benchmarks.ppo_iteration --nohf                    # without the torch comparison
  python -m benchmarks.ppo_iteration --sampler_only            # sampler vs HF generate only

Reports, for random-init models of one size preset (policy = reference, value = reward):
  - sampler tokens/s: generated tokens per second of `sampling.sample` alone
  - rollout tokens/s: generated tokens per second of the whole rollout (sampling plus the
    policy / reference / value / reward forward passes over prompt + response)
  - learner tokens/s: tokens (prompt + response rows) through the policy and value
    forward + backward per second, over ppo_epochs x num_minibatches updates
  - seconds per PPO iteration: the one jitted iteration (rollout + learner + KL control)
  - the per-phase split of the iteration: sampling (the sampler), scoring (rollout minus
    sampler: the forward passes that give log-probs, values and the reward) and update
    (the learner), each as a share of their sum
--execution_run reads instead the phase times an execution-reward run measured in every
iteration (metrics.jsonl: time/sample, time/sandbox, time/learn) and prints their shares.
and the same generation with transformers' GPT2LMHeadModel.generate (torch, CPU, KV cache)
on the same GPT-2 shape (n_embd, n_layer, n_head, vocab, MLP width; random init), batch and
lengths, sampling on at temperature 1 with no top-k, min_new_tokens = max_new_tokens so
both produce exactly the same number of tokens (our sampler has no EOS to stop at); torch
runs on as many threads as the cores XLA uses and on 1 thread, and its best counts. Compile
time is reported separately and excluded from every rate (best of --repeats runs; the
sampler and HF generate are timed in turns).

The torch comparison needs (not a project dependency; the CPU wheel of torch):
  pip install torch==2.13.0 transformers
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "demo", "Size preset (GPT-2 family for the HF comparison).")
flags.DEFINE_integer("batch_size", 32, "Rollout batch (responses).")
flags.DEFINE_string("algorithm", "ppo", "ppo, grpo or rloo (instructjax/rlhf/algorithms.py).")
flags.DEFINE_integer("group_size", 1, "Responses per prompt (grpo, rloo: >= 2).")
flags.DEFINE_string("execution_run", "", "Report the phase split of this finished "
                    "execution-reward run's metrics.jsonl instead.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens (no padding).")
flags.DEFINE_integer("new_tokens", 24, "Generated tokens per prompt.")
flags.DEFINE_integer("ppo_epochs", 4, "PPO epochs per iteration.")
flags.DEFINE_integer("num_minibatches", 4, "Minibatches per epoch.")
flags.DEFINE_float("gamma_ptx", 0.0, "PPO-ptx weight (0 = plain PPO).")
flags.DEFINE_integer("ptx_batch_size", 4, "Pretraining rows per update (PPO-ptx).")
flags.DEFINE_integer("ptx_seq_len", 128, "Pretraining row length (PPO-ptx).")
flags.DEFINE_string("compute_dtype", "float32", "float32 or bfloat16.")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Device mesh.")
flags.DEFINE_integer("repeats", 3, "Timed runs of each program (the best is reported).")
flags.DEFINE_bool("hf", True, "Compare with transformers' generate (needs torch).")
flags.DEFINE_bool("sampler_only", False, "Time only the sampler (and HF generate).")


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def compile_time(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def xla_cpu_threads() -> int:
    """The cores XLA:CPU's thread pool uses: the ones this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def hf_generate_fn(cfg, prompts_BxP: np.ndarray, new_tokens: int, threads: int):
    """A warmed-up callable running transformers' generate on the same GPT-2 shape."""
    import torch
    import transformers
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=True, eos_token_id=cfg.vocab_size - 1,
        bos_token_id=cfg.vocab_size - 1, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ids = torch.from_numpy(prompts_BxP.astype(np.int64))
    mask = torch.ones_like(ids)

    def run():
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, use_cache=True)
        assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
        return out

    run()  # warm-up
    return run


def best_times_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best of `repeats` for each callable, run in turns, so that a busy machine (other
    processes) slows every contender alike instead of whichever ran at the busy moment."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def execution_split(workdir: str) -> None:
    """Mean seconds per iteration of each phase an execution-reward run logged."""
    import json
    from pathlib import Path
    keys = ("train/time/sample", "train/time/sandbox", "train/time/learn")
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if all(k in r for k in keys)]
    if not rows:
        raise SystemExit(f"error: {workdir}/metrics.jsonl has no {', '.join(keys)}: not an "
                         "execution-reward run (experiments.rl --reward=execution)")
    means = {k.rsplit("/", 1)[-1]: float(np.mean([r[k] for r in rows])) for k in keys}
    total = sum(means.values())
    print(f"{workdir}: {len(rows)} logged iterations, {total:.2f} s each on average")
    for name, s in means.items():
        print(f"  {name:<8} {s:8.3f} s  {100 * s / total:5.1f}%")


def main(argv):
    del argv
    if FLAGS.execution_run:
        return execution_split(FLAGS.execution_run)
    from instructjax import parallel
    from instructjax.config import OptimConfig
    from instructjax.rl_losses import PolicyValueApply
    from instructjax.model.config import preset
    from instructjax.model.transformer import Transformer
    from instructjax.rlhf import ppo, rl_state, rollout
    from instructjax.rlhf.rl_program import build_rl_program
    from instructjax.sampling import sample
    from instructjax.train import state as state_lib

    B, P, N, G = FLAGS.batch_size, FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.group_size
    mesh = parallel.make_mesh(FLAGS.mesh)
    model_cfg = preset(FLAGS.model, compute_dtype=FLAGS.compute_dtype)
    if P + N > model_cfg.max_len:
        raise SystemExit(f"error: prompt_len + new_tokens ({P + N}) exceeds the model's "
                         f"max_len {model_cfg.max_len}")
    eos, pad = -1, 0  # no EOS: every row generates exactly N tokens, like HF's min_new_tokens
    cfg = ppo.PPOConfig(
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=0), iterations=10,
        rollout_batch_size=B, max_prompt_len=P, max_new_tokens=N, ppo_epochs=FLAGS.ppo_epochs,
        num_minibatches=FLAGS.num_minibatches, gamma_ptx=FLAGS.gamma_ptx,
        ptx_batch_size=FLAGS.ptx_batch_size, ptx_seq_len=FLAGS.ptx_seq_len,
        algorithm=FLAGS.algorithm, group_size=G)
    policy, scalar = Transformer(model_cfg), Transformer(model_cfg, head="scalar")
    value = scalar if cfg.algo.uses_value_model else None
    models = rollout.RolloutModels(policy=policy, value=value, reward=scalar)
    program = build_rl_program(cfg, models, mesh, eos_id=eos, pad_id=pad)
    rollout_cfg, tx = program.rollout_cfg, program.tx

    def lm():
        return state_lib.init_params_sharded(policy, mesh, 2, jax.random.key(0))[0]

    def rm():
        return rl_state.init_scalar_from_lm(lm(), program.abstract_frozen["reward"],
                                            jax.random.key(1))

    frozen = {"reference": lm(), "reward": rm()}
    state = program.init_state(lm(), rm() if value is not None else {})
    rng = np.random.default_rng(0)
    # The sampler alone (and HF) on all B rows; the rollout repeats B / G prompts G times.
    prompts_BxP = rng.integers(3, model_cfg.vocab_size, (B, P)).astype(np.int32)
    batch = {"prompt_tokens": prompts_BxP[:B // G], "prompt_mask": np.ones((B // G, P), np.int32)}
    if cfg.use_ptx:
        R, T = cfg.num_updates * cfg.ptx_batch_size, cfg.ptx_seq_len
        toks = rng.integers(3, model_cfg.vocab_size, (R, T + 1)).astype(np.int32)
        batch.update(ptx_inputs=toks[:, :-1], ptx_targets=toks[:, 1:],
                     ptx_positions=np.tile(np.arange(T, dtype=np.int32), (R, 1)),
                     ptx_segment_ids=np.ones((R, T), np.int32),
                     ptx_loss_mask=np.ones((R, T), np.float32))
    gbatch = parallel.global_batch(batch, mesh)
    key = jax.random.key(0)
    beta = state.kl["beta"]

    sampler = parallel.ShardedJit(
        lambda p, x, m, r: sample(p, x, m, r, model=policy, cfg=rollout_cfg.sampling), mesh)
    roll = parallel.ShardedJit(lambda params, frozen, x, m, r, b: rollout.rollout(
        params, frozen, x, m, r, b, models=models, cfg=rollout_cfg), mesh)
    apply = PolicyValueApply.from_models(policy, value)
    learner = parallel.ShardedJit(lambda params, opt_state, ppo_batch, ptx, r: ppo.ppo_update(
        params, opt_state, ppo_batch, ptx, r, cfg=cfg, apply=apply, tx=tx, mesh=mesh), mesh)
    iteration = program.iteration()

    trainable = state.trainable
    ptx = ({k[4:]: v for k, v in gbatch.items() if k.startswith("ptx_")}
           if cfg.use_ptx else None)
    results, compiles = {}, {}
    all_prompts = parallel.global_batch({"x": prompts_BxP, "m": np.ones((B, P), np.int32)}, mesh)
    run_sampler = lambda: sampler(trainable["policy"], all_prompts["x"],  # noqa: E731
                                  all_prompts["m"], key)
    compiles["sampler"] = compile_time(run_sampler)
    if FLAGS.hf:
        if model_cfg.family != "gpt2":
            raise SystemExit("error: the transformers comparison needs a GPT-2 preset")
        try:
            # torch gets the cores XLA uses, and also 1 thread, keeping its best: on a busy
            # (shared) machine, torch's OpenMP threads can wait on each other far longer
            # than the work takes, which would flatter our ratio.
            hf_threads = sorted({xla_cpu_threads(), 1})
            run_hf = {f"hf@{t}": hf_generate_fn(model_cfg, prompts_BxP, N, t) for t in hf_threads}
        except ImportError as e:
            raise SystemExit(f"error: {e}; pip install torch==2.13.0 transformers "
                             "(or pass --nohf)") from None
        results.update(best_times_interleaved({"sampler": run_sampler, **run_hf}, FLAGS.repeats))
    else:
        results["sampler"] = best_time(run_sampler, FLAGS.repeats)
    if not FLAGS.sampler_only:
        run_rollout = lambda: roll(trainable, frozen, gbatch["prompt_tokens"],  # noqa: E731
                                   gbatch["prompt_mask"], key, beta)
        compiles["rollout"] = compile_time(run_rollout)
        results["rollout"] = best_time(run_rollout, FLAGS.repeats)
        ppo_batch, _ = run_rollout()
        run_learner = lambda: learner(  # noqa: E731
            trainable, state.opt_state, ppo_batch, ptx, key)
        compiles["learner"] = compile_time(run_learner)
        results["learner"] = best_time(run_learner, FLAGS.repeats)

        holder = {"state": state}

        def run_iteration():
            holder["state"], metrics = iteration(holder["state"], frozen, gbatch, key)
            return metrics

        compiles["iteration"] = compile_time(run_iteration)
        results["iteration"] = best_time(run_iteration, FLAGS.repeats)
    report(results, compiles, model_cfg, cfg)


def report(results, compiles, model_cfg, cfg):
    B, N = FLAGS.batch_size, FLAGS.new_tokens
    generated = B * N
    learner_tokens = cfg.num_updates * cfg.minibatch_size * cfg.seq_len
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} "
          f"({xla_cpu_threads()} CPU threads)  model: {FLAGS.model} "
          f"({model_cfg.num_params() / 1e6:.2f}M params, {FLAGS.compute_dtype})  batch {B}, "
          f"prompt {FLAGS.prompt_len}, new tokens {N}, {cfg.ppo_epochs} epochs x "
          f"{cfg.num_minibatches} minibatches, gamma_ptx {cfg.gamma_ptx}, {cfg.algorithm} "
          f"(group {cfg.group_size})")
    print(f"  sampler    {generated / results['sampler']:10.0f} generated tokens/s  "
          f"({results['sampler']:.3f} s; compile {compiles['sampler']:.1f} s)")
    if "rollout" in results:
        print(f"  rollout    {generated / results['rollout']:10.0f} generated tokens/s  "
              f"({results['rollout']:.3f} s incl. {4 if cfg.algo.uses_value_model else 3} "
              f"scoring forward passes; compile "
              f"{compiles['rollout']:.1f} s)")
        trained = "policy + value" if cfg.algo.uses_value_model else "policy"
        print(f"  learner    {learner_tokens / results['learner']:10.0f} tokens/s through "
              f"{trained} fwd+bwd ({results['learner']:.3f} s for {cfg.num_updates} "
              f"updates; compile {compiles['learner']:.1f} s)")
        print(f"  iteration  {results['iteration']:10.3f} s per iteration "
              f"(compile {compiles['iteration']:.1f} s)")
        phases = {"sampling": results["sampler"],
                  "scoring": max(results["rollout"] - results["sampler"], 0.0),
                  "update": results["learner"]}
        total = sum(phases.values())
        print("  split      " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in phases.items())
              + f" (of {total:.3f} s; the one jitted iteration took {results['iteration']:.3f} s)")
    hf_runs = {k: v for k, v in results.items() if k.startswith("hf@")}
    if hf_runs:
        import torch
        import transformers
        best = min(hf_runs, key=hf_runs.get)
        hf = hf_runs[best]
        ratio = hf / results["sampler"]
        others = ", ".join(f"{k[3:]} threads {generated / v:.0f}/s" for k, v in hf_runs.items())
        print(f"  HF generate{generated / hf:10.0f} generated tokens/s  ({hf:.3f} s at "
              f"{best[3:]} threads, the best of: {others}; torch {torch.__version__}, "
              f"transformers {transformers.__version__}; timed in turns with the sampler)")
        print(f"  ours / HF: {ratio:.2f}x faster ({'meets' if ratio >= 3 else 'MISSES'} the "
              f"3x target)")


if __name__ == "__main__":
    app.run(main)
