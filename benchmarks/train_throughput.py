"""Training throughput against the same machine's dense-matmul FLOP/s, measured in one run.

  python -m benchmarks.train_throughput                      # bench-512 (d_model 512)
  python -m benchmarks.train_throughput --batch_size=16 --compute_dtype=bfloat16

Prints tokens/s, achieved model FLOP/s (6N + attention per token, the same count the
training loop uses for MFU) and their ratio to the FLOP/s of a large jitted matmul in the
same dtype on the same devices: the practical peak on a shared machine.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "bench-512", "Size preset.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
flags.DEFINE_string("compute_dtype", "float32", "float32 or bfloat16.")
flags.DEFINE_bool("remat", False, "Rematerialise blocks.")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Device mesh.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul used as the peak.")


def matmul_flops_per_sec(n: int, dtype, mesh) -> float:
    """FLOP/s of a jitted n x n matmul sharded over all devices (best of several)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    devices = mesh.devices.size
    a = jax.device_put(jnp.ones((n * devices, n), dtype), NamedSharding(mesh, P(mesh.axis_names)))
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: (a @ b).sum())
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n * n * n * devices / best


def main(argv):
    del argv
    from instructjax import parallel
    from instructjax.config import OptimConfig
    from instructjax.losses import LMLossConfig, Objective, lm_loss, make_apply
    from instructjax.model.config import preset
    from instructjax.model.transformer import Transformer
    from instructjax.train import state as state_lib, step as step_lib

    mesh = parallel.make_mesh(FLAGS.mesh)
    cfg = preset(FLAGS.model, max_len=max(FLAGS.seq_len, preset(FLAGS.model).max_len),
                 compute_dtype=FLAGS.compute_dtype, remat=FLAGS.remat)
    model = Transformer(cfg)
    optim = OptimConfig(learning_rate=1e-4, warmup_steps=0)
    tx = state_lib.make_optimizer(optim, 100)
    state, shardings = state_lib.init_state(model, tx, mesh, FLAGS.seq_len, jax.random.key(0))
    step = step_lib.make_train_step(Objective(lm_loss, LMLossConfig()), apply=make_apply(model),
                                    tx=tx, schedule=state_lib.make_schedule(optim, 100), mesh=mesh,
                                    state_shardings=shardings)
    rng = np.random.default_rng(0)
    B, T = FLAGS.batch_size, FLAGS.seq_len
    tokens = rng.integers(4, cfg.vocab_size, size=(B, T + 1)).astype(np.int32)
    batch = parallel.global_batch({
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}, mesh)
    key = jax.random.key(1)
    state, metrics = step(state, batch, key)  # compile + warm up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    tokens_per_sec = B * T / step_time
    model_flops = cfg.flops_per_token(T) * tokens_per_sec
    dtype = jnp.bfloat16 if FLAGS.compute_dtype == "bfloat16" else jnp.float32
    peak = matmul_flops_per_sec(FLAGS.matmul_size, dtype, mesh)

    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}  mesh {dict(mesh.shape)}")
    print(f"model: {FLAGS.model}  params {cfg.num_params():,} (non-embedding "
          f"{cfg.num_params(non_embedding=True):,})  batch {B} x {T}  dtype {FLAGS.compute_dtype}")
    print(f"step time (median of {FLAGS.steps}): {step_time * 1e3:.1f} ms")
    print(f"tokens/s: {tokens_per_sec:,.0f}")
    print(f"achieved model FLOP/s: {model_flops / 1e9:,.1f} GFLOP/s")
    print(f"dense matmul FLOP/s ({FLAGS.matmul_size}^3 per device, same run): {peak / 1e9:,.1f} GFLOP/s")
    print(f"ratio achieved / matmul peak: {model_flops / peak:.1%}")


if __name__ == "__main__":
    app.run(main)
