"""VideoFusion losses (vidfusion_jax.losses) against the golden loss values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax import losses


def nthwc(x):
  return jnp.asarray(x.transpose(0, 1, 3, 4, 2))


@pytest.mark.parametrize("name", ["a", "b"])
def test_videofusion_loss_matches_reference(shared, name):
  with np.load(shared(f"golden/videofusion_{name}.npz")) as z:
    outputs = {k: nthwc(z[f"output/{k}"]) for k in ("fusion", "ir", "vi")}
    total, terms = jax.jit(losses.videofusion_loss)(
        outputs, nthwc(z["loss_input/gt_ir"]), nthwc(z["loss_input/gt_vi"]))
    expected = {k[5:]: z[k] for k in z.files if k.startswith("loss/")}
  assert set(terms) == set(expected) and len(expected) == 18
  for key, value in expected.items():
    np.testing.assert_allclose(terms[key], value, rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(total, expected["l_total"], rtol=1e-5)


def _ssim_loss_numpy(a, b, data_range):
  """Direct 2-D-window SSIM loss in float64 (the reference formula with an explicit L)."""
  g = losses.gaussian_window().astype(np.float64)
  window = np.outer(g, g)
  size = len(g)
  h, w = a.shape[1] - size + 1, a.shape[2] - size + 1

  def filt(x):
    return sum(window[i, j] * x[:, i:i + h, j:j + w] for i in range(size) for j in range(size))

  mu1, mu2 = filt(a), filt(b)
  var1, var2, cov = filt(a * a) - mu1 ** 2, filt(b * b) - mu2 ** 2, filt(a * b) - mu1 * mu2
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  ssim = ((2 * mu1 * mu2 + c1) * (2 * cov + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (var1 + var2 + c2))
  return 1 - ssim.mean()


@pytest.mark.parametrize("scale, offset, data_range", [
    (1.0, 0.0, 1.0),      # [0, 1] data: L = 1
    (255.0, 0.0, 255.0),  # max > 128: L = 255
    (2.0, -1.0, 2.0),     # min < -0.5: L = 1 - (-1) = 2
])
def test_ssim_data_range_rule_under_jit(scale, offset, data_range):
  rng = np.random.default_rng(0)
  a = rng.random((2, 17, 19, 3))
  b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
  a, b = a * scale + offset, b * scale + offset
  ours = jax.jit(losses.ssim_loss)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(ours, _ssim_loss_numpy(a, b, data_range), rtol=1e-4)
  wrong_range = 255.0 if data_range == 1.0 else 1.0  # the test discriminates between ranges
  assert not np.isclose(ours, _ssim_loss_numpy(a, b, wrong_range), rtol=1e-3)


def test_sobel_matches_direct_correlation():
  rng = np.random.default_rng(1)
  x = rng.random((1, 6, 7, 1)).astype(np.float32)
  gx, gy = losses.sobel(jnp.asarray(x))
  p = np.pad(x[0, :, :, 0], 1, mode="edge")
  kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
  ky = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32)
  for kernel, ours in ((kx, gx), (ky, gy)):
    ref = np.abs([[np.sum(p[i:i + 3, j:j + 3] * kernel) for j in range(7)] for i in range(6)])
    np.testing.assert_allclose(ours[0, :, :, 0], ref, atol=1e-6)


def test_ycbcr_clamps_and_coefficients():
  x = jnp.asarray([[[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]])
  y, cb, cr = losses.rgb_to_ycbcr(x)
  np.testing.assert_allclose(y[..., 0], [[[0.299, 0.114]]], rtol=1e-6)
  np.testing.assert_allclose(cb[..., 0], [[[-0.169 + 128 / 255, 1.0]]], rtol=1e-6)  # clamped
  np.testing.assert_allclose(cr[..., 0], [[[1.0, -0.081 + 128 / 255]]], rtol=1e-6)


def test_ssim_rejects_small_images():
  with pytest.raises(ValueError, match="height and width >= 13"):
    losses.ssim_loss(jnp.zeros((1, 12, 20, 1)), jnp.zeros((1, 12, 20, 1)))
