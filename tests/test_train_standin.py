"""A stand-in network for the training-infrastructure tests, and the script their subprocesses run.

The real VideoFusion network takes minutes to compile on a CPU; the infrastructure (sharding,
multi-process, checkpoints, preemption) does not depend on the network, so these tests train a
two-convolution model with the real VideoFusion loss. `tests/test_train_golden.py` checks the real
network's gradients.

As a script: `python tests/test_train_standin.py --config=tests/test_train_standin.py --workdir=DIR
[--config.x=...] [--coordinator_address=... --num_processes=N --process_id=I]` registers the
stand-in and runs `vidfusion_jax.train.main`.
"""

import importlib.util
import os
import pathlib
import sys
from typing import Any

from absl import app
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vidfusion_jax import logging_utils
from vidfusion_jax import objectives

REPO = pathlib.Path(__file__).resolve().parents[1]
STANDIN = "standin"


def load_config_module(name: str):
  """A module of configs/ (not a package) loaded from its file."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Body(nn.Module):
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    return nn.gelu(nn.Conv(self.features, (2, 3, 3), padding="SAME", dtype=self.dtype)(x))


class StandinNet(nn.Module):
  """ir, vis (N, T, H, W, 3) -> fusion, ir, vi outputs in [0, 1], like VideoFusion."""
  features: int = 8
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, ir, vis):
    body = nn.remat(_Body) if self.remat else _Body
    x = body(self.features, self.dtype, name="body")(jnp.concatenate([ir, vis], axis=-1))
    x = nn.Conv(9, (1, 3, 3), padding="SAME", dtype=self.dtype)(x)
    fusion, ir_out, vi_out = jnp.split((jnp.tanh(x) + 1) / 2, 3, axis=-1)
    return {"fusion": fusion, "ir": ir_out, "vi": vi_out}


def register() -> None:
  """Adds the stand-in to the objective registry (VideoFusion's loss)."""
  objectives.OBJECTIVES[STANDIN] = objectives.Objective(
      build_model=lambda model_config, **overrides: StandinNet(**overrides),
      loss=objectives.OBJECTIVES["videofusion"].loss)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """configs/videofusion.py:tiny with the stand-in, random clips and a 20-step schedule."""
  del variant
  config = load_config_module("videofusion").get_config("tiny")
  config.model.name = STANDIN
  config.model.config = {}
  config.data.source = "synthetic"
  config.data.clip_length = 2
  config.data.crop_size = 16
  config.batch_size = 8
  config.total_steps = 20
  config.optimizer.warmup_steps = 4
  config.optimizer.cosine_period = 20
  config.optimizer.grad_clip_norm = 0.01
  config.log_every_steps = 1
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 4
  config.keep_checkpoints = 2
  return config


def losses_by_step(workdir) -> dict[int, float]:
  """train/loss of every logged step (the last record wins when a resumed run relogs a step)."""
  return {r["step"]: r["train/loss"] for r in logging_utils.read_metrics(workdir)
          if "train/loss" in r}


def subprocess_env(cache_dir: pathlib.Path, num_devices: int = 1) -> dict[str, str]:
  """Environment of a test subprocess: the repo importable, `num_devices` CPU devices, and a
  persistent compilation cache shared by the subprocesses of a session."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


SCRIPT = [sys.executable, str(pathlib.Path(__file__).resolve()),
          f"--config={pathlib.Path(__file__).resolve()}"]


def assert_params_close(actual, expected, rtol: float, atol: float = 0.0) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_standin_matches_videofusion_output_contract():
  """The stand-in returns what the VideoFusion objective needs (so the loss is the real one)."""
  x = jnp.ones((1, 2, 16, 16, 3)) * 0.5
  model = StandinNet()
  outputs = model.apply(model.init(jax.random.PRNGKey(0), x, x), x, x)
  assert sorted(outputs) == ["fusion", "ir", "vi"]
  for value in outputs.values():
    assert value.shape == x.shape
    assert 0.0 <= float(jnp.min(value)) and float(jnp.max(value)) <= 1.0
  remat = StandinNet(remat=True)
  np.testing.assert_allclose(remat.apply(model.init(jax.random.PRNGKey(0), x, x), x, x)["fusion"],
                             outputs["fusion"], rtol=1e-6)


if __name__ == "__main__":
  from vidfusion_jax import train  # pylint: disable=g-import-not-at-top
  register()
  app.run(train.main)
