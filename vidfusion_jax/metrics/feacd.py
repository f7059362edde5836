"""TemCoCo's feaCD: does the fused video's frame-to-frame change point where the sources' does?

As released (`metrics.py` of github.com/Meiqi-Gong/TemCoCo): the change of a frame pair is the
difference of torchvision ResNet-18 logits, m = logits(X_{t-1}) - logits(X_t), computed on the frames
as given (no ImageNet normalisation, no resizing). It is compared with
`F.cosine_similarity(m_fused, m_source, dim=0)` on (1, 1000) tensors, i.e. over the batch axis of
length 1: per logit, (a / max(|a|, 1e-8)) * (b / max(|b|, 1e-8)), the agreement of the two signs.

  feaCD(t) = mean_logits(1 - cos(m_F, m_VIS)) + mean_logits(1 - cos(m_F, m_IR)),  t = 1..T-1,

in [0, 4], lower is better; the video value is the mean over t. The weights are torchvision's
ImageNet `resnet18` (what `pretrained=True` loads), imported from a file the user gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax.models import schedule as schedule_lib

COSINE_EPS = 1e-8


class ResNet18Logits:
  """Batched, jitted ResNet-18 logits: (N, H, W, 3) -> (N, 1000)."""

  def __init__(self, params, name: str = "resnet18"):
    from vidfusion_jax.models import resnet  # pylint: disable=import-outside-toplevel
    self.params, self.name = params, name
    model = resnet.ResNet18(params["fc"]["kernel"].shape[-1])
    self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x),
                          compiler_options=schedule_lib.compiler_options())

  @classmethod
  def from_checkpoint(cls, path: str) -> "ResNet18Logits":
    """From a torchvision state dict file, e.g. resnet18-f37072fd.pth (ResNet18_Weights.IMAGENET1K_V1)."""
    from vidfusion_jax import weights  # pylint: disable=import-outside-toplevel
    return cls(weights.from_torch_state_dict("resnet18", weights.load_torch_checkpoint(path)))

  def __call__(self, frames: np.ndarray) -> np.ndarray:
    return np.asarray(self._apply(self.params, jnp.asarray(frames, jnp.float32)))


def _rgb_video(video, name: str) -> np.ndarray:
  video = np.asarray(video, np.float32)
  if video.ndim == 3:
    video = video[..., None]
  if video.ndim != 4 or video.shape[-1] not in (1, 3):
    raise ValueError(f"{name} must be (T, H, W), (T, H, W, 1) or (T, H, W, 3); got {video.shape}")
  return np.broadcast_to(video, video.shape[:3] + (3,))


@jax.jit
def _sign_agreement_distance(motion_fused: jax.Array, motion_source: jax.Array) -> jax.Array:
  unit = lambda m: m / jnp.maximum(jnp.abs(m), COSINE_EPS)
  return jnp.mean(1 - unit(motion_fused) * unit(motion_source), axis=-1)


def feacd(fused: np.ndarray, ir: np.ndarray, vis: np.ndarray, logits_fn,
          batch_size: int = 16) -> np.ndarray:
  """Per-frame feaCD (T-1,) for t = 1..T-1. Frames are fed to `logits_fn` ((N, H, W, 3) -> (N, K))
  as given (gray stacked to 3 channels); each frame's logits are computed once, `batch_size`
  frames per call."""
  videos = [_rgb_video(v, n) for v, n in ((fused, "fused"), (ir, "ir"), (vis, "vis"))]
  if not videos[0].shape == videos[1].shape == videos[2].shape or videos[0].shape[0] < 2:
    raise ValueError("fused, ir and vis must share one shape with at least 2 frames; got "
                     f"{[v.shape for v in videos]}")
  frames = np.concatenate(videos)
  count = len(frames)
  # The last batch is padded to full size, so that a jitted logits_fn compiles once.
  frames = np.concatenate([frames, frames[-1:].repeat(-count % batch_size, 0)])
  logits = np.concatenate([np.asarray(logits_fn(frames[i:i + batch_size]), np.float32)
                           for i in range(0, len(frames), batch_size)])[:count]
  motion = lambda x: x[:-1] - x[1:]  # logits(X_{t-1}) - logits(X_t)
  fused_logits, ir_logits, vis_logits = np.split(logits, 3)
  m_fused = motion(fused_logits)
  return np.asarray(_sign_agreement_distance(m_fused, motion(vis_logits)) +
                    _sign_agreement_distance(m_fused, motion(ir_logits)), np.float64)
