"""Device mesh and shardings, all derived from the config.

One decision, made here: meshes use `AxisType.Auto` (GSPMD propagation). The parameters, optimizer
state and batch get explicit `NamedSharding`s at the jit boundary and XLA propagates the rest, so
the convolutional models need no per-op sharding annotations.
"""

import functools
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


def mesh_context(mesh: Mesh | jax.sharding.AbstractMesh):
  """Context in which a jitted function is traced for `mesh`: `layers.gathered` weights become
  whole on each device where used."""
  return jax.sharding.use_abstract_mesh(
      mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh)


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


# ------------------------------------------------------------------------- communication volume

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY_TYPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_CALLEE = re.compile(r"\b(body|to_apply|calls)=%([^\s,]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _type_bytes(hlo_type: str) -> int:
  """Bytes of an HLO type such as `f32[4,8]{1,0}` or a tuple `(f32[4], bf16[2,2])`."""
  total = 0
  for dtype, dims in _ARRAY_TYPE.findall(hlo_type):
    if dtype in ("token", "pred"):
      itemsize = 1
    else:
      itemsize = max(1, int(re.sub(r"[a-z]", "", dtype) or 8) // 8)
    total += math.prod(int(d) for d in dims.split(",") if d) * itemsize
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of each kind of collective in an optimized HLO module (`compiled.as_text()`).

  Each collective counts the size of its full, unsharded side: an all-gather its result, every
  other kind its operands (an all-reduce's buffer, a reduce-scatter's input, what an all-to-all
  or collective-permute sends). Asynchronous pairs count once, at their `-start`. A collective in
  a loop body (a scanned block's gradient reduction) counts once per iteration of the loop's known
  trip count.
  """
  types: dict[str, str] = {}
  own: dict[str, dict[str, int]] = {}  # computation -> its own collective bytes
  callees: dict[str, list[tuple[str, int]]] = {}  # computation -> [(callee, times called)]
  computation = entry = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(2)
      entry = computation if header.group(1) else entry
      own[computation], callees[computation] = dict.fromkeys(COLLECTIVES, 0), []
      continue
    match = _INSTRUCTION.match(line)
    if not match or computation is None:
      continue
    name, result_type, opcode, rest = match.groups()
    types[name] = result_type
    trip_count = _TRIP_COUNT.search(rest)
    for role, callee in _CALLEE.findall(rest):
      callees[computation].append((callee, int(trip_count.group(1)) if trip_count and role ==
                                   "body" else 1))
    kind = opcode.removesuffix("-start")
    if kind not in COLLECTIVES:
      continue
    operands = re.findall(r"%([^\s,()]+)", rest.split(")", 1)[0])
    operand_bytes = sum(_type_bytes(types[o]) for o in operands)
    if kind == "all-gather":
      # An all-gather-start returns the tuple (operands, results).
      gathered = _type_bytes(result_type)
      own[computation][kind] += gathered - operand_bytes if opcode.endswith("-start") else gathered
    else:
      own[computation][kind] += operand_bytes

  @functools.cache
  def total(name: str) -> tuple[int, ...]:
    counts = [own[name][k] for k in COLLECTIVES]
    for callee, times in callees[name]:
      counts = [c + times * t for c, t in zip(counts, total(callee))]
    return tuple(counts)

  return dict(zip(COLLECTIVES, total(entry)))


def minimum_collective_bytes(params: PyTree, batch_axes: Sequence[str]) -> dict[str, int]:
  """The collectives a data-parallel / FSDP train step cannot avoid, counted like
  `collective_bytes`, for `params` given as arrays or ShapeDtypeStructs carrying shardings.

  A replicated parameter's gradient is all-reduced over the batch axes. A parameter split k ways
  is all-gathered for the forward pass and its gradient reduce-scattered; when the batch is also
  split over axes the parameter is not, the 1/k gradient shard is then all-reduced over them.
  """
  totals = dict.fromkeys(COLLECTIVES, 0)
  for leaf in jax.tree.leaves(params):
    mesh, spec = leaf.sharding.mesh, leaf.sharding.spec
    param_axes = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str)
                                                         else entry)}
    reduce_ways = math.prod(mesh.shape[a] for a in batch_axes if a not in param_axes)
    size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    shards = math.prod(mesh.shape[a] for a in param_axes)
    if shards > 1:
      totals["all-gather"] += size
      totals["reduce-scatter"] += size
    if reduce_ways > 1:
      totals["all-reduce"] += size // shards
  return totals
