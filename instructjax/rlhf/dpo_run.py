"""A DPO stage: the SFT policy trained directly on preference pairs (Rafailov et al. 2023),
on the same comparison data as the reward model.

The objective is `losses.dpo_loss` and the step is `step.make_train_step`, both unchanged:
DPO needs only the frozen reference's sequence log-probs in the batch, which a separate
jitted function adds to each batch before the step (one extra forward pass, no
gradient). The workdir is a finished LM run: `load_trained(workdir, mesh)` gives the DPO
policy, so later evaluation samples from it like from any other stage.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

from instructjax import parallel
from instructjax.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from instructjax.data import builders, pairs as pairs_lib, shards
from instructjax.data.tokenizer import Tokenizer
from instructjax.losses import (DPOLossConfig, Objective, dpo_loss, dpo_sequence_logps,
                                make_apply)
from instructjax.model.transformer import Transformer
from instructjax.train import checkpoint as ckpt_lib, stage as stage_lib, state as state_lib
from instructjax.train import step as step_lib, workdir as wd
from instructjax.train.metrics import MetricSums, MetricsWriter


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """A DPO run. The model (and tokenizer) come from `init_from`, the SFT workdir, which is
    both the starting policy and the frozen reference. `train.batch_size` counts PAIRS (each
    pair is two sequences). epochs > 0 sets the step count to floor(epochs * training pairs
    / batch_size), replacing train.steps."""
    workdir: str
    init_from: str
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    mesh: str = "data:1,fsdp:-1,tensor:1"
    beta: float = 0.1
    label_smoothing: float = 0.0
    pairs: str = "all"  # see instructjax.data.pairs
    epochs: float = 0.0
    compute_dtype: str = ""  # '' = the SFT model's own
    remat: bool = False

    def __post_init__(self):
        def require(ok, message):
            if not ok:
                raise ConfigError(message)
        require(bool(self.workdir), "--workdir must be set")
        require(bool(self.init_from), "--init_from (the SFT workdir: policy and reference) "
                "must be set")
        require(self.pairs in pairs_lib.PAIR_MODES,
                f"--dpo_pairs must be one of {pairs_lib.PAIR_MODES}, got {self.pairs!r}")
        require(self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}")
        try:
            self.loss_config()
        except ValueError as e:
            raise ConfigError(f"--dpo_beta/--dpo_label_smoothing: {e}") from None

    def loss_config(self) -> DPOLossConfig:
        return DPOLossConfig(beta=self.beta, label_smoothing=self.label_smoothing)


def comparison_files(cfg: DPOConfig) -> dict:
    """--train_files/--eval_files (one or more files each), else the comparisons stage's
    files in --data_dir."""
    if cfg.data.train_files:
        return {"train": cfg.data.train_files, "eval": cfg.data.eval_files}
    return builders.comparison_files(cfg.data.data_dir)


def make_add_reference(apply, mesh, params_shardings):
    """(ref_params, batch) -> batch + ref_chosen_logp_B / ref_rejected_logp_B, jitted. The
    reference runs deterministic and in float32 log-probs, like the policy in dpo_loss."""
    def add(ref_params, batch):
        ref_c_B, ref_r_B = dpo_sequence_logps(ref_params, batch, None, apply=apply)
        return dict(batch, ref_chosen_logp_B=ref_c_B, ref_rejected_logp_B=ref_r_B)

    batch_sh = parallel.batch_sharding(mesh)
    return parallel.ShardedJit(add, mesh, in_shardings=(params_shardings, batch_sh),
                               out_shardings=batch_sh)


def make_row_masked_eval(objective: Objective, *, apply, mesh, params_shardings):
    """params, batch -> metric pairs summed over the rows with valid_B == 1 only.

    dpo_loss weighs every row of a batch; the padding rows of the last eval batch must not
    count, so the objective runs per row (vmap over [B, 1, ...] slices) and each row's
    (sum, weight) pairs are masked before summing. Exact, whatever the objective."""
    def step(params, batch):
        valid_B = batch["valid_B"].astype(jnp.float32)
        rows = {k: v[:, None] for k, v in batch.items() if k != "valid_B"}
        _, metrics = jax.vmap(lambda row: objective(params, row, None, apply=apply))(rows)
        return {k: (jnp.sum(s * valid_B), jnp.sum(w * valid_B)) for k, (s, w) in metrics.items()}

    return parallel.ShardedJit(step, mesh,
                               in_shardings=(params_shardings, parallel.batch_sharding(mesh)),
                               out_shardings=parallel.replicated(mesh))


class DPOMetricsWriter(MetricsWriter):
    """The standard writer, plus a second progress line with the preference quantities."""

    DPO_KEYS = ("train/accuracy", "train/reward_margin", "eval/accuracy", "eval/reward_margin")

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        super().progress(step, metrics)
        shown = "  ".join(f"{k}={metrics[k]:.4g}" for k in self.DPO_KEYS if k in metrics)
        if self.enabled and shown:
            logging.info("    %s", shown)


def train_dpo(cfg: DPOConfig, argv: list[str] = ()) -> dict[str, float]:
    """Runs (or resumes) DPO; returns the final held-out metrics (also in final_eval.json)."""
    from instructjax.rlhf.ppo import rl_model_config
    mesh = parallel.make_mesh(cfg.mesh)
    stage_lib.check_micro_batch(cfg.train.batch_size, cfg.train.grad_accum_steps, mesh, cfg.mesh)
    # Dropout off: the policy's log-probs are compared with the deterministic reference's.
    wd.require_role(cfg.init_from, "lm", "--init_from")
    model_cfg = rl_model_config(wd.load_model_config(cfg.init_from),
                                compute_dtype=cfg.compute_dtype, remat=cfg.remat)
    if cfg.train.seq_len > model_cfg.max_len:
        raise ConfigError(f"--seq_len ({cfg.train.seq_len}) exceeds the max_len "
                          f"{model_cfg.max_len} of the --init_from model")
    files = comparison_files(cfg)
    tokenizer = Tokenizer.load(wd.tokenizer_of(cfg.init_from, "--init_from"))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                          f"--init_from model's vocab_size is {model_cfg.vocab_size}")

    sources = builders.jsonl_data_source(files, kind="comparison",
                                         data_dir=Path(cfg.data.data_dir) / "tfds")
    train_pairs = pairs_lib.PairSource(sources["train"], cfg.pairs)
    eval_pairs = pairs_lib.PairSource(sources["eval"], cfg.pairs)
    train_cfg = cfg.train
    if cfg.epochs:
        steps = math.floor(cfg.epochs * len(train_pairs) / train_cfg.batch_size)
        if steps < 1:
            raise ConfigError(f"--epochs={cfg.epochs} of {len(train_pairs)} pairs is less than "
                              f"one batch of {train_cfg.batch_size}")
        train_cfg = dataclasses.replace(train_cfg, steps=steps)
    logging.info("DPO on %s (train) and %s (eval): %d steps of %d pairs", train_pairs,
                 eval_pairs, train_cfg.steps, train_cfg.batch_size)
    with wd.open_run(cfg.workdir, cfg, argv, total_steps=train_cfg.steps,
                     allow_config_change=cfg.train.allow_config_change,
                     files={wd.MODEL_CONFIG_FILE: dataclasses.asdict(model_cfg)}) as run:
        wd.copy_tokenizer(cfg.init_from, cfg.workdir, "--init_from")
        stage = dpo_stage(cfg, mesh, tokenizer, model_cfg, train_cfg, train_pairs, eval_pairs)
        return stage_lib.run_stage(run, stage, loop_cfg=train_cfg, mesh=mesh)


def dpo_stage(cfg: DPOConfig, mesh, tokenizer: Tokenizer, model_cfg, train_cfg, train_pairs,
              eval_pairs) -> stage_lib.Stage:
    """The parts of a DPO run: the policy's train step with the frozen reference's
    log-probs added to each batch, and the row-masked evaluation on the held-out pairs."""
    num_shards = shards.resolve(cfg.data.data_shards)
    common = dict(seq_len=train_cfg.seq_len, shard_count=num_shards,
                  batch_size=shards.split_rows(train_cfg.batch_size, num_shards, "--batch_size"))
    train_iter = shards.ShardedIterator(
        lambda s: pairs_lib.pair_batches(train_pairs, tokenizer, seed=train_cfg.seed,
                                         shard_index=s, **common), num_shards)
    local_eval = shards.eval_batches(
        lambda s: pairs_lib.pair_batches(eval_pairs, tokenizer, shuffle=False, num_epochs=1,
                                         drop_remainder=False, shard_index=s, **common),
        num_shards)
    if train_cfg.eval_batches:
        local_eval = local_eval[:train_cfg.eval_batches]

    model = Transformer(model_cfg)
    apply = make_apply(model)
    objective = Objective(dpo_loss, cfg.loss_config())
    schedule = state_lib.make_schedule(cfg.optim, train_cfg.steps)
    tx = state_lib.make_optimizer(cfg.optim, train_cfg.steps)
    abstract, shardings = state_lib.abstract_state(model, tx, mesh, train_cfg.seq_len)
    # Its own restore: the donated train state never aliases the frozen reference.
    reference = ckpt_lib.restore_params(cfg.init_from, abstract.params)
    add_reference = make_add_reference(apply, mesh, shardings.params)

    def fresh_state(init_key):
        state, _ = state_lib.init_state(model, tx, mesh, train_cfg.seq_len, init_key)
        logging.info("starting DPO from %s (also the reference)", cfg.init_from)
        return state.replace(params=ckpt_lib.restore_params(cfg.init_from, abstract.params))

    dpo_step = step_lib.make_train_step(objective, apply=apply, tx=tx, schedule=schedule,
                                        mesh=mesh, state_shardings=shardings,
                                        grad_accum_steps=train_cfg.grad_accum_steps)

    def train_step(state, batch, base_rng):
        return dpo_step(state, add_reference(reference, batch), base_rng)

    eval_step = make_row_masked_eval(objective, apply=apply, mesh=mesh,
                                     params_shardings=shardings.params)
    # The reference's log-probs of the eval pairs never change: computed once.
    eval_batches = [add_reference(reference, parallel.global_batch(b, mesh)) for b in local_eval]
    last_eval = {}

    def evaluate(params) -> dict[str, float]:
        if last_eval.get("params") is not params:  # the loop's final eval: not run twice
            sums = MetricSums()
            for batch in eval_batches:
                sums.add(eval_step(params, batch))
            last_eval.update(params=params, metrics={**sums.means(prefix="eval/"),
                                                     "eval/pairs": sums.weight("loss")})
        return last_eval["metrics"]

    def final_metrics(state):
        return {**evaluate(state.params), "train_pairs": len(train_pairs), "pairs": cfg.pairs,
                "beta": cfg.beta}

    return stage_lib.Stage(
        abstract_state=abstract, fresh_state=fresh_state, data_iter=train_iter,
        train_step=train_step, evaluate=evaluate, writer=DPOMetricsWriter,
        # Two sequences per pair (the reference's forward pass is not counted).
        flops_per_token=2 * model_cfg.flops_per_token(train_cfg.seq_len),
        final_metrics=final_metrics)
