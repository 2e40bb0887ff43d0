"""Comparison data for the reward model: K responses per prompt sampled from the SFT policy,
ranked by simulated labelers (InstructGPT section 3.5).

Training comparisons are ranked by the training labelers; held-out comparisons by a
disjoint pool of held-out labelers, whose agreement with each other on the same response
sets is the ceiling for the reward model's held-out accuracy.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import jax

from instructjax.data import comparisons as comparisons_lib
from instructjax.data.jsonl import DataError, read_jsonl, write_json_atomic
from instructjax.data.world import labelers as labelers_lib
from instructjax.rlhf.generate import generate
from instructjax.sampling import SamplingConfig
from instructjax.train.workdir import load_trained


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComparisonConfig:
    k_min: int = 4
    k_max: int = 9
    temperature: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0
    labeler_agreement: float = 0.73  # target of the noise calibration

    def __post_init__(self):
        if not comparisons_lib.K_MIN <= self.k_min <= self.k_max <= comparisons_lib.K_MAX:
            raise ValueError(f"need {comparisons_lib.K_MIN} <= k_min <= k_max <= "
                             f"{comparisons_lib.K_MAX}, got {self.k_min}, {self.k_max}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 to sample distinct responses, got "
                             f"{self.temperature}")


def _tasks(prompt_file: str | Path, limit: int) -> list[dict]:
    """The embedded world's tasks: the simulated labelers judge a response by its task's
    kind and answer, which a user's own prompt file does not have."""
    try:
        tasks = [record for _, record in read_jsonl(
            prompt_file, required={"prompt": str, "kind": str, "answer": str})]
    except DataError as e:
        raise DataError(f"{e}. The simulated labelers rank responses to the embedded world's "
                        "tasks only; for your own prompts, sample responses with "
                        "experiments.sample and rank them yourselves ({\"prompt\", "
                        "\"responses\", \"ranking\"} lines, ranking best first)") from None
    return tasks[:limit] if limit else tasks


def sample_response_sets(policy, tasks: list[dict], *, cfg: ComparisonConfig, mesh,
                         rng: jax.Array) -> list[list[str]]:
    """K in [k_min, k_max] (drawn per prompt) sampled responses for each task from
    `policy` = (model, params, tokenizer)."""
    model, params, tokenizer = policy
    draw = random.Random(f"k-{cfg.seed}")
    sizes = [draw.randint(cfg.k_min, cfg.k_max) for _ in tasks]
    prompts = [t["prompt"] for t, k in zip(tasks, sizes) for _ in range(k)]
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    texts = [g.text for g in generate(params, model, tokenizer, prompts, sampling=sampling,
                                      mesh=mesh, rng=rng, batch_size=64)]
    sets, start = [], 0
    for k in sizes:
        sets.append(texts[start:start + k])
        start += k
    return sets


def make_comparisons(policy_dir, prompt_files: dict[str, str | Path], out_dir: str | Path, *,
                     num_prompts: dict[str, int], cfg: ComparisonConfig, mesh) -> dict:
    """Writes comparisons_{train,eval}.jsonl and comparisons_stats.json into out_dir.

    prompt_files/num_prompts: {'train': ..., 'eval': ...}; 0 prompts = all of the file.
    """
    out_dir = Path(out_dir)
    key = jax.random.key(cfg.seed)
    stats: dict = {"config": dataclasses.asdict(cfg), "policy": str(policy_dir)}
    tasks = {split: _tasks(prompt_files[split], num_prompts[split]) for split in prompt_files}
    policy = load_trained(policy_dir, mesh, flag="--policy_from")
    samples = {}
    for i, split in enumerate(("train", "eval")):
        samples[split] = tasks[split], sample_response_sets(
            policy, tasks[split], cfg=cfg, mesh=mesh, rng=jax.random.fold_in(key, i))
    # How often labelers agree depends on the responses they compare: the noise is set on
    # these samples so that two training labelers agree on ~73% of pairs (InstructGPT).
    scale, _ = labelers_lib.calibrate_noise(*samples["train"], target=cfg.labeler_agreement,
                                            seed=cfg.seed)
    stats["labeler_noise_scale"] = scale
    for i, split in enumerate(("train", "eval")):
        tasks, sets = samples[split]
        pool = (labelers_lib.training_labelers(seed=cfg.seed, noise_scale=scale) if split == "train"
                else labelers_lib.heldout_labelers(seed=cfg.seed, noise_scale=scale))
        records = labelers_lib.label_comparisons(tasks, sets, pool, seed=cfg.seed + i)
        comparisons_lib.write_comparisons(out_dir / f"comparisons_{split}.jsonl", records)
        stats[split] = {
            "prompts": len(tasks), "responses": sum(len(s) for s in sets),
            "distinct_response_fraction": sum(len(set(s)) for s in sets) / max(1, sum(map(len, sets))),
            # The ceiling for a reward model judged by this pool: how often two of its
            # labelers order a pair of these responses the same way.
            "labeler_agreement": labelers_lib.mean_pool_agreement(pool, tasks, sets),
        }
    write_json_atomic(out_dir / "comparisons_stats.json", stats)
    return stats
