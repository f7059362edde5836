"""Frame and video I/O shared by data conversion, inference and evaluation.

Frames are `uint8` RGB arrays of shape (H, W, 3). A "clip source" is either a folder of image
files (natural-sorted by name) or a video file. Images are decoded with OpenCV; videos are read and
written with imageio-ffmpeg (the `video` extra), which ships its own ffmpeg binary. Every path may
be a `gs://` or `s3://` URL; ffmpeg needs local files, so a video there is downloaded to a
temporary file before decoding, and written to one and uploaded when complete.
"""

from __future__ import annotations

import os
import re
import contextlib
import warnings
from typing import Iterator

import cv2
import numpy as np

from vidfusion_jax import files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


class FrameReadError(ValueError):
  """An image or video that cannot be decoded; the message names the file."""


def natural_key(name: str) -> list[int | str]:
  """Sort key that orders `frame2` before `frame10`."""
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def is_video_file(path: str | os.PathLike) -> bool:
  path = files.as_path(path)
  return path.suffix.lower() in VIDEO_SUFFIXES and path.is_file()


def list_frame_files(folder: str | os.PathLike) -> list[files.Path]:
  """Image files directly inside `folder`, natural-sorted by file name."""
  folder = files.as_path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a folder of frames")
  images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
  return sorted(images, key=lambda p: natural_key(p.name))


def decode_frame(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes an encoded image (PNG, JPEG, ...) to uint8 RGB (H, W, 3)."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise FrameReadError(f"cannot decode image {name}: unreadable or truncated file")
  return to_rgb_uint8(image, name, bgr=True)


def to_rgb_uint8(image: np.ndarray, name: str = "<array>", bgr: bool = False) -> np.ndarray:
  """Gray, gray+alpha, RGB or RGBA (uint8 or uint16) to uint8 RGB (H, W, 3)."""
  if image.dtype == np.uint16:
    image = (image.astype(np.uint32) * 255 + 32767) // 65535
  elif image.dtype != np.uint8:
    raise FrameReadError(f"{name}: unsupported pixel type {image.dtype}; expected 8- or 16-bit")
  image = image.astype(np.uint8, copy=False)
  if image.ndim == 2:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
  channels = image.shape[-1]
  if channels in (1, 2):
    return np.ascontiguousarray(np.repeat(image[..., :1], 3, axis=-1))
  if channels in (3, 4) and bgr:
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGB)
  if channels in (3, 4):
    return np.ascontiguousarray(image[..., :3])
  raise FrameReadError(f"{name}: unsupported channel count {channels}")


def read_frame(path: str | os.PathLike) -> np.ndarray:
  """Reads one image file as uint8 RGB (H, W, 3); gray images get 3 equal channels."""
  path = files.as_path(path)
  try:
    data = path.read_bytes()
  except OSError as error:
    raise FrameReadError(f"cannot read image {path}: {error}") from error
  return decode_frame(data, str(path))


def encode_png(rgb: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 RGB (or gray) frame."""
  rgb = np.asarray(rgb)
  if rgb.dtype != np.uint8:
    raise ValueError(f"encode_png expects uint8 pixels, got {rgb.dtype}")
  image = rgb[..., ::-1] if rgb.ndim == 3 else rgb
  ok, buffer = cv2.imencode(".png", np.ascontiguousarray(image))
  if not ok:
    raise ValueError(f"PNG encoding failed for an array of shape {rgb.shape}")
  return buffer.tobytes()


def to_uint8(frames: np.ndarray, *, max_value: float = 1.0, stretch: bool = False) -> np.ndarray:
  """Pixel values to uint8: scaled so that `max_value` becomes 255, clipped, rounded half to even.

  uint8 input passes through unchanged. With `stretch`, each frame (the last three axes, H, W, C)
  is instead min-max stretched to [0, 255], uint8 input included. The one conversion behind saved
  fused frames and evaluation images (values in [0, 1]) and the synthetic degradations (in
  [0, 255]).
  """
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    if not stretch:
      return frames
    frames, max_value = frames.astype(np.float32) / 255.0, 1.0
  frames = frames.astype(np.float32)
  if stretch:
    axes = (-3, -2, -1)
    low = frames.min(axis=axes, keepdims=True)
    high = frames.max(axis=axes, keepdims=True)
    frames = (frames - low) / np.maximum(high - low, np.finfo(np.float32).tiny)
    max_value = 1.0
  return np.rint(np.clip(frames * np.float32(255.0 / max_value), 0.0, 255.0)).astype(np.uint8)


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
  """Creates `folder` and writes (then removes) a probe file in it the way outputs are written,
  so that a read-only or full output folder fails before any compute."""
  probe = files.as_path(folder) / ".write-probe"
  try:
    files.atomic_write(probe, b"probe")
    probe.unlink()
  except OSError as error:
    raise OSError(error.errno, f"{what} {folder} is not writable ({error.strerror or error}); "
                  "choose another folder or make it writable") from error


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
  """Writes a uint8 RGB frame as PNG, atomically (no half-written file on interruption)."""
  files.atomic_write(path, encode_png(rgb))


def _imageio_ffmpeg():
  try:
    import imageio_ffmpeg  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("video files need the `video` extra: pip install 'vidfusion-jax[video]'"
                      ) from error
  return imageio_ffmpeg


@contextlib.contextmanager
def _spawning_ffmpeg():
  """ffmpeg runs as fork+exec of a separate program, which JAX's fork warning does not concern."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    yield


def iter_video_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
  """Decodes a video file frame by frame as uint8 RGB (H, W, 3)."""
  path = files.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"video file {path} does not exist")
  with files.local_copy(path) as local:
    reader = _imageio_ffmpeg().read_frames(str(local), pix_fmt="rgb24")
    try:
      with _spawning_ffmpeg():
        meta = next(reader)
    except (RuntimeError, OSError, StopIteration) as error:
      raise FrameReadError(f"cannot decode video {path}: {error}") from error
    width, height = meta["size"]
    try:
      for raw in reader:
        yield np.frombuffer(raw, np.uint8).reshape(height, width, 3)
    except RuntimeError as error:
      raise FrameReadError(f"cannot decode video {path}: {error}") from error
    finally:
      reader.close()


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
  """Frames of a frame folder or a video file, in order, as uint8 RGB (H, W, 3)."""
  path = files.as_path(path)
  if path.is_dir():
    images = list_frame_files(path)
    if not images:
      raise FrameReadError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return (read_frame(f) for f in images)
  if is_video_file(path):
    return iter_video_frames(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  raise FrameReadError(
      f"{path} is neither a folder of frames nor a video file ({', '.join(VIDEO_SUFFIXES)})")


def count_frames(path: str | os.PathLike) -> int:
  """Number of frames of a frame folder or a video file (exact: videos are decoded)."""
  path = files.as_path(path)
  if path.is_dir():
    return len(list_frame_files(path))
  if is_video_file(path):
    with files.local_copy(path) as local, _spawning_ffmpeg():
      frames, _ = _imageio_ffmpeg().count_frames_and_secs(str(local))
    return frames
  return sum(1 for _ in iter_frames(path))


class VideoWriter:
  """Writes uint8 RGB frames to an H.264 mp4, atomically on close.

  Odd frame sizes are padded by one replicated row/column (yuv420p needs even sizes). For a
  `gs://` / `s3://` path ffmpeg writes a local temporary file, uploaded on close.
  """

  def __init__(self, path: str | os.PathLike, fps: float = 30.0, quality: int = 8):
    self.path = files.as_path(path)
    self.fps = fps
    self.quality = quality
    self._upload = contextlib.ExitStack()
    self._tmp = None
    self._writer = None
    self._size = None

  def __enter__(self) -> "VideoWriter":
    return self

  def write(self, rgb: np.ndarray) -> None:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
      raise ValueError(f"VideoWriter expects uint8 (H, W, 3) frames, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    if self._writer is None:
      self._size = (height, width)
      self.path.parent.mkdir(parents=True, exist_ok=True)
      local = self._upload.enter_context(files.local_output(self.path))
      self._tmp = local.with_name(f".{local.stem}.partial{local.suffix}")
      self._writer = _imageio_ffmpeg().write_frames(
          str(self._tmp), (width + width % 2, height + height % 2), fps=self.fps,
          codec="libx264", pix_fmt_out="yuv420p", quality=self.quality, macro_block_size=1)
      with _spawning_ffmpeg():
        self._writer.send(None)
    elif (height, width) != self._size:
      raise ValueError(f"frame size {(height, width)} differs from the first frame's {self._size}")
    rgb = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    self._writer.send(np.ascontiguousarray(rgb))

  def close(self) -> None:
    if self._writer is None:
      raise ValueError(f"no frames were written to {self.path}")
    self._writer.close()
    self._writer = None
    os.replace(self._tmp, self._tmp.with_name(self.path.name))
    self._upload.close()  # uploads the local file to an object store

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    elif self._writer is not None:
      self._writer.close()
      self._writer = None
      self._tmp.unlink(missing_ok=True)
      self._upload.__exit__(exc_type, exc, tb)
