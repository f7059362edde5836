"""Pluggable dense optical flow for the temporal metrics.

A flow backend is any callable `flow(frame_a, frame_b) -> (H, W, 2)` float array that, for every
pixel x of `frame_a`, gives the displacement (dx, dy) to its match in `frame_b`:
frame_a(x) ~ frame_b(x + flow(x)). That is the field needed to pull `frame_b` onto the grid of
`frame_a` by backward warping. Frames are (H, W) or (H, W, C) arrays on the 0-255 scale. Give the
callable a `name` attribute: reports state which backend produced a temporal number.

Built in: "farneback" (OpenCV's classical dense flow, no weights; the default), "zero" (the
identity field, for tests and for a warp-free frame difference) and "sea_raft:CKPT[:S|M|L]" (the
Flax SEA-RAFT with an official PyTorch checkpoint, the network of the published VF-Bench, VideoFusion
and TemCoCo numbers). Any other network plugs in as a callable, or from the command line as
"package.module:factory", where `factory()` returns the callable.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Protocol, runtime_checkable

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax.models import schedule as schedule_lib


@runtime_checkable
class FlowBackend(Protocol):
  """flow(frame_a, frame_b) -> (H, W, 2) float32 displacements (dx, dy) from a to b."""

  def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    ...


def _gray_uint8(frame: np.ndarray) -> np.ndarray:
  frame = np.asarray(frame)
  if frame.ndim == 3:
    frame = frame[..., 0] if frame.shape[-1] == 1 else cv2.cvtColor(
        np.asarray(frame, np.float32), cv2.COLOR_RGB2GRAY)
  return np.clip(np.round(frame), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class FarnebackFlow:
  """OpenCV `calcOpticalFlowFarneback` on the gray frames, with OpenCV's usual settings."""

  pyr_scale: float = 0.5
  levels: int = 3
  winsize: int = 15
  iterations: int = 3
  poly_n: int = 5
  poly_sigma: float = 1.2
  name: str = "farneback"

  def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    gray_a, gray_b = _gray_uint8(frame_a), _gray_uint8(frame_b)
    if np.array_equal(gray_a, gray_b):
      # Farneback leaves ~1e-3 px of numerical motion on identical frames; there is none.
      return np.zeros(gray_a.shape + (2,), np.float32)
    return cv2.calcOpticalFlowFarneback(gray_a, gray_b, None, self.pyr_scale, self.levels,
                                        self.winsize, self.iterations, self.poly_n,
                                        self.poly_sigma, 0)


@dataclasses.dataclass(frozen=True)
class ZeroFlow:
  """The identity field: warping becomes a plain frame difference."""

  name: str = "zero"

  def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    del frame_b
    return np.zeros(np.shape(frame_a)[:2] + (2,), np.float32)


class SeaRaftFlow:
  """SEA-RAFT flow. `batched(a, b)` maps (N, H, W, 3) arrays on 0-255 to (N, H, W, 2) in one jitted
  call (compiled once per shape); calling it on two frames gives one (H, W, 2) field, gray frames
  ((H, W) or one channel) stacked to RGB as VF-Bench does; on (N, H, W, 3) it is `batched`. `pair_flows` computes many pairs
  among a set of frames with each frame's features computed once."""

  def __init__(self, module, params, name: str = "sea_raft"):
    self.module, self.params, self.name = module, params, name
    options = schedule_lib.compiler_options()
    self._apply = jax.jit(lambda p, a, b: module.apply({"params": p}, a, b)["flow"],
                          compiler_options=options)
    self._features = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.features),
                             compiler_options=options)
    self._apply_features = jax.jit(lambda p, a, b, fa, fb: module.apply(
        {"params": p}, a, b, fmap1=fa, fmap2=fb)["flow"], compiler_options=options)

  def pair_flows(self, frames: np.ndarray, index_a: np.ndarray, index_b: np.ndarray,
                 batch_size: int) -> np.ndarray:
    """flow(frames[index_a[i]], frames[index_b[i]]) for every i, (N, H, W, 2) float32.

    The feature encoder runs once per frame; calls hold `batch_size` frames or pairs (the last
    padded to full size, so each jitted function compiles once).
    """
    pad = lambda x: np.concatenate([x, x[-1:].repeat(-len(x) % batch_size, 0)])
    frames = jnp.asarray(pad(np.asarray(frames, np.float32)))
    features = jnp.concatenate([self._features(self.params, frames[i:i + batch_size])
                                for i in range(0, len(frames), batch_size)])
    count = len(index_a)
    index_a, index_b = pad(np.asarray(index_a)), pad(np.asarray(index_b))
    flows = [np.asarray(self._apply_features(self.params, frames[a], frames[b], features[a],
                                             features[b]))
             for a, b in ((index_a[i:i + batch_size], index_b[i:i + batch_size])
                          for i in range(0, len(index_a), batch_size))]
    return np.concatenate(flows)[:count]

  @classmethod
  def from_checkpoint(cls, path: str, variant: str | None = None, dtype=None) -> "SeaRaftFlow":
    from vidfusion_jax.models import sea_raft  # pylint: disable=import-outside-toplevel
    module, params = sea_raft.load(path, variant, dtype)
    suffix = f":{variant}" if variant else ""
    return cls(module, params, f"sea_raft:{pathlib.PurePath(path).name}{suffix}")

  def batched(self, frames_a: np.ndarray, frames_b: np.ndarray) -> np.ndarray:
    a, b = (jnp.asarray(x, jnp.float32) for x in (frames_a, frames_b))
    return np.asarray(self._apply(self.params, a, b), np.float32)

  def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    if np.ndim(frame_a) == 4:
      return self.batched(frame_a, frame_b)
    rgb = lambda x: np.broadcast_to(np.asarray(x, np.float32).reshape(
        np.shape(x)[:2] + (-1,)), np.shape(x)[:2] + (3,))[None]
    return self.batched(rgb(frame_a), rgb(frame_b))[0]


FLOW_BACKENDS = {"farneback": FarnebackFlow, "zero": ZeroFlow}
SEA_RAFT_PREFIX = "sea_raft:"


def parse_sea_raft_spec(spec: str) -> tuple[str, str | None]:
  """"sea_raft:CKPT[:variant]" -> (CKPT, variant or None)."""
  from vidfusion_jax.models import sea_raft  # pylint: disable=import-outside-toplevel
  path, _, variant = spec.removeprefix(SEA_RAFT_PREFIX).rpartition(":")
  if not path or variant not in sea_raft.VARIANTS:
    path, variant = spec.removeprefix(SEA_RAFT_PREFIX), None
  if not path:
    raise ValueError(f"{spec!r}: give the checkpoint path, e.g. "
                     "sea_raft:Tartan-C-T-TSKH-spring540x960-S.pth[:S]")
  return path, variant


def get_flow_backend(spec: str | FlowBackend) -> FlowBackend:
  """A flow callable from a built-in name, a "package.module:factory" string, or a callable."""
  if callable(spec):
    return spec
  if spec in FLOW_BACKENDS:
    return FLOW_BACKENDS[spec]()
  if spec.startswith(SEA_RAFT_PREFIX):
    path, variant = parse_sea_raft_spec(spec)
    if not pathlib.Path(path).is_file():
      raise ValueError(f"SEA-RAFT checkpoint {path!r} not found (nothing is downloaded: get e.g. "
                       "Tartan-C-T-TSKH-spring540x960-S.pth from the SEA-RAFT release)")
    return SeaRaftFlow.from_checkpoint(path, variant)
  if ":" in spec:
    module_name, _, attr = spec.partition(":")
    try:
      factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
      raise ValueError(f"cannot load flow backend {spec!r}: {error}") from error
    return factory()
  raise ValueError(f"unknown flow backend {spec!r}: use one of {sorted(FLOW_BACKENDS)}, "
                   "'sea_raft:CKPT[:S|M|L]' or 'package.module:factory' returning a "
                   "flow(frame_a, frame_b) callable")


def backend_name(flow: FlowBackend) -> str:
  """The name reports give a backend: its `name` attribute, else its type's name."""
  return str(getattr(flow, "name", type(flow).__name__))
