"""TFRecord framing with masked CRC32C, and the per-shard byte-offset index.

A TFRecord file is a sequence of records, each framed as

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

(little endian), which is what `tf.data.TFRecordDataset` reads. The index file beside each shard
(`<shard>.idx`) holds one text line `offset size` per record (the DALI `tfrecord2idx` format):
the byte offset of the record's frame and the frame's total size (data length + 16). The index is
what turns a shard into a random-access source.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import BinaryIO, Iterator

import google_crc32c
import numpy as np

from vidfusion_jax import files

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
FRAMING_BYTES = _HEADER.size + _FOOTER.size
INDEX_SUFFIX = ".idx"


class RecordCorruptError(ValueError):
  """A record whose framing or checksum is wrong; the message names the file and byte offset."""


def masked_crc32c(*parts: bytes) -> int:
  """TFRecord's masked CRC32C of the concatenated `parts`: rotate right by 15 bits, add a
  constant (mod 2**32)."""
  crc = 0
  for part in parts:
    crc = google_crc32c.extend(crc, part)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(*parts: bytes) -> list[bytes]:
  """The framed bytes of one record whose data is the concatenation of `parts`, as pieces."""
  length = struct.pack("<Q", sum(map(len, parts)))
  return [length, _FOOTER.pack(masked_crc32c(length)), *parts,
          _FOOTER.pack(masked_crc32c(*parts))]


def index_path(shard_path: str | os.PathLike) -> files.Path:
  shard_path = files.as_path(shard_path)
  return shard_path.with_name(shard_path.name + INDEX_SUFFIX)


class ShardWriter:
  """Writes one shard and its index atomically (`files.AtomicFile`); `commit` publishes them.

  Until `commit` neither final file exists, so an interrupted conversion leaves no shard that
  looks complete. The index is published first: a shard file without its index is never valid.
  Works on local paths and on `gs://` / `s3://` URLs.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = files.as_path(path)
    self._file = files.AtomicFile(self.path)
    self._sha256 = hashlib.sha256()
    self._index: list[tuple[int, int]] = []
    self._offset = 0

  def write(self, *parts: bytes) -> None:
    """Appends one record whose data is the concatenation of `parts` (never joined in memory)."""
    size = 0
    for part in frame_record(*parts):
      self._file.write(part)
      self._sha256.update(part)
      size += len(part)
    self._index.append((self._offset, size))
    self._offset += size

  def commit(self) -> dict:
    """Closes, renames into place and returns `{num_records, num_bytes, sha256}`."""
    index_text = "".join(f"{offset} {size}\n" for offset, size in self._index)
    files.atomic_write(index_path(self.path), index_text)
    self._file.commit()
    return {"num_records": len(self._index), "num_bytes": self._offset,
            "sha256": self._sha256.hexdigest()}

  def abort(self) -> None:
    self._file.abort()

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()


def read_index(shard_path: str | os.PathLike) -> np.ndarray:
  """(num_records, 2) int64 array of (offset, size) from the shard's index file.

  Checks that the records tile the shard exactly, so a truncated shard or a stale index is an
  error naming the file.
  """
  shard_path = files.as_path(shard_path)
  path = index_path(shard_path)
  try:
    text = path.read_bytes().decode("ascii")
  except OSError as error:
    raise FileNotFoundError(f"index file {path} of shard {shard_path} cannot be read: {error}"
                            ) from error
  try:
    index = np.array([line.split() for line in text.splitlines()], np.int64).reshape(-1, 2)
  except ValueError as error:
    raise RecordCorruptError(f"index file {path} is malformed: {error}") from error
  ends = index[:, 0] + index[:, 1]
  file_size = files.file_size(shard_path)
  expected_offsets = np.concatenate([[0], ends[:-1]])
  if (not np.array_equal(index[:, 0], expected_offsets) or (index[:, 1] < FRAMING_BYTES).any()
      or (ends[-1] if len(ends) else 0) != file_size):
    raise RecordCorruptError(
        f"index file {path} does not match shard {shard_path} ({file_size} bytes): the shard is "
        "truncated or the index is stale; re-run the conversion")
  return index


RecordFile = int | BinaryIO  # a local file descriptor, or an object-store file (seek + read)


def open_record_file(path: str | os.PathLike) -> RecordFile:
  """A handle for `read_record`: a descriptor (local, read with `os.pread`) or a file object."""
  if files.is_url(path):
    return files.as_path(path).open("rb")
  return os.open(path, os.O_RDONLY)


def close_record_file(file: RecordFile) -> None:
  if isinstance(file, int):
    os.close(file)
  else:
    file.close()


def _pread(file: RecordFile, size: int, offset: int) -> bytes:
  """`size` bytes at `offset`; a file object is shared, so callers serialise its seek + read."""
  if isinstance(file, int):
    return os.pread(file, size, offset)
  file.seek(offset)
  return file.read(size)


def read_record(fd: RecordFile, path: str | os.PathLike, offset: int,
                size: int | None = None) -> bytes:
  """Reads the record framed at `offset` of an open file and verifies both CRCs.

  `fd` comes from `open_record_file`. `size` (from the index) is the expected frame size. Raises
  `RecordCorruptError` naming the file and the offset when the framing or a checksum is wrong.
  """
  header = _pread(fd, _HEADER.size, offset)
  if len(header) < _HEADER.size:
    raise RecordCorruptError(f"{path}: record at byte offset {offset} is truncated")
  length, length_crc = _HEADER.unpack(header)
  if masked_crc32c(header[:8]) != length_crc:
    raise RecordCorruptError(f"{path}: length CRC mismatch in record at byte offset {offset}")
  if size is not None and length + FRAMING_BYTES != size:
    raise RecordCorruptError(
        f"{path}: record at byte offset {offset} has length {length}, but the index gives a "
        f"{size}-byte frame")
  data = _pread(fd, length, offset + _HEADER.size)
  footer = _pread(fd, _FOOTER.size, offset + _HEADER.size + length)
  if len(data) < length or len(footer) < _FOOTER.size:
    raise RecordCorruptError(f"{path}: record at byte offset {offset} is truncated")
  if masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
    raise RecordCorruptError(f"{path}: data CRC mismatch in record at byte offset {offset}")
  return data


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
  """(offset, data) of every record of a TFRecord file, scanned from the start, CRC-checked."""
  file_size = files.file_size(path)
  file = open_record_file(path)
  try:
    offset = 0
    while offset < file_size:
      data = read_record(file, path, offset)
      yield offset, data
      offset += len(data) + FRAMING_BYTES
  finally:
    close_record_file(file)


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with files.as_path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()
