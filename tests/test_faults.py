"""Failure injection: one test per fault, each checking that nothing is lost and the error is named.

Training runs use the stand-in network of test_train_standin.py on a tiny converted dataset; the
inference faults use a tiny exported VideoFusion.
"""

import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import pytest

from test_train_standin import REPO, assert_params_close, get_config, register
from vidfusion_jax import checkpointing
from vidfusion_jax import data
from vidfusion_jax import evaluate as evaluate_cli
from vidfusion_jax import export
from vidfusion_jax import files
from vidfusion_jax import frames
from vidfusion_jax import fuse
from vidfusion_jax import inference
from vidfusion_jax import sharding
from vidfusion_jax import train
from vidfusion_jax.data import synthetic
from vidfusion_jax.data import tfrecord
from vidfusion_jax.data import writer

TINY_VIDEOFUSION = {"num_features": 16, "num_blocks": [1, 1, 1], "num_decoder_blocks": 1}
PLATFORM = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
  """A train split only (what `data_prep` writes without --split): 2 sequences x 6 frames of
  32x32, K = 3, stride 3: 4 records in 2 shards."""
  path = tmp_path_factory.mktemp("dataset")
  data.make_synthetic_dataset(path, num_sequences=2, num_frames=6, height=32, width=32,
                              clip_length=3, records_per_shard=2, frame_encoding="raw", seed=1)
  return path


@pytest.fixture(scope="module")
def dataset_with_val(dataset, tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("with_val") / "dataset"
  shutil.copytree(dataset, path)
  data.make_synthetic_dataset(path, split="val", num_sequences=1, num_frames=6, height=32,
                              width=32, clip_length=3, frame_encoding="raw", seed=2)
  return path


def _config(dataset_dir, **overrides):
  """The stand-in on the converted dataset, 6 steps of batch 2, evaluation every 3 steps."""
  register()
  config = get_config()
  config.data.update(source="tfrecord", path=str(dataset_dir), clip_length=3, crop_size=16)
  config.batch_size = 2
  config.total_steps = 6
  config.checkpoint_every_steps = 100
  config.eval_every_steps = 3
  config.eval.update(clip_length=3, crop_size=0, max_sequences=1, fusion_metrics=())
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny random-init VideoFusion, exported."""
  module = inference.build_model("videofusion", TINY_VIDEOFUSION)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *[jax.ShapeDtypeStruct(
      (1, 2, 4, 4, 3), np.float32)] * 2)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  out = tmp_path_factory.mktemp("export") / "model"
  export.export_model(out, "videofusion", TINY_VIDEOFUSION, params, platforms=[PLATFORM])
  return out


def _clip(folder: pathlib.Path, num_frames: int, height: int, width: int, seed: int):
  rng = np.random.default_rng(seed)
  for i in range(num_frames):
    frames.write_png(folder / f"{i:03d}.png", rng.integers(0, 256, (height, width, 3), np.uint8))
  return folder


def _fuse_args(model, ir, vis, output, *extra):
  return fuse.parse_flags([f"--model={model}", f"--ir={ir}", f"--vis={vis}", f"--output={output}",
                           "--quiet", *extra])


def _steps(workdir) -> list[int]:
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    return checkpointer.all_steps()
  finally:
    checkpointer.close()


# ------------------------------------------------------------------- validation before compute


def test_dataset_without_val_split_skips_evaluation_and_saves_the_last_step(dataset, tmp_path,
                                                                             caplog):
  caplog.set_level(logging.WARNING)
  state = train.train_and_evaluate(_config(dataset), tmp_path)
  assert int(state.step) == 6
  assert any("has no split 'val'" in r.getMessage() and "evaluation is skipped" in r.getMessage()
             for r in caplog.records)
  assert _steps(tmp_path) == [6]
  params, _ = checkpointing.load_params(tmp_path)
  assert_params_close(params, jax.device_get(state.params), rtol=0)
  assert not (tmp_path / "eval").exists()


def test_synthetic_data_with_evaluation_on_skips_evaluation(tmp_path, caplog):
  register()
  config = get_config()
  config.update(total_steps=2, eval_every_steps=1, checkpoint_every_steps=100)
  caplog.set_level(logging.WARNING)
  train.train_and_evaluate(config, tmp_path)
  assert any("'synthetic' has no evaluation data" in r.getMessage() for r in caplog.records)
  assert _steps(tmp_path) == [2]


def test_every_config_problem_is_named_in_one_message_before_compute(dataset_with_val,
                                                                     tmp_path):
  config = _config(dataset_with_val, batch_size=3, grad_accum_steps=2)
  config.data.clip_length = 4
  config.data.crop_size = 40
  config.eval.clip_length = 7
  config.model.init_checkpoint = str(tmp_path / "absent.pth")
  workdir = tmp_path / "workdir"
  with pytest.raises(ValueError) as raised:
    train.train_and_evaluate(config, workdir)
  message = str(raised.value)
  for expected in ("batch_size 3 must be divisible", "data.clip_length 4 must be in [1, 3]",
                   "data.crop_size 40 exceeds the smallest frame 32x32",
                   "eval.clip_length 7 exceeds the longest sequence (6 frames)",
                   "absent.pth' is not a file"):
    assert expected in message
  assert message.count("\n  - ") == 5
  assert not workdir.exists()  # refused before writing anything

  config = _config(dataset_with_val)
  config.mesh.shape = (len(jax.devices()) + 1, 1)
  with pytest.raises(ValueError, match=rf"mesh shape \({len(jax.devices()) + 1}, 1\) has "
                     rf"{len(jax.devices()) + 1} devices but {len(jax.devices())} are available"):
    train.train_and_evaluate(config, workdir)
  assert not workdir.exists()

  config = _config(dataset_with_val)
  config.data.train_split = "training"
  with pytest.raises(ValueError, match=r"has no split 'training' \(it has \['train', 'val'\]\)"):
    train.validate_config(config, sharding.mesh_from_config(config))


def test_missing_teacher_checkpoints_are_refused_at_start(tmp_path):
  config = get_config()
  temcoco = __import__("test_train_standin").load_config_module("temcoco").get_config("tiny")
  config.model = temcoco.model
  config.teachers = temcoco.teachers
  config.teachers.update(distillation=True, vgg19=str(tmp_path / "vgg19.pth"), dinov2="")
  with pytest.raises(ValueError, match=r"teachers.vgg19=.*vgg19.pth.*teachers.dinov2=''"):
    train.validate_config(config, sharding.mesh_from_config(config))


def test_window_starts_that_records_never_offer_are_warned(dataset, caplog):
  # TemCoCo's T = 10 windows on K = 12 / S = 7 records: starts 3..6 (mod 7) are never drawn.
  assert train.unsampled_window_starts(10, 12, 7) == [3, 4, 5, 6]
  assert train.unsampled_window_starts(6, 12, 7) == []
  assert train.unsampled_window_starts(10, 16, 7) == []
  mesh = sharding.mesh_from_config(_config(dataset))
  caplog.set_level(logging.WARNING)
  config = _config(dataset, eval_every_steps=0)
  config.data.clip_length = 1  # windows start at offsets 0, 1, 2 of records 3 frames apart
  train.validate_config(config, mesh)
  assert not caplog.records
  config.data.clip_length = 2  # windows start at offsets 0, 1 only
  train.validate_config(config, mesh)
  (record,) = caplog.records
  assert "never start at frames [2] mod 3" in record.getMessage()
  assert "--clip_stride <= 2 (or --clip_length >= 4)" in record.getMessage()


# --------------------------------------------------------------------------------- data faults


def _training_order(config, num_records: int) -> list[int]:
  """Record indices in the order the training pipeline reads them (first epoch)."""
  return list(grain.MapDataset.range(num_records).shuffle(seed=config.seed))


@pytest.mark.slow  # three short training runs
def test_corrupt_record_mid_epoch_keeps_the_last_step_and_resumes_exactly(dataset, tmp_path):
  corrupt = tmp_path / "dataset"
  shutil.copytree(dataset, corrupt)
  config = _config(corrupt, eval_every_steps=0, total_steps=3)
  reference = train.train_and_evaluate(_config(dataset, eval_every_steps=0, total_steps=3),
                                       tmp_path / "reference")
  source = data.ClipRecordSource(corrupt, "train")
  victim = _training_order(config, len(source))[2]  # read by step 2 (batch 2)
  shard = source._paths[source._shard_of[victim]]  # pylint: disable=protected-access
  offset, size = source._index[victim]  # pylint: disable=protected-access
  source.close()
  good = shard.read_bytes()
  damaged = bytearray(good)
  damaged[offset + size // 2] ^= 0xFF
  shard.write_bytes(bytes(damaged))

  with pytest.raises(tfrecord.RecordCorruptError) as raised:
    train.train_and_evaluate(config, tmp_path / "run")
  assert f"{shard}: data CRC mismatch in record at byte offset {offset}" in str(raised.value)
  assert "Kept: checkpoint step 1 (the last completed step)" in raised.value.__notes__[-1]
  assert _steps(tmp_path / "run") == [1]

  shard.write_bytes(good)  # the data is repaired: the same command resumes and loses nothing
  state = train.train_and_evaluate(config, tmp_path / "run")
  assert_params_close(jax.device_get(state.params), jax.device_get(reference.params), rtol=1e-6)


def test_truncated_shard_is_refused_at_start(dataset, tmp_path):
  truncated = tmp_path / "dataset"
  shutil.copytree(dataset, truncated)
  shard = sorted(truncated.glob("train-*.tfrecord"))[1]
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(ValueError, match=rf"shard {shard.name} of split 'train' is \d+ bytes, "
                     r"dataset_info.json says \d+: it is truncated or was replaced; re-run"):
    train.train_and_evaluate(_config(truncated), tmp_path / "run")
  with pytest.raises(data.RecordCorruptError, match=rf"does not match shard {shard} .*truncated"):
    data.ClipRecordSource(truncated, "train")


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_dataset_info_is_refused_at_start(dataset, tmp_path, damage):
  broken = tmp_path / "dataset"
  shutil.copytree(dataset, broken)
  info = broken / writer.INFO_FILE
  if damage == "missing":
    info.unlink()
    expected = "dataset_info.json does not exist"
  else:
    info.write_text(info.read_text()[:100])
    expected = "dataset_info.json is not valid JSON"
  with pytest.raises(ValueError, match=rf"data.path: .*{expected}.*re-run `python -m data_prep`"):
    train.train_and_evaluate(_config(broken), tmp_path / "run")
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- checkpoint faults


@pytest.mark.slow  # two stand-in training runs
def test_full_disk_during_a_checkpoint_save_keeps_the_previous_one(standin_reference, tmp_path,
                                                                    monkeypatch):
  """ENOSPC while committing step 8: step 4 stays restorable; the rerun ends like an
  uninterrupted run."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk_from_step_8(self):
    step = self._final_path.name  # pylint: disable=protected-access
    if step.isdigit() and int(step) >= 8:
      raise OSError(errno.ENOSPC, "No space left on device")
    return await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk_from_step_8)
  register()
  with pytest.raises(OSError) as raised:
    train.train_and_evaluate(get_config(), tmp_path)
  assert "No space left on device" in str(raised.value)
  note = raised.value.__notes__[-1]
  assert note.startswith("Kept: the latest checkpoint is step 4") and "was not saved" in note
  assert _steps(tmp_path) == [4]

  monkeypatch.undo()  # space freed: the same command resumes from step 4
  state = train.train_and_evaluate(get_config(), tmp_path)
  assert int(state.step) == 20
  assert_params_close(jax.device_get(state.params), standin_reference["params"], rtol=1e-6)


_KILLED_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from vidfusion_jax import checkpointing
    checkpointer = checkpointing.Checkpointer(sys.argv[1])
    checkpointer.save(1, {"w": jnp.full((64,), 1.0)}, force=True)
    checkpointer.wait_until_finished()
    async def killed(self):  # step 2's arrays are written, its commit never happens
      print("killing", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    atomicity.AtomicRenameTemporaryPath.finalize = killed
    checkpointer.save(2, {"w": jnp.full((64,), 2.0)}, force=True)
    checkpointer.wait_until_finished()
    print("not killed")
""")


def test_sigkill_during_an_async_checkpoint_save_restores_the_previous_one(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  assert result.stdout.split() == ["killing"]
  checkpointer = checkpointing.Checkpointer(tmp_path)
  try:
    assert checkpointer.all_steps() == [1]
    restored = checkpointer.manager.restore(1, args=checkpointing.ocp.args.Composite(
        state=checkpointing.ocp.args.PyTreeRestore()))["state"]
  finally:
    checkpointer.close()
  np.testing.assert_array_equal(restored["w"], np.full((64,), 1.0))


_KILLED_DURING_CONVERSION = textwrap.dedent("""
    import os, signal, sys
    from vidfusion_jax.data import synthetic, tfrecord
    commit = tfrecord.ShardWriter.commit
    def commit_then_die_at_the_second_shard(self):
      if "-00001-of-" in self.path.name:
        os.kill(os.getpid(), signal.SIGKILL)
      return commit(self)
    tfrecord.ShardWriter.commit = commit_then_die_at_the_second_shard
    synthetic.make_synthetic_dataset(sys.argv[1], **eval(sys.argv[2]))
""")


def test_sigkill_during_conversion_then_the_rerun_completes(tmp_path):
  options = dict(num_sequences=2, num_frames=6, height=16, width=16, clip_length=3,
                 records_per_shard=1, frame_encoding="raw", seed=3)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _KILLED_DURING_CONVERSION, str(tmp_path / "out"),
                           repr(options)], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  assert not (tmp_path / "out" / writer.INFO_FILE).exists()
  with pytest.raises(FileNotFoundError, match="conversion has not finished"):
    data.read_dataset_info(tmp_path / "out")

  first_shard = tmp_path / "out" / "train-00000-of-00004.tfrecord"
  kept = tfrecord.file_sha256(first_shard)  # committed before the kill
  rerun = data.make_synthetic_dataset(tmp_path / "out", **options)
  shards = rerun["splits"]["train"]["shards"]
  assert [s["num_records"] for s in shards] == [1, 1, 1, 1]
  assert shards[0]["sha256"] == kept  # the rerun kept the finished shard and wrote the rest
  assert not list((tmp_path / "out").glob(".*.tmp"))
  sequences = dict(data.iter_sequences(tmp_path / "out", "train"))
  expected = synthetic.synthetic_sequences(2, 6, 16, 16, seed=3)
  assert sorted(sequences) == [s.name for s in expected]
  for source in expected:
    for stream, frames_ in source.read_frames(0, 6).items():
      np.testing.assert_array_equal(sequences[source.name][stream], frames_)


# ---------------------------------------------------------------------------- weights and models


@pytest.fixture(scope="module")
def torch_state_dict():
  from vidfusion_jax import weights  # pylint: disable=g-import-not-at-top
  module = inference.build_model("videofusion", TINY_VIDEOFUSION)
  sample = jax.ShapeDtypeStruct((1, 2, 4, 4, 3), np.float32)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        jax.eval_shape(module.init, jax.random.key(0), sample, sample)["params"])
  return weights.to_torch_state_dict("videofusion", params)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_pth_with_bad_keys_names_them_and_writes_nothing(torch_state_dict, tmp_path, damage):
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in torch_state_dict.items()}
  key = sorted(k for k in state if k.endswith(".weight") and state[k].ndim == 4)[-1]
  if damage == "missing":
    del state[key]
    expected = f"state_dict does not match the videofusion model: missing tensors: '{key}'"
  elif damage == "unexpected":
    state["extra.weight"] = torch.zeros(3)
    expected = "state_dict does not match the videofusion model: unexpected tensors: 'extra.weight'"
  else:
    shape = (state[key].shape[0] + 1, *state[key].shape[1:])
    state[key] = torch.zeros(shape)
    expected = f"tensor '{key}' has shape {shape}, the videofusion model expects"
  torch.save(state, tmp_path / "model.pth")
  with pytest.raises(SystemExit) as raised:
    export.main(["--from-torch", str(tmp_path / "model.pth"), "--model", "videofusion",
                 "--output", str(tmp_path / "out")])
  assert expected in str(raised.value)
  assert not (tmp_path / "out").exists()


def test_model_directory_from_another_version_is_named(model_dir, tmp_path):
  other = tmp_path / "model"
  shutil.copytree(model_dir, other)
  manifest = json.loads((other / inference.MANIFEST_FILE).read_text())
  manifest["format_version"] = inference.FORMAT_VERSION + 1
  (other / inference.MANIFEST_FILE).write_text(json.dumps(manifest))
  clip = _clip(tmp_path / "ir", 2, 8, 8, seed=0)
  with pytest.raises(inference.ModelDirError,
                     match=rf"format version {inference.FORMAT_VERSION + 1}.*reads version "
                     rf"{inference.FORMAT_VERSION}"):
    fuse.run(_fuse_args(other, clip, clip, tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- input faults


def test_ir_and_vis_of_different_lengths_or_sizes_are_refused(model_dir, tmp_path):
  ir = _clip(tmp_path / "ir", 3, 8, 8, seed=1)
  shorter = _clip(tmp_path / "short", 2, 8, 8, seed=2)
  larger = _clip(tmp_path / "large", 3, 8, 12, seed=3)
  with pytest.raises(ValueError, match=r"--ir has 3 frames but --vis has 2.*--truncate"):
    fuse.run(_fuse_args(model_dir, ir, shorter, tmp_path / "out"))
  with pytest.raises(ValueError, match=r"visible frame 0 is 12x8 but the infrared frames are 8x8"
                     r".*--resize") as raised:
    fuse.run(_fuse_args(model_dir, ir, larger, tmp_path / "out"))
  assert "no frame was written" in raised.value.__notes__[-1]
  assert fuse.existing_frames(tmp_path / "out") == []
  code = evaluate_cli.main(["--ir", str(ir), "--vis", str(shorter), "--fused", f"m={ir}",
                            "--output", str(tmp_path / "scores")])
  assert code == 2


def test_unreadable_video_is_named(model_dir, tmp_path, capsys):
  video = tmp_path / "broken.mp4"
  video.write_bytes(b"\x00not a video" * 100)
  clip = _clip(tmp_path / "vis", 2, 8, 8, seed=4)
  with pytest.raises(frames.FrameReadError, match=rf"cannot read --ir {video}"):
    fuse.run(_fuse_args(model_dir, video, clip, tmp_path / "out"))
  assert evaluate_cli.main(["--ir", str(video), "--vis", str(clip), "--fused", f"m={clip}",
                            "--output", str(tmp_path / "scores")]) == 2
  assert str(video) in capsys.readouterr().err


def test_nan_inputs_are_named_before_compute(model_dir):
  fuser = inference.Fuser.load(model_dir)
  ir = np.full((2, 8, 8, 3), 0.5, np.float32)
  vis = ir.copy()
  vis[1, 2, 3] = np.nan
  with pytest.raises(ValueError, match=r"visible frame 1 holds 3 NaN or infinite values"):
    fuser.fuse(ir, vis)


def _make_read_only(folder: pathlib.Path, monkeypatch) -> None:
  """A read-only folder; root ignores permissions, so for root the writer's temporary files
  fail with EACCES in it instead."""
  folder.mkdir(parents=True, exist_ok=True)
  if os.geteuid() != 0:
    folder.chmod(0o555)
    return

  def refuse(path, *args, **kwargs):  # the open() of files.AtomicFile's temporary file
    if pathlib.Path(path).parent.resolve() == folder.resolve():
      raise PermissionError(errno.EACCES, "Permission denied")
    return open(path, *args, **kwargs)  # pylint: disable=unspecified-encoding
  monkeypatch.setattr(files, "open", refuse, raising=False)


def test_read_only_output_folder_fails_before_compute(model_dir, torch_state_dict, tmp_path,
                                                     monkeypatch):
  clip = _clip(tmp_path / "clip", 2, 8, 8, seed=5)
  read_only = tmp_path / "read_only"
  _make_read_only(read_only, monkeypatch)
  loads = []
  monkeypatch.setattr(inference.Fuser, "load", lambda *a, **k: loads.append(a))
  with pytest.raises(OSError, match=rf"--output {read_only} is not writable \(Permission denied"):
    fuse.run(_fuse_args(model_dir, clip, clip, read_only))
  assert not loads  # no model loaded, nothing computed
  assert evaluate_cli.main(["--ir", str(clip), "--vis", str(clip), "--fused", f"m={clip}",
                            "--output", str(read_only), "--temporal", "none"]) == 2
  torch = pytest.importorskip("torch")
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in torch_state_dict.items()},
             tmp_path / "model.pth")
  monkeypatch.setattr(export, "export_function", lambda *a, **k: loads.append(a))
  with pytest.raises(SystemExit, match=rf"the folder of --output {read_only} is not writable"):
    export.main(["--from-torch", str(tmp_path / "model.pth"), "--model", "videofusion",
                 "--output", str(read_only / "model")])
  assert not loads


# ---------------------------------------------------------------------------- descriptor leak


@pytest.mark.slow  # a thousand evaluations
def test_a_thousand_evaluations_do_not_grow_the_open_file_count(dataset_with_val):
  config = _config(dataset_with_val)
  config.eval.clip_length = 6  # one clip per evaluation
  trainer = train.make_trainer(config, sharding.mesh_from_config(config))
  params = jax.device_get(trainer.init_state().params)
  train.evaluate(trainer, params)  # compiles
  before = len(os.listdir("/proc/self/fd"))
  for _ in range(1000):
    scores, _ = train.evaluate(trainer, params)
  assert len(os.listdir("/proc/self/fd")) == before
  assert np.isfinite(scores["psnr_fused"])
