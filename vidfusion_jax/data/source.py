"""Random access to the clip records of one split, through the per-shard byte-offset indexes."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np

from vidfusion_jax import files
from vidfusion_jax.data import tfrecord
from vidfusion_jax.data import writer


def read_dataset_info(data_dir: str | os.PathLike) -> dict[str, Any]:
  """The parsed `dataset_info.json` of a converted dataset."""
  path = files.as_path(data_dir) / writer.INFO_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {data_dir} is not a converted dataset, or "
                            "its conversion has not finished (re-run `python -m data_prep`)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON ({error}): the conversion was interrupted or the "
                     "file was edited; re-run `python -m data_prep`") from error


def split_info(info: dict[str, Any], split: str, data_dir: str | os.PathLike) -> dict[str, Any]:
  if split not in info["splits"]:
    raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(info['splits'])}")
  return info["splits"][split]


class ClipRecordSource:
  """A `grain.sources.RandomAccessDataSource` of the serialised records of one split.

  Record `i` is the i-th record in shard order (shards as listed in `dataset_info.json`). Every
  read verifies both CRCs of the record; a corrupt record raises `RecordCorruptError` naming the
  shard and the byte offset. Files are opened lazily per process (it is picklable): local shards
  as descriptors read with `os.pread`, shards on an object store as file objects, one reader at
  a time each. `close()` (or leaving a `with` block, or garbage collection) closes them.
  """

  def __init__(self, data_dir: str | os.PathLike, split: str):
    self.data_dir = files.as_path(data_dir)
    self.split = split
    shards = split_info(read_dataset_info(data_dir), split, data_dir)["shards"]
    self._paths = [self.data_dir / shard["file"] for shard in shards]
    indexes = []
    for path, shard in zip(self._paths, shards):
      index = tfrecord.read_index(path)
      if len(index) != shard["num_records"]:
        raise tfrecord.RecordCorruptError(
            f"{path}: its index lists {len(index)} records, dataset_info.json says "
            f"{shard['num_records']}")
      indexes.append(index)
    self._shard_of = np.concatenate([np.full(len(ix), k, np.int64)
                                     for k, ix in enumerate(indexes)] or [np.zeros(0, np.int64)])
    self._index = np.concatenate(indexes or [np.zeros((0, 2), np.int64)])
    self._fds: dict[int, tfrecord.RecordFile] = {}
    self._locks: dict[int, threading.Lock] = {}
    self._open_lock = threading.Lock()
    self._pid = None

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, record: int) -> bytes:
    if not 0 <= record < len(self):
      raise IndexError(f"record {record} out of range for {len(self)} records")
    shard = int(self._shard_of[record])
    offset, size = (int(v) for v in self._index[record])
    file = self._fd(shard)
    if isinstance(file, int):
      return tfrecord.read_record(file, self._paths[shard], offset, size)
    with self._locks[shard]:
      return tfrecord.read_record(file, self._paths[shard], offset, size)

  def _fd(self, shard: int) -> tfrecord.RecordFile:
    with self._open_lock:
      if self._pid != os.getpid():  # a fresh process (worker): descriptors are not inherited
        self._fds, self._locks, self._pid = {}, {}, os.getpid()
      if shard not in self._fds:
        self._fds[shard] = tfrecord.open_record_file(self._paths[shard])
        self._locks[shard] = threading.Lock()
      return self._fds[shard]

  def close(self) -> None:
    """Closes this process's shard descriptors (a later read reopens them)."""
    fds = self._fds if self._pid == os.getpid() else {}
    self._fds, self._locks = {}, {}
    for file in fds.values():
      tfrecord.close_record_file(file)

  def __enter__(self) -> "ClipRecordSource":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self) -> None:
    if getattr(self, "_fds", None):
      self.close()

  def __getstate__(self) -> dict[str, Any]:
    return self.__dict__ | {"_fds": {}, "_locks": {}, "_open_lock": None, "_pid": None}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _open_lock=threading.Lock())

  def __repr__(self) -> str:
    return f"ClipRecordSource({str(self.data_dir)!r}, {self.split!r}, {len(self)} records)"
