"""VF-Bench split CSVs as lists of frame pairs (e.g. `data_split/IVF/VTMOT/Vtuav-02.csv`).

Each CSV is one sequence: a header with the columns `ir` and `rgb` (more columns are allowed), then
one row per frame, paths relative to the sequence folder. As in VF-Bench's dataset code, the
sequence folder is `<dataset root>/<CSV name without .csv>`, with '^' in the name standing for '/'.
The evaluate and fuse commands take `--split=CSV` with the dataset root instead of --ir/--vis.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
from typing import Iterator, Sequence

import numpy as np

from vidfusion_jax import frames as frames_lib

IR_COLUMN, VIS_COLUMN = "ir", "rgb"
DIR_SEP_SYMBOL = "^"


@dataclasses.dataclass(frozen=True)
class Split:
  """One sequence of a split: its folder and its IR and visible frame files, in CSV order."""
  name: str
  folder: pathlib.Path
  ir: tuple[pathlib.Path, ...]
  vis: tuple[pathlib.Path, ...]


def read_vfbench_split(csv_path: str | os.PathLike, dataset_root: str | os.PathLike) -> Split:
  """The frame pairs of one VF-Bench split CSV; every listed file must exist."""
  csv_path = pathlib.Path(csv_path)
  if csv_path.suffix.lower() != ".csv" or not csv_path.is_file():
    raise ValueError(f"split {csv_path} is not a CSV file")
  with open(csv_path, newline="") as f:
    rows = [row for row in csv.reader(f) if row]
  if not rows or not {IR_COLUMN, VIS_COLUMN} <= set(rows[0]):
    raise ValueError(f"split {csv_path}: the header must name the columns '{IR_COLUMN}' and "
                     f"'{VIS_COLUMN}'; got {rows[0] if rows else 'an empty file'}")
  header, body = rows[0], rows[1:]
  if not body:
    raise ValueError(f"split {csv_path} lists no frames")
  folder = pathlib.Path(dataset_root) / csv_path.stem.replace(DIR_SEP_SYMBOL, "/")
  column = lambda name: tuple(folder / row[header.index(name)] for row in body)
  split = Split(csv_path.stem, folder, column(IR_COLUMN), column(VIS_COLUMN))
  missing = [p for p in split.ir + split.vis if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"split {csv_path}: {len(missing)} listed frames are missing under "
                            f"{folder}, e.g. {missing[0]} (is the dataset root right?)")
  return split


FrameSource = pathlib.Path | Sequence[pathlib.Path]


def count_frames(source: FrameSource) -> int:
  """Frames of a folder, a video file or a list of frame files."""
  if isinstance(source, (str, os.PathLike)):
    return frames_lib.count_frames(source)
  return len(source)


def iter_frames(source: FrameSource) -> Iterator[np.ndarray]:
  """uint8 RGB frames of a folder, a video file or a list of frame files, in order."""
  if isinstance(source, (str, os.PathLike)):
    return frames_lib.iter_frames(source)
  return (frames_lib.read_frame(p) for p in source)
