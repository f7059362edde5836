"""TemCoCo costs that decide accelerator work: program size, compile time, deformable sampling.

Prints one JSON line per case:

* `ops`: StableHLO op count of value-and-grad of the TemCoCo loss (`objectives.forward_and_loss`,
  fusion loss) per schedule ("cpu_memory", "plain") and clip shape (the `tiny` config's
  1x3x32x32 and the recipe's 3x10x224x224), and its compile time for this host (`--compile`).
* `deform`: forward and forward+backward time of the deformable convolutions of one network call
  (two at DCN_1's shape, B*T x H/2 x W/2 x 64 in 8 groups, two at DCN_2's, B*T x H x W x 32 in 4
  groups, 8 deformable groups each) against the whole network's inference and training step at
  the same clip shape, and their share of it.

  python benchmarks/temcoco.py                              # recipe shape, both cases
  python benchmarks/temcoco.py --cases=ops --compile
  python benchmarks/temcoco.py --cases=deform --clip_shape=1,10,112,112
  python benchmarks/temcoco.py --quick                      # smoke test
"""

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax import objectives
from vidfusion_jax.models import deform_conv
from vidfusion_jax.models import schedule
from vidfusion_jax.models import temcoco

TINY_SHAPE = (1, 3, 32, 32)
RECIPE_SHAPE = (3, 10, 224, 224)
QUICK_SHAPE = (1, 2, 32, 32)


def parse_shape(text: str) -> tuple[int, int, int, int]:
  shape = tuple(int(s) for s in text.split(","))
  if len(shape) != 4 or shape[2] % 16 or shape[3] % 16:
    raise argparse.ArgumentTypeError(f"expected batch,time,height,width with height and width "
                                     f"multiples of 16; got {text!r}")
  return shape


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", default="ops,deform", help="subset of ops,deform (default both)")
  parser.add_argument("--clip_shape", type=parse_shape, default=RECIPE_SHAPE,
                      help="batch,time,height,width of the deform case (default 3,10,224,224)")
  parser.add_argument("--compile", action="store_true", help="ops case: also compile and time it")
  parser.add_argument("--steps", type=int, default=3, help="timed calls after a warm-up (3)")
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke test: shapes {','.join(map(str, QUICK_SHAPE))}, one step")
  args = parser.parse_args()
  args.cases = [c for c in args.cases.split(",") if c]
  if set(args.cases) - {"ops", "deform"}:
    parser.error(f"unknown cases {sorted(set(args.cases) - {'ops', 'deform'})}")
  args.op_shapes = (QUICK_SHAPE,) if args.quick else (TINY_SHAPE, RECIPE_SHAPE)
  if args.quick:
    args.clip_shape, args.steps = QUICK_SHAPE, 1
  return args


def op_count(lowered: jax.stages.Lowered) -> int:
  """Operations in the lowered StableHLO module (each function body counted once)."""
  return len(re.findall(r"\b(?:stablehlo|chlo)\.[a-z_]+", lowered.as_text()))


def compile_and_time(fn, args, steps: int, options: dict | None = None) -> tuple[float, float]:
  """(compile seconds, median seconds per call after one warm-up call), compiled with `options`
  (default: `schedule.compiler_options()`, as the networks' programs)."""
  options = schedule.compiler_options() if options is None else options
  start = time.perf_counter()
  compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times)


def loss_value_and_grad(model):
  """value-and-grad of the TemCoCo fusion loss, as the trainer computes it."""
  objective = objectives.get_objective("temcoco")

  def loss(params, batch):
    return objectives.forward_and_loss(model, objective, params, batch, None)[0]
  return jax.value_and_grad(loss)


def abstract_batch(shape) -> dict[str, jax.ShapeDtypeStruct]:
  clip = jax.ShapeDtypeStruct((*shape, 3), jnp.float32)
  return {k: clip for k in ("lq_ir", "lq_vis", "gt_ir", "gt_vis")}


def ops_case(shape, schedule_name: str, compile_too: bool) -> dict:
  model = temcoco.TemCoCo(schedule=schedule_name)
  batch = abstract_batch(shape)
  params = jax.eval_shape(model.init, jax.random.key(0), batch["lq_ir"], batch["lq_vis"])
  start = time.perf_counter()
  lowered = jax.jit(loss_value_and_grad(model)).trace(params["params"], batch).lower()
  result = {"case": "ops", "schedule": schedule_name, "shape_bthw": list(shape),
            "stablehlo_ops": op_count(lowered),
            "lower_s": round(time.perf_counter() - start, 2)}
  if compile_too:
    start = time.perf_counter()
    lowered.compile(schedule.compiler_options())
    result["compile_s"] = round(time.perf_counter() - start, 2)
  return result


def random_tree(tree, rng: np.random.Generator, scale: float = 0.05):
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(-scale, scale, s.shape), s.dtype), tree)


def deform_case(shape, steps: int) -> dict:
  """Time of the four deformable convolutions against the network, at one clip shape."""
  b, t, h, w = shape
  rng = np.random.default_rng(0)
  timings = {}
  dcn_total = {"forward": 0.0, "forward_backward": 0.0}
  for name, (size, channels, groups) in {"dcn1": ((h // 2, w // 2), 64, 8),
                                         "dcn2": ((h, w), 32, 4)}.items():
    x = jnp.asarray(rng.normal(size=(b * t, *size, channels)), jnp.float32)
    offset = jnp.asarray(2 * rng.normal(size=(b * t, *size, 18 * temcoco.DEFORMABLE_GROUPS)),
                         jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, channels // groups, channels)) / 10, jnp.float32)
    conv = lambda x, o, k, g=groups: deform_conv.deform_conv2d(
        x, o, k, groups=g, deformable_groups=temcoco.DEFORMABLE_GROUPS)
    grad = jax.grad(lambda x, o, k: jnp.sum(jnp.square(conv(x, o, k))), argnums=(0, 1, 2))
    for kind, fn in (("forward", conv), ("forward_backward", grad)):
      compile_s, step_s = compile_and_time(fn, (x, offset, kernel), steps)
      timings[f"{name}_{kind}"] = {"compile_s": round(compile_s, 2), "step_s": round(step_s, 4)}
      dcn_total[kind] += 2 * step_s  # each VI_TDCN stage has two deformable convolutions
  model = temcoco.TemCoCo(schedule=schedule.resolve(schedule.AUTO))
  batch = random_tree(abstract_batch(shape), rng, 0.5)
  params = random_tree(jax.eval_shape(model.init, jax.random.key(0), batch["lq_ir"],
                                      batch["lq_vis"])["params"], rng)
  network = {
      "forward": (lambda p, a, v: model.apply({"params": p}, a, v), (params, batch["lq_ir"],
                                                                      batch["lq_vis"])),
      "forward_backward": (loss_value_and_grad(model), (params, batch))}
  for kind, (fn, fn_args) in network.items():
    compile_s, step_s = compile_and_time(fn, fn_args, steps)
    timings[f"network_{kind}"] = {"compile_s": round(compile_s, 2), "step_s": round(step_s, 4)}
    timings[f"deform_share_{kind}"] = round(dcn_total[kind] / step_s, 3)
  return {"case": "deform", "shape_bthw": list(shape), "schedule": model.schedule,
          "platform": jax.devices()[0].platform, "jax": jax.__version__, **timings}


def main() -> None:
  args = parse_args()
  if "ops" in args.cases:
    for shape in args.op_shapes:
      for schedule_name in (schedule.CPU_MEMORY, schedule.PLAIN):
        print(json.dumps(ops_case(shape, schedule_name, args.compile)), flush=True)
  if "deform" in args.cases:
    print(json.dumps(deform_case(args.clip_shape, args.steps)), flush=True)


if __name__ == "__main__":
  main()
