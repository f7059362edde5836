"""Bytes moved by collectives in the compiled 8-device train step stay near the minimum.

The minimum (`sharding.minimum_collective_bytes`): data parallel is one all-reduce of the gradients;
FSDP is an all-gather of every split parameter plus a reduce-scatter of its gradient (and an
all-reduce of the gradient shard over the data axis). XLA:CPU has no reduce-scatter pass: it
all-reduces the full gradient and keeps its slice, which moves the same buffer, so the reductions
are compared together; every trained gradient is reduced at least once, so their bytes are at least
the data-parallel all-reduce (XLA may reduce over all devices at once). XLA gathers a split
parameter again in the backward pass when the layer's input gradient is needed (the gathered copy is
not kept alive, as in ZeRO-3), so the all-gathers are bounded by twice the minimum. Parameters the
loss never reads (TemCoCo's distillation heads when training without teachers) have no gradient to
reduce and are left out of the minimum. The real networks are compiled in the "plain" schedule, the
one accelerators run: "cpu_memory" recomputes blocks in its own backward order, which gathers some
parameters again.
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
    from jax._src.interpreters import partial_eval
    import numpy as np
    import test_train_standin as standin
    from vidfusion_jax import objectives, sharding, train
    standin.register()
    model, overrides = sys.argv[1], json.loads(sys.argv[2])

    def trained_params(trainer, batch, teachers):
      # The parameter leaves the loss reads (dead-code elimination of its jaxpr keeps them); the
      # others have a zero gradient and need no reduction.
      loss = lambda params, batch: objectives.forward_and_loss(
          trainer.model, trainer.objective, params, objectives.to_float(batch), teachers)[0]
      jaxpr = jax.make_jaxpr(loss)(trainer.abstract_state.params, batch).jaxpr
      _, used = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
      return [leaf for leaf, read in zip(jax.tree.leaves(trainer.abstract_state.params), used)
              if read]

    results = {}
    for shape in ((8, 1), (2, 4)):
      if model == standin.STANDIN:
        config = standin.get_config()
      else:
        config = standin.load_config_module(model).get_config("tiny")
        config.data.source = "synthetic"
        config.model.schedule = "plain"
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
          "minimum": sharding.minimum_collective_bytes(trained_params(trainer, batch, teachers),
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
  reductions = sum(measured[k] for k in REDUCTIONS)
  assert data_parallel["minimum"]["all-reduce"] <= reductions
  assert reductions <= 1.2 * sum(minimum[k] for k in REDUCTIONS)


def test_collective_bytes_parses_sync_async_and_looped_collectives():
  from vidfusion_jax import sharding  # pylint: disable=g-import-not-at-top
  hlo = textwrap.dedent("""
      HloModule jit_step

      %add (x: f32[], y: f32[]) -> f32[] {
        %x = f32[] parameter(0)
        %y = f32[] parameter(1)
        ROOT %sum = f32[] add(%x, %y)
      }

      %body (carry: (s32[], f32[16])) -> (s32[], f32[16]) {
        %carry = (s32[], f32[16]{0}) parameter(0)
        %g = f32[16]{0} get-tuple-element(%carry), index=1
        %i = s32[] get-tuple-element(%carry), index=0
        %reduced = f32[16]{0} all-reduce(%g), replica_groups={{0,1}}, to_apply=%add
        ROOT %next = (s32[], f32[16]{0}) tuple(%i, %reduced)
      }

      %cond (carry.1: (s32[], f32[16])) -> pred[] {
        %carry.1 = (s32[], f32[16]{0}) parameter(0)
        ROOT %c = pred[] constant(true)
      }

      ENTRY %main (p: f32[4,8], q: bf16[16], init: (s32[], f32[16])) -> f32[4,8] {
        %p = f32[4,8]{1,0} parameter(0)
        %q = bf16[16]{0} parameter(1)
        %init = (s32[], f32[16]{0}) parameter(2)
        %ar = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(%p, %q), replica_groups={{0,1}}, to_apply=%add
        %ags = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%p), dimensions={0}
        %agd = f32[8,8]{1,0} all-gather-done(%ags)
        %rs = f32[2,8]{1,0} reduce-scatter(%p), dimensions={0}, to_apply=%add
        %loop = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
        ROOT %cp = f32[4,8]{1,0} collective-permute(%p), source_target_pairs={{0,1}}
      }
  """)
  assert sharding.collective_bytes(hlo) == {
      "all-reduce": 128 + 32 + 3 * 64, "all-gather": 256, "reduce-scatter": 128, "all-to-all": 0,
      "collective-permute": 128}


def test_standin_collectives_near_minimum(compilation_cache):
  _assert_near_minimum(_collectives("standin", compilation_cache, {"data.crop_size": 32}))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["videofusion", "temcoco"])
def test_real_network_collectives_near_minimum(model, compilation_cache):
  """The tiny configs with a batch of 8 (one clip per device under data=8)."""
  _assert_near_minimum(_collectives(model, compilation_cache, {"batch_size": 8}))
