"""Batched generation from a trained policy with the jitted KV-cache sampler.

Used for sample tables, comparison data, rollouts' text view and code sampling. Prompts are
left-padded to a bucketed length (multiples of `pad_to`) so repeated calls reuse compiled
programs; the batch is padded to a multiple of the data-parallel size.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from instructjax import parallel
from instructjax.data.tokenizer import Tokenizer
from instructjax.sampling import SamplingConfig, left_pad, sample


_sample = jax.jit(sample, static_argnames=("model", "cfg"))  # one compile per shape and config


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt: str
    text: str            # decoded response, cut before the first EOS
    tokens: list[int]    # response tokens including the EOS if one was produced
    sum_logprob: float   # over the tokens that make up `text` (and the EOS, if produced)
    mean_logprob: float
    ended: bool          # produced EOS or a stop sequence within max_new_tokens


def generate(params, model, tokenizer: Tokenizer, prompts: list[str], *,
             sampling: SamplingConfig, mesh, rng: jax.Array, batch_size: int = 32,
             pad_to: int = 16, max_prompt_len: int | None = None,
             stop: tuple[str, ...] = ()) -> list[Generation]:
    """Samples one response per prompt. A response is cut before the first of the `stop`
    strings (Codex: "\\ndef", "\\nclass", ...), and its log-probs then cover only the
    tokens needed to spell what is kept, so ranking by log-prob scores the kept text."""
    if tokenizer.vocab_size < model.cfg.vocab_size:  # only ids the tokenizer can decode
        sampling = dataclasses.replace(sampling, vocab_limit=tokenizer.vocab_size)
    dp = parallel.data_parallel_size(mesh)
    batch_size = max(dp, batch_size // dp * dp)
    encoded = [tokenizer.encode(p) for p in prompts]
    limit = max_prompt_len or (model.cfg.max_len - sampling.max_new_tokens)
    for prompt, ids in zip(prompts, encoded):
        if len(ids) > limit:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the {limit} that fit the "
                             f"context with {sampling.max_new_tokens} new tokens: {prompt[:80]!r}")
    outputs: list[Generation] = []
    sharding = parallel.batch_sharding(mesh)
    for start in range(0, len(prompts), batch_size):
        chunk = encoded[start:start + batch_size]
        rows = chunk + [[tokenizer.eos_id]] * (batch_size - len(chunk))
        width = -(-max(len(r) for r in rows) // pad_to) * pad_to
        tokens_BxP, mask_BxP = left_pad(rows, tokenizer.pad_id, width)
        out = _sample(params, jax.device_put(tokens_BxP, sharding),
                        jax.device_put(mask_BxP, sharding),
                        jax.random.fold_in(rng, start), model=model, cfg=sampling)
        out = jax.device_get(out)
        for i in range(len(chunk)):
            mask = out["mask_BxN"][i] > 0
            ids = out["tokens_BxN"][i][mask].tolist()
            logps = out["logprobs_BxN"][i][mask]
            ended = bool(out["ended_B"][i])
            text_ids = ids[:-1] if ended else ids
            text = tokenizer.decode(text_ids)
            cut = min((c for c in (text.find(s) for s in stop) if c >= 0), default=-1)
            if cut >= 0:
                text, ended = text[:cut], True
                ids = prefix_spelling(tokenizer, text_ids, cut)
                logps = logps[:len(ids)]
            outputs.append(Generation(
                prompt=prompts[start + i], text=text, tokens=ids,
                sum_logprob=float(np.sum(logps)), mean_logprob=float(np.mean(logps)) if ids else 0.0,
                ended=ended))
    return outputs


def prefix_spelling(tokenizer: Tokenizer, ids: list[int], n_chars: int) -> list[int]:
    """The shortest prefix of `ids` whose text covers the first n_chars characters."""
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n])) >= n_chars:
            return ids[:n]
    return ids
