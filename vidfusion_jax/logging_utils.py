"""Training summaries: TensorBoard event files and a JSON-lines log, written by process 0 only."""

import json
import math
import pathlib
from typing import Mapping

import jax
import numpy as np
import tensorboardX

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard, images to TensorBoard.

  On processes other than 0 every method does nothing, so callers need no checks.
  """

  def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tensorboard = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / METRICS_FILE, "a", encoding="utf-8")
      self._tensorboard = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR))

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


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
