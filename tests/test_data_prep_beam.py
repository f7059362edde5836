"""Conversion as an Apache Beam job: the same bytes as the local pool, and the same faults."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from data_prep import __main__ as cli
from vidfusion_jax import frames as frames_lib
from vidfusion_jax.data import writer

pytest.importorskip("apache_beam")

M3SVD_FOLDERS = ("infrared_noise", "visible_Blur", "infrared_Enhance", "visible_Enhance")
BEAM_IN_PROCESS = ["--runner=DirectRunner"]
BEAM_TWO_PROCESSES = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                      "--direct_num_workers=2"]


def _mini_root(shared, root: pathlib.Path, frames: int) -> pathlib.Path:
  """Symlinks to the first `frames` frames of both m3svd_mini sequences."""
  source = shared("data/m3svd_mini")
  for folder in M3SVD_FOLDERS:
    for sequence in sorted(p.name for p in (source / folder).iterdir()):
      (root / folder / sequence).mkdir(parents=True)
      for path in frames_lib.list_frame_files(source / folder / sequence)[:frames]:
        (root / folder / sequence / path.name).symlink_to(path)
  return root


def _convert(root, output, engine_args, *options):
  return cli.main(["m3svd", "--input", str(root), "--output", str(output), "--noprogress",
                   *options, *engine_args])


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  """Every file of a folder, hidden (temporary) ones included."""
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_beam_job_writes_the_local_bytes(shared, tmp_path):
  root = _mini_root(shared, tmp_path / "root", frames=20)
  options = ["--clip_length", "12", "--records_per_shard", "2",
             "--split", "train=0111_1716", "--split", "val=0115_1831"]
  assert _convert(root, tmp_path / "local", ["--workers", "2"], *options) == 0
  assert _convert(root, tmp_path / "beam", BEAM_TWO_PROCESSES, *options) == 0
  local, beam = _files(tmp_path / "local"), _files(tmp_path / "beam")
  # 2 sequences x 3 clips (starts 0, 7, 8), 2 records a shard: 2 shards per split.
  assert sorted(local) == sorted(
      [f"{split}-0000{k}-of-00002.tfrecord{suffix}" for split in ("train", "val")
       for k in (0, 1) for suffix in ("", ".idx")] + [writer.INFO_FILE])
  assert sorted(beam) == sorted(local)
  assert [name for name in local if local[name] != beam[name]] == []


def _damage(root: pathlib.Path, damage: str) -> None:
  folder = root / "visible_Blur" / "0115_1831"
  if damage == "unreadable":
    (folder / "0002.png").unlink()
    (folder / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  else:  # mismatched streams
    (folder / "0003.png").unlink()


@pytest.mark.parametrize("damage, message", [
    ("unreadable", r"sequence 0115_1831 failed in shard train-00003-of-00004\.tfrecord: "
                   r"FrameReadError: cannot decode image .*visible_Blur/0115_1831/0002\.png"),
    ("count", r"sequence 0115_1831: frame count mismatch: .*visible_Blur/0115_1831 has 3 frames"),
])
def test_bad_inputs_give_the_local_named_error(shared, tmp_path, capsys, damage, message):
  root = _mini_root(shared, tmp_path / "root", frames=4)
  _damage(root, damage)
  errors = {}
  for engine, args in (("local", ["--workers", "1"]), ("beam", BEAM_IN_PROCESS)):
    assert _convert(root, tmp_path / engine, args, "--clip_length", "2",
                    "--records_per_shard", "1") == 2
    errors[engine] = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, errors[engine]), errors[engine]
    assert not (tmp_path / engine / writer.INFO_FILE).exists()
  # A frame is read inside the job; the streams are checked before it starts.
  prefix = "the Beam job failed: " if damage == "unreadable" else ""
  assert errors["beam"] == errors["local"].replace("error: ", "error: " + prefix)


def test_failed_job_names_the_sequence_and_its_rerun_completes(shared, tmp_path, capsys):
  root = _mini_root(shared, tmp_path / "root", frames=4)
  options = ["--clip_length", "2", "--records_per_shard", "1"]
  assert _convert(root, tmp_path / "reference", ["--workers", "1"], *options) == 0
  reference = _files(tmp_path / "reference")
  bad = root / "visible_Blur" / "0115_1831" / "0002.png"
  original = bad.resolve()
  _damage(root, "unreadable")
  out = tmp_path / "beam"
  assert _convert(root, out, BEAM_IN_PROCESS, *options) == 2
  assert "the Beam job failed: sequence 0115_1831 failed" in capsys.readouterr().err
  written = _files(out)
  assert writer.INFO_FILE not in written
  assert not [name for name in written if name.startswith(".")]  # no temporary files left
  # 0111_1716 fills shards 0 and 1 (starts 0, 2), 0115_1831 shards 2 and 3; shard 3 reads 0002,
  # the others may or may not be written before the job stops.
  assert "train-00003-of-00004.tfrecord" not in written
  kept = {name: (out / name).stat().st_mtime_ns for name in written}
  bad.unlink()
  bad.symlink_to(original)
  assert _convert(root, out, BEAM_IN_PROCESS, *options) == 0
  assert _files(out) == reference  # complete, no duplicates, the same bytes
  assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # verified, not redone


@pytest.mark.slow
@pytest.mark.multiprocess
def test_benchmark_quick(shared, tmp_path):
  script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "data_prep.py"
  result = subprocess.run([sys.executable, str(script), "--quick", "--data_root",
                           str(shared("data/m3svd_mini")), "--work_dir", str(tmp_path)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  runs = {line["engine"]: line for line in lines if "engine" in line}
  assert sorted(runs) == ["beam, 1 worker", "pool, 1 worker"]
  for run in runs.values():  # 2 sequences x 4 frames
    assert run["frames"] == 8 and run["quick"]
    assert abs(run["frames_per_s"] * run["seconds"] - 8) < 0.1
  (stages,) = [line["stage_ms_per_frame"] for line in lines if "stage_ms_per_frame" in line]
  assert sorted(stages) == ["crc", "full_decode", "read", "store", "write"]
  assert all(ms >= 0 for ms in stages.values()) and stages["store"] > 0
