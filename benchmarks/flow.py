"""SEA-RAFT flow and the full VF-Bench temporal evaluation: this port against the PyTorch reference.

  python benchmarks/flow.py --reference=/path/to/VF-Bench [--frames=20 --height=480 --width=640]

`--reference` is a checkout (or export) of github.com/Zhaozixiang1228/VF-Bench whose `src/model/raft.py`
is imported as is, in this process (the torch extra; `huggingface_hub` and the ImageNet download of
its constructor are stubbed). Both networks get the same random spring-S weights (Flax init),
nothing is downloaded. Prints JSON lines, all measured in this one run:
  * "flow": seconds per 640x480 flow, JAX (jitted, batch 1, compile excluded) and the reference
    (torch, `net(a, b)["final"]` as VF-Bench calls it, --threads), and their ratio;
  * "vfbench": the whole BiSWE + MS2R evaluation of a --frames clip with `vfbench_temporal`
    (6T flows, features once per frame, compiles included), against the reference's cost
    estimated as 18 flows per frame x its measured seconds per flow (a lower bound: the
    reference also rebuilds the network twice per frame and warps on top). It also gives the
    evaluation's FLOPs (XLA's cost analysis of the feature and flow programs), the FLOP rate it
    achieved, the rate a 10x speedup would need, and this CPU's float32 matmul rate for scale.
The clip is sequence 0111_1716 of ../shared/data/m3svd_mini when present, else a moving texture.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import types

import jax
import numpy as np

from vidfusion_jax import frames as frames_lib
from vidfusion_jax import models
from vidfusion_jax import weights
from vidfusion_jax.metrics import flow as flow_lib
from vidfusion_jax.metrics import temporal
from vidfusion_jax.models import schedule
from vidfusion_jax.models import sea_raft

REFERENCE_FLOWS_PER_FRAME = 18  # BiSWE 10 + MS2R 8 (specs: temporal_vfbench.md C.6)
M3SVD = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "m3svd_mini"


def _clip(frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fused, ir, vis) float32 videos on 0-255: M3SVD frames cropped, or a moving texture."""
  ir_dir, vis_dir = M3SVD / "infrared_Enhance" / "0111_1716", M3SVD / "visible_Enhance" / "0111_1716"
  if vis_dir.is_dir() and len(frames_lib.list_frame_files(vis_dir)) >= frames:
    read = lambda d: np.stack([frames_lib.read_frame(p)[:height, :width]
                               for p in frames_lib.list_frame_files(d)[:frames]]).astype(np.float32)
    ir, vis = read(ir_dir), read(vis_dir)
  else:
    texture = np.random.default_rng(0).uniform(0, 255, (height + frames, width + 2 * frames, 3))
    vis = np.stack([texture[t:t + height, 2 * t:2 * t + width] for t in range(frames)])
    ir = np.repeat(vis.mean(-1, keepdims=True), 3, -1)
    vis, ir = vis.astype(np.float32), ir.astype(np.float32)
  if vis.shape[1:3] != (height, width):
    raise SystemExit(f"the clip is {vis.shape[1:3]}, smaller than --height x --width")
  return np.round(0.5 * ir + 0.5 * vis).astype(np.float32), ir, vis


def _reference_net(reference: pathlib.Path, cfg: dict, state_dict: dict):
  """VF-Bench's RAFT (unmodified source) with `state_dict`, in eval mode."""
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  sys.modules.setdefault("huggingface_hub", types.SimpleNamespace(PyTorchModelHubMixin=object))
  untrained = torchvision.models.resnet18
  torchvision.models.resnet18 = lambda weights=None: untrained()  # no ImageNet download
  sys.path.insert(0, str(reference))
  from src.model.raft import RAFT  # pylint: disable=import-outside-toplevel,import-error
  net = RAFT(types.SimpleNamespace(**cfg)).eval()
  result = net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()},
                               strict=False)
  # Only the aliased shortcut BatchNorms (bn3 = downsample.1) and the counters may be absent.
  absent = [k for k in result.missing_keys if ".bn3." not in k and "num_batches" not in k]
  if absent or result.unexpected_keys:
    raise SystemExit(f"reference weights do not match: {absent} {result.unexpected_keys}")
  return net


def _seconds(fn, reps: int) -> float:
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _gflop(jitted, *args) -> float:
  """XLA's FLOP count of one call of a jitted function (cost analysis of its compiled program)."""
  cost = jitted.lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / 1e9


def _matmul_gflop_per_s(size: int = 2048, reps: int = 5) -> float:
  """Float32 GFLOP/s of one (size x size) @ (size x size) product: the CPU's attainable rate."""
  x = jax.random.normal(jax.random.key(0), (size, size), np.float32)
  product = jax.jit(lambda a: a @ a, compiler_options=schedule.compiler_options())
  product(x).block_until_ready()
  return 2 * size**3 / _seconds(lambda: product(x).block_until_ready(), reps) / 1e9


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reference", required=True, help="VF-Bench checkout (holds src/model)")
  parser.add_argument("--frames", type=int, default=20)
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--batch", type=int, default=4, help="pairs per call in the evaluation")
  parser.add_argument("--reps", type=int, default=2, help="timed repetitions per single flow")
  parser.add_argument("--threads", type=int, default=1,
                      help="torch intra-op threads (default 1: on a shared 2-core machine, 2 "
                           "threads spin-wait and run the reference 10x slower)")
  args = parser.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)

  cfg = {**sea_raft.variant_config("S"), "use_var": True, "var_min": 0, "var_max": 10, "path": None}
  module = models.from_reference_config("sea_raft", cfg)
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
  params = jax.jit(module.init)(jax.random.key(0), image, image)["params"]
  reference = _reference_net(pathlib.Path(args.reference), cfg,
                             weights.to_torch_state_dict("sea_raft", params))
  flow = flow_lib.SeaRaftFlow(module, params, "sea_raft:random-S")
  fused, ir, vis = _clip(args.frames, args.height, args.width)
  a, b = vis[:1], vis[1:2]

  start = time.perf_counter()
  jax_flow = flow.batched(a, b)
  compile_s = time.perf_counter() - start
  jax_s = _seconds(lambda: flow.batched(a, b), args.reps)
  to_torch = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    torch_s = _seconds(lambda: reference(to_torch(a), to_torch(b))["final"], args.reps)
    torch_flow = reference(to_torch(a), to_torch(b))["final"].permute(0, 2, 3, 1).numpy()
  print(json.dumps({
      "bench": "flow", "shape": [args.height, args.width], "device": jax.devices()[0].platform,
      "jax_compile_s": round(compile_s, 2), "jax_s_per_flow": round(jax_s, 3),
      "torch_s_per_flow": round(torch_s, 3), "torch_threads": args.threads,
      "speedup": round(torch_s / jax_s, 2),
      "max_abs_flow_difference_px": float(np.abs(jax_flow - torch_flow).max())}), flush=True)

  start = time.perf_counter()
  scores = temporal.vfbench_temporal(fused, ir, vis, flow, batch_size=args.batch)
  jax_total = time.perf_counter() - start
  reference_total = REFERENCE_FLOWS_PER_FRAME * args.frames * torch_s
  # The two programs of `SeaRaftFlow.pair_flows`: features of each frame, each flow given them.
  frames = jax.ShapeDtypeStruct((args.batch, args.height, args.width, 3), np.float32)
  encode = lambda p, x: module.apply({"params": p}, x, method=module.features)
  features = jax.eval_shape(encode, params, frames)
  per_image = _gflop(jax.jit(encode), params, frames) / args.batch
  per_flow = _gflop(jax.jit(lambda p, a, b, fa, fb: module.apply(
      {"params": p}, a, b, fmap1=fa, fmap2=fb)["flow"]), params, frames, frames, features,
                    features) / args.batch
  num_flows = 3 * len(temporal.vfbench_flow_pairs(args.frames))
  total_gflop = 3 * args.frames * per_image + num_flows * per_flow
  print(json.dumps({
      "bench": "vfbench", "frames": args.frames, "shape": [args.height, args.width],
      "jax_flows": num_flows, "jax_total_s_with_compile": round(jax_total, 1),
      "reference_flows": REFERENCE_FLOWS_PER_FRAME * args.frames,
      "reference_estimated_s": round(reference_total, 1),
      "speedup": round(reference_total / jax_total, 2),
      "gflop_per_image_features": round(per_image, 1), "gflop_per_flow_given_features":
      round(per_flow, 1), "total_gflop": round(total_gflop), "achieved_gflop_per_s":
      round(total_gflop / jax_total, 1), "gflop_per_s_for_10x":
      round(total_gflop / (reference_total / 10), 1),
      "cpu_f32_matmul_gflop_per_s": round(_matmul_gflop_per_s(), 1),
      "BiSWE_mean": float(scores["BiSWE"].mean()), "MS2R_mean": float(scores["MS2R"].mean())}),
      flush=True)


if __name__ == "__main__":
  main()
