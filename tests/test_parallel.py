"""Mesh parsing and the logical-axis rules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from instructjax import parallel


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
