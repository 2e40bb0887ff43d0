"""Scanned layers, blockwise attention and remat policies compute what the default model
computes: the same logits, gradients and decoded steps, for the same (converted) params."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.model import attention
from instructjax.model.config import ModelConfig, preset
from instructjax.model.layout import stack_layers, unstack_layers
from instructjax.model.transformer import Transformer, init_cache

FAMILIES = {"gpt2": "tiny", "llama": "llama-tiny"}  # llama-tiny: GQA, 4 heads over 2 KV heads
T = 12


def _params(cfg):
    tokens = jnp.zeros((1, T), jnp.int32)
    init = jax.jit(lambda rng: Transformer(cfg).init(rng, tokens, tokens, jnp.ones_like(tokens)))
    return nn.meta.unbox(init(jax.random.key(0))["params"])


def _packed_batch(seed=0):
    """Two rows: two packed documents, and a left-padded one (segment 0 = padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 512, size=(2, T)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 7, [0] * 4 + [1] * 8], np.int32)
    positions = np.array([list(range(5)) + list(range(7)), [0] * 4 + list(range(8))], np.int32)
    return tokens, positions, segments


def _apply(cfg, params, batch):
    tokens, positions, segments = batch
    return jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens, positions,
                                                    segments))(params)


def _loss_and_grads(cfg, params, batch):
    # Weighted by the real tokens: what a padding query computes is unspecified
    # (model/attention.py) and no loss reads it.
    weight = (batch[2] > 0)[..., None]

    def loss(p):
        return jnp.sum(jnp.tanh(_apply(cfg, p, batch)) * weight) / weight.sum()

    return jax.jit(jax.value_and_grad(loss))(params)


def _close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                         np.asarray(y, np.float32), **tol), a, b)


def _close_grads(a, b, tol):
    """Gradients equal up to `tol` relative to their largest entry (summation order differs)."""
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(b))
    _close(a, b, atol=tol * scale, rtol=tol)


def test_stack_and_unstack_layers_round_trip_and_match_the_scanned_model():
    cfg = preset("llama-tiny")
    unrolled = _params(cfg)
    stacked = stack_layers(unrolled)
    scanned_shapes = jax.eval_shape(lambda: _params(dataclasses.replace(cfg, scan_layers=True)))
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(np.shape, scanned_shapes)
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    jax.tree.map(np.testing.assert_array_equal, back, unrolled)
    # Any tree holding the layout converts, e.g. {"params": ...} or optimiser moments.
    np_tree = {"params": jax.tree.map(np.asarray, unrolled), "step": np.int32(3)}
    assert isinstance(stack_layers(np_tree)["params"]["layers"]["attn"]["key"]["kernel"],
                      np.ndarray)
    assert stack_layers(np_tree)["step"] == 3
    with pytest.raises(ValueError, match=r"layers \[1\] are not layer_0"):
        stack_layers({k: v for k, v in unrolled.items() if k != "layer_0"})
    with pytest.raises(ValueError, match="layer_1 holds other parameters"):
        stack_layers({**unrolled, "layer_1": {"attn": unrolled["layer_1"]["attn"]}})


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_layers_gives_the_same_logits_and_gradients(family):
    cfg = preset(FAMILIES[family])
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat=True)
    params = _params(cfg)
    batch = _packed_batch()
    loss, grads = _loss_and_grads(cfg, params, batch)
    scan_loss, scan_grads = _loss_and_grads(scan_cfg, stack_layers(params), batch)
    _close(_apply(scan_cfg, stack_layers(params), batch), _apply(cfg, params, batch), atol=1e-5)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    _close_grads(unstack_layers(scan_grads), grads, 1e-5)


def test_scanned_init_has_a_named_layer_axis_and_fresh_draws_per_layer():
    cfg = preset("llama-tiny", scan_layers=True)
    tokens = jnp.zeros((1, T), jnp.int32)
    boxed = Transformer(cfg).init(jax.random.key(0), tokens, tokens, jnp.ones_like(tokens))
    kernel = boxed["params"]["layers"]["mlp"]["up"]["kernel"]
    assert kernel.names == ("layers", "embed", "mlp") and kernel.value.shape[0] == cfg.n_layers
    assert not np.allclose(kernel.value[0], kernel.value[1])


def test_blockwise_attention_matches_plain(family="llama"):  # GQA; gpt2 is the case G = 1
    # Block 4 over 12 tokens: three query and key blocks, causal blocks skipped; block 5
    # pads 12 to 15. bf16 compares against plain bf16 with bf16 tolerance.
    for dtype, block, tol in (("float32", 4, 2e-5), ("bfloat16", 5, 3e-2)):
        cfg = preset(FAMILIES[family], compute_dtype=dtype)
        blockwise = dataclasses.replace(cfg, attention_impl="blockwise", attention_block_size=block)
        params, batch = _params(cfg), _packed_batch(1)
        real = (batch[2] > 0)[..., None]
        _close(_apply(blockwise, params, batch) * real, _apply(cfg, params, batch) * real,
               atol=tol * 10, rtol=tol)
        loss, grads = _loss_and_grads(cfg, params, batch)
        block_loss, block_grads = _loss_and_grads(blockwise, params, batch)
        np.testing.assert_allclose(block_loss, loss, rtol=tol)
        _close_grads(block_grads, grads, tol)


def test_blockwise_kernel_with_an_offset_and_the_xla_implementation():
    """The kernel alone: queries at a cache offset, unequal T and S, GQA, fp32 gradients."""
    rng = np.random.default_rng(0)
    B, Tq, S, K, G, F = 2, 7, 13, 2, 3, 8
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, Tq, K, G, F), (B, K, S, F), (B, K, S, F)))
    seg_q = jnp.asarray([[1] * 7, [2] * 7])
    seg_k = jnp.asarray([[1] * 13, [0] * 2 + [2] * 11])
    offset = 5  # queries at slots 5..11: keys 12 are in their future

    def run(impl, block=4):
        return lambda q, k, v: attention.attend(q, k, v, seg_q, seg_k, offset, impl=impl,
                                                block_size=block)

    ref = run("plain")(q, k, v)
    for impl in ("blockwise", "xla"):
        _close(run(impl)(q, k, v), ref, atol=1e-5)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
    _close(grad(run("blockwise")), grad(run("plain")), atol=1e-5)
    with pytest.raises(ValueError, match="attention impl must be one of"):
        attention.attend(q, k, v, seg_q, seg_k, 0, impl="flash")


def _decode(cfg, params, tokens, prefill=5):
    """Prefill `prefill` tokens, then one token per call: the logits of every step."""
    B = tokens.shape[0]
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))

    @jax.jit  # one compile for the prefill, one for every decode step
    def call(tokens, positions, cache, index):
        return Transformer(cfg).apply({"params": params}, tokens, positions,
                                      jnp.ones_like(tokens), cache=cache, cache_index=index)

    logits, cache = call(tokens[:, :prefill], positions[:, :prefill], init_cache(cfg, B, T), 0)
    steps = [logits]
    for i in range(prefill, T):
        logits, cache = call(tokens[:, i:i + 1], positions[:, i:i + 1], cache, i)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1), cache


def test_decoding_with_a_cache_under_scan_and_blockwise(family="llama"):
    cfg = preset(FAMILIES[family])
    params = _params(cfg)
    tokens = jnp.asarray(_packed_batch(2)[0])
    ref, ref_cache = _decode(cfg, params, tokens)
    np.testing.assert_allclose(ref, _apply(cfg, params, (tokens, jnp.broadcast_to(
        jnp.arange(T), tokens.shape), jnp.ones_like(tokens))), atol=1e-5)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, attention_impl="blockwise",
                                   attention_block_size=2)
    assert isinstance(init_cache(scan_cfg, 2, T)["layers"], dict)
    assert init_cache(scan_cfg, 2, T)["layers"]["k"].shape[0] == cfg.n_layers
    out, cache = _decode(scan_cfg, stack_layers(params), tokens)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # The stacked cache holds what the per-layer caches hold.
    for i, layer in enumerate(ref_cache["layers"]):
        np.testing.assert_allclose(cache["layers"]["k"][i], layer["k"], atol=1e-5)
    with pytest.raises(ValueError, match="scan_layers=True; build it with init_cache"):
        Transformer(scan_cfg).apply({"params": stack_layers(params)}, tokens, tokens, tokens,
                                    cache=init_cache(cfg, 2, T), cache_index=0)


def test_remat_policies_give_the_same_gradients():
    # Under scan (remat without its CSE barrier); unrolled "full" is in test_model.
    cfg = preset("llama-tiny", scan_layers=True)
    params, batch = _params(cfg), _packed_batch(3)
    _, ref = _loss_and_grads(cfg, params, batch)
    for policy in ("full", "save_dots", "save_projections"):
        _, grads = _loss_and_grads(dataclasses.replace(cfg, remat_policy=policy), params, batch)
        _close_grads(grads, ref, 1e-5)


def test_remat_policy_config_and_old_config_files():
    assert preset("tiny").resolved_remat_policy == "none"
    assert preset("tiny", remat=True).resolved_remat_policy == "full"  # old configs, --remat
    assert preset("tiny", remat=True, remat_policy="save_dots").resolved_remat_policy == "save_dots"
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        preset("tiny", remat_policy="some")
    with pytest.raises(ValueError, match="remat_policy is 'none'"):
        preset("tiny", remat=True, remat_policy="none")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        preset("tiny", attention_impl="flash")
    # A model_config.json written before these fields existed still loads, with defaults.
    old = {k: v for k, v in dataclasses.asdict(preset("tiny", remat=True)).items()
           if k not in ("remat_policy", "scan_layers", "attention_impl", "attention_block_size")}
    cfg = ModelConfig(**json.loads(json.dumps(old)))
    assert (cfg.scan_layers, cfg.attention_impl) == (False, "plain")
    assert cfg.resolved_remat_policy == "full"


def test_the_sampler_runs_unchanged_on_a_scanned_blockwise_model():
    """sampling.sample (prefill into a cache at slot 0, then a while_loop of decode steps)
    gives the unrolled plain model's tokens and log-probs from the converted params."""
    from instructjax.sampling import SamplingConfig, left_pad, sample

    cfg = preset("llama-tiny")
    params = _params(cfg)
    tokens, mask = left_pad([[5, 9, 33], [7, 8, 9, 10, 11, 12, 13]], pad_id=0, length=8)
    sampling = SamplingConfig(max_new_tokens=5, eos_id=511, pad_id=0, temperature=0.7)
    run = jax.jit(sample, static_argnames=("model", "cfg"))
    ref = run(params, tokens, mask, jax.random.key(3), model=Transformer(cfg), cfg=sampling)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, attention_impl="blockwise",
                                   attention_block_size=4)
    out = run(stack_layers(params), tokens, mask, jax.random.key(3), model=Transformer(scan_cfg),
              cfg=sampling)
    np.testing.assert_array_equal(out["tokens_BxN"], ref["tokens_BxN"])
    np.testing.assert_allclose(out["logprobs_BxN"], ref["logprobs_BxN"], atol=1e-5)


def test_scanned_blockwise_gradient_never_holds_scores_of_all_blocks():
    """Under nn.scan, JAX hoists layer-invariant work (masks from segment ids) out of the
    layer loop and stacks what inner loops make; nothing shaped [..., bq, bk] may gain loop
    axes in front of a block's [B, K, G, bq, bk] (6+ dims), forward or backward."""
    import re

    cfg = preset("llama-tiny", scan_layers=True, remat=True, attention_impl="blockwise",
                 attention_block_size=4)  # 16 tokens: 4 x 4 blocks of 4 x 4 scores
    model = Transformer(cfg)
    tokens = jnp.zeros((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
        jax.random.key(0), tokens, positions, jnp.ones_like(tokens))["params"]))
    loss = lambda p: model.apply({"params": p}, tokens, positions, jnp.ones_like(tokens)).sum()
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert not re.findall(r"\[(?:\d+,){5,}4,4\]", text)
