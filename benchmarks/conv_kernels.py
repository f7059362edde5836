"""GFLOP/s of one 3x3 convolution's forward, input gradient and weight gradient, with XLA's default
kernels and with `schedule.compiler_options()` (what the networks' programs use).

  python benchmarks/conv_kernels.py [--shape=18,128,128,64 --iters=5]

Prints one JSON line per (pass, options) case: shape (N, H, W, C; C in = C out), device, compile
and steady-state seconds, GFLOP/s, and `speedup`, the options' speed over the default's for the
same pass. The default shape is one VideoFusion training batch (3 clips x 6 frames of 128x128) at
64 channels. On CPU the options take convolutions away from YNNPACK (models/schedule.py).
"""

import json

from absl import flags
import jax

from model_forward import cpu_model
from temcoco import compile_and_time
from vidfusion_jax import cli
from vidfusion_jax.models import schedule as schedule_lib


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


PASSES = {
    "forward": lambda x, kernel, dy: _conv(x, kernel),
    "input_gradient": lambda x, kernel, dy: jax.vjp(lambda a: _conv(a, kernel), x)[1](dy)[0],
    "weight_gradient": lambda x, kernel, dy: jax.vjp(lambda k: _conv(x, k), kernel)[1](dy)[0],
}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_list("shape", ["18", "128", "128", "64"], "N,H,W,C of the input", flag_values=fv)
  flags.DEFINE_integer("iters", 5, "timed calls per case", lower_bound=1, flag_values=fv)


def main():
  args = cli.parse(None, define_flags, prog="python benchmarks/conv_kernels.py", usage=__doc__)
  n, h, w, c = (int(v) for v in args.shape)
  x = jax.random.normal(jax.random.key(0), (n, h, w, c))
  kernel = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, c, c))
  call_args = (x, kernel, _conv(x, kernel))
  flop = 2 * n * h * w * c * c * 9
  option_sets = {"default": {}, "schedule": schedule_lib.compiler_options()}
  for name, fn in PASSES.items():
    timings = {label: compile_and_time(fn, call_args, args.iters, options)
               for label, options in option_sets.items()}
    default_s = timings["default"][1]
    for label, (compile_s, step_s) in timings.items():
      print(json.dumps({
          "benchmark": "conv_kernels", "pass": name, "options": label,
          "compiler_options": option_sets[label], "shape_nhwc": [n, h, w, c],
          "kernel": [3, 3, c, c],
          "device": jax.devices()[0].device_kind, "cpu": cpu_model(), "jax": jax.__version__,
          "compile_s": round(compile_s, 3), "step_s": round(step_s, 5),
          "gflop_per_s": round(flop / step_s / 1e9, 1), "speedup": round(default_s / step_s, 2),
          "peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
      }), flush=True)


if __name__ == "__main__":
  main()
