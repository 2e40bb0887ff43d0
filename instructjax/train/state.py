"""Train state, optimiser, and sharded initialisation (nothing is materialised unsharded)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from instructjax import parallel
from instructjax.config import OptimConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine/linear decay to final_lr_fraction * peak."""
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
    end = peak * cfg.final_lr_fraction
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_fraction)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
    # Weight decay on matrices only: not on norms, biases or scalar offsets.
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    parts.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def _dummy_inputs(seq_len: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (1, seq_len)), \
        jnp.ones((1, seq_len), jnp.int32)


def boxed_params_fn(model: nn.Module, seq_len: int):
    """rng -> params still boxed with their logical axis names."""
    def init(rng):
        return model.init(rng, *_dummy_inputs(seq_len))["params"]
    return init


def with_shardings(boxed, mesh: Mesh) -> tuple[Any, Any]:
    """Boxed abstract tree -> (unboxed ShapeDtypeStructs carrying shardings, shardings)."""
    shardings = parallel.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            nn.meta.unbox(boxed), shardings)
    return abstract, shardings


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                   seq_len: int):
    """(abstract TrainState of ShapeDtypeStructs carrying shardings, sharding tree)."""
    init_params = boxed_params_fn(model, seq_len)

    def init_boxed(rng):
        params = init_params(rng)
        # Optimiser moments are tree-maps of the boxed params, so they inherit the names.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return with_shardings(jax.eval_shape(init_boxed, jax.random.key(0)), mesh)


def abstract_params(model: nn.Module, mesh: Mesh, seq_len: int = 2):
    """(abstract params carrying shardings, sharding tree), without allocating anything."""
    return with_shardings(jax.eval_shape(boxed_params_fn(model, seq_len), jax.random.key(0)), mesh)


def init_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, seq_len: int,
               rng: jax.Array) -> tuple[TrainState, Any]:
    """Initialises params and optimiser state directly into their shards."""
    _, shardings = abstract_state(model, tx, mesh, seq_len)
    init_params = boxed_params_fn(model, seq_len)

    def init(rng):
        params = nn.meta.unbox(init_params(rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return parallel.ShardedJit(init, mesh, out_shardings=shardings)(rng), shardings


def init_params_sharded(model: nn.Module, mesh: Mesh, seq_len: int, rng: jax.Array):
    """Params only (frozen reference / reward models), initialised into their shards."""
    init_params = boxed_params_fn(model, seq_len)
    _, shardings = abstract_params(model, mesh, seq_len)
    params = parallel.ShardedJit(lambda r: nn.meta.unbox(init_params(r)), mesh,
                                 out_shardings=shardings)(rng)
    return params, shardings
