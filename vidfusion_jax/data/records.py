"""The `tf.train.Example` record format: one clip of K consecutive frames of every stream.

Each stream is a list of K byte strings, one per frame: a PNG file (`png`, lossless; gray when the
three channels are equal) or the frame's raw uint8 pixels in (H, W, 3) row-major order (`raw`).
One item per frame lets a reader decode only the frames of the temporal window it needs.
Records are written in the protobuf wire format directly (the bytes tensorflow-datasets'
`ExampleSerializer` gives, checked by tests/test_data.py), as pieces that are framed and written
without copying the frames, and parsed with the `tf.train.Example` proto class tfds ships (its NumPy
`ExampleParserNp` would copy every frame of every stream out of the proto); TensorFlow itself is
never imported, and tfds only when a record is parsed.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import threading
import zlib
from typing import Mapping, Sequence

import numpy as np

from vidfusion_jax import frames as frames_lib

# Degraded inputs (lq) and clean targets (gt) of both modalities, in a fixed order.
STREAMS = ("lq_ir", "lq_vis", "gt_ir", "gt_vis")
ENCODINGS = ("png", "raw")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY, _PNG_RGB = 0, 2  # IHDR colour types
_HEADER_FEATURES = {"sequence": ((), np.object_), "first_frame": ((), np.int64),
                    "num_frames": ((), np.int64), "height": ((), np.int64),
                    "width": ((), np.int64), "frame_encoding": ((), np.object_)}


def feature_spec(streams: Sequence[str], clip_length: int) -> dict[str, dict]:
  """The feature spec as `tf.io.FixedLenFeature` arguments: {name: {"shape", "dtype"}}."""
  features = dict(_HEADER_FEATURES) | {stream: ((clip_length,), np.object_) for stream in streams}
  return {name: {"shape": list(shape), "dtype": "string" if dtype == np.object_ else "int64"}
          for name, (shape, dtype) in features.items()}


def _varint(value: int) -> bytes:
  """Protobuf's base-128 varint; a negative int64 as its 64-bit two's complement."""
  value &= 0xFFFFFFFFFFFFFFFF
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _delimited(field: int, parts: list[bytes]) -> list[bytes]:
  """Protobuf field `field` of wire type 2 (length-delimited) holding the bytes of `parts`."""
  return [_varint(field << 3 | 2), _varint(sum(map(len, parts))), *parts]


def _feature(values: Sequence[bytes] | Sequence[int], is_bytes: bool) -> list[bytes]:
  """A `tf.train.Feature`: a BytesList (field 1) or a packed Int64List (field 3)."""
  if is_bytes:
    return _delimited(1, [part for value in values for part in _delimited(1, [value])])
  return _delimited(3, _delimited(1, [b"".join(map(_varint, values))]))


_TFDS_IMPORT_LOCK = threading.Lock()


@functools.cache
def _example_class():
  """tfds's `tf.train.Example` proto class, imported on first use: importing tfds takes ~0.2 s,
  which the conversion workers, which only write records, do not pay.

  One thread at a time: Grain's prefetch threads parse records concurrently, and two threads in
  tfds's lazy imports at once can deadlock on Python 3.11 (seen in a Grain worker: one thread
  importing tfds waited for `functools.cached_property`'s lock, shared by every etils
  `LazyModule`, which the other held while it waited for tfds's import lock).
  """
  with _TFDS_IMPORT_LOCK:
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel
    return tf_example_pb2.Example


def _is_gray(frame: np.ndarray) -> bool:
  return bool(np.array_equal(frame[..., 0], frame[..., 1])
              and np.array_equal(frame[..., 1], frame[..., 2]))


def _encode_png(frame: np.ndarray, gray: bool | None = None) -> bytes:
  """PNG of an RGB frame; a frame with three equal channels (infrared) as a gray PNG.

  Lossless either way (decoding promotes gray to three equal channels), and a gray PNG is about
  3x smaller and 2x faster to decode. `gray`: `_is_gray(frame)` when the caller knows it.
  """
  gray = _is_gray(frame) if gray is None else gray
  return frames_lib.encode_png(frame[..., 0] if gray else frame)


def encode_frame(frame: np.ndarray, frame_encoding: str) -> bytes:
  """The stored bytes of one uint8 (H, W, 3) frame."""
  if frame_encoding == "png":
    return _encode_png(frame)
  return np.ascontiguousarray(frame).tobytes()


def _png_in_stored_layout(data: bytes) -> tuple[int, int] | None:
  """(height, width) of a PNG that is complete, intact and in the stored layout, else None.

  Checks every chunk's CRC, inflates the pixel data (zlib checks its own checksum) and checks its
  size and filter types: what a decoder would check, without unfiltering and colour conversion.
  An RGB PNG is in the stored layout when some pixel has unequal channels; PNG filters act on
  each channel alike, so that is visible in the filtered bytes. Anything unusual gives None.
  """
  if data[:8] != _PNG_SIGNATURE:
    return None
  header, idat, pos, kind = None, [], 8, b""
  while pos + 12 <= len(data) and kind != b"IEND":
    length, kind = struct.unpack_from(">I4s", data, pos)
    end = pos + 8 + length
    if end + 4 > len(data) or zlib.crc32(data[pos + 4:end]) != struct.unpack_from(
        ">I", data, end)[0]:
      return None
    if kind == b"IHDR" and length == 13:
      header = struct.unpack_from(">IIBBBBB", data, pos + 8)
    elif kind == b"IDAT":
      idat.append(data[pos + 8:end])
    pos = end + 4
  if header is None or kind != b"IEND":
    return None
  width, height, depth, colour, _, _, interlace = header
  if depth != 8 or colour not in (_PNG_GRAY, _PNG_RGB) or interlace:
    return None
  row = 1 + (3 if colour == _PNG_RGB else 1) * width
  stream = b"".join(idat)
  if colour == _PNG_RGB and _is_gray_rows(zlib.decompressobj().decompress(stream, 8 * row), row):
    return None  # a gray frame stored as RGB (infrared): re-encoded as gray
  try:
    pixels = zlib.decompress(stream)
  except zlib.error:
    return None
  if len(pixels) != height * row:
    return None
  rows = np.frombuffer(pixels, np.uint8).reshape(height, row)
  if (rows[:, 0] > 4).any() or (colour == _PNG_RGB and _is_gray_rows(pixels, row)):
    return None
  return height, width


def _is_gray_rows(pixels: bytes, row: int) -> bool:
  """Whether the whole RGB rows in filtered PNG pixel data have three equal channels."""
  rows = np.frombuffer(pixels[:len(pixels) // row * row], np.uint8).reshape(-1, row)
  return _is_gray(rows[:, 1:].reshape(len(rows), -1, 3))


def stored_png(data: bytes, name: str, size: tuple[int, int]) -> bytes:
  """The stored PNG of an image file's bytes, passed through unchanged when possible.

  An 8-bit PNG that already has the stored layout (gray for three equal channels, else RGB) and
  the sequence's `size` = (height, width) is returned as it is, verified but not encoded again;
  any other image is decoded (which names an unreadable file) and encoded.
  """
  if _png_in_stored_layout(data) == tuple(size):
    return data
  frame = frames_lib.decode_frame(data, name)
  if frame.shape[:2] != tuple(size):
    raise ValueError(f"frame size mismatch: {name} is {frame.shape[1]}x{frame.shape[0]}, "
                     f"expected {size[1]}x{size[0]}")
  gray = _is_gray(frame)
  is_png = data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR"
  if is_png and data[24] == 8 and data[25] == (_PNG_GRAY if gray else _PNG_RGB):
    return data
  return _encode_png(frame, gray)


@dataclasses.dataclass(frozen=True)
class Clip:
  """A parsed record: header fields and, per stream, the K encoded frames."""
  sequence: str
  first_frame: int
  num_frames: int
  height: int
  width: int
  frame_encoding: str
  encoded: Mapping[str, Sequence[bytes]]

  def decode(self, stream: str, start: int = 0, stop: int | None = None,
             crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Frames [start, stop) of a stream as uint8 (n, h, w, 3), optionally cropped.

    `crop` is (top, left, height, width). Raw frames are cropped before they are copied, PNG
    frames after decoding (PNG has no partial decoding).
    """
    stop = self.num_frames if stop is None else stop
    top, left, height, width = crop or (0, 0, self.height, self.width)
    out = np.empty((stop - start, height, width, 3), np.uint8)
    for i, item in enumerate(self.encoded[stream][start:stop]):
      name = f"{stream} frame {self.first_frame + start + i} of sequence {self.sequence}"
      if self.frame_encoding == "raw":
        if len(item) != self.height * self.width * 3:
          raise ValueError(f"{name}: {len(item)} raw bytes, expected "
                           f"{self.height}x{self.width}x3")
        frame = np.frombuffer(item, np.uint8).reshape(self.height, self.width, 3)
      else:
        frame = frames_lib.decode_frame(item, name)
        if frame.shape != (self.height, self.width, 3):
          raise ValueError(f"{name}: decoded shape {frame.shape}, expected "
                           f"{(self.height, self.width, 3)}")
      out[i] = frame[top:top + height, left:left + width]
    return out


class ClipCodec:
  """Serialises and parses clip records of a given set of streams and clip length."""

  def __init__(self, streams: Sequence[str], clip_length: int):
    unknown = set(streams) - set(STREAMS)
    if unknown or not streams:
      raise ValueError(f"streams must be a non-empty subset of {STREAMS}, got {list(streams)}")
    self.streams = tuple(s for s in STREAMS if s in streams)
    self.clip_length = clip_length

  def encode(self, sequence: str, first_frame: int, clip: Mapping[str, np.ndarray],
             frame_encoding: str) -> bytes:
    """Serialises a clip given as {stream: uint8 (K, H, W, 3)}."""
    if frame_encoding not in ENCODINGS:
      raise ValueError(f"frame_encoding must be one of {ENCODINGS}, got {frame_encoding!r}")
    shape = (self.clip_length,) + clip[self.streams[0]].shape[1:]
    for stream in self.streams:
      array = clip[stream]
      if array.dtype != np.uint8 or array.shape != shape or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"stream {stream} of clip {sequence}@{first_frame}: expected uint8 "
                         f"{shape} with 3 channels, got {array.dtype} {array.shape}")
    return self.serialize(sequence, first_frame, shape[1], shape[2], frame_encoding,
                          {s: [encode_frame(f, frame_encoding) for f in clip[s]]
                           for s in self.streams})

  def serialize(self, sequence: str, first_frame: int, height: int, width: int,
                frame_encoding: str, encoded: Mapping[str, Sequence[bytes]]) -> bytes:
    """Serialises a clip whose K frames per stream are already encoded."""
    return b"".join(self.serialized_parts(sequence, first_frame, height, width, frame_encoding,
                                          encoded))

  def serialized_parts(self, sequence: str, first_frame: int, height: int, width: int,
                       frame_encoding: str, encoded: Mapping[str, Sequence[bytes]]) -> list[bytes]:
    """`serialize`'s bytes as pieces, the frames among them uncopied.

    The `tf.train.Example` of `feature_spec` as protobuf's deterministic serialisation writes it
    (the feature map in key order), which is what tfds's `ExampleSerializer` gives for it. Written
    directly because protobuf's serialiser copies every frame into one buffer, at ~30 ms per
    record of four 12-frame 640x480 streams.
    """
    for stream in self.streams:
      if len(encoded[stream]) != self.clip_length:
        raise ValueError(f"stream {stream} of clip {sequence}@{first_frame}: "
                         f"{len(encoded[stream])} frames, expected {self.clip_length}")
    header = {"sequence": sequence.encode(), "first_frame": first_frame,
              "num_frames": self.clip_length, "height": height, "width": width,
              "frame_encoding": frame_encoding.encode()}
    features = {name: _feature([header[name]], dtype == np.object_)
                for name, (_, dtype) in _HEADER_FEATURES.items()}
    features.update({stream: _feature(encoded[stream], True) for stream in self.streams})
    entries = [part for name in sorted(features, key=str.encode)
               for part in _delimited(1, _delimited(1, [name.encode()]) +
                                      _delimited(2, features[name]))]
    return _delimited(1, entries)

  def parse(self, data: bytes) -> Clip:
    """Parses a record; frames stay encoded, and are copied out of the proto only when used."""
    features = _example_class().FromString(data).features.feature
    missing = [name for name in (*_HEADER_FEATURES, *self.streams) if name not in features]
    if missing:
      raise ValueError(f"record lacks the features {missing}")
    header = {name: features[name].int64_list.value[0] if dtype == np.int64
              else features[name].bytes_list.value[0].decode()
              for name, (_, dtype) in _HEADER_FEATURES.items()}
    encoded = {s: features[s].bytes_list.value for s in self.streams}
    for stream, frames in encoded.items():
      if len(frames) != self.clip_length:
        raise ValueError(f"record of {header['sequence']}@{header['first_frame']}: stream "
                         f"{stream} has {len(frames)} frames, expected {self.clip_length}")
    return Clip(encoded=encoded, **header)
