"""Device mesh and shardings, all derived from the config.

One decision, made here: meshes use `AxisType.Auto` (GSPMD propagation). The parameters, optimizer
state and batch get explicit `NamedSharding`s at the jit boundary and XLA propagates the rest, so
the convolutional models need no per-op sharding annotations.
"""

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 entry by whatever makes the product equal `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape} must hold positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} cannot fill {num_devices} devices: "
                       f"{num_devices} is not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} has {math.prod(shape)} devices but {num_devices} "
                     "are available; use -1 for one axis to take the rest")
  return shape


def make_mesh(axis_names: Sequence[str], shape: Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` (default: all) with `Auto` axis types; -1 takes the remaining devices."""
  if len(axis_names) != len(shape):
    raise ValueError(f"mesh axis_names {tuple(axis_names)} and shape {tuple(shape)} differ in "
                     "length")
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, tuple(axis_names), axis_types=axis_types, devices=devices)


def mesh_from_config(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh described by `config.mesh.axis_names` and `config.mesh.shape`."""
  return make_mesh(config.mesh.axis_names, config.mesh.shape, devices)


def path_name(path) -> str:
  """'/'-joined key path of a pytree leaf, e.g. 'params/encoder/conv/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def partition_spec(name: str, shape: Sequence[int], rules: Sequence[tuple[str, Any]],
                   mesh: Mesh, min_size: int) -> PartitionSpec:
  """Spec of one array by the first rule whose regex matches `name` (`re.search`).

  A rule's target is a mesh axis name (or a tuple of them) over which the array's largest dimension
  divisible by that axis size is sharded; `None` replicates. Arrays with fewer than `min_size`
  elements, arrays no rule matches, and arrays with no divisible dimension are replicated.
  """
  target = next((axes for pattern, axes in rules if re.search(pattern, name)), None)
  if target is None or math.prod(shape) < min_size:
    return PartitionSpec()
  axes = (target,) if isinstance(target, str) else tuple(target)
  axis_size = math.prod(mesh.shape[a] for a in axes)
  if axis_size == 1:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = axes[0] if len(axes) == 1 else axes
      return PartitionSpec(*spec)
  return PartitionSpec()


def tree_shardings(tree: PyTree, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                   min_size: int) -> PyTree:
  """`NamedSharding` for every array leaf of `tree` (arrays or ShapeDtypeStructs) by the rules.

  Rules match the full leaf path, so one rule covers a parameter and its optimizer moments
  ('params/.../kernel' and 'opt_state/.../mu/.../kernel').
  """
  def leaf_sharding(path, leaf):
    return NamedSharding(mesh, partition_spec(path_name(path), np.shape(leaf), rules, mesh,
                                              min_size))
  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def state_shardings(tree: PyTree, mesh: Mesh, config) -> PyTree:
  """Shardings of a train state (or any pytree) from `config.sharding`."""
  return tree_shardings(tree, mesh, [tuple(rule) for rule in config.sharding.param_rules],
                        config.sharding.min_sharded_size)


def batch_shard_count(mesh: Mesh, batch_axes: Sequence[str]) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in batch_axes)
