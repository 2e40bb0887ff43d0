"""The transformer: causality, packing, left padding, KV cache, remat, scalar head, presets."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.model.config import preset
from instructjax.model.transformer import Transformer, init_cache
from instructjax.sampling import positions_from_mask

FAMILIES = {"gpt2": "tiny", "llama": "llama-tiny"}
T = 12


def _model(family, head="lm", **overrides):
    cfg = preset(FAMILIES[family], **overrides)
    model = Transformer(cfg, head=head)
    tokens = jnp.zeros((1, T), jnp.int32)
    boxed = model.init(jax.random.key(0), tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))
    return model, boxed["params"]


def _forward(model, params, tokens, positions=None, segments=None):
    tokens = jnp.asarray(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
    segments = jnp.ones_like(tokens) if segments is None else segments
    return model.apply({"params": nn.meta.unbox(params)}, tokens, positions, segments)


def _tokens(batch, length, seed=0, low=4, high=512):
    return np.random.default_rng(seed).integers(low, high, size=(batch, length)).astype(np.int32)


def test_every_parameter_has_logical_names():
    for family in FAMILIES:
        for head in ("lm", "scalar"):
            _, params = _model(family, head)
            leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
            assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
            for leaf in leaves:
                assert len(leaf.names) == leaf.value.ndim and all(leaf.names)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_gradient_from_future_tokens(family):
    # Untied, so embedding rows reach the position-t loss only as inputs. The prefix uses
    # token ids 4..9, the future only ids 100..105: their rows must get exactly zero gradient.
    model, params = _model(family, tie_embeddings=False)
    params = nn.meta.unbox(params)
    t = 5
    tokens = np.concatenate([np.arange(4, 10), np.arange(100, 106)])[None].astype(np.int32)
    positions = jnp.arange(T)[None]

    def loss_at_t(p):
        logits = model.apply({"params": p}, tokens, positions, jnp.ones_like(tokens))
        return jax.nn.logsumexp(logits[0, t]) - logits[0, t, 7]

    grads = jax.grad(loss_at_t)(params)
    grad_rows = np.asarray(grads["embed"]["embedding"])
    assert np.abs(grad_rows[100:106]).max() == 0.0
    assert np.abs(grad_rows[4:10]).max() > 0.0
    if family == "gpt2":  # learned positions after t get no gradient either
        positions_grad = np.asarray(grads["pos_embedding"])
        assert np.abs(positions_grad[t + 1:]).max() == 0.0 and np.abs(positions_grad[:t + 1]).max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_segments_do_not_see_each_other(family):
    model, params = _model(family)
    a, b = _tokens(1, 5, seed=1), _tokens(1, 7, seed=2)
    packed = np.concatenate([a, b], axis=1)
    positions = np.concatenate([np.arange(5), np.arange(7)])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    out = _forward(model, params, packed, positions, segments)
    np.testing.assert_allclose(out[:, :5], _forward(model, params, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], _forward(model, params, b), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_with_positions_from_mask(family):
    model, params = _model(family)
    prompt = _tokens(1, 7, seed=3)
    padded = np.concatenate([np.zeros((1, 5), np.int32), prompt], axis=1)
    mask = np.concatenate([np.zeros((1, 5), np.int32), np.ones((1, 7), np.int32)], axis=1)
    out = _forward(model, params, padded, positions_from_mask(jnp.asarray(mask)), mask)
    np.testing.assert_allclose(out[:, 5:], _forward(model, params, prompt), atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # fully masked pad rows give no NaN


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_matches_full_forward(family):
    model, params = _model(family)
    params_in = {"params": nn.meta.unbox(params)}
    tokens = _tokens(2, T, seed=4)
    full = _forward(model, params, tokens)
    prefill = 5
    cache = init_cache(model.cfg, 2, T)
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    logits, cache = model.apply(params_in, tokens[:, :prefill], positions[:, :prefill],
                                jnp.ones((2, prefill), jnp.int32), cache=cache, cache_index=0)
    steps = [logits]
    for i in range(prefill, T):
        logits, cache = model.apply(params_in, tokens[:, i:i + 1], positions[:, i:i + 1],
                                    jnp.ones((2, 1), jnp.int32), cache=cache, cache_index=i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("head", ["lm", "scalar"])
@pytest.mark.parametrize("family", FAMILIES)
def test_head_at_picks_positions_of_the_full_forward(family, head):
    model, params = _model(family, head)
    params_in = {"params": nn.meta.unbox(params)}
    tokens = _tokens(2, T, seed=6)
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    full = _forward(model, params, tokens)
    at_2x3 = jnp.asarray([[T - 1, 0, 4], [3, T - 1, 3]], jnp.int32)
    picked = model.apply(params_in, tokens, positions, jnp.ones_like(tokens), head_at_BxU=at_2x3)
    expected = jnp.take_along_axis(full, at_2x3 if head == "scalar" else at_2x3[..., None], axis=1)
    assert picked.shape == expected.shape
    np.testing.assert_allclose(picked, expected, atol=1e-5)
    # With a cache (the sampler's prefill): the last position only, and the same cache.
    cache = init_cache(model.cfg, 2, T + 2)
    last, cache_at = model.apply(params_in, tokens, positions, jnp.ones_like(tokens),
                                 cache=cache, cache_index=0, head_at_BxU=jnp.full((2, 1), T - 1))
    _, cache_full = model.apply(params_in, tokens, positions, jnp.ones_like(tokens),
                                cache=cache, cache_index=0)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, cache_at, cache_full)


@pytest.mark.parametrize("family", FAMILIES)
def test_remat_gives_the_same_gradients(family):
    tokens = _tokens(2, T, seed=5)

    def grads(remat):
        model, params = _model(family, remat=remat)
        params = nn.meta.unbox(params)
        return jax.grad(lambda p: jnp.mean(_forward(model, p, tokens) ** 2))(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads(False), grads(True))


def test_dropout_is_random_only_when_not_deterministic():
    model, params = _model("gpt2", dropout_rate=0.5)
    params_in = {"params": nn.meta.unbox(params)}
    tokens = _tokens(1, T)
    positions, segments = jnp.arange(T)[None], jnp.ones((1, T), jnp.int32)
    det = model.apply(params_in, tokens, positions, segments, deterministic=True)
    np.testing.assert_array_equal(det, model.apply(params_in, tokens, positions, segments))
    drop = model.apply(params_in, tokens, positions, segments, deterministic=False,
                       rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(det, drop)


@pytest.mark.parametrize("family", FAMILIES)
def test_scalar_head(family):
    model, params = _model(family, head="scalar")
    names = set(nn.meta.unbox(params))
    assert "scalar_head" in names and "lm_head" not in names
    values = _forward(model, params, _tokens(3, T))
    assert values.shape == (3, T) and values.dtype == jnp.float32


@pytest.mark.parametrize("name,expected", [
    ("gpt2-124m", 124_439_808),     # Hugging Face gpt2
    ("gpt2-1.5b", 1_557_611_200),   # Hugging Face gpt2-xl
    ("llama-7b", 6_738_415_616),    # Llama-2-7B
])
def test_preset_sizes(name, expected):
    cfg = preset(name)
    assert cfg.num_params() == expected
    # The module agrees with the formula, without allocating anything.
    shapes = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                      jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes))) == expected


def test_bad_config_is_rejected_clearly():
    with pytest.raises(ValueError, match="n_heads .* multiple of n_kv_heads"):
        preset("llama-tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt5")
