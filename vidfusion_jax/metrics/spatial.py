"""Image fusion metrics of the CDDFuse Evaluator, in JAX (jit-compiled, batched over frames).

Every function takes gray frames on the 0-255 scale, shape (H, W); `compute` vectorises them over a
leading frame axis. Definitions, constants and conventions follow `shared/specs/metrics.md`
(documented in docs/metrics.md). Float32 throughout, made accurate where float32 would lose digits:
local (co)variances come from two-pass centred moments, MI from one log of a ratio of counts, and
the gray conversion emulates OpenCV's fused multiply-adds. Results stay within 2e-6 (relative) of
a float64 evaluation. No host callbacks: everything jits, vmaps and (except the histogram metrics
EN and MI) differentiates.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC", "PSNR", "MSE")
# Metrics scored per source; the convention decides whether the two scores are summed or averaged.
PER_SOURCE_METRICS = ("MI", "VIF", "SSIM")
CONVENTIONS = ("sum", "mean")
MI_UNITS = ("nats", "bits")
SSIM_DATA_RANGE_REFERENCE = 2.0  # pinned scikit-image 0.19 quirk: float dtype range [-1, 1]

Array = jax.Array


# ----------------------------------------------------------------------------- gray conversion

def _split_constant(c: float) -> tuple[np.float32, np.float32]:
  """c (rounded to float32) as hi + lo, each with at most 12 significant bits."""
  c = np.float32(c)
  exponent = math.floor(math.log2(c))
  scale = 2.0 ** (11 - exponent)
  hi = np.float32(np.round(np.float64(c) * scale) / scale)
  return hi, np.float32(c - hi)


_GRAY_G, _GRAY_B, _GRAY_R = (np.float32(0.587), _split_constant(0.114), _split_constant(0.299))


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
  """Knuth's error-free sum: a + b == s + e exactly."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _fused_multiply_add(x: Array, c: tuple[np.float32, np.float32], acc: Array) -> Array:
  """round(x * c + acc) with one rounding, exact for integer x in 0..255 (split-constant FMA)."""
  s, e = _two_sum(x * c[0], acc)
  return s + (e + x * c[1])


def to_gray(rgb: Array) -> Array:
  """RGB (..., H, W, 3) on 0-255 to gray (..., H, W) as the reference reader does.

  Reproduces `np.round(cv2.cvtColor(bgr_float32, cv2.COLOR_BGR2GRAY))` bit for bit on integer
  pixels, ties included: OpenCV evaluates fma(R, 0.299, fma(B, 0.114, G * 0.587)) in float32, and
  the fused multiply-adds are emulated exactly here so that XLA's contraction choices do not matter.
  """
  rgb = jnp.asarray(rgb, jnp.float32)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  y = _fused_multiply_add(r, _GRAY_R, _fused_multiply_add(b, _GRAY_B, g * _GRAY_G))
  return jnp.round(y)


# ----------------------------------------------------------------------------- helpers

def _sum(x: Array) -> Array:
  """Sum over the two image axes as two matrix-vector products: XLA:CPU runs a reduction fused
  with a long elementwise producer (the metric maps) several times slower than a gemv."""
  h, w = x.shape[-2:]
  rows = jnp.matmul(x, jnp.ones((w,), x.dtype), precision=jax.lax.Precision.HIGHEST)
  return jnp.matmul(rows, jnp.ones((h,), x.dtype), precision=jax.lax.Precision.HIGHEST)


def _mean(x: Array) -> Array:
  return _sum(x) / (x.shape[-2] * x.shape[-1])


def _safe_sqrt(x: Array) -> Array:
  """sqrt with a zero (not NaN) gradient at 0, so flat regions keep gradients finite."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _safe_div(num: Array, den: Array) -> Array:
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def _pearson(x: Array, y: Array) -> Array:
  xc, yc = x - _mean(x), y - _mean(y)
  return _mean(xc * yc) / jnp.sqrt(_mean(xc * xc) * _mean(yc * yc))


def _valid_filter(x: Array, taps: np.ndarray) -> Array:
  """Separable 'valid' correlation with the 1-D kernel `taps` along both image axes."""
  return _filter_axis(_filter_axis(x, taps, -1), taps, -2)


def _tap_sum(x: Array, taps: Sequence[float], axis: int, size: int) -> Array:
  """sum_i taps[i] * x[i : i + size] along `axis`: XLA fuses the shifted slices into one loop."""
  return sum(t * jax.lax.slice_in_dim(x, i, i + size, axis=axis) for i, t in enumerate(taps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _correlate_valid(x: Array, taps: tuple[float, ...], axis: int) -> Array:
  return _tap_sum(x, taps, axis, x.shape[axis] - len(taps) + 1)


def _correlate_valid_fwd(x, taps, axis):
  return _correlate_valid(x, taps, axis), x.shape[axis]


def _correlate_valid_bwd(taps, axis, size, g):
  # The transpose is a 'full' correlation with the reversed taps. Written out like the forward
  # pass it compiles in a fraction of the time autodiff's pad-per-slice transpose takes.
  pad = [(0, 0)] * g.ndim
  pad[axis % g.ndim] = (len(taps) - 1, len(taps) - 1)
  return (_tap_sum(jnp.pad(g, pad), taps[::-1], axis, size),)


_correlate_valid.defvjp(_correlate_valid_fwd, _correlate_valid_bwd)


def _filter_axis(x: Array, taps: np.ndarray, axis: int) -> Array:
  """'valid' correlation with the 1-D kernel `taps` along `axis`."""
  return _correlate_valid(x, tuple(float(t) for t in taps), axis)


def _centred_filter_axis(u: Array, v: Array, mean_u: Array, mean_v: Array, taps: np.ndarray,
                         axis: int) -> Array:
  """sum_i t_i (u_{p+i} - mean_u_p) (v_{p+i} - mean_v_p): a weighted co-moment about each window's
  own mean, so nothing cancels (unlike E[uv] - E[u] E[v])."""
  n = u.shape[axis] - len(taps) + 1
  window = lambda z, i: jax.lax.slice_in_dim(z, i, i + n, axis=axis)
  return sum(float(t) * (window(u, i) - mean_u) * (window(v, i) - mean_v)
             for i, t in enumerate(taps))


class _Moments(NamedTuple):
  """Local statistics of one image in a separable window, 'valid' region."""
  image: Array
  row_mean: Array  # after filtering along the width only
  mean: Array
  var: Array


def _local_moments(x: Array, taps: np.ndarray) -> _Moments:
  """Local mean and variance of x in the window taps (x) taps.

  Two passes along each axis (law of total variance: the window variance is the column-weighted
  mean of the row variances plus the variance of the row means), which keeps float32 accurate to
  the local contrast instead of losing digits to E[x^2] - E[x]^2 cancellation. The barriers keep
  XLA from fusing (and so recomputing) each pass into every tap of the next.
  """
  rx = jax.lax.optimization_barrier(_filter_axis(x, taps, -1))
  row_var, mx = jax.lax.optimization_barrier(
      (_centred_filter_axis(x, x, rx, rx, taps, -1), _filter_axis(rx, taps, -2)))
  var = _filter_axis(row_var, taps, -2) + _centred_filter_axis(rx, rx, mx, mx, taps, -2)
  return _Moments(x, rx, mx, var)


def _local_covariance(p: _Moments, q: _Moments, taps: np.ndarray) -> Array:
  row_cov = jax.lax.optimization_barrier(
      _centred_filter_axis(p.image, q.image, p.row_mean, q.row_mean, taps, -1))
  return (_filter_axis(row_cov, taps, -2)
          + _centred_filter_axis(p.row_mean, q.row_mean, p.mean, q.mean, taps, -2))


def _levels(x: Array) -> Array:
  """Integer gray levels 0..255 (round half to even, like np.round then uint8)."""
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32)


# ----------------------------------------------------------------------------- single-image

def entropy(f: Array) -> Array:
  """EN: entropy (bits) of the 256-bin histogram of the rounded levels. Not differentiable."""
  counts = jnp.bincount(_levels(f).ravel(), length=256)
  p = counts / counts.sum()
  return jnp.sum(jnp.where(counts > 0, -p * jnp.log2(jnp.where(counts > 0, p, 1.0)), 0.0))


def standard_deviation(f: Array) -> Array:
  """SD: population standard deviation."""
  fc = f - _mean(f)
  return jnp.sqrt(_mean(fc * fc))


def spatial_frequency(f: Array) -> Array:
  """SF: sqrt(mean horizontal squared difference + mean vertical squared difference)."""
  dx = f[..., :, 1:] - f[..., :, :-1]
  dy = f[..., 1:, :] - f[..., :-1, :]
  return _safe_sqrt(_mean(dx * dx) + _mean(dy * dy))


def _matlab_gradient(f: Array, axis: int) -> Array:
  """MATLAB `gradient`: central differences inside, one-sided at the first and last index."""
  n = f.shape[axis]
  part = lambda start, stop: jax.lax.slice_in_dim(f, start, stop, axis=axis)
  return jnp.concatenate([part(1, 2) - part(0, 1), (part(2, n) - part(0, n - 2)) / 2,
                          part(n - 1, n) - part(n - 2, n - 1)], axis=axis)


def average_gradient(f: Array) -> Array:
  """AG: mean over all pixels of sqrt((Gx^2 + Gy^2) / 2)."""
  gx, gy = _matlab_gradient(f, -1), _matlab_gradient(f, -2)
  return _mean(_safe_sqrt((gx * gx + gy * gy) / 2))


# ----------------------------------------------------------------------------- per source pair

def mutual_information(f: Array, x: Array) -> Array:
  """I(F; X) in nats from the 256x256 joint histogram of the rounded levels. Not differentiable."""
  joint = jnp.bincount((_levels(f) * 256 + _levels(x)).ravel(), length=256 * 256)
  joint = joint.reshape(256, 256).astype(jnp.float32)
  total = joint.sum()
  pf, px = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
  present = joint > 0
  # One log of a ratio of ratios: the error stays at float32 rounding of the ratio.
  ratio = (joint / jnp.where(pf > 0, pf, 1.0)) * (total / jnp.where(px > 0, px, 1.0))
  return jnp.sum(jnp.where(present, joint * jnp.log(jnp.where(present, ratio, 1.0)), 0.0)) / total


def _gaussian_taps(n: int) -> np.ndarray:
  """1-D factor of MATLAB fspecial('gaussian', n, n / 5), normalised (the 2-D window is separable
  and none of its entries falls below eps * max for the sizes used here)."""
  r = np.arange(n, dtype=np.float64) - (n - 1) / 2
  taps = np.exp(-r * r / (2 * (n / 5.0) ** 2))
  return taps / taps.sum()


def _vif_scores(refs: Sequence[Array], dist: Array) -> list[Array]:
  """vifp(ref -> dist) for each ref; the statistics of `dist` are computed once."""
  sigma_n_sq, eps = 2.0, 1e-10
  refs = list(refs)
  nums, dens = [0.0] * len(refs), [0.0] * len(refs)
  for scale in range(1, 5):
    taps = _gaussian_taps(2 ** (5 - scale) + 1)
    if scale > 1:
      refs = [_valid_filter(r, taps)[..., ::2, ::2] for r in refs]
      dist = _valid_filter(dist, taps)[..., ::2, ::2]
    dist_moments = _local_moments(dist, taps)
    s2 = jnp.maximum(dist_moments.var, 0.0)
    for k, ref in enumerate(refs):
      ref_moments = _local_moments(ref, taps)
      s1 = jnp.maximum(ref_moments.var, 0.0)
      s12 = _local_covariance(ref_moments, dist_moments, taps)
      g = s12 / (s1 + eps)
      sv = s2 - g * s12
      flat1 = s1 < eps
      g, sv, s1 = jnp.where(flat1, 0.0, g), jnp.where(flat1, s2, sv), jnp.where(flat1, 0.0, s1)
      flat2 = s2 < eps
      g, sv = jnp.where(flat2, 0.0, g), jnp.where(flat2, 0.0, sv)
      negative = g < 0
      sv, g = jnp.where(negative, s2, sv), jnp.where(negative, 0.0, g)
      sv = jnp.where(sv <= eps, eps, sv)
      nums[k] = nums[k] + _sum(jnp.log10(1 + g * g * s1 / (sv + sigma_n_sq)))
      dens[k] = dens[k] + _sum(jnp.log10(1 + s1 / sigma_n_sq))
  scores = [n / d for n, d in zip(nums, dens)]
  return [jnp.where(jnp.isnan(v), 1.0, v) for v in scores]


def vif(ref: Array, dist: Array) -> Array:
  """Pixel-domain multiscale VIF (Sheikh & Bovik vifp) of `dist` against `ref`, 4 scales."""
  return _vif_scores([ref], dist)[0]


def _ssim_scores(x: Array, ys: Sequence[Array], data_range: float) -> list[Array]:
  """SSIM(x, y) for each y; the statistics of `x` are computed once."""
  box = np.full(7, 1.0 / 7)
  cov_norm = 49.0 / 48.0  # sample covariance over the 49 pixels
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  px = _local_moments(x, box)
  scores = []
  for y in ys:
    py = _local_moments(y, box)
    ux, uy = px.mean, py.mean
    vx, vy = cov_norm * px.var, cov_norm * py.var
    vxy = cov_norm * _local_covariance(px, py, box)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    scores.append(_mean(s))
  return scores


def ssim(x: Array, y: Array, data_range: float = SSIM_DATA_RANGE_REFERENCE) -> Array:
  """scikit-image `structural_similarity` defaults: 7x7 uniform window, sample covariance,
  K1 = 0.01, K2 = 0.03, map averaged without a 3-pixel border (= the 'valid' region)."""
  return _ssim_scores(x, [y], data_range)[0]


_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
_SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32)


def _conv2_same(x: Array, kernel: np.ndarray) -> Array:
  """True 2-D convolution (kernel flipped), zero padding, output the size of x."""
  h, w = x.shape[-2:]
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
  flipped = kernel[::-1, ::-1]
  return sum(float(flipped[i, j]) * padded[..., i:i + h, j:j + w]
             for i in range(3) for j in range(3) if flipped[i, j] != 0)


def _arctan(x: Array) -> Array:
  """float32 arctan (Cephes atanf: range reduction plus a degree-9 odd polynomial), within 1.5e-7
  of the exact value; it vectorises, unlike XLA:CPU's arctan, which is 6x slower."""
  ax = jnp.abs(x)
  big, mid = ax > 2.414213562373095, ax > 0.4142135623730950
  offset = jnp.where(big, math.pi / 2, jnp.where(mid, math.pi / 4, 0.0))
  reduced = jnp.where(big, -1 / jnp.where(big, ax, 1.0), jnp.where(mid, (ax - 1) / (ax + 1), ax))
  z = reduced * reduced
  poly = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z
          - 3.33329491539e-1) * z * reduced + reduced
  return jnp.sign(x) * (offset + poly)


def _edges(x: Array) -> tuple[Array, Array]:
  sx, sy = _conv2_same(x, _SOBEL_X), _conv2_same(x, _SOBEL_Y)
  strength = _safe_sqrt(sx * sx + sy * sy)
  angle = jnp.where(sx == 0, math.pi / 2, _arctan(sy / jnp.where(sx == 0, 1.0, sx)))
  return strength, angle


def _edge_preservation(g_x: Array, a_x: Array, g_f: Array, a_f: Array) -> Array:
  relative_strength = jnp.where(g_x > g_f, _safe_div(g_f, g_x),
                                jnp.where(g_x < g_f, _safe_div(g_x, g_f), g_f))
  relative_angle = 1 - jnp.abs(a_x - a_f) / (math.pi / 2)
  q_g = 0.9994 / (1 + jnp.exp(-15 * (relative_strength - 0.5)))
  q_a = 0.9879 / (1 + jnp.exp(-22 * (relative_angle - 0.8)))
  return q_g * q_a


def qabf(f: Array, a: Array, b: Array) -> Array:
  """Qabf (Xydeas-Petrovic edge transfer), Sobel gradients, weights gA and gB (L = 1)."""
  (g_a, a_a), (g_b, a_b), (g_f, a_f) = _edges(a), _edges(b), _edges(f)
  q = _edge_preservation(g_a, a_a, g_f, a_f) * g_a + _edge_preservation(g_b, a_b, g_f, a_f) * g_b
  return _sum(q) / _sum(g_a + g_b)


def mean_squared_error(f: Array, x: Array) -> Array:
  d = x - f
  return _mean(d * d)


def scd(f: Array, a: Array, b: Array) -> Array:
  """SCD = r(F - B, A) + r(F - A, B); NaN (like the reference) when F - A or F - B is constant."""
  d_b, d_a = f - b, f - a
  constant = jnp.logical_or(jnp.ptp(d_a) == 0, jnp.ptp(d_b) == 0)
  return jnp.where(constant, jnp.nan, _pearson(d_b, a) + _pearson(d_a, b))


# ----------------------------------------------------------------------------- compute

def _frame_metrics(f: Array, a: Array, b: Array, source_weight: Array, data_range: Array,
                   mi_scale: Array, names: tuple[str, ...]) -> dict[str, Array]:
  """The requested metrics of one gray frame triple (F, A = infrared, B = visible).

  source_weight (1 for the sum convention, 1/2 for the mean), data_range and mi_scale (1 for nats)
  are traced, so one compiled function serves every convention.
  """
  combine = lambda u, v: source_weight * (u + v)
  out = {}
  for name in names:
    if name == "EN":
      out[name] = entropy(f)
    elif name == "SD":
      out[name] = standard_deviation(f)
    elif name == "SF":
      out[name] = spatial_frequency(f)
    elif name == "AG":
      out[name] = average_gradient(f)
    elif name == "MI":
      out[name] = mi_scale * combine(mutual_information(f, a), mutual_information(f, b))
    elif name == "SCD":
      out[name] = scd(f, a, b)
    elif name == "VIF":
      out[name] = combine(*_vif_scores([a, b], f))
    elif name == "Qabf":
      out[name] = qabf(f, a, b)
    elif name == "SSIM":
      out[name] = combine(*_ssim_scores(f, [a, b], data_range))
    elif name == "CC":
      out[name] = (_pearson(a, f) + _pearson(b, f)) / 2
    elif name in ("MSE", "PSNR"):
      mse = (mean_squared_error(f, a) + mean_squared_error(f, b)) / 2
      out[name] = mse if name == "MSE" else 10 * jnp.log10(jnp.max(f) ** 2 / mse)
  return out


@functools.partial(jax.jit, static_argnames=("names", "batched"))
def _compute(f, a, b, source_weight, data_range, mi_scale, *, names, batched):
  fn = functools.partial(_frame_metrics, source_weight=source_weight, data_range=data_range,
                         mi_scale=mi_scale, names=names)
  if not batched:
    return fn(f, a, b)
  if jax.default_backend() == "cpu":
    # One frame already fills the CPU cores; a loop keeps each frame's fast single-image kernels
    # (vmapped histograms and reductions run slower on XLA:CPU).
    return jax.lax.map(lambda x: fn(*x), (f, a, b))
  return jax.vmap(fn)(f, a, b)


def _as_gray(x, role: str) -> tuple[Array, bool]:
  """0-255 frame(s) -> float32 gray (H, W) or (N, H, W), and whether a batch axis is present."""
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
    raise ValueError(f"{role} must hold numbers on the 0-255 scale, got dtype {x.dtype}")
  # float32 unless float64 frames are passed with jax_enable_x64 on.
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if x.ndim == 4 or (x.ndim == 3 and x.shape[-1] in (1, 3)):
    if x.shape[-1] == 3:
      x = to_gray(x)
    elif x.shape[-1] == 1:
      x = x[..., 0]
    else:
      raise ValueError(f"{role}: a 4-D input must be (N, H, W, 3) or (N, H, W, 1), got {x.shape}")
  if x.ndim not in (2, 3):
    raise ValueError(f"{role} must be (H, W), (H, W, 3), (N, H, W) or (N, H, W, 3); "
                     f"got shape {x.shape}")
  return x, x.ndim == 3


def _vif_fits(size: int) -> bool:
  """Whether VIF's four 'valid' scales leave pixels along an axis of `size` pixels."""
  for scale in range(1, 5):
    n = 2 ** (5 - scale) + 1
    if scale > 1:
      size = (size - n + 2) // 2
    if size < n:
      return False
  return True


def _check_frame_size(shape: tuple[int, ...], names: Sequence[str]) -> None:
  minimum = 2
  if "SSIM" in names:
    minimum = 7
  if "VIF" in names:
    minimum = next(n for n in range(minimum, 1000) if _vif_fits(n))
  if min(shape) < minimum:
    raise ValueError(f"frames of {shape[0]}x{shape[1]} pixels are too small for {list(names)}: "
                     f"need at least {minimum}x{minimum} (VIF needs its 17-pixel window and "
                     "three 2x reductions)")


def compute(fused, ir, vis, names: Iterable[str] | None = None, convention: str = "sum",
            data_range: float = SSIM_DATA_RANGE_REFERENCE,
            mi_units: str = "nats") -> dict[str, Array]:
  """Fusion metrics of `fused` against the infrared and visible sources.

  Args:
    fused, ir, vis: frames on the 0-255 scale (uint8 or float; numpy or jax arrays, tracers
      included): gray (H, W), RGB (H, W, 3), or a batch with a leading frame axis, (N, H, W) or
      (N, H, W, 3). RGB is converted to gray as OpenCV's COLOR_BGR2GRAY plus rounding. All three
      must have the same frame shape and frame count.
    names: metrics to compute, from `METRIC_NAMES` (default: all, in that order).
    convention: "sum" (CDDFuse reference) or "mean": how the two source scores of MI, VIF and
      SSIM are combined.
    data_range: L of SSIM; 2.0 reproduces the reference (pinned scikit-image quirk), 255.0 is the
      textbook value for 0-255 frames.
    mi_units: "nats" (reference) or "bits".

  Returns:
    {name: value}: scalars for single frames, shape (N,) for batches. SCD is NaN when F - IR or
    F - VIS is constant (e.g. F == VIS), as in the reference.
  """
  names = tuple(METRIC_NAMES if names is None else names)
  unknown = [n for n in names if n not in METRIC_NAMES]
  if unknown:
    raise ValueError(f"unknown metric names {unknown}; choose from {', '.join(METRIC_NAMES)}")
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  if mi_units not in MI_UNITS:
    raise ValueError(f"mi_units must be one of {MI_UNITS}, got {mi_units!r}")
  if isinstance(data_range, (int, float)) and not data_range > 0:
    raise ValueError(f"data_range must be positive, got {data_range}")
  (f, batched), (a, _), (b, _) = _as_gray(fused, "fused"), _as_gray(ir, "ir"), _as_gray(vis, "vis")
  if not f.shape == a.shape == b.shape:
    raise ValueError("fused, ir and vis must have the same frame count and size after gray "
                     f"conversion; got {f.shape}, {a.shape} and {b.shape}")
  _check_frame_size(f.shape[-2:], names)
  dtype = f.dtype
  out = _compute(f, a, b, jnp.asarray(1.0 if convention == "sum" else 0.5, dtype),
                 jnp.asarray(data_range, dtype),
                 jnp.asarray(1.0 if mi_units == "nats" else 1 / math.log(2), dtype),
                 names=names, batched=batched)
  return {name: out[name] for name in names}  # jit returns dicts in sorted key order

