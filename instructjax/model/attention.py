"""Attention over grouped heads, in four implementations of one rule.

Shape legend (as in model/transformer.py): B batch, T queries, S keys, K key/value heads,
G = H // K query heads per KV head, F head_dim; bq / bk query / key block lengths.

The rule: query t (slot q_offset + t) may attend key s (slot s) iff s <= q_offset + t,
segment_q[t] == segment_k[s] and segment_k[s] != 0 (segment 0 marks padding).

  plain      scores for all T x S pairs, masked, softmax in float32. The reference.
  blockwise  flash-style: an online softmax over key blocks inside a loop over query
             blocks, with the mask computed per block from segment ids and slots; key
             blocks wholly after a query block's last slot are skipped. A custom VJP
             saves only the output and the row log-sum-exp and recomputes each block's
             probabilities in the backward pass, so neither pass stores T x S scores.
  xla/cudnn  jax.nn.dot_product_attention with the mask as a [B, 1, T, S] boolean
             (`xla` materialises the scores like plain; cuDNN takes the mask as an
             additive B x 1 x T x S bias: that is its only way to express segments).

A query with no visible key (a padding query) gets a finite output that nothing reads:
plain averages all S values; blockwise averages the values of the blocks it visited.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from instructjax.model.config import ATTENTION_IMPLS

MASK_VALUE = -1e9  # finite, so fully masked rows (pad queries) give no NaN


def visible(segment_q_BxT, segment_k_BxS, q_slot_T, k_slot_S):
    """The attention rule as a [B, T, S] boolean."""
    causal_TxS = k_slot_S[None, :] <= q_slot_T[:, None]
    same_BxTxS = segment_q_BxT[:, :, None] == segment_k_BxS[:, None, :]
    return causal_TxS[None] & same_BxTxS & (segment_k_BxS[:, None, :] != 0)


def attend(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, segment_q_BxT, segment_k_BxS, q_offset, *,
           impl: str = "plain", block_size: int = 512, in_layer_scan: bool = False):
    """out_BxTxKxGxF in q's dtype. `q_offset`: the slot of the first query (0 without a
    cache, the cache index when decoding); an int or a traced int32 scalar.
    `in_layer_scan`: called inside a scan over layers (cfg.scan_layers)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    segment_q_BxT = segment_q_BxT.astype(jnp.int32)
    segment_k_BxS = segment_k_BxS.astype(jnp.int32)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    if in_layer_scan:
        # Segment ids and the offset are the same in every layer, and JAX's scan hoists
        # what depends only on them out of the layer loop (stacking what inner loops
        # make): masks of every block at once, T x S per head (2.5 GiB per device planned
        # for Llama-7B, 4 x 2048 tokens). Tied to this layer's queries, each mask is made
        # where it is used.
        q_BxTxKxGxF, segment_q_BxT, segment_k_BxS, q_offset = jax.lax.optimization_barrier(
            (q_BxTxKxGxF, segment_q_BxT, segment_k_BxS, q_offset))
    T = q_BxTxKxGxF.shape[1]
    # One query (a decode step) has a 1 x S score row: nothing to save by tiling it.
    if impl == "plain" or (impl == "blockwise" and T == 1):
        return _plain(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, segment_q_BxT, segment_k_BxS, q_offset)
    if impl == "blockwise":
        return _blockwise(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, segment_q_BxT, segment_k_BxS,
                          q_offset, block_size)
    return _library(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, segment_q_BxT, segment_k_BxS, q_offset,
                    impl)


def _mask_scores(scores, mask):
    """Invisible scores set to MASK_VALUE. The fill is made from the scores (x * 0 + c), not
    broadcast from a constant, which a layer scan would hoist (see `attend`)."""
    return jnp.where(mask, scores, scores * 0.0 + MASK_VALUE)


def _plain(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, segment_q_BxT, segment_k_BxS, q_offset):
    T, S, F = q_BxTxKxGxF.shape[1], k_BxKxSxF.shape[2], q_BxTxKxGxF.shape[-1]
    mask_BxTxS = visible(segment_q_BxT, segment_k_BxS, q_offset + jnp.arange(T), jnp.arange(S))
    scores = jnp.einsum("btkgf,bksf->bkgts", q_BxTxKxGxF, k_BxKxSxF,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(F))
    scores = _mask_scores(scores, mask_BxTxS[:, None, None])
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxKxGxF.dtype)
    return jnp.einsum("bkgts,bksf->btkgf", probs, v_BxKxSxF)


def _library(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, segment_q_BxT, segment_k_BxS, q_offset, impl):
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU (cuDNN); this process's "
                         f"backend is {jax.default_backend()!r}: use 'blockwise' or 'plain'")
    B, T, K, G, F = q_BxTxKxGxF.shape
    S = k_BxKxSxF.shape[2]
    mask_Bx1xTxS = visible(segment_q_BxT, segment_k_BxS, q_offset + jnp.arange(T),
                           jnp.arange(S))[:, None]
    # jax.nn.dot_product_attention maps query head n to KV head n // G, as our reshape does.
    out_BxTxHxF = jax.nn.dot_product_attention(
        q_BxTxKxGxF.reshape(B, T, K * G, F), k_BxKxSxF.swapaxes(1, 2),
        v_BxKxSxF.swapaxes(1, 2), mask=mask_Bx1xTxS, implementation=impl)
    return out_BxTxHxF.reshape(B, T, K, G, F)


def _pad_to(x, axis, multiple):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)  # zeros: padded keys get segment 0 (never visible)


def _blockwise(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, segment_q_BxT, segment_k_BxS, q_offset,
               block_size):
    T, S = q_BxTxKxGxF.shape[1], k_BxKxSxF.shape[2]
    bq, bk = min(block_size, T), min(block_size, S)
    out = _flash(_pad_to(q_BxTxKxGxF, 1, bq), _pad_to(k_BxKxSxF, 2, bk),
                 _pad_to(v_BxKxSxF, 2, bk), _pad_to(segment_q_BxT, 1, bq),
                 _pad_to(segment_k_BxS, 1, bk), q_offset, bq, bk)
    return out[:, :T]


# Blocked layouts: the block index leads, so lax.scan walks it; within a block, heads come
# before positions ([B, K, G, bq, F]), so every block matmul's output is in dot_general's own
# order (XLA:CPU refuses some bf16 x bf16 -> f32 dots whose output it must transpose).
def _q_blocks(x_BxTxKxGxF, bq):
    B, T, K, G, F = x_BxTxKxGxF.shape
    return x_BxTxKxGxF.reshape(B, T // bq, bq, K, G, F).transpose(1, 0, 3, 4, 2, 5)


def _q_unblock(x_nqxBxKxGxbqxF):
    nq, B, K, G, bq, F = x_nqxBxKxGxbqxF.shape
    return x_nqxBxKxGxbqxF.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K, G, F)


def _kv_blocks(x_BxKxSxF, bk):
    B, K, S, F = x_BxKxSxF.shape
    return jnp.moveaxis(x_BxKxSxF.reshape(B, K, S // bk, bk, F), 2, 0)


def _row_blocks(x_BxT, b):
    """Per-position values (segment ids) [B, T] -> [nb, B, b]."""
    B, T = x_BxT.shape
    return jnp.moveaxis(x_BxT.reshape(B, T // b, b), 1, 0)


def _stat_blocks(x_BxTxKxG, bq):
    """Per-query row statistics [B, T, K, G] -> [nq, B, K, G, bq]."""
    B, T, K, G = x_BxTxKxG.shape
    return x_BxTxKxG.reshape(B, T // bq, bq, K, G).transpose(1, 0, 3, 4, 2)


def _block_scores(q_i, k_j, seg_q_i, seg_k_j, q_slot_i, k_slot_j):
    """Scaled float32 scores [B, K, G, bq, bk] with invisible pairs set to MASK_VALUE,
    and the visibility mask [B, 1, 1, bq, bk]."""
    scale = 1.0 / math.sqrt(q_i.shape[-1])
    s = jnp.einsum("bkgtf,bksf->bkgts", q_i, k_j, preferred_element_type=jnp.float32) * scale
    mask = visible(seg_q_i, seg_k_j, q_slot_i, k_slot_j)[:, None, None]
    return _mask_scores(s, mask), mask


def _needed(q_offset, i, j, bq, bk):
    """Key block j holds a key at or before query block i's last slot (else all masked)."""
    return j * bk <= q_offset + (i + 1) * bq - 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, seg_q, seg_k, q_offset, bq, bk):
    return _flash_forward(q, k, v, seg_q, seg_k, q_offset, bq, bk)[0]


def _flash_forward(q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, seg_q_BxT, seg_k_BxS, q_offset, bq, bk):
    """(out_BxTxKxGxF, lse_BxTxKxG): the online softmax (FlashAttention-2, algorithm 1)."""
    B, T, K, G, F = q_BxTxKxGxF.shape
    nk = k_BxKxSxF.shape[2] // bk
    keys = (_kv_blocks(k_BxKxSxF, bk), _kv_blocks(v_BxKxSxF, bk), _row_blocks(seg_k_BxS, bk),
            jnp.arange(nk))

    def query_block(xs):
        q_i, seg_q_i, i = xs  # q_i: [B, K, G, bq, F]
        q_slot_i = q_offset + i * bq + jnp.arange(bq)

        def key_block(carry, ys):
            k_j, v_j, seg_k_j, j = ys

            def update(carry):
                m, l, acc = carry
                s, _ = _block_scores(q_i, k_j, seg_q_i, seg_k_j, q_slot_i, j * bk + jnp.arange(bk))
                m_new = jnp.maximum(m, s.max(-1))
                correction = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new[..., None])
                pv = jnp.einsum("bkgts,bksf->bkgtf", p.astype(v_j.dtype), v_j,
                                preferred_element_type=jnp.float32)
                return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv

            return jax.lax.cond(_needed(q_offset, i, j, bq, bk), update, lambda c: c, carry), None

        # m starts at -inf; key block 0 is always visited and its masked scores are finite,
        # so m is finite and l >= 1 afterwards (no 0/0, even for a pad query).
        init = (jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
                jnp.zeros((B, K, G, bq), jnp.float32), jnp.zeros((B, K, G, bq, F), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_block, init, keys)
        return (acc / l[..., None]).astype(q_i.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(query_block, (_q_blocks(q_BxTxKxGxF, bq), _row_blocks(seg_q_BxT, bq),
                                         jnp.arange(T // bq)))
    return _q_unblock(out), _q_unblock(lse[..., None])[..., 0]


def _flash_fwd(q, k, v, seg_q, seg_k, q_offset, bq, bk):
    out, lse = _flash_forward(q, k, v, seg_q, seg_k, q_offset, bq, bk)
    return out, (q, k, v, seg_q, seg_k, q_offset, out, lse)


def _flash_bwd(bq, bk, residuals, d_out_BxTxKxGxF):
    """FlashAttention-2's backward (algorithm 2): probabilities recomputed per block from the
    saved log-sum-exp; dq accumulates over key blocks, dk/dv over query blocks. (Key blocks
    outside, with dk/dv per block, planned 0.13 GiB worse for Llama-7B on v5e.)"""
    q_BxTxKxGxF, k_BxKxSxF, v_BxKxSxF, seg_q_BxT, seg_k_BxS, q_offset, out, lse_BxTxKxG = residuals
    B, T, K, G, F = q_BxTxKxGxF.shape
    nk = k_BxKxSxF.shape[2] // bk
    scale = 1.0 / math.sqrt(F)
    dtype = q_BxTxKxGxF.dtype
    d_out_BxTxKxGxF = d_out_BxTxKxGxF.astype(dtype)
    # D = rowsum(dO * O): the softmax-Jacobian term of every row.
    delta_BxTxKxG = jnp.sum(d_out_BxTxKxGxF.astype(jnp.float32) * out.astype(jnp.float32), -1)
    keys = (_kv_blocks(k_BxKxSxF, bk), _kv_blocks(v_BxKxSxF, bk), _row_blocks(seg_k_BxS, bk),
            jnp.arange(nk))

    def query_block(carry, xs):
        q_i, do_i, lse_i, delta_i, seg_q_i, i = xs  # q_i, do_i: [B, K, G, bq, F]
        q_slot_i = q_offset + i * bq + jnp.arange(bq)

        def key_block(carry, ys):
            k_j, v_j, seg_k_j, j = ys

            def update(carry):
                dq_i, dk, dv = carry
                s, mask = _block_scores(q_i, k_j, seg_q_i, seg_k_j, q_slot_i,
                                        j * bk + jnp.arange(bk))
                p = jnp.exp(s - lse_i[..., None])
                dv_j = jnp.einsum("bkgts,bkgtf->bksf", p.astype(dtype), do_i,
                                  preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgtf,bksf->bkgts", do_i, v_j, preferred_element_type=jnp.float32)
                # Invisible pairs pass no gradient to their scores (as jnp.where in plain).
                ds = (p * (dp - delta_i[..., None]) * mask * scale).astype(dtype)
                dq_i = dq_i + jnp.einsum("bkgts,bksf->bkgtf", ds, k_j,
                                         preferred_element_type=jnp.float32)
                dk_j = jnp.einsum("bkgts,bkgtf->bksf", ds, q_i, preferred_element_type=jnp.float32)
                return dq_i, dk.at[j].add(dk_j), dv.at[j].add(dv_j)

            return jax.lax.cond(_needed(q_offset, i, j, bq, bk), update, lambda c: c, carry), None

        dk, dv = carry
        init = (jnp.zeros(q_i.shape, jnp.float32), dk, dv)
        (dq_i, dk, dv), _ = jax.lax.scan(key_block, init, keys)
        return (dk, dv), dq_i.astype(dtype)

    zeros_kv = jnp.zeros((nk, B, K, bk, F), jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros_kv, zeros_kv), (
        _q_blocks(q_BxTxKxGxF, bq), _q_blocks(d_out_BxTxKxGxF, bq), _stat_blocks(lse_BxTxKxG, bq),
        _stat_blocks(delta_BxTxKxG, bq), _row_blocks(seg_q_BxT, bq), jnp.arange(T // bq)))

    def unblock_kv(x, like):
        return jnp.moveaxis(x, 0, 2).reshape(like.shape).astype(like.dtype)

    # Integer inputs (segment ids, offset) have no cotangent.
    return (_q_unblock(dq), unblock_kv(dk, k_BxKxSxF), unblock_kv(dv, v_BxKxSxF),
            None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
