"""Decoder-only transformer (GPT-2 and Llama families) with a pure, explicit KV cache.

Shape legend:
  B batch   T query length   S key length (= T, or the cache length when decoding)
  D d_model H query heads    K key/value heads   G = H // K query heads per KV head
  F head_dim M d_ff (MLP width)  V vocabulary
  U positions picked by `head_at_BxU` (the head runs only there)
  L layers: with cfg.scan_layers the blocks are one nn.scan, their params are stacked
    under `layers/` with a leading L axis (logical name "layers") and so is the KV cache

Attention rule (one rule covers packing, right padding and left-padded generation):
a query may attend a key iff key_slot <= query_slot, seg_q == seg_k and seg_k != 0, where
segment id 0 marks padding. With a cache, this call's keys are written at slots
[cache_index, cache_index + T) and queries attend over all S cache slots. How scores are
computed (materialised T x S, or blockwise without ever storing them) is
cfg.attention_impl, in model/attention.py.

Parameters are float32 with logical axis names; activations run in cfg.compute_dtype;
norms, softmax, logits and scalar outputs are float32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from instructjax.model import attention
from instructjax.model.config import ModelConfig

Cache = dict[str, Any]
# checkpoint_name tags of the attention projections (remat_policy "save_projections").
PROJECTION_NAMES = ("query_proj", "key_proj", "value_proj", "out_proj")


def _init(initializer, names):
    return nn.with_logical_partitioning(initializer, names)


def _constrain(x, names):
    return nn.with_logical_constraint(x, names)


def dtype_of(cfg: ModelConfig):
    return jnp.dtype(cfg.compute_dtype)


class Norm(nn.Module):
    """LayerNorm (gpt2, with bias) or RMSNorm (llama), computed in float32."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", _init(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        if self.cfg.family == "gpt2":
            bias = self.param("bias", _init(nn.initializers.zeros, ("norm",)), (x.shape[-1],))
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale + bias
        else:
            ms = jnp.square(x32).mean(-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(ms + self.cfg.norm_eps) * scale
        return y.astype(x.dtype)


def rope(x_BxTxNxF, positions_BxT, theta: float):
    """Rotary embedding, rotate-half convention (as in Hugging Face Llama), in float32."""
    f = x_BxTxNxF.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, f, 2, dtype=jnp.float32) / f))
    angles_BxTxF2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles_BxTxF2, angles_BxTxF2], axis=-1)[:, :, None, :]
    x = x_BxTxNxF.astype(jnp.float32)
    half = f // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_BxTxNxF.dtype)


def _matmul(x, kernel, dtype, n_in):
    return jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=n_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def project(x, kernel, dtype, names, n_in):
    """x[..., *in] @ kernel[*in, *out] in `dtype`; the same values and gradients as autodiff.
    The backward pass hands the kernel's gradient back in the kernel's own sharding (logical
    `names`) before x's gradient may leave: under FSDP every device holds a partial sum of the
    full-size gradient, and XLA otherwise keeps it (and its reduction) live while the
    backward pass moves on, e.g. the 32000 x 4096 lm_head gradient through every layer."""
    return _matmul(x, kernel, dtype, n_in)


def _project_fwd(x, kernel, dtype, names, n_in):
    return _matmul(x, kernel, dtype, n_in), (x, kernel)


def _project_bwd(dtype, names, n_in, residuals, g):
    _, pullback = jax.vjp(lambda x, k: _matmul(x, k, dtype, n_in), *residuals)
    dx, dkernel = pullback(g)
    return jax.lax.optimization_barrier((dx, _constrain(dkernel, names)))


project.defvjp(_project_fwd, _project_bwd)


class Projection(nn.Module):
    """x[..., *in] @ kernel[*in, *out] (+ bias[*out]); the kernel keeps its full shape so its
    logical names apply to it as created (flax's DenseGeneral initialises a flattened one)."""
    out_shape: tuple[int, ...]
    names: tuple[str, ...]  # logical names of the kernel: input dims then output dims
    use_bias: bool
    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        n_in = len(self.names) - len(self.out_shape)
        shape = (*x.shape[-n_in:], *self.out_shape)
        kernel = self.param("kernel", _init(nn.initializers.normal(self.init_std), self.names), shape)
        y = project(x, kernel, jnp.dtype(self.dtype), self.names, n_in)
        if self.use_bias:
            bias = self.param("bias", _init(nn.initializers.zeros, self.names[n_in:]), self.out_shape)
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_q_BxT, segment_k_BxS, layer_cache,
                 cache_index):
        cfg, dtype = self.cfg, dtype_of(self.cfg)
        H, K, F = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        bias = cfg.family == "gpt2"
        std = 0.02

        def proj(name, heads, head_names):
            y = Projection((heads, F), ("embed", head_names, "head_dim"), bias, std, dtype,
                           name=name)(x_BxTxD)
            return checkpoint_name(y, f"{name}_proj")  # remat_policy "save_projections"

        q_BxTxHxF = _constrain(proj("query", H, "heads"), ("batch", "length", "act_heads", "head_dim"))
        k_BxTxKxF = _constrain(proj("key", K, "kv_heads"), ("batch", "length", "act_kv_heads", "head_dim"))
        v_BxTxKxF = _constrain(proj("value", K, "kv_heads"), ("batch", "length", "act_kv_heads", "head_dim"))
        if cfg.family == "llama":
            q_BxTxHxF = rope(q_BxTxHxF, positions_BxT, cfg.rope_theta)
            k_BxTxKxF = rope(k_BxTxKxF, positions_BxT, cfg.rope_theta)

        B, T = q_BxTxHxF.shape[:2]
        q_BxTxKxGxF = q_BxTxHxF.reshape(B, T, K, H // K, F)
        # Keys and values as [B, K, S, F], the cache's layout: a decode step writes its T
        # slots and reads the cache without transposing all of it.
        k_BxKxSxF, v_BxKxSxF = k_BxTxKxF.swapaxes(1, 2), v_BxTxKxF.swapaxes(1, 2)
        new_cache = None
        if layer_cache is not None:
            start = (0, 0, cache_index, 0)
            k_BxKxSxF = jax.lax.dynamic_update_slice(
                layer_cache["k"], k_BxKxSxF.astype(layer_cache["k"].dtype), start)
            v_BxKxSxF = jax.lax.dynamic_update_slice(
                layer_cache["v"], v_BxKxSxF.astype(layer_cache["v"].dtype), start)
            new_cache = {"k": k_BxKxSxF, "v": v_BxKxSxF}
            k_BxKxSxF, v_BxKxSxF = k_BxKxSxF.astype(dtype), v_BxKxSxF.astype(dtype)
        out_BxTxKxGxF = attention.attend(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, segment_q_BxT,
                                         segment_k_BxS, cache_index, impl=cfg.attention_impl,
                                         block_size=cfg.attention_block_size,
                                         in_layer_scan=cfg.scan_layers)
        out_BxTxHxF = _constrain(out_BxTxKxGxF.reshape(B, T, H, F),
                                 ("batch", "length", "act_heads", "head_dim"))
        out_BxTxD = Projection((cfg.d_model,), ("heads", "head_dim", "embed"), bias,
                               std / (2 * cfg.n_layers) ** 0.5, dtype, name="out")(out_BxTxHxF)
        return checkpoint_name(out_BxTxD, "out_proj"), new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg, dtype = self.cfg, dtype_of(self.cfg)
        bias = cfg.family == "gpt2"
        std, out_std = 0.02, 0.02 / (2 * cfg.n_layers) ** 0.5

        def dense(name, features, names, init_std):
            return Projection((features,), names, bias, init_std, dtype, name=name)

        if cfg.family == "gpt2":
            h_BxTxM = nn.gelu(dense("fc_in", cfg.d_ff, ("embed", "mlp"), std)(x_BxTxD), approximate=True)
        else:
            gate = dense("gate", cfg.d_ff, ("embed", "mlp"), std)(x_BxTxD)
            h_BxTxM = nn.silu(gate) * dense("up", cfg.d_ff, ("embed", "mlp"), std)(x_BxTxD)
        h_BxTxM = _constrain(h_BxTxM, ("batch", "length", "act_mlp"))
        return dense("fc_out" if bias else "down", cfg.d_model, ("mlp", "embed"), out_std)(h_BxTxM)


class Block(nn.Module):
    """One pre-norm layer. Called as (carry, per-layer input, *broadcast inputs) ->
    (carry, per-layer output) so the same module runs unrolled or under nn.scan."""
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, layer_cache, positions_BxT, segment_q_BxT, segment_k_BxS,
                 cache_index):
        drop = nn.Dropout(self.cfg.dropout_rate, deterministic=self.deterministic)
        a, new_cache = Attention(self.cfg, name="attn")(
            Norm(self.cfg, name="attn_norm")(x_BxTxD), positions_BxT, segment_q_BxT,
            segment_k_BxS, layer_cache, cache_index)
        x_BxTxD = x_BxTxD + drop(a)
        x_BxTxD = x_BxTxD + drop(MLP(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x_BxTxD)))
        return _constrain(x_BxTxD, ("batch", "length", "act_embed")), new_cache


def _remat_policy(name: str):
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "save_projections":
        return jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES)
    return None  # "full": save nothing but the block's inputs


def block_class(cfg: ModelConfig):
    """Block, rematerialised as cfg asks. Under scan, CSE across iterations cannot happen,
    so remat's CSE barrier (which costs fusion) is left out (flax's advice for scan)."""
    policy = cfg.resolved_remat_policy
    if policy == "none":
        return Block
    return nn.remat(Block, policy=_remat_policy(policy), prevent_cse=not cfg.scan_layers)


def run_blocks(cfg: ModelConfig, deterministic: bool, x_BxTxD, layers_cache, *broadcast):
    """All layers; `layers_cache` and the returned new cache are a list of per-layer
    {k, v} (unrolled) or one {k, v} with a leading layer axis (scan_layers)."""
    block = block_class(cfg)
    if cfg.scan_layers:
        if isinstance(layers_cache, list):
            raise ValueError("a KV cache with one entry per layer was passed to a model with "
                             "scan_layers=True; build it with init_cache(cfg, ...)")
        scanned = nn.scan(block, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(0,) + (nn.broadcast,) * len(broadcast), length=cfg.n_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        return scanned(cfg, deterministic, name="layers")(x_BxTxD, layers_cache, *broadcast)
    if layers_cache is not None and not isinstance(layers_cache, list):
        raise ValueError("a stacked KV cache (scan_layers=True layout) was passed to a model "
                         "with scan_layers=False; build it with init_cache(cfg, ...)")
    new_layers = []
    for i in range(cfg.n_layers):
        layer_cache = None if layers_cache is None else layers_cache[i]
        x_BxTxD, new_layer = block(cfg, deterministic, name=f"layer_{i}")(
            x_BxTxD, layer_cache, *broadcast)
        new_layers.append(new_layer)
    return x_BxTxD, new_layers


class Transformer(nn.Module):
    """head='lm' returns logits_BxTxV; head='scalar' returns values_BxT (reward/value models).
    With `head_at_BxU` (query indices into T), the head runs only at those positions and
    the output is BxUxV / BxU: a prefill needs the last logits, not T x V of them.
    With `cache`, returns (output, new_cache)."""
    cfg: ModelConfig
    head: str = "lm"

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, *, deterministic: bool = True,
                 cache: Cache | None = None, cache_index=None, head_at_BxU=None):
        cfg, dtype = self.cfg, dtype_of(self.cfg)
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"head must be 'lm' or 'scalar', got {self.head!r}")
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, name="embed",
                         embedding_init=_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        x_BxTxD = embed(tokens_BxT)
        if cfg.family == "gpt2":
            table = self.param("pos_embedding", _init(nn.initializers.normal(0.01), ("pos", "embed")),
                               (cfg.max_len, cfg.d_model))
            x_BxTxD = x_BxTxD + table[positions_BxT].astype(dtype)
        x_BxTxD = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x_BxTxD)
        x_BxTxD = _constrain(x_BxTxD, ("batch", "length", "act_embed"))

        # Attention takes segment ids and slots, not a T x S mask: see model/attention.py.
        segment_q_BxT = segment_ids_BxT.astype(jnp.int32)
        if cache is None:
            segment_k_BxS, cache_index, layers_cache = segment_q_BxT, 0, None
        else:
            cache_index = jnp.asarray(cache_index, jnp.int32)
            segment_k_BxS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_q_BxT,
                                                         (0, cache_index))
            layers_cache = cache["layers"]
        x_BxTxD, new_layers = run_blocks(cfg, deterministic, x_BxTxD, layers_cache,
                                         positions_BxT, segment_q_BxT, segment_k_BxS, cache_index)
        if head_at_BxU is not None:
            x_BxTxD = jnp.take_along_axis(x_BxTxD, head_at_BxU.astype(jnp.int32)[..., None], axis=1)
        h_BxTxD = Norm(cfg, name="final_norm")(x_BxTxD)

        if self.head == "scalar":
            out = nn.Dense(1, dtype=jnp.float32, name="scalar_head",
                           kernel_init=_init(nn.initializers.normal(0.02), ("embed", "scalar")),
                           bias_init=_init(nn.initializers.zeros, ("scalar",)))(
                               h_BxTxD.astype(jnp.float32))[..., 0]
        elif cfg.tie_embeddings:
            out = embed.attend(h_BxTxD).astype(jnp.float32)
        else:
            out = Projection((cfg.vocab_size,), ("embed", "vocab"), False, 0.02, dtype,
                             name="lm_head")(h_BxTxD).astype(jnp.float32)
        if self.head == "lm":
            out = _constrain(out, ("batch", "length", "act_vocab"))
        if cache is None:
            return out
        return out, {"segment_ids": segment_k_BxS, "layers": new_layers}


def init_cache(cfg: ModelConfig, batch_size: int, cache_len: int) -> Cache:
    """An empty KV cache: every slot has segment id 0 (padding) until written. "layers" is
    a list of per-layer {k, v} [B, K, S, F], or with scan_layers one {k, v} [L, B, K, S, F]
    (the scan's per-layer input and output)."""
    shape = (batch_size, cfg.n_kv_heads, cache_len, cfg.resolved_head_dim)
    dtype = dtype_of(cfg)
    if cfg.scan_layers:
        stacked = (cfg.n_layers, *shape)
        layers = {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
    else:
        layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                  for _ in range(cfg.n_layers)]
    return {"segment_ids": jnp.zeros((batch_size, cache_len), jnp.int32), "layers": layers}
