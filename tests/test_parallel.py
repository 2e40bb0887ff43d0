"""Mesh parsing, the logical-axis rules, a scanned model sharded by them, and the
projection whose weight gradient leaves in the weight's sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from instructjax import parallel
from instructjax.model.config import preset
from instructjax.model.transformer import Transformer, project


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


@pytest.mark.parametrize("names, x_shape", [(("embed", "mlp"), (4, 5, 8)),
                                            (("heads", "head_dim", "embed"), (4, 5, 2, 4))])
def test_projection_gradient_is_autodiffs_and_leaves_in_the_kernels_sharding(names, x_shape):
    """transformer.project (every Projection and the MLP / lm_head kernels) returns the kernel's
    gradient constrained to the kernel's own sharding, tied to the input's gradient so XLA
    reduces it at once: the same values and gradients as plain autodiff, bit for bit on one
    device, and equal on a 2-device FSDP mesh."""
    n_in = len(x_shape) - 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(*x_shape[2:], 6)), jnp.float32)

    def loss(matmul):
        return lambda x, k: jnp.sum(jnp.sin(matmul(x, k).astype(jnp.float32)))

    plain = loss(lambda x, k: jnp.tensordot(x, k.astype(jnp.bfloat16), axes=n_in))
    custom = loss(lambda x, k: project(x, k, jnp.dtype(jnp.bfloat16), names, n_in))
    ref = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(x, kernel)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.jit(jax.value_and_grad(custom, argnums=(0, 1)))(x, kernel), ref)
    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(custom, argnums=1))(x, kernel))

    mesh = parallel.make_mesh("data:1,fsdp:2,tensor:1", jax.devices()[:2])
    k_sharding = jax.sharding.NamedSharding(
        mesh, nn.logical_to_mesh_axes(names, parallel.LOGICAL_RULES))
    assert k_sharding.spec[names.index("embed")] == "fsdp"
    step = parallel.ShardedJit(jax.value_and_grad(custom, argnums=(0, 1)), mesh,
                               in_shardings=(parallel.batch_sharding(mesh), k_sharding),
                               out_shardings=(parallel.replicated(mesh),
                                              (parallel.batch_sharding(mesh), k_sharding)))
    value, grads = step(x, kernel)
    np.testing.assert_allclose(value, ref[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32),
                                                         np.asarray(b, np.float32), rtol=1e-2,
                                                         atol=1e-2), grads, ref[1])
