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
from typing import Iterable, Sequence

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
