"""The one jitted train step (and eval step) shared by every objective.

The step knows nothing about the objective: it takes an `Objective` (a pure loss function
plus its config), sums gradients and (sum, weight) metric pairs over micro-batches with a
`lax.scan`, divides by the summed loss denominator, and applies the optimiser update.
Shardings are explicit and the state is donated, so a step never copies parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from instructjax import parallel
from instructjax.losses import Objective
from instructjax.train.state import TrainState


def _split_microbatches(batch, num: int):
    """[B, ...] -> [num, B/num, ...] taking rows i::num, so every micro-batch spans all
    data shards (a contiguous split would put each micro-batch on a few devices only)."""
    def split(x):
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def accumulate_gradients(objective: Objective, apply: Callable, params, batch, rng,
                         num_microbatches: int):
    """Returns (sum of gradients of loss_sum, summed metric pairs) over micro-batches."""
    grad_fn = jax.value_and_grad(
        lambda p, b, r: objective(p, b, r, apply=apply), has_aux=True)
    if num_microbatches == 1:
        (_, metrics), grads = grad_fn(params, batch, rng)
        return grads, metrics

    micro = _split_microbatches(batch, num_microbatches)
    first = jax.tree.map(lambda x: x[0], micro)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    zero_metrics = jax.tree.map(jnp.zeros_like,
                                jax.eval_shape(lambda: grad_fn(params, first, rng)[0][1]))

    def body(carry, xs):
        index, mb = xs
        (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    (grads, metrics), _ = jax.lax.scan(
        body, (zero_grads, zero_metrics), (jnp.arange(num_microbatches), micro))
    return grads, metrics


def make_train_step(objective: Objective, *, apply: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, state_shardings: Any,
                    grad_accum_steps: int = 1):
    """state, batch, base_rng -> (state, metrics). metrics values are (sum, weight) pairs."""

    def update(state: TrainState, batch, base_rng):
        rng = jax.random.fold_in(base_rng, state.step)
        grads, metrics = accumulate_gradients(objective, apply, state.params, batch, rng,
                                              grad_accum_steps)
        denominator = jnp.maximum(metrics["loss"][1], 1e-9)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        one = jnp.ones((), jnp.float32)
        metrics = dict(metrics, grad_norm=(grad_norm, one),
                       param_norm=(optax.tree.norm(params), one),
                       learning_rate=(jnp.asarray(schedule(state.step), jnp.float32), one))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    rep = parallel.replicated(mesh)
    batch_sh = parallel.batch_sharding(mesh)
    return parallel.ShardedJit(update, mesh, in_shardings=(state_shardings, batch_sh, rep),
                               out_shardings=(state_shardings, rep), donate_argnums=(0,))


def make_eval_step(objective: Objective, *, apply: Callable, mesh: Mesh, params_shardings: Any):
    """params, batch -> summed metric pairs, deterministic (no dropout)."""

    def step(params, batch):
        _, metrics = objective(params, batch, None, apply=apply)
        return metrics

    return parallel.ShardedJit(step, mesh,
                               in_shardings=(params_shardings, parallel.batch_sharding(mesh)),
                               out_shardings=parallel.replicated(mesh))

