"""TemCoCo's frozen teachers (VGG19 features[:12], DINOv2 ViT) against reference outputs."""

import jax
import numpy as np
import pytest

from vidfusion_jax import weights
from vidfusion_jax.models import teachers

MINI_HEADS = 4  # dinov2_mini.npz: embed_dim 64, depth 2, 4 heads of 16


@pytest.fixture(scope="module")
def dino_golden(shared):
  with np.load(shared("golden/dinov2_mini.npz")) as z:
    return {k: z[k] for k in z.files}


def _dino_state_dict(golden, prefix=""):
  start = prefix + "param/"
  return {k[len(start):]: v for k, v in golden.items() if k.startswith(start)}


@pytest.fixture(scope="module")
def dino_apply():
  model = teachers.DinoVisionTransformer(embed_dim=64, depth=2, num_heads=MINI_HEADS)
  return jax.jit(lambda p, x: model.apply({"params": p}, x))


@pytest.fixture(scope="module")
def temcoco_golden(shared):
  keys = ("loss_in/gt_ir", "loss_in/gt_vi", "loss_in/vgg_vi_target", "loss_in/vgg_ir_target",
          "loss_in/dino_vi_input", "loss_in/dino_ir_input")
  with np.load(shared("golden/temcoco_a.npz")) as z:
    golden = {k: z[k] for k in keys}
    golden["vgg_state_dict"] = {f"features.{k.split('/')[1]}": z[k] for k in z.files
                                if k.startswith("teacher_vgg19_features/")}
  return golden


def _frames_last(clip: np.ndarray) -> np.ndarray:
  """Reference (B, T, 3, H, W) -> (B*T, H, W, 3)."""
  return clip.reshape(-1, *clip.shape[2:]).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("prefix,atol", [("", 1e-5), ("stress/", 3e-5)])
@pytest.mark.parametrize("size", ["x196", "x224"])
def test_dinov2_matches_reference(dino_golden, dino_apply, prefix, atol, size):
  """14x14 and 16x16 patch grids (both interpolate the 37x37 pos table); the stress set has x5
  Linear weights so softmax and GELU are exercised."""
  state_dict = _dino_state_dict(dino_golden, prefix)
  assert teachers.dinov2_dims(state_dict) == dict(embed_dim=64, depth=2)
  params = weights.from_torch_state_dict("dinov2", state_dict)
  out = dino_apply(params, dino_golden[f"input/{size}"].transpose(0, 2, 3, 1))
  for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
    err = np.abs(np.asarray(out[key]) - dino_golden[f"{prefix}output/{size}/{key}"]).max()
    assert err <= atol, (key, err)


@pytest.mark.parametrize("size,grid", [("x196", 14), ("x224", 16)])
def test_dinov2_pos_embed_interpolation(dino_golden, size, grid):
  pos = teachers.interpolate_pos_embed(dino_golden["param/pos_embed"], grid, grid)
  err = np.abs(np.asarray(pos) - dino_golden[f"output/{size}/pos_embed_interp"]).max()
  assert err <= 1e-6, err
  full = teachers.interpolate_pos_embed(dino_golden["param/pos_embed"], 37, 37)
  np.testing.assert_array_equal(full, dino_golden["param/pos_embed"])


def test_dinov2_state_dict_round_trip(dino_golden):
  state_dict = _dino_state_dict(dino_golden)
  exported = weights.to_torch_state_dict(
      "dinov2", weights.from_torch_state_dict("dinov2", state_dict))
  assert sorted(exported) == sorted(state_dict)
  for name, value in state_dict.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_dinov2_import_names_problems(dino_golden):
  state_dict = _dino_state_dict(dino_golden)
  del state_dict["blocks.1.ls2.gamma"]
  state_dict["register_tokens"] = np.zeros((1, 4, 64), np.float32)
  with pytest.raises(ValueError, match=r"missing tensors: 'blocks.1.ls2.gamma'.*"
                     r"unexpected tensors: 'register_tokens'"):
    weights.from_torch_state_dict("dinov2", state_dict)
  with pytest.raises(ValueError, match="cls_token"):
    weights.from_torch_state_dict("dinov2", {"pos_embed": np.zeros((1, 1370, 64))})


@pytest.fixture(scope="module")
def vgg_params(temcoco_golden):
  full = dict(temcoco_golden["vgg_state_dict"])
  # A torchvision checkpoint also has later feature layers and the classifier: dropped.
  full["features.12.weight"] = np.zeros((256, 256, 3, 3), np.float32)
  full["classifier.0.weight"] = np.zeros((4096, 25088), np.float32)
  return weights.from_torch_state_dict("vgg19", teachers.vgg19_features_only(full))


def test_vgg19_matches_reference_targets(temcoco_golden, vgg_params):
  """relu3_1 of the raw [0, 1] GT frames (no ImageNet normalisation), both modalities."""
  apply = jax.jit(teachers.VGG19Features().apply)
  for stream in ("vi", "ir"):
    out = apply({"params": vgg_params}, _frames_last(temcoco_golden[f"loss_in/gt_{stream}"]))
    want = temcoco_golden[f"loss_in/vgg_{stream}_target"]
    err = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - want).max()
    assert err <= 1e-4, (stream, err)


def test_vgg19_round_trip_and_unknown_names(temcoco_golden, vgg_params):
  exported = weights.to_torch_state_dict("vgg19", vgg_params)
  assert sorted(exported) == sorted(temcoco_golden["vgg_state_dict"])
  for name, value in temcoco_golden["vgg_state_dict"].items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  with pytest.raises(ValueError, match="unexpected tensors: 'fc.weight'"):
    weights.from_torch_state_dict(
        "vgg19", {**temcoco_golden["vgg_state_dict"], "fc.weight": np.zeros((2, 2))})


def test_dino_input_resize_matches_reference(temcoco_golden):
  """Bilinear (align_corners=False, no antialias) 64 -> 56 = (H//16)*14."""
  for stream in ("vi", "ir"):
    frames = _frames_last(temcoco_golden[f"loss_in/gt_{stream}"])
    size = teachers.dino_input_size(*frames.shape[1:3])
    assert size == (56, 56)
    out = teachers.resize_bilinear(frames, *size)
    want = temcoco_golden[f"loss_in/dino_{stream}_input"]
    err = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - want).max()
    assert err <= 1e-6, (stream, err)


def test_distillation_targets(temcoco_golden, vgg_params, dino_golden, dino_apply):
  """The trainer's teacher step: VGG on VIS, DINOv2 on both resized modalities, no gradients."""
  dino_params = weights.from_torch_state_dict("dinov2", _dino_state_dict(dino_golden))
  frozen = teachers.Teachers(vgg=vgg_params, dino=dino_params, dino_num_heads=MINI_HEADS)
  to_clip = lambda x: x.transpose(0, 1, 3, 4, 2)
  gt_ir, gt_vi = (to_clip(temcoco_golden[f"loss_in/gt_{s}"]) for s in ("ir", "vi"))
  targets = jax.jit(teachers.distillation_targets)(frozen, gt_ir, gt_vi)
  want_ir = dino_apply(dino_params,
                       temcoco_golden["loss_in/dino_ir_input"].transpose(0, 2, 3, 1))
  assert sorted(targets) == ["dino_ir", "dino_vi", "vgg_vi"]
  err = np.abs(np.asarray(targets["vgg_vi"]).transpose(0, 3, 1, 2) -
               temcoco_golden["loss_in/vgg_vi_target"]).max()
  assert err <= 1e-4, err
  assert targets["dino_ir"].shape == (4, 16, 64)
  err = np.abs(np.asarray(targets["dino_ir"]) - np.asarray(want_ir["x_norm_patchtokens"])).max()
  assert err <= 1e-5, err
  grads = jax.jit(jax.grad(lambda t: sum(x.sum() for x in teachers.distillation_targets(
      t, gt_ir, gt_vi).values())))(frozen)
  assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))
