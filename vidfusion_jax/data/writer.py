"""Writes sequences of registered frames as sharded TFRecord clips, resumably and in parallel.

A conversion is planned before anything is written: every sequence is cut into clips of K frames
(starts 0, S, 2S, ... and, when the last clip would be short, one more clip ending on the last
frame), the clips are dealt in order into shards of `records_per_shard`, and each shard is one
task (`write_shard`) for a pool of processes or a Beam worker (data_prep/engines.py): the plan
alone decides each shard's bytes. Shards are written under temporary names and renamed when
complete; a re-run verifies the shards already present (every CRC, the index, and each record's
sequence and first frame against the plan) and writes only the missing ones. `dataset_info.json`
is written last. The output folder may be a `gs://` or `s3://` URL (see `vidfusion_jax.files`).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tqdm

from vidfusion_jax import files
from vidfusion_jax.data import records
from vidfusion_jax.data import tfrecord

INFO_FILE = "dataset_info.json"
FORMAT_VERSION = 1
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class SequenceSource(abc.ABC):
  """One sequence of registered frames of several streams (picklable: it runs in workers)."""

  name: str
  streams: tuple[str, ...]
  num_frames: int
  height: int
  width: int

  @abc.abstractmethod
  def read_frames(self, start: int, count: int) -> dict[str, np.ndarray]:
    """Frames [start, start + count) as {stream: uint8 (count, H, W, 3)}."""

  def iter_clips(self, starts: Sequence[int], clip_length: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Clips at increasing `starts`; sources that decode sequentially override this."""
    for start in starts:
      yield self.read_frames(start, clip_length)

  def iter_encoded_clips(self, starts: Sequence[int], clip_length: int, frame_encoding: str
                         ) -> Iterator[dict[str, list[bytes]]]:
    """Clips at increasing `starts` as {stream: K stored frames}.

    A frame shared by overlapping clips is encoded once. Sources that can read single frames
    override this to read each frame once, too.
    """
    encoded: dict[int, dict[str, bytes]] = {}  # frame index -> {stream: stored bytes}
    for start, clip in zip(starts, self.iter_clips(starts, clip_length)):
      encoded = {index: frame for index, frame in encoded.items() if index >= start}
      for offset in range(clip_length):
        if start + offset not in encoded:
          encoded[start + offset] = {s: _checked_encode(self, clip[s][offset], frame_encoding)
                                     for s in self.streams}
      yield {s: [encoded[i][s] for i in range(start, start + clip_length)]
             for s in self.streams}


class ConversionError(RuntimeError):
  """A sequence that failed to convert; the message names the sequence and the shard."""


def _checked_encode(source: SequenceSource, frame: np.ndarray, frame_encoding: str) -> bytes:
  if frame.dtype != np.uint8 or frame.shape != (source.height, source.width, 3):
    raise ValueError(f"sequence {source.name}: expected uint8 frames of shape "
                     f"{(source.height, source.width, 3)}, got {frame.dtype} {frame.shape}")
  return records.encode_frame(frame, frame_encoding)


def clip_starts(num_frames: int, clip_length: int, clip_stride: int) -> list[int]:
  """First frames of the clips of a sequence; the last clip ends on the last frame."""
  if num_frames < clip_length:
    return []
  starts = list(range(0, num_frames - clip_length + 1, clip_stride))
  if starts[-1] + clip_length < num_frames:
    starts.append(num_frames - clip_length)
  return starts


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


@dataclasses.dataclass(frozen=True)
class _ShardTask:
  path: files.Path
  clips: tuple[tuple[int, int], ...]  # (position in `sequences`, first frame)
  sequences: tuple[SequenceSource, ...]
  streams: tuple[str, ...]
  clip_length: int
  frame_encoding: str


def _shard_task(path: files.Path, clips: Sequence[tuple[int, int]],
                sequences: Sequence[SequenceSource], streams: tuple[str, ...], clip_length: int,
                frame_encoding: str) -> _ShardTask:
  """A task that carries only its own sequences (they are pickled to a worker)."""
  used = sorted({seq for seq, _ in clips})
  position = {seq: i for i, seq in enumerate(used)}
  return _ShardTask(path, tuple((position[seq], start) for seq, start in clips),
                    tuple(sequences[seq] for seq in used), streams, clip_length, frame_encoding)


def _expected_keys(task: _ShardTask) -> list[tuple[str, int]]:
  return [(task.sequences[seq].name, start) for seq, start in task.clips]


def _verify_shard(task: _ShardTask) -> dict | None:
  """The shard's summary if it is complete and matches the plan, else None."""
  if not task.path.exists() or not tfrecord.index_path(task.path).exists():
    return None
  codec = records.ClipCodec(task.streams, task.clip_length)
  try:
    index = tfrecord.read_index(task.path)
    found = []
    for (offset, data), (index_offset, _) in zip(tfrecord.iter_records(task.path), index):
      clip = codec.parse(data)
      if offset != index_offset or clip.frame_encoding != task.frame_encoding:
        return None
      found.append((clip.sequence, clip.first_frame))
  except (ValueError, KeyError, OSError):
    return None
  if found != _expected_keys(task) or len(index) != len(found):
    return None
  return {"num_records": len(found), "num_bytes": files.file_size(task.path),
          "sha256": tfrecord.file_sha256(task.path)}


def write_shard(task: _ShardTask) -> dict:
  """Writes one planned shard (or verifies the one already there) and returns its summary.

  Errors while reading a sequence are raised as `ConversionError` naming the sequence.
  """
  summary = _verify_shard(task)
  if summary is not None:
    return summary | {"resumed": True}
  codec = records.ClipCodec(task.streams, task.clip_length)
  with tfrecord.ShardWriter(task.path) as writer:
    for seq in sorted({seq for seq, _ in task.clips}):
      source = task.sequences[seq]
      starts = [start for s, start in task.clips if s == seq]
      try:
        for start, encoded in zip(starts, source.iter_encoded_clips(starts, task.clip_length,
                                                                    task.frame_encoding)):
          writer.write(*codec.serialized_parts(source.name, start, source.height,
                                               source.width, task.frame_encoding, encoded))
      except Exception as error:
        raise ConversionError(f"sequence {source.name} failed in shard {task.path.name}: "
                              f"{type(error).__name__}: {error}") from error
    return writer.commit() | {"resumed": False}


def _check_sequences(sequences: Sequence[SequenceSource], clip_length: int) -> tuple[str, ...]:
  if not sequences:
    raise ValueError("no sequences to convert")
  names = [s.name for s in sequences]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"sequence name collision: {duplicates} appear more than once")
  streams = sequences[0].streams
  for source in sequences:
    if source.streams != streams:
      raise ValueError(f"sequence {source.name} has streams {source.streams}, but "
                       f"{sequences[0].name} has {streams}; all sequences need the same streams")
    if source.num_frames < clip_length:
      raise ValueError(f"sequence {source.name} has {source.num_frames} frames, fewer than the "
                       f"clip length {clip_length}; lower --clip-length or leave it out")
  return streams


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """The shards of one split, planned from its sequences before anything is written."""
  split: str
  sequences: tuple[SequenceSource, ...]
  tasks: tuple[_ShardTask, ...]
  clip_length: int
  clip_stride: int
  frame_encoding: str
  streams: tuple[str, ...]

  def info(self, summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The split's `dataset_info` entry from the summaries of its shards, in shard order."""
    return {
        "num_records": sum(len(t.clips) for t in self.tasks),
        "num_frames": sum(s.num_frames for s in self.sequences),
        "num_sequences": len(self.sequences),
        "sequences": {s.name: {"num_frames": s.num_frames, "height": s.height, "width": s.width}
                      for s in self.sequences},
        "shards": [{"file": t.path.name, "index_file": tfrecord.index_path(t.path).name,
                    "num_records": s["num_records"], "num_bytes": s["num_bytes"],
                    "sha256": s["sha256"]} for t, s in zip(self.tasks, summaries)],
        "clip_length": self.clip_length,
        "clip_stride": self.clip_stride,
        "frame_encoding": self.frame_encoding,
        "streams": list(self.streams),
    }


def plan_split(output_dir: str | os.PathLike, split: str, sequences: Sequence[SequenceSource],
               *, clip_length: int, clip_stride: int | None = None, frame_encoding: str = "png",
               records_per_shard: int = 32) -> SplitPlan:
  """Checks a split's options and sequences and plans its shards.

  Clip-to-shard assignment and record order are functions of the inputs only: clips in sequence
  order, dealt `records_per_shard` at a time. Creates the output folder and removes temporary
  files of earlier, interrupted runs.
  """
  if not _SPLIT_NAME.match(split):
    raise ValueError(f"split name {split!r} must use only letters, digits, '_' and '.'")
  if frame_encoding not in records.ENCODINGS:
    raise ValueError(f"frame encoding must be one of {records.ENCODINGS}, got {frame_encoding!r}")
  clip_stride = clip_stride or clip_length
  if clip_length < 1 or clip_stride < 1 or records_per_shard < 1:
    raise ValueError("clip length, clip stride and records per shard must be positive")
  streams = _check_sequences(sequences, clip_length)
  output_dir = files.as_path(output_dir)
  info_path = output_dir / INFO_FILE
  if info_path.exists():  # fail before writing anything
    _check_compatible(info_path, json.loads(info_path.read_text()), split,
                      {"clip_length": clip_length, "frame_encoding": frame_encoding,
                       "streams": list(streams)})
  output_dir.mkdir(parents=True, exist_ok=True)
  plan = [(i, start) for i, source in enumerate(sequences)
          for start in clip_starts(source.num_frames, clip_length, clip_stride)]
  num_shards = math.ceil(len(plan) / records_per_shard)
  for stale in output_dir.glob(f".{split}-*-of-*.tfrecord*.tmp"):
    stale.unlink(missing_ok=True)
  tasks = [_shard_task(output_dir / shard_name(split, k, num_shards),
                       plan[k * records_per_shard:(k + 1) * records_per_shard], sequences,
                       streams, clip_length, frame_encoding)
           for k in range(num_shards)]
  return SplitPlan(split, tuple(sequences), tuple(tasks), clip_length, clip_stride,
                   frame_encoding, streams)


def convert_split(output_dir: str | os.PathLike, split: str,
                  sequences: Sequence[SequenceSource], *, clip_length: int,
                  clip_stride: int | None = None, frame_encoding: str = "png",
                  records_per_shard: int = 32, workers: int = 1,
                  progress: bool = True) -> dict[str, Any]:
  """Writes (or completes) the shards of one split on a process pool; returns its info entry."""
  plan = plan_split(output_dir, split, sequences, clip_length=clip_length,
                    clip_stride=clip_stride, frame_encoding=frame_encoding,
                    records_per_shard=records_per_shard)
  return plan.info(write_split(plan, workers, progress))


def write_split(plan: SplitPlan, workers: int = 1, progress: bool = True) -> list[dict]:
  """Writes a planned split's shards on a pool of `workers` processes; returns their summaries."""
  return _run_tasks(list(plan.tasks), workers, progress, desc=plan.split)


def _run_tasks(tasks: list[_ShardTask], workers: int, progress: bool, desc: str) -> list[dict]:
  total = sum(len(t.clips) for t in tasks)
  bar = tqdm.tqdm(total=total, unit="clip", desc=desc, disable=not progress)
  results: list[dict | None] = [None] * len(tasks)
  with bar:
    if workers <= 1:
      for i, task in enumerate(tasks):
        results[i] = write_shard(task)
        bar.update(len(task.clips))
      return results
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = {pool.submit(write_shard, task): i for i, task in enumerate(tasks)}
      try:
        for future in concurrent.futures.as_completed(futures):
          results[futures[future]] = future.result()
          bar.update(len(tasks[futures[future]].clips))
      except BaseException:
        for future in futures:
          future.cancel()
        raise
  return results


def _check_compatible(path: files.Path, info: Mapping[str, Any], split: str,
                      common: Mapping[str, Any]) -> None:
  """Other splits in the folder must share K, the encoding and the streams."""
  if not set(info.get("splits", {})) - {split}:
    return
  for key, value in common.items():
    if info[key] != value:
      raise ValueError(f"{path} has {key}={info[key]!r} but this conversion uses {value!r}; "
                       "convert into a fresh output folder")


def write_dataset_info(output_dir: str | os.PathLike, split: str, split_info: Mapping[str, Any],
                       source: Mapping[str, Any]) -> dict[str, Any]:
  """Adds or replaces one split in `dataset_info.json` (atomically) and returns the whole info."""
  path = files.as_path(output_dir) / INFO_FILE
  info = json.loads(path.read_text()) if path.exists() else {"format_version": FORMAT_VERSION,
                                                              "splits": {}}
  split_info = dict(split_info)
  common = {k: split_info.pop(k) for k in ("clip_length", "frame_encoding", "streams")}
  _check_compatible(path, info, split, common)
  sizes = {(s["height"], s["width"]) for s in split_info["sequences"].values()}
  sizes |= {(s["height"], s["width"]) for other in info["splits"].values() if other is not None
            for s in other["sequences"].values()}
  height, width = sizes.pop() if len(sizes) == 1 else (None, None)
  info.update(common)
  info.update({
      "height": height,
      "width": width,
      "feature_spec": records.feature_spec(common["streams"], common["clip_length"]),
  })
  split_info["source"] = dict(source)
  info["splits"][split] = split_info
  files.atomic_write(path, json.dumps(info, indent=2) + "\n")
  return info


def convert(output_dir: str | os.PathLike, split: str, sequences: Sequence[SequenceSource],
            source: Mapping[str, Any], **options) -> dict[str, Any]:
  """`convert_split` then `write_dataset_info`: the whole conversion of one split."""
  split_info = convert_split(output_dir, split, sequences, **options)
  return write_dataset_info(output_dir, split, split_info, source)
