"""Sharded, multi-process and interrupted training give the single-device run's losses and params.

Every case trains the stand-in network of test_train_standin.py for 20 steps on the same random
clips and compares with `standin_reference` (one process, one device, uninterrupted).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from test_train_standin import SCRIPT, STANDIN, assert_params_close, losses_by_step
from test_train_standin import subprocess_env
from vidfusion_jax import checkpointing
from vidfusion_jax import sharding
from vidfusion_jax import train

# (name, mesh shape over ("data", "fsdp"), number of devices, grad_accum_steps)
MESH_RUNS = (("data8", (8, 1), 8, 1), ("data2_fsdp4", (2, 4), 8, 1), ("data4_accum2", (4, 1), 4, 2))

MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import test_train_standin as standin
    from vidfusion_jax import train
    standin.register()
    out, runs, model, overrides = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(
        sys.argv[4])
    specs = {}
    for name, shape, num_devices, accum in runs:
      config = (standin.get_config() if model == standin.STANDIN else
                standin.load_config_module(model).get_config("tiny"))
      config.update_from_flattened_dict(overrides)
      config.mesh.shape = tuple(shape)
      config.grad_accum_steps = accum
      state = train.train_and_evaluate(config, f"{out}/{name}", devices=jax.devices()[:num_devices])
      specs[name] = {jax.tree_util.keystr(p): str(x.sharding.spec)
                     for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    with open(f"{out}/specs.json", "w") as f:
      json.dump(specs, f)
""")


def _run(args, env, timeout=600, **kwargs):
  result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def run_meshes(out: pathlib.Path, runs, cache: pathlib.Path, model: str = STANDIN,
               overrides: dict | None = None) -> dict[str, dict[str, str]]:
  """Trains `model` (the stand-in, or configs/<model>.py:tiny with `overrides`, flattened field
  names) in one subprocess with 8 simulated devices, in `out/<name>` for each (name, mesh shape,
  number of devices, grad_accum_steps) of `runs`; returns each run's param partition specs."""
  _run([sys.executable, "-c", MESH_SCRIPT, str(out), json.dumps(runs), model,
        json.dumps(overrides or {})], env=subprocess_env(cache, num_devices=8),
       cwd=pathlib.Path(__file__).resolve().parent, timeout=1800)
  return json.loads((out / "specs.json").read_text())


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory, compilation_cache):
  """The stand-in trained on 8 simulated devices under each mesh of MESH_RUNS."""
  out = tmp_path_factory.mktemp("meshes")
  return out, run_meshes(out, MESH_RUNS, compilation_cache)


@pytest.mark.parametrize("name", [run[0] for run in MESH_RUNS])
def test_meshes_match_single_device(mesh_runs, standin_reference, name):
  """data=8, data=2 x fsdp=4 and data=4 with 2 accumulated microbatches: same losses and params."""
  out, _ = mesh_runs
  losses = losses_by_step(out / name)
  assert sorted(losses) == list(range(1, 21))
  np.testing.assert_allclose([losses[s] for s in range(1, 21)],
                             [standin_reference["losses"][s] for s in range(1, 21)], rtol=1e-5)
  params, _ = checkpointing.load_params(out / name)
  assert_params_close(params, standin_reference["params"], rtol=1e-5, atol=1e-7)


def test_fsdp_run_sharded_params(mesh_runs):
  """Under data=2 x fsdp=4 the rule shards each param's largest dim divisible by 4."""
  _, specs = mesh_runs
  fsdp = specs["data2_fsdp4"]
  assert fsdp["['Conv_0']['kernel']"] == str(P(None, None, None, "fsdp", None))
  assert fsdp["['Conv_0']['bias']"] == str(P())  # 9 is not divisible by 4
  assert fsdp["['body']['Conv_0']['kernel']"] == str(P(None, None, None, None, "fsdp"))
  assert fsdp["['body']['Conv_0']['bias']"] == str(P("fsdp"))
  assert set(specs["data8"].values()) == {str(P())}


def test_checkpoint_from_8_devices_restores_on_1(mesh_runs, standin_reference):
  """The full train state saved under data=2 x fsdp=4 restores onto this 1-device mesh."""
  out, _ = mesh_runs
  config = standin_reference["config"]
  trainer = train.make_trainer(config, sharding.mesh_from_config(config))
  checkpointer = checkpointing.Checkpointer(out / "data2_fsdp4", read_only=True)
  try:
    state = checkpointer.restore(20, trainer.abstract_state)
  finally:
    checkpointer.close()
  assert int(state.step) == 20
  assert all(x.sharding.num_devices == 1 for x in jax.tree.leaves(state))
  assert_params_close(jax.device_get(state.params), standin_reference["params"], rtol=1e-5,
                      atol=1e-7)
  mu = state.opt_state[1][0].mu  # clip (stateless), then adamw's ScaleByAdamState
  assert jax.tree.structure(mu) == jax.tree.structure(state.params)
  assert float(sum(np.abs(x).sum() for x in jax.tree.leaves(mu))) > 0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(command: list[str], env: dict[str, str],
                    num_processes: int = 2) -> list[subprocess.Popen]:
  """`command` (a `vidfusion_jax.train.main` program) as the processes of one JAX job,
  coordinated over loopback; stderr is piped."""
  port = _free_port()
  return [subprocess.Popen(
      command + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                 f"--process_id={i}"],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(num_processes)]


@pytest.mark.multiprocess
def test_two_processes_match_single_process(tmp_path, compilation_cache, standin_reference):
  """2 processes x 2 CPU devices (gloo collectives, mesh data=2 x fsdp=2) match 1 process."""
  processes = start_processes(SCRIPT + [f"--workdir={tmp_path}", "--config.mesh.shape=(2,2)"],
                              subprocess_env(compilation_cache, num_devices=2))
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-5000:]
  losses = losses_by_step(tmp_path)
  np.testing.assert_allclose([losses[s] for s in range(1, 21)],
                             [standin_reference["losses"][s] for s in range(1, 21)], rtol=1e-5)
  params, _ = checkpointing.load_params(tmp_path)
  assert_params_close(params, standin_reference["params"], rtol=1e-5, atol=1e-7)
  # Each process saved its own data-iterator state.
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "20" / "data").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


def _start(workdir, env):
  return subprocess.Popen(SCRIPT + [f"--workdir={workdir}"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _signal_after_step(process, workdir, min_step: int, signum: int, group: bool = False) -> None:
  """Sends `signum` once `workdir/metrics.jsonl` logs `min_step` (the process is mid-training);
  with `group`, to the process group that the process leads (start_new_session=True): the
  trainer and its data-loading workers, as when a host is lost."""
  deadline = time.monotonic() + 600
  while max(losses_by_step(workdir), default=0) < min_step:
    assert process.poll() is None, f"training ended before step {min_step}: {process.stderr.read()}"
    assert time.monotonic() < deadline
    time.sleep(0.02)
  if group:
    os.killpg(process.pid, signum)
  else:
    process.send_signal(signum)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, compilation_cache):
  """One workdir trained in three runs: SIGTERM after step 5, SIGKILL after step 13, resume."""
  workdir = tmp_path_factory.mktemp("interrupted")
  env = subprocess_env(compilation_cache)
  first = _start(workdir, env)
  _signal_after_step(first, workdir, 5, signal.SIGTERM)
  _, first_stderr = first.communicate(timeout=600)
  sigterm_step = max(losses_by_step(workdir))
  sigterm_checkpoints = checkpointing.Checkpointer(workdir, read_only=True).all_steps()
  second = _start(workdir, env)
  _signal_after_step(second, workdir, 13, signal.SIGKILL)
  _, second_stderr = second.communicate(timeout=600)
  killed_at = max(losses_by_step(workdir))
  third = _start(workdir, env)
  _, third_stderr = third.communicate(timeout=600)
  return {"workdir": workdir, "first": (first.returncode, first_stderr),
          "second": (second.returncode, second_stderr), "third": (third.returncode, third_stderr),
          "sigterm_step": sigterm_step, "sigterm_checkpoints": sigterm_checkpoints,
          "killed_at": killed_at}


def test_sigterm_saves_and_exits_cleanly(interrupted_run):
  returncode, stderr = interrupted_run["first"]
  assert returncode == 0, stderr[-5000:]
  step = interrupted_run["sigterm_step"]
  assert 5 <= step < 20
  assert f"saved checkpoint at step {step}" in stderr
  assert max(interrupted_run["sigterm_checkpoints"]) == step
  assert f"Resuming from checkpoint step {step} " in interrupted_run["second"][1]


def test_sigkill_then_resume_matches_uninterrupted(interrupted_run, standin_reference):
  assert interrupted_run["second"][0] == -signal.SIGKILL
  assert interrupted_run["killed_at"] < 20
  returncode, stderr = interrupted_run["third"]
  assert returncode == 0, stderr[-5000:]
  losses = losses_by_step(interrupted_run["workdir"])
  np.testing.assert_array_equal([losses[s] for s in range(1, 21)],
                                [standin_reference["losses"][s] for s in range(1, 21)])
  params, _ = checkpointing.load_params(interrupted_run["workdir"])
  assert_params_close(params, standin_reference["params"], rtol=0)
