"""Losses against hand-computed values."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from instructjax import losses


def _fixed_apply(logits):
    return lambda params, tokens, positions, segment_ids, rng: jnp.asarray(logits)


def test_lm_loss_matches_hand_computed():
    # One row, two positions, vocab 3. Position 0 target 2 counts, position 1 is masked.
    logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]]], np.float32)
    batch = {"inputs": np.zeros((1, 2), np.int32), "targets": np.array([[2, 0]], np.int32),
             "positions": np.array([[0, 1]], np.int32), "segment_ids": np.ones((1, 2), np.int32),
             "loss_mask": np.array([[1.0, 0.0]], np.float32)}
    loss_sum, metrics = losses.lm_loss(None, batch, None, apply=_fixed_apply(logits),
                                       cfg=losses.LMLossConfig())
    expected = -(3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))
    assert float(loss_sum) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["loss"][1]) == 1.0
    assert float(metrics["accuracy"][0]) == 1.0  # argmax 2 == target 2


def test_lm_loss_sums_over_rows_and_z_loss():
    logits = np.array([[[0.0, 0.0]], [[2.0, 0.0]]], np.float32)  # B=2, T=1, V=2
    batch = {"inputs": np.zeros((2, 1), np.int32), "targets": np.array([[1], [0]], np.int32),
             "positions": np.zeros((2, 1), np.int32), "segment_ids": np.ones((2, 1), np.int32),
             "loss_mask": np.ones((2, 1), np.float32)}
    z = 0.5
    loss_sum, metrics = losses.lm_loss(None, batch, None, apply=_fixed_apply(logits),
                                       cfg=losses.LMLossConfig(z_loss=z))
    lse0, lse1 = math.log(2.0), math.log(math.exp(2.0) + 1.0)
    nll = (lse0 - 0.0) + (lse1 - 2.0)
    assert float(metrics["nll"][0]) == pytest.approx(nll, rel=1e-6)
    assert float(loss_sum) == pytest.approx(nll + z * (lse0 ** 2 + lse1 ** 2), rel=1e-6)
    assert float(metrics["loss"][1]) == 2.0


def test_token_log_probs():
    logits = np.array([[[1.0, 2.0], [3.0, 1.0]]], np.float32)
    out = losses.token_log_probs(jnp.asarray(logits), jnp.array([[0, 0]]))
    expected = [1.0 - math.log(math.e + math.e ** 2), 3.0 - math.log(math.e ** 3 + math.e)]
    np.testing.assert_allclose(np.asarray(out)[0], expected, rtol=1e-6)


def test_reduce_metrics():
    assert losses.reduce_metrics({"a": (6.0, 3.0)}) == {"a": 2.0}
    assert math.isnan(losses.reduce_metrics({"a": (1.0, 0.0)})["a"])
