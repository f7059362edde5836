"""Every user path on an object store: conversion, training, resume, export, fuse and evaluate on
a real GCS emulator (`gcp-storage-emulator`), and the data and summaries on an S3 emulator (moto's
server mode), both started by this module on loopback.

gcsfs reaches the emulator through `STORAGE_EMULATOR_HOST`, TensorStore (Orbax's arrays) through
`TENSORSTORE_GCS_HTTP_URL`; `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` skips gcsfs's gRPC probe of
the bucket type (about 60 s per bucket against an emulator). Every result is compared with the
same work done on local paths.
"""

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import fsspec
import jax
import numpy as np
import pytest

# Looked up, not imported: gcsfs must first be imported after its environment is set (`gcs`).
_MISSING = [name for name in ("gcsfs", "s3fs", "gcp_storage_emulator", "moto")
            if not importlib.util.find_spec(name)]
if _MISSING:
  pytest.skip(f"{_MISSING} not installed (the cloud and test extras)", allow_module_level=True)

from test_train_standin import SCRIPT, assert_params_close, get_config, losses_by_step, register
from test_train_standin import subprocess_env
from vidfusion_jax import checkpointing
from vidfusion_jax import data
from vidfusion_jax import evaluate
from vidfusion_jax import export
from vidfusion_jax import files
from vidfusion_jax import frames
from vidfusion_jax import fuse
from vidfusion_jax import inference
from vidfusion_jax import logging_utils
from vidfusion_jax import train
from vidfusion_jax.data import tfrecord

BUCKET = "vidfusion-test"
TINY_VIDEOFUSION = {"num_features": 16, "num_blocks": [1, 1, 1], "num_decoder_blocks": 1}
PLATFORM = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())


# gcp-storage-emulator with one fix: real GCS names an object's generation in the
# `x-goog-generation` header of a media download, and TensorStore needs it to update an OCDBT
# manifest it has read ("Malformed StorageGeneration" otherwise). Routes bind the handler at import,
# so it is replaced before the server module is imported.
_GCS_EMULATOR = """
import sys
from gcp_storage_emulator import exceptions
from gcp_storage_emulator.handlers import objects

download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  try:
    resource = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = resource["generation"]
    response["x-goog-metageneration"] = resource["metageneration"]
  except exceptions.NotFound:
    pass
  return download(request, response, storage, *args, **kwargs)


objects.download = download_with_generation
from gcp_storage_emulator import __main__
__main__.main(sys.argv[1:])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_server(command: list[str], port: int) -> subprocess.Popen:
  """Starts an emulator process and waits until it accepts connections on `port`."""
  server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      return server
    except OSError:
      assert server.poll() is None and time.monotonic() < deadline, f"{command} did not start"
      time.sleep(0.1)


@pytest.fixture(scope="module")
def gcs():
  """`gs://<bucket>` on a gcp-storage-emulator process, torn down after the module."""
  if "gcsfs" in sys.modules and os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT") != "false":
    pytest.fail("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set")
  port = _free_port()
  server = _start_server(
      [sys.executable, "-c", _GCS_EMULATOR, "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}", "--quiet"], port)
  url = f"http://127.0.0.1:{port}"
  with _environment({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                     "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}):
    yield f"gs://{BUCKET}"
  server.terminate()
  server.wait(timeout=30)


@contextlib.contextmanager
def _environment(variables: dict[str, str]):
  """Sets environment variables (inherited by subprocesses) and restores them on exit."""
  saved = {name: os.environ.get(name) for name in variables}
  os.environ.update(variables)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


@pytest.fixture(scope="module")
def s3():
  """`s3://<bucket>` on a moto server process, torn down after the module."""
  port = _free_port()
  server = _start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                          str(port)], port)
  with _environment({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}):
    fsspec.filesystem("s3").mkdir(BUCKET)
    yield f"s3://{BUCKET}"
  server.terminate()
  server.wait(timeout=30)


def _listing(folder) -> list[str]:
  return sorted(p.name for p in files.as_path(folder).iterdir())


def test_paths_and_atomic_writer(gcs, tmp_path):
  url = f"{gcs}/paths/a.txt"
  assert str(files.as_path(url)) == url  # pathlib would give the local folder "gs:/..."
  assert files.as_path(tmp_path) == tmp_path and not files.is_url(tmp_path)
  files.atomic_write(url, "one")
  files.atomic_write(url, b"two")
  assert files.as_path(url).read_text() == "two" and files.file_size(url) == 3
  with pytest.raises(RuntimeError), files.AtomicFile(f"{gcs}/paths/b.bin") as f:
    f.write(b"partial")
    raise RuntimeError("interrupted")
  with pytest.raises(RuntimeError), files.AtomicFile(tmp_path / "b.bin") as f:
    f.write(b"partial")
    raise RuntimeError("interrupted")
  assert _listing(f"{gcs}/paths") == ["a.txt"]  # an aborted write publishes nothing
  assert _listing(tmp_path) == []  # and leaves no temporary file


@pytest.fixture(scope="module")
def datasets(gcs, tmp_path_factory):
  """The same synthetic train and val splits converted to a local folder and to the bucket."""
  local = tmp_path_factory.mktemp("dataset")
  remote = f"{gcs}/dataset"
  for output in (local, remote):
    for split in ("train", "val"):
      data.make_synthetic_dataset(output, split=split, num_sequences=2, num_frames=6, height=24,
                                  width=24, clip_length=3, records_per_shard=2, progress=False)
  return local, remote


def test_conversion_writes_identical_shards(datasets):
  local, remote = datasets
  assert _listing(remote) == _listing(local)
  assert len([n for n in _listing(remote) if n.endswith(".tfrecord")]) == 4
  local_info = json.loads((local / "dataset_info.json").read_text())
  remote_info = json.loads(files.as_path(f"{remote}/dataset_info.json").read_text())
  assert remote_info == local_info  # shard sizes and sha256 included
  for shard in remote_info["splits"]["train"]["shards"]:
    assert tfrecord.file_sha256(f"{remote}/{shard['file']}") == shard["sha256"]


def test_conversion_cli_resumes_on_the_bucket(gcs, monkeypatch):
  """`python -m data_prep --output gs://...`; a rerun verifies the shards and rewrites none."""
  from data_prep import __main__ as data_prep  # pylint: disable=g-import-not-at-top
  output = f"{gcs}/cli"
  argv = ["synthetic", f"--output={output}", "--num_sequences=1", "--num_frames=4", "--height=16",
          "--width=16", "--clip_length=2", "--records_per_shard=1", "--workers=1",
          "--noprogress"]
  assert data_prep.main(argv) == 0
  listing = _listing(output)
  assert len([n for n in listing if n.endswith(".tfrecord")]) == 2

  def no_writes(path):
    raise AssertionError(f"{path} was verified as complete, yet rewritten")

  monkeypatch.setattr(tfrecord, "ShardWriter", no_writes)
  assert data_prep.main(argv) == 0
  assert _listing(output) == listing


def test_conversion_reads_frame_folders_from_the_bucket(gcs, shared, tmp_path):
  """`python -m data_prep m3svd --input gs://...` writes the bytes of the same local conversion."""
  from data_prep import __main__ as data_prep  # pylint: disable=g-import-not-at-top
  from data_prep import sources  # pylint: disable=g-import-not-at-top
  root, remote = shared("data/m3svd_mini"), f"{gcs}/m3svd_input"
  local = tmp_path / "m3svd_input"
  sequence = sorted(p.name for p in (root / "visible_Enhance").iterdir() if p.is_dir())[0]
  for folder in sources.M3SVD_FOLDERS.values():
    for path in frames.list_frame_files(root / folder / sequence)[:3]:
      for base in (local, remote):
        files.as_path(f"{base}/{folder}/{sequence}").mkdir(parents=True, exist_ok=True)
        files.as_path(f"{base}/{folder}/{sequence}/{path.name}").write_bytes(path.read_bytes())
  outputs = {}
  for name, source in (("local", local), ("bucket", remote)):
    outputs[name] = tmp_path / name
    assert data_prep.main(["m3svd", f"--input={source}", f"--output={outputs[name]}",
                           "--clip_length=2", "--workers=1", "--noprogress"]) == 0
  assert _listing(outputs["bucket"]) == _listing(outputs["local"])
  for file_name in _listing(outputs["local"]):
    if file_name != "dataset_info.json":  # which records the --input given
      assert ((outputs["bucket"] / file_name).read_bytes() ==
              (outputs["local"] / file_name).read_bytes()), file_name
  infos = {name: json.loads((out / "dataset_info.json").read_text())
           for name, out in outputs.items()}
  assert infos["bucket"]["splits"]["train"]["source"].pop("input") == remote
  assert infos["local"]["splits"]["train"]["source"].pop("input") == str(local)
  assert infos["bucket"] == infos["local"]


def test_video_inputs_must_be_local(gcs, tmp_path, capsys):
  from data_prep import __main__ as data_prep  # pylint: disable=g-import-not-at-top
  assert data_prep.main(["videos", f"--ir={gcs}/a.mp4", f"--vis={gcs}/b.mp4",
                         f"--output={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert f"video files must be local (OpenCV reads them): {gcs}/a.mp4, {gcs}/b.mp4" in err
  assert "copy them to a local disk first" in err


def test_random_access_reads_equal_local(datasets):
  local, remote = datasets
  local_source = data.ClipRecordSource(local, "train")
  remote_source = data.ClipRecordSource(remote, "train")
  assert len(remote_source) == len(local_source) == 4
  for record in (3, 0, 2, 1):  # out of order: seeks
    assert remote_source[record] == local_source[record]
  for (name_a, clip_a), (name_b, clip_b) in zip(data.iter_sequences(local, "val"),
                                                 data.iter_sequences(remote, "val")):
    assert name_a == name_b
    for stream in clip_a:
      np.testing.assert_array_equal(clip_a[stream], clip_b[stream])


def test_s3_data_and_summaries(s3, datasets):
  """On S3: conversion, random reads, an aborted multipart upload, metrics and TensorBoard."""
  local, _ = datasets
  remote = f"{s3}/dataset"
  data.make_synthetic_dataset(remote, split="train", num_sequences=2, num_frames=6, height=24,
                              width=24, clip_length=3, records_per_shard=2, progress=False)
  assert (json.loads(files.as_path(f"{remote}/dataset_info.json").read_text())["splits"]["train"]
          == json.loads((local / "dataset_info.json").read_text())["splits"]["train"])
  local_source, remote_source = (data.ClipRecordSource(d, "train") for d in (local, remote))
  assert [remote_source[i] for i in (2, 0, 3, 1)] == [local_source[i] for i in (2, 0, 3, 1)]
  with pytest.raises(RuntimeError), files.AtomicFile(f"{s3}/aborted.bin") as f:
    f.write(b"x" * (6 << 20))
    f.file.flush()  # past s3fs's 5 MiB block: a multipart upload is under way
    raise RuntimeError("interrupted")
  assert not files.as_path(f"{s3}/aborted.bin").exists()
  writer = logging_utils.MetricWriter(f"{s3}/run", enabled=True)
  writer.write_scalars(1, {"train/loss": 0.5})
  writer.write_scalars(2, {"train/loss": float("nan")})
  writer.write_images(2, {"grid": np.zeros((4, 4, 3), np.uint8)})
  writer.close()
  resumed = logging_utils.MetricWriter(f"{s3}/run", enabled=True)  # keeps the earlier records
  resumed.write_scalars(3, {"train/loss": 0.25})
  resumed.close()
  assert logging_utils.read_metrics(f"{s3}/run") == [
      {"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": "nan"},
      {"step": 3, "train/loss": 0.25}]
  events = _listing(f"{s3}/run/tensorboard")
  assert events and all(n.startswith("events.out.tfevents.") for n in events)
  assert all(files.file_size(f"{s3}/run/tensorboard/{n}") > 0 for n in events)


def test_s3_workdir_is_refused_before_compute():
  with pytest.raises(ValueError, match="cannot be written to s3://"):
    checkpointing.Checkpointer("s3://bucket/run")


def _training_config(dataset) -> list[str]:
  """The stand-in on the TFRecord pipeline with worker processes, evaluated and checkpointed."""
  return [f"--config.data.path={dataset}", "--config.data.source=tfrecord",
          "--config.data.worker_count=1", "--config.total_steps=12",
          "--config.checkpoint_every_steps=2", "--config.eval_every_steps=4",
          "--config.eval.clip_length=2", "--config.eval.crop_size=16",
          "--config.eval.num_grid_frames=1", "--config.batch_size=2"]


def _config_from_flags(flags: list[str]):
  config = get_config()
  for flag in flags:
    name, value = flag.removeprefix("--config.").split("=", 1)
    parent = config
    *parents, leaf = name.split(".")
    for part in parents:
      parent = parent[part]
    parent[leaf] = type(parent[leaf])(value)
  return config


@pytest.fixture(scope="module")
def trained(datasets, gcs, compilation_cache, tmp_path_factory):
  """A run on the bucket killed (SIGKILL) after step 5 and resumed, and the same run uninterrupted
  on local paths."""
  local, remote = datasets
  register()
  reference_dir = tmp_path_factory.mktemp("reference_run")
  reference = train.train_and_evaluate(_config_from_flags(_training_config(local)), reference_dir)
  workdir = f"{gcs}/run"
  command = SCRIPT + [f"--workdir={workdir}", *_training_config(remote)]
  env = subprocess_env(compilation_cache)
  log = tmp_path_factory.mktemp("logs") / "killed_run.log"
  with open(log, "w", encoding="utf-8") as stderr:  # the Grain worker holds it open too
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                             start_new_session=True)
  deadline = time.monotonic() + 600
  while max(losses_by_step(workdir), default=0) < 5:
    assert first.poll() is None, f"training ended before step 5: {log.read_text()}"
    assert time.monotonic() < deadline
    time.sleep(0.2)
  os.killpg(first.pid, signal.SIGKILL)  # the trainer and its Grain worker, like a lost machine
  first.wait(timeout=60)
  killed_checkpoints = checkpointing.Checkpointer(workdir, read_only=True).all_steps()
  second = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=600, check=False)
  return {"workdir": workdir, "reference_dir": reference_dir,
          "reference_params": jax.device_get(reference.params), "first": first,
          "killed_checkpoints": killed_checkpoints, "second": second}


@pytest.mark.multiprocess
def test_training_on_the_bucket_resumes_bit_identically(trained):
  assert trained["first"].returncode == -signal.SIGKILL
  assert trained["second"].returncode == 0, trained["second"].stderr[-5000:]
  assert trained["killed_checkpoints"], "no checkpoint was committed before the kill"
  resumed_from = max(trained["killed_checkpoints"])
  assert 2 <= resumed_from < 12
  assert f"Resuming from checkpoint step {resumed_from} " in trained["second"].stderr
  workdir = trained["workdir"]
  params, config = checkpointing.load_params(workdir)  # Orbax + TensorStore arrays on gs://
  assert config.data.path.startswith("gs://")
  assert_params_close(params, trained["reference_params"], rtol=0)
  losses = losses_by_step(workdir)
  reference_losses = losses_by_step(trained["reference_dir"])
  np.testing.assert_array_equal([losses[s] for s in range(1, 13)],
                                [reference_losses[s] for s in range(1, 13)])
  evals = [r for r in logging_utils.read_metrics(workdir) if "eval/psnr_fused" in r]
  reference_evals = [r for r in logging_utils.read_metrics(trained["reference_dir"])
                     if "eval/psnr_fused" in r]
  assert [r["step"] for r in evals][-2:] == [8, 12]
  assert evals[-1] == reference_evals[-1]
  names = _listing(workdir)
  assert {"checkpoints", "config.json", "eval", "metrics.jsonl", "tensorboard"} <= set(names)
  grid = frames.read_frame(f"{workdir}/eval/step_00000012.png")
  np.testing.assert_array_equal(
      grid, frames.read_frame(trained["reference_dir"] / "eval" / "step_00000012.png"))
  events = _listing(f"{workdir}/tensorboard")
  assert events and all(n.startswith("events.out.tfevents.") for n in events)
  assert all(files.file_size(f"{workdir}/tensorboard/{n}") > 0 for n in events)
  assert sorted(checkpointing.Checkpointer(workdir, read_only=True).all_steps()) == [10, 12]


@pytest.fixture(scope="module")
def tiny_params():
  module = inference.build_model("videofusion", TINY_VIDEOFUSION)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *[jax.ShapeDtypeStruct(
      (1, 2, 4, 4, 3), np.float32)] * 2)["params"]
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_export_fuse_and_evaluate_on_the_bucket(gcs, tiny_params, tmp_path):
  """Model, inputs (a frame folder and an mp4) and outputs on the bucket give the local results."""
  model = f"{gcs}/model"
  export.export_model(model, "videofusion", TINY_VIDEOFUSION, tiny_params, platforms=[PLATFORM])
  assert _listing(model) == sorted([inference.MANIFEST_FILE, inference.PARAMS_FILE,
                                    inference.EXPORTED_FILE])
  export.export_model(tmp_path / "model", "videofusion", TINY_VIDEOFUSION, tiny_params,
                      platforms=[PLATFORM])
  assert (files.as_path(f"{model}/{inference.PARAMS_FILE}").read_bytes()
          == (tmp_path / "model" / inference.PARAMS_FILE).read_bytes())
  with pytest.raises(ValueError, match="exists and is not empty"):
    export.export_model(model, "videofusion", TINY_VIDEOFUSION, tiny_params, platforms=[PLATFORM])

  rng = np.random.default_rng(3)
  clip = {name: rng.integers(0, 256, (4, 8, 12, 3), np.uint8) for name in ("ir", "vis")}
  for i, frame in enumerate(clip["ir"]):
    frames.write_png(f"{gcs}/inputs/ir/f{i}.png", frame)
    frames.write_png(tmp_path / "ir" / f"f{i}.png", frame)
  for path in (f"{gcs}/inputs/vis.mp4", tmp_path / "vis.mp4"):
    with frames.VideoWriter(path) as video:
      for frame in clip["vis"]:
        video.write(frame)
  for remote_frame, local_frame in zip(frames.iter_frames(f"{gcs}/inputs/vis.mp4"),
                                       frames.iter_frames(tmp_path / "vis.mp4"), strict=True):
    np.testing.assert_array_equal(remote_frame, local_frame)

  window = ["--window", "2", "--overlap", "1", "--quiet"]
  fuse.main(["--model", model, "--ir", f"{gcs}/inputs/ir", "--vis", f"{gcs}/inputs/vis.mp4",
             "--output", f"{gcs}/fused", "--mp4", f"{gcs}/fused.mp4", *window])
  fuse.main(["--model", str(tmp_path / "model"), "--ir", str(tmp_path / "ir"), "--vis",
             str(tmp_path / "vis.mp4"), "--output", str(tmp_path / "fused"), *window])
  names = [f"{i:04d}.png" for i in range(4)]
  assert _listing(f"{gcs}/fused") == names
  for name in names:
    np.testing.assert_array_equal(frames.read_frame(f"{gcs}/fused/{name}"),
                                  frames.read_frame(tmp_path / "fused" / name))
  assert frames.count_frames(f"{gcs}/fused.mp4") == 4

  scores = ["--metrics", "EN,SD", "--temporal", "none"]
  assert evaluate.main(["--ir", f"{gcs}/inputs/ir", "--vis", f"{gcs}/inputs/vis.mp4", "--fused",
                        f"ours={gcs}/fused", "--output", f"{gcs}/report", *scores]) == 0
  assert evaluate.main(["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vis.mp4"),
                        "--fused", f"ours={tmp_path / 'fused'}", "--output",
                        str(tmp_path / "report"), *scores]) == 0
  for name in ("summary.json", "per_frame.csv", "summary.csv", "summary.md"):
    assert (files.as_path(f"{gcs}/report/{name}").read_bytes()
            == (tmp_path / "report" / name).read_bytes())
  assert _listing(f"{gcs}/report/curves") == ["EN.png", "SD.png"]
