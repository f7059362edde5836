"""VF-Bench's BiSWE and MS2R protocol against the reference's per-frame values (golden), from the
stored flows and from the Flax SEA-RAFT."""

import json

import numpy as np
import pytest

from vidfusion_jax import models, weights
from vidfusion_jax.metrics import flow as flow_lib
from vidfusion_jax.metrics import temporal


@pytest.fixture(scope="module")
def golden(shared):
  return np.load(shared("golden/vfbench_temporal.npz"))


class StoredFlows:
  """flow_fn answering from the golden file's flows (looked up by frame content); records calls."""

  def __init__(self, golden):
    self.table, self.calls = {}, []
    for stream in ("fused", "ir", "vis"):
      video = golden[f"input/{stream}"]
      for key in golden.files:
        if key.startswith(f"flow/{stream}/"):
          a, b = map(int, key.rsplit("/", 1)[1].split("_"))
          self.table[(video[a].tobytes(), video[b].tobytes())] = golden[key]

  def __call__(self, frames_a, frames_b):
    self.calls.append(len(frames_a))
    return np.stack([self.table[(a.tobytes(), b.tobytes())] for a, b in zip(frames_a, frames_b)])


def _assert_matches_reference(result, golden, rtol):
  for name in ("BiSWE", "MS2R"):
    assert result[name].shape == (5,)
    np.testing.assert_allclose(result[name], golden[name], rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(result["BiSWE"].mean(), golden["mean/BiSWE"], rtol=rtol)
  np.testing.assert_allclose(result["MS2R"].mean(), golden["mean/MS2R"], rtol=rtol)


@pytest.mark.parametrize("ir_key", ["input/ir", "input/ir_gray"])
def test_per_frame_values_from_the_reference_flows(golden, ir_key):
  flow_fn = StoredFlows(golden)
  result = temporal.vfbench_temporal(golden["input/fused"], golden[ir_key], golden["input/vis"],
                                     flow_fn, batch_size=7)
  assert flow_fn.calls == [7, 7, 7, 7, 7]  # 30 distinct flows (6T), the last call padded
  _assert_matches_reference(result, golden, 1e-5)
  for part in ("err_prev", "err_next"):
    np.testing.assert_allclose(result[part], golden[f"biswe/{part}"], rtol=1e-5)
  for part in ("d_ir", "d_vis"):
    np.testing.assert_allclose(result[part], golden[f"ms2r/{part}"], rtol=1e-5)
  for side in ("prev", "next"):
    np.testing.assert_array_equal(result[f"mask_{side}"], golden[f"mask/{side}"])


def test_every_reference_flow_is_requested_exactly_once(golden):
  assert set(temporal.vfbench_flow_pairs(5)) == {
      tuple(map(int, k.rsplit("/", 1)[1].split("_"))) for k in golden.files
      if k.startswith("flow/ir/")}
  assert len(temporal.vfbench_flow_pairs(20)) == 40 and temporal.vfbench_flow_pairs(1) == [(0, 0)]


def test_protocol_details_move_the_numbers(golden):
  """Rounding is half to even and unclipped; a changed neighbour frame changes only its frames."""
  flow_fn = StoredFlows(golden)
  fused = golden["input/fused"]
  base = temporal.vfbench_temporal(fused, golden["input/ir"], golden["input/vis"], flow_fn)
  shifted = temporal.vfbench_temporal(fused + 0.4, golden["input/ir"] - 0.4, golden["input/vis"],
                                      flow_fn)
  np.testing.assert_array_equal(shifted["BiSWE"], base["BiSWE"])
  bright = fused.copy()
  bright[4] = bright[4] + 30
  with pytest.raises(KeyError):  # the flows of frame 4 are new frames: the table has none
    temporal.vfbench_temporal(bright, golden["input/ir"], golden["input/vis"], flow_fn)


def test_input_validation(golden):
  fused, ir, vis = golden["input/fused"], golden["input/ir"], golden["input/vis"]
  with pytest.raises(ValueError, match="vis must be"):
    temporal.vfbench_temporal(fused, ir, vis[:4], StoredFlows(golden))
  with pytest.raises(ValueError, match="fused must be"):
    temporal.vfbench_temporal(fused[..., 0], ir, vis, StoredFlows(golden))
  with pytest.raises(ValueError, match="flow_fn returned shape"):
    temporal.vfbench_temporal(fused, ir, vis, lambda a, b: np.zeros(a.shape[:3] + (3,)))


@pytest.mark.slow
def test_per_frame_values_with_the_flax_sea_raft(shared, golden):
  network = np.load(shared("golden/searaft_s.npz"))
  assert str(network["meta/weights_sha256"]) == str(golden["meta/weights_sha256"])
  flow = flow_lib.SeaRaftFlow(*sea_raft_module(network))
  result = temporal.vfbench_temporal(golden["input/fused"], golden["input/ir_gray"],
                                     golden["input/vis"], flow, batch_size=10)
  _assert_matches_reference(result, golden, 1e-3)
  single = flow(golden["input/ir_gray"][0], golden["input/ir_gray"][1])  # gray -> RGB
  np.testing.assert_allclose(single, golden["flow/ir/0_1"], atol=5e-6)


def test_temcoco_flowd_follows_the_released_flow_direction_and_size():
  rng = np.random.default_rng(3)
  base = rng.uniform(0, 255, (30, 40, 3)).astype(np.float32)
  # Content moves by (+2, +1) px per frame: F_t(x) = F_{t-1}(x - (2, 1)).
  video = np.stack([np.roll(base, (t, 2 * t), (0, 1)) for t in range(3)])
  seen = []

  def flow_fn(a, b):  # the forward flow of VIS_{t-1} -> VIS_t, at the resized size
    seen.append((a.shape, np.array_equal(a[0], b[0])))
    field = np.zeros(a.shape[:3] + (2,), np.float32)
    return field + np.array([2 * 960 / 40, 1 * 432 / 30], np.float32)

  values = temporal.temcoco_flowd(video, video, flow_fn, batch_size=2)
  assert seen == [((2, 432, 960, 3), False)]
  assert values.shape == (2,)
  warped = np.stack([np.roll(video[t], (1, 2), (0, 1)) for t in range(2)])
  shift_back = lambda frame: frame[np.clip(np.arange(30) - 1, 0, 29)][:, np.clip(np.arange(40) - 2,
                                                                              0, 39)]
  warped = np.stack([shift_back(video[t]) for t in range(2)])  # F_{t-1}(x - (2, 1)), border clamped
  expected = np.sqrt(np.sum((video[1:] - warped) ** 2, -1))
  assert np.all(expected[:, 1:, 2:] == 0)  # exact alignment away from the clamped border
  np.testing.assert_allclose(values, expected.mean((1, 2)), rtol=1e-5)
  gray = temporal.temcoco_flowd(video[..., 0], video, lambda a, b: np.zeros(
      a.shape[:3] + (2,), np.float32) + np.array([2, 1], np.float32), flow_size=None)
  np.testing.assert_allclose(gray, np.abs(video[1:, ..., 0] - warped[..., 0]).mean((1, 2)),
                             rtol=1e-5)


@pytest.fixture(scope="module")
def split_dataset(golden, tmp_path_factory):
  """A VTMOT-style dataset root with one sequence listed by a split CSV (5 golden frames, cropped
  to 40x48), and the mean-fused video of it as a frame folder."""
  from vidfusion_jax import frames  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("vtmot")
  ir, vis = (golden[f"input/{k}"][:, :40, :48].astype(np.uint8) for k in ("ir", "vis"))
  rows = ["ir,rgb"]
  for t in range(5):
    frames.write_png(root / "seq-01" / "infrared" / f"{t:06d}.png", ir[t])
    frames.write_png(root / "seq-01" / "visible" / f"{t:06d}.png", vis[t])
    rows.append(f"infrared/{t:06d}.png,visible/{t:06d}.png")
  (root / "seq-01.csv").write_text("\n".join(rows) + "\n")
  fused = np.round(0.5 * ir.astype(np.float32) + 0.5 * vis).astype(np.uint8)
  for t in range(5):
    frames.write_png(root / "fused" / f"{t:04d}.png", fused[t])
  return {"root": root, "ir": ir, "vis": vis, "fused": fused}


def _read_per_frame(out, name):
  import csv  # pylint: disable=import-outside-toplevel
  with open(out / "per_frame.csv") as f:
    return np.array([float(r[name]) for r in csv.DictReader(f)])


def test_evaluate_vfbench_protocol_on_a_split_csv(split_dataset, tmp_path, capsys):
  from vidfusion_jax import evaluate  # pylint: disable=import-outside-toplevel
  data, out = split_dataset, tmp_path / "report"
  args = [f"--split={data['root'] / 'seq-01.csv'}", f"--split_root={data['root']}",
          f"--fused=mean={data['root'] / 'fused'}", f"--output={out}", "--metrics=none",
          "--temporal=BiSWE,MS2R,flowD", "--protocol=vfbench", "--flow=zero", "--flow_batch=3"]
  assert evaluate.main(args) == 0
  assert "vfbench protocol" in capsys.readouterr().out
  zero = lambda a, b: np.zeros(a.shape[:3] + (2,), np.float32)
  expected = temporal.vfbench_temporal(data["fused"], data["ir"], data["vis"], zero)
  np.testing.assert_allclose(_read_per_frame(out, "BiSWE"), expected["BiSWE"], rtol=1e-6)
  np.testing.assert_allclose(_read_per_frame(out, "MS2R"), expected["MS2R"], rtol=1e-6)
  flowd = temporal.temcoco_flowd(data["fused"], data["vis"], zero)
  np.testing.assert_allclose(_read_per_frame(out, "flowD")[1:], flowd, rtol=1e-6)
  summary = json.loads((out / "summary.json").read_text())["mean"]
  assert summary["protocol"] == "vfbench"
  assert summary["flow_backend"] == "zero (not comparable with published tables)"
  np.testing.assert_allclose(summary["BiSWE"], expected["BiSWE"].mean(), rtol=1e-6)
  assert evaluate.main(args + [f"--ir={data['root']}"]) == 2
  assert "--split replaces --ir" in capsys.readouterr().err
  (data["root"] / "bad.csv").write_text("infrared,visible\na.png,b.png\n")
  assert evaluate.main([*args[1:], f"--split={data['root'] / 'bad.csv'}"]) == 2
  assert "must name the columns 'ir' and 'rgb'" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_with_a_sea_raft_checkpoint(shared, split_dataset, tmp_path, capsys):
  """--flow=sea_raft:CKPT:S end to end on 40x48 frames (below the reference's 121 px minimum)."""
  import torch  # pylint: disable=import-outside-toplevel
  from vidfusion_jax import evaluate  # pylint: disable=import-outside-toplevel
  network = np.load(shared("golden/searaft_s.npz"))
  checkpoint = tmp_path / "random-S.pth"
  torch.save({k.removeprefix("state_dict/"): torch.from_numpy(np.array(network[k]))
              for k in network.files if k.startswith("state_dict/")}, checkpoint)
  data, out = split_dataset, tmp_path / "report"
  assert evaluate.main([f"--split={data['root'] / 'seq-01.csv'}", f"--split_root={data['root']}",
                        f"--fused=mean={data['root'] / 'fused'}", f"--output={out}",
                        "--metrics=none", "--temporal=BiSWE,MS2R", "--protocol=vfbench",
                        f"--flow=sea_raft:{checkpoint}:S", "--flow_batch=10"]) == 0
  capsys.readouterr()
  summary = json.loads((out / "summary.json").read_text())["mean"]
  assert summary["flow_backend"] == "sea_raft:random-S.pth:S"
  flow = flow_lib.SeaRaftFlow(*sea_raft_module(network))
  expected = temporal.vfbench_temporal(data["fused"], data["ir"], data["vis"], flow.batched, 10)
  np.testing.assert_allclose(_read_per_frame(out, "BiSWE"), expected["BiSWE"], rtol=1e-5)
  np.testing.assert_allclose(_read_per_frame(out, "MS2R"), expected["MS2R"], rtol=1e-5)


def sea_raft_module(network):
  model = models.from_reference_config("sea_raft", json.loads(str(network["config_json"])))
  return model, weights.from_torch_state_dict("sea_raft", {
      k.removeprefix("state_dict/"): network[k] for k in network.files
      if k.startswith("state_dict/")})
