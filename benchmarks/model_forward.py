"""Benchmark the VideoFusion port: inference and a forward+backward of the training loss.

For each case prints one JSON line: shape, device, schedule, StableHLO op count, compile time,
XLA's temporary bytes, steady-state step time, frames per second, peak memory (host RSS high-water
mark on CPU, device peak bytes on GPU/TPU), parameter count and achieved FLOP/s (model FLOPs:
549 GFLOP per 640x480 frame forward, backward counted as 2x).
Host memory is handled as by the fuse command: compiler memory released, large blocks unmapped
when freed (`vidfusion_jax.host_memory`).
With --torch_reference=CHECKOUT (a clone of https://github.com/Linfeng-Tang/VideoFusion) each case
also times the official PyTorch network (float32, random init) on the same shape, in a subprocess
(benchmarks/torch_reference.py), before the JAX case: inference under torch.no_grad, train as
forward + the reference's full training loss + backward. Its line has "impl": "torch_reference",
compile_s null and the subprocess's RSS high-water mark (CUDA: max_memory_allocated); the JAX
line ("impl": "jax") then carries speedup_vs_torch = its frames_per_s / the reference's.

  python benchmarks/model_forward.py                      # official config, both cases, float32
  python benchmarks/model_forward.py --quick              # small shapes, a smoke test
  python benchmarks/model_forward.py --cases=train --train_shape=3,6,128,128 --dtype=bfloat16
  python benchmarks/model_forward.py --model=temcoco   # TemCoCo (train case: fusion loss only)
  python benchmarks/model_forward.py --schedule=plain    # plain modules (models/schedule.py)
  python benchmarks/model_forward.py --torch_reference=../VideoFusion   # and the PyTorch original
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import torch_reference
from vidfusion_jax import cli
from vidfusion_jax import host_memory
from vidfusion_jax import losses
from vidfusion_jax.models import from_reference_config
from vidfusion_jax.models import schedule as schedule_lib

OFFICIAL_CONFIG = {
    "type": "VideoFusion_Trans", "in_channels": 3, "out_channels": 3, "num_features": 32,
    "num_blocks": [2, 2, 4], "num_decoder_blocks": 2, "num_heads": [2, 4, 8],
    "ffn_expansion_factor": 1, "bias": False, "LayerNorm_type": "WithBias", "embed_dim": 32,
    "groups": [4, 8, 16]}
FORWARD_FLOP_PER_PIXEL = 549e9 / (640 * 480)  # official config, per frame pixel
# TemCoCo `Fusion()`: XLA's cost analysis of the forward, 2.82 MFLOP per pixel (866 GFLOP/frame).
TEMCOCO_FLOP_PER_PIXEL = 2.82e6
MODELS = {  # name: (reference constructor config, forward FLOP per frame pixel)
    "videofusion": (OFFICIAL_CONFIG, FORWARD_FLOP_PER_PIXEL),
    "temcoco": ({"n_feat": 32}, TEMCOCO_FLOP_PER_PIXEL),
}
QUICK_SHAPE = (1, 3, 32, 32)


def parse_shape(text: str) -> tuple[int, int, int, int]:
  shape = tuple(int(s) for s in text.split(","))
  if len(shape) != 4:
    raise ValueError(f"expected batch,time,height,width; got {text!r}")
  return shape


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum("model", "videofusion", sorted(MODELS), "network to measure", flag_values=fv)
  flags.DEFINE_list("cases", ["inference", "train"], "subset of inference,train to measure",
                    flag_values=fv)
  flags.DEFINE_string("inference_shape", "1,7,480,640",
                      "batch,time,height,width of the inference case", flag_values=fv)
  flags.DEFINE_string("train_shape", "3,6,128,128", "batch,time,height,width of the training case",
                      flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "compute dtype; params stay float32", flag_values=fv)
  flags.DEFINE_bool("remat", False, "rematerialise the heavy blocks in the backward pass (train "
                    "case)", flag_values=fv)
  flags.DEFINE_enum("schedule", schedule_lib.AUTO, list(schedule_lib.SCHEDULES),
                    "model.schedule (auto: cpu_memory on CPU, plain elsewhere)", flag_values=fv)
  flags.DEFINE_enum("remat_policy", "full", sorted(schedule_lib.REMAT_POLICIES),
                    "jax.checkpoint policy of --remat (plain schedule)", flag_values=fv)
  flags.DEFINE_integer("steps", 3, "timed steady-state steps after one warm-up step",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("quick", False, f"smoke test: both shapes become "
                    f"{','.join(map(str, QUICK_SHAPE))}, one timed step", flag_values=fv)
  torch_reference.define_flags(fv)


def parse_args(argv=None) -> argparse.Namespace:
  prog = "python benchmarks/model_forward.py"
  args = cli.parse(argv, define_flags, prog=prog, usage=__doc__)
  unknown = set(args.cases) - {"inference", "train"}
  if unknown:
    cli.usage_error(prog, f"unknown cases {sorted(unknown)}; choose from inference,train")
  try:
    args.inference_shape = parse_shape(args.inference_shape)
    args.train_shape = parse_shape(args.train_shape)
  except ValueError as error:
    cli.usage_error(prog, f"--inference_shape/--train_shape: {error}")
  if args.quick:
    args.inference_shape = args.train_shape = QUICK_SHAPE
    args.steps = 1
  if args.torch_reference:
    try:
      args.torch_reference = torch_reference.check(args.torch_reference, args.model)
    except ValueError as error:
      cli.usage_error(prog, str(error))
  return args


def reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark of this process (Linux); False where unsupported."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU's name with its family, model and widest vector ISA: clouds name different CPU
  generations alike ("AMD EPYC"), and XLA:CPU's speed differs between them (docs/benchmarks.md)."""
  try:
    with open(cpuinfo) as f:
      first_processor = f.read().split("\n\n")[0]
  except OSError:
    return platform.processor()
  fields = {key.strip(): value.strip() for key, _, value in
            (line.partition(":") for line in first_processor.splitlines()) if value}
  details = []
  if "cpu family" in fields and "model" in fields:
    details.append(f"family {fields['cpu family']} model {fields['model']}")
  cpu_flags = fields.get("flags", "").split()
  widest_isa = next((isa for flag, isa in (("avx512f", "avx512"), ("avx2", "avx2"))
                     if flag in cpu_flags), None)
  details += [widest_isa] if widest_isa else []
  name = fields.get("model name", platform.processor())
  return f"{name} ({', '.join(details)})" if details else name


def stablehlo_op_count(lowered: jax.stages.Lowered) -> int:
  """Operations of a lowered program: its StableHLO/CHLO lines that assign a result."""
  return sum(1 for line in lowered.as_text().splitlines()
             if " = " in line and ("stablehlo." in line or "chlo." in line))


def timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def random_params(name: str, reference_config: dict) -> dict:
  """Params filled with small random values: no init compile (values do not affect timing)."""
  sample = jnp.zeros((1, 2, 16, 16, 3), jnp.float32)
  shapes = jax.eval_shape(from_reference_config(name, reference_config).init,
                          jax.random.key(0), sample, sample)["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.uniform(-0.05, 0.05, s.shape).astype(np.float32)), shapes)


def case_flop(model_name: str, case: str, shape) -> float:
  """Model FLOPs of one step: the forward, or forward and backward (counted as 2x) for train."""
  return (1 if case == "inference" else 3) * MODELS[model_name][1] * int(np.prod(shape))


def run_case(case: str, shape, model, params, args) -> dict:
  batch, time_, height, width = shape
  rng = np.random.default_rng(0)
  ir, vi = (jnp.asarray(rng.random((batch, time_, height, width, 3), np.float32)) for _ in "ab")
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  rss_reset = reset_peak_rss() if on_cpu else False

  if case == "inference":
    fn = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b),
                 compiler_options=schedule_lib.compiler_options())
    call_args = (params, ir, vi)
  else:
    def loss(p, a, b):
      outputs = model.apply({"params": p}, a, b)
      if args.model == "temcoco":
        return losses.temcoco_loss(outputs, a, b, None)[0]
      return losses.videofusion_loss(outputs, a, b)[0]
    fn = jax.jit(jax.value_and_grad(loss), compiler_options=schedule_lib.compiler_options())
    call_args = (params, ir, vi)
  flop = case_flop(args.model, case, shape)

  lowered = fn.lower(*call_args)
  op_count = stablehlo_op_count(lowered)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  host_memory.release_freed_memory()  # as `inference.Fuser` does after compiling
  warmup_s = timed(compiled, *call_args)
  step_s = statistics.median(timed(compiled, *call_args) for _ in range(args.steps))

  if on_cpu:
    memory = {"peak_memory_bytes": peak_rss_bytes(),
              "memory_kind": "host_rss_high_water" + ("" if rss_reset else "_since_process_start"),
              "large_blocks_to_os": args.large_blocks_to_os}
  else:
    stats = device.memory_stats() or {}
    memory = {"peak_memory_bytes": stats.get("peak_bytes_in_use"),
              "memory_kind": "device_peak_bytes_in_use_since_process_start"}
  frames = batch * time_
  return {
      "model": args.model, "case": case, "impl": "jax", "shape_bthw": list(shape),
      "dtype": args.dtype, "remat": bool(args.remat and case == "train"),
      "schedule": model.schedule, "remat_policy": args.remat_policy,
      "device": device.device_kind, "platform": device.platform,
      "cpu": cpu_model(), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "stablehlo_ops": op_count, "compile_s": round(compile_s, 3),
      "temp_bytes": temp_bytes, "first_step_s": round(warmup_s, 3),
      "step_s": round(step_s, 4), "s_per_frame": round(step_s / frames, 4),
      "frames_per_s": round(frames / step_s, 4), **memory,
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "model_gflop": round(flop / 1e9, 2), "achieved_gflop_per_s": round(flop / step_s / 1e9, 2),
  }


def run_torch_reference_case(case: str, shape, args) -> dict:
  """The official PyTorch network on `case` (float32, in a subprocess), as a JSON record."""
  result = torch_reference.measure_in_subprocess(
      args.torch_reference, "inference" if case == "inference" else "loss_and_grad", shape,
      MODELS[args.model][0], args.steps, args.torch_threads, jax.default_backend() == "gpu")
  step_s = result["median_step_s"]
  flop = case_flop(args.model, case, shape)
  frames = shape[0] * shape[1]
  return {
      "model": args.model, "case": case, "impl": "torch_reference", "shape_bthw": list(shape),
      "dtype": "float32", "device": result["device"], "platform": result["platform"],
      "cpu": cpu_model(), "torch": result["torch"], "torch_threads": result["torch_threads"],
      "torch_reference": result["checkout"], "compile_s": None,
      "first_step_s": round(result["first_step_s"], 3), "step_s": round(step_s, 4),
      "s_per_frame": round(step_s / frames, 4), "frames_per_s": round(frames / step_s, 4),
      "peak_memory_bytes": result["peak_memory_bytes"], "memory_kind": result["memory_kind"],
      "params": result["params"], "model_gflop": round(flop / 1e9, 2),
      "achieved_gflop_per_s": round(flop / step_s / 1e9, 2),
  }


def main() -> None:
  args = parse_args()
  args.large_blocks_to_os = host_memory.return_large_blocks_to_os()  # as the fuse command does
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  reference_config = MODELS[args.model][0]
  params = random_params(args.model, reference_config)
  for case in args.cases:
    shape = args.inference_shape if case == "inference" else args.train_shape
    model = from_reference_config(args.model, reference_config, dtype=dtype,
                                  remat=args.remat and case == "train")
    if "schedule" in model.__dataclass_fields__:
      model = model.clone(schedule=schedule_lib.resolve(args.schedule),
                          remat_policy=args.remat_policy)
    torch_record = None
    if args.torch_reference:  # first: its process ends before the JAX case allocates
      host_memory.release_freed_memory()  # what an earlier case freed, for the subprocess
      torch_record = run_torch_reference_case(case, shape, args)
      print(json.dumps(torch_record), flush=True)
    record = run_case(case, shape, model, params, args)
    if torch_record:
      record["speedup_vs_torch"] = torch_reference.speedup(record["frames_per_s"],
                                                           torch_record["frames_per_s"])
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
