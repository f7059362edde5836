"""TemCoCo's feaCD and the torchvision ResNet-18 importer, against torchvision (random weights)."""

import numpy as np
import pytest

from vidfusion_jax import weights
from vidfusion_jax.metrics import feacd as feacd_lib

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def torch_resnet():
  torch.manual_seed(0)
  model = torchvision.models.resnet18().eval()  # random weights; nothing is downloaded
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in model.modules():  # non-trivial running statistics, so BatchNorm is exercised
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.7, 1.3, generator=generator)
        module.bias.normal_(0, 0.1, generator=generator)
        module.running_mean.normal_(0, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
  return model


@pytest.fixture(scope="module")
def logits_fn(torch_resnet):
  state_dict = {k: v.numpy() for k, v in torch_resnet.state_dict().items()}
  return feacd_lib.ResNet18Logits(weights.from_torch_state_dict("resnet18", state_dict))


def _reference_feacd(model, fused, ir, vis):
  """TemCoCo's released feaCD, per frame pair, with the given torchvision model."""
  run = lambda x: model(torch.tensor(x.astype(np.float32)).unsqueeze(0).permute(0, 3, 1, 2))
  values = []
  with torch.no_grad():
    for t in range(1, len(fused)):
      direction = run(fused[t - 1]) - run(fused[t])
      vis_direction = run(vis[t - 1]) - run(vis[t])
      ir_direction = run(ir[t - 1]) - run(ir[t])
      cos = torch.nn.functional.cosine_similarity(direction, vis_direction, dim=0)
      cos2 = torch.nn.functional.cosine_similarity(direction, ir_direction, dim=0)
      values.append((1 - cos).mean().numpy() + (1 - cos2).mean().numpy())
  return np.array(values, np.float64)


def test_logits_match_torchvision(torch_resnet, logits_fn):
  x = np.random.default_rng(0).uniform(0, 255, (2, 45, 61, 3)).astype(np.float32)
  with torch.no_grad():
    expected = torch_resnet(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = logits_fn(x)
  assert got.shape == (2, 1000)
  assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max()


def test_feacd_matches_the_released_code(torch_resnet, logits_fn):
  rng = np.random.default_rng(1)
  vis = rng.uniform(0, 255, (4, 40, 56, 3)).astype(np.float32)
  ir = np.repeat(rng.uniform(0, 255, (4, 40, 56, 1)), 3, -1).astype(np.float32)
  fused = (0.5 * vis + 0.5 * ir).round()
  got = feacd_lib.feacd(fused, ir[..., 0], vis, logits_fn, batch_size=8)
  expected = _reference_feacd(torch_resnet, fused, ir, vis)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert 0.3 < expected.mean() < 3.7  # signs disagree on some logits, not all
  # A fused video equal to VIS agrees with it on every logit: only the IR term is left.
  only_ir = feacd_lib.feacd(vis, ir, vis, logits_fn, batch_size=8)
  np.testing.assert_allclose(only_ir, _reference_feacd(torch_resnet, vis, ir, vis), atol=1e-6)


def test_importer_and_validation(torch_resnet, logits_fn):
  state_dict = {k: v.numpy() for k, v in torch_resnet.state_dict().items()}
  exported = weights.to_torch_state_dict("resnet18", logits_fn.params)
  assert set(state_dict) - set(exported) == {k for k in state_dict
                                             if k.endswith("num_batches_tracked")}
  for name, value in exported.items():
    np.testing.assert_array_equal(value, state_dict[name])
  with pytest.raises(ValueError, match="missing tensors: 'fc.bias'"):
    weights.from_torch_state_dict("resnet18", {k: v for k, v in state_dict.items()
                                               if k != "fc.bias"})
  frames = np.zeros((3, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match="share one shape"):
    feacd_lib.feacd(frames, frames[:2], frames, logits_fn)
