"""`python -m vidfusion_jax.export`: golden PyTorch import, the exported artifact, bf16, errors."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vidfusion_jax import checkpointing
from vidfusion_jax import export
from vidfusion_jax import frames
from vidfusion_jax import inference
from vidfusion_jax import weights

TINY_CONFIG = {"num_features": 16, "num_blocks": [1, 1, 1], "num_decoder_blocks": 1}
# Max abs difference of the bf16 export's fusion from the float32 golden output on
# golden/videofusion_a.npz (measured 0.0020 on CPU); docs/inference.md states this tolerance.
BF16_ATOL = 0.01
PLATFORM = ["--platforms", {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())]


def random_params(module, seed=0, shape=(1, 2, 4, 4, 3)):
  """Random params of the module's shapes (no compiled init): kernels N(0, 1/fan_in), else 0.1."""
  rng = np.random.default_rng(seed)
  shapes = weights.abstract_model_params(module, shape)
  scale = lambda s: 0.1 if len(s.shape) < 2 else 1 / np.sqrt(np.prod(s.shape[:-1]))
  return jax.tree.map(lambda s: (scale(s) * rng.standard_normal(s.shape)).astype(np.float32),
                      shapes)


def _nthwc(x):
  return np.ascontiguousarray(np.transpose(x, (0, 1, 3, 4, 2)))


@pytest.fixture(scope="module")
def golden(shared):
  with np.load(shared("golden/videofusion_a.npz")) as z:
    return {
        "config": json.loads(str(z["meta/config_json"])),
        "state_dict": {k.removeprefix("param/"): z[k] for k in z.files if k.startswith("param/")},
        "ir": _nthwc(z["input/ir"]), "vis": _nthwc(z["input/vi"]),
        "outputs": {k: _nthwc(z[f"output/{k}"]) for k in ("fusion", "ir", "vi")},
    }


@pytest.fixture(scope="module")
def golden_export(golden, tmp_path_factory):
  """The golden params written as a BasicSR .pth, exported with the CLI."""
  pytest.importorskip("torch", reason="the torch extra is needed to write/read .pth files")
  tmp = tmp_path_factory.mktemp("golden_export")
  weights.save_torch_checkpoint(tmp / "net_g.pth", golden["state_dict"])
  export.main(["--from_torch", str(tmp / "net_g.pth"), "--model", "videofusion",
               "--output", str(tmp / "out"), *PLATFORM])  # Config read off the tensor shapes.
  return tmp / "out"


@pytest.fixture(scope="module")
def golden_apply(golden, golden_export):
  """`model.apply` (all outputs) on the golden input with the exported params."""
  manifest = inference.read_manifest(golden_export)
  module = inference.build_model("videofusion", manifest["model"]["config"])
  params = inference.read_params(golden_export, manifest)
  return module, params, jax.jit(module.apply)({"params": params}, golden["ir"], golden["vis"])


def test_torch_checkpoint_reproduces_the_golden_outputs(golden, golden_export, golden_apply):
  _, params, outputs = golden_apply
  round_trip = weights.to_torch_state_dict("videofusion", params)
  assert set(round_trip) == set(golden["state_dict"])
  for name, value in golden["state_dict"].items():
    np.testing.assert_array_equal(round_trip[name], value, err_msg=name)
  for key, expected in golden["outputs"].items():
    np.testing.assert_allclose(np.asarray(outputs[key]), expected, atol=1e-5, err_msg=key)
  manifest = inference.read_manifest(golden_export)
  assert manifest["params"]["count"] == 1_715_126
  config = manifest["model"]["config"]
  assert manifest["model"]["name"] == "videofusion"
  assert config == {k: golden["config"][k] for k in config} and config["num_features"] == 16
  assert manifest["source"]["kind"] == "torch"
  assert manifest["exported"]["input_shape"] == "b, t, 4*h, 4*w, 3"
  assert manifest["exported"]["constraints"] == ["t >= 2"]
  assert set(manifest["versions"]) >= {"vidfusion_jax", "jax", "jaxlib", "flax"}


def test_artifact_equals_apply_at_two_shapes(golden, golden_export, golden_apply):
  module, params, outputs = golden_apply
  exported = inference.read_exported(golden_export, inference.read_manifest(golden_export))
  assert str(exported.in_avals[-1].shape) == "(b, t, 4*h, 4*w, 3)"
  call = jax.jit(exported.call)
  fused = np.asarray(call(params, golden["ir"], golden["vis"]))
  np.testing.assert_allclose(fused, np.asarray(outputs["fusion"]), atol=1e-5)
  np.testing.assert_allclose(fused, golden["outputs"]["fusion"], atol=1e-5)
  rng = np.random.default_rng(1)
  ir, vis = rng.random((2, 2, 2, 8, 12, 3), np.float32)  # Other batch, time, height, width.
  expected = jax.jit(inference.make_infer_fn(module))(params, ir, vis)
  np.testing.assert_allclose(np.asarray(call(params, ir, vis)), np.asarray(expected), atol=1e-5)


def test_config_that_does_not_fit_the_checkpoint(golden_export, tmp_path):
  with pytest.raises(SystemExit, match="do not fit the model config .*pass the config"):
    export.main(["--from_torch", str(golden_export.parent / "net_g.pth"), "--model",
                 "videofusion", "--config", '{"num_features": 32}', "--output", str(tmp_path / "o"),
                 *PLATFORM])
  assert not (tmp_path / "o").exists()


def test_bfloat16_export_stays_within_tolerance(golden, golden_apply, tmp_path):
  _, params, _ = golden_apply
  manifest = export.export_model(tmp_path / "bf16", "videofusion", golden["config"], params,
                                 dtype="bfloat16", platforms=PLATFORM[1:])
  assert manifest["dtype"] == "bfloat16"
  assert {dtype for _, dtype in manifest["params"]["shapes"].values()} == {"bfloat16"}
  fuser = inference.Fuser.load(tmp_path / "bf16", backend="artifact")
  stored = jax.tree.leaves(fuser.params)[0]
  assert stored.dtype == jnp.bfloat16
  fused = fuser.fuse(golden["ir"][0], golden["vis"][0])
  error = np.abs(fused - golden["outputs"]["fusion"][0])
  assert 0 < error.max() <= BF16_ATOL, error.max()


def test_workdir_export_keeps_params_only(tmp_path):
  module = inference.build_model("videofusion", TINY_CONFIG)
  steps = {1: random_params(module, 1), 2: random_params(module, 2)}
  config = ml_collections.ConfigDict({"model": {"name": "videofusion", "config": TINY_CONFIG}})
  checkpointing.save_config(tmp_path / "wd", config)
  checkpointer = checkpointing.Checkpointer(tmp_path / "wd", async_checkpointing=False)
  for step, params in steps.items():
    opt_state = {"mu": jax.tree.map(np.ones_like, params)}
    checkpointer.save(step, {"params": params, "opt_state": opt_state, "step": step}, force=True)
  checkpointer.close()

  for step, argv in ((2, []), (1, ["--step", "1"])):
    out = tmp_path / f"out{step}"
    export.main(["--workdir", str(tmp_path / "wd"), "--output", str(out), *argv])
    manifest = inference.read_manifest(out)
    stored = inference.read_params(out, manifest)
    assert manifest["model"] == {"name": "videofusion", "config": TINY_CONFIG}
    assert manifest["source"]["kind"] == "workdir" and manifest["source"]["step"] == step
    assert manifest["exported"]["platforms"] == ["cpu", "cuda"]
    assert (out / "params.msgpack").stat().st_size < 4 * manifest["params"]["count"] + 100_000
    expected = inference.flatten_params(steps[step])
    got = inference.flatten_params(stored)
    assert set(got) == set(expected)  # No optimizer state.
    for name in expected:
      np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_export_errors(tmp_path, capsys):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(SystemExit, match="--from_torch needs --model"):
    export.main(["--from_torch", "x.pth", "--output", str(tmp_path / "o")])
  with pytest.raises(ValueError, match="exists and is not empty.*--overwrite"):
    export.export_model(tmp_path / "full", "videofusion", {}, {})
  with pytest.raises(SystemExit, match="is missing: is .* a training workdir"):
    export.main(["--workdir", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
  assert not (tmp_path / "o").exists()
  with pytest.raises(SystemExit):
    export.main(["--output", str(tmp_path / "o")])
  assert "Exactly one of (workdir, from_torch)" in capsys.readouterr().err


def test_model_dir_errors(tmp_path):
  module = inference.build_model("videofusion", TINY_CONFIG)
  out = tmp_path / "m"
  other_platform = "cuda" if PLATFORM[1] == "cpu" else "cpu"
  export.export_model(out, "videofusion", TINY_CONFIG, random_params(module),
                      platforms=[other_platform])
  with pytest.raises(inference.ModelDirError, match=f"exported for \\['{other_platform}'\\], not "
                     "for this .* backend: use --backend=model"):
    inference.Fuser.load(out, backend="artifact")
  with pytest.raises(inference.ModelDirError, match="does not exist"):
    inference.read_manifest(tmp_path / "none")
  manifest = json.loads((out / "manifest.json").read_text())
  (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
  with pytest.raises(inference.ModelDirError, match="format version 99.*reads version 1"):
    inference.Fuser.load(out)
  (out / "manifest.json").write_text("{")
  with pytest.raises(inference.ModelDirError, match="not valid JSON"):
    inference.Fuser.load(out)
  (out / "manifest.json").write_text(json.dumps(manifest))
  (out / "fusion.jax_export").write_bytes(b"garbage")
  with pytest.raises(inference.ModelDirError, match="cannot load the exported function"):
    inference.Fuser.load(out, backend="artifact")
  (out / "params.msgpack").unlink()
  with pytest.raises(inference.ModelDirError, match="incomplete: params.msgpack is missing"):
    inference.Fuser.load(out)
  (out / "manifest.json").unlink()
  with pytest.raises(inference.ModelDirError, match="no manifest.json.*re-export"):
    inference.Fuser.load(out)


def test_temcoco_export_pads_to_16_and_runs_at_two_shapes(tmp_path):
  module = inference.build_model("temcoco", {})
  params = random_params(module, seed=3, shape=(1, 1, 16, 16, 3))
  manifest = export.export_model(tmp_path / "tc", "temcoco", {}, params, platforms=PLATFORM[1:])
  assert manifest["exported"]["input_shape"] == "b, t, 16*h, 16*w, 3"
  assert manifest["exported"]["input_spec"] == {"spatial_multiple": 16, "min_frames": 1}
  call = jax.jit(inference.read_exported(tmp_path / "tc", manifest).call)
  apply = jax.jit(inference.make_infer_fn(module))
  rng = np.random.default_rng(4)
  for shape in ((1, 1, 16, 16, 3), (2, 3, 32, 16, 3)):
    ir, vis = rng.random((2, *shape), np.float32)
    np.testing.assert_allclose(np.asarray(call(params, ir, vis)),
                               np.asarray(apply(params, ir, vis)), atol=1e-5, err_msg=str(shape))
  # Frames of any size: reflect-padded to 16, cropped back; the unbounded output is clipped.
  ir, vis = rng.integers(0, 256, (2, 2, 10, 20, 3), np.uint8)
  fused = inference.Fuser.load(tmp_path / "tc", backend="artifact").fuse(ir, vis)
  assert fused.std() > 0.01
  pad = ((0, 0), (0, 6), (0, 12), (0, 0))
  expected = apply(params, *[np.pad(x, pad, mode="reflect")[None] / np.float32(255)
                             for x in (ir, vis)])[0, :, :10, :20]
  np.testing.assert_allclose(fused, np.asarray(expected), atol=1e-5)
  np.testing.assert_array_equal(frames.to_uint8(fused),
                                np.round(np.clip(fused, 0, 1) * 255).astype(np.uint8))
