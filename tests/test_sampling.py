"""The jitted KV-cache sampler against slow full-forward references."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.model.config import preset
from instructjax.model.transformer import Transformer
from instructjax.sampling import SamplingConfig, left_pad, positions_from_mask, sample

PAD, EOS, NEW = 0, 1, 6


@pytest.fixture(scope="module", params=["tiny", "llama-tiny"])
def model_and_params(request):
    model = Transformer(preset(request.param))
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), tokens, tokens, jnp.ones_like(tokens))["params"]
    return model, nn.meta.unbox(params)


_sample = jax.jit(sample, static_argnames=("model", "cfg"))


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(4, 512, size=n).tolist() for n in (3, 7, 5)]


def _run(model, params, prompts, rng=0, **kwargs):
    cfg = SamplingConfig(max_new_tokens=NEW, eos_id=kwargs.pop("eos_id", EOS), pad_id=PAD, **kwargs)
    tokens, mask = left_pad(prompts, PAD, 8)
    return jax.device_get(_sample(params, tokens, mask, jax.random.key(rng), model=model, cfg=cfg))


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids_1xL, segments_1xL):
    return model.apply({"params": params}, ids_1xL, jnp.arange(ids_1xL.shape[1])[None], segments_1xL)[0]


def _full_logits(model, params, ids, length=16):
    """Reference: a plain forward pass, right-padded to one length so it compiles once."""
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(ids)] = ids
    segments = (np.arange(length) < len(ids)).astype(np.int32)[None]
    return _forward(model, params, padded, segments)[:len(ids)]


def test_greedy_matches_argmax_over_full_forward(model_and_params):
    model, params = model_and_params
    prompts = _prompts()
    out = _run(model, params, prompts, temperature=0.0, eos_id=511)  # 511: effectively no EOS
    for row, prompt in enumerate(prompts):
        ids = list(prompt)
        for step in range(NEW):
            logits = _full_logits(model, params, ids)[-1]
            if out["mask_BxN"][row, step] == 0:
                break
            assert out["tokens_BxN"][row, step] == int(jnp.argmax(logits)), (row, step)
            expected = jax.nn.log_softmax(logits)[out["tokens_BxN"][row, step]]
            np.testing.assert_allclose(out["logprobs_BxN"][row, step], expected, atol=1e-4)
            ids.append(int(out["tokens_BxN"][row, step]))


def test_logprobs_are_under_the_tempered_distribution(model_and_params):
    model, params = model_and_params
    prompts = _prompts()
    out = _run(model, params, prompts, temperature=0.7, eos_id=511)
    for row, prompt in enumerate(prompts):
        n = int(out["lengths_B"][row])
        ids = prompt + out["tokens_BxN"][row, :n].tolist()
        logits = _full_logits(model, params, ids)[len(prompt) - 1:-1]
        expected = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7), jnp.asarray(ids[len(prompt):])[:, None], 1)[:, 0]
        np.testing.assert_allclose(out["logprobs_BxN"][row, :n], expected, atol=1e-4)


def test_eos_ends_a_row_and_masks_the_rest(model_and_params):
    model, params = model_and_params
    prompts = _prompts()
    free = _run(model, params, prompts, temperature=0.0, eos_id=511)
    eos = int(free["tokens_BxN"][0, 2])  # row 0 emits this token at step 2 (or earlier)
    out = _run(model, params, prompts, temperature=0.0, eos_id=eos)
    first = int(np.argmax(free["tokens_BxN"][0] == eos))
    assert out["ended_B"][0] and out["lengths_B"][0] == first + 1
    assert out["tokens_BxN"][0, first] == eos  # EOS is kept and counted in the mask
    np.testing.assert_array_equal(out["mask_BxN"][0], np.arange(NEW) <= first)
    assert (out["tokens_BxN"][0, first + 1:] == PAD).all()
    assert (out["logprobs_BxN"][0, first + 1:] == 0).all()


def test_tiny_top_p_is_greedy_and_sampling_is_seeded(model_and_params):
    model, params = model_and_params
    prompts = _prompts()
    greedy = _run(model, params, prompts, temperature=0.0, eos_id=511)
    nucleus = _run(model, params, prompts, temperature=1.0, top_p=1e-6, eos_id=511)
    np.testing.assert_array_equal(nucleus["tokens_BxN"], greedy["tokens_BxN"])
    a = _run(model, params, prompts, rng=1, eos_id=511)
    b = _run(model, params, prompts, rng=1, eos_id=511)
    c = _run(model, params, prompts, rng=2, eos_id=511)
    np.testing.assert_array_equal(a["tokens_BxN"], b["tokens_BxN"])
    assert not np.array_equal(a["tokens_BxN"], c["tokens_BxN"])


def test_a_row_does_not_depend_on_its_batch(model_and_params):
    model, params = model_and_params
    prompts = _prompts()
    together = _run(model, params, prompts, temperature=0.0, eos_id=511)
    alone = _run(model, params, prompts[1:2], temperature=0.0, eos_id=511)
    np.testing.assert_array_equal(together["tokens_BxN"][1], alone["tokens_BxN"][0])


def test_left_pad_and_positions():
    tokens, mask = left_pad([[5, 6], [7, 8, 9]], PAD, 4)
    np.testing.assert_array_equal(tokens, [[0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(positions_from_mask(jnp.asarray(mask)), [[0, 0, 0, 1], [0, 0, 1, 2]])
    with pytest.raises(ValueError, match="does not fit"):
        left_pad([[1, 2, 3]], PAD, 2)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=1, eos_id=1, pad_id=0, top_p=0.0)


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_sampled_frequencies_follow_the_tempered_nucleus(top_p):
    # 20k rows of the same 6-token distribution, one draw each: frequencies match the
    # (top-p renormalised) probabilities, and tokens outside the nucleus never appear.
    from instructjax.sampling import choose_token
    logits = jnp.log(jnp.asarray([0.05, 0.4, 0.0, 0.25, 0.2, 0.1]))
    rows = 20_000
    cfg = SamplingConfig(max_new_tokens=1, eos_id=EOS, pad_id=PAD, temperature=0.5, top_p=top_p)
    tokens, logps = jax.jit(choose_token, static_argnums=2)(
        jnp.broadcast_to(logits, (rows, 6)), jax.random.key(3), cfg)
    probs = np.asarray(jax.nn.softmax(logits / 0.5))
    np.testing.assert_allclose(np.asarray(logps), np.log(probs[np.asarray(tokens)]), rtol=1e-5)
    if top_p < 1.0:  # sorted mass 0.58, 0.23, 0.15, ...: the nucleus is the top 2
        probs = np.where(probs >= np.sort(probs)[-2], probs, 0.0)
        probs /= probs.sum()
    freq = np.bincount(np.asarray(tokens), minlength=6) / rows
    np.testing.assert_allclose(freq, probs, atol=0.012)
    assert (freq[probs == 0] == 0).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ids_past_the_vocab_limit_are_never_sampled(temperature):
    # A model with more embedding rows than its tokenizer has pieces: the extra ids carry
    # most of the mass here, and must still never come out.
    from instructjax.sampling import choose_token
    logits = jnp.asarray([0.0, 0.0, 0.0, 5.0, 5.0, 5.0])
    cfg = SamplingConfig(max_new_tokens=1, eos_id=EOS, pad_id=PAD, temperature=temperature,
                         vocab_limit=3)
    tokens, logps = jax.jit(choose_token, static_argnums=2)(
        jnp.broadcast_to(logits, (2000, 6)), jax.random.key(4), cfg)
    assert int(jnp.max(tokens)) < 3
    np.testing.assert_allclose(np.asarray(logps), np.log(1 / 3), atol=1e-5)  # of the 3 left
