"""Conversion: round trips on m3svd_mini, record framing, dataset_info, errors, resumption."""

import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_prep import __main__ as cli
from data_prep import sources
from vidfusion_jax import data
from vidfusion_jax import frames as frames_lib
from vidfusion_jax.data import records
from vidfusion_jax.data import synthetic
from vidfusion_jax.data import tfrecord
from vidfusion_jax.data import writer

M3SVD_STREAMS = {"lq_ir": "infrared_noise", "lq_vis": "visible_Blur",
                 "gt_ir": "infrared_Enhance", "gt_vis": "visible_Enhance"}
MINI_FRAMES = 5


def _crc32c_reference(data: bytes) -> int:
  """Table-driven CRC32C (Castagnoli, reflected polynomial 0x82F63B78), built bit by bit."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  crc = 0xFFFFFFFF
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_reference(data: bytes) -> int:
  crc = _crc32c_reference(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _mini_root(shared, root: pathlib.Path, frames: int = MINI_FRAMES) -> pathlib.Path:
  """Symlinks to the first `frames` frames of both m3svd_mini sequences."""
  source = shared("data/m3svd_mini")
  for folder in M3SVD_STREAMS.values():
    for sequence in sorted(p.name for p in (source / folder).iterdir()):
      target = root / folder / sequence
      target.mkdir(parents=True)
      for path in frames_lib.list_frame_files(source / folder / sequence)[:frames]:
        (target / path.name).symlink_to(path)
  return root


@pytest.fixture(scope="module")
def mini_root(shared, tmp_path_factory):
  return _mini_root(shared, tmp_path_factory.mktemp("m3svd_root"))


@pytest.fixture(scope="module", params=["png", "raw"])
def converted(request, mini_root, tmp_path_factory):
  output = tmp_path_factory.mktemp(f"m3svd_{request.param}")
  code = cli.main(["m3svd", "--input", str(mini_root), "--output", str(output), "--clip_length",
                   "3", "--clip_stride", "3", "--encoding", request.param,
                   "--records_per_shard", "3", "--noprogress",
                   "--workers", "2" if request.param == "png" else "1",
                   "--split", "train=0111_1716,0115_1831"])
  assert code == 0
  return output


def test_round_trip_is_pixel_exact(converted, mini_root):
  sequences = dict(data.iter_sequences(converted, "train"))
  assert sorted(sequences) == ["0111_1716", "0115_1831"]
  for name, frames in sequences.items():
    for stream, folder in M3SVD_STREAMS.items():
      files = frames_lib.list_frame_files(mini_root / folder / name)
      expected = np.stack([frames_lib.read_frame(f) for f in files])
      assert frames[stream].shape == (MINI_FRAMES, 480, 640, 3)
      np.testing.assert_array_equal(frames[stream], expected)


def test_counts_index_and_info(converted):
  info = data.read_dataset_info(converted)
  train = info["splits"]["train"]
  # 5 frames, K = 3, stride 3: clips start at 0 and 2 (the last one ends on the last frame).
  assert writer.clip_starts(5, 3, 3) == [0, 2]
  assert (train["num_records"], train["num_frames"], train["num_sequences"]) == (4, 10, 2)
  assert (info["height"], info["width"], info["clip_length"]) == (480, 640, 3)
  assert info["streams"] == list(records.STREAMS)
  assert info["feature_spec"]["gt_vis"] == {"shape": [3], "dtype": "string"}
  assert info["feature_spec"]["first_frame"] == {"shape": [], "dtype": "int64"}
  assert [s["file"] for s in train["shards"]] == ["train-00000-of-00002.tfrecord",
                                                   "train-00001-of-00002.tfrecord"]
  assert [s["num_records"] for s in train["shards"]] == [3, 1]
  codec = records.ClipCodec(info["streams"], 3)
  keys = []
  for shard in train["shards"]:
    path = converted / shard["file"]
    scanned = [(offset, len(record) + tfrecord.FRAMING_BYTES)
               for offset, record in tfrecord.iter_records(path)]
    index_lines = (converted / shard["index_file"]).read_text().splitlines()
    assert [tuple(map(int, line.split())) for line in index_lines] == scanned
    assert shard["num_bytes"] == path.stat().st_size
    assert shard["sha256"] == tfrecord.file_sha256(path)
    keys += [(c.sequence, c.first_frame, c.frame_encoding) for c in
             (codec.parse(r) for _, r in tfrecord.iter_records(path))]
  encoding = info["frame_encoding"]
  assert keys == [("0111_1716", 0, encoding), ("0111_1716", 2, encoding),
                  ("0115_1831", 0, encoding), ("0115_1831", 2, encoding)]


def test_crc_matches_independent_implementation(tmp_path):
  data.make_synthetic_dataset(tmp_path, num_sequences=1, num_frames=2, height=8, width=8,
                              clip_length=2, records_per_shard=1)
  path = tmp_path / "train-00000-of-00001.tfrecord"
  content = path.read_bytes()
  length, length_crc = struct.unpack_from("<QI", content)
  payload = content[12:12 + length]
  (data_crc,) = struct.unpack_from("<I", content, 12 + length)
  assert len(content) == length + 16
  assert length_crc == _masked_reference(content[:8])
  assert data_crc == _masked_reference(payload)
  for sample in (b"", b"123456789", bytes(range(256)) * 3):
    assert tfrecord.masked_crc32c(sample) == _masked_reference(sample)
  assert _crc32c_reference(b"123456789") == 0xE3069283  # the published CRC-32C check value


def test_corrupt_record_names_file_and_offset(converted, tmp_path):
  shard = "train-00000-of-00002.tfrecord"
  for name in (shard, shard + ".idx", writer.INFO_FILE):
    shutil.copy(converted / name, tmp_path / name)
  info = json.loads((tmp_path / writer.INFO_FILE).read_text())
  info["splits"]["train"]["shards"] = info["splits"]["train"]["shards"][:1]
  (tmp_path / writer.INFO_FILE).write_text(json.dumps(info))
  offset = int((tmp_path / (shard + ".idx")).read_text().splitlines()[1].split()[0])
  with open(tmp_path / shard, "r+b") as f:
    f.seek(offset + 1000)
    byte = f.read(1)
    f.seek(offset + 1000)
    f.write(bytes([byte[0] ^ 0x40]))
  source = data.ClipRecordSource(tmp_path, "train")
  assert len(source[0]) > 0 and len(source[2]) > 0
  with pytest.raises(data.RecordCorruptError, match=rf"{shard}.*byte offset {offset}"):
    source[1]  # pylint: disable=pointless-statement
  with open(tmp_path / shard, "r+b") as f:
    f.truncate(offset + 50)
  with pytest.raises(data.RecordCorruptError, match=rf"{shard}.*truncated"):
    data.ClipRecordSource(tmp_path, "train")


def _write_frames(folder: pathlib.Path, count: int, size=(16, 24), seed=0, suffix=".png"):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    frames_lib.write_png(folder / f"{i:04d}{suffix}",
                         rng.integers(0, 256, size + (3,), dtype=np.uint8))


def _tiny_m3svd(root: pathlib.Path, frames: int = 4) -> pathlib.Path:
  for k, folder in enumerate(M3SVD_STREAMS.values()):
    _write_frames(root / folder / "seq_a", frames, seed=k)
  return root


def _convert_m3svd(root, output, capsys):
  code = cli.main(["m3svd", "--input", str(root), "--output", str(output), "--clip_length", "2",
                   "--workers", "1", "--noprogress"])
  return code, capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("count", r"frame count mismatch: .*visible_Blur/seq_a has 3 frames"),
    ("size", r"frame size mismatch.*visible_Blur/seq_a/0002\.png is 20x16"),
    ("first_size", r"frame size mismatch between streams: .*visible_Blur/seq_a/0000\.png"),
    ("truncated", r"visible_Blur/seq_a/0001\.png"),
    ("empty", r"visible_Blur/seq_a holds no image files"),
    ("collision", r"name collision in .*visible_Blur/seq_a: 0001\.jpg and 0001\.png"),
    ("names", r"visible_Blur/seq_a/0009\.png has no counterpart"),
])
def test_bad_inputs_stop_with_named_error(damage, message, tmp_path, capsys):
  root = _tiny_m3svd(tmp_path / "root")
  folder = root / "visible_Blur" / "seq_a"
  if damage == "count":
    (folder / "0003.png").unlink()
  elif damage in ("size", "first_size"):
    frame = "0002.png" if damage == "size" else "0000.png"
    frames_lib.write_png(folder / frame, np.zeros((16, 20, 3), np.uint8))
  elif damage == "truncated":
    (folder / "0001.png").write_bytes((folder / "0001.png").read_bytes()[:60])
  elif damage == "empty":
    for path in folder.iterdir():
      path.unlink()
  elif damage == "collision":
    shutil.copy(folder / "0001.png", folder / "0001.jpg")
  else:
    (folder / "0003.png").rename(folder / "0009.png")
  code, err = _convert_m3svd(root, tmp_path / "out", capsys)
  assert code == 2
  assert re.search(message, err), err
  assert not (tmp_path / "out" / writer.INFO_FILE).exists()
  assert not list((tmp_path / "out").glob("*.tfrecord"))


class _FailingSequence(synthetic.SyntheticSequence):
  """Raises in the middle of its second clip, like a conversion killed half-way."""

  def iter_clips(self, starts, clip_length):
    for i, clip in enumerate(super().iter_clips(starts, clip_length)):
      if i == 1:
        raise KeyboardInterrupt("simulated interruption")
      yield clip


def test_interrupted_conversion_resumes(tmp_path):
  kwargs = dict(clip_length=3, clip_stride=3, records_per_shard=2, workers=1, progress=False)
  healthy = synthetic.synthetic_sequences(2, 9, 16, 16, seed=3)
  reference = writer.convert(tmp_path / "reference", "train", healthy, {}, **kwargs)
  failing = [healthy[0], _FailingSequence(*[getattr(healthy[1], f) for f in
                                            ("name", "seed", "num_frames", "height", "width")])]
  out = tmp_path / "out"
  with pytest.raises(KeyboardInterrupt):
    writer.convert(out, "train", failing, {}, **kwargs)
  # Shards 0 (clips of sequence 0) and 1 (last clip of 0, first of 1) are complete, shard 2 is not.
  complete = sorted(p.name for p in out.glob("*.tfrecord"))
  assert complete == ["train-00000-of-00003.tfrecord", "train-00001-of-00003.tfrecord"]
  assert not (out / writer.INFO_FILE).exists() and not list(out.glob(".*tmp"))
  (out / ".train-00002-of-00003.tfrecord.999.tmp").write_bytes(b"partial")  # a killed writer
  kept = (out / complete[0]).stat().st_mtime_ns
  with open(out / complete[1], "r+b") as f:  # damage: must be detected and rewritten
    f.seek(100)
    f.write(b"\x00\x01\x02")
  info = writer.convert(out, "train", healthy, {}, **kwargs)
  assert (out / complete[0]).stat().st_mtime_ns == kept
  assert not list(out.glob(".*tmp"))
  assert ([s["sha256"] for s in info["splits"]["train"]["shards"]]
          == [s["sha256"] for s in reference["splits"]["train"]["shards"]])


def test_pairs_and_clean_only_layout(tmp_path, capsys):
  for stream, seed in (("ir", 1), ("vis", 2)):
    for sequence in ("day", "night"):
      _write_frames(tmp_path / stream / sequence, 3, seed=seed + len(sequence))
  code = cli.main(["pairs", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vis"),
                   "--output", str(tmp_path / "out"), "--clip_length", "2", "--workers", "1",
                   "--encoding", "raw", "--noprogress", "--split", "test"])
  assert code == 0, capsys.readouterr().err
  info = data.read_dataset_info(tmp_path / "out")
  assert info["streams"] == ["gt_ir", "gt_vis"]
  assert info["splits"]["test"]["source"]["converter"] == "pairs"
  sequences = dict(data.iter_sequences(tmp_path / "out", "test"))
  assert sorted(sequences) == ["day", "night"]
  for name, frames in sequences.items():
    for stream, key in (("ir", "gt_ir"), ("vis", "gt_vis")):
      expected = [frames_lib.read_frame(p) for p in
                  frames_lib.list_frame_files(tmp_path / stream / name)]
      np.testing.assert_array_equal(frames[key], np.stack(expected))
    np.testing.assert_array_equal(frames["lq_ir"], frames["gt_ir"])  # degrade="identity"


def test_videos_round_trip(tmp_path, capsys):
  rng = np.random.default_rng(0)
  clips = {}
  for stream in ("ir", "vis"):
    with frames_lib.VideoWriter(tmp_path / f"{stream}.mp4", fps=10) as video:
      for _ in range(5):
        video.write(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    clips[stream] = np.stack(list(frames_lib.iter_frames(tmp_path / f"{stream}.mp4")))
  code = cli.main(["videos", "--ir", str(tmp_path / "ir.mp4"), "--vis", str(tmp_path / "vis.mp4"),
                   "--name", "walk", "--output", str(tmp_path / "out"), "--clip_length", "2",
                   "--clip_stride", "2", "--records_per_shard", "2", "--workers", "1",
                   "--noprogress"])
  assert code == 0, capsys.readouterr().err
  (name, frames), = data.iter_sequences(tmp_path / "out", "train")
  assert name == "walk" and data.read_dataset_info(tmp_path / "out")["splits"]["train"][
      "num_records"] == 3
  np.testing.assert_array_equal(frames["gt_ir"], clips["ir"])
  np.testing.assert_array_equal(frames["gt_vis"], clips["vis"])
  with frames_lib.VideoWriter(tmp_path / "short.mp4", fps=10) as video:
    for frame in clips["vis"][:4]:
      video.write(frame)
  code = cli.main(["videos", "--ir", str(tmp_path / "ir.mp4"), "--vis", str(tmp_path / "short.mp4"),
                   "--output", str(tmp_path / "bad"), "--workers", "1", "--noprogress"])
  assert code == 2
  assert "frame count mismatch: " in capsys.readouterr().err


def test_tensorflow_is_never_imported(tmp_path):
  script = (
      "import sys\n"
      "from data_prep import __main__ as cli\n"
      "from vidfusion_jax import data\n"
      f"assert cli.main(['synthetic', '--output', {str(tmp_path)!r}, '--num_sequences', '1',"
      " '--num_frames', '6', '--clip_length', '6', '--height', '16', '--width', '16',"
      " '--workers', '1',"
      " '--noprogress']) == 0\n"
      f"batch = next(data.make_train_iterator({str(tmp_path)!r}, global_batch_size=1,"
      " crop_size=8, process_index=0, process_count=1))\n"
      "assert batch['gt_ir'].shape == (1, 6, 8, 8, 3)\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parents[1], env=os.environ | {
                              "JAX_PLATFORMS": "cpu"}, check=False)
  assert result.returncode == 0, result.stderr


def test_split_specs(tmp_path):
  sequences = synthetic.synthetic_sequences(4, 2, 4, 4)
  names = [s.name for s in sequences]
  (tmp_path / "val.txt").write_text(f"# validation\n{names[2]}\n\n{names[3]}  # night\n")
  splits = sources.select_splits(sequences, [f"train={names[0]},{names[1]}",
                                             f"val=@{tmp_path / 'val.txt'}"])
  assert {k: [s.name for s in v] for k, v in splits.items()} == {"train": names[:2],
                                                                  "val": names[2:]}
  assert [s.name for s in sources.select_splits(sequences, ["all"])["all"]] == names
  with pytest.raises(ValueError, match=r"unknown sequences \['nope'\]"):
    sources.select_splits(sequences, ["train=nope"])
  with pytest.raises(ValueError, match=f"sequence {names[0]} is in both split train and split"):
    sources.select_splits(sequences, [f"train={names[0]}", f"val={names[0]}"])


def test_second_split_must_match_the_first(tmp_path, capsys):
  data.make_synthetic_dataset(tmp_path, num_sequences=1, num_frames=4, height=8, width=8,
                              clip_length=2)
  before = sorted(p.name for p in tmp_path.iterdir())
  code = cli.main(["synthetic", "--output", str(tmp_path), "--split", "val", "--num_sequences",
                   "1", "--num_frames", "4", "--height", "8", "--width", "8", "--clip_length",
                   "3", "--workers", "1", "--noprogress"])
  assert code == 2
  assert "has clip_length=2 but this conversion uses 3" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  code = cli.main(["synthetic", "--output", str(tmp_path), "--split", "val", "--num_sequences",
                   "1", "--num_frames", "4", "--height", "8", "--width", "8", "--clip_length",
                   "2", "--workers", "1", "--noprogress"])
  assert code == 0
  assert sorted(data.read_dataset_info(tmp_path)["splits"]) == ["train", "val"]


def test_records_parse_with_the_declared_feature_spec(tmp_path):
  """An independent parser (tfds' NumPy Example parser) reads records with info's feature_spec."""
  from tensorflow_datasets.core import example_parser  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core.features import feature  # pylint: disable=import-outside-toplevel
  info = data.make_synthetic_dataset(tmp_path, num_sequences=1, num_frames=5, height=8, width=12,
                                     clip_length=3, frame_encoding="raw")
  specs = {name: feature.TensorInfo(shape=tuple(f["shape"]),
                                    dtype=np.object_ if f["dtype"] == "string" else np.int64)
           for name, f in info["feature_spec"].items()}
  parser = example_parser.ExampleParserNp(specs)
  clip = synthetic.synthetic_sequences(1, 5, 8, 12)[0].read_frames(0, 5)
  for (_, record), first in zip(tfrecord.iter_records(tmp_path / "train-00000-of-00001.tfrecord"),
                                (0, 2)):
    parsed = parser.parse_example(record)
    assert (parsed["sequence"], parsed["first_frame"], parsed["num_frames"]) == (
        b"synthetic_0000", first, 3)
    assert (parsed["height"], parsed["width"], parsed["frame_encoding"]) == (8, 12, b"raw")
    for stream in records.STREAMS:
      frames = np.stack([np.frombuffer(b, np.uint8).reshape(8, 12, 3) for b in parsed[stream]])
      np.testing.assert_array_equal(frames, clip[stream][first:first + 3])


@pytest.mark.parametrize("converted", ["png"], indirect=True)
def test_png_frames_in_the_stored_layout_pass_through(converted, mini_root):
  """Visible RGB PNGs are stored as the source files; infrared (equal channels) as gray PNGs."""
  info = data.read_dataset_info(converted)
  codec = records.ClipCodec(info["streams"], 3)
  path = converted / info["splits"]["train"]["shards"][0]["file"]
  clip = codec.parse(next(tfrecord.iter_records(path))[1])
  source_files = {s: frames_lib.list_frame_files(mini_root / M3SVD_STREAMS[s] / clip.sequence)
                  for s in records.STREAMS}
  for stream in ("lq_vis", "gt_vis"):
    assert list(clip.encoded[stream]) == [p.read_bytes() for p in source_files[stream][:3]]
  for stream in ("lq_ir", "gt_ir"):
    for item, source in zip(clip.encoded[stream], source_files[stream]):
      assert item[25] == 0 and source.read_bytes()[25] == 2  # IHDR colour type: gray, RGB
      np.testing.assert_array_equal(frames_lib.decode_frame(item),
                                    frames_lib.read_frame(source))


def test_stored_png_reencodes_other_layouts():
  rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  gray = np.repeat(rgb[..., :1], 3, -1)
  rgb_png, gray_png = frames_lib.encode_png(rgb), frames_lib.encode_png(gray[..., 0])
  assert records.stored_png(rgb_png, "a", (4, 5)) is rgb_png
  assert records.stored_png(gray_png, "b", (4, 5)) is gray_png
  stored = records.stored_png(frames_lib.encode_png(gray), "c", (4, 5))  # RGB PNG, equal channels
  assert stored == gray_png
  rgba = np.concatenate([rgb[..., ::-1], np.full((4, 5, 1), 255, np.uint8)], -1)
  assert records.stored_png(cv2.imencode(".png", rgba)[1].tobytes(), "d", (4, 5)) == rgb_png
  with pytest.raises(ValueError, match=r"frame size mismatch: e is 5x4, expected 6x4"):
    records.stored_png(rgb_png, "e", (4, 6))
  tall = np.repeat(np.random.default_rng(1).integers(0, 256, (20, 6, 1), dtype=np.uint8), 3, -1)
  tall[-1, -1] = (1, 2, 3)  # unequal channels only in the last row: stays RGB
  tall_png = frames_lib.encode_png(tall)
  assert records.stored_png(tall_png, "f", (20, 6)) is tall_png
  idat = rgb_png.index(b"IDAT")
  corrupt = rgb_png[:idat + 6] + bytes([rgb_png[idat + 6] ^ 1]) + rgb_png[idat + 7:]
  with pytest.raises(frames_lib.FrameReadError, match="cannot decode image g"):
    records.stored_png(corrupt, "g", (4, 5))  # a CRC error: not passed through


def test_records_are_the_same_bytes_in_every_process(tmp_path):
  """Serialisation does not depend on the process (protobuf map order, hash seeds)."""
  script = ("from data_prep import __main__ as cli; import sys; sys.exit(cli.main(["
            "'synthetic', '--output', sys.argv[1], '--num_sequences', '1', '--num_frames', '4',"
            " '--height', '8', '--width', '8', '--clip_length', '2', '--noprogress']))")
  for seed in ("1", "2"):
    subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], check=True,
                   env=os.environ | {"PYTHONHASHSEED": seed}, capture_output=True)
  assert ((tmp_path / "1" / "train-00000-of-00001.tfrecord").read_bytes()
          == (tmp_path / "2" / "train-00000-of-00001.tfrecord").read_bytes())


@pytest.mark.parametrize("argv", [["--help"], ["m3svd", "--help"], ["synthetic", "--help"]])
def test_help(argv, capsys):
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  if len(argv) == 1:
    assert all(source in out for source in cli.SOURCES) and "--runner" in out
  else:
    flags_shown = set(re.findall(r"^  --(\w+):", out, re.MULTILINE))
    assert flags_shown == set(cli._SOURCE_FLAGS[argv[0]])  # pylint: disable=protected-access
    assert ("--input" in out) == (argv[0] == "m3svd") and ("--seed" in out) == (
        argv[0] == "synthetic")


def test_old_flag_spellings_warn_and_work(tmp_path, capsys):
  common = ["--num_sequences", "1", "--num_frames", "4", "--height", "8", "--width", "8"]
  assert cli.main(["synthetic", "--output", str(tmp_path / "new"), "--clip_length", "2",
                   "--noprogress", *common]) == 0
  with pytest.warns(FutureWarning) as warned:
    assert cli.main(["synthetic", "--output", str(tmp_path / "old"), "--clip-length=2",
                     "--no-progress", *common]) == 0
  assert [str(w.message) for w in warned] == [
      "--clip-length is deprecated and goes away in the next release; use --clip_length",
      "--no-progress is deprecated and goes away in the next release; use --noprogress"]
  capsys.readouterr()
  assert ((tmp_path / "new" / writer.INFO_FILE).read_text()
          == (tmp_path / "old" / writer.INFO_FILE).read_text())


@pytest.mark.parametrize("argv, message", [
    (["m3svd", "--output", "o", "--input", "i", "--seed", "3"],
     "the m3svd source does not take --seed"),
    (["synthetic", "--output", "o", "--clip_lenght", "3"],
     r"unknown arguments \['--clip_lenght', '3'\]"),
    (["synthetic", "--output", "o", "--clip_length", "three"], "--clip_length=three"),
    (["nonsense", "--output", "o"], "the first argument must be a source"),
    (["synthetic"], "--output is required"),
])
def test_bad_command_lines_are_named(argv, message, capsys):
  assert cli.main(argv) == 2
  assert re.search(message, capsys.readouterr().err)


def test_records_read_with_tensorflow(tmp_path):
  """`tf.data.TFRecordDataset` + `tf.io.parse_single_example` with dataset_info's feature_spec
  read our shards (framing, CRCs and Example encoding), including PNG frames."""
  tf = pytest.importorskip("tensorflow")
  info = data.make_synthetic_dataset(tmp_path, num_sequences=1, num_frames=5, height=8, width=12,
                                     clip_length=3, frame_encoding="png")
  features = {name: tf.io.FixedLenFeature(f["shape"], getattr(tf, f["dtype"]))
              for name, f in info["feature_spec"].items()}
  clip = synthetic.synthetic_sequences(1, 5, 8, 12)[0].read_frames(0, 5)
  shards = [str(tmp_path / shard["file"]) for shard in info["splits"]["train"]["shards"]]
  parsed = [tf.io.parse_single_example(record, features)
            for record in tf.data.TFRecordDataset(shards)]
  assert [int(p["first_frame"]) for p in parsed] == [0, 2]
  for example in parsed:
    first = int(example["first_frame"])
    assert example["sequence"].numpy() == b"synthetic_0000"
    assert (int(example["num_frames"]), int(example["height"]), int(example["width"])) == (3, 8, 12)
    for stream in records.STREAMS:
      frames = np.stack([tf.io.decode_png(png, channels=3).numpy()
                         for png in example[stream].numpy()])
      np.testing.assert_array_equal(frames, clip[stream][first:first + 3])
