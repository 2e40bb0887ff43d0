"""The RL run's host-side inputs: prompt batches (left-padded, each row's line in its file)
and, for the pretraining mix, packed LM batches, read through tfds sources and grain with
each process reading its own shard; checkpointable iterator state for exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import numpy as np

from instructjax.config import ConfigError
from instructjax.data import builders, pipeline, shards
from instructjax.data.jsonl import DataError
from instructjax.data.tokenizer import Tokenizer

class EncodePrompt:
    """{'prompt'} -> left-padded prompt_tokens [P] int32 and prompt_mask [P] int32.

    Prompts longer than P keep their LAST P tokens (the end of a prompt is what the response
    continues); `prompt_truncated` marks them. `prompt_line` is the record's line in its
    JSONL file (from the tfds source's "origin" field; -1 when unknown), so the host can
    find the task behind each rollout row (ppo_run's gold score). Loads the tokenizer lazily
    from its path, so instances pickle to grain worker processes."""

    def __init__(self, tokenizer_path, max_prompt_len: int):
        self.tokenizer_path, self.max_prompt_len = str(tokenizer_path), max_prompt_len
        self._tokenizer = None

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "max_prompt_len": self.max_prompt_len,
                "_tokenizer": None}

    def __call__(self, record):
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        ids = self._tokenizer.encode(record["prompt"])
        if not ids:
            raise DataError(f"{record.get('origin', '<input>')}: empty prompt; the policy needs "
                            "at least one prompt token to condition on")
        P = self.max_prompt_len
        kept = ids[-P:]
        tokens = np.full(P, self._tokenizer.pad_id, np.int32)
        mask = np.zeros(P, np.int32)
        tokens[P - len(kept):], mask[P - len(kept):] = kept, 1
        line = str(record.get("origin", "")).rsplit(":", 1)[-1]
        return {"prompt_tokens": tokens, "prompt_mask": mask,
                "prompt_truncated": np.int32(len(ids) > P),
                "prompt_line": np.int32(int(line) if line.isdigit() else -1)}


def prompt_dataset(source, tokenizer: Tokenizer, *, max_prompt_len: int, batch_size: int,
                   seed: int, shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """Endless, seeded-shuffled batches of left-padded prompts (keys prompt_tokens,
    prompt_mask, prompt_truncated; [batch_size, P]). `source`: any random-access sequence of
    {'prompt': str} records (a tfds source from builders.jsonl_data_source kind 'prompt', or
    a list). Checkpointable through the iterator's get_state/set_state."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"{source!r}: shard {shard_index} of {shard_count} has no prompts")
    ds = ds.shuffle(seed=seed).repeat(None).map(EncodePrompt(tokenizer.path, max_prompt_len))
    return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


class PPOInputs:
    """One PPO iteration's host batch: the prompts and, for PPO-ptx, the pretraining rows of
    all its updates, as ONE flat dict of numpy arrays (parallel.global_batch shards the
    leading dim of every entry):

      prompt_tokens, prompt_mask    [B, P]
      prompt_line                   [B] line of each prompt in `prompt_file` (-1 unknown)
      ptx_<key>                     [U * ptx_batch, T_ptx] for each lm_dataset key (inputs,
                                    targets, positions, segment_ids, loss_mask); update u
                                    uses rows u::U (see ppo.split_ptx)

    get_state/set_state combine both iterators' (JSON) states, so a resumed run reads the
    same data as an uninterrupted one."""

    def __init__(self, prompts, ptx=None, prompt_file: str | None = None):
        self.prompts, self.ptx, self.prompt_file = prompts, ptx, prompt_file

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = {k: v for k, v in next(self.prompts).items() if k != "prompt_truncated"}
        if self.ptx is not None:
            batch.update({f"ptx_{k}": v for k, v in next(self.ptx).items()})
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"prompts": self.prompts.get_state(),
                "ptx": None if self.ptx is None else self.ptx.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None:
            if state.get("ptx") is None:
                raise ValueError("the checkpoint has no pretraining-data position: it was "
                                 "written by a run without ptx (--gamma_ptx=0)")
            self.ptx.set_state(state["ptx"])


def _input_files(cfg) -> tuple[str, str]:
    """(prompt JSONL, pretraining JSONL): the flags, else the embedded world's files."""
    prompt_file, ptx_file = cfg.prompt_file, cfg.ptx_file
    if not prompt_file or (cfg.use_ptx and not ptx_file):
        if cfg.data is None:
            raise ConfigError("the embedded world's prompts and pretraining text need "
                              "--data_dir (or pass --prompt_file / --ptx_file)")
        files = builders.world_files(cfg.data)
        prompt_file = prompt_file or str(files["prompts_train"])
        ptx_file = ptx_file or str(files["pretrain_train"])
    return prompt_file, ptx_file


def make_inputs(cfg, tokenizer: Tokenizer) -> PPOInputs:
    """This host's PPOInputs for a ppo.PPOConfig: the prompt file (and the pretraining file
    for PPO-ptx) through tfds sources and grain, each host reading its own shard."""
    prompt_file, ptx_file = _input_files(cfg)
    tfds_dir = Path(cfg.data.data_dir) / "tfds"
    num_shards = shards.resolve(cfg.data.data_shards)
    prompts = builders.jsonl_data_source({"train": prompt_file}, kind="prompt",
                                         data_dir=tfds_dir)["train"]
    per_shard = shards.split_rows(cfg.prompts_per_iteration, num_shards,
                                  "--rollout_batch_size / --group_size")
    prompt_iter = shards.ShardedIterator(
        lambda s: prompt_dataset(prompts, tokenizer, max_prompt_len=cfg.max_prompt_len,
                                 batch_size=per_shard, seed=cfg.seed, shard_index=s,
                                 shard_count=num_shards), num_shards)
    ptx_iter = None
    if cfg.use_ptx:
        texts = builders.jsonl_data_source({"train": ptx_file}, kind="text",
                                           data_dir=tfds_dir)["train"]
        rows = shards.split_rows(cfg.num_updates * cfg.ptx_batch_size, num_shards,
                                 "the pretraining rows per iteration (ppo_epochs * "
                                 "num_minibatches * --ptx_batch_size)")
        ptx_iter = shards.ShardedIterator(
            lambda s: pipeline.lm_dataset(texts, tokenizer, seq_len=cfg.ptx_seq_len,
                                          batch_size=rows, seed=cfg.seed + 1, shard_index=s,
                                          shard_count=num_shards), num_shards)
    return PPOInputs(prompt_iter, ptx_iter, prompt_file=prompt_file)

