"""Supervised training runs: pretraining on a text corpus, SFT on demonstrations, and the
reward model on K-way comparisons.

All three are the same loop and train step; a task picks the data (packed documents,
prompt-masked demonstrations, comparisons), the objective (`lm` or `reward_ranking`), the
head (the reward model swaps the unembedding for a scalar head) and where parameters start.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path

import jax
from absl import logging

from instructjax import parallel
from instructjax.config import ConfigError, RunConfig
from instructjax.data import builders, comparison_packing, pipeline, shards
from instructjax.data.jsonl import DataError, atomic_output, read_jsonl
from instructjax.data.tokenizer import Tokenizer, train_tokenizer
from instructjax.losses import (LMLossConfig, Objective, RankingLossConfig, lm_loss, make_apply,
                                reward_ranking_loss)
from instructjax.model.transformer import Transformer
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train import stage as stage_lib, state as state_lib, step as step_lib
from instructjax.train import workdir as wd


def check_reward_read(cfg: RunConfig) -> None:
    """A reward run resumed with another --rm_read would mix two objectives in one model."""
    if not (Path(cfg.workdir) / wd.REWARD_CONFIG_FILE).exists():
        return
    recorded = wd.load_reward_read(cfg.workdir)
    if recorded != cfg.rm_read:
        raise ConfigError(f"--rm_read={cfg.rm_read}, but {cfg.workdir} was trained with "
                          f"--rm_read={recorded}; use that or a new --workdir")


def dataset_files(cfg: RunConfig) -> builders.Files:
    """{'train': path(s), 'eval': path(s)} for this task, from flags (each split one or more
    files, read in order) or the embedded world."""
    if cfg.data.train_files:
        return {"train": cfg.data.train_files, "eval": cfg.data.eval_files}
    if cfg.task == "reward":
        return builders.comparison_files(cfg.data.data_dir)
    files = builders.world_files(cfg.data)
    prefix = "pretrain" if cfg.task == "pretrain" else "sft"
    return {"train": str(files[f"{prefix}_train"]), "eval": str(files[f"{prefix}_eval"])}


def resolve_tokenizer(cfg: RunConfig, files: builders.Files) -> Tokenizer:
    """--tokenizer_path, else init_from's tokenizer, else this workdir's, else train one."""
    own = Path(cfg.workdir) / wd.TOKENIZER_FILE
    for candidate in (cfg.data.tokenizer_path,
                      cfg.init_from and str(Path(cfg.init_from) / wd.TOKENIZER_FILE)):
        if candidate:
            if not Path(candidate).exists():
                raise FileNotFoundError(f"tokenizer {candidate} does not exist (from "
                                        "--tokenizer_path or --init_from)")
            tokenizer = Tokenizer.load(candidate)
            if Path(candidate).absolute() == own.absolute():
                return tokenizer
            # Pieces, not bytes: a retrained tokenizer's file also records where it was trained.
            if (own.exists() and wd.has_checkpoints(cfg.workdir)
                    and Tokenizer.load(own).pieces() != tokenizer.pieces()):
                raise ConfigError(f"{candidate} is not the tokenizer {cfg.workdir} was trained "
                                  f"with ({own}); use that one or a new --workdir")
            if jax.process_index() == 0:  # atomically: the other processes may be reading it
                with atomic_output(own, "wb") as f:
                    f.write(Path(candidate).read_bytes())
            return tokenizer
    if not own.exists():
        if jax.process_count() > 1:
            raise ConfigError("multi-process runs need a tokenizer made beforehand: pass "
                             "--tokenizer_path or --init_from")
        paths = builders.split_paths(files)["train"]
        texts = (record["text"] for path in paths
                 for _, record in read_jsonl(path, required={"text": str}))
        logging.info("training a %d-token sentencepiece model on %s", cfg.data.vocab_size,
                     ", ".join(map(str, paths)))
        try:
            tokenizer = train_tokenizer(texts, own, vocab_size=cfg.data.vocab_size,
                                        whitespace_runs=cfg.data.whitespace_runs)
        except DataError:  # the text's fault, reported as file:line
            raise
        except ValueError as e:
            raise ConfigError(f"--vocab_size={cfg.data.vocab_size}: {e}") from None
        if tokenizer.vocab_size != cfg.data.vocab_size:
            # The model would sample ids the tokenizer cannot decode.
            own.unlink()
            raise ConfigError(f"--vocab_size={cfg.data.vocab_size}: the training text gave only "
                              f"{tokenizer.vocab_size} tokenizer pieces; rerun with "
                              f"--vocab_size={tokenizer.vocab_size} (or more text)")
        return tokenizer
    return Tokenizer.load(own)


SCALAR_HEAD = "scalar_head"
NORMALISE_BATCHES = 16


def _normalise_reward(state, checkpointer, *, evaluate, sft_outputs, data_iter):
    """Sets the scalar head's bias so the SFT policy's outputs (the responses of the
    training comparisons) score 0 on average, and saves that as the final checkpoint.
    Exact for every read (rl_ops.read_reward): each is affine in the per-token values with
    weights summing to 1, and the bias adds to every value, so it adds to every reward.
    Idempotent: a rerun after a crash recomputes the same bias from the trained params."""
    params = state.params
    head = params[SCALAR_HEAD]
    # The reward is linear in the bias; a few batches are plenty for the mean.
    bias = head["bias"] - evaluate(params, itertools.islice(sft_outputs, NORMALISE_BATCHES)
                                   )["eval/reward_mean"]
    state = state.replace(params={**params, SCALAR_HEAD: {**head, "bias": bias}})
    checkpointer.replace(int(state.step), state, {"data_iter": data_iter.get_state(),
                                                   "reward_normalised": True})
    logging.info("reward normalised: SFT outputs now score mean 0 (bias %s)", jax.device_get(bias))
    return state


def _datasets(cfg: RunConfig, tokenizer: Tokenizer, files: dict[str, str]):
    """(train iterator, eval batches, SFT outputs for the RM's normalisation or None), each
    this process's share of the global batches (see instructjax.data.shards)."""
    kind = {"pretrain": "text", "sft": "sft", "reward": "comparison"}[cfg.task]
    sources = builders.jsonl_data_source(files, kind=kind,
                                         data_dir=Path(cfg.data.data_dir) / "tfds")
    num_shards = shards.resolve(cfg.data.data_shards)
    per_shard = shards.split_rows(cfg.train.batch_size, num_shards, "--batch_size")
    common = dict(seq_len=cfg.train.seq_len, shard_count=num_shards)
    if cfg.task == "reward":
        if cfg.train.pack_rows:
            rows = shards.split_rows(cfg.train.pack_rows, num_shards, "--pack_rows")
            batches = functools.partial(comparison_packing.packed_comparison_batches,
                                        tokenizer=tokenizer, rows=rows, max_prompts=per_shard,
                                        **common)
        else:
            batches = functools.partial(pipeline.comparison_batches, tokenizer=tokenizer,
                                        batch_size=per_shard, **common)
        finite = dict(shuffle=False, num_epochs=1,
                      **({} if cfg.train.pack_rows else {"drop_remainder": False}))
        train_iter = shards.ShardedIterator(
            lambda s: batches(sources["train"], seed=cfg.train.seed, shard_index=s), num_shards)
        eval_batches = shards.eval_batches(
            lambda s: batches(sources["eval"], shard_index=s, **finite), num_shards)
        # SFT outputs for the reward normalisation: the training responses, in order.
        sft_outputs = shards.ShardedIterator(
            lambda s: batches(sources["train"], shard_index=s, **finite), num_shards)
        return train_iter, eval_batches, sft_outputs
    make = pipeline.lm_dataset if cfg.task == "pretrain" else pipeline.sft_dataset
    train_iter = shards.ShardedIterator(
        lambda s: make(sources["train"], tokenizer, batch_size=per_shard, seed=cfg.train.seed,
                       shard_index=s, **common), num_shards)
    eval_batches = shards.eval_batches(
        lambda s: pipeline.eval_batches(sources["eval"], tokenizer, batch_size=per_shard,
                                        kind="lm" if cfg.task == "pretrain" else "sft",
                                        shard_index=s, **common),
        num_shards)
    if cfg.train.eval_batches:
        eval_batches = eval_batches[:cfg.train.eval_batches]
    return train_iter, eval_batches, None


def run_files(cfg: RunConfig) -> dict[str, dict]:
    """The JSON files of the workdir that describe the trained model."""
    files = {wd.MODEL_CONFIG_FILE: dataclasses.asdict(cfg.model)}
    if cfg.task == "reward":
        files[wd.REWARD_CONFIG_FILE] = {"read": cfg.rm_read}
    return files


def train_lm(cfg: RunConfig, argv: list[str] = ()) -> dict[str, float]:
    """Runs (or resumes) pretraining, SFT or reward modelling; returns the final eval metrics."""
    if cfg.init_from:
        wd.require_role(cfg.init_from, "lm", "--init_from")
        wd.check_init_from_model(cfg.model, cfg.init_from)
    mesh = parallel.make_mesh(cfg.mesh)
    stage_lib.check_micro_batch(cfg.train.batch_size, cfg.train.grad_accum_steps, mesh, cfg.mesh)
    if cfg.task == "reward":
        check_reward_read(cfg)
    with wd.open_run(cfg.workdir, cfg, argv, total_steps=cfg.train.steps,
                     allow_config_change=cfg.train.allow_config_change,
                     files=run_files(cfg)) as run:
        data_files = dataset_files(cfg)
        tokenizer = resolve_tokenizer(cfg, data_files)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {cfg.model.vocab_size}; raise --vocab_size")
        return stage_lib.run_stage(run, lm_stage(cfg, mesh, tokenizer, data_files),
                                   loop_cfg=cfg.train, mesh=mesh)


def lm_stage(cfg: RunConfig, mesh, tokenizer: Tokenizer, files) -> stage_lib.Stage:
    """The parts of a pretraining, SFT or reward-model run."""
    reward = cfg.task == "reward"
    model = Transformer(cfg.model, head="scalar" if reward else "lm")
    apply = make_apply(model)
    if reward:
        objective = Objective(reward_ranking_loss, RankingLossConfig(
            center_coef=cfg.rm_center_coef, read=cfg.rm_read))
    else:
        objective = Objective(lm_loss, LMLossConfig())
    schedule = state_lib.make_schedule(cfg.optim, cfg.train.steps)
    tx = state_lib.make_optimizer(cfg.optim, cfg.train.steps)
    abstract, shardings = state_lib.abstract_state(model, tx, mesh, cfg.train.seq_len)
    train_iter, eval_batches, sft_outputs = _datasets(cfg, tokenizer, files)

    def fresh_state(init_key):
        state, _ = state_lib.init_state(model, tx, mesh, cfg.train.seq_len, init_key)
        if cfg.init_from:
            # A reward model starts from the LM's trunk; its scalar head starts fresh.
            wanted = {k: v for k, v in abstract.params.items() if k != SCALAR_HEAD}
            params = ckpt_lib.restore_params(cfg.init_from, wanted)
            state = state.replace(params={**state.params, **params})
            logging.info("initialised params from %s", cfg.init_from)
        return state

    evaluate = stage_lib.evaluator(
        step_lib.make_eval_step(objective, apply=apply, mesh=mesh,
                                params_shardings=shardings.params), eval_batches, mesh)
    return stage_lib.Stage(
        abstract_state=abstract, fresh_state=fresh_state, data_iter=train_iter,
        train_step=step_lib.make_train_step(objective, apply=apply, tx=tx, schedule=schedule,
                                            mesh=mesh, state_shardings=shardings,
                                            grad_accum_steps=cfg.train.grad_accum_steps),
        evaluate=evaluate, flops_per_token=cfg.model.flops_per_token(cfg.train.seq_len),
        finish=(functools.partial(_normalise_reward, evaluate=evaluate, sft_outputs=sft_outputs,
                                  data_iter=train_iter) if reward else None))
