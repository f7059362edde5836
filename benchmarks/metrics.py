"""Throughput of the full spatial metric set (`vidfusion_jax.metrics.compute`).

  python benchmarks/metrics.py [--height=480 --width=640 --batch=8 --iters=5]

Prints one JSON line per mode: "per_frame" (one (H, W) frame per call) and "batched" (--batch
frames per call), with the frame shape, device, compile time, steady-state seconds per call,
frames per second and peak memory (device allocator peak on accelerators, process peak RSS on
CPU). The CDDFuse reference evaluator needs about 1.6 s per 640x480 frame for these twelve
metrics on a 2-core CPU.
"""

from __future__ import annotations

import json
import resource
import time

from absl import flags
import jax
import numpy as np

from vidfusion_jax import cli
from vidfusion_jax import metrics


def _peak_memory_bytes(device: jax.Device) -> int:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _frames(rng: np.random.Generator, shape: tuple[int, ...]) -> list[jax.Array]:
  """Registered-looking uint8-valued sources and a fused frame, as float32 on the device."""
  ir = rng.integers(0, 256, shape).astype(np.float32)
  vis = np.clip(0.5 * ir + rng.normal(64, 30, shape), 0, 255).round().astype(np.float32)
  fused = np.maximum(ir, vis)
  return [jax.device_put(x) for x in (fused, ir, vis)]


def bench(shape: tuple[int, ...], iters: int, mode: str) -> dict:
  device = jax.devices()[0]
  fused, ir, vis = _frames(np.random.default_rng(0), shape)
  start = time.perf_counter()
  jax.block_until_ready(metrics.compute(fused, ir, vis))
  first_call = time.perf_counter() - start
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(metrics.compute(fused, ir, vis))
    times.append(time.perf_counter() - start)
  steady = float(np.median(times))
  frames_per_call = shape[0] if len(shape) == 3 else 1
  return {"benchmark": "metrics.compute", "mode": mode, "metrics": list(metrics.METRIC_NAMES),
          "shape": list(shape), "dtype": "float32", "device": device.device_kind,
          "platform": device.platform, "compile_s": round(first_call - steady, 3),
          "steady_s_per_call": round(steady, 5),
          "s_per_frame": round(steady / frames_per_call, 5),
          "frames_per_s": round(frames_per_call / steady, 2),
          "peak_memory_bytes": _peak_memory_bytes(device), "iters": iters}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("height", 480, "frame height", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("width", 640, "frame width", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("batch", 8, "frames per batched call", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("iters", 5, "timed calls per mode", lower_bound=1, flag_values=fv)


def main() -> None:
  args = cli.parse(None, define_flags, prog="python benchmarks/metrics.py", usage=__doc__)
  with jax.default_matmul_precision("float32"):
    for mode, shape in (("per_frame", (args.height, args.width)),
                        ("batched", (args.batch, args.height, args.width))):
      print(json.dumps(bench(shape, args.iters, mode)), flush=True)


if __name__ == "__main__":
  main()
