"""Optimizer recipe, non-finite stop, and the TFRecord + evaluation path of the training loop."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from test_train_standin import assert_params_close, get_config, load_config_module, losses_by_step
from test_train_standin import register
from vidfusion_jax import checkpointing
from vidfusion_jax import data
from vidfusion_jax import logging_utils
from vidfusion_jax import sharding
from vidfusion_jax import train


def _spec_learning_rate(i: int) -> float:
  """specs/videofusion.md section 8, with 1-based iteration i."""
  if i < 5000:
    return 1e-4 * i / 5000
  return 1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * (i - 1) / 500000))


def test_official_config_recipe():
  config = load_config_module("videofusion").get_config()
  assert config.batch_size == 12 and config.data.clip_length == 6 and config.data.crop_size == 128
  assert config.seed == 3047
  opt = config.optimizer
  assert (opt.learning_rate, opt.weight_decay, opt.b1, opt.b2, opt.eps, opt.grad_clip_norm) == (
      1e-4, 1e-5, 0.9, 0.999, 1e-8, 0.01)
  assert config.model.config.num_features == 32 and config.model.name == "videofusion"
  schedule = train.learning_rate_schedule(opt)
  for i in (1, 2, 2500, 4999, 5000, 5001, 100_000, 250_001, 499_999):
    np.testing.assert_allclose(float(schedule(i - 1)), _spec_learning_rate(i), rtol=2e-6,
                               err_msg=f"iteration {i}")


def test_step_decay_schedule():
  config = load_config_module("videofusion").get_config()
  config.optimizer.update(schedule="step_decay", learning_rate=5e-4, decay_every_steps=200,
                          decay_rate=0.95)
  schedule = train.learning_rate_schedule(config.optimizer)
  # The update of iteration i (1-based) uses 5e-4 * 0.95 ** floor((i - 1) / 200).
  for i, expected in ((1, 5e-4), (200, 5e-4), (201, 5e-4 * 0.95), (401, 5e-4 * 0.95**2)):
    np.testing.assert_allclose(float(schedule(i - 1)), expected, rtol=1e-6)


def test_optimizer_matches_torch_clip_then_adamw():
  """One update equals clip_grad_norm_ (norm + 1e-6) followed by torch.optim.AdamW."""
  config = load_config_module("videofusion").get_config()
  opt = config.optimizer
  optimizer = train.make_optimizer(opt)
  params = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[0.25]])}
  grads = {"a": jnp.array([3.0, -4.0, 0.0]), "b": jnp.array([[12.0]])}
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)

  norm = math.sqrt(9 + 16 + 144)
  lr = _spec_learning_rate(1)
  for key in params:
    p, g = np.asarray(params[key], np.float64), np.asarray(grads[key], np.float64)
    g = g * min(1.0, opt.grad_clip_norm / (norm + 1e-6))
    m_hat, v_hat = g, g * g  # first step: bias correction cancels (1 - b)
    expected = p * (1 - lr * opt.weight_decay) - lr * m_hat / (np.sqrt(v_hat) + opt.eps)
    np.testing.assert_allclose(np.asarray(new[key]), expected, rtol=1e-6)


def test_nonfinite_update_stops_and_keeps_last_good_checkpoint(standin_reference, tmp_path):
  """A NaN learning rate from step 21 on: training stops at step 21 naming it; step 20 stays."""
  workdir = tmp_path / "run"
  shutil.copytree(standin_reference["workdir"], workdir)
  config = get_config()
  config.total_steps = 24
  config.checkpoint_every_steps = 1
  config.optimizer.schedule = "constant"
  config.optimizer.learning_rate = float("nan")
  with pytest.raises(train.NonFiniteLossError,
                     match=r"non-finite training at step 21 .*last good checkpoint is step 20"):
    train.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir, read_only=True).all_steps() == [16, 20]
  params, _ = checkpointing.load_params(workdir)
  assert_params_close(params, standin_reference["params"], rtol=0)


def test_bfloat16_compute_with_remat(standin_reference, tmp_path):
  """bf16 compute + remat: float32 params and moments, losses within bf16 error of float32."""
  config = get_config()
  config.total_steps = 2
  config.model.update(dtype="bfloat16", remat=True)
  state = train.train_and_evaluate(config, tmp_path)
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state[1][0].mu))} == {
      np.dtype(np.float32)}
  losses = losses_by_step(tmp_path)
  reference = standin_reference["losses"]
  np.testing.assert_allclose([losses[1], losses[2]], [reference[1], reference[2]], rtol=2e-2)
  assert losses[1] != reference[1]  # the compute really ran in bfloat16


def test_init_state_holds_the_default_compile_values():
  """On CPU the train state's init compiles without LLVM's optimisations
  (`schedule.init_compiler_options`). The random bits are the same; their scaling, without fused
  multiply-adds, rounds differently: every leaf is within 2 float32 eps x its largest magnitude
  of the default compile's (measured on both networks' tiny and official configs: at most 1.56),
  and some differ (so the options reached the compiler)."""
  register()
  config = get_config()
  trainer = train.make_trainer(config, sharding.mesh_from_config(config))
  default = jax.jit(trainer.init_state.__wrapped__, out_shardings=trainer.state_shardings)
  state, expected = trainer.init_state(), default()
  assert jax.tree.structure(state) == jax.tree.structure(expected)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state),
                                                      jax.tree.leaves(expected)))
  for leaf, expected_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      scale = np.abs(np.asarray(expected_leaf)).max()
      np.testing.assert_allclose(np.asarray(leaf), np.asarray(expected_leaf), rtol=0,
                                 atol=2 * np.finfo(np.float32).eps * scale)
    else:
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected_leaf))


def test_tfrecord_training_with_evaluation(tmp_path):
  """Real pipeline: trains on a converted dataset, evaluates, writes the grid and the summaries."""
  register()
  dataset = tmp_path / "dataset"
  for split in ("train", "val"):
    data.make_synthetic_dataset(dataset, split=split, num_sequences=1, num_frames=6, height=32,
                                width=32, clip_length=3)
  config = get_config()
  config.data.update(source="tfrecord", path=str(dataset), clip_length=3, crop_size=16)
  config.batch_size = 2
  config.total_steps = 4
  config.eval_every_steps = 2
  config.eval.update(clip_length=3, crop_size=24, num_grid_frames=2)
  workdir = tmp_path / "workdir"
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 4

  records = logging_utils.read_metrics(workdir)
  evals = [r for r in records if "eval/psnr_fused" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert {"eval/psnr_ir", "eval/psnr_vi", "eval/ssim_ir", "eval/ssim_vi", "eval/fusion/EN",
          "eval/fusion/AG"} <= set(evals[-1])
  for record in evals:
    assert all(math.isfinite(v) for k, v in record.items() if k.startswith("eval/"))
  grid = np.asarray(Image.open(workdir / "eval" / "step_00000004.png"))
  assert grid.shape == (2 * 24, 3 * 24, 3)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

  # The logged evaluation equals a recomputation from the saved params, clip by clip.
  params, _ = checkpointing.load_params(workdir)
  trainer = train.make_trainer(config, sharding.mesh_from_config(config))
  metrics, recomputed_grid = train.evaluate(trainer, params)
  for name, value in metrics.items():
    np.testing.assert_allclose(evals[-1][f"eval/{name}"], value, rtol=1e-6)
  np.testing.assert_array_equal(recomputed_grid, grid)


def test_psnr_and_ssim():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 255, (32, 32, 3), np.uint8)
  b = a + np.uint8(1)
  np.testing.assert_allclose(train.psnr_uint8(a, b), 10 * math.log10(255**2), rtol=1e-12)
  assert train.psnr_uint8(a, a) == math.inf
  assert train.ssim_uint8(a, a) == pytest.approx(1.0, abs=1e-12)
  noisy = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
  assert 0 < train.ssim_uint8(a, noisy) < 0.99
  assert train.ssim_uint8(a, noisy) == pytest.approx(train.ssim_uint8(noisy, a), abs=1e-12)
