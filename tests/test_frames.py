"""Frame and video I/O: exact PNG round trips, ordering, errors that name the file."""

import numpy as np
import pytest

from vidfusion_jax import frames


def test_png_round_trip_and_natural_order(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(11)]
  for i, image in enumerate(images):
    frames.write_png(tmp_path / f"f{i}.png", image)
  files = frames.list_frame_files(tmp_path)
  assert [f.name for f in files] == [f"f{i}.png" for i in range(11)]
  assert frames.count_frames(tmp_path) == 11
  for image, decoded in zip(images, frames.iter_frames(tmp_path)):
    np.testing.assert_array_equal(decoded, image)
  assert not list(tmp_path.glob(".*.tmp"))


def test_gray_images_get_three_equal_channels(tmp_path):
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  frames.write_png(tmp_path / "g.png", gray)
  rgb = frames.read_frame(tmp_path / "g.png")
  assert rgb.shape == (3, 4, 3)
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], gray)


def test_truncated_and_missing_files_are_named(tmp_path):
  frames.write_png(tmp_path / "ok.png", np.zeros((64, 64, 3), np.uint8) + 7)
  data = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "bad.png").write_bytes(data[: len(data) // 2])
  with pytest.raises(frames.FrameReadError, match="bad.png"):
    frames.read_frame(tmp_path / "bad.png")
  with pytest.raises(frames.FrameReadError, match="nothere.png"):
    frames.read_frame(tmp_path / "nothere.png")
  (tmp_path / "empty").mkdir()
  with pytest.raises(frames.FrameReadError, match="holds no image files"):
    list(frames.iter_frames(tmp_path / "empty"))


def test_video_round_trip(tmp_path):
  pytest.importorskip("imageio_ffmpeg")
  path = tmp_path / "clip.mp4"
  levels = [0, 60, 120, 180, 240]
  with frames.VideoWriter(path, fps=10) as writer:
    for level in levels:
      writer.write(np.full((32, 48, 3), level, np.uint8))
  assert frames.is_video_file(path)
  assert frames.count_frames(path) == len(levels)
  decoded = list(frames.iter_frames(path))
  assert [f.shape for f in decoded] == [(32, 48, 3)] * len(levels)
  np.testing.assert_allclose([f.mean() for f in decoded], levels, atol=3)


def test_failed_video_leaves_no_file(tmp_path):
  pytest.importorskip("imageio_ffmpeg")
  path = tmp_path / "clip.mp4"
  with pytest.raises(ValueError, match="differs"):
    with frames.VideoWriter(path) as writer:
      writer.write(np.zeros((16, 16, 3), np.uint8))
      writer.write(np.zeros((8, 8, 3), np.uint8))
  assert list(tmp_path.iterdir()) == []


def test_to_uint8_scales_clips_and_rounds_half_to_even():
  unit = np.array([[[-0.5, 0.25, 1.5], [0.5 / 255, 1.5 / 255, 2.5 / 255]]], np.float32)
  np.testing.assert_array_equal(frames.to_uint8(unit), [[[0, 64, 255], [0, 2, 2]]])
  np.testing.assert_array_equal(frames.to_uint8(unit * 255, max_value=255.0),
                                [[[0, 64, 255], [0, 2, 2]]])
  np.testing.assert_array_equal(frames.to_uint8(np.float32([[[-3.5, 254.5, 255.5]]]),
                                                max_value=255.0), [[[0, 254, 255]]])
  as_uint8 = np.array([[[3, 4, 5]]], np.uint8)
  assert frames.to_uint8(as_uint8) is as_uint8


def test_to_uint8_stretches_each_frame():
  clip = np.float32([[[[-0.5, 0.25, 1.5]]], [[[0.2, 0.2, 0.2]]]])  # Two frames; one is flat.
  np.testing.assert_array_equal(frames.to_uint8(clip, stretch=True),
                                [[[[0, 96, 255]]], [[[0, 0, 0]]]])
  np.testing.assert_array_equal(frames.to_uint8(np.uint8([[[10, 20, 30]]]), stretch=True),
                                [[[0, 128, 255]]])
