"""Compile time, step time, frames/s and memory of the sharded train step (JSON lines on stdout).

  python benchmarks/train_step.py            # official config, 3 clips x 6 x 128 x 128 per device
  python benchmarks/train_step.py --quick    # tiny model and clips: checks the script
  python benchmarks/train_step.py --model=temcoco --per_device_batch=3   # TemCoCo recipe clips
  python benchmarks/train_step.py --torch_reference=../VideoFusion   # and the PyTorch original

Measures `vidfusion_jax.train`'s jitted step (forward, loss, backward, clipping, AdamW) on all
local devices (mesh data=-1) for every combination of --remat and --dtype, on random clips already
on the device, in the --schedule of models/schedule.py; prints the step's StableHLO op count and
`init_seconds`, the compile and run of the train state's initialisation.
`peak_bytes` is the device allocator's peak (GPU/TPU; null on CPU);
`compiled_bytes` is XLA's estimate for the step (arguments + outputs + temporaries - aliased).
TemCoCo's step includes its distillation teachers (VGG19 features[:12] and a DINOv2 ViT-L/14, or a
one-block ViT of the same width with --quick) with random weights.
With --torch_reference=CHECKOUT (a clone of https://github.com/Linfeng-Tang/VideoFusion) the
official PyTorch network is first timed on the same model config and global batch, in a subprocess
(benchmarks/torch_reference.py): forward, its full training loss, backward, clip_grad_norm_ and
AdamW with the recipe's hyper-parameters, float32, on one device. Its line has
"impl": "torch_reference", compile_seconds null and peak_bytes of the kind in memory_kind (the
subprocess's RSS high-water mark on CPU); every JAX line ("impl": "jax") then carries
speedup_vs_torch = its frames_per_second / the reference's.
"""

import importlib.util
import itertools
import json
import pathlib
import time

from absl import flags
import jax
import jax.numpy as jnp

from model_forward import cpu_model
from model_forward import stablehlo_op_count
import torch_reference
from vidfusion_jax import cli
from vidfusion_jax import data
from vidfusion_jax import sharding
from vidfusion_jax import train
from vidfusion_jax.models import schedule as schedule_lib
from vidfusion_jax.models import teachers as teacher_models

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _official_config(model: str):
  spec = importlib.util.spec_from_file_location(f"{model}_config", CONFIG_DIR / f"{model}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _random_teachers(config, quick: bool):
  """TemCoCo's frozen teachers with random weights (ViT-L/14, or one block of it with --quick)."""
  if config.model.name != "temcoco" or not config.teachers.distillation:
    return None
  image = jnp.zeros((1, 14, 14, 3), jnp.float32)
  vgg = teacher_models.VGG19Features()
  dino = teacher_models.DinoVisionTransformer(depth=1 if quick else teacher_models.VITL14["depth"])
  return teacher_models.Teachers(
      vgg=jax.jit(vgg.init)(jax.random.key(1), image)["params"],
      dino=jax.jit(dino.init)(jax.random.key(2), image)["params"],
      dino_num_heads=config.teachers.dinov2_num_heads)


def _config(model: str, quick: bool, per_device_batch: int, remat: bool, dtype: str,
            schedule: str, remat_policy: str):
  config = _official_config(model)
  if quick:
    if model == "videofusion":
      config.model.config.update(num_features=16, embed_dim=16, num_blocks=[1, 1, 1],
                                 num_decoder_blocks=1)
    config.data.update(clip_length=2, crop_size=32)
  config.data.source = "synthetic"
  config.batch_size = per_device_batch * jax.device_count()
  config.model.update(remat=remat, dtype=dtype, schedule=schedule, remat_policy=remat_policy)
  return config


def _memory(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
             analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def measure(config, steps: int, teachers=None) -> dict:
  mesh = sharding.mesh_from_config(config)
  trainer = train.make_trainer(config, mesh)
  start = time.perf_counter()
  state = trainer.init_state.lower().compile()()
  init_seconds = time.perf_counter() - start
  iterator = train.make_train_iterator(config, trainer.batch_sharding)
  batch = data.to_global_batch(next(iterator), mesh, config.sharding.batch_axes)
  lowered = trainer.train_step.lower(state, batch, teachers)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  state, metrics = compiled(state, batch, teachers)  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, teachers)
  jax.block_until_ready((state, metrics))
  step_seconds = (time.perf_counter() - start) / steps
  stats = jax.local_devices()[0].memory_stats() or {}
  return {
      "schedule": getattr(trainer.model, "schedule", None),
      "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "stablehlo_ops": stablehlo_op_count(lowered),
      "compile_seconds": round(compile_seconds, 3),
      "init_seconds": round(init_seconds, 3),
      "step_seconds": step_seconds,
      "frames_per_second": config.batch_size * config.data.clip_length / step_seconds,
      "peak_bytes": stats.get("peak_bytes_in_use"),
      "compiled_bytes": _memory(compiled),
      "loss": float(metrics["loss"]),
  }


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum("model", "videofusion", ["videofusion", "temcoco"],
                    "network and recipe (configs/<model>.py) to measure", flag_values=fv)
  flags.DEFINE_bool("quick", False, "tiny model and clips", flag_values=fv)
  flags.DEFINE_integer("steps", None, "timed steps after one warm-up step (default 10, --quick 2)",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("per_device_batch", 3, "clips per device", lower_bound=1, flag_values=fv)
  flags.DEFINE_list("remat", ["false", "true"], "rematerialisation settings to measure",
                    flag_values=fv)
  flags.DEFINE_list("dtype", ["float32", "bfloat16"], "compute dtypes to measure",
                    flag_values=fv)
  flags.DEFINE_enum("schedule", schedule_lib.AUTO, list(schedule_lib.SCHEDULES),
                    "model.schedule (auto: cpu_memory on CPU, plain elsewhere)", flag_values=fv)
  flags.DEFINE_enum("remat_policy", "full", sorted(schedule_lib.REMAT_POLICIES),
                    "jax.checkpoint policy of --remat (plain schedule)", flag_values=fv)
  torch_reference.define_flags(fv)


def measure_torch_reference(config, steps: int, args) -> dict:
  """The official PyTorch train step on the same model config and clips, as a JSON record."""
  shape = (config.batch_size, config.data.clip_length, config.data.crop_size,
           config.data.crop_size)
  optimizer = {k: config.optimizer[k] for k in
               ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")}
  result = torch_reference.measure_in_subprocess(
      args.torch_reference, "train_step", shape, config.model.config, steps, args.torch_threads,
      jax.default_backend() == "gpu", optimizer)
  return {
      "benchmark": "train_step", "impl": "torch_reference", "model": args.model,
      "quick": args.quick, "backend": result["platform"], "device": result["device"],
      "devices": 1, "global_batch": config.batch_size, "clip_length": config.data.clip_length,
      "crop_size": config.data.crop_size, "remat": False, "dtype": "float32", "steps": steps,
      "torch": result["torch"], "torch_threads": result["torch_threads"],
      "torch_reference": result["checkout"], "compile_seconds": None,
      "step_seconds": result["mean_step_s"],
      "frames_per_second": shape[0] * shape[1] / result["mean_step_s"],
      "peak_bytes": result["peak_memory_bytes"], "memory_kind": result["memory_kind"],
      "params": result["params"], "loss": result["loss_terms"]["l_total"],
  }


def main():
  prog = "python benchmarks/train_step.py"
  args = cli.parse(None, define_flags, prog=prog, usage=__doc__)
  steps = args.steps or (2 if args.quick else 10)
  remats = [v.strip().lower() == "true" for v in args.remat]
  torch_record = None
  if args.torch_reference:  # first: its process ends before the JAX steps allocate
    try:
      args.torch_reference = torch_reference.check(args.torch_reference, args.model)
    except ValueError as error:
      cli.usage_error(prog, str(error))
    torch_record = measure_torch_reference(
        _config(args.model, args.quick, args.per_device_batch, False, "float32", args.schedule,
                args.remat_policy), steps, args)
    print(json.dumps(torch_record), flush=True)
  for remat, dtype in itertools.product(remats, args.dtype):
    config = _config(args.model, args.quick, args.per_device_batch, remat, dtype, args.schedule,
                     args.remat_policy)
    result = measure(config, steps, _random_teachers(config, args.quick))
    if torch_record:
      result["speedup_vs_torch"] = torch_reference.speedup(result["frames_per_second"],
                                                           torch_record["frames_per_second"])
    print(json.dumps({
        "benchmark": "train_step", "impl": "jax", "model": args.model, "quick": args.quick,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind, "cpu": cpu_model(), "devices": jax.device_count(),
        "global_batch": config.batch_size, "clip_length": config.data.clip_length,
        "crop_size": config.data.crop_size, "remat": remat, "dtype": dtype, "steps": steps,
        **result}), flush=True)


if __name__ == "__main__":
  main()
