"""Checkpointer retention, train-state + iterator round trips, and `load_params`."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vidfusion_jax import checkpointing


def _state(step: int):
  return {"step": jnp.asarray(step, jnp.int32),
          "params": {"conv": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * step}},
          "opt_state": {"mu": {"conv": {"kernel": jnp.full((2, 3), -step, jnp.float32)}}},
          "rng": jax.random.PRNGKey(step)}


def _iterator():
  return iter(grain.MapDataset.range(100).map(lambda x: x * 10).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


@pytest.mark.parametrize("mode, best", [("max", 2), ("min", 4)])
def test_keeps_latest_n_and_best_by_metric(tmp_path, mode, best):
  """keep=2 latest plus the best one among checkpoints saved with metrics."""
  checkpointer = checkpointing.Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="psnr",
                                            best_mode=mode)
  metrics = {2: 30.0, 4: 20.0, 6: 25.0}
  for step in range(1, 9):
    psnr = metrics.get(step)
    assert checkpointer.save(step, _state(step), metrics=None if psnr is None else {"psnr": psnr})
  checkpointer.wait_until_finished()
  assert checkpointer.all_steps() == sorted({best, 7, 8})
  checkpointer.close()


def test_save_interval_and_force(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path, save_every_steps=4, keep=10)
  saved = [step for step in range(1, 11) if checkpointer.save(step, _state(step))]
  assert checkpointer.save(11, _state(11), force=True)
  checkpointer.wait_until_finished()
  assert saved == [4, 8]
  assert checkpointer.all_steps() == [4, 8, 11]
  checkpointer.close()


def test_state_and_iterator_round_trip(tmp_path):
  """An async save restores every leaf exactly and puts the iterator back at its position."""
  iterator = _iterator()
  for _ in range(3):
    next(iterator)
  checkpointer = checkpointing.Checkpointer(tmp_path)
  checkpointer.save(3, _state(3), iterator, force=True)
  expected_next = [next(iterator) for _ in range(2)]
  checkpointer.close()

  fresh = _iterator()
  reader = checkpointing.Checkpointer(tmp_path, read_only=True)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=jax.sharding.SingleDeviceSharding(
                                                             jax.devices()[0])), _state(0))
  restored = reader.restore(3, abstract, fresh)
  reader.close()
  for actual, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(3))):
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
  assert [next(fresh) for _ in range(2)] == expected_next == [30, 40]


def test_load_params_reads_params_and_config(tmp_path):
  config = ml_collections.ConfigDict({"model": {"name": "videofusion",
                                                "config": {"num_features": 16}}, "seed": 3})
  checkpointing.save_config(tmp_path, config)
  checkpointer = checkpointing.Checkpointer(tmp_path, keep=5)
  for step in (2, 5):
    checkpointer.save(step, _state(step), force=True)
  checkpointer.close()

  params, loaded = checkpointing.load_params(tmp_path)
  assert isinstance(params["conv"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(params["conv"]["kernel"], np.arange(6).reshape(2, 3) * 5.0)
  assert sorted(params) == ["conv"]
  assert loaded.model.name == "videofusion" and loaded.model.config.num_features == 16
  assert loaded.seed == 3
  params, _ = checkpointing.load_params(tmp_path, step=2)
  np.testing.assert_array_equal(params["conv"]["kernel"], np.arange(6).reshape(2, 3) * 2.0)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 3 .*available: \[2, 5\]"):
    checkpointing.load_params(tmp_path, step=3)


def test_load_params_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    checkpointing.load_params(tmp_path)
  checkpointing.save_config(tmp_path, ml_collections.ConfigDict({"seed": 0}))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpointing.load_params(tmp_path)
