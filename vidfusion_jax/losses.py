"""Training losses of the reference models, on channels-last float images / videos.

Reusable pieces (YCbCr, Sobel, SSIM, L1) are module-level functions on (..., H, W, C) arrays; the
model-specific objectives combine them. All functions are jit-compatible and differentiable.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Terms = dict[str, jax.Array]


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean absolute error over all elements (torch.nn.functional.l1_loss)."""
  return jnp.mean(jnp.abs(a - b))


def rgb_to_ycbcr(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(Y, Cb, Cr) of RGB in [0, 1] (..., 3), each (..., 1) and clamped to [0, 1] (reference coeffs)."""
  r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  y = 0.299 * r + 0.587 * g + 0.114 * b
  cb = -0.169 * r - 0.331 * g + 0.5 * b + 128.0 / 255.0
  cr = 0.5 * r - 0.419 * g - 0.081 * b + 128.0 / 255.0
  return tuple(jnp.clip(c, 0.0, 1.0) for c in (y, cb, cr))


def sobel(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(|gx|, |gy|) of each channel of (N, H, W, C) with replicate padding (same size as x).

  gx = [[-1,0,1],[-2,0,2],[-1,0,1]] and gy = [[-1,-2,-1],[0,0,0],[1,2,1]] cross-correlations.
  """
  # Edge padding by concatenation: the gradient of jnp.pad(mode="edge") makes XLA's SPMD
  # partitioner send a frame between devices when the batch axis is sharded.
  p = jnp.concatenate([x[:, :1], x, x[:, -1:]], axis=1)
  p = jnp.concatenate([p[:, :, :1], p, p[:, :, -1:]], axis=2)
  h, w = x.shape[1], x.shape[2]

  def at(i, j):
    return p[:, i:i + h, j:j + w, :]

  gx = (at(0, 2) - at(0, 0)) + 2 * (at(1, 2) - at(1, 0)) + (at(2, 2) - at(2, 0))
  gy = (at(2, 0) - at(0, 0)) + 2 * (at(2, 1) - at(0, 1)) + (at(2, 2) - at(0, 2))
  return jnp.abs(gx), jnp.abs(gy)


def gaussian_window(size: int = 13, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps; the SSIM window is their outer product."""
  x = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable Gaussian filter of (N, H, W, C), no padding ('valid')."""
  size = len(taps)
  h, w = x.shape[1] - size + 1, x.shape[2] - size + 1
  rows = sum(float(t) * x[:, i:i + h] for i, t in enumerate(taps))
  return sum(float(t) * rows[:, :, j:j + w] for j, t in enumerate(taps))


def ssim_loss(reference: jax.Array, image: jax.Array, window_size: int = 13,
              sigma: float = 1.5) -> jax.Array:
  """1 - mean SSIM map of (N, H, W, C) images, Gaussian window, valid filtering, per channel.

  The dynamic range follows the reference's rule on `reference`: L = 1, or 255 if max > 128, minus
  -1 if min < -0.5 (so 2 for [-1, 1] data); evaluated on the data, so it is traceable.
  """
  if reference.shape[1] < window_size or reference.shape[2] < window_size:
    raise ValueError(f"SSIM needs height and width >= {window_size}; got {reference.shape}")
  max_val = jnp.where(jnp.max(reference) > 128, 255.0, 1.0)
  min_val = jnp.where(jnp.min(reference) < -0.5, -1.0, 0.0)
  dynamic_range = max_val - min_val
  c1 = (0.01 * dynamic_range) ** 2
  c2 = (0.03 * dynamic_range) ** 2
  taps = gaussian_window(window_size, sigma)
  # The five statistics are stacked on the channel axis: the batch axis stays as sharded.
  c = reference.shape[-1]
  stats = _filter_valid(jnp.concatenate(
      [reference, image, reference * reference, image * image, reference * image], axis=-1), taps)
  mu1, mu2, e11, e22, e12 = (stats[..., i * c:(i + 1) * c] for i in range(5))
  mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
  var1, var2, cov = e11 - mu1_sq, e22 - mu2_sq, e12 - mu12
  ssim_map = ((2 * mu12 + c1) * (2 * cov + c2)) / ((mu1_sq + mu2_sq + c1) * (var1 + var2 + c2))
  return 1.0 - jnp.mean(ssim_map)


def temporal_consistency_loss(video: jax.Array, reference: jax.Array) -> jax.Array:
  """Mean |(V[t+1] - V[t]) - (R[t+1] - R[t])| over (B, T-1, H, W, C) (the paper's L_var)."""
  return l1(jnp.diff(video, axis=1), jnp.diff(reference, axis=1))


def _frames(x: jax.Array) -> jax.Array:
  return x.reshape((-1,) + x.shape[2:])


def fusion_loss(fused: jax.Array, ir: jax.Array, vi: jax.Array) -> Terms:
  """The reference Fusion_loss on (N, H, W, 3) frames; `loss_fusion` is the weighted sum."""
  y_f, cb_f, cr_f = rgb_to_ycbcr(fused)
  y_ir = rgb_to_ycbcr(ir)[0]
  y_vi, cb_vi, cr_vi = rgb_to_ycbcr(vi)
  grad_f, grad_ir, grad_vi = sobel(y_f), sobel(y_ir), sobel(y_vi)
  terms = {
      "loss_intensity_max": 15 * l1(jnp.maximum(y_vi, y_ir), y_f),
      "loss_color": 100 * (l1(cb_f, cb_vi) + l1(cr_f, cr_vi)),
      "loss_grad": sum(l1(gf, jnp.maximum(gv, gi)) for gf, gv, gi in zip(grad_f, grad_vi, grad_ir)),
      "loss_intensity_consist": l1(y_vi, y_f) + 0.8 * l1(y_ir, y_f),
      "loss_ssim": ssim_loss(vi, fused) + ssim_loss(y_ir, y_f),
  }
  terms["loss_fusion"] = sum(terms.values())
  return terms


def fidelity_loss(restored: jax.Array, reference: jax.Array, prefix: str) -> Terms:
  """The reference Fidelity_loss on (N, H, W, 3) frames, keys prefixed (`ir_` / `vi_`)."""
  grads = zip(sobel(rgb_to_ycbcr(restored)[0]), sobel(rgb_to_ycbcr(reference)[0]))
  intensity = 10 * l1(restored, reference)
  grad = sum(10 * l1(a, b) for a, b in grads)
  return {f"{prefix}loss_intensity": intensity, f"{prefix}loss_grad": grad,
          f"{prefix}loss_fid": intensity + grad}


def videofusion_loss(outputs: Mapping[str, jax.Array], gt_ir: jax.Array,
                     gt_vi: jax.Array, consistency_weight: float = 10.0) -> tuple[jax.Array, Terms]:
  """VideoFusion's training objective (fusion + fidelity + temporal consistency).

  outputs: the model's {"fusion", "ir", "vi"}; gt_ir, gt_vi: clean targets; all (B, T, H, W, 3) in
  [0, 1], H and W >= 13 (SSIM window). Returns (total, terms) with the reference's term names.
  """
  fused, rec_ir, rec_vi = outputs["fusion"], outputs["ir"], outputs["vi"]
  terms = fusion_loss(_frames(fused), _frames(gt_ir), _frames(gt_vi))
  terms.update(fidelity_loss(_frames(rec_ir), _frames(gt_ir), "ir_"))
  terms.update(fidelity_loss(_frames(rec_vi), _frames(gt_vi), "vi_"))
  terms["l_fid_total"] = terms["ir_loss_fid"] + terms["vi_loss_fid"]
  terms["l_cons_ir"] = consistency_weight * temporal_consistency_loss(rec_ir, gt_ir)
  terms["l_cons_vi"] = consistency_weight * temporal_consistency_loss(rec_vi, gt_vi)
  terms["l_cons_fusion"] = consistency_weight * (temporal_consistency_loss(fused, gt_ir) +
                                                 temporal_consistency_loss(fused, gt_vi))
  terms["l_cons_total"] = terms["l_cons_ir"] + terms["l_cons_vi"] + terms["l_cons_fusion"]
  terms["l_total"] = terms["loss_fusion"] + terms["l_fid_total"] + terms["l_cons_total"]
  return terms["l_total"], terms


def _cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """torch.nn.functional.cosine_similarity over the last axis (each norm clamped to eps)."""
  norm = lambda x: jnp.maximum(jnp.linalg.norm(x, axis=-1), eps)
  return jnp.sum(a * b, axis=-1) / (norm(a) * norm(b))


def temcoco_fusion_loss(fused: jax.Array, gt_ir: jax.Array, gt_vi: jax.Array) -> Terms:
  """TemCoCo's `Fusion_loss` (default weights) on (B, T, H, W, 3) clips; keys as the reference.

  Unlike VideoFusion's variant: SSIM on luminance only, weights 10/1/20/10, and a temporal term
  2 * mean_t mean_b (1 - cos(dY_f(t), dY_ir(t))) against IR only (0 when T = 1).
  """
  b, t = fused.shape[:2]
  y_f, cb_f, cr_f = rgb_to_ycbcr(_frames(fused))
  y_ir = rgb_to_ycbcr(_frames(gt_ir))[0]
  y_vi, cb_vi, cr_vi = rgb_to_ycbcr(_frames(gt_vi))
  grad_f, grad_ir, grad_vi = sobel(y_f), sobel(y_ir), sobel(y_vi)
  terms = {
      "loss_ssim": ssim_loss(y_vi, y_f) + ssim_loss(y_ir, y_f),
      "loss_intensity_max": 10 * l1(jnp.maximum(y_vi, y_ir), y_f),
      "loss_pixel_consist": l1(y_vi, y_f) + l1(y_ir, y_f),
      "loss_color": 20 * (l1(cb_f, cb_vi) + l1(cr_f, cr_vi)),
      "loss_grad": 10 * sum(l1(gf, jnp.maximum(gv, gi))
                            for gf, gv, gi in zip(grad_f, grad_vi, grad_ir)),
  }
  if t > 1:
    motion = lambda y: jnp.diff(y.reshape(b, t, -1), axis=1)
    terms["loss_temporary_consist"] = 2 * jnp.mean(1 - _cosine_similarity(motion(y_f),
                                                                           motion(y_ir)))
  else:
    terms["loss_temporary_consist"] = jnp.zeros((), fused.dtype)
  terms["loss_fusion"] = sum(terms.values())
  return terms


def temcoco_loss(outputs: Mapping[str, jax.Array], gt_ir: jax.Array, gt_vi: jax.Array,
                 targets: Mapping[str, jax.Array] | None) -> tuple[jax.Array, Terms]:
  """TemCoCo's training objective: fusion loss plus the two distillation terms.

  outputs: the model's dict (`fusion`, `vi_visual`, `ir_seg`, `vi_seg`); gt_ir, gt_vi:
  (B, T, H, W, 3) clean targets in [0, 1]. targets (from `teachers.distillation_targets`):
  `vgg_vi` (B*T, H/4, W/4, 256) and `dino_ir`, `dino_vi` patch tokens (B*T, H/16 * W/16, D),
  row-major over the H/16 x W/16 grid. As in the reference, the VGG term uses VIS only (its IR
  term is computed and discarded there). `targets=None` gives the fusion loss alone.
  """
  terms = temcoco_fusion_loss(outputs["fusion"], gt_ir, gt_vi)
  total = terms["loss_fusion"]
  if targets is not None:
    mse = lambda a, b: jnp.mean(jnp.square(a.reshape(b.shape) - b))
    grid = outputs["vi_seg"].shape[2:4]
    tokens = lambda x: x.reshape(x.shape[0], *grid, x.shape[-1])
    terms["visual_vgg"] = mse(outputs["vi_visual"], targets["vgg_vi"])
    terms["semantic_dino"] = (mse(outputs["vi_seg"], tokens(targets["dino_vi"])) +
                              mse(outputs["ir_seg"], tokens(targets["dino_ir"])))
    total = total + terms["visual_vgg"] + terms["semantic_dino"]
  terms["total"] = total
  return total, terms
