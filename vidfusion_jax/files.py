"""Paths on local disks and object stores, and the one atomic writer.

Every path a user gives may be a local path or a `gs://` / `s3://` URL. `as_path` turns it into a
`pathlib.Path` (local: exactly the old behaviour) or an `etils.epath.Path` (URLs, read and written
through fsspec's gcsfs / s3fs from the `cloud` extra). `pathlib.Path("gs://b/x")` would be the
local folder `gs:/b/x`, so no module builds user paths with `pathlib` directly.

Object stores publish an object only when its upload completes, so a write there is atomic by
itself; on local disks `AtomicFile` writes a temporary file beside the target and renames it.
Programs that need a local file (ffmpeg) get one from `local_copy` / `local_output`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
import tempfile
from typing import IO, Iterator, Union

from etils import epath
from etils.epath import backend as epath_backend

URL_SCHEMES = ("gs://", "s3://")
Path = Union[pathlib.Path, epath.Path]


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` names an object-store location (`gs://`, `s3://`) rather than a local one."""
  return os.fspath(path).startswith(URL_SCHEMES)


def as_path(path: str | os.PathLike) -> Path:
  """`epath.Path` for a `gs://` / `s3://` URL, `pathlib.Path` otherwise."""
  if is_url(path):
    return epath.Path(os.fspath(path))
  return pathlib.Path(path)


def absolute(path: str | os.PathLike) -> Path:
  """`as_path(path)`, made absolute when local (URLs are absolute already)."""
  path = as_path(path)
  return path if is_url(path) else path.absolute()


def file_size(path: str | os.PathLike) -> int:
  """Size in bytes of a local file or an object."""
  path = as_path(path)
  return path.stat().length if is_url(path) else path.stat().st_size


def refresh(path: str | os.PathLike) -> None:
  """Forgets cached listings of `path`'s object store, to see what other processes wrote since.

  fsspec caches every folder listing for the life of the process; a local path needs nothing.
  """
  if is_url(path):
    epath_backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()


class AtomicFile:
  """A file opened for writing that appears at `path` complete, or not at all.

  Local: written under a temporary name beside `path`, flushed to disk and renamed into place
  by `commit`. Object store: written straight to the object, which the store publishes only when
  `commit` completes the upload; `abort` cancels the upload. As a context manager it commits on
  success and aborts on an exception.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = as_path(path)
    if is_url(self.path):
      self._tmp = None
      self.file: IO[bytes] = self.path.open("wb")
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._tmp = self.path.with_name(
          f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
      self.file = open(self._tmp, "xb")  # pylint: disable=consider-using-with

  def write(self, data: bytes) -> int:
    return self.file.write(data)

  def commit(self) -> None:
    if self._tmp is None:
      self.file.close()
      return
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    if self._tmp is None:
      self.file.closed = True  # closing would publish the partial object
      with contextlib.suppress(Exception):  # an unfinished upload is never published anyway
        getattr(self.file, "discard", lambda: None)()  # fsspec: cancel the multipart upload
      return
    self.file.close()
    self._tmp.unlink(missing_ok=True)

  def __enter__(self) -> "AtomicFile":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.abort()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` (text as UTF-8) to `path` atomically (see `AtomicFile`)."""
  with AtomicFile(path) as f:
    f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """A local file holding the contents of `path`: the file itself, or a temporary download."""
  path = as_path(path)
  if not is_url(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="vidfusion-") as folder:
    local = pathlib.Path(folder) / path.name
    with path.open("rb") as source, open(local, "wb") as target:
      shutil.copyfileobj(source, target, 1 << 22)
    yield local


@contextlib.contextmanager
def local_output(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """A local file path to write; for a URL a temporary file uploaded to `path` on success."""
  path = as_path(path)
  if not is_url(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="vidfusion-") as folder:
    local = pathlib.Path(folder) / path.name
    yield local
    with open(local, "rb") as source, AtomicFile(path) as target:
      shutil.copyfileobj(source, target.file, 1 << 22)
