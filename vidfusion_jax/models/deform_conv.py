"""Deformable convolution v1 (3x3, stride 1, padding 1, no bias, no mask) in pure JAX.

Reproduces the mmdet/BasicSR CUDA `DeformConv` used by TemCoCo (and `torchvision.ops.deform_conv2d`
with `mask=None`): offsets are grouped per deformable group, then per tap k = 3i + j, as (dy, dx)
pairs; a sample whose position p satisfies p_y <= -1, p_x <= -1, p_y >= H or p_x >= W is 0, otherwise
it is bilinear with every corner outside the image counting as 0. Channel-last layout throughout.

The implementation is a gather (one `take_along_axis` per bilinear corner) followed by a grouped
matmul, so it runs on any backend and is differentiable with respect to input, weights and offsets.
"""

import jax
import jax.numpy as jnp

KERNEL_TAPS = 9  # 3x3 kernel


def _check_shapes(x: jax.Array, offset: jax.Array, weight: jax.Array, groups: int,
                  deformable_groups: int) -> None:
  if x.ndim != 4 or offset.ndim != 4:
    raise ValueError(f"x and offset must be (N, H, W, C); got {x.shape} and {offset.shape}")
  channels = x.shape[-1]
  if channels % groups or channels % deformable_groups:
    raise ValueError(f"channels ({channels}) must be divisible by groups ({groups}) and "
                     f"deformable_groups ({deformable_groups})")
  if offset.shape[:3] != x.shape[:3] or offset.shape[-1] != deformable_groups * 2 * KERNEL_TAPS:
    raise ValueError(f"offset must be (N, H, W, {deformable_groups * 2 * KERNEL_TAPS}) for x "
                     f"{x.shape}; got {offset.shape}")
  if weight.shape[:3] != (3, 3, channels // groups) or weight.shape[3] % groups:
    raise ValueError(f"weight must be (3, 3, {channels // groups}, out) with out divisible by "
                     f"{groups}; got {weight.shape}")


def deform_sample(x: jax.Array, offset: jax.Array, deformable_groups: int) -> jax.Array:
  """Bilinear samples of `x` at the deformed 3x3 taps.

  Args:
    x: (N, H, W, C) input.
    offset: (N, H, W, deformable_groups * 18), (dy, dx) per group and tap.
    deformable_groups: channel c uses the offsets of group c // (C / deformable_groups).

  Returns:
    (N, H, W, C, 9) samples, tap index last (PyTorch's channel-major im2col column order).
  """
  n, h, w, c = x.shape
  dg = deformable_groups
  cg = c // dg
  # Positions in at least float32: bfloat16 cannot resolve pixel coordinates beyond 256.
  position_dtype = jnp.promote_types(offset.dtype, jnp.float32)
  off = offset.astype(position_dtype).reshape(n, h, w, dg, KERNEL_TAPS, 2)
  taps = jnp.arange(KERNEL_TAPS)
  tap_y = (taps // 3 - 1).astype(position_dtype)
  tap_x = (taps % 3 - 1).astype(position_dtype)
  rows = jnp.arange(h, dtype=position_dtype)[None, :, None, None, None]
  cols = jnp.arange(w, dtype=position_dtype)[None, None, :, None, None]
  pos_y = rows + tap_y + off[..., 0]  # (N, H, W, dg, 9)
  pos_x = cols + tap_x + off[..., 1]
  inside = (pos_y > -1) & (pos_x > -1) & (pos_y < h) & (pos_x < w)

  y0 = jnp.floor(pos_y)
  x0 = jnp.floor(pos_x)
  frac_y = pos_y - y0
  frac_x = pos_x - x0
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)

  # (N, dg, H*W, cg): one gather source per deformable group.
  source = x.reshape(n, h * w, dg, cg).transpose(0, 2, 1, 3)
  samples = jnp.zeros((n, dg, h * w * KERNEL_TAPS, cg), x.dtype)
  for dy, dx, corner_weight in (
      (0, 0, (1 - frac_y) * (1 - frac_x)), (0, 1, (1 - frac_y) * frac_x),
      (1, 0, frac_y * (1 - frac_x)), (1, 1, frac_y * frac_x)):
    cy = y0 + dy
    cx = x0 + dx
    valid = inside & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
    index = jnp.clip(cy, 0, h - 1) * w + jnp.clip(cx, 0, w - 1)  # (N, H, W, dg, 9)
    index = index.transpose(0, 3, 1, 2, 4).reshape(n, dg, h * w * KERNEL_TAPS, 1)
    scale = jnp.where(valid, corner_weight, 0).astype(x.dtype)
    scale = scale.transpose(0, 3, 1, 2, 4).reshape(n, dg, h * w * KERNEL_TAPS, 1)
    samples = samples + scale * jnp.take_along_axis(source, index, axis=2)
  # (N, dg, H, W, 9, cg) -> (N, H, W, dg, cg, 9) -> (N, H, W, C, 9)
  samples = samples.reshape(n, dg, h, w, KERNEL_TAPS, cg).transpose(0, 2, 3, 1, 5, 4)
  return samples.reshape(n, h, w, c, KERNEL_TAPS)


def deform_conv2d(x: jax.Array, offset: jax.Array, weight: jax.Array, *, groups: int = 1,
                  deformable_groups: int = 1,
                  precision: jax.lax.PrecisionLike = None) -> jax.Array:
  """DCNv1 3x3 convolution, stride 1, padding 1, dilation 1, no bias.

  Args:
    x: (N, H, W, C) input.
    offset: (N, H, W, deformable_groups * 18) offsets in PyTorch channel order.
    weight: (3, 3, C // groups, out) kernel (PyTorch (out, C/groups, 3, 3) transposed (2, 3, 1, 0)).
    groups: weight (convolution) groups.
    deformable_groups: offset groups.
    precision: matmul precision of the grouped contraction.

  Returns:
    (N, H, W, out).
  """
  _check_shapes(x, offset, weight, groups, deformable_groups)
  n, h, w, c = x.shape
  out_channels = weight.shape[-1]
  columns = deform_sample(x, offset, deformable_groups)
  columns = columns.reshape(n, h, w, groups, c // groups, KERNEL_TAPS)
  # (3, 3, Cg, out) -> (groups, Cg, 9, out_g)
  kernel = weight.reshape(KERNEL_TAPS, c // groups, groups, out_channels // groups)
  kernel = kernel.transpose(2, 1, 0, 3)
  out = jnp.einsum("nhwgck,gcko->nhwgo", columns, kernel.astype(columns.dtype),
                   precision=precision)
  return out.reshape(n, h, w, out_channels)
