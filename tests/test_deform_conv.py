"""Deformable convolution v1: golden unit cases and finite-difference gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax.models.deform_conv import deform_conv2d
from vidfusion_jax.models.deform_conv import deform_sample


@pytest.mark.parametrize("case", ["dcn1", "dcn2"])
def test_matches_reference_unit_cases(shared, case):
  """DCN_1 (64 ch, groups 8, dg 8) and DCN_2 (32 ch, groups 4, dg 8) settings; offsets include
  integer and out-of-image samples."""
  with np.load(shared("golden/temcoco_a.npz")) as z:
    x, offset, weight, want = (z[f"unit/{case}/{k}"] for k in ("x", "offset", "weight", "out"))
    groups = int(z[f"unit/{case}/groups"])
    deformable_groups = int(z[f"unit/{case}/deformable_groups"])
  out = deform_conv2d(x.transpose(0, 2, 3, 1), offset.transpose(0, 2, 3, 1),
                      weight.transpose(2, 3, 1, 0), groups=groups,
                      deformable_groups=deformable_groups, precision="highest")
  err = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - want).max()
  assert err <= 1e-5, err


def test_zero_offsets_equal_grouped_convolution():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
  weight = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  out = jax.jit(functools.partial(deform_conv2d, groups=2, deformable_groups=2,
                                  precision="highest"))(x, np.zeros((2, 5, 6, 36), np.float32),
                                                        weight)
  want = jax.lax.conv_general_dilated(x, weight, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=2, precision="highest")
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_sampling_validity_rules():
  """A tap exactly at -1 or H is zero; a tap at -0.5 keeps half of the border pixel."""
  x = jnp.ones((1, 3, 3, 1))
  offset = np.zeros((1, 3, 3, 18), np.float32)
  # Pixel (0, 0), centre tap k=4: dy moves the sample to row -1 (invalid) or -0.5 (half weight).
  offset[0, 0, 0, 8] = -1.0
  offset[0, 0, 1, 8] = -0.5
  offset[0, 2, 2, 8] = 1.0  # row 3 == H: invalid
  samples = np.asarray(deform_sample(x, jnp.asarray(offset), 1))[..., 0, 4]
  assert samples[0, 0, 0] == 0.0
  assert samples[0, 0, 1] == 0.5
  assert samples[0, 2, 2] == 0.0
  assert samples[0, 1, 1] == 1.0


def test_gradients_match_finite_differences():
  """Gradients w.r.t. input, weights and offsets in float64 (fractional offsets, some samples near
  and beyond the border)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 5, 4))
    weight = rng.normal(size=(3, 3, 2, 4))
    offset = 1.5 * rng.normal(size=(1, 4, 5, 36))
    cotangent = rng.normal(size=(1, 4, 5, 4))

    @jax.jit
    def loss(x, weight, offset):
      out = deform_conv2d(x, offset, weight, groups=2, deformable_groups=2)
      return jnp.sum(out * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, weight, offset)
    eps = 1e-6
    for argnum, arg in enumerate((x, weight, offset)):
      for flat_index in rng.choice(arg.size, 12, replace=False):
        index = np.unravel_index(flat_index, arg.shape)
        delta = np.zeros_like(arg)
        delta[index] = eps
        args_plus = [x, weight, offset]
        args_minus = [x, weight, offset]
        args_plus[argnum] = arg + delta
        args_minus[argnum] = arg - delta
        numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * eps)
        assert grads[argnum].dtype == jnp.float64
        np.testing.assert_allclose(grads[argnum][index], numeric, rtol=1e-6, atol=1e-8,
                                   err_msg=f"argument {argnum} at {index}")


def test_rejects_bad_shapes():
  x = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="offset must be"):
    deform_conv2d(x, jnp.zeros((1, 4, 4, 18)), jnp.zeros((3, 3, 8, 8)), deformable_groups=2)
  with pytest.raises(ValueError, match="divisible"):
    deform_conv2d(x, jnp.zeros((1, 4, 4, 18)), jnp.zeros((3, 3, 8, 8)), groups=3)
  with pytest.raises(ValueError, match="weight must be"):
    deform_conv2d(x, jnp.zeros((1, 4, 4, 18)), jnp.zeros((3, 3, 4, 8)))
