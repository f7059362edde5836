"""Host batches to global `jax.Array`s sharded over the mesh's data axes."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(mesh: Mesh, data_axes: str | Sequence[str] = ("data",)) -> NamedSharding:
  """Batch axis split over `data_axes`, every other axis replicated."""
  axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
  unknown = set(axes) - set(mesh.axis_names)
  if unknown:
    raise ValueError(f"data axes {sorted(unknown)} are not axes of the mesh {mesh.axis_names}")
  return NamedSharding(mesh, PartitionSpec(axes))


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                    data_axes: str | Sequence[str] = ("data",)) -> dict[str, jax.Array]:
  """Each process passes its own part of the batch; returns global arrays of the whole batch.

  The global batch is the concatenation of the processes' parts in process order (the order in
  which `make_train_dataset` deals the elements), laid out over the devices of `data_axes`.
  """
  sharding = batch_sharding(mesh, data_axes)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in batch.items()}
