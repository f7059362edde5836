"""The evaluate command on real M3SVD frames: tables, plots, profiles and input checks."""

import csv
import json

import numpy as np
import pytest

from vidfusion_jax import evaluate, frames, metrics

FRAMES = 3


@pytest.fixture(scope="module")
def clip(shared, tmp_path_factory):
  """IR/VIS folders of M3SVD 0111_1716 and two fused methods (mean, max) of its first frames."""
  root = shared("data/m3svd_mini")
  ir_dir, vis_dir = root / "infrared_Enhance" / "0111_1716", root / "visible_Enhance" / "0111_1716"
  ir = [frames.read_frame(p) for p in frames.list_frame_files(ir_dir)[:FRAMES]]
  vis = [frames.read_frame(p) for p in frames.list_frame_files(vis_dir)[:FRAMES]]
  tmp = tmp_path_factory.mktemp("fused")
  fused = {"mean": [((a.astype(int) + b) // 2).astype(np.uint8) for a, b in zip(ir, vis)],
           "max": [np.maximum(a, b) for a, b in zip(ir, vis)]}
  for name, video in fused.items():
    for i, frame in enumerate(video):
      frames.write_png(tmp / name / f"{i:04d}.png", frame)
  return {"ir_dir": ir_dir, "vis_dir": vis_dir, "ir": ir, "vis": vis, "fused": fused, "tmp": tmp}


def test_evaluate_writes_tables_plots_and_profiles(clip, tmp_path, capsys):
  out = tmp_path / "report"
  code = evaluate.main([f"--ir={clip['ir_dir']}", f"--vis={clip['vis_dir']}",
                        f"--fused=mean={clip['tmp'] / 'mean'}", "--fused",
                        f"max={clip['tmp'] / 'max'}", f"--output={out}",
                        f"--max_frames={FRAMES}"])
  assert code == 0
  assert "farneback" in capsys.readouterr().out
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary) == ["mean", "max"]
  with open(out / "per_frame.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], int(r["frame"])) for r in rows] == [
      (m, t) for m in ("mean", "max") for t in range(FRAMES)]
  with open(out / "summary.csv") as f:
    summary_rows = list(csv.DictReader(f))
  markdown = (out / "summary.md").read_text().splitlines()
  assert markdown[0].startswith("| method | frames | EN |") and len(markdown) == 4
  for method, video in clip["fused"].items():
    expected = metrics.compute(np.stack(video), np.stack(clip["ir"]), np.stack(clip["vis"]))
    temporal = metrics.temporal_metrics(video, clip["ir"], clip["vis"])
    method_rows = [r for r in rows if r["method"] == method]
    table_row = next(r for r in summary_rows if r["method"] == method)
    assert summary[method]["frames"] == FRAMES
    assert summary[method]["flow_backend"] == table_row["flow_backend"] == (
        "farneback (not comparable with published tables)")
    assert summary[method]["protocol"] == table_row["protocol"] == "project"
    for name in metrics.METRIC_NAMES:
      per_frame = np.asarray(expected[name], np.float64)
      np.testing.assert_allclose([float(r[name]) for r in method_rows], per_frame, rtol=1e-6)
      np.testing.assert_allclose(summary[method][name], per_frame.mean(), rtol=1e-6)
      np.testing.assert_allclose(float(table_row[name]), per_frame.mean(), rtol=1e-6)
    for name in metrics.TEMPORAL_METRIC_NAMES:
      np.testing.assert_allclose(summary[method][name], temporal.values[name], rtol=1e-6)
      np.testing.assert_allclose([float(r[name]) for r in method_rows],
                                 temporal.per_frame[name], rtol=1e-6)
    profile = frames.read_frame(out / "profiles" / f"{method}.png")
    column = video[0].shape[1] // 2
    np.testing.assert_array_equal(profile, np.stack([v[:, column] for v in video], axis=1))
  for name in (*metrics.METRIC_NAMES, *metrics.TEMPORAL_METRIC_NAMES):
    plot = (out / "curves" / f"{name}.png").read_bytes()
    assert plot.startswith(b"\x89PNG") and len(plot) > 5000


def test_evaluate_rejects_mismatched_inputs(clip, tmp_path, capsys):
  base = [f"--ir={clip['ir_dir']}", f"--vis={clip['vis_dir']}", f"--output={tmp_path / 'o'}"]
  # 3 fused frames against 20 source frames: counts differ (and --max_frames 5 asks for more).
  for extra in ([], ["--max_frames=5"]):
    assert evaluate.main(base + [f"--fused=mean={clip['tmp'] / 'mean'}", *extra]) == 2
    assert "frame counts differ" in capsys.readouterr().err
  small = tmp_path / "small"
  for i, frame in enumerate(clip["fused"]["mean"]):
    frames.write_png(small / f"{i:04d}.png", frame[:240, :320])
  assert evaluate.main(base + [f"--fused=small={small}", "--max_frames=2"]) == 2
  assert "sizes differ" in capsys.readouterr().err
  assert evaluate.main(base + ["--fused=a b=/nowhere"]) == 2
  assert "NAME may hold only" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    evaluate.main(base + [f"--fused=mean={clip['tmp'] / 'mean'}", "--metrics=EN,LPIPS"])
  assert "unknown metrics" in capsys.readouterr().err
