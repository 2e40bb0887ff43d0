"""The skeleton every training stage runs in (pretraining, SFT, reward model, DPO, RL).

A stage builds its parts (a `Stage`: abstract state, how to start fresh, the data, the
jitted step, an optional evaluation) inside `workdir.open_run`, and `run_stage` does the
rest the same way for all of them: checkpoints, resume-or-init, the generic loop, the final
evaluation, and closing the writer and checkpointer whatever happens. A stage differs only
in what it builds, so none of this is written twice.

    with wd.open_run(cfg.workdir, cfg, argv, total_steps=..., files=...) as run:
        stage = Stage(abstract_state=..., fresh_state=..., data_iter=..., train_step=...)
        return run_stage(run, stage, loop_cfg=cfg.train, mesh=mesh)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from instructjax import parallel
from instructjax.config import ConfigError, TrainConfig
from instructjax.train import checkpoint as ckpt_lib, loop
from instructjax.train.metrics import MetricSums, MetricsWriter
from instructjax.train.workdir import Run


def check_micro_batch(batch_size: int, grad_accum_steps: int, mesh: Mesh, mesh_flag: str) -> None:
    """Every data-parallel device must get whole rows of each micro-batch."""
    dp = parallel.data_parallel_size(mesh)
    if (batch_size // grad_accum_steps) % dp:
        raise ConfigError(f"the micro-batch ({batch_size} / {grad_accum_steps} accumulation "
                          f"steps) must be divisible by the data-parallel size {dp} of "
                          f"--mesh={mesh_flag}")


def evaluator(eval_step: Callable, batches, mesh: Mesh | None) -> Callable[..., dict[str, float]]:
    """params -> {'eval/<metric>': exact mean over `batches`} ((sum, weight) pairs of the
    objective, losses.py contract). mesh=None: the batches are already global arrays."""
    def evaluate(params, batches=batches) -> dict[str, float]:
        sums = MetricSums()
        for batch in batches:
            sums.add(eval_step(params, batch if mesh is None else
                               parallel.global_batch(batch, mesh)))
        return sums.means(prefix="eval/")
    return evaluate


@dataclasses.dataclass
class Stage:
    """What a training stage is made of; `run_stage` runs it.

    fresh_state(init_key) builds the state of a run without checkpoints; train_step(state,
    global batch, base_rng) -> (state, metrics) is called once per loop step with batches
    from data_iter (which must be checkpointable: get_state / set_state). evaluate(params)
    runs every eval_every steps and at the end. finish(state, checkpointer) -> state runs
    once after the last step (the reward model's normalisation); final_metrics(state) is
    what final_eval.json records (default: evaluate at the final params)."""
    abstract_state: Any
    fresh_state: Callable[[jax.Array], Any]
    data_iter: Any
    train_step: Callable
    evaluate: Callable[[Any], dict[str, float]] | None = None
    flops_per_token: float = 0.0
    writer: type[MetricsWriter] = MetricsWriter
    finish: Callable[[Any, ckpt_lib.Checkpointer], Any] | None = None
    final_metrics: Callable[[Any], dict[str, Any]] | None = None


def run_stage(run: Run, stage: Stage, *, loop_cfg: TrainConfig, mesh: Mesh) -> dict[str, Any]:
    """Resumes (or starts) `stage` in `run`'s workdir, trains to loop_cfg.steps, records
    the final metrics (final_eval.json: the stage is done) and returns them.

    Random streams: the fresh state gets fold_in(seed key, 1) and the steps fold_in(seed
    key, 2), folded with the step inside the step, so a resumed run is bit-identical."""
    seed_key = jax.random.key(loop_cfg.seed)
    checkpointer = ckpt_lib.Checkpointer(run.workdir / "checkpoints",
                                         keep=loop_cfg.keep_checkpoints)
    writer = stage.writer(run.workdir, total_steps=loop_cfg.steps)
    try:
        state = loop.resume_or_init(checkpointer, stage.abstract_state,
                                    lambda: stage.fresh_state(jax.random.fold_in(seed_key, 1)),
                                    stage.data_iter)
        state = loop.train_loop(
            state, cfg=loop_cfg, train_step=stage.train_step,
            base_rng=jax.random.fold_in(seed_key, 2), data_iter=stage.data_iter, mesh=mesh,
            checkpointer=checkpointer, writer=writer, evaluate=stage.evaluate,
            flops_per_token=stage.flops_per_token)
        if stage.finish is not None:
            state = stage.finish(state, checkpointer)
        if stage.final_metrics is not None:
            final = stage.final_metrics(state)
        else:
            final = stage.evaluate(state.params) if stage.evaluate is not None else {}
    finally:
        writer.close()
        checkpointer.close()
    run.finish(int(state.step), final)
    return final
