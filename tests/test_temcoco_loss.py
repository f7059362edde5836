"""TemCoCo's training loss against the reference loss values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax import losses

FUSION_TERMS = ("loss_ssim", "loss_intensity_max", "loss_pixel_consist", "loss_color", "loss_grad",
                "loss_temporary_consist", "loss_fusion")


@pytest.fixture(scope="module")
def golden(shared):
  with np.load(shared("golden/temcoco_a.npz")) as z:
    return {k: z[k] for k in z.files if k.startswith(("loss", "output/"))}


def _inputs(z):
  video = lambda a: a.transpose(0, 2, 3, 4, 1)  # (B, C, T, H, W) -> (B, T, H, W, C)
  seg = lambda a: a.transpose(0, 2, 3, 1).reshape(1, -1, *a.shape[2:], a.shape[1])
  outputs = dict(fusion=video(z["output/fused"]), vi_visual=video(z["output/vi_feat/visual"]),
                 vi_seg=seg(z["output/vi_feat/seg"]), ir_seg=seg(z["output/ir_feat/seg"]),
                 ir_visual=video(z["output/ir_feat/visual"]))
  clip = lambda a: a.transpose(0, 1, 3, 4, 2)
  targets = dict(vgg_vi=z["loss_in/vgg_vi_target"].transpose(0, 2, 3, 1),
                 dino_vi=z["loss_in/dino_vi_patchtokens"],
                 dino_ir=z["loss_in/dino_ir_patchtokens"])
  return outputs, clip(z["loss_in/gt_ir"]), clip(z["loss_in/gt_vi"]), targets


def test_every_term_matches_reference(golden):
  """Fusion terms, the VIS-only VGG term, both DINO terms and the total, rtol 1e-4."""
  outputs, gt_ir, gt_vi, targets = _inputs(golden)
  total, terms = jax.jit(losses.temcoco_loss)(outputs, gt_ir, gt_vi, targets)
  assert sorted(terms) == sorted(FUSION_TERMS + ("visual_vgg", "semantic_dino", "total"))
  for name, value in terms.items():
    np.testing.assert_allclose(value, golden[f"loss/{name}"], rtol=1e-4, err_msg=name)
  np.testing.assert_allclose(total, golden["loss/total"], rtol=1e-4)
  # The reference computes and drops the IR VGG term; it must not be in the total.
  assert abs(float(golden["loss/visual_vgg_ir_term_unused"])) > 1e-3


def test_fusion_only_and_single_frame(golden):
  outputs, gt_ir, gt_vi, _ = _inputs(golden)
  total, terms = losses.temcoco_loss(outputs, gt_ir, gt_vi, None)
  assert sorted(terms) == sorted(FUSION_TERMS + ("total",))
  np.testing.assert_allclose(total, golden["loss/loss_fusion"], rtol=1e-4)
  one = {k: v[:, :1] for k, v in outputs.items()}
  _, terms = losses.temcoco_loss(one, gt_ir[:, :1], gt_vi[:, :1], None)
  assert float(terms["loss_temporary_consist"]) == 0.0


def test_temporal_term_compares_against_ir_only(golden):
  """Changing the VIS clip's motion leaves the temporal term unchanged; IR motion changes it."""
  outputs, gt_ir, gt_vi, _ = _inputs(golden)
  term = lambda ir, vi: float(losses.temcoco_fusion_loss(
      jnp.asarray(outputs["fusion"]), ir, vi)["loss_temporary_consist"])
  base = term(gt_ir, gt_vi)
  assert term(gt_ir, gt_vi[:, ::-1]) == base
  assert abs(term(gt_ir[:, ::-1], gt_vi) - base) > 1e-3
