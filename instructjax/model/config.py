"""Model configuration and named size presets (GPT-2 and Llama families)."""

from __future__ import annotations

import dataclasses

FAMILIES = ("gpt2", "llama")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("plain", "blockwise", "xla", "cudnn")  # see model/attention.py
# What a rematerialised block keeps from its forward pass for the backward pass:
#   none              no remat: every activation is kept
#   full              only the block's input (everything is recomputed)
#   save_dots         the outputs of matmuls without batch dims (all projections, MLP)
#   save_projections  the q/k/v/out attention projections (MaxText's save_qkv_proj)
REMAT_POLICIES = ("none", "full", "save_dots", "save_projections")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_len: int
    head_dim: int = 0  # 0 -> d_model // n_heads
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    compute_dtype: str = "float32"
    remat: bool = False  # kept for old configs and --remat: True means remat_policy "full"
    remat_policy: str = ""  # one of REMAT_POLICIES; "" follows `remat`
    # The blocks as one nn.scan over a stacked leading layer axis (params `layers/...`)
    # instead of `layer_0` ... `layer_{n-1}`: one layer's gradient lives at a time and the
    # step compiles once per block, not n_layers times. model/layout.py converts.
    scan_layers: bool = False
    attention_impl: str = "plain"  # one of ATTENTION_IMPLS
    attention_block_size: int = 512  # blockwise: query and key block length
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ValueError(f"model config: {message}")
        check(self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        check(self.head_dim >= 0, f"head_dim must be >= 0, got {self.head_dim}")
        check(self.head_dim > 0 or self.d_model % self.n_heads == 0,
              f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
              "unless head_dim is set")
        check(self.n_heads % self.n_kv_heads == 0,
              f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        check(self.family == "llama" or self.n_kv_heads == self.n_heads,
              "gpt2 models use n_kv_heads == n_heads")
        check(0.0 <= self.dropout_rate < 1.0, f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        check(self.compute_dtype in DTYPES, f"compute_dtype must be one of {DTYPES}, got {self.compute_dtype!r}")
        check(self.family == "llama" or self.head_dim in (0, self.d_model // self.n_heads),
              "gpt2 models use head_dim == d_model // n_heads")
        check(self.remat_policy in ("", *REMAT_POLICIES),
              f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        check(not (self.remat and self.remat_policy == "none"),
              "remat=True asks for rematerialisation but remat_policy is 'none'; drop one")
        check(self.attention_impl in ATTENTION_IMPLS,
              f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        check(self.attention_block_size > 0,
              f"attention_block_size must be > 0, got {self.attention_block_size}")

    @property
    def resolved_remat_policy(self) -> str:
        return self.remat_policy or ("full" if self.remat else "none")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Exact parameter count of the LM (head='lm'); non_embedding drops token/position
        embeddings and an untied output matrix (the convention of scaling-law fits)."""
        d, f, hd = self.d_model, self.d_ff, self.resolved_head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        if self.family == "gpt2":
            attn = d * q + 2 * d * kv + q * d + q + 2 * kv + d  # kernels + biases
            mlp = 2 * d * f + f + d
            norms = 2 * 2 * d
            final_norm = 2 * d
        else:
            attn = d * q + 2 * d * kv + q * d
            mlp = 3 * d * f
            norms = 2 * d
            final_norm = d
        body = self.n_layers * (attn + mlp + norms) + final_norm
        if non_embedding:
            return body
        embed = self.vocab_size * d
        if self.family == "gpt2":
            embed += self.max_len * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return body + embed + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N (forward + backward matmuls, including the output
        projection) + 12 * L * H * F * T for attention scores and values (PaLM, appendix B)."""
        n = self.num_params(non_embedding=True) + self.vocab_size * self.d_model
        attention = 12 * self.n_layers * self.n_heads * self.resolved_head_dim * seq_len
        return 6.0 * n + attention


def _gpt2(d, layers, heads, *, vocab=50257, max_len=1024, ff_mult=4):
    return dict(family="gpt2", vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                n_kv_heads=heads, d_ff=ff_mult * d, max_len=max_len, tie_embeddings=True)


def _llama(d, layers, heads, kv_heads, ff, *, vocab, max_len, theta=10000.0, eps=1e-5):
    return dict(family="llama", vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                n_kv_heads=kv_heads, d_ff=ff, max_len=max_len, tie_embeddings=False,
                rope_theta=theta, norm_eps=eps)


PRESETS: dict[str, dict] = {
    # Tests and CPU demos.
    "tiny": _gpt2(64, 2, 4, vocab=512, max_len=128),
    "llama-tiny": _llama(64, 2, 4, 2, 172, vocab=512, max_len=128),
    "demo": _gpt2(128, 4, 4, vocab=2048, max_len=256),
    # A scaling sweep on a CPU: one depth (4 layers) and one head size (16), widths spaced
    # evenly in log N; non-embedding parameters from 51k (scale-1) to 1.8M (scale-5, 35x).
    # One shape family on purpose: at this budget 2-layer models plateau where deeper ones
    # do not, which mixes a depth effect into the size trend.
    "scale-1": _gpt2(32, 4, 2, vocab=2048, max_len=256),
    "scale-2": _gpt2(48, 4, 3, vocab=2048, max_len=256),
    "scale-3": _gpt2(80, 4, 5, vocab=2048, max_len=256),
    "scale-4": _gpt2(128, 4, 8, vocab=2048, max_len=256),
    "scale-5": _gpt2(192, 4, 12, vocab=2048, max_len=256),
    "scale-6": _gpt2(256, 4, 16, vocab=2048, max_len=256),
    # The throughput benchmark's model.
    "bench-512": _gpt2(512, 8, 8, vocab=8192, max_len=512),
    # Real shapes.
    "gpt2-124m": _gpt2(768, 12, 12),
    "gpt2-355m": _gpt2(1024, 24, 16),
    "gpt2-774m": _gpt2(1280, 36, 20),
    "gpt2-1.5b": _gpt2(1600, 48, 25),
    "llama-1b": _llama(2048, 16, 32, 8, 8192, vocab=128256, max_len=4096, theta=500000.0),
    "llama-7b": _llama(4096, 32, 32, 32, 11008, vocab=32000, max_len=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown model config field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
