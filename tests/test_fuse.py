"""`python -m vidfusion_jax.fuse` on real and synthetic clips: outputs, backends and errors."""

import jax
import numpy as np
import pytest

from vidfusion_jax import export
from vidfusion_jax import frames
from vidfusion_jax import fuse
from vidfusion_jax import inference

TINY_CONFIG = {"num_features": 16, "num_blocks": [1, 1, 1], "num_decoder_blocks": 1}
PLATFORM = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny random-init VideoFusion, exported."""
  module = inference.build_model("videofusion", TINY_CONFIG)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *[jax.ShapeDtypeStruct(
      (1, 2, 4, 4, 3), np.float32)] * 2)["params"]
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  out = tmp_path_factory.mktemp("fuse") / "model"
  export.export_model(out, "videofusion", TINY_CONFIG, params, platforms=[PLATFORM])
  return out


def _write_clip(folder, num_frames, height, width, seed):
  rng = np.random.default_rng(seed)
  clip = rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
  for i, frame in enumerate(clip):
    frames.write_png(folder / f"f{i}.png", frame)
  return folder


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
  """7 frames of 10x13 (not a multiple of 4) per modality."""
  root = tmp_path_factory.mktemp("clip")
  return (_write_clip(root / "ir", 7, 10, 13, seed=1), _write_clip(root / "vis", 7, 10, 13, seed=2))


def _frame_files(folder):
  return sorted(p.name for p in folder.iterdir() if fuse.FRAME_NAME.match(p.name))


def _correlation(a, b):
  return np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1]


def _args(model_dir, ir, vis, output, *extra):
  return ["--model", str(model_dir), "--ir", str(ir), "--vis", str(vis), "--output", str(output),
          "--quiet", *extra]


def test_fuses_a_real_sequence_to_frames_and_videos(model_dir, shared, tmp_path):
  root = shared("data/m3svd_mini")
  ir, vis = root / "infrared_noise/0111_1716", root / "visible_Blur/0111_1716"
  out = tmp_path / "out"
  fuse.main(_args(model_dir, ir, vis, out, "--window", "4", "--overlap", "0",
                  "--mp4", str(out / "fused.mp4"), "--side_by_side", str(tmp_path / "sbs.mp4")))
  assert _frame_files(out) == [f"{i:04d}.png" for i in range(20)]
  fused = np.stack([frames.read_frame(out / f"{i:04d}.png") for i in range(20)])
  assert fused.shape == (20, 480, 640, 3)
  assert fused.std() > 1  # Not a constant image.
  video = np.stack(list(frames.iter_frames(out / "fused.mp4")))
  assert video.shape == (20, 480, 640, 3)
  assert _correlation(video, fused) > 0.95  # H.264 is lossy (random-init output is noisy).
  side = np.stack(list(frames.iter_frames(tmp_path / "sbs.mp4")))
  assert side.shape == (20, 480, 3 * 640, 3)
  ir_frames = np.stack(list(frames.iter_frames(ir)))
  assert np.abs(side[..., :640, :].astype(float) - ir_frames).mean() < 4
  assert _correlation(side[..., 1280:, :], fused) > 0.95


def test_cli_matches_the_api_and_the_artifact(model_dir, small_clip, tmp_path):
  ir, vis = small_clip
  window = ["--window", "2", "--overlap", "1"]
  fuse.main(_args(model_dir, ir, vis, tmp_path / "model", *window))
  fuse.main(_args(model_dir, ir, vis, tmp_path / "artifact", *window, "--backend", "artifact"))
  names = [f"{i:04d}.png" for i in range(7)]
  assert _frame_files(tmp_path / "model") == names == _frame_files(tmp_path / "artifact")
  by_model = np.stack([frames.read_frame(tmp_path / "model" / n) for n in names])
  by_artifact = np.stack([frames.read_frame(tmp_path / "artifact" / n) for n in names])
  fuser = inference.Fuser.load(model_dir, windows=inference.WindowSettings(2, 1))
  expected = frames.to_uint8(fuser.fuse(np.stack(list(frames.iter_frames(ir))),
                                        np.stack(list(frames.iter_frames(vis)))))
  assert by_model.shape == (7, 10, 13, 3)
  np.testing.assert_array_equal(by_model, expected)
  assert np.abs(by_artifact.astype(int) - by_model).max() <= 1

  fuse.main(_args(model_dir, ir, vis, tmp_path / "reference", "--reference", "--window", "2"))
  by_reference = np.stack([frames.read_frame(tmp_path / "reference" / n) for n in names])
  fuser = inference.Fuser.load(model_dir, windows=inference.WindowSettings(2, 0, "last", True))
  expected = frames.to_uint8(fuser.fuse(np.stack(list(frames.iter_frames(ir))),
                                        np.stack(list(frames.iter_frames(vis)))), stretch=True)
  np.testing.assert_array_equal(by_reference, expected)
  assert by_reference.min() == 0 and by_reference.max() == 255  # Stretched per frame.


def test_video_file_input(model_dir, small_clip, tmp_path):
  ir, _ = small_clip
  rng = np.random.default_rng(8)
  with frames.VideoWriter(tmp_path / "vis.mp4") as video:
    for _ in range(3):
      video.write(rng.integers(0, 256, (10, 14, 3), np.uint8))
  with pytest.raises(SystemExit, match="--ir has 7 frames but --vis has 3"):
    fuse.main(_args(model_dir, ir, tmp_path / "vis.mp4", tmp_path / "out"))
  fuse.main(_args(model_dir, ir, tmp_path / "vis.mp4", tmp_path / "out", "--truncate",
                  "--resize", "--window", "2"))
  assert _frame_files(tmp_path / "out") == ["0000.png", "0001.png", "0002.png"]
  assert frames.read_frame(tmp_path / "out" / "0002.png").shape == (10, 13, 3)


def test_window_flags():
  def settings(*argv):
    required = ["--model=m", "--ir=i", "--vis=v", "--output=o"]
    args = fuse.parse_flags([*required, *argv])
    return fuse.window_settings("videofusion", args)

  assert settings() == inference.WindowSettings(7, 2, "linear", False)
  assert settings("--reference") == inference.WindowSettings(7, 0, "last", True)
  assert settings("--reference", "--overlap=3", "--nostretch") == inference.WindowSettings(
      7, 3, "last", False)
  assert settings("--window=5", "--blend=last", "--stretch") == inference.WindowSettings(
      5, 2, "last", True)
  assert settings("--window=2") == inference.WindowSettings(2, 1, "linear", False)


def test_input_errors(model_dir, small_clip, tmp_path):
  ir, vis = small_clip
  short = _write_clip(tmp_path / "short", 2, 10, 13, seed=3)
  with pytest.raises(SystemExit, match="--ir has 7 frames but --vis has 2.*--truncate"):
    fuse.main(_args(model_dir, ir, short, tmp_path / "a"))
  assert not (tmp_path / "a").exists()
  fuse.main(_args(model_dir, ir, short, tmp_path / "a", "--truncate", "--window", "2"))
  assert _frame_files(tmp_path / "a") == ["0000.png", "0001.png"]

  other_size = _write_clip(tmp_path / "other", 7, 12, 13, seed=4)
  with pytest.raises(SystemExit, match="visible frame 0 is 13x12 .* 13x10.*--resize"):
    fuse.main(_args(model_dir, ir, other_size, tmp_path / "b"))
  assert _frame_files(tmp_path / "b") == []

  broken = _write_clip(tmp_path / "broken", 7, 10, 13, seed=5)
  (broken / "f5.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(SystemExit, match="cannot decode image .*f5.png"):
    fuse.main(_args(model_dir, ir, broken, tmp_path / "c", "--window", "2", "--overlap", "0"))
  written = list((tmp_path / "c").iterdir())
  assert {p.name for p in written} == {f"{i:04d}.png" for i in range(len(written))}
  for path in written:  # Every file there is a complete frame.
    assert frames.read_frame(path).shape == (10, 13, 3)

  with pytest.raises(SystemExit, match="--vis .*missing does not exist"):
    fuse.main(_args(model_dir, ir, tmp_path / "missing", tmp_path / "d"))
  with pytest.raises(SystemExit, match="no manifest.json"):
    fuse.main(_args(tmp_path, ir, vis, tmp_path / "d"))


def test_output_folder_with_frames_of_another_run(model_dir, small_clip, tmp_path):
  ir, vis = small_clip
  out = tmp_path / "out"
  out.mkdir()
  old = np.zeros((4, 4, 3), np.uint8)
  for name in ("0003.png", "0012.png", "notes.png"):
    frames.write_png(out / name, old)
  with pytest.raises(SystemExit, match="already holds 2 frames .*--overwrite"):
    fuse.main(_args(model_dir, ir, vis, out))
  assert frames.read_frame(out / "0003.png").shape == (4, 4, 3)  # Untouched.
  fuse.main(_args(model_dir, ir, vis, out, "--overwrite", "--window", "2"))
  assert _frame_files(out) == [f"{i:04d}.png" for i in range(7)]  # 0012.png removed.
  assert frames.read_frame(out / "0003.png").shape == (10, 13, 3)
  assert (out / "notes.png").exists()


def test_vfbench_split_csv_lists_the_frame_pairs(model_dir, small_clip, tmp_path):
  """--split/--split_root reads the pairs a VF-Bench CSV lists (here in reverse order)."""
  ir, vis = small_clip
  root = tmp_path / "dataset"
  (root / "seq").mkdir(parents=True)
  (root / "seq" / "a").symlink_to(ir.parent, target_is_directory=True)
  rows = [f"ir/f{i}.png,vis/f{i}.png" for i in reversed(range(7))]
  (root / "seq^a.csv").write_text("ir,rgb\n" + "\n".join(rows) + "\n")
  common = ["--model", str(model_dir), "--quiet", "--window", "2", "--overlap", "1"]
  fuse.main(common + ["--split", str(root / "seq^a.csv"), "--split_root", str(root),
                      "--output", str(tmp_path / "split")])
  by_split = np.stack([frames.read_frame(tmp_path / "split" / f"{i:04d}.png") for i in range(7)])
  fuser = inference.Fuser.load(model_dir, windows=inference.WindowSettings(2, 1))
  read = lambda folder: np.stack([frames.read_frame(folder / f"f{i}.png")
                                  for i in reversed(range(7))])
  np.testing.assert_array_equal(by_split, frames.to_uint8(fuser.fuse(read(ir), read(vis))))
  with pytest.raises(SystemExit, match="--split replaces --ir and --vis"):
    fuse.main(common + ["--split", str(root / "seq^a.csv"), "--ir", str(ir),
                        "--output", str(tmp_path / "x")])
  with pytest.raises(SystemExit, match="listed frames are missing"):
    fuse.main(common + ["--split", str(root / "seq^a.csv"), "--split_root", str(tmp_path),
                        "--output", str(tmp_path / "y")])
