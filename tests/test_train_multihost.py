"""Two JAX processes on the TFRecord pipeline: the same batches, evaluation and checkpoints as one.

The stand-in network of test_train_standin.py trains on a converted synthetic dataset, once in
this process on one device and once as 2 processes x 1 CPU device (gloo); process 1 alone gets a
SIGTERM mid-run, then both processes are restarted and finish.
"""

import signal

import jax
import numpy as np
import pytest

from test_train_distributed import _signal_after_step, start_processes
from test_train_standin import SCRIPT, assert_params_close, get_config, losses_by_step, register
from test_train_standin import subprocess_env
from vidfusion_jax import checkpointing
from vidfusion_jax import data
from vidfusion_jax import logging_utils
from vidfusion_jax import sharding
from vidfusion_jax import train

OVERRIDES = {"data.source": "tfrecord", "data.clip_length": 2, "data.crop_size": 16,
             "data.worker_count": 1, "eval_every_steps": 10, "eval.clip_length": 4,
             "eval.crop_size": 16, "eval.max_sequences": 1}


def _eval_records(workdir) -> dict[int, dict[str, float]]:
  return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
          for r in logging_utils.read_metrics(workdir) if "eval/psnr_fused" in r}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, records):
  register()
  workdir = tmp_path_factory.mktemp("one_process")
  config = get_config()
  config.update_from_flattened_dict(OVERRIDES | {"data.path": str(records)})
  state = train.train_and_evaluate(config, workdir)
  return {"workdir": workdir, "params": jax.device_get(state.params)}


def _start_processes(workdir, records, env):
  flags = [f"--config.{k}={v}" for k, v in (OVERRIDES | {"data.path": records}).items()]
  return start_processes(SCRIPT + [f"--workdir={workdir}", "--config.mesh.shape=(2,1)", *flags],
                         env)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, records, compilation_cache):
  """2 processes: SIGTERM to process 1 after step 6, then both restarted to step 20."""
  workdir = tmp_path_factory.mktemp("two_processes")
  env = subprocess_env(compilation_cache, num_devices=1)
  first = _start_processes(workdir, records, env)
  _signal_after_step(first[1], workdir, 6, signal.SIGTERM)
  first_stderr = [p.communicate(timeout=600)[1] for p in first]
  checkpoints = checkpointing.Checkpointer(workdir, read_only=True).all_steps()
  stopped = {"returncodes": [p.returncode for p in first], "stderr": first_stderr,
             "checkpoints": checkpoints, "iterator_states": sorted(
                 p.name for p in (workdir / "checkpoints" / str(max(checkpoints)) / "data").glob(
                     "*.json"))}
  second = _start_processes(workdir, records, env)
  second_stderr = [p.communicate(timeout=600)[1] for p in second]
  return {"workdir": workdir, "stopped": stopped,
          "finished": ([p.returncode for p in second], second_stderr)}


@pytest.mark.multiprocess
def test_sigterm_to_one_process_stops_both_at_one_step(two_processes):
  stopped = two_processes["stopped"]
  assert stopped["returncodes"] == [0, 0], "".join(e[-3000:] for e in stopped["stderr"])
  steps = [int(e.split("saved checkpoint at step ")[1].split(";")[0]) for e in stopped["stderr"]]
  assert steps[0] == steps[1] and 6 <= steps[0] < 20
  assert stopped["checkpoints"][-1] == steps[0]
  assert stopped["iterator_states"] == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.multiprocess
def test_two_processes_match_one_after_resume(two_processes, one_process):
  """Losses, params and evaluation numbers of the resumed 2-process run equal the 1-process run."""
  returncodes, stderr = two_processes["finished"]
  assert returncodes == [0, 0], stderr[0][-3000:] + stderr[1][-3000:]
  workdir, reference = two_processes["workdir"], one_process["workdir"]
  losses, expected = losses_by_step(workdir), losses_by_step(reference)
  np.testing.assert_allclose([losses[s] for s in range(1, 21)],
                             [expected[s] for s in range(1, 21)], rtol=1e-5)
  params, _ = checkpointing.load_params(workdir)
  assert_params_close(params, one_process["params"], rtol=1e-5, atol=1e-7)
  evaluations, expected_evaluations = _eval_records(workdir), _eval_records(reference)
  assert sorted(evaluations) == sorted(expected_evaluations) == [10, 20]
  for step, scores in expected_evaluations.items():
    assert sorted(evaluations[step]) == sorted(scores)
    for name, value in scores.items():
      np.testing.assert_allclose(evaluations[step][name], value, rtol=1e-5, err_msg=name)


def test_process_rows_refuses_rows_shared_between_processes(monkeypatch):
  """With 2 processes that both hold all rows, the layout is refused and named."""
  mesh = sharding.make_mesh(("data", "fsdp"), (1, 1), jax.devices()[:1])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"holds batch rows \[0, 1, 2, 3\] of 4 under mesh "
                                       r"\{'data': 1, 'fsdp': 1\}.*one contiguous block of 2"):
    train.process_rows(data.batch_sharding(mesh, ("data", "fsdp")), 4)
