"""The generic training loop: data -> jitted step -> metrics -> eval -> checkpoints.

Resumes from the workdir's latest checkpoint (state, data-iterator position; the RNG is
`fold_in(seed_key, step)` inside the step, so a resumed run is bit-identical to an
uninterrupted one). SIGTERM or SIGINT (or, across hosts, JAX's preemption notice) saves at
the next step boundary and raises workdir.RunStopped, so a stopped run never looks finished;
a second SIGINT stops at once. A non-finite loss stops the run before anything is saved, so
the last good checkpoint stays intact.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh

from instructjax import parallel
from instructjax.config import TrainConfig
from instructjax.losses import reduce_metrics
from instructjax.train.checkpoint import Checkpointer
from instructjax.train.metrics import MetricSums, MetricsWriter, peak_flops_per_device
from instructjax.train.workdir import RunStopped


class NonFiniteLossError(RuntimeError):
    pass


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag checked at step boundaries (single-process runs);
    the signal's own behaviour comes back after the first, so a second Ctrl-C interrupts.

    Multi-process runs use JAX's preemption sync point instead, which makes every
    process stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}
        if jax.process_count() == 1:
            try:
                self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            except ValueError:  # not the main thread: leave signals alone
                self._previous = {}

    def _handle(self, signum, frame):
        logging.warning("%s received: saving a checkpoint at the end of this step (again to "
                        "stop at once)", signal.Signals(signum).name)
        self.requested = True
        self.restore()

    def check(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                self.requested |= multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service in this runtime
                pass
        return self.requested

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def resume_or_init(checkpointer: Checkpointer, abstract_state: Any, init: Callable[[], Any],
                   data_iter) -> Any:
    """Latest checkpoint (and data position) if there is one, else a fresh state."""
    restored = checkpointer.restore(abstract_state)
    if restored is None:
        return init()
    state, meta = restored
    data_iter.set_state(meta["data_iter"])
    logging.info("resumed from %s at step %d", checkpointer.directory, int(state.step))
    return state


def train_loop(state, *, cfg: TrainConfig, train_step: Callable, base_rng: jax.Array,
               data_iter: Iterator, mesh: Mesh, checkpointer: Checkpointer,
               writer: MetricsWriter, evaluate: Callable[[Any], dict[str, float]] | None = None,
               flops_per_token: float = 0.0) -> Any:
    step = int(state.step)
    stop = _StopRequest()
    peak = peak_flops_per_device(cfg.peak_flops_per_device) * jax.device_count()
    window = MetricSums()
    window_start, window_steps = time.time(), 0
    pending = None  # (step, metrics on device) of the last step, fetched one step late

    def settle():
        """Fetches the pending step's metrics and stops on a non-finite loss. Called after
        the next step is dispatched, so the host never waits for an idle device; at most
        two steps are in flight (CPU collectives deadlock with unbounded queues), and
        before every log line and save, so nothing is saved after a non-finite loss."""
        nonlocal pending, window_steps
        if pending is None:
            return
        (at, metrics), pending = pending, None
        metrics = jax.device_get(metrics)
        loss = reduce_metrics({"loss": metrics["loss"]})["loss"]
        if not math.isfinite(loss):
            last = checkpointer.latest_step()
            kept = ("no checkpoint had been saved yet" if last is None else
                    f"the last good checkpoint (step {last}) in {checkpointer.directory} "
                    "is intact")
            raise NonFiniteLossError(
                f"step {at}: training loss is {loss}. Stopped without saving; {kept}. Try "
                "a lower --learning_rate, more --warmup_steps or --grad_clip_norm.")
        window.add(metrics)
        window_steps += 1

    try:
        while step < cfg.steps:
            try:
                local = next(data_iter)
            except StopIteration:
                raise RuntimeError(f"the training data ran out at step {step}; use more data "
                                   "or fewer --steps (the pipeline repeats unless num_epochs is set)")
            state, metrics = train_step(state, parallel.global_batch(local, mesh), base_rng)
            step += 1
            settle()  # the previous step's, while this one runs
            pending = (step, metrics)
            stopping = stop.check(step)
            is_checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping
            if is_checkpoint or step % cfg.log_every == 0:
                settle()

            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = max(time.time() - window_start, 1e-9)
                out = window.means(prefix="train/")
                tokens = window.total("tokens")
                out["train/tokens_per_sec"] = tokens / elapsed
                out["train/steps_per_sec"] = window_steps / elapsed
                if flops_per_token:
                    achieved = flops_per_token * cfg.batch_size * cfg.seq_len * window_steps / elapsed
                    out["train/tflops_per_sec"] = achieved / 1e12
                    if peak:
                        out["train/mfu"] = achieved / peak
                writer.write(step, out)
                writer.progress(step, out)
                window, window_start, window_steps = MetricSums(), time.time(), 0

            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                eval_metrics = evaluate(state.params)
                writer.write(step, eval_metrics)
                writer.progress(step, eval_metrics)
                window_start = time.time()  # do not count eval time as training time

            if is_checkpoint:
                checkpointer.save(step, state, {"data_iter": data_iter.get_state()})
                window_start = time.time()
            if stopping and step < cfg.steps:
                raise RunStopped(checkpointer.directory.parent, step, cfg.steps)
    finally:
        stop.restore()
    return state
