"""The official PyTorch VideoFusion, timed on a benchmark's shapes (`--torch_reference=CHECKOUT`).

CHECKOUT is a local clone of https://github.com/Linfeng-Tang/VideoFusion; nothing of it is part of
this project: its modules are imported at run time. The benchmarks time the reference in a fresh
`python benchmarks/torch_reference.py SPEC_JSON` subprocess, so that its host RSS high-water mark
is its own and the JAX process's numbers are not disturbed. Cases:

  inference      eval mode under torch.no_grad: one `net(ir, vi)` call, as its `test()`
  loss_and_grad  forward, the full training loss, backward (model_forward.py's train case)
  train_step     loss_and_grad, then clip_grad_norm_ and AdamW as its `optimize_parameters`

The training loss is `VideoFusionModel.optimize_parameters` (basicsr/models/video_fusion_model.py)
with the losses options/train/train_VideoFusion.yml enables: Fusion_loss(fused, gt_ir, gt_vi) +
Fidelity_loss for the IR and VI restorations + 10 x TemporalConsistency_loss of the IR and VI
restorations and of the fused video against both targets (basicsr/losses/losses.py). Only
basicsr/archs and basicsr/losses are loaded: the package's `__init__` files import its whole
training stack (datasets, metrics, thop, natsort, lmdb), which the timed computation does not use.
"""

import contextlib
import importlib
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
import types

from absl import flags

CLONE = "git clone https://github.com/Linfeng-Tang/VideoFusion"
# Files of the checkout that the measurement imports or that identify it.
REQUIRED_FILES = (
    "basicsr/archs/videofusion_Trans_arch.py",
    "basicsr/archs/Transformer_util.py",
    "basicsr/archs/arch_util.py",
    "basicsr/losses/losses.py",
    "basicsr/utils/registry.py",
    "basicsr/models/video_fusion_model.py",
    "options/train/train_VideoFusion.yml",
)
CASES = ("inference", "loss_and_grad", "train_step")
CONSISTENCY_WEIGHT = 10  # VideoFusionModel's default: the yml gives consistency_opt no weight


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of the benchmarks that take --torch_reference (listed by their --help)."""
  module_name = "benchmarks/torch_reference.py"
  flags.DEFINE_string("torch_reference", None,
                      "also time the official PyTorch network on the same shapes, from this local "
                      f"checkout ({CLONE})", flag_values=fv, module_name=module_name)
  flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads of --torch_reference "
                       "(default: all cores)", lower_bound=1, flag_values=fv,
                       module_name=module_name)


def check(checkout: str, model: str) -> str:
  """The absolute checkout path; ValueError saying what is missing, before any compute."""
  if model != "videofusion":
    raise ValueError(f"--torch_reference times the official VideoFusion only; got --model={model}")
  if importlib.util.find_spec("torch") is None:
    raise ValueError("--torch_reference needs PyTorch: pip install 'vidfusion-jax[torch]'")
  root = pathlib.Path(checkout).expanduser().resolve()
  if not root.is_dir():
    raise ValueError(f"--torch_reference={checkout}: no such directory; {CLONE}")
  for name in REQUIRED_FILES:
    if not (root / name).is_file():
      raise ValueError(f"--torch_reference={checkout} does not look like a checkout of "
                       f"Linfeng-Tang/VideoFusion: {name} is missing; {CLONE}")
  return str(root)


def measure_in_subprocess(checkout: str, case: str, shape, network_config: dict, steps: int,
                          threads: int | None, gpu: bool, optimizer: dict | None = None) -> dict:
  """`measure` in a fresh Python process; its messages go to stderr, its result comes back."""
  spec = {"checkout": checkout, "case": case, "shape_bthw": list(shape), "steps": steps,
          "network_config": {k: v for k, v in network_config.items() if k != "type"},
          "threads": threads or os.cpu_count(), "gpu": gpu, "optimizer": optimizer}
  result = subprocess.run([sys.executable, __file__, json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"the torch reference ({case}, {shape}) failed with exit status "
                       f"{result.returncode}; its messages are above")
  return json.loads(result.stdout.splitlines()[-1])


def speedup(jax_frames_per_s: float, torch_frames_per_s: float) -> float:
  """How many times faster the JAX case ran than the reference (frames per second ratio)."""
  return jax_frames_per_s / torch_frames_per_s


def _import_reference(checkout: str):
  """The reference's arch and losses modules, without running basicsr's package `__init__`s."""
  sys.path.insert(0, checkout)
  for package in ("basicsr", "basicsr.archs", "basicsr.losses"):
    module = types.ModuleType(package)
    module.__path__ = [os.path.join(checkout, *package.split("."))]
    sys.modules[package] = module
  return (importlib.import_module("basicsr.archs.videofusion_Trans_arch"),
          importlib.import_module("basicsr.losses.losses"))


class _TrainingLoss:
  """The loss of VideoFusionModel.optimize_parameters under the official training options."""

  def __init__(self, losses, device):
    with contextlib.redirect_stdout(sys.stderr):  # the loss constructors print a banner
      self.fusion = losses.Fusion_loss().to(device)
      self.fidelity = losses.Fidelity_loss().to(device)
    self.consistency = losses.TemporalConsistency_loss().to(device)

  def __call__(self, outputs, gt_ir, gt_vi):
    """(total, {term: value}) for network outputs and targets (B, T, 3, H, W)."""
    fused, rec_ir, rec_vi = outputs["fusion"], outputs["ir"], outputs["vi"]
    frames = lambda x: x.flatten(0, 1)
    terms = dict(self.fusion(frames(fused), frames(gt_ir), frames(gt_vi)))
    terms.update(self.fidelity(frames(rec_ir), frames(gt_ir), type="ir"))
    terms.update(self.fidelity(frames(rec_vi), frames(gt_vi), type="vi"))
    terms["l_cons_ir"] = CONSISTENCY_WEIGHT * self.consistency(rec_ir, gt_ir)
    terms["l_cons_vi"] = CONSISTENCY_WEIGHT * self.consistency(rec_vi, gt_vi)
    terms["l_cons_fusion"] = CONSISTENCY_WEIGHT * (self.consistency(fused, gt_ir) +
                                                   self.consistency(fused, gt_vi))
    terms["l_total"] = (terms["loss_fusion"] + terms["ir_loss_fid"] + terms["vi_loss_fid"] +
                        terms["l_cons_ir"] + terms["l_cons_vi"] + terms["l_cons_fusion"])
    return terms["l_total"], terms


def measure(spec: dict) -> dict:
  """Times one case of the reference in this process: one warm-up step, then spec["steps"]."""
  import torch  # pylint: disable=import-outside-toplevel

  if spec["case"] not in CASES:
    raise ValueError(f"unknown case {spec['case']!r}; choose from {CASES}")
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  device = torch.device("cuda" if spec["gpu"] and torch.cuda.is_available() else "cpu")
  if spec["gpu"] and device.type != "cuda":
    print("torch_reference: JAX runs on a GPU but torch.cuda is unavailable: timing the "
          "reference on the CPU", file=sys.stderr)
  arch, losses = _import_reference(spec["checkout"])
  net = arch.VideoFusion_Trans(**spec["network_config"]).to(device)
  batch, frames, height, width = spec["shape_bthw"]
  shape = (batch, frames, 3, height, width)
  generator = torch.Generator().manual_seed(0)
  if spec["case"] == "train_step":  # degraded inputs and clean targets, 8-bit like the data
    lq_ir, lq_vi, gt_ir, gt_vi = (
        torch.randint(0, 256, shape, generator=generator).float().div(255).to(device)
        for _ in range(4))
  else:  # model_forward.py's cases: the inputs are the targets
    lq_ir, lq_vi = (torch.rand(shape, generator=generator).to(device) for _ in range(2))
    gt_ir, gt_vi = lq_ir, lq_vi

  terms = {}
  if spec["case"] == "inference":
    net.eval()

    def step():
      with torch.no_grad():
        return net(lq_ir, lq_vi)["fusion"]
  else:
    net.train()
    loss = _TrainingLoss(losses, device)
    optimizer = None
    if spec["case"] == "train_step":
      opt = spec["optimizer"]
      optimizer = torch.optim.AdamW(net.parameters(), lr=opt["learning_rate"],
                                    betas=(opt["b1"], opt["b2"]), eps=opt["eps"],
                                    weight_decay=opt["weight_decay"])

    def step():
      total, values = loss(net(lq_ir, lq_vi), gt_ir, gt_vi)
      total.backward()
      if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), spec["optimizer"]["grad_clip_norm"])
        optimizer.step()
      net.zero_grad(set_to_none=True)
      terms.update({k: v.detach() for k, v in values.items()})
      return total

  def timed():
    start = time.perf_counter()
    step()
    if device.type == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start

  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  first_step_s = timed()
  step_times = [timed() for _ in range(spec["steps"])]
  if device.type == "cuda":
    memory = {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
              "memory_kind": "torch_cuda_max_memory_allocated"}
  else:
    memory = {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "memory_kind": "host_rss_high_water_of_subprocess"}
  return {
      "case": spec["case"], "shape_bthw": spec["shape_bthw"], "platform": device.type,
      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "checkout": spec["checkout"], "first_step_s": first_step_s, "step_times_s": step_times,
      "median_step_s": statistics.median(step_times),
      "mean_step_s": statistics.fmean(step_times), **memory,
      "params": sum(p.numel() for p in net.parameters()),
      "loss_terms": {k: float(v) for k, v in terms.items()},
  }


if __name__ == "__main__":
  print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
