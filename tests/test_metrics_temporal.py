"""Temporal metrics: warping, flow backends, static-video zeros and growth with flicker."""

import json
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax import frames, metrics


@pytest.fixture(scope="module")
def clip(shared):
  """Frames 0-3 of M3SVD sequence 0111_1716, cropped to 96x128 around the walking person."""
  root = shared("data/m3svd_mini")
  crop = (slice(160, 256), slice(96, 224))
  read = lambda kind, i: frames.read_frame(root / kind / "0111_1716" / f"{i:04d}.png")[crop]
  return {"ir": [read("infrared_Enhance", i) for i in range(4)],
          "vis": [read("visible_Enhance", i) for i in range(4)]}


def test_zero_flow_warp_error_matches_golden_frame_difference(shared):
  root = shared("golden/metrics/metrics.json").parent
  golden = json.loads((root / "metrics.json").read_text())["auxiliary_not_reference"][
      "identity_flow_warping_error_frame1_vs_frame0"]
  read = lambda name: frames.read_frame(root / name)
  pair = lambda stem: [read(f"{stem}_{i:04d}.png") for i in range(2)]
  for candidate in ("mean", "max", "vis"):
    result = metrics.temporal_metrics(pair(f"fused_{candidate}"), pair("ir"), pair("vis"),
                                      flow="zero", names=["flowD"])
    assert result.flow_backend == "zero"
    np.testing.assert_allclose(result.values["flowD"], golden[candidate], rtol=1e-6)
  colour = pair("vis_rgb")  # L2 norm over the three colour channels
  result = metrics.temporal_metrics(colour, colour, colour, flow="zero", names=["flowD"])
  np.testing.assert_allclose(result.values["flowD"], golden["vis_rgb"], rtol=1e-6)


def test_warp_follows_the_flow_convention():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(0, 255, (20, 30, 1)), jnp.float32)
  flow = jnp.zeros((20, 30, 2)).at[..., 0].set(2.0).at[..., 1].set(-1.0)
  warped = metrics.warp(image, flow)  # out(y, x) = image(y - 1, x + 2), clamped at the border
  np.testing.assert_array_equal(np.asarray(warped[1:, :-2]), np.asarray(image[:-1, 2:]))
  np.testing.assert_array_equal(np.asarray(warped[0, :-2]), np.asarray(image[0, 2:]))
  half = metrics.warp(image, jnp.zeros((20, 30, 2)).at[..., 0].set(0.5))
  np.testing.assert_allclose(np.asarray(half[:, :-1]),
                             np.asarray((image[:, :-1] + image[:, 1:]) / 2), rtol=1e-6)


def test_static_video_scores_zero(clip):
  still = [clip["vis"][0]] * 4
  result = metrics.temporal_metrics(still, [clip["ir"][0]] * 4, still)
  assert result.flow_backend == "farneback"
  assert result.values == {"flowD": 0.0, "BiSWE": 0.0, "MS2R": 0.0, "flicker": 0.0}
  # Defined frames: pairs from t = 1, triples for 1 <= t <= T - 2.
  assert np.isnan(result.per_frame["flowD"][0]) and np.isnan(result.per_frame["BiSWE"][-1])
  assert np.isfinite(result.per_frame["BiSWE"][1:-1]).all()


def test_temporal_metrics_grow_with_flicker(clip):
  still_vis, still_ir = [clip["vis"][0]] * 4, [clip["ir"][0]] * 4
  rng = np.random.default_rng(0)
  gains = rng.standard_normal(4)
  patterns = rng.standard_normal((4, 1, 1, 3))
  scores = []
  for amplitude in (0.0, 4.0, 16.0):
    flickering = [np.clip(clip["vis"][0] * (1 + amplitude / 100 * g) + amplitude * p, 0, 255)
                  for g, p in zip(gains, patterns)]
    scores.append(metrics.temporal_metrics(flickering, still_ir, still_vis).values)
  for name in metrics.TEMPORAL_METRIC_NAMES:
    assert scores[0][name] == 0.0, name
    assert 0 < scores[1][name] < scores[2][name], (name, scores)


def test_real_motion_and_fused_equal_to_source(clip):
  result = metrics.temporal_metrics(clip["vis"], clip["ir"], clip["vis"])
  values = result.values
  assert values["flicker"] == 0.0  # the fused video changes exactly as a source does
  assert values["flowD"] > 0 and values["BiSWE"] > 0 and values["MS2R"] > 0
  # Compensating real motion helps: the Farneback warp error is below the zero-flow one.
  unwarped = metrics.temporal_metrics(clip["vis"], clip["ir"], clip["vis"], flow="zero",
                                      names=["flowD"])
  assert values["flowD"] < unwarped.values["flowD"]


def test_custom_flow_backends(clip, monkeypatch):
  calls = []

  def learned(frame_a, frame_b):
    calls.append((frame_a.shape, frame_b.shape))
    return np.zeros(frame_a.shape[:2] + (2,), np.float32)

  learned.name = "my-raft"
  result = metrics.temporal_metrics(clip["vis"][:3], clip["ir"][:3], clip["vis"][:3],
                                    flow=learned, names=["flowD", "MS2R"])
  assert result.flow_backend == "my-raft" and len(calls) == 2 + 2
  module = types.ModuleType("fake_flow_module")
  module.make = lambda: metrics.ZeroFlow(name="from-module")
  monkeypatch.setitem(sys.modules, "fake_flow_module", module)
  assert metrics.backend_name(metrics.get_flow_backend("fake_flow_module:make")) == "from-module"
  with pytest.raises(ValueError, match="unknown flow backend"):
    metrics.get_flow_backend("raft")
  bad = lambda a, b: np.zeros((3, 3, 2))
  with pytest.raises(ValueError, match="returned shape"):
    metrics.temporal_metrics(clip["vis"][:2], clip["ir"][:2], clip["vis"][:2], flow=bad)
  with pytest.raises(ValueError, match="must share one size"):
    metrics.temporal_metrics(clip["vis"][:2], [x[:50] for x in clip["ir"][:2]], clip["vis"][:2])
