"""Mesh parsing, the logical-axis rules, and a scanned model sharded by them."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from instructjax import parallel
from instructjax.model.config import preset
from instructjax.model.transformer import Transformer


def test_parse_mesh_spec():
    assert parallel.parse_mesh_spec("data:1,fsdp:-1,tensor:1", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parallel.parse_mesh_spec("data:2,fsdp:4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parallel.parse_mesh_spec("fsdp:2,tensor:-1", 8) == {"data": 1, "fsdp": 2, "tensor": 4}


@pytest.mark.parametrize("spec, message", [
    ("data:3,fsdp:-1", "not divisible"),
    ("data:-1,fsdp:-1", "at most one"),
    ("pipeline:2", "axis one of"),
    ("data:x", "integer"),
    ("data:2,fsdp:2", "uses 4 devices"),
])
def test_parse_mesh_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parallel.parse_mesh_spec(spec, 8)


def test_make_mesh_shape():
    mesh = parallel.make_mesh("data:2,fsdp:-1,tensor:2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_logical_shardings_follow_rules_and_replicate_indivisible_dims():
    mesh = parallel.make_mesh("data:1,fsdp:2,tensor:4")

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (4, 8))
            kv = self.param("kv", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "kv_heads")), (4, 2))
            b = self.param("b", nn.initializers.zeros, (3,))
            return x @ w, kv, b

    boxed = jax.eval_shape(M().init, jax.random.key(0), jnp.ones((1, 4)))
    shardings = parallel.logical_shardings(boxed, mesh)["params"]
    assert shardings["w"].spec == P("fsdp", "tensor")
    assert shardings["kv"].spec == P("fsdp", None)  # 2 kv heads cannot split over tensor=4
    assert shardings["b"].is_fully_replicated


@pytest.mark.parametrize("spec", ["data:1,fsdp:2,tensor:1", "data:1,fsdp:1,tensor:2"])
def test_scanned_blockwise_model_is_the_same_on_a_two_device_mesh(spec):
    """scan_layers + blockwise attention + remat, sharded by the rules (the stacked layer
    axis never split) over 2 devices: the loss and gradients of one device."""
    cfg = preset("llama-tiny", scan_layers=True, attention_impl="blockwise",
                 attention_block_size=4, remat=True)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, (4, 12)).astype(np.int32)
    positions = np.tile(np.arange(12, dtype=np.int32), (4, 1))
    segments = np.ones_like(tokens)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens, positions, segments)["params"]
    params = nn.meta.unbox(
        jax.jit(model.init)(jax.random.key(0), tokens, positions, segments)["params"])

    def loss(p, tokens):
        logits = model.apply({"params": p}, tokens, positions, segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
    mesh = parallel.make_mesh(spec, jax.devices()[:2])
    shardings = parallel.logical_shardings(boxed, mesh)
    assert shardings["layers"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
    step = parallel.ShardedJit(jax.value_and_grad(loss), mesh,
                               in_shardings=(shardings, parallel.batch_sharding(mesh)),
                               out_shardings=(parallel.replicated(mesh), shardings))
    sharded_loss, grads = step(jax.device_put(params, shardings),
                               jax.device_put(tokens, parallel.batch_sharding(mesh)))
    np.testing.assert_allclose(sharded_loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, ref_grads)
