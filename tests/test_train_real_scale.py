"""The real networks (tiny VideoFusion and TemCoCo configs) on 8 simulated devices.

A train state initialised under data=2 x fsdp=4 is checkpointed, then restored onto 1 device and
onto a data=4 x fsdp=2 mesh: the same values, each leaf laid out as the new mesh's rules say.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from test_train_standin import subprocess_env

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    import test_train_standin as standin
    from vidfusion_jax import checkpointing, sharding, train
    out, model = sys.argv[1], sys.argv[2]
    config = standin.load_config_module(model).get_config("tiny")
    config.data.source = "synthetic"
    config.batch_size = 8
    config.mesh.shape = (2, 4)
    trainer = train.make_trainer(config, sharding.mesh_from_config(config))
    state = trainer.init_state()
    saved = jax.device_get(state)
    checkpointer = checkpointing.Checkpointer(out, async_checkpointing=False)
    checkpointer.save(1, state, force=True)
    checkpointer.close()
    split = lambda params: sum(1 for x in jax.tree.leaves(params)
                               if x.sharding.spec != jax.sharding.PartitionSpec())
    results = {"fsdp_split": split(state.params)}
    for name, shape, num_devices in (("1", (1, 1), 1), ("4x2", (4, 2), 8)):
      config.mesh.shape = shape
      target = train.make_trainer(config, sharding.mesh_from_config(config,
                                                                   jax.devices()[:num_devices]))
      reader = checkpointing.Checkpointer(out, read_only=True)
      restored = reader.restore(1, target.abstract_state)
      reader.close()
      layouts = jax.tree.map(lambda x, s: x.sharding.spec == s.spec and
                             x.sharding.num_devices == num_devices,
                             restored, target.state_shardings)
      equal = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                           jax.device_get(restored), saved)
      results[name] = {"leaves": len(jax.tree.leaves(equal)),
                       "equal": sum(jax.tree.leaves(equal)),
                       "laid_out": sum(jax.tree.leaves(layouts)),
                       "split": split(restored.params)}
    print(json.dumps(results))
""")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["videofusion", "temcoco"])
def test_fsdp_checkpoint_restores_on_1_device_and_4x2(model, tmp_path, compilation_cache):
  result = subprocess.run(
      [sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt"), model],
      env=subprocess_env(compilation_cache, num_devices=8),
      cwd=pathlib.Path(__file__).resolve().parent, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-5000:]
  restored = json.loads(result.stdout.strip().splitlines()[-1])
  assert restored["fsdp_split"] > 0
  for name in ("1", "4x2"):
    assert restored[name]["equal"] == restored[name]["laid_out"] == restored[name]["leaves"], name
  assert restored["1"]["split"] == 0
  assert restored["4x2"]["split"] > 0
