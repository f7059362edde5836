"""Smoke tests of the demo and of every benchmark script, at tiny sizes, as subprocesses."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from test_train_standin import REPO
from vidfusion_jax.models import schedule as schedule_lib

pytestmark = pytest.mark.slow  # each case starts a Python process that compiles a model

# A checkout of https://github.com/Linfeng-Tang/VideoFusion, for the --torch_reference cases.
TORCH_REFERENCE = os.environ.get("VIDFUSION_TORCH_REFERENCE")
# A checkout of https://github.com/Zhaozixiang1228/VF-Bench, for benchmarks/flow.py.
VFBENCH_REFERENCE = os.environ.get("VIDFUSION_VFBENCH_REFERENCE")


def _run(args, timeout=900) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _json_lines(stdout: str) -> list[dict]:
  lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
  assert lines, stdout[-3000:]
  return lines


def _assert_positive_rates(record: dict) -> None:
  """Every timing or rate in a benchmark record is a positive finite number."""
  timed = {k: v for k, v in record.items()
           if isinstance(v, (int, float)) and ("second" in k or k.endswith("_s"))}
  assert timed, record
  for key, value in timed.items():
    assert math.isfinite(value) and value > 0, (key, record)


def test_demo_at_tiny_size(tmp_path):
  workdir = tmp_path / "demo"
  _run(["-m", "vidfusion_jax.demo", f"--workdir={workdir}", "--steps=2", "--frames=4"])
  assert sorted(p.name for p in (workdir / "fused").iterdir()) == [
      f"{i:04d}.png" for i in range(4)]
  summary = json.loads((workdir / "metrics" / "summary.json").read_text())
  assert set(summary) == {"videofusion", "mean_of_sources"}
  for method in summary.values():
    assert method["frames"] == 4
    assert all(math.isfinite(v) for v in method.values() if isinstance(v, float))
  assert (workdir / "fused.mp4").stat().st_size > 0
  assert (workdir / "train" / "checkpoints" / "2").is_dir()


# One case per script: each extra case is another compile of the network; the plain schedule
# compiles fastest.
@pytest.mark.parametrize("args", [
    ["benchmarks/train_step.py", "--quick", "--remat=false", "--dtype=float32", "--steps=1",
     "--schedule=plain"],
    ["benchmarks/inference.py", "--quick"],
    ["benchmarks/model_forward.py", "--quick", "--cases=inference", "--schedule=plain"],
], ids=["train_step", "inference", "model_forward"])
def test_benchmark_quick_mode(args):
  for record in _json_lines(_run(args)):
    assert record.get("quick", True) is True
    _assert_positive_rates(record)


@pytest.mark.skipif(not TORCH_REFERENCE, reason="set VIDFUSION_TORCH_REFERENCE to a checkout of "
                    "https://github.com/Linfeng-Tang/VideoFusion to time the PyTorch reference")
@pytest.mark.parametrize("args, rate", [
    (["benchmarks/model_forward.py", "--quick", "--cases=inference", "--schedule=plain"],
     "frames_per_s"),
    (["benchmarks/train_step.py", "--quick", "--remat=false", "--dtype=float32", "--steps=1",
      "--schedule=plain"], "frames_per_second"),
], ids=["model_forward", "train_step"])
def test_benchmark_times_the_torch_reference(args, rate):
  records = _json_lines(_run([*args, f"--torch_reference={TORCH_REFERENCE}"]))
  assert sorted(r["impl"] for r in records) == ["jax", "torch_reference"], records
  jax_record, torch_record = sorted(records, key=lambda r: r["impl"])
  assert torch_record["torch_reference"] == str(pathlib.Path(TORCH_REFERENCE).resolve())
  _assert_positive_rates(torch_record)
  assert torch_record["compile_s" if "compile_s" in torch_record else "compile_seconds"] is None
  assert torch_record["params"] == jax_record["params"]  # the same network
  for key in ("shape_bthw", "global_batch", "clip_length", "crop_size"):
    assert torch_record.get(key) == jax_record.get(key), key
  assert jax_record["speedup_vs_torch"] == pytest.approx(
      jax_record[rate] / torch_record[rate], rel=1e-12)


def test_metrics_benchmark_at_tiny_size():
  records = _json_lines(_run(["benchmarks/metrics.py", "--height=48", "--width=48", "--batch=2",
                              "--iters=1"]))
  assert len(records) == 2
  for record in records:
    _assert_positive_rates(record)


def test_conv_kernels_benchmark_at_tiny_size():
  records = _json_lines(_run(["benchmarks/conv_kernels.py", "--shape=2,16,16,8", "--iters=1"]))
  assert [(r["pass"], r["options"]) for r in records] == [
      (p, o) for p in ("forward", "input_gradient", "weight_gradient")
      for o in ("default", "schedule")]
  for record in records:
    assert record["gflop_per_s"] > 0 and record["speedup"] > 0
  assert records[1]["compiler_options"] == schedule_lib.CPU_COMPILER_OPTIONS


def test_depthwise_kernel_gradient_benchmark_chunks_large_maps():
  records = _json_lines(_run(["benchmarks/depthwise_kernel_gradient.py",
                              "--shapes=12,128,128,32", "--shapes=2,16,16,8", "--iters=1"]))
  assert [(r["shape_nhwc"], r["form"], r["frames_per_chunk"]) for r in records] == [
      ([12, 128, 128, 32], "one_pass", 12), ([12, 128, 128, 32], "chunked", 2),
      ([2, 16, 16, 8], "one_pass", 2), ([2, 16, 16, 8], "chunked", 2)]
  for record in records:
    assert record["step_s"] > 0 and record["speedup"] > 0


def test_input_pipeline_benchmark_at_tiny_size(shared, tmp_path):
  records = _json_lines(_run([
      "benchmarks/input_pipeline.py", f"--data_root={shared('data/m3svd_mini')}",
      f"--work_dir={tmp_path}", "--record_clip_length=3", "--clip_length=2", "--crop_size=32",
      "--batch_size=2", "--workers=0", "--readers=raw", "--seconds=0.5"]))
  rates = [r for r in records if "reader" in r]
  assert rates and all(r["reader"] == "raw" for r in rates)
  for record in rates:
    _assert_positive_rates(record)


@pytest.mark.skipif(not VFBENCH_REFERENCE, reason="set VIDFUSION_VFBENCH_REFERENCE to a checkout "
                    "of https://github.com/Zhaozixiang1228/VF-Bench to time its SEA-RAFT")
def test_flow_benchmark_against_vfbench():
  flow, vfbench = _json_lines(_run(["benchmarks/flow.py", f"--reference={VFBENCH_REFERENCE}",
                                    "--frames=5", "--height=128", "--width=160", "--batch=2",
                                    "--reps=1"]))
  assert flow["max_abs_flow_difference_px"] < 1e-2
  assert flow["speedup"] == pytest.approx(flow["torch_s_per_flow"] / flow["jax_s_per_flow"],
                                          rel=0.02)
  assert vfbench["jax_flows"] == 3 * 10 and vfbench["reference_flows"] == 18 * 5
  assert vfbench["total_gflop"] == pytest.approx(
      15 * vfbench["gflop_per_image_features"] + 30 * vfbench["gflop_per_flow_given_features"],
      rel=0.01, abs=1)
  for key in ("achieved_gflop_per_s", "gflop_per_s_for_10x", "cpu_f32_matmul_gflop_per_s"):
    assert vfbench[key] > 0, key
