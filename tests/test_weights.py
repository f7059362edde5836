"""PyTorch <-> Flax weight conversion (vidfusion_jax.weights) on the golden VideoFusion state_dicts."""

import sys

import jax
import numpy as np
import pytest

from vidfusion_jax import weights


@pytest.fixture(scope="module")
def state_dict(shared):
  with np.load(shared("golden/videofusion_b.npz")) as z:
    return {k[6:]: z[k] for k in z.files if k.startswith("param/")}


@pytest.fixture(scope="module")
def params(state_dict):
  return weights.from_torch_state_dict("videofusion", state_dict)


def _path(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def test_import_layouts_and_names(state_dict, params):
  # The scanned blocks' params are stacked: 464 PyTorch tensors become 286 Flax leaves.
  assert len(state_dict) == 464 and len(jax.tree.leaves(params)) == 286
  np.testing.assert_array_equal(_path(params, "conv3d_ir_1/module_0/kernel"),
                                state_dict["conv3d_ir_1.module.0.weight"].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(
      _path(params, "fusion_enhance_1/transformer/attn/qkv/kernel")[1],
      state_dict["fusion_enhance_1.transformer.1.attn.qkv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      _path(params, "ir_conv_enhance_2/blocks_0/conv2/bias")[3],
      state_dict["ir_conv_enhance_2.blocks.0.3.conv2.bias"])
  np.testing.assert_array_equal(
      _path(params, "co_attention_3/layers/co_transformer/attn/temperature"),
      np.stack([state_dict[f"co_attention_3.layers.{i}.co_transformer.attn.temperature"]
                for i in range(4)]).reshape(4, 8))
  np.testing.assert_array_equal(
      _path(params, "decoder_vi/decoder/norm2/body/weight")[0],
      state_dict["decoder_vi.decoder.0.norm2.body.weight"])
  # The 14 LayerNorm tensors that forward never uses are kept so strict checkpoints round-trip.
  unused = [k for k in state_dict if ".attn.norm." in k]
  assert len(unused) == 14
  for name in unused:
    flax_path = weights.torch_name_to_flax_path(name, state_dict[name].ndim)
    np.testing.assert_array_equal(_path(params, "/".join(flax_path)), state_dict[name])


def test_round_trip_is_exact(state_dict, params):
  back = weights.to_torch_state_dict("videofusion", {"params": params})
  assert set(back) == set(state_dict)
  for name, value in state_dict.items():
    assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_infer_config(state_dict):
  assert weights.infer_videofusion_config(state_dict) == {
      "in_channels": 3, "out_channels": 3, "num_features": 32, "num_blocks": [2, 2, 4],
      "num_decoder_blocks": 2, "num_heads": [2, 4, 8], "ffn_expansion_factor": 1.0, "bias": False,
      "LayerNorm_type": "WithBias"}


def test_missing_tensor_is_named(state_dict):
  broken = dict(state_dict)
  del broken["fusion_2.cross_transformer.attn.kv_dwconv.weight"]
  with pytest.raises(ValueError, match=r"missing tensors: 'fusion_2\.cross_transformer\.attn\."
                                       r"kv_dwconv\.weight'"):
    weights.from_torch_state_dict("videofusion", broken)


def test_unexpected_tensor_is_named(state_dict):
  broken = {**state_dict, "fusion_2.cross_transformer.attn.extra.weight": np.zeros((1, 1, 1, 1))}
  with pytest.raises(ValueError, match=r"unexpected tensors: 'fusion_2\.cross_transformer\.attn\."
                                       r"extra\.weight'"):
    weights.from_torch_state_dict("videofusion", broken)


def test_misshaped_tensor_is_named(state_dict):
  broken = {**state_dict, "up1.body.2.weight": np.zeros((32, 32, 1, 1), np.float32)}
  with pytest.raises(ValueError, match=r"'up1\.body\.2\.weight' has shape \(32, 32, 1, 1\).*"
                                       r"expects \(32, 32, 3, 3\)"):
    weights.from_torch_state_dict("videofusion", broken)


def test_unknown_model_name(state_dict):
  with pytest.raises(ValueError, match="no weight mapping for model 'nope'"):
    weights.from_torch_state_dict("nope", state_dict)


def test_pth_round_trip_through_torch(state_dict, params, tmp_path):
  torch = pytest.importorskip("torch", reason="the optional torch extra is not installed")
  path = tmp_path / "net_g.pth"
  weights.save_torch_checkpoint(path, weights.to_torch_state_dict("videofusion", params))
  raw = torch.load(path, weights_only=True)
  assert set(raw) == {"params"} and set(raw["params"]) == set(state_dict)
  loaded = weights.load_torch_checkpoint(path)
  reimported = weights.from_torch_state_dict("videofusion", loaded)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reimported)):
    np.testing.assert_array_equal(a, b)
  # A DDP-style bare state_dict with `module.` prefixes loads to the same names.
  ddp_path = tmp_path / "ddp.pth"
  torch.save({f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}, ddp_path)
  ddp = weights.load_torch_checkpoint(ddp_path)
  assert set(ddp) == set(state_dict)
  np.testing.assert_array_equal(ddp["up1.body.2.bias"], state_dict["up1.body.2.bias"])


def test_pth_without_torch_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"pip install 'vidfusion-jax\[torch\]'"):
    weights.load_torch_checkpoint(tmp_path / "x.pth")
