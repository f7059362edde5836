"""Fusing whole videos with a trained network: model directories, padding, windows, blending.

A video of any length is cut into temporal windows of `window` frames that overlap by `overlap`
frames (the last window is shifted back to end on the last frame, as the reference test code
does), several windows go to the device per call, and the overlapping outputs are blended. Frames
of any size are reflect-padded at the bottom/right to the network's spatial multiple and cropped
back. Everything streams: memory is bounded by the windows in flight, not by the video length.

The model directory written by `python -m vidfusion_jax.export` is read here (`read_manifest`,
`read_params`, `read_exported`), so running a model needs only this module.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax import traverse_util

import vidfusion_jax
from vidfusion_jax import files
from vidfusion_jax import host_memory
from vidfusion_jax.models import schedule as schedule_lib

MANIFEST_FILE = "manifest.json"
PARAMS_FILE = "params.msgpack"
EXPORTED_FILE = "fusion.jax_export"
FORMAT_NAME = "vidfusion-jax-model"
FORMAT_VERSION = 1
BLEND_MODES = ("linear", "last")

Params = Mapping[str, Any]
# (params, ir, vis) -> fusion; ir, vis float32 (B, T, H, W, 3) in [0, 1], fusion float32 likewise.
InferFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What a network accepts: H and W multiples of `spatial_multiple`, at least `min_frames`."""
  spatial_multiple: int
  min_frames: int


@dataclasses.dataclass(frozen=True)
class WindowSettings:
  """Temporal windowing: window length, overlap, blending of overlaps, frame stretch on save."""
  window: int
  overlap: int
  blend: str = "linear"
  stretch: bool = False


# Defaults of `fuse` (blended windows) and the official test procedures (specs/videofusion.md 9,
# specs/temcoco.md (c)): later windows overwrite shared frames; VideoFusion stretches each frame.
DEFAULT_WINDOWS = {"videofusion": WindowSettings(7, 2), "temcoco": WindowSettings(30, 5)}
REFERENCE_WINDOWS = {
    "videofusion": WindowSettings(7, 0, "last", stretch=True),
    "temcoco": WindowSettings(30, 5, "last", stretch=False),
}


class ModelDirError(ValueError):
  """A model directory that is missing, incomplete or from an incompatible version."""


def input_spec(module: Any) -> InputSpec:
  """The size rules a model class declares (`spatial_multiple`, `min_frames` class attributes)."""
  try:
    return InputSpec(int(module.spatial_multiple), int(module.min_frames))
  except AttributeError as error:
    raise ValueError(f"{type(module).__name__} does not declare its input size rules: give it "
                     "`spatial_multiple` and `min_frames` class attributes") from error


def build_model(model_name: str, model_config: Mapping[str, Any], dtype: str = "float32",
                schedule: str | None = None):
  """The flax module of a registered model; `dtype` is the compute dtype (params stay float32).

  `schedule` (`models.schedule`) is set on models that have one; None keeps the model's default.
  """
  from vidfusion_jax import models  # pylint: disable=import-outside-toplevel
  overrides = {} if dtype == "float32" else {"dtype": jnp.dtype(dtype)}
  module = models.from_reference_config(model_name, dict(model_config), **overrides)
  if schedule is not None and "schedule" in module.__dataclass_fields__:
    module = module.clone(schedule=schedule)
  return module


@functools.cache
def make_infer_fn(module: Any) -> InferFn:
  """`(params, ir, vis) -> fusion` in float32; params of any float dtype are upcast first.

  Cached per (hashable, immutable) module, so fusers of one model share compiled steps.
  """

  def infer(params: Params, ir: jax.Array, vis: jax.Array) -> jax.Array:
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return module.apply({"params": params}, ir, vis)["fusion"].astype(jnp.float32)

  return infer


# ----------------------------------------------------------------------------------------------
# Model directories.


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
  """The manifest of an exported model directory, checked for completeness and version."""
  model_dir = files.as_path(model_dir)
  redo = ("re-export it with `python -m vidfusion_jax.export --workdir=... --output=...` or "
          "`--from-torch=...`")
  path = model_dir / MANIFEST_FILE
  if not model_dir.is_dir():
    raise ModelDirError(f"model directory {model_dir} does not exist; {redo}")
  if not path.is_file():
    raise ModelDirError(f"{model_dir} has no {MANIFEST_FILE}: it is not an exported model or "
                        f"its export did not finish; {redo}")
  try:
    manifest = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ModelDirError(f"{path} is not valid JSON ({error}); {redo}") from error
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
    raise ModelDirError(f"{path} is not a {FORMAT_NAME} manifest; {redo}")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ModelDirError(
        f"{model_dir} has format version {version}, this vidfusion-jax "
        f"({vidfusion_jax.__version__}) reads version {FORMAT_VERSION}; use the vidfusion-jax "
        f"version named in the manifest ({manifest.get('versions', {}).get('vidfusion_jax')}) "
        f"or {redo}")
  for name in (manifest["params"]["file"], manifest["exported"]["file"]):
    if not (model_dir / name).is_file():
      raise ModelDirError(f"{model_dir} is incomplete: {name} is missing; {redo}")
  return manifest


def read_params(model_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> dict[str, Any]:
  """The stored params (numpy arrays), checked against the shapes listed in the manifest."""
  path = files.as_path(model_dir) / manifest["params"]["file"]
  try:
    params = serialization.msgpack_restore(path.read_bytes())
  except Exception as error:  # msgpack raises several unrelated types on corrupt input.
    raise ModelDirError(f"cannot decode {path} ({error}); re-export the model") from error
  found = {k: [list(v.shape), str(v.dtype)] for k, v in flatten_params(params).items()}
  if found != manifest["params"]["shapes"]:
    missing = sorted(set(manifest["params"]["shapes"]) ^ set(found))[:5]
    raise ModelDirError(f"{path} does not match its manifest (differing entries, e.g. "
                        f"{missing or 'shapes/dtypes'}); the directory was modified; re-export")
  return params


def read_exported(model_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> jax.export.Exported:
  """The serialized `jax.export` artifact of the inference function."""
  path = files.as_path(model_dir) / manifest["exported"]["file"]
  try:
    return jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception as error:  # deserialize raises various types for foreign/corrupt data.
    raise ModelDirError(
        f"cannot load the exported function {path} with jax {jax.__version__} ({error}); it was "
        f"written by jax {manifest['versions']['jax']}: use `--backend=model` or re-export"
    ) from error


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """`{"a/b/kernel": leaf}` view of a nested param dict."""
  return traverse_util.flatten_dict(params, sep="/")


# ----------------------------------------------------------------------------------------------
# Windows.


def iter_windows(window: int, overlap: int,
                 available: Callable[[int], int]) -> Iterator[tuple[int, int]]:
  """The windows of `plan_windows`, lazily; `available(k)` is min(k, number of frames).

  Asking `available` lazily lets the same plan run over streams of unknown length: before yielding
  a window it asks for at most one stride past the previous window's end.
  """
  stride = window - overlap
  start = covered = 0
  while True:
    stop = available(start + window)
    if stop == start + window:
      yield start, stop
      covered, start = stop, start + stride
    else:
      if stop > covered:
        yield max(stop - window, 0), stop
      return


def plan_windows(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
  """Windows `(start, stop)` covering `num_frames` frames.

  Starts advance by `window - overlap`; the last window is shifted back to end on the last frame
  (so every window but a single short one has `window` frames). Example: 20 frames, window 7,
  overlap 0 -> (0, 7), (7, 14), (13, 20), the reference test split.
  """
  check_window(window, overlap)
  return list(iter_windows(window, overlap, lambda k: min(k, num_frames)))


def check_window(window: int, overlap: int, min_frames: int = 1) -> None:
  """Raises ValueError unless `min_frames <= window` and `0 <= overlap < window`."""
  if window < max(min_frames, 1) or not 0 <= overlap < window:
    raise ValueError(f"need window >= {max(min_frames, 1)} and 0 <= overlap < window, got "
                     f"window={window}, overlap={overlap}")


def blend_weights(length: int, overlap: int) -> np.ndarray:
  """Per-frame weights of one window: linear ramps over `overlap` frames at both ends.

  Outputs are divided by the summed weights, so frames seen by one window keep weight 1.
  """
  position = np.arange(length, dtype=np.float32)
  ramp = np.minimum(position + 1, length - position) / (overlap + 1)
  return np.minimum(ramp, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Frames.


def as_rgb_frame(frame: Any) -> np.ndarray:
  """A frame as (H, W, 3): uint8 stays uint8 (0..255), anything else becomes float32 (0..1)."""
  frame = np.asarray(frame)
  if frame.ndim == 3 and frame.shape[-1] == 1:
    frame = frame[..., 0]
  if frame.ndim == 2:
    frame = np.repeat(frame[..., None], 3, axis=-1)
  if frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(f"a frame must be (H, W), (H, W, 1) or (H, W, 3), got shape {frame.shape}")
  return frame if frame.dtype == np.uint8 else frame.astype(np.float32)


def as_frame_sequence(frames: Any) -> np.ndarray:
  """(T, H, W, 3), (T, H, W, 1) or gray (T, H, W) arrays as a sequence of frames."""
  frames = np.asarray(frames)
  if frames.ndim not in (3, 4):
    raise ValueError(f"expected frames (T, H, W[, C]), got shape {frames.shape}")
  return frames


def _pad_frame(frame: np.ndarray, multiple: int) -> np.ndarray:
  height, width = frame.shape[:2]
  pad = ((0, -height % multiple), (0, -width % multiple), (0, 0))
  return np.pad(frame, pad, mode="reflect") if any(p[1] for p in pad) else frame


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
  shrink = height * width < frame.shape[0] * frame.shape[1]
  return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA if shrink
                    else cv2.INTER_LINEAR)


def _to_unit_float(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _compile_step(infer_fn: InferFn, treedef: Any, specs: tuple[Any, ...]) -> jax.stages.Compiled:
  """`infer_fn` on uint8 or float inputs (converted on the device), compiled for one signature."""
  step = jax.jit(lambda p, ir, vis: infer_fn(p, _to_unit_float(ir), _to_unit_float(vis)),
                 compiler_options=schedule_lib.compiler_options())
  args = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                                      for shape, dtype, sharding in specs])
  compiled = step.lower(*args).compile()
  host_memory.release_freed_memory()
  return compiled


def _run_step(infer_fn: InferFn, params: Params, ir: np.ndarray, vis: np.ndarray) -> jax.Array:
  """Runs `infer_fn` compiled ahead of time, so compiler memory is released before it runs."""
  leaves, treedef = jax.tree.flatten((params, ir, vis))
  specs = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
  return _compile_step(infer_fn, treedef, specs)(params, ir, vis)


def _stack(frames: list[np.ndarray]) -> np.ndarray:
  """Stacks frames, as float32 in [0, 1] when uint8 and float frames are mixed."""
  if len({f.dtype for f in frames}) > 1:
    frames = [f.astype(np.float32) / 255.0 if f.dtype == np.uint8 else f for f in frames]
  return np.stack(frames)


class _PairedFrames:
  """Lazily read, checked and padded IR/VIS frame pairs, keeping only those still needed."""

  def __init__(self, ir_frames: Iterable[Any], vis_frames: Iterable[Any], multiple: int,
               truncate: bool, resize: bool):
    self._ir, self._vis = iter(ir_frames), iter(vis_frames)
    self._multiple, self._truncate, self._resize = multiple, truncate, resize
    self.frames: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # index -> unpadded (ir, vis)
    self.padded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self.size: tuple[int, int] | None = None
    self.count = 0
    self.ended = False

  def available(self, limit: int) -> int:
    while self.count < limit and not self.ended:
      self._read_one()
    return min(limit, self.count)

  def _read_one(self) -> None:
    ir = next(self._ir, None)
    vis = next(self._vis, None)
    if ir is None or vis is None:
      self.ended = True
      if (ir is None) != (vis is None) and not self._truncate:
        short, long_ = ("infrared", "visible") if ir is None else ("visible", "infrared")
        raise ValueError(f"the {short} input has {self.count} frames but the {long_} input has "
                         "more: give clips of equal length, or pass truncate (--truncate) to fuse "
                         "only the first frames of the longer one")
      return
    ir, vis = as_rgb_frame(ir), as_rgb_frame(vis)
    index = self.count
    for name, frame in (("infrared", ir), ("visible", vis)):
      if frame.dtype != np.uint8 and not np.isfinite(frame).all():
        raise ValueError(f"{name} frame {index} holds {np.size(frame) - np.isfinite(frame).sum()}"
                         " NaN or infinite values: inputs must be finite (uint8, or float in "
                         "[0, 1])")
    if self.size is None:
      self.size = ir.shape[:2]
    if ir.shape[:2] != self.size:
      raise ValueError(f"infrared frame {index} is {ir.shape[1]}x{ir.shape[0]} but frame 0 is "
                       f"{self.size[1]}x{self.size[0]}: all frames of a clip need one size")
    if vis.shape[:2] != self.size:
      if not self._resize:
        raise ValueError(f"visible frame {index} is {vis.shape[1]}x{vis.shape[0]} but the "
                         f"infrared frames are {self.size[1]}x{self.size[0]}: register the clips "
                         "to one size, or pass resize (--resize) to resize the visible frames")
      vis = _resize(vis, *self.size)
    self.frames[index] = (ir, vis)
    self.padded[index] = (_pad_frame(ir, self._multiple), _pad_frame(vis, self._multiple))
    self.count += 1

  def drop_padded_before(self, index: int) -> None:
    for key in [k for k in self.padded if k < index]:
      del self.padded[key]


# ----------------------------------------------------------------------------------------------
# The fuser.


class Fuser:
  """Fuses IR/VIS videos of any size and length with one network.

  Build it with `Fuser.load(model_dir)` (an exported model directory) or
  `Fuser.from_module(module, params, spec)`; then `fuse(ir, vis)` on arrays or `fuse_stream`
  over iterables of frames.
  """

  def __init__(self, infer_fn: InferFn, params: Params, spec: InputSpec,
               windows: WindowSettings, windows_per_call: int = 1, model_name: str = "custom"):
    check_window(windows.window, windows.overlap, spec.min_frames)
    if windows.blend not in BLEND_MODES:
      raise ValueError(f"blend must be one of {BLEND_MODES}, got {windows.blend!r}")
    if windows_per_call < 1:
      raise ValueError(f"windows_per_call must be >= 1, got {windows_per_call}")
    self.params = jax.device_put(params)
    self.spec = spec
    self.windows = windows
    self.windows_per_call = windows_per_call
    self.model_name = model_name
    self._infer_fn = infer_fn

  @classmethod
  def from_module(cls, module: Any, params: Params, spec: InputSpec,
                  windows: WindowSettings, **kwargs) -> "Fuser":
    return cls(make_infer_fn(module), params, spec, windows, **kwargs)

  @classmethod
  def load(cls, model_dir: str | os.PathLike, *, backend: str = "model",
           windows: WindowSettings | None = None, reference: bool = False,
           windows_per_call: int = 1) -> "Fuser":
    """A fuser for an exported model directory.

    Args:
      model_dir: the output directory of `python -m vidfusion_jax.export`.
      backend: "model" runs the stored params through the model code; "artifact" runs the
        serialized `jax.export` function alone (no model code needed).
      windows: temporal windowing; default `DEFAULT_WINDOWS[model]`, or `REFERENCE_WINDOWS[model]`
        (the official test procedure) when `reference` is set.
      reference: use the official test windows when `windows` is not given.
      windows_per_call: windows stacked into one device call (throughput vs memory).
    """
    manifest = read_manifest(model_dir)
    name = manifest["model"]["name"]
    params = read_params(model_dir, manifest)
    spec = InputSpec(**manifest["exported"]["input_spec"])
    if backend == "model":
      infer_fn = make_infer_fn(build_model(name, manifest["model"]["config"], manifest["dtype"]))
    elif backend == "artifact":
      exported = read_exported(model_dir, manifest)
      backend_name = jax.default_backend()
      if not {"gpu": {"cuda", "rocm"}}.get(backend_name, {backend_name}) & set(exported.platforms):
        raise ModelDirError(f"{model_dir} was exported for {list(exported.platforms)}, not for "
                            f"this {backend_name} backend: use --backend=model or re-export it "
                            "with --platforms naming this platform (cpu, cuda, rocm, tpu)")
      infer_fn = exported.call
    else:
      raise ValueError(f"backend must be 'model' or 'artifact', got {backend!r}")
    if windows is None:
      windows = (REFERENCE_WINDOWS if reference else DEFAULT_WINDOWS)[name]
    return cls(infer_fn, params, spec, windows, windows_per_call, model_name=name)

  def fuse(self, ir: Any, vis: Any, *, truncate: bool = False, resize: bool = False
           ) -> np.ndarray:
    """Fuses whole clips: (T, H, W, 3|1) or gray (T, H, W), uint8 or float in [0, 1].

    Returns the network's fused frames, float32 (T, H, W, 3) at the infrared frame size
    (unclipped: use `frames.to_uint8` to save them).
    """
    ir, vis = as_frame_sequence(ir), as_frame_sequence(vis)
    fused = list(self.fuse_stream(ir, vis, truncate=truncate, resize=resize))
    if not fused:
      raise ValueError("no frames to fuse")
    return np.stack(fused)

  def fuse_stream(self, ir_frames: Iterable[Any], vis_frames: Iterable[Any], *,
                  truncate: bool = False, resize: bool = False, with_inputs: bool = False
                  ) -> Iterator[Any]:
    """Yields fused frames float32 (H, W, 3) in order while reading the inputs lazily.

    With `with_inputs`, yields `(ir, vis, fused)` with the inputs as read (3-channel, VIS resized
    when `resize`). Memory holds about `(windows_per_call + 1) * window` frames.
    """
    frames = _PairedFrames(ir_frames, vis_frames, self.spec.spatial_multiple, truncate, resize)
    settings = self.windows
    plan = iter_windows(settings.window, settings.overlap, frames.available)
    accumulated: dict[int, list[Any]] = {}  # index -> [weighted sum, weight sum]
    next_out = 0
    pending = None
    while True:
      group = list(itertools.islice(plan, self.windows_per_call))
      if group:
        dispatched = (group, self._dispatch(frames, group))
        frames.drop_padded_before(group[-1][0])
      if pending is not None:
        self._accumulate(accumulated, *pending, frames.size)
        done = group[0][0] if group else frames.count
        for index in range(next_out, done):
          total, weight = accumulated.pop(index)
          ir, vis = frames.frames.pop(index)
          fused = total / weight
          yield (ir, vis, fused) if with_inputs else fused
        next_out = done
      if not group:
        return
      pending = dispatched

  def _dispatch(self, frames: _PairedFrames, group: list[tuple[int, int]]) -> tuple[Any, Any]:
    """Starts the device call for a group of windows (asynchronous)."""
    length = max(group[0][1] - group[0][0], self.spec.min_frames)
    batch_ir, batch_vis = [], []
    for start, stop in group + [group[-1]] * (self.windows_per_call - len(group)):
      # Repeat the last frame up to `min_frames` (only a clip shorter than that needs it).
      indices = [min(i, stop - 1) for i in range(start, start + length)]
      batch_ir.append(_stack([frames.padded[i][0] for i in indices]))
      batch_vis.append(_stack([frames.padded[i][1] for i in indices]))
    return _run_step(self._infer_fn, self.params, _stack(batch_ir), _stack(batch_vis))

  def _accumulate(self, accumulated: dict[int, list[Any]], group: list[tuple[int, int]],
                  result: jax.Array, size: tuple[int, int]) -> None:
    height, width = size
    outputs = np.asarray(result)[:, :, :height, :width]
    last_wins = self.windows.blend == "last"
    for (start, stop), output in zip(group, outputs):
      weights = blend_weights(stop - start, self.windows.overlap)
      for offset, index in enumerate(range(start, stop)):
        weight = 1.0 if last_wins else float(weights[offset])
        if last_wins or index not in accumulated:
          accumulated[index] = [weight * output[offset], weight]
        else:
          accumulated[index][0] += weight * output[offset]
          accumulated[index][1] += weight
