"""How Hugging Face GPT-2 and Llama checkpoints map onto our ModelConfig and params tree.

Pure tables and array layout transforms, no file I/O (that is model/hf.py). Every tensor is
mapped explicitly: a `Layout` says which checkpoint tensor holds one of our parameters and
how its dims relate to ours:

  GPT-2 (Conv1D, weights stored [in, out]; q, k, v fused side by side in c_attn):
    h.i.attn.c_attn.weight [D, 3*H*F] -> attn/{query,key,value}/kernel [D, H, F]
  Llama (nn.Linear, weights stored [out, in]):
    layers.i.self_attn.q_proj.weight [H*F, D] -> attn/query/kernel [D, H, F]
    layers.i.self_attn.o_proj.weight [D, H*F] -> attn/out/kernel [H, F, D]
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from instructjax.model.config import ModelConfig

CONFIG_FILE = "config.json"
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# GPT-2's tanh-approximated GELU, under the names transformers gives it.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# Non-parameter buffers some checkpoints carry (GPT-2's causal mask, Llama's RoPE table).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class HFCheckpointError(ValueError):
    """A checkpoint we cannot read or write faithfully; the message names file and field."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one of our parameters lives in a checkpoint tensor.

    The stored tensor, transposed first when `transpose` (nn.Linear keeps [out, in]), is
    cut along its last dim to [offset, offset + width) (fused q/k/v), then each stored dim
    is split row-major into the target dims of its group, in order.
    """
    key: str
    groups: tuple[tuple[int, ...], ...]
    transpose: bool = False
    offset: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d for group in self.groups for d in group)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(math.prod(group) for group in self.groups)

    def to_stored(self, array: np.ndarray) -> np.ndarray:
        """Our array -> its part of the stored tensor (the inverse of `select`)."""
        flat = np.asarray(array).reshape(self.widths)
        return flat.T if self.transpose else flat

    def source_box(self, index: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple]:
        """For a block `index` of our array: the box of the stored tensor that holds it
        (in stored order) and the indexing that cuts the block out of that box once it is
        transposed and reshaped to our dims. Only the leading dim of each group narrows
        the box; trailing dims are cut afterwards (they are rarely sharded)."""
        box, shape, picks = [], [], []
        dims = iter(zip(index, self.shape))
        for i, group in enumerate(self.groups):
            ranges = [s.indices(n)[:2] for s, n in (next(dims) for _ in group)]
            inner = math.prod(group[1:])
            start, stop = ranges[0][0] * inner, ranges[0][1] * inner
            if i == len(self.groups) - 1:
                start, stop = start + self.offset, stop + self.offset
            box.append(slice(start, stop))
            shape.extend([ranges[0][1] - ranges[0][0], *group[1:]])
            picks.extend([slice(None)] + [slice(a, b) for a, b in ranges[1:]])
        if self.transpose:
            box.reverse()
        return tuple(box), (tuple(shape), tuple(picks))

    def select(self, box_array: np.ndarray, cut) -> np.ndarray:
        shape, picks = cut
        arr = box_array.T if self.transpose else box_array
        return arr.reshape(shape)[picks]


def _get(hf: dict, name: str, path: str, default=...):
    if name in hf and hf[name] is not None:
        return hf[name]
    if default is ...:
        raise HFCheckpointError(f"{path}: required field {name!r} is missing")
    return default


def _require(ok: bool, path: str, field: str, message: str) -> None:
    if not ok:
        raise HFCheckpointError(f"{path}: field {field!r}: {message}")


def _rope_theta(hf: dict, path: str) -> float:
    """RoPE base from transformers>=5 `rope_parameters` or the older `rope_theta`;
    any scaled RoPE variant (linear, dynamic, yarn, llama3, ...) is refused."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    for field, spec in (("rope_parameters", params), ("rope_scaling", legacy)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        _require(kind == "default", path, field,
                 f"RoPE type {kind!r} is not implemented (only unscaled 'default' RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, path: str) -> ModelConfig:
    """A transformers config.json (as a dict) -> our ModelConfig; refuses anything our
    model would compute differently."""
    model_type = hf.get("model_type")
    _require(model_type in ARCHITECTURES, path, "model_type",
             f"{model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
    _require(archs == [ARCHITECTURES[model_type]], path, "architectures",
             f"{archs} is not supported; expected [{ARCHITECTURES[model_type]!r}]")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        _require(act in GPT2_ACTIVATIONS, path, "activation_function",
                 f"{act!r} is not supported; our GPT-2 uses tanh GELU {GPT2_ACTIVATIONS}")
        _require(hf.get("scale_attn_weights", True), path, "scale_attn_weights",
                 "must be true (we scale attention scores by 1/sqrt(head_dim))")
        _require(not hf.get("scale_attn_by_inverse_layer_idx", False), path,
                 "scale_attn_by_inverse_layer_idx", "per-layer attention scaling is not implemented")
        _require(not hf.get("add_cross_attention", False), path, "add_cross_attention",
                 "cross-attention is not implemented")
        d, heads = _get(hf, "n_embd", path), _get(hf, "n_head", path)
        return ModelConfig(
            family="gpt2", vocab_size=_get(hf, "vocab_size", path), d_model=d,
            n_layers=_get(hf, "n_layer", path), n_heads=heads, n_kv_heads=heads,
            d_ff=_get(hf, "n_inner", path, 4 * d), max_len=_get(hf, "n_positions", path),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            norm_eps=float(_get(hf, "layer_norm_epsilon", path, 1e-5)))
    act = hf.get("hidden_act", "silu")
    _require(act == "silu", path, "hidden_act", f"{act!r} is not supported; Llama uses 'silu'")
    for field in ("attention_bias", "mlp_bias"):
        _require(not hf.get(field, False), path, field,
                 "biases in attention/MLP projections are not implemented (our Llama has none)")
    d, heads = _get(hf, "hidden_size", path), _get(hf, "num_attention_heads", path)
    head_dim = _get(hf, "head_dim", path, d // heads)
    return ModelConfig(
        family="llama", vocab_size=_get(hf, "vocab_size", path), d_model=d,
        n_layers=_get(hf, "num_hidden_layers", path), n_heads=heads,
        n_kv_heads=_get(hf, "num_key_value_heads", path, heads),
        d_ff=_get(hf, "intermediate_size", path),
        max_len=_get(hf, "max_position_embeddings", path),
        head_dim=0 if head_dim * heads == d else head_dim,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=_rope_theta(hf, path), norm_eps=float(_get(hf, "rms_norm_eps", path, 1e-6)))


def config_to_hf(cfg: ModelConfig, *, bos_id=None, eos_id=None, pad_id=None) -> dict:
    """Our ModelConfig -> a config.json that transformers' from_pretrained reads."""
    common = dict(architectures=[ARCHITECTURES[cfg.family]], model_type=cfg.family,
                  vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                  bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  dtype="float32", torch_dtype="float32")
    if cfg.family == "gpt2":
        return dict(common, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                    n_inner=cfg.d_ff, n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                    activation_function="gelu_new", scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # Both RoPE spellings: transformers>=5 reads rope_parameters, 4.x reads rope_theta.
    return dict(common, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.resolved_head_dim, intermediate_size=cfg.d_ff,
                max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
                hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                rope_theta=cfg.rope_theta,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


def tensor_layouts(cfg: ModelConfig) -> dict[tuple[str, ...], Layout]:
    """Our parameter path (as in flax's flatten_dict) -> its Layout, for head='lm'."""
    D, M, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    H, K, F = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    out: dict[tuple[str, ...], Layout] = {}
    if cfg.family == "gpt2":
        p = "transformer."
        out[("embed", "embedding")] = Layout(p + "wte.weight", ((V,), (D,)))
        out[("pos_embedding",)] = Layout(p + "wpe.weight", ((cfg.max_len,), (D,)))
        norms = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
        for i in range(cfg.n_layers):
            layer, h = f"layer_{i}", f"{p}h.{i}."
            for ours, theirs in norms.items():
                out[(layer, ours, "scale")] = Layout(f"{h}{theirs}.weight", ((D,),))
                out[(layer, ours, "bias")] = Layout(f"{h}{theirs}.bias", ((D,),))
            for j, name in enumerate(("query", "key", "value")):
                at = j * H * F
                out[(layer, "attn", name, "kernel")] = Layout(
                    f"{h}attn.c_attn.weight", ((D,), (H, F)), offset=at)
                out[(layer, "attn", name, "bias")] = Layout(f"{h}attn.c_attn.bias", ((H, F),),
                                                            offset=at)
            out[(layer, "attn", "out", "kernel")] = Layout(f"{h}attn.c_proj.weight", ((H, F), (D,)))
            out[(layer, "attn", "out", "bias")] = Layout(f"{h}attn.c_proj.bias", ((D,),))
            out[(layer, "mlp", "fc_in", "kernel")] = Layout(f"{h}mlp.c_fc.weight", ((D,), (M,)))
            out[(layer, "mlp", "fc_in", "bias")] = Layout(f"{h}mlp.c_fc.bias", ((M,),))
            out[(layer, "mlp", "fc_out", "kernel")] = Layout(f"{h}mlp.c_proj.weight", ((M,), (D,)))
            out[(layer, "mlp", "fc_out", "bias")] = Layout(f"{h}mlp.c_proj.bias", ((D,),))
        out[("final_norm", "scale")] = Layout(p + "ln_f.weight", ((D,),))
        out[("final_norm", "bias")] = Layout(p + "ln_f.bias", ((D,),))
    else:
        p = "model."
        out[("embed", "embedding")] = Layout(p + "embed_tokens.weight", ((V,), (D,)))
        for i in range(cfg.n_layers):
            layer, h = f"layer_{i}", f"{p}layers.{i}."
            out[(layer, "attn_norm", "scale")] = Layout(f"{h}input_layernorm.weight", ((D,),))
            out[(layer, "mlp_norm", "scale")] = Layout(f"{h}post_attention_layernorm.weight", ((D,),))
            for name, proj, heads in (("query", "q", H), ("key", "k", K), ("value", "v", K)):
                out[(layer, "attn", name, "kernel")] = Layout(
                    f"{h}self_attn.{proj}_proj.weight", ((D,), (heads, F)), transpose=True)
            out[(layer, "attn", "out", "kernel")] = Layout(
                f"{h}self_attn.o_proj.weight", ((H, F), (D,)), transpose=True)
            for name, (n_in, n_out) in (("gate", (D, M)), ("up", (D, M)), ("down", (M, D))):
                out[(layer, "mlp", name, "kernel")] = Layout(
                    f"{h}mlp.{name}_proj.weight", ((n_in,), (n_out,)), transpose=True)
        out[("final_norm", "scale")] = Layout(p + "norm.weight", ((D,),))
    if not cfg.tie_embeddings:
        out[("lm_head", "kernel")] = Layout("lm_head.weight", ((D,), (V,)), transpose=True)
    return out


def stored_shapes(layouts: dict[tuple[str, ...], Layout]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> its full stored shape (fused tensors summed over parts)."""
    shapes: dict[str, list[int]] = {}
    for layout in layouts.values():
        dims = list(layout.widths[::-1] if layout.transpose else layout.widths)
        last = len(dims) - 1 if not layout.transpose else 0
        dims[last] = layout.offset + dims[last]
        have = shapes.setdefault(layout.key, dims)
        have[last] = max(have[last], dims[last])
    return {k: tuple(v) for k, v in shapes.items()}
