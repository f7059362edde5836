"""TemCoCo forward pass and weight import/export against the reference golden vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax import models
from vidfusion_jax import weights
from vidfusion_jax.models import schedule
from vidfusion_jax.models import temcoco

ATOL = 1e-4


def _video(a) -> np.ndarray:
  """(B, T, H, W, C) -> the reference's (B, C, T, H, W)."""
  return np.asarray(a).transpose(0, 4, 1, 2, 3)


def _frames(a) -> np.ndarray:
  """(B, T, h, w, C) -> the reference's (B*T, C, h, w)."""
  a = np.asarray(a)
  return a.reshape(-1, *a.shape[2:]).transpose(0, 3, 1, 2)


def _channels_last(a: np.ndarray) -> np.ndarray:
  """Reference (B, T, C, H, W) input -> (B, T, H, W, C)."""
  return a.transpose(0, 1, 3, 4, 2)


def _assert_close(actual, expected, name, atol=ATOL):
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  err = float(np.abs(actual - expected).max())
  assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def golden_a(shared):
  with np.load(shared("golden/temcoco_a.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def state_dict(golden_a):
  return {k[len("param/"):]: v for k, v in golden_a.items() if k.startswith("param/")}


@pytest.fixture(scope="module")
def params(state_dict):
  return weights.from_torch_state_dict("temcoco", state_dict)


@pytest.fixture(scope="module", params=[schedule.CPU_MEMORY, schedule.PLAIN])
def apply_fn(request):
  """One jitted forward (with every module's output captured) per schedule, shared by the golden
  tests: both schedules must reproduce the reference."""
  model = temcoco.TemCoCo(schedule=request.param)
  return jax.jit(lambda p, ir, vis: model.apply({"params": p}, ir, vis,
                                                capture_intermediates=True))


def _run(apply_fn, params, z):
  out, state = apply_fn(params, _channels_last(z["input/ir"]), _channels_last(z["input/vis"]))
  calls = jax.tree_util.tree_map(np.asarray, state["intermediates"])
  return jax.tree_util.tree_map(np.asarray, out), calls


@pytest.fixture(scope="module")
def run_a(apply_fn, params, golden_a):
  return _run(apply_fn, params, golden_a)


@pytest.fixture(scope="module")
def run_b(apply_fn, params, shared):
  with np.load(shared("golden/temcoco_b.npz")) as z:
    golden = {k: z[k] for k in z.files}
  return golden, _run(apply_fn, params, golden)


def _check_outputs_and_activations(out, calls, z):
  _assert_close(_video(out["fusion"]), z["output/fused"], "fused")
  for stream in ("ir", "vi"):
    _assert_close(_frames(out[f"{stream}_seg"]), z[f"output/{stream}_feat/seg"], f"{stream}_seg")
    _assert_close(_video(out[f"{stream}_visual"]), z[f"output/{stream}_feat/visual"],
                  f"{stream}_visual")
  for enc in ("Enc_ir", "Enc_vis"):
    for i, f in enumerate(calls[enc]["__call__"][0]):
      _assert_close(_video(f), z[f"act/{enc}/f{i + 1}"], f"{enc}/f{i + 1}")
  heads = calls["SegBranchCombine"]["__call__"][0]
  _assert_close(_video(heads["feat"]), z["act/SegBranchCombine/feat"], "SegBranchCombine/feat")
  for name in ("ir_seg", "vi_seg"):
    _assert_close(_frames(heads[name]), z[f"act/SegBranchCombine/{name}"], name)
  for name in ("ir_visual", "vi_visual"):
    _assert_close(_video(heads[name]), z[f"act/SegBranchCombine/{name}"], name)
  enhanced, offsets = calls["DCN_1"]["__call__"][0]
  _assert_close(_video(enhanced), z["act/DCN_1/enhanced"], "DCN_1/enhanced")
  for t in range(enhanced.shape[1]):
    for n in (1, 2):
      _assert_close(offsets[n - 1][:, t].transpose(0, 3, 1, 2), z[f"act/DCN_1/offset_t{t}_{n}"],
                    f"DCN_1/offset_t{t}_{n}")
  _assert_close(_video(calls["DCN_2"]["__call__"][0][0]), z["act/DCN_2/enhanced"],
                "DCN_2/enhanced")
  _assert_close(_video(calls["dec"]["__call__"][0]), z["act/dec/out"], "dec")


def test_golden_a_outputs_and_activations(run_a, golden_a):
  """B=1, T=4, 64x64: every output and every stored top-level activation within 1e-4."""
  out, calls = run_a
  _check_outputs_and_activations(out, calls, golden_a)


def test_golden_a_debug_activations(run_a, shared):
  """Outputs of SegBranchCombine's children (branches, the three CombineAttn, combine, attn_temp)."""
  _, calls = run_a
  sub = calls["SegBranchCombine"]
  with np.load(shared("golden/temcoco_a_debug.npz")) as z:
    for branch in ("Branch_s1", "Branch_s2"):
      feature, seg = sub[branch]["__call__"][0]
      _assert_close(_video(feature), z[f"act_sub/SegBranchCombine.{branch}/0"], branch)
      _assert_close(_frames(seg), z[f"act_sub/SegBranchCombine.{branch}/1"], branch + " seg")
    for name in ("Branch_v1", "Branch_v2", "combine_seg", "combine_vis", "SegVisAttn"):
      for i, value in enumerate(sub[name]["__call__"][0]):
        _assert_close(_video(value), z[f"act_sub/SegBranchCombine.{name}/{i}"], f"{name}/{i}")
    for name in ("combine", "attn_temp"):
      _assert_close(_video(sub[name]["__call__"][0]), z[f"act_sub/SegBranchCombine.{name}/out"],
                    name)


def test_golden_b_odd_t_and_window_padding(run_b):
  """B=1, T=3, 48x80: odd T and 12x20 windows exercise the unmasked padding; frame 2 takes the
  neighbour path of the DCN."""
  golden, (out, calls) = run_b
  _check_outputs_and_activations(out, calls, golden)


def test_state_dict_round_trip_is_exact(params, state_dict):
  exported = weights.to_torch_state_dict("temcoco", params)
  assert sorted(exported) == sorted(state_dict)
  for name, value in state_dict.items():
    assert exported[name].dtype == value.dtype, name
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  n_float = sum(v.size for k, v in exported.items() if v.dtype == np.float32)
  assert n_float == 19_213_417  # the reference's trainable parameter count


def test_import_names_every_problem(state_dict):
  broken = dict(state_dict)
  del broken["DCN_2.dconv_1.weight"]
  del broken["SegBranchCombine.SegVisAttn.blocks_CAy.attn.relative_position_index"]
  broken["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as info:
    weights.from_torch_state_dict("temcoco", broken)
  message = str(info.value)
  assert "'DCN_2.dconv_1.weight'" in message
  assert "'SegBranchCombine.SegVisAttn.blocks_CAy.attn.relative_position_index'" in message
  assert "unexpected tensors: 'extra.weight'" in message
  misshaped = dict(state_dict)
  misshaped["SegBranchCombine.Branch_s1.up.weight"] = np.zeros((128, 1024, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"'SegBranchCombine.Branch_s1.up.weight' has shape "
                     r"\(128, 1024, 3, 3\).*expects \(1024, 128, 3, 3\)"):
    weights.from_torch_state_dict("temcoco", misshaped)


def test_import_checks_relative_position_index(state_dict):
  name = "SegBranchCombine.combine_seg.blocks_CAx.attn.relative_position_index"
  np.testing.assert_array_equal(state_dict[name], temcoco.relative_position_index())
  tampered = dict(state_dict)
  tampered[name] = state_dict[name][::-1].copy()
  with pytest.raises(ValueError, match="relative_position_index"):
    weights.from_torch_state_dict("temcoco", tampered)


def test_reference_config_and_size_checks():
  assert isinstance(models.from_reference_config("temcoco", {"n_feat": 32}), temcoco.TemCoCo)
  with pytest.raises(ValueError, match="only n_feat=32"):
    models.from_reference_config("temcoco", {"n_feat": 64})
  with pytest.raises(ValueError, match="unknown TemCoCo constructor"):
    models.from_reference_config("temcoco", {"num_features": 32})
  with pytest.raises(ValueError, match="unknown TemCoCo overrides"):
    models.from_reference_config("temcoco", {}, heads=3)
  x = jnp.zeros((1, 1, 16, 16, 3))
  with pytest.raises(ValueError, match="TemCoCo.schedule must be"):
    jax.eval_shape(temcoco.TemCoCo(schedule="auto").init, jax.random.key(0), x, x)
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    jax.eval_shape(temcoco.TemCoCo(remat_policy="some").init, jax.random.key(0), x, x)
  for shape in [(1, 2, 24, 32, 3), (1, 2, 32, 40, 3), (1, 0, 32, 32, 3), (1, 2, 32, 32, 1),
                (2, 32, 32, 3)]:
    x = jnp.zeros(shape)
    with pytest.raises(ValueError):
      temcoco.check_input_shapes(x, x)
  with pytest.raises(ValueError, match="same shape"):
    temcoco.check_input_shapes(jnp.zeros((1, 1, 16, 16, 3)), jnp.zeros((1, 2, 16, 16, 3)))


def test_neighbour_frames_match_reference_rule():
  idx1, idx2 = temcoco.neighbour_frames(5)
  np.testing.assert_array_equal(idx1, [0, 1, 1, 2, 3])
  np.testing.assert_array_equal(idx2, [0, 1, 0, 1, 2])


def test_bfloat16_and_remat_keep_params_and_outputs(params):
  """dtype=bfloat16 computes in bf16 with float32 params; remat (with a named policy, as
  `objectives.build_model` passes it) changes neither names nor values."""
  x = jax.random.uniform(jax.random.key(0), (1, 2, 16, 16, 3))
  reference = temcoco.TemCoCo()
  fast = models.from_reference_config("temcoco", {"n_feat": 32}, dtype=jnp.bfloat16, remat=True,
                                      remat_policy="dots")
  shapes = jax.eval_shape(fast.init, jax.random.key(0), x, x)["params"]
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
  assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(shapes))
  want = jax.jit(reference.apply)({"params": params}, x, x)["fusion"]
  got = jax.jit(fast.apply)({"params": params}, x, x)["fusion"]
  assert got.dtype == jnp.bfloat16
  err = float(jnp.abs(got.astype(jnp.float32) - want).max())
  assert err < 0.01 * float(jnp.abs(want).max()) + 1e-3, err  # measured: 8e-4 of max 0.2
