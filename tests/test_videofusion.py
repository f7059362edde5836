"""VideoFusion port against the PyTorch golden vectors (../shared/golden/videofusion_{a,b}.npz).

The parity tests run in every schedule of `models.schedule` ("cpu_memory" and "plain").
"""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidfusion_jax import losses, weights
from vidfusion_jax.models import VideoFusion, from_reference_config
from vidfusion_jax.models import layers
from vidfusion_jax.models import schedule as schedule_lib
from vidfusion_jax.models.layers import LayerNorm, conv2d_nhwc, depthwise_conv3x3, pointwise_conv
from vidfusion_jax.models.layers import _pointwise as einsum_pointwise  # the plain schedule's
from vidfusion_jax.models.videofusion import capture_top_level

OFFICIAL_CONFIG = {
    "type": "VideoFusion_Trans", "in_channels": 3, "out_channels": 3, "num_features": 32,
    "num_blocks": [2, 2, 4], "num_decoder_blocks": 2, "num_heads": [2, 4, 8],
    "ffn_expansion_factor": 1, "bias": False, "LayerNorm_type": "WithBias", "embed_dim": 32,
    "groups": [4, 8, 16]}
# bf16 compute vs float32 on the golden inputs (measured: max 2.2e-3, mean 3.5e-4); see docs/models.md.
BF16_MAX_ABS, BF16_MEAN_ABS = 1e-2, 1e-3


def nthwc(x: np.ndarray) -> jnp.ndarray:
  """Golden (B, T, C, H, W) -> NTHWC."""
  return jnp.asarray(x.transpose(0, 1, 3, 4, 2))


def to_torch_layout(key: str, x: np.ndarray) -> np.ndarray:
  """One of our activations in the golden file's layout for `act/<key>`."""
  if key.startswith("conv3d"):  # (B, T, H, W, C) -> (B, C, T, H, W)
    return x.transpose(0, 4, 1, 2, 3)
  if x.ndim == 5:  # (B, T, H, W, C) -> (B, T, C, H, W)
    return x.transpose(0, 1, 4, 2, 3)
  return x.transpose(0, 3, 1, 2)  # (B*T, H, W, C) -> (B*T, C, H, W)


class Golden:
  """One golden file, its model and imported params."""

  def __init__(self, path):
    with np.load(path) as z:
      self.z = {k: z[k] for k in z.files}
    self.config = json.loads(str(self.z["meta/config_json"]))
    self.state_dict = {k[6:]: v for k, v in self.z.items() if k.startswith("param/")}
    self.params = weights.from_torch_state_dict("videofusion", self.state_dict)
    self.model = from_reference_config("videofusion", self.config)
    self.ir, self.vi = nthwc(self.z["input/ir"]), nthwc(self.z["input/vi"])
    self.gt_ir, self.gt_vi = nthwc(self.z["loss_input/gt_ir"]), nthwc(self.z["loss_input/gt_vi"])

  def forward_and_loss(self, params, schedule):
    outputs, state = self.model.clone(schedule=schedule).apply(
        {"params": params}, self.ir, self.vi, capture_intermediates=capture_top_level,
        mutable=["intermediates"])
    total, terms = losses.videofusion_loss(outputs, self.gt_ir, self.gt_vi)
    return total, (outputs, terms, state["intermediates"])


@pytest.fixture(scope="module", params=["a", "b"])
def golden(request, shared):
  return Golden(shared(f"golden/videofusion_{request.param}.npz"))


# "cpu_memory" is the CPU default; "plain" (the accelerators' schedule) compiles the network again.
@pytest.fixture(scope="module", params=[schedule_lib.CPU_MEMORY, schedule_lib.PLAIN])
def schedule(request):
  return request.param


@pytest.fixture(scope="module")
def results(golden, schedule):
  """Outputs, loss terms, activations (and for file a, grads): one compiled call per file and
  schedule."""
  forward_and_loss = functools.partial(golden.forward_and_loss, schedule=schedule)
  if "grad_meta/total_norm" in golden.z:
    (_, aux), grads = jax.jit(jax.value_and_grad(forward_and_loss, has_aux=True))(golden.params)
  else:
    _, aux = jax.jit(forward_and_loss)(golden.params)
    grads = None
  outputs, terms, intermediates = jax.device_get(aux)
  return outputs, terms, intermediates, jax.device_get(grads)


def test_outputs_match_reference(golden, results):
  outputs = results[0]
  assert set(outputs) == {"fusion", "ir", "vi"}
  for key, value in outputs.items():
    np.testing.assert_allclose(to_torch_layout(key, value), golden.z[f"output/{key}"], rtol=0,
                               atol=1e-5, err_msg=key)


def test_every_activation_matches_reference(golden, results):
  intermediates = results[2]
  act_keys = sorted(k[4:] for k in golden.z if k.startswith("act/"))
  checked = set()
  for key in act_keys:
    if key.startswith("Tanh"):  # act/Tanh, Tanh#1, Tanh#2: tanh of the fusion, ir, vi decoders.
      child = {"Tanh": "decoder_fusion", "Tanh#1": "decoder_ir", "Tanh#2": "decoder_vi"}[key]
      ours = np.tanh(intermediates[child]["__call__"][0])
      ours = ours.reshape(golden.ir.shape[:2] + ours.shape[1:])
    elif key.startswith("decomposition/"):
      ours = intermediates["decomposition"]["__call__"][0][int(key[-1])]
    else:
      ours = intermediates[key]["__call__"][0]
    np.testing.assert_allclose(to_torch_layout(key, np.asarray(ours)), golden.z[f"act/{key}"],
                               rtol=0, atol=1e-5, err_msg=key)
    checked.add(key)
  assert len(checked) == len(act_keys) == 40


def test_loss_terms_match_reference(golden, results):
  terms = results[1]
  loss_keys = {k[5:] for k in golden.z if k.startswith("loss/")}
  assert set(terms) == loss_keys
  for key in loss_keys:
    np.testing.assert_allclose(terms[key], golden.z[f"loss/{key}"], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("golden", ["a"], indirect=True)  # only file a stores gradients
def test_gradients_match_reference(golden, results):
  """Every gradient within rtol 1e-3 / atol 1e-7 of PyTorch's.

  The only allowed exceptions are entries at float32's cancellation floor: a gradient entry that is
  a sum of many terms can end far below the tensor's scale (e.g. 2.8e-5 in a bias whose entries
  reach 0.47), where summation order alone moves it by ~1e-6 of that scale. Such entries must be
  within 2e-6 * max|reference| of the tensor, and be rare. (cpu_memory, 2026-12-01: one entry of
  conv3d_ir_3.module.0.bias, at 0.96e-6 of its scale, 1.10e-6 with the LayerNorm backward's
  channel sums as products.)
  """
  grads = results[3]
  torch_grads = weights.to_torch_state_dict("videofusion", grads)
  unused = set(json.loads(str(golden.z["grad_meta/unused_params_json"])))
  assert len(unused) == 14 and set(torch_grads) == set(golden.state_dict)
  n_floor = 0
  for name, grad in torch_grads.items():
    if name in unused:
      np.testing.assert_array_equal(grad, 0, err_msg=name)
      continue
    ref = golden.z[f"grad/{name}"]
    err = np.abs(grad - ref)
    outside = err > 1e-7 + 1e-3 * np.abs(ref)
    assert np.all(err[outside] <= 2e-6 * np.abs(ref).max()), (name, err.max(), np.abs(ref).max())
    n_floor += int(outside.sum())
  assert n_floor <= 5, n_floor
  total_norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in torch_grads.values()))
  np.testing.assert_allclose(total_norm, golden.z["grad_meta/total_norm"], rtol=1e-5)


@pytest.mark.slow  # compiles the full network
def test_bf16_compute_stays_close_to_float32(golden):
  model = from_reference_config("videofusion", golden.config, dtype=jnp.bfloat16)
  outputs = jax.jit(model.apply)({"params": golden.params}, golden.ir, golden.vi)
  for key, value in outputs.items():
    assert value.dtype == jnp.float32
    err = np.abs(to_torch_layout(key, np.asarray(value)) - golden.z[f"output/{key}"])
    assert err.max() < BF16_MAX_ABS and err.mean() < BF16_MEAN_ABS, (key, err.max(), err.mean())


def test_from_reference_config_reads_golden_configs(golden):
  model = golden.model
  cfg = golden.config
  assert isinstance(model, VideoFusion)
  assert (model.num_features, model.in_channels, model.out_channels) == (
      cfg["num_features"], cfg["in_channels"], cfg["out_channels"])
  assert tuple(model.num_blocks) == tuple(cfg["num_blocks"])
  assert tuple(model.num_heads) == tuple(cfg["num_heads"])
  assert (model.num_decoder_blocks, model.ffn_expansion_factor, model.bias,
          model.layer_norm_type) == (2, 1.0, False, "WithBias")
  n_params = sum(x.size for x in jax.tree.leaves(golden.params))
  assert n_params == {16: 1_715_126, 32: 6_750_742}[cfg["num_features"]]


def test_from_reference_config_official_and_overrides():
  model = from_reference_config("videofusion", OFFICIAL_CONFIG, dtype=jnp.bfloat16, remat=True)
  assert model == VideoFusion(dtype=jnp.bfloat16, remat=True)
  biasfree = from_reference_config("videofusion", {**OFFICIAL_CONFIG, "LayerNorm_type": "BiasFree"})
  assert biasfree.layer_norm_type == "BiasFree"


@pytest.mark.parametrize("cfg, overrides, match", [
    ({**OFFICIAL_CONFIG, "num_feat": 32}, {}, "unknown VideoFusion network_g keys.*num_feat"),
    ({**OFFICIAL_CONFIG, "type": "VideoFusion"}, {}, "type must be 'VideoFusion_Trans'"),
    ({**OFFICIAL_CONFIG, "LayerNorm_type": "RMS"}, {}, "LayerNorm_type must be one of"),
    ({**OFFICIAL_CONFIG, "num_heads": [2, 4]}, {}, "num_heads must be a list of 3"),
    ({**OFFICIAL_CONFIG, "groups": [1, 8, 16]}, {}, "groups containing 1"),
    ({**OFFICIAL_CONFIG, "num_features": 30}, {}, "multiple of 4 and >= 16"),
    ({**OFFICIAL_CONFIG, "num_features": 8}, {}, "multiple of 4 and >= 16"),
    ({**OFFICIAL_CONFIG, "bias": "no"}, {}, "bias must be true or false"),
    (OFFICIAL_CONFIG, {"precision": "high"}, "unknown VideoFusion overrides.*precision"),
])
def test_from_reference_config_rejects_bad_configs(cfg, overrides, match):
  with pytest.raises(ValueError, match=match):
    from_reference_config("videofusion", cfg, **overrides)
  with pytest.raises(ValueError, match="unknown model 'videofusionx'"):
    from_reference_config("videofusionx", OFFICIAL_CONFIG)


def test_biasfree_layernorm_params():
  model = VideoFusion(num_features=16, num_heads=(1, 2, 2), layer_norm_type="BiasFree")
  x = jnp.zeros((1, 2, 8, 8, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
  norm1 = params["fusion_1"]["cross_transformer"]["norm1"]["body"]
  assert set(norm1) == {"weight"}  # BiasFree: no bias
  # The unused attn.norm stays WithBias, as in the reference (it is built from an int, not the type).
  assert set(params["fusion_1"]["cross_transformer"]["attn"]["norm"]["body"]) == {"weight", "bias"}


def test_bias_true_adds_conv_biases():
  model = VideoFusion(num_features=16, num_heads=(1, 2, 2), bias=True)
  x = jnp.zeros((1, 2, 8, 8, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
  attn = params["fusion_1"]["cross_transformer"]["attn"]
  assert attn["q"]["bias"].shape == (16,) and attn["kv_dwconv"]["bias"].shape == (32,)
  ffn = params["decoder_ir"]["decoder"]["ffn"]  # the scanned decoder blocks: stacked params
  assert ffn["project_in"]["bias"].shape == (2, 32) and ffn["project_out"]["bias"].shape == (2, 16)


def _inits(init) -> list:
  x = jnp.zeros((1, 2, 8, 8, 3))
  return [init(VideoFusion(num_features=16, num_heads=(1, 2, 2), schedule=s).init)(
      jax.random.key(0), x, x)["params"] for s in (schedule_lib.CPU_MEMORY, schedule_lib.PLAIN)]


def test_param_layout_is_the_same_in_every_schedule():
  """One param layout for all schedules: checkpoints move between them."""
  layouts = _inits(lambda init: functools.partial(jax.eval_shape, init))
  assert layouts[0] == layouts[1]


@pytest.mark.slow  # compiles the init of both schedules (~60 s)
def test_params_are_the_same_in_every_schedule():
  inits = _inits(jax.jit)
  assert jax.tree.structure(inits[0]) == jax.tree.structure(inits[1])
  for a, b in zip(jax.tree.leaves(inits[0]), jax.tree.leaves(inits[1])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("schedule, platform, expected", [
    ("auto", "cpu", "cpu_memory"), ("auto", "cuda", "plain"), ("auto", "tpu", "plain"),
    ("plain", "cpu", "plain"), ("cpu_memory", "cuda", "cpu_memory")])
def test_schedule_resolution(schedule, platform, expected):
  assert schedule_lib.resolve(schedule, platform) == expected


@pytest.mark.parametrize("fields, match", [
    ({"schedule": "fast"}, "model.schedule must be one of"),
    ({"remat_policy": "some"}, "model.remat_policy must be one of")])
def test_bad_schedule_fields_raise(fields, match):
  model = VideoFusion(num_features=16, num_heads=(1, 2, 2), **fields)
  x = jnp.zeros((1, 2, 8, 8, 3))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), x, x)


@pytest.mark.parametrize("layer_norm_type", ["WithBias", "BiasFree"])
def test_layernorm_matches_restormer_formula(layer_norm_type):
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 8)).astype(np.float32) * 3 + 1
  norm = LayerNorm(layer_norm_type)
  variables = {"params": {"body": {"weight": np.linspace(0.5, 2, 8, dtype=np.float32),
                                   "bias": np.linspace(-1, 1, 8, dtype=np.float32)}}}
  if layer_norm_type == "BiasFree":
    del variables["params"]["body"]["bias"]
  ours = norm.apply(variables, jnp.asarray(x))
  var = x.var(-1, keepdims=True)
  body = variables["params"]["body"]
  if layer_norm_type == "WithBias":
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(var + 1e-5) * body["weight"] + body["bias"]
  else:
    expected = x / np.sqrt(var + 1e-5) * body["weight"]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_norm_type", ["WithBias", "BiasFree"])
def test_layernorm_cpu_memory_gradients_match_plain(layer_norm_type):
  """The "cpu_memory" LayerNorm's custom VJP (channel means as products) equals autodiff of the
  plain formulation, for the input, weight and bias."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 3, 5, 8)).astype(np.float32) * 3 + 1)
  dy = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
  variables = LayerNorm(layer_norm_type).init(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v + jnp.asarray(rng.standard_normal(v.shape), v.dtype),
                           variables)

  def vjp(schedule):
    out, pullback = jax.vjp(
        lambda v, a: LayerNorm(layer_norm_type, schedule=schedule).apply(v, a), variables, x)
    return out, pullback(dy)

  with jax.default_matmul_precision("float32"):
    (ours, ours_grads), (plain, plain_grads) = vjp("cpu_memory"), vjp("plain")
  np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(ours_grads) == jax.tree.structure(plain_grads)
  for got, expected in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)


def _conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding),) * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("size, padding", [(3, 1), (3, 0), (5, 2)])
def test_conv2d_nhwc_gradients_match_autodiff(size, padding):
  rng = np.random.default_rng(size + padding)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 5), np.float32))
  kernel = jnp.asarray(rng.standard_normal((size, size, 5, 4), np.float32))
  dy = jnp.asarray(rng.standard_normal(_conv(x, kernel, padding).shape, np.float32))
  with jax.default_matmul_precision("float32"):
    ours = jax.vjp(lambda a, k: conv2d_nhwc(a, k, padding), x, kernel)
    autodiff = jax.vjp(lambda a, k: _conv(a, k, padding), x, kernel)
    np.testing.assert_array_equal(ours[0], autodiff[0])
    for got, expected in zip(ours[1](dy), autodiff[1](dy)):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's convolutions")
def test_conv2d_nhwc_gradients_stay_canonical_inside_a_scan():
  """Autodiff's gradient convolutions in a scanned block's backward keep transposed dimension
  orders on XLA:CPU (run by a naive loop nest); conv2d_nhwc's are all NHWC/HWIO."""
  def loss(kernels, x, conv):
    def block(h, kernel):
      return jax.nn.relu(conv(h, kernel, 1)), None
    return jnp.sum(jax.lax.scan(block, x, kernels)[0] ** 2)

  args = jnp.ones((2, 3, 3, 8, 8)), jnp.ones((2, 6, 6, 8))

  def orders(conv):
    hlo = jax.jit(jax.grad(loss), static_argnums=2).lower(*args, conv).compile().as_text()
    return set(re.findall(r"dim_labels=([^,]+),", hlo))

  assert orders(conv2d_nhwc) == {"b01f_01io->b01f"}
  assert len(orders(_conv)) > 1


@pytest.mark.parametrize("padding", [0, 1])
def test_depthwise_conv3x3_gradients_match_grouped_conv(padding):
  rng = np.random.default_rng(3 + padding)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 4), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 4), np.float32))

  def grouped(a, k):
    return jax.lax.conv_general_dilated(a, k, (1, 1), ((padding, padding),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=4)

  dy = jnp.asarray(rng.standard_normal(grouped(x, kernel).shape, np.float32))
  with jax.default_matmul_precision("float32"):
    ours = jax.vjp(lambda a, k: depthwise_conv3x3(a, k, padding), x, kernel)
    autodiff = jax.vjp(grouped, x, kernel)
    np.testing.assert_allclose(ours[0], autodiff[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours[1](dy), autodiff[1](dy)):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_depthwise_kernel_gradient_in_chunks_of_frames_matches_grouped_conv(monkeypatch):
  """Maps too large for the cache sum the kernel gradient's taps over chunks of frames (a scan):
  the same gradients as the grouped convolution's autodiff."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((12, 8, 8, 4), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 4), np.float32))
  dy = jnp.asarray(rng.standard_normal(x.shape, np.float32))
  frame_bytes = (10 * 10 + 8 * 8) * 4 * 4  # a padded frame of x and a frame of dy, float32
  monkeypatch.setattr(layers, "_TAP_SUM_CHUNK_BYTES", 3 * frame_bytes)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  assert layers._frames_per_chunk(padded, dy) == 3  # the most frames that divide 12 and fit
  assert layers._frames_per_chunk(padded[:9], dy[:9]) == 9  # fits 3 chunks: one pass
  assert layers._frames_per_chunk(padded[:11], dy[:11]) == 11  # prime: no chunk of 2 or more
  two_devices = jax.sharding.AbstractMesh((2,), ("data",),
                                          axis_types=(jax.sharding.AxisType.Auto,))
  with jax.sharding.use_abstract_mesh(two_devices):  # a loop would gather frames split over devices
    assert layers._frames_per_chunk(padded, dy) == 12

  def grouped(a, k):
    return jax.lax.conv_general_dilated(a, k, (1, 1), ((1, 1),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=4)

  with jax.default_matmul_precision("float32"):
    ours = jax.vjp(lambda a, k: depthwise_conv3x3(a, k, 1), x, kernel)[1](dy)
    autodiff = jax.vjp(grouped, x, kernel)[1](dy)
  for got, expected in zip(ours, autodiff):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  lowered = jax.jit(lambda a, k: jax.vjp(depthwise_conv3x3, a, k)[1](dy)).lower(x, kernel)
  assert "stablehlo.while" in lowered.as_text()  # the chunks are a loop


def test_pointwise_conv_gradients_match_autodiff():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 3, 7, 5), np.float32))
  kernel = jnp.asarray(rng.standard_normal((5, 4), np.float32))
  dy = jnp.asarray(rng.standard_normal((2, 3, 7, 4), np.float32))
  with jax.default_matmul_precision("float32"):
    ours = jax.vjp(pointwise_conv, x, kernel)
    autodiff = jax.vjp(einsum_pointwise, x, kernel)
    np.testing.assert_array_equal(ours[0], autodiff[0])
    for got, expected in zip(ours[1](dy), autodiff[1](dy)):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's fusions")
def test_pointwise_conv_weight_gradient_transposes_nothing():
  """Autodiff's 1x1-conv weight gradient makes XLA:CPU write the depthwise backward that feeds it
  transposed; pointwise_conv's product of 2-D views reads both operands as they are."""
  def loss(x, kernel, depthwise_kernel, conv):
    return jnp.sum(jnp.sin(depthwise_conv3x3(conv(x, kernel), depthwise_kernel)))

  args = jnp.ones((2, 16, 16, 8)), jnp.ones((8, 8)), jnp.ones((3, 3, 1, 8))

  def transposes(conv):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3,
                   compiler_options=schedule_lib.compiler_options())
    return grad.lower(*args, conv).compile().as_text().count(" transpose(")

  assert transposes(pointwise_conv) == 0
  assert transposes(einsum_pointwise) > 0


@pytest.mark.parametrize("ir_shape, vi_shape, match", [
    ((1, 4, 30, 32, 3), None, "height must be a multiple of 4"),
    ((1, 4, 32, 18, 3), None, "width must be a multiple of 4"),
    ((1, 1, 32, 32, 3), None, r"at least 2 frames \(time >= 2\)"),
    ((4, 32, 32, 3), None, r"must both be \(batch, time, height, width, 3\)"),
    ((1, 4, 32, 32, 1), None, "need 3 channels"),
    ((1, 4, 3, 32, 32), None, "need 3 channels"),
    ((1, 4, 32, 32, 3), (1, 4, 32, 36, 3), "same shape"),
])
def test_invalid_shapes_raise(ir_shape, vi_shape, match):
  model = VideoFusion(num_features=16, num_heads=(1, 2, 2))
  ir = jnp.zeros(ir_shape)
  vi = jnp.zeros(vi_shape or ir_shape)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), ir, vi)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="measures XLA:CPU's buffer assignment")
def test_inference_temporaries_stay_below_nine_full_resolution_maps():
  """Guards the memory ordering of docs/models.md: XLA's temporaries for an official-config
  forward compiled as the networks' programs are, in units of one full-resolution 32-channel
  float32 map of the clip (8.4 measured here; 55 with YNNPACK's DOT fusions in the compiler
  options; 9.9 when the repeated blocks' param slices were all copied up front; 10.3 before
  attention computed v after its affinities; 6.7 at 640x480)."""
  model = VideoFusion()
  clip = jax.ShapeDtypeStruct((1, 7, 96, 128, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), clip, clip)
  compiled = jax.jit(model.apply, compiler_options=schedule_lib.compiler_options()).lower(
      params, clip, clip).compile()
  full_resolution_map = 7 * 96 * 128 * 32 * 4
  assert compiled.memory_analysis().temp_size_in_bytes / full_resolution_map < 9.0
