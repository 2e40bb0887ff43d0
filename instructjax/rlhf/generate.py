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


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt: str
    text: str            # decoded response, cut before the first EOS
    tokens: list[int]    # response tokens including the EOS if one was produced
    sum_logprob: float
    mean_logprob: float
    ended: bool          # produced EOS within max_new_tokens


def generate(params, model, tokenizer: Tokenizer, prompts: list[str], *,
             sampling: SamplingConfig, mesh, rng: jax.Array, batch_size: int = 32,
             pad_to: int = 16, max_prompt_len: int | None = None) -> list[Generation]:
    dp = parallel.data_parallel_size(mesh)
    batch_size = max(dp, batch_size // dp * dp)
    encoded = [tokenizer.encode(p) for p in prompts]
    limit = max_prompt_len or (model.cfg.max_len - sampling.max_new_tokens)
    for prompt, ids in zip(prompts, encoded):
        if len(ids) > limit:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the {limit} that fit the "
                             f"context with {sampling.max_new_tokens} new tokens: {prompt[:80]!r}")
    sample_fn = jax.jit(sample, static_argnames=("model", "cfg"))
    outputs: list[Generation] = []
    sharding = parallel.batch_sharding(mesh)
    for start in range(0, len(prompts), batch_size):
        chunk = encoded[start:start + batch_size]
        rows = chunk + [[tokenizer.eos_id]] * (batch_size - len(chunk))
        width = -(-max(len(r) for r in rows) // pad_to) * pad_to
        tokens_BxP, mask_BxP = left_pad(rows, tokenizer.pad_id, width)
        out = sample_fn(params, jax.device_put(tokens_BxP, sharding),
                        jax.device_put(mask_BxP, sharding),
                        jax.random.fold_in(rng, start), model=model, cfg=sampling)
        out = jax.device_get(out)
        for i in range(len(chunk)):
            mask = out["mask_BxN"][i] > 0
            ids = out["tokens_BxN"][i][mask].tolist()
            logps = out["logprobs_BxN"][i][mask]
            text_ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids
            outputs.append(Generation(
                prompt=prompts[start + i], text=tokenizer.decode(text_ids), tokens=ids,
                sum_logprob=float(np.sum(logps)), mean_logprob=float(np.mean(logps)) if ids else 0.0,
                ended=bool(out["ended_B"][i])))
    return outputs
