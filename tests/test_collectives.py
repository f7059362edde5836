"""Bytes moved by collectives in the compiled 8-device train step stay near the minimum.

The minimum (`sharding.minimum_collective_bytes`): data parallel is one all-reduce of the
gradients; FSDP is an all-gather of every split parameter plus a reduce-scatter of its gradient
(and an all-reduce of the gradient shard over the data axis). XLA:CPU has no reduce-scatter pass:
it all-reduces the full gradient and keeps its slice, which moves the same buffer, so the
reductions are compared together. XLA gathers a split parameter again in the backward pass when
the layer's input gradient is needed (the gathered copy is not kept alive, as in ZeRO-3), so the
all-gathers are bounded by twice the minimum.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from test_train_standin import subprocess_env

REDUCTIONS = ("all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    import test_train_standin as standin
    from vidfusion_jax import sharding, train
    standin.register()
    model, overrides = sys.argv[1], json.loads(sys.argv[2])
    results = {}
    for shape in ((8, 1), (2, 4)):
      if model == standin.STANDIN:
        config = standin.get_config()
      else:
        config = standin.load_config_module(model).get_config("tiny")
        config.data.source = "synthetic"
        if "teachers" in config:
          config.teachers.distillation = False
      config.update_from_flattened_dict(overrides)
      config.mesh.shape = shape
      trainer = train.make_trainer(config, sharding.mesh_from_config(config))
      clips = (config.batch_size, config.data.clip_length, config.data.crop_size,
               config.data.crop_size, 3)
      batch = {k: jax.ShapeDtypeStruct(clips, np.uint8, sharding=trainer.batch_sharding)
               for k in train.STREAMS}
      teachers = trainer.objective.load_teachers(config)
      compiled = trainer.train_step.lower(trainer.abstract_state, batch, teachers).compile()
      results[str(shape)] = {
          "measured": sharding.collective_bytes(compiled.as_text()),
          "minimum": sharding.minimum_collective_bytes(trainer.abstract_state.params,
                                                       config.sharding.batch_axes)}
    print(json.dumps(results))
""")


def _collectives(model: str, cache: pathlib.Path, overrides: dict) -> dict:
  result = subprocess.run(
      [sys.executable, "-c", SCRIPT, model, json.dumps(overrides)],
      env=subprocess_env(cache, num_devices=8), cwd=pathlib.Path(__file__).resolve().parent,
      capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-5000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_near_minimum(results: dict) -> None:
  data_parallel, fsdp = results["(8, 1)"], results["(2, 4)"]
  minimum = data_parallel["minimum"]
  assert minimum["all-gather"] == minimum["reduce-scatter"] == 0
  assert data_parallel["measured"]["all-gather"] == 0
  assert minimum["all-reduce"] <= sum(data_parallel["measured"].values()) <= (
      1.2 * minimum["all-reduce"])
  minimum, measured = fsdp["minimum"], fsdp["measured"]
  assert minimum["all-gather"] > 0
  assert minimum["all-gather"] <= measured["all-gather"] <= 2 * minimum["all-gather"]
  needed = sum(minimum[k] for k in REDUCTIONS)
  assert needed <= sum(measured[k] for k in REDUCTIONS) <= 1.2 * needed


def test_collective_bytes_parses_sync_and_async_collectives():
  from vidfusion_jax import sharding  # pylint: disable=g-import-not-at-top
  hlo = textwrap.dedent("""
      %p = f32[4,8]{1,0} parameter(0)
      %q = bf16[16]{0} parameter(1)
      %ar = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(%p, %q), replica_groups={{0,1}}
      %ags = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%p), dimensions={0}
      %agd = f32[8,8]{1,0} all-gather-done(%ags)
      %rs = f32[2,8]{1,0} reduce-scatter(%p), dimensions={0}
      ROOT %cp = f32[4,8]{1,0} collective-permute(%p), source_target_pairs={{0,1}}
  """)
  assert sharding.collective_bytes(hlo) == {
      "all-reduce": 128 + 32, "all-gather": 256, "reduce-scatter": 128, "all-to-all": 0,
      "collective-permute": 128}


def test_standin_collectives_near_minimum(compilation_cache):
  _assert_near_minimum(_collectives("standin", compilation_cache, {"data.crop_size": 32}))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["videofusion", "temcoco"])
def test_real_network_collectives_near_minimum(model, compilation_cache):
  """The tiny configs with a batch of 8 (one clip per device under data=8)."""
  _assert_near_minimum(_collectives(model, compilation_cache, {"batch_size": 8}))
