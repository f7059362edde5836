"""TemCoCo's accelerator programs, lowered without an accelerator.

The sharded training step (data x fsdp over 8 simulated CPU devices, distillation included) and the
inference step are lowered for "cuda" and "tpu" with the "plain" schedule, and nothing CPU-only may
be in them: no host callbacks or CPU custom calls, and the 3-D convolutions are real 3-D
convolutions, not the "cpu_memory" schedule's 2-D reformulation.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_train_standin import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
PLATFORMS = ("cuda", "tpu")

LOWER_SCRIPT = textwrap.dedent("""
    import collections, importlib.util, json, re, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from vidfusion_jax import data, inference, objectives, sharding, train
    from vidfusion_jax.models import schedule, teachers

    spec = importlib.util.spec_from_file_location("temcoco_config", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.mesh.shape = (2, 4)
    mesh = sharding.make_mesh(config.mesh.axis_names, config.mesh.shape)
    model = objectives.reference_model("temcoco")(config.model, schedule=schedule.PLAIN,
                                                  remat=True, remat_policy="full")
    objective = objectives.get_objective("temcoco")
    optimizer = train.make_optimizer(config.optimizer)
    step = train.make_train_step(model, objective, optimizer,
                                 train.learning_rate_schedule(config.optimizer))
    t, size = config.data.clip_length, config.data.crop_size

    def init():
      clip = jnp.zeros((1, t, size, size, 3))
      params = model.init(jax.random.key(0), clip, clip)["params"]
      return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))

    state = jax.eval_shape(init)
    state_shardings = sharding.state_shardings(state, mesh, config)
    replicated = NamedSharding(mesh, P())
    clips = jax.ShapeDtypeStruct((8, t, size, size, 3), jnp.uint8)
    batch = {k: clips for k in ("lq_ir", "lq_vis", "gt_ir", "gt_vis")}
    frames = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    frozen = teachers.Teachers(  # a one-block ViT-L/14-wide DINOv2 keeps the program small
        vgg=jax.eval_shape(teachers.VGG19Features().init, jax.random.key(0), frames)["params"],
        dino=jax.eval_shape(teachers.DinoVisionTransformer(1024, 1, 16).init, jax.random.key(0),
                            frames)["params"], dino_num_heads=16)
    train_step = jax.jit(step, in_shardings=(state_shardings, data.batch_sharding(
        mesh, config.sharding.batch_axes), replicated), out_shardings=(state_shardings,
        replicated), donate_argnums=0)
    infer = inference.make_infer_fn(model)
    infer_step = jax.jit(lambda p, ir, vis: infer(p, ir.astype(jnp.float32) / 255,
                                                  vis.astype(jnp.float32) / 255))
    video = jax.ShapeDtypeStruct((1, 7, 480, 640, 3), jnp.uint8)
    programs = {"train": (train_step, (state, batch, frozen)),
                "inference": (infer_step, (state.params, video, video))}
    result = {"conv3d_kernels": sorted({  # the spatial and temporal kernels of Separable3DConv
        "x".join(map(str, leaf.shape)) for leaf in jax.tree.leaves(state.params)
        if leaf.ndim == 5 and max(leaf.shape[:3]) > 1})}
    for name, (fn, args) in programs.items():
      for platform in sys.argv[2:]:
        text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
        convs = re.findall(r"stablehlo.convolution.*dim_numbers = (\\[[^]]*\\]).*: "
                           r"\\(tensor<[^>]*>, tensor<([0-9x]+)xf32>\\)", text)
        result[f"{name}/{platform}"] = dict(
            custom_calls=sorted(set(re.findall(r"custom_call @([\\w.]+)", text))),
            cpu_mentions=len(re.findall(r"cpu|host", text, re.IGNORECASE)),
            conv3d_kernels=sorted({k for dims, k in convs if dims == "[b, 0, 1, 2, f]"}),
            sharded=len(re.findall(r"(?:mhlo|sdy)\\.sharding", text)),
            ops=len(re.findall(r"\\b(?:stablehlo|chlo)\\.[a-z_]+", text)))
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
  """Summaries of the lowered train and inference programs, per platform."""
  env = subprocess_env(tmp_path_factory.mktemp("cache"), num_devices=8)
  result = subprocess.run(
      [sys.executable, "-c", LOWER_SCRIPT, str(REPO / "configs" / "temcoco.py"), *PLATFORMS],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-5000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.multiprocess
@pytest.mark.parametrize("program", ["train", "inference"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_plain_schedule_lowers_without_cpu_only_ops(lowered, program, platform):
  summary = lowered[f"{program}/{platform}"]
  assert summary["cpu_mentions"] == 0, summary
  assert set(summary["custom_calls"]) <= {"Sharding", "SPMDFullToShardShape",
                                          "SPMDShardToFullShape"}, summary
  # Every spatial (1, 3, 3) and temporal (3, 1, 1) Conv3d kernel is the kernel of a 3-D
  # convolution: none was rewritten as 2-D convolutions or matmuls.
  assert set(lowered["conv3d_kernels"]) <= set(summary["conv3d_kernels"]), summary
  if program == "train":  # the state is sharded over the 8 devices
    assert summary["sharded"] > 0, summary
  print(program, platform, summary)  # op counts for the record (`pytest -s`)


def test_platforms_lower_the_same_program(lowered):
  for program in ("train", "inference"):
    np.testing.assert_equal(lowered[f"{program}/cuda"], lowered[f"{program}/tpu"])
