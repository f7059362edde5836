"""The command-line convention (absl flags, snake_case, old spellings as aliases) and the
persistent compilation cache of train, fuse and evaluate."""

import importlib
import json
import os
import pathlib
import platform
import subprocess
import sys

from absl import flags
import pytest

from vidfusion_jax import cli
from vidfusion_jax import compilation_cache
from vidfusion_jax import evaluate
from vidfusion_jax import export
from vidfusion_jax import fuse

REPO = pathlib.Path(__file__).resolve().parents[1]

# Each entry point and flags its --help must list.
COMMANDS = {
    "train": (["-m", "vidfusion_jax.train"],
              ["--config", "--workdir", "--coordinator_address", "--[no]compilation_cache",
               "--compilation_cache_dir"]),
    "export": (["-m", "vidfusion_jax.export"],
               ["--workdir", "--from_torch", "--output", "--step", "--dtype", "--platforms"]),
    "fuse": (["-m", "vidfusion_jax.fuse"],
             ["--model", "--ir", "--vis", "--output", "--windows_per_call", "--side_by_side",
              "--[no]stretch", "--[no]compilation_cache", "--compilation_cache_dir"]),
    "evaluate": (["-m", "vidfusion_jax.evaluate"],
                 ["--ir", "--vis", "--fused", "--output", "--max_frames", "--batch_size",
                  "--ssim_data_range", "--[no]compilation_cache", "--compilation_cache_dir"]),
    "demo": (["-m", "vidfusion_jax.demo"], ["--workdir", "--steps", "--frames"]),
    "benchmarks/conv_kernels.py": (["benchmarks/conv_kernels.py"], ["--shape", "--iters"]),
    "benchmarks/depthwise_kernel_gradient.py": (["benchmarks/depthwise_kernel_gradient.py"],
                                                ["--shapes", "--iters"]),
    "benchmarks/data_prep.py": (["benchmarks/data_prep.py"],
                                ["--data_root", "--work_dir", "--repeats", "--[no]quick"]),
    "benchmarks/inference.py": (["benchmarks/inference.py"],
                                ["--[no]quick", "--windows_per_call", "--dtype", "--backends"]),
    "benchmarks/input_pipeline.py": (["benchmarks/input_pipeline.py"],
                                     ["--data_root", "--work_dir", "--record_clip_length",
                                      "--clip_length", "--read_threads"]),
    "benchmarks/metrics.py": (["benchmarks/metrics.py"], ["--height", "--width", "--iters"]),
    "benchmarks/model_forward.py": (["benchmarks/model_forward.py"],
                                    ["--[no]quick", "--cases", "--inference_shape",
                                     "--train_shape", "--[no]remat", "--torch_reference",
                                     "--torch_threads"]),
    "benchmarks/train_step.py": (["benchmarks/train_step.py"],
                                 ["--[no]quick", "--per_device_batch", "--remat", "--dtype",
                                  "--torch_reference", "--torch_threads"]),
}


def _env() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def help_outputs():
  """`--help` of every command, run as concurrent subprocesses: {name: (status, stdout, stderr)}."""
  processes = {name: subprocess.Popen([sys.executable, *argv, "--help"], cwd=REPO, env=_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (argv, _) in COMMANDS.items()}
  outputs = {}
  for name, process in processes.items():
    stdout, stderr = process.communicate(timeout=300)
    outputs[name] = (process.returncode, stdout, stderr)
  return outputs


@pytest.mark.slow  # Eleven processes that import jax (and Orbax, Grain, ...): 15-90 s on 2 cores.
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_the_flags_and_exits_0(help_outputs, name):
  status, stdout, stderr = help_outputs[name]
  assert status == 0, stderr
  listed = [line.split(":")[0].strip() for line in stdout.splitlines() if line.startswith("  --")]
  for flag in COMMANDS[name][1]:
    assert flag in listed, f"{name} --help does not list {flag}:\n{stdout}"
  assert not [f for f in listed if "-" in f.lstrip("-").removeprefix("[no]")], listed
  assert "--verbosity" not in listed and "--grain_py_debug_mode" not in listed  # Libraries' own.


def test_old_spellings_still_work_with_a_warning(capsys):
  args = evaluate.parse_flags(["--ir=i", "--vis=v", "--fused=a=b", "--output=o", "--max-frames=3",
                               "--batch-size", "4", "--ssim-data-range=255"])
  assert (args.max_frames, args.batch_size, args.ssim_data_range) == (3, 4, 255.0)
  err = capsys.readouterr().err
  for old, new in (("max-frames", "max_frames"), ("batch-size", "batch_size"),
                   ("ssim-data-range", "ssim_data_range")):
    assert f"--{old} is deprecated" in err and f"use --{new}" in err
  args = export.parse_flags(["--from-torch=net.pth", "--model=videofusion", "--output=o"])
  assert args.from_torch == "net.pth" and args.workdir is None
  args = fuse.parse_flags(["--model=m", "--ir=i", "--vis=v", "--output=o", "--no-stretch",
                           "--windows-per-call=3"])
  assert args.stretch is False and args.windows_per_call == 3
  assert "--no-stretch is deprecated" in capsys.readouterr().err
  args = fuse.parse_flags(["--model=m", "--ir=i", "--vis=v", "--output=o"])
  assert args.stretch is None and args.windows_per_call == 1  # A fresh parse: defaults again.
  assert capsys.readouterr().err == ""


def test_current_spelling_rules():
  fv = flags.FlagValues()
  flags.DEFINE_integer("max_frames", None, "", flag_values=fv)
  flags.DEFINE_bool("stretch", None, "", flag_values=fv)
  assert cli.current_spellings(["--max-frames", "3", "--no-stretch", "--stretch", "--nostretch",
                                "--unknown-flag=1", "-x", "--", "--max-frames"], fv) == [
                                    "--max_frames", "3", "--nostretch", "--stretch",
                                    "--nostretch", "--unknown-flag=1", "-x", "--", "--max-frames"]
  overrides = ["--config.data.path=/data/x-y", "--config.optimizer.learning_rate=-1"]
  assert cli.current_spellings(overrides, fv) == overrides  # ml_collections overrides pass.


def test_bad_command_lines_exit_2_with_a_message(capsys):
  cases = [
      (fuse.parse_flags, ["--model=m", "--ir=i", "--vis=v"], "--output must have a value"),
      (fuse.parse_flags, ["--model=m", "--ir=i", "--vis=v", "--output=o", "--window=0"],
       "0 is not a positive integer"),
      (evaluate.parse_flags, ["--ir=i", "--vis=v", "--fused=a=b", "--output=o", "--metrics=EN,X"],
       "unknown metrics ['X']"),
      (export.parse_flags, ["--workdir=w", "--output=o", "stray"], "unexpected arguments ['stray']"),
      (export.parse_flags, ["--outptu=o"], "Unknown command line flag 'outptu'"),
  ]
  for parse, argv, message in cases:
    with pytest.raises(SystemExit) as exit_info:
      parse(argv)
    assert exit_info.value.code == cli.USAGE_ERROR_STATUS
    err = capsys.readouterr().err
    assert message in err and "--help" in err, err


def test_depthwise_benchmark_shapes_are_checked_before_compute(capsys, monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  benchmark = importlib.import_module("depthwise_kernel_gradient")
  for bad in ("18,128", "18,128,128,c"):
    with pytest.raises(SystemExit) as exit_info:
      benchmark.parse_args([f"--shapes={bad}"])
    assert exit_info.value.code == cli.USAGE_ERROR_STATUS
    err = capsys.readouterr().err
    assert "--shapes takes N,H,W,C as four integers" in err and "--help" in err, err
  args = benchmark.parse_args(["--shapes=2,16,16,8", "--shapes=1,8,8,4"])
  assert args.shapes == [(2, 16, 16, 8), (1, 8, 8, 4)]


def test_torch_reference_checkout_is_checked_before_compute(capsys, monkeypatch, tmp_path):
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  model_forward = importlib.import_module("model_forward")
  required = importlib.import_module("torch_reference").REQUIRED_FILES
  for name in required[1:]:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).touch()
  cases = [
      ([f"--torch_reference={tmp_path}"],
       f"{required[0]} is missing; git clone https://github.com/Linfeng-Tang/VideoFusion"),
      ([f"--torch_reference={tmp_path / 'absent'}"], "no such directory"),
      (["--model=temcoco", f"--torch_reference={tmp_path}"], "VideoFusion only"),
  ]
  for argv, message in cases:
    with pytest.raises(SystemExit) as exit_info:
      model_forward.parse_args(argv)
    assert exit_info.value.code == cli.USAGE_ERROR_STATUS
    err = capsys.readouterr().err
    assert message in err and "--help" in err, err
  (tmp_path / required[0]).touch()
  args = model_forward.parse_args([f"--torch_reference={tmp_path}", "--torch_threads=3"])
  assert (args.torch_reference, args.torch_threads) == (str(tmp_path.resolve()), 3)


def test_benchmarks_name_the_cpu_generation(monkeypatch, tmp_path):
  """Clouds sell different CPU generations under one name ("AMD EPYC"): the benchmarks' `cpu`
  field adds the first processor's family, model and widest vector ISA from /proc/cpuinfo."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  cpu_model = importlib.import_module("model_forward").cpu_model
  processor = ("processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {}\n"
               "model name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 {}\n")
  zen4, zen3, arm = tmp_path / "zen4", tmp_path / "zen3", tmp_path / "arm"
  zen4.write_text(processor.format(0, 17, "avx512f avx512bw") + "\n" + processor.format(1, 1, ""))
  zen3.write_text(processor.format(0, 1, "fma"))
  arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n")
  assert cpu_model(str(zen4)) == "AMD EPYC (family 25 model 17, avx512)"
  assert cpu_model(str(zen3)) == "AMD EPYC (family 25 model 1, avx2)"
  assert cpu_model(str(arm)) == platform.processor()
  assert cpu_model(str(tmp_path / "absent")) == platform.processor()


# A small but not trivial program: compiling it takes about 2 s on a 2-core CPU. The events are
# those of its compile alone (inputs are numpy arrays: no other program is compiled).
CACHE_CHILD = r"""
import json, sys, time
import numpy as np
from vidfusion_jax import cli, compilation_cache
args = cli.parse(sys.argv[1:], compilation_cache.define_flags, prog="child", usage="")
compilation_cache.configure(args.compilation_cache, args.compilation_cache_dir)
import jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))

def loss(x):
  for i in range(24):
    kernel = jnp.full((3, 3, 8, 8), 0.01 * i)
    x = x + jnp.tanh(jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return x.mean()

x = np.ones((1, 16, 16, 8), np.float32)
lowered = jax.jit(jax.value_and_grad(loss)).lower(x)
events.clear()
start = time.perf_counter()
compiled = lowered.compile()
seconds = time.perf_counter() - start
value, _ = compiled(x)
print(json.dumps({"seconds": seconds, "value": float(value),
                  **{e.rsplit("/", 1)[1]: events.count(e) for e in set(events)
                     if e.startswith("/jax/compilation_cache/")}}))
"""


def _run_child(*argv: str) -> dict:
  env = _env()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
  result = subprocess.run([sys.executable, "-c", CACHE_CHILD, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def _entries(cache: pathlib.Path) -> dict[str, int]:
  return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}


def test_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
  cache = tmp_path / "xla"
  first = _run_child(f"--compilation_cache_dir={cache}")
  written = _entries(cache)
  second = _run_child(f"--compilation_cache_dir={cache}")
  off = _run_child(f"--compilation_cache_dir={cache}", "--nocompilation_cache")
  assert (first.get("cache_misses"), first.get("cache_hits")) == (1, None), first
  assert written, "the first process wrote no cache entry"
  assert (second.get("cache_hits"), second.get("cache_misses")) == (1, None), second
  assert _entries(cache) == written  # Read back, not written again.
  assert "compile_requests_use_cache" not in off and "cache_hits" not in off, off
  assert second["value"] == first["value"] == off["value"]
  # Loading the executable skips XLA's compile: measured 0.2 s against 1.9 s on 2 busy cores.
  assert second["seconds"] < 0.5 * min(first["seconds"], off["seconds"]), (first, second, off)


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation_cache.default_dir() == str(tmp_path / "vidfusion_jax" / "xla")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
  assert compilation_cache.default_dir() == "/elsewhere"
