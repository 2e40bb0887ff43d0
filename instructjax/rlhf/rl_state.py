"""The RL train state: the policy under `params` (what load_trained(rl_workdir) reads), the
value model's params ({} for value-free algorithms), one optimiser state over both, and the
KL controller; built into its shards without allocating twice."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from instructjax import parallel, rl_ops
from instructjax.model.transformer import Transformer
from instructjax.train import state as state_lib


@flax.struct.dataclass
class PPOState:
    step: jax.Array
    params: Any          # the policy (head 'lm'): what load_trained(ppo_workdir) returns
    value_params: Any    # the value model (head 'scalar'); {} for value-free algorithms
    opt_state: Any       # of {'policy': params, 'value': value_params}
    kl: Any              # {'beta': f32}

    @property
    def trainable(self) -> dict[str, Any]:
        return {"policy": self.params, "value": self.value_params}


def abstract_ppo_state(policy: Transformer, value: Transformer | None,
                       tx: optax.GradientTransformation, mesh: Mesh, init_kl_coef: float = 0.0):
    """(abstract PPOState of ShapeDtypeStructs carrying shardings, sharding tree); value
    None: no value model (value_params {})."""
    policy_init = state_lib.boxed_params_fn(policy, 2)
    value_init = state_lib.boxed_params_fn(value, 2) if value is not None else lambda rng: {}

    def init_boxed(rng):
        p, v = policy_init(rng), value_init(rng)
        return PPOState(step=jnp.zeros((), jnp.int32), params=p, value_params=v,
                        opt_state=tx.init({"policy": p, "value": v}),
                        kl=rl_ops.kl_controller_init(init_kl_coef))

    return state_lib.with_shardings(jax.eval_shape(init_boxed, jax.random.key(0)), mesh)


def init_ppo_state(policy_params, value_params, tx: optax.GradientTransformation,
                   state_shardings, mesh: Mesh, init_kl_coef: float) -> PPOState:
    """A fresh PPOState from (already sharded) starting params. The state is donated every
    iteration, so these buffers must not be shared with the frozen reference/reward params:
    load them separately (or copy)."""
    def init(p, v):
        return PPOState(step=jnp.zeros((), jnp.int32), params=p, value_params=v,
                        opt_state=tx.init({"policy": p, "value": v}),
                        kl=rl_ops.kl_controller_init(init_kl_coef))

    return parallel.ShardedJit(init, mesh, out_shardings=state_shardings)(policy_params,
                                                                          value_params)


def init_scalar_from_lm(lm_params, scalar_abstract, rng: jax.Array):
    """Params of a head='scalar' model from a head='lm' model's params: the shared trunk is
    copied; leaves only the scalar model has (the scalar head) are initialised fresh, kernels
    ~ N(0, 1/(d_model + 1)) (lm-human-preferences' reward head) and biases 0. The LM-only
    unembedding (an untied 'lm_head') is dropped. `scalar_abstract`: ShapeDtypeStructs with
    shardings (state.abstract_params of the scalar model); the result lands in those shards."""
    flat_lm = flax.traverse_util.flatten_dict(lm_params)
    flat_abs = flax.traverse_util.flatten_dict(scalar_abstract)

    def build(lm, key):
        out = {}
        for i, (path, leaf) in enumerate(flat_abs.items()):
            if path in lm:
                if lm[path].shape != leaf.shape:
                    raise ValueError(f"init_scalar_from_lm: {'/'.join(path)} has shape "
                                     f"{lm[path].shape}, the scalar model wants {leaf.shape}")
                out[path] = jnp.asarray(lm[path], leaf.dtype)
            elif path[-1] == "kernel":
                std = 1.0 / jnp.sqrt(leaf.shape[0] + 1.0)
                out[path] = std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape,
                                                    leaf.dtype)
            else:
                out[path] = jnp.zeros(leaf.shape, leaf.dtype)
        return flax.traverse_util.unflatten_dict(out)

    shared = {path: flat_lm[path] for path in flat_abs if path in flat_lm}
    shardings = jax.tree.map(lambda s: s.sharding, scalar_abstract)
    return jax.jit(build, out_shardings=shardings)(shared, rng)
