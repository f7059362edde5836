"""Training summaries: TensorBoard event files and a JSON-lines log, written by process 0 only.

The workdir may be a `gs://` or `s3://` URL. Objects cannot be appended to, so there both files
are kept in memory and uploaded whole (atomically) on every flush; they stay small (one line or
event per logged step).
"""

import io
import json
import math
import os
from typing import Mapping

import jax
import numpy as np
import tensorboardX
from tensorboardX import record_writer

from vidfusion_jax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class _ObjectFile:
  """A write-only file on an object store: kept in memory, uploaded whole on `flush`."""

  def __init__(self, path: str | os.PathLike, initial: bytes = b""):
    self._path = files.as_path(path)
    self._buffer = io.BytesIO()
    self._buffer.write(initial)

  def write(self, data: bytes | str) -> None:
    self._buffer.write(data.encode() if isinstance(data, str) else data)

  def flush(self) -> None:
    files.atomic_write(self._path, self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectEventFileFactory:
  """tensorboardX's writer factory for `gs://` and `s3://` logdirs, through `etils.epath`.

  Replaces tensorboardX's own, which need google-cloud-storage or boto3 and their separate
  credentials and endpoint settings: every path of the package goes through one client (fsspec).
  """

  def open(self, path: str) -> _ObjectFile:
    return _ObjectFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no folders to create


for _scheme in files.URL_SCHEMES:
  record_writer.register_writer_factory(_scheme.split(":")[0], _ObjectEventFileFactory())


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard, images to TensorBoard.

  On processes other than 0 every method does nothing, so callers need no checks.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tensorboard = None
    if self.enabled:
      workdir = files.as_path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      path = workdir / METRICS_FILE
      if files.is_url(workdir):
        self._jsonl = _ObjectFile(path, path.read_bytes() if path.exists() else b"")
      else:
        self._jsonl = open(path, "a", encoding="utf-8")
      self._tensorboard = tensorboardX.SummaryWriter(os.fspath(workdir / TENSORBOARD_DIR))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {name: float(value) for name, value in scalars.items()}
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, step)
    record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                    for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """`images`: name -> uint8 (H, W, 3)."""
    if not self.enabled:
      return
    for name, image in images.items():
      self._tensorboard.add_image(name, np.asarray(image), step, dataformats="HWC")
    self._tensorboard.flush()

  def flush(self) -> None:
    if self.enabled:
      self._tensorboard.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tensorboard.close()
      self._jsonl.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order."""
  path = files.as_path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
