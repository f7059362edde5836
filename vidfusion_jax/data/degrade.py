"""Seeded degradation synthesis for datasets that have only clean frames.

Infrared: fixed-pattern stripe noise (a per-column offset shared by all frames of a clip, as from
an uncalibrated microbolometer) plus per-pixel Gaussian noise, applied equally to the three
channels. Visible: Gaussian blur and low light (a gamma curve and a gain, then sensor noise).
All functions take uint8 clips (T, H, W, 3) and return new uint8 clips of the same shape; every
random draw comes from the given `np.random.Generator`, so a seed fixes the result.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from vidfusion_jax import frames as frames_lib


@dataclasses.dataclass(frozen=True)
class DegradeOptions:
  """Ranges that the per-clip strengths are drawn from (uniformly)."""
  ir_stripe_sigma: tuple[float, float] = (2.0, 12.0)     # column offset std, in 8-bit levels
  ir_noise_sigma: tuple[float, float] = (3.0, 15.0)      # Gaussian noise std, in 8-bit levels
  vis_blur_sigma: tuple[float, float] = (0.8, 2.5)       # Gaussian blur std, in pixels
  vis_gamma: tuple[float, float] = (1.1, 1.6)            # output = gain * input ** gamma
  vis_gain: tuple[float, float] = (0.5, 0.9)
  vis_noise_sigma: tuple[float, float] = (0.5, 3.0)      # sensor noise after darkening


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
  return float(rng.uniform(*bounds))


def degrade_infrared(clip: np.ndarray, rng: np.random.Generator,
                     options: DegradeOptions = DegradeOptions()) -> np.ndarray:
  """Stripe + Gaussian noise; the same noise on the three channels keeps gray IR gray."""
  frames, height, width, _ = clip.shape
  stripe = rng.normal(0.0, _uniform(rng, options.ir_stripe_sigma), (1, 1, width, 1))
  noise = rng.normal(0.0, _uniform(rng, options.ir_noise_sigma), (frames, height, width, 1))
  return frames_lib.to_uint8(clip.astype(np.float32) + (stripe + noise).astype(np.float32),
                             max_value=255.0)


def degrade_visible(clip: np.ndarray, rng: np.random.Generator,
                    options: DegradeOptions = DegradeOptions()) -> np.ndarray:
  """Gaussian blur, then low light (gamma and gain), then mild sensor noise."""
  sigma = _uniform(rng, options.vis_blur_sigma)
  gamma = _uniform(rng, options.vis_gamma)
  gain = _uniform(rng, options.vis_gain)
  noise_sigma = _uniform(rng, options.vis_noise_sigma)
  blurred = np.stack([cv2.GaussianBlur(frame, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
                      for frame in clip.astype(np.float32)])
  dark = 255.0 * gain * (np.clip(blurred, 0, 255) / 255.0) ** gamma
  return frames_lib.to_uint8(dark + rng.normal(0.0, noise_sigma, clip.shape).astype(np.float32),
                             max_value=255.0)


def degrade_clip(gt_ir: np.ndarray, gt_vis: np.ndarray, rng: np.random.Generator,
                 options: DegradeOptions = DegradeOptions()) -> tuple[np.ndarray, np.ndarray]:
  """(lq_ir, lq_vis) from clean clips; IR and VIS draw from independent child generators.

  The children are seeded from draws of `rng` (not `rng.spawn`, which would change the state of
  the seed sequence that Grain reuses for the next element).
  """
  ir_rng, vis_rng = (np.random.default_rng(seed) for seed in rng.integers(0, 2**63, 2))
  return degrade_infrared(gt_ir, ir_rng, options), degrade_visible(gt_vis, vis_rng, options)
