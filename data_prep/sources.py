"""Conversion sources: frame folders and video files, checked before anything is written."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from vidfusion_jax import files
from vidfusion_jax import frames as frames_lib
from vidfusion_jax.data import records
from vidfusion_jax.data import writer

M3SVD_FOLDERS = {"lq_ir": "infrared_noise", "lq_vis": "visible_Blur",
                 "gt_ir": "infrared_Enhance", "gt_vis": "visible_Enhance"}


def _frame_size(path: pathlib.Path) -> tuple[int, int]:
  """(height, width) from the image header, without decoding the pixels."""
  try:
    with files.as_path(path).open("rb") as stream, Image.open(stream) as image:
      width, height = image.size
  except (OSError, SyntaxError) as error:
    raise frames_lib.FrameReadError(f"cannot read image {path}: {error}") from error
  return height, width


def list_frames(folder: pathlib.Path) -> list[pathlib.Path]:
  """The frame files of a folder; an empty folder or two files with one stem are errors."""
  files = frames_lib.list_frame_files(folder)
  if not files:
    raise ValueError(f"{folder} holds no image files ({', '.join(frames_lib.IMAGE_SUFFIXES)})")
  seen: dict[str, pathlib.Path] = {}
  for path in files:
    if path.stem in seen:
      raise ValueError(f"frame name collision in {folder}: {seen[path.stem].name} and "
                       f"{path.name} have the same name; keep one of them")
    seen[path.stem] = path
  return files


def _check_sizes(name: str, first_frames: Mapping[str, pathlib.Path]) -> tuple[int, int]:
  sizes = {stream: _frame_size(path) for stream, path in first_frames.items()}
  reference_stream, reference = next(iter(sizes.items()))
  for stream, size in sizes.items():
    if size != reference:
      raise ValueError(
          f"sequence {name}: frame size mismatch between streams: {first_frames[stream]} is "
          f"{size[1]}x{size[0]}, {first_frames[reference_stream]} is "
          f"{reference[1]}x{reference[0]}")
  return reference


@dataclasses.dataclass(frozen=True)
class FolderSequence(writer.SequenceSource):
  """A sequence whose streams are folders of frame files, paired by position."""
  name: str
  files: Mapping[str, tuple[pathlib.Path, ...]]
  height: int
  width: int

  @property
  def streams(self) -> tuple[str, ...]:
    return tuple(self.files)

  @property
  def num_frames(self) -> int:
    return len(next(iter(self.files.values())))

  @classmethod
  def from_folders(cls, name: str, folders: Mapping[str, pathlib.Path],
                   match_names: bool) -> "FolderSequence":
    """Lists and cross-checks the folders (counts, names if `match_names`, first-frame sizes)."""
    files = {stream: list_frames(folder) for stream, folder in folders.items()}
    reference_stream, reference = next(iter(files.items()))
    for stream, paths in files.items():
      if len(paths) != len(reference):
        raise ValueError(f"sequence {name}: frame count mismatch: {folders[stream]} has "
                         f"{len(paths)} frames, {folders[reference_stream]} has {len(reference)}")
      if match_names:
        for path, ref in zip(paths, reference):
          if path.stem != ref.stem:
            raise ValueError(f"sequence {name}: {path} has no counterpart named {path.stem} in "
                             f"{folders[reference_stream]} (found {ref.name} there)")
    height, width = _check_sizes(name, {s: p[0] for s, p in files.items()})
    return cls(name, {s: tuple(p) for s, p in files.items()}, height, width)

  def read_frames(self, start: int, count: int) -> dict[str, np.ndarray]:
    clip = {}
    for stream, paths in self.files.items():
      frames = []
      for path in paths[start:start + count]:
        frame = frames_lib.read_frame(path)
        if frame.shape[:2] != (self.height, self.width):
          raise ValueError(f"frame size mismatch: {path} is {frame.shape[1]}x{frame.shape[0]}, "
                           f"sequence {self.name} is {self.width}x{self.height}")
        frames.append(frame)
      clip[stream] = np.stack(frames)
    return clip

  def iter_encoded_clips(self, starts: Sequence[int], clip_length: int, frame_encoding: str
                         ) -> Iterator[dict[str, list[bytes]]]:
    """Reads each frame file once; PNG files already in the stored layout pass through."""

    @functools.lru_cache(maxsize=clip_length)  # the frames shared with the next clip
    def stored(index: int) -> dict[str, bytes]:
      if frame_encoding != "png":
        return {s: records.encode_frame(f[0], frame_encoding)
                for s, f in self.read_frames(index, 1).items()}
      frames = {}
      for stream, paths in self.files.items():
        try:
          data = paths[index].read_bytes()
        except OSError as error:
          raise frames_lib.FrameReadError(f"cannot read image {paths[index]}: {error}") from error
        frames[stream] = records.stored_png(data, str(paths[index]), (self.height, self.width))
      return frames

    for start in starts:
      clip = [stored(index) for index in range(start, start + clip_length)]
      yield {s: [frame[s] for frame in clip] for s in self.streams}


@dataclasses.dataclass(frozen=True)
class VideoSequence(writer.SequenceSource):
  """A sequence whose streams are video files; decoded forward only, once per shard."""
  name: str
  videos: Mapping[str, pathlib.Path]
  num_frames: int
  height: int
  width: int

  @property
  def streams(self) -> tuple[str, ...]:
    return tuple(self.videos)

  @classmethod
  def from_videos(cls, name: str, videos: Mapping[str, pathlib.Path]) -> "VideoSequence":
    counts = {stream: frames_lib.count_frames(path) for stream, path in videos.items()}
    sizes = {stream: next(iter(frames_lib.iter_frames(path))).shape[:2]
             for stream, path in videos.items()}
    (stream0, count0), (_, size0) = next(iter(counts.items())), next(iter(sizes.items()))
    for stream, path in videos.items():
      if counts[stream] != count0:
        raise ValueError(f"sequence {name}: frame count mismatch: {path} has {counts[stream]} "
                         f"frames, {videos[stream0]} has {count0}")
      if sizes[stream] != size0:
        raise ValueError(f"sequence {name}: frame size mismatch: {path} is "
                         f"{sizes[stream][1]}x{sizes[stream][0]}, {videos[stream0]} is "
                         f"{size0[1]}x{size0[0]}")
    if count0 == 0:
      raise ValueError(f"sequence {name}: {videos[stream0]} has no frames")
    return cls(name, dict(videos), count0, size0[0], size0[1])

  def read_frames(self, start: int, count: int) -> dict[str, np.ndarray]:
    return next(self.iter_clips([start], count))

  def iter_clips(self, starts: Sequence[int], clip_length: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    readers = {s: enumerate(frames_lib.iter_frames(p)) for s, p in self.videos.items()}
    window = {s: [] for s in self.videos}  # (frame index, frame), oldest first
    for start in starts:
      clip = {}
      for stream, reader in readers.items():
        buffer = [item for item in window[stream] if item[0] >= start]
        while len(buffer) < clip_length:
          index, frame = next(reader, (None, None))
          if index is None:
            raise ValueError(f"{self.videos[stream]} ended before frame {start + clip_length}")
          if index >= start:
            buffer.append((index, frame))
        window[stream] = buffer
        clip[stream] = np.stack([frame for _, frame in buffer[:clip_length]])
      yield clip


def subfolders(folder: pathlib.Path) -> list[pathlib.Path]:
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a folder")
  return sorted((p for p in folder.iterdir() if p.is_dir()),
                key=lambda p: frames_lib.natural_key(p.name))


def m3svd_sequences(root: pathlib.Path, folders: Mapping[str, str]) -> list[FolderSequence]:
  """All sequences of an M3SVD-style root; every sequence must exist in every stream folder."""
  stream_dirs = {stream: root / folder for stream, folder in folders.items()}
  names = {stream: [p.name for p in subfolders(d)] for stream, d in stream_dirs.items()}
  reference_stream, reference = next(iter(names.items()))
  if not reference:
    raise ValueError(f"{stream_dirs[reference_stream]} has no sequence folders")
  for stream, found in names.items():
    missing = sorted(set(reference) ^ set(found))
    if missing:
      raise ValueError(f"sequence folders differ between {stream_dirs[reference_stream]} and "
                       f"{stream_dirs[stream]}: {missing}")
  return [FolderSequence.from_folders(name, {s: d / name for s, d in stream_dirs.items()},
                                      match_names=True) for name in reference]


def pair_sequences(folders: Mapping[str, pathlib.Path], name: str | None
                   ) -> list[FolderSequence]:
  """Frame folders (one sequence) or folders of sequence folders (matched by folder name)."""
  first = next(iter(folders.values()))
  if frames_lib.list_frame_files(first):
    return [FolderSequence.from_folders(name or first.name, folders, match_names=False)]
  names = [p.name for p in subfolders(first)]
  if not names:
    raise ValueError(f"{first} holds neither image files nor sequence folders")
  for stream, folder in folders.items():
    found = [p.name for p in subfolders(folder)]
    if found != names:
      raise ValueError(f"sequence folders differ between {first} and {folder}: "
                       f"{sorted(set(names) ^ set(found))}")
  return [FolderSequence.from_folders(n, {s: f / n for s, f in folders.items()},
                                      match_names=False) for n in names]


def read_sequence_list(spec: str) -> list[str]:
  """`a,b,c` or `@file` (one name a line; blank lines and `#` comments ignored)."""
  if spec.startswith("@"):
    lines = pathlib.Path(spec[1:]).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
  return [name.strip() for name in spec.split(",") if name.strip()]


def select_splits(sequences: Sequence[writer.SequenceSource], specs: Sequence[str]
                  ) -> dict[str, list[writer.SequenceSource]]:
  """Applies `--split NAME[=SEQ,SEQ,...|=@FILE]` specs; a bare NAME takes every sequence."""
  by_name = {s.name: s for s in sequences}
  splits: dict[str, list[writer.SequenceSource]] = {}
  assigned: dict[str, str] = {}
  for spec in specs:
    split, _, listed = spec.partition("=")
    if split in splits:
      raise ValueError(f"split {split} is given twice")
    names = read_sequence_list(listed) if listed else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
      raise ValueError(f"split {split}: unknown sequences {unknown}; the source has "
                       f"{sorted(by_name)}")
    for n in names:
      if listed and n in assigned:
        raise ValueError(f"sequence {n} is in both split {assigned[n]} and split {split}")
      assigned[n] = split
    splits[split] = [by_name[n] for n in names]
  return splits
