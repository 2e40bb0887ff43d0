"""The train step on different meshes, gradient accumulation, checkpoints across meshes,
and the non-finite-loss stop."""
import jax
import numpy as np
import pytest

from instructjax import parallel
from instructjax.config import OptimConfig, TrainConfig
from instructjax.losses import LMLossConfig, Objective, lm_loss, make_apply
from instructjax.model.config import preset
from instructjax.model.transformer import Transformer
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train import loop, state as state_lib, step as step_lib
from instructjax.train.metrics import MetricsWriter

SEQ, BATCH, VOCAB = 16, 8, 256


def _batch(seed):
    # The same tokens every step (so the loss must fall); the mask varies with the seed.
    tokens = np.random.default_rng(0).integers(4, VOCAB, size=(BATCH, SEQ + 1)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.float32)
    mask[:, : seed % 3] = 0.0  # uneven masks make the denominator matter
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
            "segment_ids": np.ones((BATCH, SEQ), np.int32), "loss_mask": mask}


def _train(mesh, steps=3, accum=1, family="gpt2"):
    cfg = preset("tiny" if family == "gpt2" else "llama-tiny", vocab_size=VOCAB, max_len=SEQ)
    model = Transformer(cfg)
    # eps well above float noise: the key bias has an exactly-zero true gradient (softmax
    # is shift invariant), and Adam would turn rounding noise there into full-size steps.
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1e-5)
    tx = state_lib.make_optimizer(optim, steps)
    state, shardings = state_lib.init_state(model, tx, mesh, SEQ, jax.random.key(0))
    step = step_lib.make_train_step(Objective(lm_loss, LMLossConfig()), apply=make_apply(model),
                                    tx=tx, schedule=state_lib.make_schedule(optim, steps),
                                    mesh=mesh, state_shardings=shardings, grad_accum_steps=accum)
    losses = []
    for i in range(steps):
        state, metrics = step(state, parallel.global_batch(_batch(i), mesh), jax.random.key(1))
        metrics = jax.device_get(metrics)
        losses.append(float(metrics["loss"][0]) / float(metrics["loss"][1]))
    return losses, jax.device_get(state.params)


# Llama on a tensor-parallel mesh is in test_hf; its full-loop check is in the slow set.
@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_same_result_on_every_mesh(family):
    ref_losses, ref_params = _train(parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1]),
                                    family=family)
    for spec in ("data:1,fsdp:8,tensor:1", "data:2,fsdp:4,tensor:1", "data:1,fsdp:2,tensor:4"):
        losses, params = _train(parallel.make_mesh(spec), family=family)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=spec)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, err_msg=spec),
                     params, ref_params)
    assert ref_losses[-1] < ref_losses[0]  # it learns something


def test_gradient_accumulation_is_exact():
    mesh = parallel.make_mesh("data:1,fsdp:4,tensor:1", jax.devices()[:4])
    full_losses, full = _train(mesh, accum=1)
    acc_losses, acc = _train(mesh, accum=2)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), acc, full)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    cfg = preset("tiny", vocab_size=VOCAB, max_len=SEQ)
    model = Transformer(cfg)
    tx = state_lib.make_optimizer(OptimConfig(learning_rate=1e-3), 10)
    mesh_a = parallel.make_mesh("data:1,fsdp:8,tensor:1")
    state, _ = state_lib.init_state(model, tx, mesh_a, SEQ, jax.random.key(3))
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    ckpt.save(0, state, {"data_iter": {"pos": 7}})
    mesh_b = parallel.make_mesh("data:2,fsdp:1,tensor:4")
    abstract, _ = state_lib.abstract_state(model, tx, mesh_b, SEQ)
    restored, meta = ckpt.restore(abstract)
    ckpt.close()
    assert meta == {"data_iter": {"pos": 7}}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, state)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert leaf.sharding == want.sharding
    # --init_from reads only the params, onto a third mesh.
    mesh_c = parallel.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
    params = ckpt_lib.restore_params(tmp_path, state_lib.abstract_params(model, mesh_c, SEQ)[0])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, state.params)


class _ListIterator:
    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __next__(self):
        self.pos += 1
        return self.batches[self.pos - 1]

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]


# log_every=100: metrics are fetched one step late, so step 3's NaN is found after step 4
# is dispatched, and still before step 4's checkpoint.
@pytest.mark.parametrize("log_every,poisoned_step", [(1, 4), (100, 3)])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, log_every, poisoned_step):
    cfg = preset("tiny", vocab_size=VOCAB, max_len=SEQ)
    model = Transformer(cfg)
    mesh = parallel.make_mesh("data:1,fsdp:8,tensor:1")
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0)
    tx = state_lib.make_optimizer(optim, 10)
    state, shardings = state_lib.init_state(model, tx, mesh, SEQ, jax.random.key(0))
    step = step_lib.make_train_step(Objective(lm_loss, LMLossConfig()), apply=make_apply(model),
                                    tx=tx, schedule=state_lib.make_schedule(optim, 10), mesh=mesh,
                                    state_shardings=shardings)
    batches = [_batch(i) for i in range(4)]
    batches[poisoned_step - 1] = dict(batches[poisoned_step - 1],
                                      loss_mask=np.full((BATCH, SEQ), np.nan, np.float32))
    ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt")
    train_cfg = TrainConfig(steps=4, batch_size=BATCH, seq_len=SEQ, checkpoint_every=2,
                            log_every=log_every)
    with pytest.raises(loop.NonFiniteLossError,
                       match=rf"step {poisoned_step}: training loss is nan.*step 2"):
        loop.train_loop(state, cfg=train_cfg, train_step=step, base_rng=jax.random.key(0),
                        data_iter=_ListIterator(batches), mesh=mesh, checkpointer=ckpt,
                        writer=MetricsWriter(tmp_path, total_steps=4))
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_init_from_with_another_model_is_a_clear_error(tmp_path):
    import dataclasses
    import json
    from instructjax.config import ConfigError
    from instructjax.train.workdir import check_init_from_model
    earlier = tmp_path / "sft"
    earlier.mkdir()
    (earlier / "model_config.json").write_text(
        json.dumps(dataclasses.asdict(preset("tiny", vocab_size=512))))

    check_init_from_model(preset("tiny", vocab_size=512, compute_dtype="bfloat16"), earlier)
    with pytest.raises(ConfigError, match=r"vocab_size=2048 \(theirs 512\), d_model=128 \(theirs 64\)"):
        check_init_from_model(preset("demo", max_len=128), earlier)


def test_the_tokenizer_and_the_model_agree_on_the_vocabulary(tmp_path):
    import json
    from absl import flags
    from experiments import common
    from instructjax.config import ConfigError, DataConfig, RunConfig
    from instructjax.train.run import resolve_tokenizer
    FLAGS = flags.FLAGS
    try:  # a preset's vocabulary holds unless --vocab_size is given
        FLAGS(["test", "--model=tiny", "--seq_len=64", f"--workdir={tmp_path}"])
        cfg = common.run_config_from_flags("pretrain")
        assert cfg.model.vocab_size == cfg.data.vocab_size == 512
        FLAGS.unparse_flags()
        FLAGS(["test", "--model=tiny", "--seq_len=64", "--vocab_size=1024", f"--workdir={tmp_path}"])
        cfg = common.run_config_from_flags("pretrain")
        assert cfg.model.vocab_size == cfg.data.vocab_size == 1024
    finally:
        FLAGS.unparse_flags()

    # A corpus too small for the requested vocabulary: refused, naming both numbers.
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n"
                              for i in range(50)))
    cfg = RunConfig(task="pretrain", workdir=str(tmp_path / "w"), model=preset("tiny"),
                    optim=OptimConfig(learning_rate=1e-3),
                    train=TrainConfig(steps=1, batch_size=8, seq_len=64),
                    data=DataConfig(data_dir=str(tmp_path / "d"), vocab_size=512,
                                    train_files=(str(corpus),), eval_files=(str(corpus),)))
    files = {"train": str(corpus), "eval": str(corpus)}
    with pytest.raises(ConfigError, match=r"--vocab_size=512: the training text gave only "
                                          r"(\d+) tokenizer pieces; rerun with --vocab_size=\1"):
        resolve_tokenizer(cfg, files)
    assert not (tmp_path / "w" / "tokenizer.model").exists()
