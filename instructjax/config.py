"""Frozen run configuration, validated on construction.

Experiments build these from flags in one place (experiments/common.py); the library only
ever sees these objects. Every run writes its resolved config to its workdir.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from instructjax.model.config import ModelConfig

SCHEDULES = ("cosine", "linear", "constant")
# How the reward model's per-token values give a response's reward (rl_ops.read_reward).
REWARD_READS = ("eos", "pooled")


class ConfigError(ValueError):
    """A bad flag or setting; the message names it and says what is allowed."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup, then cosine/linear decay to final_lr_fraction * peak."""
    learning_rate: float
    warmup_steps: int = 0
    schedule: str = "cosine"
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0

    def __post_init__(self):
        _require(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.schedule in SCHEDULES, f"--lr_schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(0 <= self.final_lr_fraction <= 1, "--final_lr_fraction must be in [0, 1]")
        _require(self.weight_decay >= 0, "--weight_decay must be >= 0")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "--adam_b1/--adam_b2 must be in [0, 1)")
        _require(self.grad_clip_norm >= 0, "--grad_clip_norm must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: how many steps, how big, how often to log/evaluate/checkpoint."""
    steps: int
    batch_size: int  # global sequences per optimiser step
    seq_len: int
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8  # 0 = the whole eval split
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    peak_flops_per_device: float = 0.0  # for MFU; 0 = look the device kind up
    # Reward task: 0 = the padded [batch_size, 9, seq_len] layout; > 0 = pack the responses
    # of up to batch_size prompts into pack_rows rows of seq_len (far less padding).
    pack_rows: int = 0
    # Resuming with other optimiser/loop settings than the run record's (workdir.open_run).
    allow_config_change: bool = False

    def __post_init__(self):
        _require(self.steps > 0, f"--steps must be > 0, got {self.steps}")
        _require(self.batch_size > 0, f"--batch_size must be > 0, got {self.batch_size}")
        _require(self.seq_len > 1, f"--seq_len must be > 1, got {self.seq_len}")
        _require(self.grad_accum_steps > 0 and self.batch_size % self.grad_accum_steps == 0,
                 f"--batch_size ({self.batch_size}) must be a positive multiple of "
                 f"--grad_accum_steps ({self.grad_accum_steps})")
        for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"--{name} must be > 0")
        _require(self.eval_batches >= 0, "--eval_batches must be >= 0")
        _require(self.pack_rows >= 0, "--pack_rows must be >= 0")
        _require(not (self.pack_rows and self.grad_accum_steps > 1),
                 "--pack_rows does not combine with --grad_accum_steps > 1 (a packed batch "
                 "cannot be split by rows); lower --batch_size and --pack_rows instead")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the data comes from. Empty file lists mean the embedded world."""
    data_dir: str
    world_seed: int = 0
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    tokenizer_path: str = ""  # empty: train one on the corpus (pretrain) or take init_from's
    vocab_size: int = 2048
    whitespace_runs: bool = True
    world_pretrain_docs: int = 4000
    world_sft_train: int = 4000
    world_eval: int = 600
    world_prompts: int = 2000
    data_shards: int = 0  # 0: one per process (instructjax.data.shards)

    def __post_init__(self):
        _require(bool(self.data_dir), "--data_dir must be set")
        _require(bool(self.train_files) == bool(self.eval_files),
                 "--train_files and --eval_files go together (both empty = the embedded world)")
        _require(self.vocab_size >= 260, f"--vocab_size must be >= 260 (bytes + specials), got {self.vocab_size}")
        _require(self.data_shards >= 0, "--data_shards must be >= 0 (0 = one per process)")


TASKS = ("pretrain", "sft", "reward")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    task: str
    workdir: str
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig
    mesh: str = "data:1,fsdp:-1,tensor:1"
    init_from: str = ""  # workdir of an earlier stage whose final params start this run
    rm_center_coef: float = 0.0  # reward task: losses.RankingLossConfig.center_coef
    rm_read: str = "eos"  # reward task: losses.RankingLossConfig.read (REWARD_READS)

    def __post_init__(self):
        _require(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        _require(bool(self.workdir), "--workdir must be set")
        _require(self.rm_read in REWARD_READS,
                 f"--rm_read must be one of {REWARD_READS}, got {self.rm_read!r}")
        _require(self.train.seq_len <= self.model.max_len,
                 f"--seq_len ({self.train.seq_len}) exceeds the model's max_len ({self.model.max_len})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**d)
