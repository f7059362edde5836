"""The cpu_memory schedule's depthwise 3x3 kernel gradient: nine tap sums in one pass over whole
maps against the same sums over chunks of frames (`layers._chunked_tap_sums`).

  python benchmarks/depthwise_kernel_gradient.py [--shapes=18,128,128,32 --iters=9]

Prints one JSON line per (dy shape, form): shape (N, H, W, C of dy; x is its padded input), device,
the frames per chunk the schedule picks for it, compile and median seconds per call, and
`speedup`, the one-pass time over this form's. The default shapes are the depthwise convs of one
VideoFusion training batch (3 clips x 6 frames of 128x128) at the three resolutions.
"""

import json

from absl import flags
import jax

from model_forward import cpu_model
from temcoco import compile_and_time
from vidfusion_jax import cli
from vidfusion_jax.models import layers

FORMS = {"one_pass": layers._tap_sums, "chunked": layers._chunked_tap_sums}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("shapes", ["18,128,128,32", "18,64,64,64", "18,32,32,128"],
                            "N,H,W,C of dy (repeat the flag for several)", flag_values=fv)
  flags.DEFINE_integer("iters", 9, "timed calls per case", lower_bound=1, flag_values=fv)


def parse_args(argv=None):
  """The flags, with --shapes as (N, H, W, C) tuples; a usage error (exit 2) on a bad shape."""
  prog = "python benchmarks/depthwise_kernel_gradient.py"
  args = cli.parse(argv, define_flags, prog=prog, usage=__doc__)
  try:
    args.shapes = [tuple(int(v) for v in text.split(",")) for text in args.shapes]
  except ValueError:
    args.shapes = []
  if not args.shapes or any(len(shape) != 4 for shape in args.shapes):
    cli.usage_error(prog, "--shapes takes N,H,W,C as four integers, e.g. 18,128,128,32")
  return args


def main():
  args = parse_args()
  for n, h, w, c in args.shapes:
    x = jax.random.normal(jax.random.key(0), (n, h + 2, w + 2, c))
    dy = jax.random.normal(jax.random.key(1), (n, h, w, c))
    timings = {form: compile_and_time(fn, (x, dy), args.iters) for form, fn in FORMS.items()}
    for form, (compile_s, step_s) in timings.items():
      print(json.dumps({
          "benchmark": "depthwise_kernel_gradient", "form": form, "shape_nhwc": [n, h, w, c],
          "frames_per_chunk": layers._frames_per_chunk(x, dy) if form == "chunked" else n,
          "device": jax.devices()[0].device_kind, "cpu": cpu_model(), "jax": jax.__version__,
          "compile_s": round(compile_s, 3), "step_s": round(step_s, 5),
          "speedup": round(timings["one_pass"][1] / step_s, 2),
      }), flush=True)


if __name__ == "__main__":
  main()
