"""The Grain training pipeline and the sequential evaluation reader.

Training order (the order of the Flax and MaxText Grain pipelines):

    ClipRecordSource -> shuffle(seed) -> random_map(ClipTransform) -> repeat(num_epochs)
      -> batch(global_batch_size // process_count) -> [process_index::process_count]
      -> to_iter_dataset(ReadOptions) -> mp_prefetch(workers)

The shuffle is global and different in every epoch. The random transform is seeded by the
pipeline seed and the element's position in the shuffled stream, before batching and the
per-process slice, so an element's crop and degradation do not depend on the number of processes
or workers, and a batch is the same whichever worker builds it. Global batch s is elements
[s * B, (s + 1) * B) of the stream, and process p of n holds its rows [p * B / n, (p + 1) * B / n):
the global batch is the same array for any process layout, and each epoch is covered exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Sequence

from absl import flags
import grain
import numpy as np

from vidfusion_jax.data import degrade as degrade_lib
from vidfusion_jax.data import records
from vidfusion_jax.data import source as source_lib

DEGRADE_MODES = ("auto", "always", "identity")


@functools.lru_cache(maxsize=None)
def _codec(streams: tuple[str, ...], clip_length: int) -> records.ClipCodec:
  return records.ClipCodec(streams, clip_length)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _low_quality(clip: dict[str, np.ndarray], degrade: str, rng: np.random.Generator,
                 options: degrade_lib.DegradeOptions) -> dict[str, np.ndarray]:
  """Adds lq_ir/lq_vis: stored ones, synthesised from gt, or copies of gt (see DEGRADE_MODES)."""
  has_lq = "lq_ir" in clip and "lq_vis" in clip
  if degrade == "always" or (degrade == "auto" and not has_lq):
    clip["lq_ir"], clip["lq_vis"] = degrade_lib.degrade_clip(clip["gt_ir"], clip["gt_vis"], rng,
                                                             options)
  elif not has_lq:
    clip["lq_ir"], clip["lq_vis"] = clip["gt_ir"].copy(), clip["gt_vis"].copy()
  return clip


@dataclasses.dataclass(frozen=True)
class ClipTransform(grain.transforms.RandomMap):
  """Serialised record -> {lq_ir, lq_vis, gt_ir, gt_vis}: uint8 (T, crop_h, crop_w, 3).

  Draws a temporal window of `window` frames inside the record's clip and one crop position for
  all frames and streams, decodes only those frames (raw frames are cropped before copying),
  then optionally flips / rotates and synthesises the degraded inputs.
  """
  streams: tuple[str, ...]
  clip_length: int
  window: int
  crop_size: tuple[int, int]
  flip: bool = False
  rotate: bool = False
  degrade: str = "auto"
  degrade_options: degrade_lib.DegradeOptions = degrade_lib.DegradeOptions()

  def random_map(self, element: bytes, rng: np.random.Generator) -> dict[str, np.ndarray]:
    clip = _codec(self.streams, self.clip_length).parse(element)
    crop_h, crop_w = self.crop_size
    if crop_h > clip.height or crop_w > clip.width:
      raise ValueError(f"crop {crop_h}x{crop_w} is larger than the {clip.height}x{clip.width} "
                       f"frames of sequence {clip.sequence}")
    start = int(rng.integers(0, clip.num_frames - self.window + 1))
    top = int(rng.integers(0, clip.height - crop_h + 1))
    left = int(rng.integers(0, clip.width - crop_w + 1))
    flips = rng.random(2) < 0.5
    quarter_turns = int(rng.integers(0, 4))
    out = {stream: clip.decode(stream, start, start + self.window, (top, left, crop_h, crop_w))
           for stream in self.streams if stream.startswith("gt") or self.degrade != "always"}
    out = _low_quality(out, self.degrade, rng, self.degrade_options)
    for stream, frames in out.items():
      if self.flip and flips[0]:
        frames = frames[:, :, ::-1]
      if self.flip and flips[1]:
        frames = frames[:, ::-1]
      if self.rotate and quarter_turns:
        frames = np.rot90(frames, quarter_turns, axes=(1, 2))
      out[stream] = np.ascontiguousarray(frames)
    return {stream: out[stream] for stream in records.STREAMS}


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
  return process_index, process_count


def make_train_dataset(data_dir: str | os.PathLike, split: str = "train", *,
                       global_batch_size: int, clip_length: int = 6,
                       crop_size: int | Sequence[int] = 128, seed: int = 0,
                       process_index: int | None = None, process_count: int | None = None,
                       worker_count: int = 0, worker_buffer_size: int = 2,
                       read_threads: int = 2, num_epochs: int | None = None,
                       flip: bool = False, rotate: bool = False, degrade: str = "auto",
                       degrade_options: degrade_lib.DegradeOptions = degrade_lib.DegradeOptions(),
                       ) -> grain.IterDataset:
  """The training `grain.IterDataset` of this process's batches (see the module docstring)."""
  process_index, process_count = _process_defaults(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be divisible by the process "
                     f"count {process_count}")
  if degrade not in DEGRADE_MODES:
    raise ValueError(f"degrade must be one of {DEGRADE_MODES}, got {degrade!r}")
  crop = _pair(crop_size)
  if rotate and crop[0] != crop[1]:
    raise ValueError(f"rotate=True needs a square crop, got {crop}")
  info = source_lib.read_dataset_info(data_dir)
  stored_clip_length = info["clip_length"]
  if not 1 <= clip_length <= stored_clip_length:
    raise ValueError(f"clip_length {clip_length} must be in [1, {stored_clip_length}] (the "
                     f"records of {data_dir} hold {stored_clip_length} frames)")
  streams = tuple(info["streams"])
  if not {"gt_ir", "gt_vis"} <= set(streams):
    raise ValueError(f"{data_dir} lacks the clean streams gt_ir/gt_vis (it has {streams})")
  transform = ClipTransform(streams, stored_clip_length, clip_length, crop, flip, rotate, degrade,
                            degrade_options)
  ds = grain.MapDataset.source(source_lib.ClipRecordSource(data_dir, split))
  if len(ds) == 0:
    raise ValueError(f"split {split!r} of {data_dir} has no records")
  ds = ds.shuffle(seed=seed).random_map(transform, seed=seed).repeat(num_epochs)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count]
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=max(2, read_threads)))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's workers read absl flags; outside an absl program they keep their defaults.
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return iter_ds


def make_train_iterator(data_dir: str | os.PathLike, split: str = "train", **kwargs: Any
                        ) -> grain.DatasetIterator:
  """A checkpointable iterator over this process's batches; arguments of `make_train_dataset`."""
  return iter(make_train_dataset(data_dir, split, **kwargs))


def iter_sequences(data_dir: str | os.PathLike, split: str, *, degrade: str = "identity",
                   seed: int = 0,
                   degrade_options: degrade_lib.DegradeOptions = degrade_lib.DegradeOptions(),
                   ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
  """Yields (sequence name, {lq_ir, lq_vis, gt_ir, gt_vis}: uint8 (N, H, W, 3)) in frame order.

  Reads the records of a split in shard order (the converters write each sequence's clips
  consecutively, by first frame). Without stored lq streams, `degrade="identity"` gives lq = gt and
  `"auto"` synthesises them with a generator seeded by (`seed`, sequence position).
  """
  if degrade not in DEGRADE_MODES:
    raise ValueError(f"degrade must be one of {DEGRADE_MODES}, got {degrade!r}")
  info = source_lib.read_dataset_info(data_dir)
  sequences = source_lib.split_info(info, split, data_dir)["sequences"]
  codec = _codec(tuple(info["streams"]), info["clip_length"])
  source = source_lib.ClipRecordSource(data_dir, split)  # closed when the generator ends
  current, frames, filled_until, position = None, {}, 0, -1

  def finish():
    if filled_until != len(frames["gt_ir"]):
      raise ValueError(f"sequence {current} of split {split} ends at frame {filled_until}, "
                       f"expected {len(frames['gt_ir'])} frames")
    rng = np.random.default_rng([seed, position])
    return current, _low_quality(frames, degrade, rng, degrade_options)

  with source:
    for record in range(len(source)):
      clip = codec.parse(source[record])
      if clip.sequence != current:
        if current is not None:
          yield finish()
        current, filled_until, position = clip.sequence, 0, position + 1
        num_frames = sequences[current]["num_frames"]
        frames = {s: np.empty((num_frames, clip.height, clip.width, 3), np.uint8)
                  for s in codec.streams}
      if clip.first_frame > filled_until:
        raise ValueError(f"sequence {current} of split {split}: frames {filled_until} to "
                         f"{clip.first_frame - 1} are in no record (records out of order?)")
      stop = clip.first_frame + clip.num_frames
      if stop > filled_until:
        for stream in codec.streams:
          frames[stream][filled_until:stop] = clip.decode(stream, filled_until - clip.first_frame)
        filled_until = stop
  if current is not None:
    yield finish()
