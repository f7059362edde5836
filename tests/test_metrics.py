"""Spatial metrics against the CDDFuse Evaluator golden values (shared/golden/metrics)."""

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax import frames, metrics

CANDIDATES = ("mean", "max", "vis")
FRAMES = ("0000", "0001")


@pytest.fixture(scope="module")
def golden(shared):
  """Golden JSON plus the 6 (frame, candidate) triples as RGB uint8 batches (N, H, W, 3)."""
  root = shared("golden/metrics/metrics.json").parent
  data = json.loads((root / "metrics.json").read_text())
  keys = [(fr, c) for fr in FRAMES for c in CANDIDATES]
  read = lambda name: frames.read_frame(root / name)
  fused = np.stack([read(f"fused_{c}_{fr}.png") for fr, c in keys])
  ir = np.stack([read(f"ir_{fr}.png") for fr, _ in keys])
  vis = np.stack([read(f"vis_{fr}.png") for fr, _ in keys])
  return {"json": data, "keys": keys, "fused": fused, "ir": ir, "vis": vis, "root": root}


@pytest.fixture(scope="module")
def golden_sum(golden):
  """All metrics of the 6 golden triples, default (reference) settings."""
  return metrics.compute(golden["fused"], golden["ir"], golden["vis"])


def _check(values, expected, what):
  """rtol 1e-5 against the float64-input reference; None (reference NaN) must be NaN."""
  values = np.asarray(values, np.float64)
  for value, (key, ref) in zip(values, expected):
    if ref is None:
      assert np.isnan(value), f"{what} {key}: expected NaN (reference), got {value}"
    else:
      np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6, err_msg=f"{what} {key}")


def test_all_metrics_match_reference_sum_convention(golden, golden_sum):
  out = golden_sum
  assert tuple(out) == metrics.METRIC_NAMES
  reference = golden["json"]["metrics_float64_inputs"]
  for name in metrics.METRIC_NAMES:
    assert out[name].shape == (6,) and out[name].dtype == jnp.float32
    _check(out[name], [((fr, c), reference[fr][name][c]) for fr, c in golden["keys"]], name)
  # The float32-reader values agree too (the reference's own float32 run).
  for fr, key in zip(FRAMES, ("metrics", "metrics_frame_0001")):
    for i, c in enumerate(CANDIDATES):
      ref32 = golden["json"][key]["VIF"][c]
      np.testing.assert_allclose(out["VIF"][FRAMES.index(fr) * 3 + i], ref32, rtol=1e-5)


def test_mean_convention_data_range_and_bits(golden):
  variants = golden["json"]["variants_same_reference_functions"]
  expect = lambda field: [((fr, c), variants[fr][c][field]) for fr, c in golden["keys"]]
  args = (golden["fused"], golden["ir"], golden["vis"])
  # Convention, data range and units are traced: these calls reuse one compiled function.
  mean = metrics.compute(*args, convention="mean")
  _check(mean["VIF"], expect("VIF_mean_of_two"), "VIF mean")
  _check(mean["SSIM"], expect("SSIM_mean_of_two_dr2"), "SSIM mean L=2")
  mi_mean = [(k, (variants[k[0]][k[1]]["MI_ir_nats"] + variants[k[0]][k[1]]["MI_vis_nats"]) / 2)
             for k in golden["keys"]]
  _check(mean["MI"], mi_mean, "MI mean")
  wide = metrics.compute(*args, data_range=255.0, mi_units="bits")
  _check(wide["SSIM"], expect("SSIM_sum_dr255"), "SSIM sum L=255")
  _check(wide["MI"], expect("MI_sum_bits"), "MI bits")
  wide_mean = metrics.compute(*args, convention="mean", data_range=255.0)
  _check(wide_mean["SSIM"], expect("SSIM_mean_of_two_dr255"), "SSIM mean L=255")
  # The other metrics do not depend on the convention.
  reference = golden["json"]["metrics_float64_inputs"]
  for name in ("EN", "SD", "Qabf", "SCD", "CC", "PSNR"):
    _check(wide_mean[name], [((fr, c), reference[fr][name][c]) for fr, c in golden["keys"]], name)


def test_per_source_parts(golden):
  variants = golden["json"]["variants_same_reference_functions"]
  gray = {k: metrics.to_gray(golden[k]) for k in ("fused", "ir", "vis")}
  per_pair = jax.jit(jax.vmap(lambda f, x: (metrics.vif(x, f), metrics.ssim(f, x),
                                            metrics.ssim(f, x, 255.0),
                                            metrics.mutual_information(f, x))))
  for source in ("ir", "vis"):
    vif, ssim2, ssim255, mi = per_pair(gray["fused"], gray[source])
    expect = lambda field: [((fr, c), variants[fr][c][field]) for fr, c in golden["keys"]]
    _check(vif, expect(f"VIF_{source}"), f"VIF {source}")
    _check(ssim2, expect(f"SSIM_{source}_dr2"), f"SSIM {source} L=2")
    _check(ssim255, expect(f"SSIM_{source}_dr255"), f"SSIM {source} L=255")
    _check(mi, expect(f"MI_{source}_nats"), f"MI {source}")


def test_scd_is_nan_when_fused_equals_a_source(golden):
  out = metrics.compute(golden["vis"][0], golden["ir"][0], golden["vis"][0], names=("SCD", "CC"))
  assert np.isnan(out["SCD"]) and np.isfinite(out["CC"])
  shifted = metrics.compute(golden["ir"][0] + 3.0, golden["ir"][0], golden["vis"][0],
                            names=("SCD",))
  assert np.isnan(shifted["SCD"])  # F - A constant but non-zero


def test_gray_conversion_matches_opencv(golden):
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (200_000, 3))
  # Every exact .5 tie of 0.299 R + 0.587 G + 0.114 B with R, G in a band: the hard cases.
  r, g, b = np.meshgrid(np.arange(256), np.arange(0, 256, 8), np.arange(256), indexing="ij")
  ties = np.stack([r, g, b], -1).reshape(-1, 3)
  ties = ties[(ties @ np.array([299, 587, 114])) % 1000 == 500]
  assert len(ties) > 500
  rgb = np.concatenate([colours, ties]).astype(np.float32)[None]
  expected = np.round(cv2.cvtColor(rgb[..., ::-1].copy(), cv2.COLOR_BGR2GRAY))
  np.testing.assert_array_equal(np.asarray(metrics.to_gray(rgb)), expected)
  # The golden gray crops are the reference reader's output for the colour crops.
  colour = frames.read_frame(golden["root"] / "vis_rgb_0000.png")
  np.testing.assert_array_equal(np.asarray(metrics.to_gray(colour)), golden["vis"][0, ..., 0])


def test_float32_matches_float64_on_non_integer_frames(golden):
  rng = np.random.default_rng(1)
  ir = golden["ir"][..., 0].astype(np.float64)
  vis = golden["vis"][..., 0].astype(np.float64)
  fused = np.clip(0.6 * ir + 0.4 * vis + rng.normal(0, 3, ir.shape), 0, 255)
  ours = metrics.compute(fused.astype(np.float32), ir, vis)
  with jax.enable_x64(True):
    ref = metrics.compute(fused, ir, vis)
    assert ref["VIF"].dtype == jnp.float64
    ref = {k: np.asarray(v) for k, v in ref.items()}
  for name in metrics.METRIC_NAMES:
    # MI/EN: a float32 vs float64 difference can move a value across a rounding boundary.
    rtol = 1e-5 if name in ("EN", "MI") else 2e-6
    np.testing.assert_allclose(np.asarray(ours[name], np.float64), ref[name], rtol=rtol,
                               err_msg=name)


def test_batched_jitted_and_vmapped_agree(golden, golden_sum):
  f, a, b = (metrics.to_gray(golden[k]) for k in ("fused", "ir", "vis"))
  names = ("EN", "MI", "SSIM", "Qabf")
  single = metrics.compute(f[1], a[1], b[1], names=names)
  in_jit = jax.jit(jax.vmap(lambda *x: metrics.compute(*x, names=names)))(f[:2], a[:2], b[:2])
  for name in names:
    assert single[name].shape == ()
    np.testing.assert_allclose(golden_sum[name][1], single[name], rtol=1e-6)
    np.testing.assert_allclose(in_jit[name], golden_sum[name][:2], rtol=1e-6)


def test_gradients_are_finite_and_match_finite_differences():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.integers(0, 256, (48, 48)), jnp.float32)
  b = jnp.asarray(rng.integers(0, 256, (48, 48)), jnp.float32)
  f = ((a + b) / 2 + 0.3).at[:8, :8].set(100.0)  # flat patch: sqrt and divisions at zero
  smooth = ("SD", "SF", "AG", "SCD", "VIF", "SSIM", "CC", "PSNR", "MSE")
  scale = {k: float(abs(v)) for k, v in metrics.compute(f, a, b, names=smooth).items()}

  def objective(x):
    """Every smooth metric at unit scale, so each one weighs in the directional derivative."""
    values = metrics.compute(x, a, b, names=smooth)
    return sum(values[k] / scale[k] for k in smooth)

  value_and_grad = jax.jit(jax.value_and_grad(objective))
  _, grad = value_and_grad(f)
  assert bool(jnp.all(jnp.isfinite(grad)))
  direction = jnp.asarray(rng.normal(size=f.shape), jnp.float32)
  step = 0.1  # float32 forward values: smaller steps drown in rounding
  numeric = (value_and_grad(f + step * direction)[0]
             - value_and_grad(f - step * direction)[0]) / (2 * step)
  np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(numeric), rtol=5e-3)
  # Qabf is only piecewise smooth (orientation wraps at +-90 degrees; the equal-strength case);
  # EN and MI are histograms: zero gradient, documented as not differentiable.
  rough = jax.jit(jax.jacrev(lambda x: metrics.compute(x, a, b, names=("Qabf", "EN", "MI"))))(f)
  assert bool(jnp.all(jnp.isfinite(rough["Qabf"]))) and float(jnp.abs(rough["Qabf"]).max()) > 0
  assert float(jnp.abs(rough["EN"]).max()) == 0 and float(jnp.abs(rough["MI"]).max()) == 0


def test_bad_inputs_raise_clear_errors():
  x = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError, match="same frame count and size"):
    metrics.compute(x, x, np.zeros((64, 65)))
  with pytest.raises(ValueError, match="unknown metric names"):
    metrics.compute(x, x, x, names=("EN", "LPIPS"))
  with pytest.raises(ValueError, match="convention"):
    metrics.compute(x, x, x, convention="median")
  with pytest.raises(ValueError, match="too small"):
    metrics.compute(x[:40, :40], x[:40, :40], x[:40, :40], names=("VIF",))
  with pytest.raises(ValueError, match=r"\(H, W\)"):
    metrics.compute(x[0], x[0], x[0])
