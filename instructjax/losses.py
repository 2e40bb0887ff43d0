"""Every training objective, as a pure function with one signature:

    loss_fn(params, batch, rng, *, apply, cfg) -> (loss_sum, metrics)

- `apply(params, tokens_BxT, positions_BxT, segment_ids_BxT, rng)` runs the model; `rng`
  None means deterministic (no dropout).
- `loss_sum` is the UNREDUCED sum being minimised. `metrics` maps names to (sum, weight)
  pairs of scalars and always contains `metrics['loss'] == (loss_sum, denominator)`.
  The train step sums gradients and pairs over micro-batches and hosts, then divides by
  the summed denominator, so gradient accumulation and multi-host reduction are exact.
  Reported metric values are sum / weight.

New objectives are added to `LOSSES`; the train step never changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Metrics = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[..., tuple[jax.Array, Metrics]]


def make_apply(model) -> Callable:
    """Binds a Flax module into the `apply` callable every loss receives."""

    def apply(params, tokens_BxT, positions_BxT, segment_ids_BxT, rng=None):
        if rng is None:
            return model.apply({"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT,
                               deterministic=True)
        return model.apply({"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT,
                           deterministic=False, rngs={"dropout": rng})

    return apply


def token_log_probs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """log p(target_t | context) in float32: log_softmax(logits)[target]."""
    logits = logits_BxTxV.astype(jnp.float32)
    lse_BxT = jax.nn.logsumexp(logits, axis=-1)
    picked_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return picked_BxT - lse_BxT


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMLossConfig:
    """Next-token cross-entropy. z_loss adds z * log(Z)^2 per token (PaLM) for stability."""
    z_loss: float = 0.0


def lm_loss(params, batch: Mapping[str, jax.Array], rng, *, apply, cfg: LMLossConfig
            ) -> tuple[jax.Array, Metrics]:
    """Masked next-token negative log-likelihood.

    loss_sum = sum_{b,t} m_bt * (-log p(y_bt | x_b,<=t) + z * logZ_bt^2),  denominator = sum m_bt

    Used for pretraining (mask = real tokens) and SFT (mask = response tokens + EOS).
    """
    logits_BxTxV = apply(params, batch["inputs"], batch["positions"], batch["segment_ids"], rng)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    targets_BxT = batch["targets"]
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    nll_sum = jnp.sum((lse_BxT - picked_BxT) * mask_BxT)
    loss_sum = nll_sum + cfg.z_loss * jnp.sum(jnp.square(lse_BxT) * mask_BxT)
    denominator = jnp.sum(mask_BxT)
    correct = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT).astype(jnp.float32)
    return loss_sum, {
        "loss": (loss_sum, denominator),
        "nll": (nll_sum, denominator),
        "accuracy": (jnp.sum(correct * mask_BxT), denominator),
        # Every real input token is processed (prompt included), so throughput counts them all.
        "tokens": (jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32), jnp.ones(())),
    }


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss function together with its config, the unit the train step consumes."""
    fn: LossFn
    cfg: Any

    def __call__(self, params, batch, rng, *, apply):
        return self.fn(params, batch, rng, apply=apply, cfg=self.cfg)


LOSSES: dict[str, tuple[LossFn, type]] = {
    "lm": (lm_loss, LMLossConfig),
}


def reduce_metrics(metrics: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """(sum, weight) pairs -> plain float means (host side)."""
    out = {}
    for name, (total, weight) in metrics.items():
        weight = float(weight)
        out[name] = float(total) / weight if weight else float("nan")
    return out
