"""Procedural, seeded infrared/visible video pairs for demos and download-free tests.

A scene is a textured, unevenly lit visible background with a smooth temperature field behind it,
and a few warm objects (ellipses) moving with constant velocity. The visible camera sees the
objects with a colour close to the background (hard to spot), the infrared camera sees them as
hot; both streams share one pixel grid (registered). Degraded inputs come from
`vidfusion_jax.data.degrade`, so a synthetic dataset has all four streams.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import cv2
import numpy as np

from vidfusion_jax.data import degrade as degrade_lib
from vidfusion_jax.data import writer


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int,
                  channels: int) -> np.ndarray:
  """Random values on a coarse grid, bicubically upsampled: a smooth texture in [0, 1]."""
  coarse = rng.random((cells, cells, channels)).astype(np.float32)
  field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
  return np.clip(field.reshape(height, width, channels), 0.0, 1.0)


def synthetic_sequence(seed: int, num_frames: int, height: int, width: int,
                       num_objects: int = 3) -> dict[str, np.ndarray]:
  """One registered sequence {lq_ir, lq_vis, gt_ir, gt_vis}: uint8 (num_frames, H, W, 3)."""
  rng = np.random.default_rng(seed)
  luminance = 0.5 + 0.5 * _smooth_field(rng, height, width, 24, 1)
  tint = 0.75 + 0.25 * _smooth_field(rng, height, width, 3, 3)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  light_dir = rng.normal(size=2)
  light = 0.8 + 0.2 * np.tanh((light_dir[0] * yy / height + light_dir[1] * xx / width) * 2)
  vis_background = luminance * tint * light[..., None]
  ir_background = 0.25 + 0.3 * _smooth_field(rng, height, width, 4, 1)[..., 0]

  centers = rng.uniform([0, 0], [height, width], (num_objects, 2))
  velocities = rng.normal(0, 0.03 * min(height, width), (num_objects, 2))
  radii = rng.uniform(0.06, 0.16, (num_objects, 2)) * min(height, width)
  heat = rng.uniform(0.7, 1.0, num_objects)
  colours = np.clip(vis_background.mean((0, 1)) + rng.normal(0, 0.12, (num_objects, 3)), 0, 1)

  gt_ir = np.empty((num_frames, height, width), np.float32)
  gt_vis = np.empty((num_frames, height, width, 3), np.float32)
  for t in range(num_frames):
    position = centers + velocities * t
    position = np.abs((position + [height, width]) % (2 * np.array([height, width]))
                      - [height, width])  # bounce off the borders
    ir, vis = ir_background.copy(), vis_background.copy()
    for k in range(num_objects):
      inside = (((yy - position[k, 0]) / radii[k, 0]) ** 2
                + ((xx - position[k, 1]) / radii[k, 1]) ** 2)
      mask = np.clip(1.5 - inside, 0.0, 1.0)  # soft edge
      ir = ir * (1 - mask) + heat[k] * mask * (1.0 - 0.2 * inside.clip(0, 1))
      vis = vis * (1 - mask[..., None]) + colours[k] * light[..., None] * mask[..., None]
    gt_ir[t], gt_vis[t] = ir, vis
  gt_ir_u8 = np.repeat(np.clip(np.rint(gt_ir * 255), 0, 255).astype(np.uint8)[..., None], 3, -1)
  gt_vis_u8 = np.clip(np.rint(gt_vis * 255), 0, 255).astype(np.uint8)
  lq_ir, lq_vis = degrade_lib.degrade_clip(gt_ir_u8, gt_vis_u8, rng)
  return {"lq_ir": lq_ir, "lq_vis": lq_vis, "gt_ir": gt_ir_u8, "gt_vis": gt_vis_u8}


@dataclasses.dataclass(frozen=True)
class SyntheticSequence(writer.SequenceSource):
  """A synthetic sequence as a conversion source (generated once per worker, then sliced)."""
  name: str
  seed: int
  num_frames: int
  height: int
  width: int
  streams: tuple[str, ...] = ("lq_ir", "lq_vis", "gt_ir", "gt_vis")

  def read_frames(self, start: int, count: int) -> dict[str, np.ndarray]:
    return next(self.iter_clips([start], count))

  def iter_clips(self, starts, clip_length):
    frames = synthetic_sequence(self.seed, self.num_frames, self.height, self.width)
    for start in starts:
      yield {s: frames[s][start:start + clip_length] for s in self.streams}


def synthetic_sequences(num_sequences: int, num_frames: int, height: int, width: int,
                        seed: int = 0, streams: tuple[str, ...] = ("lq_ir", "lq_vis", "gt_ir",
                                                                   "gt_vis"),
                        ) -> list[SyntheticSequence]:
  return [SyntheticSequence(f"synthetic_{i:04d}", seed * 100_003 + i, num_frames, height, width,
                            streams) for i in range(num_sequences)]


def make_synthetic_dataset(output_dir: str | os.PathLike, *, split: str = "train",
                           num_sequences: int = 2, num_frames: int = 12, height: int = 64,
                           width: int = 64, clip_length: int = 6, clip_stride: int | None = None,
                           frame_encoding: str = "png", records_per_shard: int = 4,
                           seed: int = 0, clean_only: bool = False, workers: int = 1,
                           progress: bool = False) -> dict[str, Any]:
  """Writes a small synthetic dataset and returns its `dataset_info`.

  `clean_only=True` stores only `gt_ir`/`gt_vis` (like a dataset without degraded inputs).
  """
  streams = ("gt_ir", "gt_vis") if clean_only else ("lq_ir", "lq_vis", "gt_ir", "gt_vis")
  sequences = synthetic_sequences(num_sequences, num_frames, height, width, seed, streams)
  source = {"converter": "synthetic", "num_sequences": num_sequences, "num_frames": num_frames,
            "height": height, "width": width, "seed": seed, "clean_only": clean_only}
  return writer.convert(output_dir, split, sequences, source,
                        clip_length=clip_length, clip_stride=clip_stride,
                        frame_encoding=frame_encoding, records_per_shard=records_per_shard,
                        workers=workers, progress=progress)
