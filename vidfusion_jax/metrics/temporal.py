"""Temporal-consistency metrics of a fused video: flowD, BiSWE, MS2R and a flicker measure.

Frames are (H, W) or (H, W, C) arrays on the 0-255 scale. Gray frames stored with three equal
channels should be passed as one channel (`as_metric_frame` does that), so that the L2 norm over
channels is not inflated by sqrt(3). Flow comes from a pluggable backend (`flow.py`); warping,
errors and reductions run in JAX. Definitions (docs/metrics.md):

* flowD(t)   = mean_x || F_t(x) - F_{t-1}(x + w_t(x)) ||_2, with w_t = flow(VIS_t, VIS_{t-1}),
  t = 1..T-1 (TemCoCo's flowD; the flow comes from the visible video).
* BiSWE(t)   = (E(F_{t-1} -> F_t) + E(F_{t+1} -> F_t)) / 2, where E(F_s -> F_t) is the mean L2
  error of F_s warped onto F_t with flow(F_t, F_s), estimated on the fused video itself,
  t = 1..T-2 (bidirectional self-warping error).
* MS2R(t)    = mean_x || flow(F_t, F_{t+1})(x) + flow(F_t, F_{t-1})(x) ||_2, t = 1..T-2: the
  second-order motion residual (the discrete acceleration of every pixel's trajectory, zero for
  constant-velocity motion), in pixels.
* flicker(t) = mean_x max(0, |dF_t(x)| - max(|dIR_t(x)|, |dVIS_t(x)|)), with dX_t = X_t - X_{t-1}
  on the gray frames, t = 1..T-1: the frame-to-frame change of the fused video that neither
  source shows. Weight-free and flow-free.

All are 0 on a static video and lower is better. Video values are means over the defined t.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax.metrics import flow as flow_lib
from vidfusion_jax.metrics import spatial

TEMPORAL_METRIC_NAMES = ("flowD", "BiSWE", "MS2R", "flicker")


def as_metric_frame(frame: np.ndarray) -> np.ndarray:
  """float32 (H, W, C); a colour frame whose channels are all equal becomes one channel."""
  frame = np.asarray(frame, np.float32)
  if frame.ndim == 2:
    return frame[..., None]
  if frame.shape[-1] > 1 and np.all(frame == frame[..., :1]):
    return frame[..., :1]
  return frame


@jax.jit
def warp(frame: jax.Array, flow: jax.Array) -> jax.Array:
  """Backward warp: out(x) = frame(x + flow(x)), bilinear, sample points clamped to the image
  (border pixels replicated). frame (H, W, C), flow (H, W, 2) as (dx, dy)."""
  h, w = frame.shape[:2]
  gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  x = jnp.clip(gx + flow[..., 0], 0, w - 1)
  y = jnp.clip(gy + flow[..., 1], 0, h - 1)
  # Cells [x0, x0 + 1] x [y0, y0 + 1] stay inside the image; x = w - 1 uses weight 1 on x0 + 1.
  x0 = jnp.minimum(jnp.floor(x), w - 2).astype(jnp.int32)
  y0 = jnp.minimum(jnp.floor(y), h - 2).astype(jnp.int32)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  x1, y1 = x0 + 1, y0 + 1
  top = frame[y0, x0] * (1 - fx) + frame[y0, x1] * fx
  bottom = frame[y1, x0] * (1 - fx) + frame[y1, x1] * fx
  return top * (1 - fy) + bottom * fy


@jax.jit
def warp_error(target: jax.Array, source: jax.Array, flow: jax.Array) -> jax.Array:
  """mean_x || target(x) - source(x + flow(x)) ||_2 (norm over channels)."""
  diff = target - warp(source, flow)
  return jnp.mean(jnp.sqrt(jnp.sum(diff * diff, axis=-1)))


@jax.jit
def _flow_residual(forward: jax.Array, backward: jax.Array) -> jax.Array:
  both = forward + backward
  return jnp.mean(jnp.sqrt(jnp.sum(both * both, axis=-1)))


def _gray(frame: np.ndarray) -> jax.Array:
  frame = jnp.asarray(frame)
  return spatial.to_gray(frame) if frame.shape[-1] == 3 else frame[..., 0]


@jax.jit
def _flicker(fused_prev, fused, ir_prev, ir, vis_prev, vis):
  change = jnp.abs(_gray(fused) - _gray(fused_prev))
  source_change = jnp.maximum(jnp.abs(_gray(ir) - _gray(ir_prev)),
                              jnp.abs(_gray(vis) - _gray(vis_prev)))
  return jnp.mean(jnp.maximum(change - source_change, 0.0))


@dataclasses.dataclass
class TemporalResult:
  """Per-frame values (NaN where a metric is undefined for that frame) and video means."""

  per_frame: dict[str, np.ndarray]
  flow_backend: str

  @property
  def values(self) -> dict[str, float]:
    out = {}
    for name, series in self.per_frame.items():
      defined = series[~np.isnan(series)]
      out[name] = float(defined.mean()) if defined.size else float("nan")
    return out


class TemporalMeter:
  """Streams a video frame by frame (keeping three frames) and accumulates the temporal metrics.

  `update(fused, ir, vis)` takes frame t of each video; `result()` returns a `TemporalResult`.
  """

  def __init__(self, flow: str | flow_lib.FlowBackend = "farneback",
               names: Sequence[str] | None = None):
    self.names = tuple(TEMPORAL_METRIC_NAMES if names is None else names)
    unknown = [n for n in self.names if n not in TEMPORAL_METRIC_NAMES]
    if unknown:
      raise ValueError(f"unknown temporal metrics {unknown}; choose from "
                       f"{', '.join(TEMPORAL_METRIC_NAMES)}")
    self.flow = flow_lib.get_flow_backend(flow)
    self._series = {n: [] for n in self.names}
    self._window: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self._count = 0

  def _call_flow(self, a: np.ndarray, b: np.ndarray) -> jax.Array:
    field = np.asarray(self.flow(a, b), np.float32)
    if field.shape != a.shape[:2] + (2,):
      raise ValueError(f"flow backend {flow_lib.backend_name(self.flow)!r} returned shape "
                       f"{field.shape}; expected {a.shape[:2] + (2,)}")
    return jnp.asarray(field)

  def update(self, fused: np.ndarray, ir: np.ndarray, vis: np.ndarray) -> None:
    frames = tuple(as_metric_frame(x) for x in (fused, ir, vis))
    sizes = [x.shape[:2] for x in frames]
    if not sizes[0] == sizes[1] == sizes[2] or min(sizes[0]) < 2:
      raise ValueError(f"frame {self._count}: fused, ir and vis frames must share one size of at "
                       f"least 2x2 pixels; got {sizes[0]}, {sizes[1]} and {sizes[2]}")
    if self._window and frames[0].shape != self._window[-1][0].shape:
      raise ValueError(f"fused frame {self._count} has shape {frames[0].shape}, the previous one "
                       f"{self._window[-1][0].shape}")
    self._window = (self._window + [frames])[-3:]
    self._count += 1
    pair = self._pair_metrics() if len(self._window) > 1 else {}
    triple = self._triple_metrics() if len(self._window) == 3 else {}
    for name in self.names:
      if name in ("flowD", "flicker"):
        self._series[name].append(pair.get(name, np.nan))
      else:
        # Frame t-1 gets its value once frame t, its forward neighbour, has arrived.
        if triple:
          self._series[name][-1] = triple[name]
        self._series[name].append(np.nan)

  def _pair_metrics(self) -> dict[str, float]:
    (f0, a0, b0), (f1, a1, b1) = self._window[-2:]
    out = {}
    if "flowD" in self.names:
      out["flowD"] = float(warp_error(f1, f0, self._call_flow(b1, b0)))
    if "flicker" in self.names:
      out["flicker"] = float(_flicker(f0, f1, a0, a1, b0, b1))
    return out

  def _triple_metrics(self) -> dict[str, float]:
    if "BiSWE" not in self.names and "MS2R" not in self.names:
      return {}
    (f0, _, _), (f1, _, _), (f2, _, _) = self._window
    backward, forward = self._call_flow(f1, f0), self._call_flow(f1, f2)
    out = {"MS2R": float(_flow_residual(forward, backward))}
    if "BiSWE" in self.names:
      out["BiSWE"] = float((warp_error(f1, f0, backward) + warp_error(f1, f2, forward)) / 2)
    return out

  def result(self) -> TemporalResult:
    return TemporalResult({n: np.asarray(v, np.float64) for n, v in self._series.items()},
                          flow_lib.backend_name(self.flow))


def temporal_metrics(fused: Iterable[np.ndarray], ir: Iterable[np.ndarray],
                     vis: Iterable[np.ndarray], flow: str | flow_lib.FlowBackend = "farneback",
                     names: Sequence[str] | None = None) -> TemporalResult:
  """Temporal metrics of a fused video against its sources (sequences of frames, same length)."""
  meter = TemporalMeter(flow, names)
  fused, ir, vis = list(fused), list(ir), list(vis)
  if not len(fused) == len(ir) == len(vis):
    raise ValueError(f"frame counts differ: fused {len(fused)}, ir {len(ir)}, vis {len(vis)}")
  for f, a, b in zip(fused, ir, vis):
    meter.update(f, a, b)
  return meter.result()


# --- VF-Bench's protocol (BiSWE and MS2R exactly as its reference code computes them) -----------

VFBENCH_OCCLUSION_THRESHOLD = 1.0  # px, forward-backward consistency (strict <)
VFBENCH_MIN_FRAMES = 5  # the reference skips shorter sequences (5-frame windows)


def batched_flows(flow_fn, frames_a: np.ndarray, frames_b: np.ndarray,
                  batch_size: int) -> np.ndarray:
  """flow_fn over (N, H, W, 3) pairs, `batch_size` per call; the last call is padded to full size
  so that a jitted flow_fn compiles once. Returns float32 (N, H, W, 2)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}")
  count = len(frames_a)
  pad = lambda x: np.concatenate([x, x[-1:].repeat(-count % batch_size, 0)])
  frames_a, frames_b = pad(frames_a), pad(frames_b)
  expected = (batch_size,) + frames_a.shape[1:3] + (2,)
  flows = []
  for start in range(0, len(frames_a), batch_size):
    field = np.asarray(flow_fn(frames_a[start:start + batch_size],
                               frames_b[start:start + batch_size]), np.float32)
    if field.shape != expected:
      raise ValueError(f"flow_fn returned shape {field.shape}; expected {expected}")
    flows.append(field)
  return np.concatenate(flows)[:count]


def vfbench_flow_pairs(num_frames: int) -> list[tuple[int, int]]:
  """The distinct (a, b) frame pairs whose flow VF-Bench's BiSWE and MS2R read for one stream:
  both directions between neighbours, and (0, 0), (T-1, T-1) where the clamped ends pair a frame
  with itself. 2T pairs (one for T = 1)."""
  pairs = {(0, 0), (num_frames - 1, num_frames - 1)}
  for t in range(num_frames - 1):
    pairs.update({(t, t + 1), (t + 1, t)})
  return sorted(pairs)


def _occlusion_mask(flow_ab: jax.Array, flow_ba: jax.Array) -> jax.Array:
  """1 where || f_ab + f_ba warped onto a's grid by f_ab ||_2 < 1 px."""
  residual = flow_ab + warp(flow_ba, flow_ab)
  return (jnp.sqrt(jnp.sum(residual * residual, -1)) < VFBENCH_OCCLUSION_THRESHOLD).astype(
      jnp.float32)


def _masked_self_warping_error(cur, neighbour, flow_cur_to_neighbour, mask):
  diff = jnp.mean(jnp.abs(cur - warp(neighbour, flow_cur_to_neighbour)), -1)
  return jnp.sum(mask * diff) / (jnp.sum(mask) + 1e-10)


@jax.jit
@functools.partial(jax.vmap, in_axes=(0, 0, 0, 0, 0))
def _vfbench_frame(fused, cur2prev, prev2cur, cur2next, next2cur):
  """Per-frame BiSWE and MS2R terms. fused (3, H, W, 3) = (G_p, G_t, G_n); each flow argument is
  (3, H, W, 2) over the streams (fused, IR, VIS)."""
  g_prev, g_cur, g_next = fused
  mask_prev = _occlusion_mask(cur2prev[1], prev2cur[1]) * _occlusion_mask(cur2prev[2], prev2cur[2])
  mask_next = _occlusion_mask(cur2next[1], next2cur[1]) * _occlusion_mask(cur2next[2], next2cur[2])
  err_prev = _masked_self_warping_error(g_cur, g_prev, cur2prev[0], mask_prev)
  err_next = _masked_self_warping_error(g_cur, g_next, cur2next[0], mask_next)
  second_difference = cur2next - prev2cur  # (3, H, W, 2): fused, IR, VIS
  d_ir, d_vis = (jnp.mean(jnp.abs(second_difference[0] - second_difference[s])) for s in (1, 2))
  return {"BiSWE": err_prev + err_next, "MS2R": 0.5 * (d_ir + d_vis), "err_prev": err_prev,
          "err_next": err_next, "d_ir": d_ir, "d_vis": d_vis, "mask_prev": mask_prev,
          "mask_next": mask_next}


def _vfbench_stream(video: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
  video = np.asarray(video, np.float32)
  if name == "ir" and video.ndim == 3:
    video = np.repeat(video[..., None], 3, -1)
  if name == "ir" and video.ndim == 4 and video.shape[-1] == 1:
    video = np.repeat(video, 3, -1)
  if video.shape != shape:
    raise ValueError(f"{name} must be (T, H, W, 3){' or (T, H, W)' if name == 'ir' else ''} "
                     f"matching fused {shape}; got {video.shape}")
  return np.round(video)  # torch.round: half to even, no clipping


def vfbench_temporal(fused: np.ndarray, ir: np.ndarray, vis: np.ndarray, flow_fn,
                     batch_size: int = 8) -> dict[str, np.ndarray]:
  """VF-Bench's per-frame BiSWE and MS2R of a fused video (lower is better).

  fused and vis are (T, H, W, 3), ir is (T, H, W) or (T, H, W, 3), all on 0-255; they are rounded
  half-to-even like the reference. `flow_fn(a, b)` maps two (N, H, W, 3) arrays to the (N, H, W, 2)
  flow from a to b (SEA-RAFT spring-S for published numbers). Frame t uses the clamped neighbours
  p = max(t-1, 0), n = min(t+1, T-1):

    BiSWE(t) = sum_{k in p, n} sum_x m_k(x) mean_c |G_t - warp(G_k, f_G(t, k))| / (sum_x m_k + 1e-10),
      m_k = product over IR and VIS of [|| f_S(t, k) + warp(f_S(k, t), f_S(t, k)) ||_2 < 1];
    MS2R(t)  = 0.5 * sum_{S in IR, VIS} mean | (f_G(t, n) - f_G(p, t)) - (f_S(t, n) - f_S(p, t)) |.

  Each of the 6T distinct flows is computed once, `batch_size` pairs per `flow_fn` call (the last
  call is padded to the same size, so a jitted flow_fn compiles once). A flow_fn with a
  `pair_flows(frames, index_a, index_b, batch_size)` method (`metrics.SeaRaftFlow`) is given the 3T
  frames and the pair indices instead, so that per-frame work (features) is shared. Returns (T,) float64 arrays
  "BiSWE", "MS2R" and their terms "err_prev", "err_next", "d_ir", "d_vis", and the (T, H, W)
  masks "mask_prev", "mask_next". The dataset number is the mean over all frames of all videos.
  """
  fused = np.asarray(fused, np.float32)
  if fused.ndim != 4 or fused.shape[-1] != 3 or fused.shape[0] < 1 or min(fused.shape[1:3]) < 2:
    raise ValueError(f"fused must be (T, H, W, 3) with T >= 1 and H, W >= 2; got {fused.shape}")
  streams = np.stack([_vfbench_stream(fused, "fused", fused.shape),
                      _vfbench_stream(ir, "ir", fused.shape),
                      _vfbench_stream(vis, "vis", fused.shape)])  # (3, T, H, W, 3)
  num_frames = fused.shape[0]
  pairs = vfbench_flow_pairs(num_frames)
  jobs = [(s, a, b) for s in range(3) for a, b in pairs]
  s, a, b = (np.asarray(c) for c in zip(*jobs))
  if hasattr(flow_fn, "pair_flows"):  # e.g. SeaRaftFlow: features once per frame
    frames = streams.reshape((-1,) + streams.shape[2:])
    flows = flow_fn.pair_flows(frames, s * num_frames + a, s * num_frames + b, batch_size)
  else:
    flows = batched_flows(flow_fn, streams[s, a], streams[s, b], batch_size)
  flows = flows.reshape((3, len(pairs)) + flows.shape[1:])
  index = {pair: i for i, pair in enumerate(pairs)}
  gather = lambda a, b: jnp.asarray(np.moveaxis(flows[:, [index[k] for k in zip(a, b)]], 0, 1))
  chunks = []
  # Frames are scored batch_size at a time (the last chunk padded), bounding device memory.
  for start in range(0, num_frames, batch_size):
    t = np.minimum(np.arange(start, start + batch_size), num_frames - 1)
    p, n = np.maximum(t - 1, 0), np.minimum(t + 1, num_frames - 1)
    out = _vfbench_frame(jnp.asarray(np.moveaxis(streams[0][np.stack([p, t, n])], 0, 1)),
                         gather(t, p), gather(p, t), gather(t, n), gather(n, t))
    chunks.append({k: np.asarray(v)[:num_frames - start] for k, v in out.items()})
  return {k: np.concatenate([c[k] for c in chunks]).astype(
      np.float32 if k.startswith("mask") else np.float64) for k in chunks[0]}


# --- TemCoCo's flowD as released, with the unreleased flow and warp steps chosen (docs/metrics.md) --

TEMCOCO_FLOW_SIZE = (432, 960)  # (H, W) the released code's comment resizes frames to for the flow


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """cv2.resize (bilinear, INTER_LINEAR) of each (H, W, C) frame to (height, width)."""
  return np.stack([cv2.resize(f, size[::-1], interpolation=cv2.INTER_LINEAR).reshape(
      size + f.shape[2:]) for f in frames])


def temcoco_flowd(fused: np.ndarray, vis: np.ndarray, flow_fn,
                  flow_size: tuple[int, int] | None = TEMCOCO_FLOW_SIZE,
                  batch_size: int = 8) -> np.ndarray:
  """TemCoCo's flowD per frame (T-1,), t = 1..T-1, lower is better:

    flowD(t) = mean_x || F_t(x) - F_{t-1}(x - f(x)) ||_2,  f = flow_fn(VIS_{t-1}, VIS_t),

  the L2 norm over the channels of the frames as given (0-255, colour or one channel). As released,
  the flow runs from the previous to the current visible frame, on frames resized to `flow_size`
  (bilinear; None keeps the size) and is resized back with its components rescaled. The released
  code does not include its warp: here F_{t-1} is sampled at x - f(x) (bilinear, border), the usual
  remap approximation of moving a frame along its own forward flow.
  """
  fused = np.asarray(fused, np.float32)
  vis = np.asarray(vis, np.float32)
  if fused.ndim == 3:
    fused = fused[..., None]
  if vis.ndim == 3:
    vis = vis[..., None]
  if fused.shape[:3] != vis.shape[:3] or fused.shape[0] < 2 or vis.shape[-1] not in (1, 3):
    raise ValueError(f"fused and vis must be (T, H, W[, C]) videos of one size with T >= 2; got "
                     f"{fused.shape} and {vis.shape}")
  height, width = fused.shape[1:3]
  rgb = np.broadcast_to(vis, vis.shape[:3] + (3,))
  if flow_size is not None:
    rgb = _resize(np.ascontiguousarray(rgb), tuple(flow_size))
  flows = batched_flows(flow_fn, rgb[:-1], rgb[1:], batch_size)
  if flow_size is not None:
    flows = _resize(flows, (height, width)) * np.array(
        [width / flow_size[1], height / flow_size[0]], np.float32)
  return np.asarray(_flowd_errors(jnp.asarray(fused), jnp.asarray(flows)), np.float64)


@jax.jit
def _flowd_errors(fused, flows):
  return jax.vmap(lambda cur, prev, flow: warp_error(cur, prev, -flow))(fused[1:], fused[:-1], flows)
