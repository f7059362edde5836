"""`python -m vidfusion_jax.train --config=configs/temcoco.py:tiny` on converted m3svd_mini data,
distilling from teacher checkpoints written in the official PyTorch formats."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from vidfusion_jax import checkpointing
from vidfusion_jax import objectives
from vidfusion_jax import weights

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
VITL_WIDTH = 1024  # TemCoCo's segmentation heads fix the DINOv2 width; depth is free.


def _write_teacher_checkpoints(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Random torchvision-style VGG19 and one-block DINOv2 ViT-L/14-style state dicts."""
  generator = torch.Generator().manual_seed(0)
  randn = lambda *shape: 0.05 * torch.randn(*shape, generator=generator)
  vgg = {}
  widths = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
            (12, 256, 256))  # layer 12 is past features[:12]: the importer must drop it
  for index, cin, cout in widths:
    vgg[f"features.{index}.weight"] = randn(cout, cin, 3, 3)
    vgg[f"features.{index}.bias"] = randn(cout)
  vgg["classifier.6.bias"] = randn(1000)
  d = VITL_WIDTH
  dino = {"cls_token": randn(1, 1, d), "pos_embed": randn(1, 1370, d), "mask_token": randn(1, d),
          "patch_embed.proj.weight": randn(d, 3, 14, 14), "patch_embed.proj.bias": randn(d),
          "norm.weight": 1 + randn(d), "norm.bias": randn(d)}
  shapes = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
            "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "ls1.gamma": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
            "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,),
            "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,), "ls2.gamma": (d,)}
  dino.update({f"blocks.0.{name}": randn(*shape) for name, shape in shapes.items()})
  paths = folder / "vgg19.pth", folder / "dinov2_vitl14_depth1.pth"
  torch.save(vgg, paths[0])
  torch.save(dino, paths[1])
  return paths


def test_missing_teachers_are_refused_with_sources(tmp_path):
  spec = importlib.util.spec_from_file_location("temcoco_config", ROOT / "configs/temcoco.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  load = objectives.get_objective("temcoco").load_teachers
  with pytest.raises(ValueError, match=r"teachers.vgg19=''.*teachers.dinov2=''.*vgg19-dcbb9e9d"
                     r".*dinov2_vitl14_pretrain.pth"):
    load(config)
  config.teachers.vgg19 = str(tmp_path / "absent.pth")
  with pytest.raises(ValueError, match="absent.pth"):
    load(config)
  config.teachers.distillation = False
  assert load(config) is None


@pytest.mark.slow
def test_tiny_config_trains_on_m3svd_mini(shared, tmp_path):
  data = tmp_path / "data"
  subprocess.run(
      [sys.executable, "-m", "data_prep", "m3svd", "--input", str(shared("data/m3svd_mini")),
       "--output", str(data), "--split", "train=0111_1716", "--split", "val=0115_1831",
       "--clip-length", "3", "--no-progress"], check=True, cwd=ROOT)
  vgg, dino = _write_teacher_checkpoints(tmp_path)
  workdir = tmp_path / "workdir"
  subprocess.run(
      [sys.executable, "-m", "vidfusion_jax.train", "--config=configs/temcoco.py:tiny",
       f"--workdir={workdir}", f"--config.data.path={data}",
       f"--config.teachers.vgg19={vgg}", f"--config.teachers.dinov2={dino}"],
      check=True, cwd=ROOT)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  for record in train:
    for term in ("loss_fusion", "visual_vgg", "semantic_dino", "total"):
      assert np.isfinite(record[f"train/{term}"]) and record[f"train/{term}"] > 0, term
    np.testing.assert_allclose(
        record["train/total"],
        record["train/loss_fusion"] + record["train/visual_vgg"] + record["train/semantic_dino"],
        rtol=1e-5)
  # Step decay x0.95 after every step (decay_every_steps = 1 in the tiny variant).
  np.testing.assert_allclose([r["train/learning_rate"] for r in train], [1e-4, 0.95e-4],
                             rtol=1e-6)
  assert any("eval/psnr_fused" in r for r in records)
  params, config = checkpointing.load_params(workdir)
  assert config.model.name == "temcoco"
  state_dict = weights.to_torch_state_dict("temcoco", params)
  assert len(state_dict) == 371
  assert all(np.isfinite(v).all() for v in state_dict.values())
