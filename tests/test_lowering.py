"""VideoFusion lowers for GPU and TPU without devices, and nothing CPU-only reaches those programs.

The sharded training step (data x fsdp over an abstract 2 x 4 mesh) and the inference step are
traced on this CPU machine and lowered for "cuda" and "tpu". `lower_train_step` and
`lower_inference` are shared with the other networks' lowering tests.
"""

import re

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P
import ml_collections
import pytest

from test_train_standin import load_config_module
from vidfusion_jax import inference
from vidfusion_jax import train
from vidfusion_jax.models import layers
from vidfusion_jax.models import schedule as schedule_lib

ACCELERATORS = ("cuda", "tpu")
MESH = AbstractMesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
TINY_VIDEOFUSION = {"num_features": 16, "num_blocks": [1, 1, 1], "num_decoder_blocks": 1,
                    "num_heads": [1, 2, 2]}
# Every op of a "cpu_memory"-only computation carries this scope in its location.
CPU_ONLY = re.compile(re.escape(layers.CPU_ONLY_SCOPE))


def lower_train_step(config: ml_collections.ConfigDict, platform: str) -> tuple[str, train.Trainer]:
  """StableHLO text (with op locations) of `config`'s training step on MESH (global batch =
  config.batch_size), and its trainer."""
  trainer = train.make_trainer(config, MESH, platform=platform)
  clip = (config.batch_size, config.data.clip_length, config.data.crop_size, config.data.crop_size,
          3)
  batch = {k: jax.ShapeDtypeStruct(clip, jnp.uint8, sharding=trainer.batch_sharding)
           for k in ("lq_ir", "lq_vis", "gt_ir", "gt_vis")}
  lowered = trainer.train_step.trace(trainer.abstract_state, batch, None).lower(
      lowering_platforms=(platform,))
  return lowered.as_text(debug_info=True), trainer


def lower_inference(name: str, model_config: dict, clip: tuple[int, ...],
                    platform: str) -> tuple[str, object]:
  """StableHLO text (with op locations) of the inference step (`inference.make_infer_fn`) for
  `platform`, and its module."""
  module = inference.build_model(name, model_config,
                                 schedule=schedule_lib.resolve(schedule_lib.AUTO, platform))
  video = jax.ShapeDtypeStruct(clip, jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), video, video)["params"]
  lowered = jax.jit(inference.make_infer_fn(module)).trace(params, video, video).lower(
      lowering_platforms=(platform,))
  return lowered.as_text(debug_info=True), module


@pytest.fixture(scope="module")
def videofusion_config():
  config = load_config_module("videofusion").get_config("tiny")
  config.model.config = dict(config.model.config, **TINY_VIDEOFUSION)
  config.batch_size = 8  # one clip per device of the 2 x 4 mesh
  config.data.clip_length = 2
  config.data.crop_size = 16
  return config


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_videofusion_train_step_lowers_plain_and_sharded(videofusion_config, platform):
  text, trainer = lower_train_step(videofusion_config, platform)
  assert trainer.model.schedule == schedule_lib.PLAIN
  assert "mhlo.num_partitions = 8" in text
  assert "sdy.sharding" in text or "mhlo.sharding" in text
  assert not CPU_ONLY.search(text)
  assert "feature_group_count = 16" in text  # depthwise convolutions are grouped convolutions


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_videofusion_inference_lowers_plain(platform):
  text, module = lower_inference("videofusion", TINY_VIDEOFUSION, (1, 2, 16, 16, 3), platform)
  assert module.schedule == schedule_lib.PLAIN
  assert not CPU_ONLY.search(text)
  assert "feature_group_count = 16" in text


def test_cpu_programs_keep_the_memory_schedule():
  """The check above can fail: the CPU program has the ordering ties."""
  text, module = lower_inference("videofusion", TINY_VIDEOFUSION, (1, 2, 16, 16, 3), "cpu")
  assert module.schedule == schedule_lib.CPU_MEMORY
  assert len(CPU_ONLY.findall(text)) > 100


def _ynn_convolutions(compiled_text: str) -> int:
  """Convolutions inside XLA:CPU's YNNPACK fusions of a compiled module."""
  bodies = dict(re.findall(r"^%(\S+) \(.*?\{\n(.*?)\n\}", compiled_text, re.M | re.S))
  callees = re.findall(r"calls=%([^\s,]+),.*\"__ynn_fusion\"", compiled_text)
  return sum("convolution(" in bodies.get(name, "") for name in callees)


def test_cpu_programs_keep_convolutions_out_of_ynnpack():
  """`schedule.compiler_options` takes convolutions away from YNNPACK on CPU (its weight gradients
  are 3-4x slower than XLA's, docs/benchmarks.md) and gives the same values."""
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 32))
  kernel = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 32, 32))

  def loss(x, kernel):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(y) ** 2)

  value_and_grads = jax.value_and_grad(loss, argnums=(0, 1))
  default = jax.jit(value_and_grads).lower(x, kernel).compile()
  ours = jax.jit(value_and_grads, compiler_options=schedule_lib.compiler_options("cpu")).lower(
      x, kernel).compile()
  # XLA:CPU picks YNNPACK by CPU (it did on the AVX-512 Xeon of docs/benchmarks.md): where the
  # default has YNNPACK convolutions, ours has none, and keeps its other YNNPACK fusions.
  assert _ynn_convolutions(ours.as_text()) == 0
  if _ynn_convolutions(default.as_text()):
    assert '"__ynn_fusion"' in ours.as_text()
  for a, b in zip(jax.tree.leaves(default(x, kernel)), jax.tree.leaves(ours(x, kernel))):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))
  assert schedule_lib.compiler_options("cuda") == schedule_lib.compiler_options("tpu") == {}
