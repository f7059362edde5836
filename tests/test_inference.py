"""Windowing, padding, blending and streaming of `vidfusion_jax.inference.Fuser`.

Uses small stand-in flax modules, so every expected value is computed independently by applying
the module to the exact window the fuser should have used.
"""

import itertools
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax import host_memory, inference
from vidfusion_jax.inference import Fuser, InputSpec, WindowSettings


class WindowMixer(nn.Module):
  """Spatial 3x3 conv per frame plus the window's temporal mean: output depends on the window.

  Like the real networks, it refuses heights/widths that are not multiples of `multiple`.
  """
  multiple: int = 4

  @nn.compact
  def __call__(self, ir, vis):
    if ir.shape[2] % self.multiple or ir.shape[3] % self.multiple:
      raise ValueError(f"bad spatial shape {ir.shape}")
    x = jnp.concatenate([ir, vis], axis=-1)
    frames = nn.Conv(3, (3, 3), name="conv")(x.reshape((-1,) + x.shape[2:]))
    frames = frames.reshape(x.shape[:-1] + (3,))
    return {"fusion": frames + 0.5 * frames.mean(axis=1, keepdims=True)}


SPEC = InputSpec(spatial_multiple=4, min_frames=2)


@pytest.fixture(scope="module")
def mixer():
  module = WindowMixer()
  params = module.init(jax.random.key(0), jnp.zeros((1, 2, 4, 4, 3)), jnp.zeros((1, 2, 4, 4, 3)))
  return module, params["params"]


def _clip(num_frames, height, width, seed):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8),
          rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8))


def _apply(module, params, ir, vis):
  """The module on one window of uint8 frames: (T, H, W, 3) -> (T, H, W, 3) float."""
  out = module.apply({"params": params}, ir[None] / np.float32(255), vis[None] / np.float32(255))
  return np.asarray(out["fusion"][0])


def _fuser(mixer, **kwargs):
  module, params = mixer
  windows = WindowSettings(kwargs.pop("window", 4), kwargs.pop("overlap", 0),
                           kwargs.pop("blend", "linear"))
  return Fuser.from_module(module, params, SPEC, windows, **kwargs)


@pytest.mark.parametrize("num_frames", range(0, 26))
def test_plan_covers_every_frame(num_frames):
  for window, overlap in itertools.product(range(1, 9), range(0, 8)):
    if overlap >= window:
      continue
    plan = inference.plan_windows(num_frames, window, overlap)
    covered = np.zeros(num_frames, int)
    for start, stop in plan:
      assert 0 <= start < stop <= num_frames
      assert stop - start == min(window, num_frames)
      covered[start:stop] += 1
    assert (covered >= 1).all()
    assert [s for s, _ in plan] == sorted({s for s, _ in plan})  # Strictly increasing starts.
    for (start_a, stop_a), (start_b, _) in zip(plan[:-1], plan[1:-1]):
      assert stop_a - start_b == overlap  # Regular windows share exactly `overlap` frames.
    if len(plan) > 1:
      assert plan[-1][1] == num_frames and plan[-2][1] < num_frames


def test_plan_matches_reference_split():
  # specs/videofusion.md section 9: 20 frames, 7 per window, no overlap.
  assert inference.plan_windows(20, 7, 0) == [(0, 7), (7, 14), (13, 20)]
  assert inference.plan_windows(21, 7, 0) == [(0, 7), (7, 14), (14, 21)]
  assert inference.plan_windows(5, 7, 2) == [(0, 5)]
  with pytest.raises(ValueError, match="overlap < window"):
    inference.plan_windows(10, 4, 4)


def test_lazy_plan_reads_at_most_one_stride_past_the_window_it_yields():
  requested = []

  def available(k):
    requested.append(k)
    return min(k, 23)

  plan = list(inference.iter_windows(5, 1, lambda k: min(k, 23)))
  for start, stop in inference.iter_windows(5, 1, available):
    assert (start, stop) == plan.pop(0)
    assert max(requested) <= stop + 4


def test_blend_weights():
  np.testing.assert_allclose(inference.blend_weights(5, 2), [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
  np.testing.assert_array_equal(inference.blend_weights(4, 0), np.ones(4))


def test_linear_blend_equals_weighted_windows(mixer):
  module, params = mixer
  ir, vis = _clip(8, 8, 12, seed=1)
  fused = _fuser(mixer, window=5, overlap=2).fuse(ir, vis)
  first = _apply(module, params, ir[0:5], vis[0:5])  # Windows (0, 5) and (3, 8).
  second = _apply(module, params, ir[3:8], vis[3:8])
  expected = np.concatenate([
      first[:3],
      (2 / 3 * first[3:4] + 1 / 3 * second[0:1]),
      (1 / 3 * first[4:5] + 2 / 3 * second[1:2]),
      second[2:]])
  assert fused.shape == (8, 8, 12, 3) and fused.dtype == np.float32
  np.testing.assert_allclose(fused, expected, atol=1e-5)


def _compilations() -> int:
  return inference._compile_step.cache_info().misses  # pylint: disable=protected-access


@pytest.mark.parametrize("num_frames,window,overlap,per_call", [
    (20, 7, 0, 1), (11, 4, 1, 3), (9, 3, 2, 2), (3, 6, 2, 2)])
def test_last_blend_keeps_the_last_window_of_each_frame(mixer, num_frames, window, overlap,
                                                        per_call):
  module, params = mixer
  ir, vis = _clip(num_frames, 8, 8, seed=num_frames)
  fuser = _fuser(mixer, window=window, overlap=overlap, blend="last", windows_per_call=per_call)
  compiled_before = _compilations()
  fused = fuser.fuse(ir, vis)
  expected = np.zeros_like(fused)
  for start, stop in inference.plan_windows(num_frames, window, overlap):
    expected[start:stop] = _apply(module, params, ir[start:stop], vis[start:stop])
  np.testing.assert_allclose(fused, expected, atol=1e-5)
  assert _compilations() - compiled_before <= 1


def test_windows_per_call_and_dtypes_do_not_change_the_result(mixer):
  ir, vis = _clip(13, 8, 8, seed=3)
  one = _fuser(mixer, window=4, overlap=1).fuse(ir, vis)
  batched = _fuser(mixer, window=4, overlap=1, windows_per_call=3).fuse(ir, vis)
  floats = _fuser(mixer, window=4, overlap=1).fuse(ir / np.float32(255), vis.astype(np.float64)
                                                   / 255)
  np.testing.assert_allclose(batched, one, atol=1e-6)
  np.testing.assert_allclose(floats, one, atol=1e-6)


def test_odd_frame_size_is_reflect_padded_and_cropped(mixer):
  module, params = mixer
  ir, vis = _clip(3, 10, 13, seed=4)
  fused = _fuser(mixer, window=3).fuse(ir, vis)
  pad = ((0, 0), (0, 2), (0, 3), (0, 0))
  expected = _apply(module, params, np.pad(ir, pad, mode="reflect"),
                    np.pad(vis, pad, mode="reflect"))[:, :10, :13]
  assert fused.shape == (3, 10, 13, 3)
  np.testing.assert_allclose(fused, expected, atol=1e-5)


def test_gray_inputs_and_clips_shorter_than_min_frames(mixer):
  module, params = mixer
  ir, vis = _clip(1, 4, 8, seed=5)
  fused = _fuser(mixer, window=4).fuse(ir[..., 0], vis[..., :1])  # (T, H, W) and (T, H, W, 1).
  gray_ir = np.repeat(ir[..., :1], 3, -1)
  gray_vis = np.repeat(vis[..., :1], 3, -1)
  expected = _apply(module, params, np.repeat(gray_ir, 2, 0), np.repeat(gray_vis, 2, 0))[:1]
  assert fused.shape == (1, 4, 8, 3)
  np.testing.assert_allclose(fused, expected, atol=1e-5)


def test_stream_memory_is_bounded_by_the_windows(mixer):
  ir, vis = _clip(1, 8, 8, seed=6)
  pulled = 0

  def frames(source):
    nonlocal pulled
    for _ in range(60):
      pulled += 1
      yield source[0]

  fuser = _fuser(mixer, window=4, overlap=1, windows_per_call=2)
  emitted = 0
  for _ in fuser.fuse_stream(frames(ir), frames(vis)):
    emitted += 1
    assert pulled // 2 - emitted <= (2 + 1) * 4  # Frames held: about (per_call + 1) windows.
  assert emitted == 60


def test_mismatched_inputs(mixer):
  fuser = _fuser(mixer, window=4)
  ir, vis = _clip(6, 8, 8, seed=7)
  with pytest.raises(ValueError, match="visible input has 5 frames.*truncate"):
    fuser.fuse(ir, vis[:5])
  assert fuser.fuse(ir, vis[:5], truncate=True).shape == (5, 8, 8, 3)
  with pytest.raises(ValueError, match="visible frame 0 is 8x4 but the infrared frames are 8x8"):
    fuser.fuse(ir, vis[:, :4, :16])
  module, params = mixer
  small = np.ascontiguousarray(vis[:, ::2, ::2])
  resized = fuser.fuse(ir[:4], small[:4], resize=True)
  import cv2  # pylint: disable=import-outside-toplevel
  upscaled = np.stack([cv2.resize(f, (8, 8), interpolation=cv2.INTER_LINEAR) for f in small[:4]])
  np.testing.assert_allclose(resized, _apply(module, params, ir[:4], upscaled), atol=1e-5)
  with pytest.raises(ValueError, match=r"\(H, W\), \(H, W, 1\) or \(H, W, 3\)"):
    fuser.fuse(np.zeros((2, 8, 8, 2)), np.zeros((2, 8, 8, 2)))
  with pytest.raises(ValueError, match="need window >= 2"):
    _fuser(mixer, window=1)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_host_memory_tuning_reaches_glibc():
  assert host_memory.return_large_blocks_to_os(1 << 20)
  host_memory.release_freed_memory()
