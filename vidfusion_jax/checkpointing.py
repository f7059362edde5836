"""Orbax checkpoints of a training workdir, and `load_params` for export.

Layout of a workdir:
  config.json                 the ml_collections config of the run (written by process 0)
  checkpoints/<step>/state    train state: step, params, opt_state, rng (sharded arrays)
  checkpoints/<step>/data     Grain iterator state, one process_<i>-of-<n>.json per process

The workdir may be a `gs://` URL: Orbax writes the arrays through TensorStore's `gcs` driver and
the rest through `etils.epath`. `s3://` workdirs are refused (see `Checkpointer`).
"""

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_decision

from vidfusion_jax import files

PyTree = Any
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes `workdir/config.json` atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  files.atomic_write(files.as_path(workdir) / CONFIG_FILE,
                     config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = files.as_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: is {workdir} a training workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


class Checkpointer:
  """CheckpointManager holding the train state and the data iterator as two items.

  Saves are asynchronous; `save` returns once the arrays are copied off the devices. Keeps the
  `keep` latest checkpoints plus the `keep_best` best by `best_metric` among checkpoints saved
  with metrics.

  The workdir may be local or `gs://`. Orbax 0.12 sends only `gs://` paths to a TensorStore
  object-store driver; any other URL becomes a local `file` path (`s3://b/x` -> "s3:/b/x", refused
  as not absolute), so `s3://` workdirs are refused here before any compute.
  """

  def __init__(self, workdir: str | os.PathLike, *, save_every_steps: int = 1, keep: int = 3,
               keep_best: int = 0, best_metric: str = "", best_mode: str = "max",
               async_checkpointing: bool = True, read_only: bool = False):
    if os.fspath(workdir).startswith("s3://"):
      raise ValueError(f"workdir {workdir}: Orbax checkpoints cannot be written to s3:// (its "
                       "TensorStore arrays go to gs:// or local paths only); use a gs:// or local "
                       "workdir")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    policies = [preservation.LatestN(n=keep)]
    if keep_best and best_metric:
      policies.append(preservation.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
          n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_decision.FixedIntervalPolicy(max(1, save_every_steps)),
        preservation_policy=preservation.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_checkpointing,
        read_only=read_only,
        create=not read_only)
    self.directory = files.absolute(workdir) / CHECKPOINT_DIR
    files.refresh(self.directory)  # checkpoints written by other processes
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: PyTree, data_iterator=None, *,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Saves at `step` when the interval says so (or `force`); returns whether it saved."""
    items = {"state": ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: PyTree, data_iterator=None) -> PyTree:
    """Restores onto the shardings carried by `abstract_state` (any mesh or device count).

    `data_iterator`, when given, is set to its saved position in place.
    """
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target for another mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def load_params(workdir: str | os.PathLike,
                step: int | None = None) -> tuple[PyTree, ml_collections.ConfigDict]:
  """Params (host numpy float32, latest or given step) and config of a training workdir.

  Only the params are read; the optimizer state stays on disk.
  """
  config = load_config(workdir)
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None or step not in checkpointer.all_steps():
      raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                              f"{checkpointer.directory}; available: {checkpointer.all_steps()}")
    metadata = checkpointer.manager.item_metadata(step)["state"]
    params_metadata = metadata.tree["params"] if hasattr(metadata, "tree") else metadata["params"]
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params_metadata)
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": target}, partial_restore=True,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      {"params": target}))))
  finally:
    checkpointer.close()
  return restored["state"]["params"], config
