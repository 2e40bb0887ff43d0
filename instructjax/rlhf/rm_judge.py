"""Win rates of policies on your own prompts, judged by a trained reward model.

Without labelers (or a gold judge, which only the embedded world has) the usual stand-in is
the reward model itself: each policy answers every prompt once, and a policy wins a prompt
when the reward model scores its response above the reference policy's (identical
responses count half). Keep in mind what this measures: a policy optimised against the
same reward model is judged by the proxy it was trained to please, so its win rate is an
upper bound on what people would prefer; judge with a reward model trained on other data
when you can.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from instructjax.rlhf.eval_metrics import wilson_interval
from instructjax.rlhf.generate import generate
from instructjax.rlhf.reward_analysis import reward_scores
from instructjax.sampling import SamplingConfig
from instructjax.train.workdir import load_reward_read, load_trained


def judge(policies: Mapping[str, str | Path], reference: str, reward_from: str | Path,
          prompts: Sequence[str], *, mesh, max_new_tokens: int = 64, temperature: float = 1.0,
          seed: int = 0, seq_len: int = 256) -> dict:
    """{'policies': {name: {'win_rate', 'interval', 'wins', 'ties', 'losses', 'mean_reward'}},
    'samples': [{'prompt', name: response, name + '_reward': score, ...}], ...}."""
    if reference not in policies:
        raise ValueError(f"the reference {reference!r} is not one of the policies "
                         f"{sorted(policies)}")
    reward = load_trained(reward_from, mesh, head="scalar", flag="--reward_from")
    read = load_reward_read(reward_from)
    responses, scores = {}, {}
    for name, workdir in policies.items():
        model, params, tokenizer = load_trained(workdir, mesh, flag=f"--policies={name}=")
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id, temperature=temperature)
        responses[name] = [g.text for g in generate(
            params, model, tokenizer, list(prompts), sampling=sampling, mesh=mesh,
            rng=jax.random.key(seed))]
        scores[name] = np.asarray(reward_scores(reward, prompts, responses[name], mesh=mesh,
                                                seq_len=seq_len, read=read))
    n = len(prompts)
    table = {}
    for name in policies:
        same = np.asarray([a == b for a, b in zip(responses[name], responses[reference])])
        wins = int(np.sum((scores[name] > scores[reference]) & ~same))
        ties = int(np.sum(same | (scores[name] == scores[reference])))
        points = wins + 0.5 * ties
        table[name] = {"win_rate": points / n, "interval": wilson_interval(points, n),
                       "wins": wins, "ties": ties, "losses": n - wins - ties,
                       "mean_reward": float(np.mean(scores[name]))}
    samples = [{"prompt": p, **{k: responses[k][i] for k in policies},
                **{f"{k}_reward": float(scores[k][i]) for k in policies}}
               for i, p in enumerate(prompts)]
    return {"reference": reference, "reward_from": str(reward_from), "prompts": n,
            "temperature": temperature, "max_new_tokens": max_new_tokens, "policies": table,
            "samples": samples}


def format_table(result: dict) -> str:
    lines = [f"{'model':12} {'win vs ' + result['reference']:>14} {'95% CI (Wilson)':>17} "
             f"{'mean reward':>12}"]
    for name, row in result["policies"].items():
        if name == result["reference"]:
            rate, interval = f"{row['win_rate']:.3f}", "(reference)"
        else:
            lo, hi = row["interval"]
            rate, interval = f"{row['win_rate']:.3f}", f"[{lo:.3f}, {hi:.3f}]"
        lines.append(f"{name:12} {rate:>14} {interval:>17} {row['mean_reward']:>12.3f}")
    lines.append(f"{result['prompts']} prompts; judged by the reward model {result['reward_from']}"
                 f" (a proxy: see instructjax/rlhf/rm_judge.py); temperature "
                 f"{result['temperature']}, max_new_tokens {result['max_new_tokens']}.")
    return "\n".join(lines)
