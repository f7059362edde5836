"""Fused frames per second of `vidfusion_jax.inference.Fuser` at 640x480 (JSON lines on stdout).

  python benchmarks/inference.py                     # official VideoFusion, window 7
  python benchmarks/inference.py --windows_per_call=1,2,4 --dtype=bfloat16
  python benchmarks/inference.py --quick             # tiny model and frames: checks the script

Runs on the default JAX backend (GPU when present, else CPU), or on each of `--backends=cpu,gpu`.
Params are random (the official
config's shapes), frames are synthetic and already in memory, so the number covers padding,
windowing, host<->device transfer, the network and blending, but not PNG decoding/encoding.
"""

import json
import pathlib
import sys
import time

from absl import flags
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from vidfusion_jax import cli  # pylint: disable=wrong-import-position
from vidfusion_jax import host_memory  # pylint: disable=wrong-import-position
from vidfusion_jax import inference  # pylint: disable=wrong-import-position

OFFICIAL = {"name": "videofusion", "config": {}, "height": 480, "width": 640, "window": 7,
            "frames": 28}
QUICK = {"name": "videofusion",
         "config": {"num_features": 16, "num_blocks": [1, 1, 1], "num_decoder_blocks": 1},
         "height": 32, "width": 48, "window": 4, "frames": 8}


def _fuser(setup, dtype, overlap, windows_per_call):
  module = inference.build_model(setup["name"], setup["config"], dtype)
  rng = np.random.default_rng(0)
  sample = jax.ShapeDtypeStruct((1, 2, 16, 16, 3), np.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), sample, sample)["params"]
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  spec = inference.input_spec(module)
  windows = inference.WindowSettings(setup["window"], overlap)
  return inference.Fuser.from_module(module, params, spec, windows,
                                     windows_per_call=windows_per_call)


def _run(fuser, clip):
  start = time.perf_counter()
  count = sum(1 for _ in fuser.fuse_stream(clip[0], clip[1]))
  return count, time.perf_counter() - start


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_bool("quick", False, "tiny model and frames", flag_values=fv)
  flags.DEFINE_list("windows_per_call", ["1", "2"], "windows per device call to measure",
                    flag_values=fv)
  flags.DEFINE_integer("overlap", 0, "window overlap (official: 0)", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype", flag_values=fv)
  flags.DEFINE_integer("frames", None, "frames per timed run", lower_bound=1, flag_values=fv)
  flags.DEFINE_list("backends", None, "JAX backends to measure, e.g. cpu,gpu (default: the "
                    "default backend)", flag_values=fv)


def main():
  args = cli.parse(None, define_flags, prog="python benchmarks/inference.py", usage=__doc__)
  host_memory.return_large_blocks_to_os()  # as `python -m vidfusion_jax.fuse` does
  setup = QUICK if args.quick else OFFICIAL
  num_frames = args.frames or setup["frames"]
  rng = np.random.default_rng(1)
  clip = rng.integers(0, 256, (2, num_frames, setup["height"], setup["width"], 3), np.uint8)
  for backend in args.backends or [jax.default_backend()]:
    with jax.default_device(jax.devices(backend)[0]):
      for per_call in [int(n) for n in args.windows_per_call]:
        fuser = _fuser(setup, args.dtype, args.overlap, per_call)
        _, warmup_s = _run(fuser, clip[:, :setup["window"] * per_call])
        count, seconds = _run(fuser, clip)
        print(json.dumps({
            "benchmark": "inference", "model": setup["name"], "quick": args.quick,
            "backend": backend, "device": jax.devices(backend)[0].device_kind,
            "dtype": args.dtype, "height": setup["height"], "width": setup["width"],
            "window": setup["window"], "overlap": args.overlap, "windows_per_call": per_call,
            "frames": count, "warmup_s": round(warmup_s, 3), "seconds": round(seconds, 3),
            "frames_per_second": round(count / seconds, 3)}), flush=True)


if __name__ == "__main__":
  main()
