"""Mesh construction and the rule-based parameter shardings."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from vidfusion_jax import sharding

MESH_2X4 = AbstractMesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("shape, devices, expected", [
    ((-1, 1), 8, (8, 1)), ((2, -1), 8, (2, 4)), ((2, 4), 8, (2, 4)), ((-1,), 1, (1,))])
def test_resolve_mesh_shape(shape, devices, expected):
  assert sharding.resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, devices, message", [
    ((-1, -1), 8, "at most one -1"), ((3, -1), 8, "not divisible by 3"),
    ((2, 2), 8, "has 4 devices but 8"), ((0, 8), 8, "positive")])
def test_resolve_mesh_shape_errors(shape, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.resolve_mesh_shape(shape, devices)


def test_make_mesh_uses_auto_axes_on_all_devices():
  mesh = sharding.make_mesh(("data", "fsdp"), (-1, 1))
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  with pytest.raises(ValueError, match="differ in length"):
    sharding.make_mesh(("data",), (1, 1))


@pytest.mark.parametrize("name, shape, rules, min_size, expected", [
    # Largest dimension divisible by fsdp=4 wins; ties go to the first such dimension.
    ("params/conv/kernel", (3, 3, 16, 32), ((".*", "fsdp"),), 0, P(None, None, None, "fsdp")),
    ("params/conv/kernel", (3, 3, 32, 18), ((".*", "fsdp"),), 0, P(None, None, "fsdp", None)),
    ("params/conv/kernel", (8, 8), ((".*", "fsdp"),), 0, P("fsdp", None)),
    # No divisible dimension, below min_size, no matching rule, or a None rule: replicated.
    ("params/conv/kernel", (3, 3, 3, 9), ((".*", "fsdp"),), 0, P()),
    ("params/conv/kernel", (3, 3, 16, 32), ((".*", "fsdp"),), 10_000, P()),
    ("params/conv/kernel", (16, 32), (("bias", "fsdp"),), 0, P()),
    ("params/conv/bias", (32,), (("bias$", None), (".*", "fsdp")), 0, P()),
    # The first matching rule decides; several mesh axes shard one dimension together.
    ("opt_state/0/mu/conv/kernel", (16, 24), (("kernel", ("data", "fsdp")), (".*", None)), 0,
     P(None, ("data", "fsdp"))),
    # Any mesh axis can be a target (data=2 here).
    ("params/conv/kernel", (16, 32), ((".*", "data"),), 0, P(None, "data")),
])
def test_partition_spec_rules(name, shape, rules, min_size, expected):
  assert sharding.partition_spec(name, shape, rules, MESH_2X4, min_size) == expected


def test_partition_spec_size_one_axis_replicates():
  mesh = AbstractMesh((8, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  assert sharding.partition_spec("w", (16, 32), ((".*", "fsdp"),), mesh, 0) == P()


def test_tree_shardings_cover_params_and_optimizer_moments():
  """One rule set gives a parameter and its Adam moments the same sharding."""
  tree = {"params": {"dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros((8,))}},
          "opt_state": {"mu": {"dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros((8,))}}},
          "step": jnp.zeros((), jnp.int32)}
  shardings = sharding.tree_shardings(tree, MESH_2X4, (("bias", None), ("kernel", "data")), 0)
  assert shardings["params"]["dense"]["kernel"].spec == P(None, "data")
  assert shardings["opt_state"]["mu"]["dense"]["kernel"].spec == P(None, "data")
  assert shardings["params"]["dense"]["bias"].spec == P()
  assert shardings["step"].spec == P()
  assert sharding.path_name(jax.tree_util.tree_flatten_with_path(tree)[0][0][0]) == (
      "opt_state/mu/dense/bias")


def test_batch_shard_count():
  assert sharding.batch_shard_count(MESH_2X4, ("data", "fsdp")) == 8
  assert sharding.batch_shard_count(MESH_2X4, ("fsdp",)) == 4
