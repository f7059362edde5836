"""SEA-RAFT optical flow (Wang, Lipson and Deng, ECCV 2024): a Flax port of the network VF-Bench uses.

The reference is VF-Bench's copy of SEA-RAFT (`src/model/raft.py` and `src/model/RAFT_component/`,
specification `specs/temporal_vfbench.md`, part A). Layout is channels-last: images (N, H, W, 3) RGB on
0-255 in, flow (N, H, W, 2) = (dx, dy) from image1 to image2 out. The network is only used frozen:
BatchNorm runs with its running statistics, which are leaves of `params` like every weight.

The parameter tree follows the PyTorch state dict (`cnet.layer1.0.conv1.weight` ->
`cnet/layer1_0/conv1/kernel`), so the importer is a mechanical transpose. The update iterations run
in one `nn.scan`; the convex upsampling runs once, after the loop, unless every prediction is asked for.
Below 128 px of padded size the reference fails (its pyramid builds an unused fifth level); here the
levels simply shrink, down to empty levels whose lookups are zero.
"""

import functools
import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax.models import naming

Dtype = Any

CORR_LEVELS = 4
PAD_MULTIPLE = 8
# The official eval configs (princeton-vl/SEA-RAFT config/eval/spring-{S,M,L}.json).
VARIANTS = {
    "S": {"pretrain": "resnet18", "iters": 4},
    "M": {"pretrain": "resnet34", "iters": 4},
    "L": {"pretrain": "resnet34", "iters": 12},
}
_BLOCKS_PER_STAGE = {"resnet18": (2, 2, 2), "resnet34": (3, 4, 6)}
# Keys of the reference JSON configs that the forward pass does not read (training, data, demo).
_IGNORED_KEYS = frozenset({
    "name", "dataset", "gpus", "use_var", "var_min", "var_max", "image_size", "scale",
    "batch_size", "epsilon", "lr", "wdecay", "dropout", "clip", "gamma", "num_steps",
    "restore_ckpt", "coarse_config", "path", "device", "cuda", "suffix", "mixed_precision",
    "val_freq", "sum_freq", "seed", "num_workers"})


class BatchNorm(nn.Module):
  """Inference-mode BatchNorm (eps 1e-5) whose running statistics are params (the net is frozen)."""
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("running_mean", nn.initializers.zeros, (c,))
    var = self.param("running_var", nn.initializers.ones, (c,))
    scale = weight * jax.lax.rsqrt(var + 1e-5)
    return x * scale.astype(x.dtype) + (bias - mean * scale).astype(x.dtype)


class LayerNorm(nn.Module):
  """Channels-last LayerNorm with PyTorch's parameter names (statistics in float32)."""
  epsilon: float = 1e-6
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    y = x.astype(jnp.float32)
    mean = y.mean(-1, keepdims=True)
    var = jnp.square(y - mean).mean(-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(var + self.epsilon) * weight + bias
    return y.astype(self.dtype or x.dtype)


def _conv(features: int, kernel: int, name: str, stride: int = 1, dtype: Dtype = None,
          use_bias: bool = True) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=kernel // 2,
                 use_bias=use_bias, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """ResNet basic block; the projection shortcut is `downsample.0` (conv) and `.1` (BatchNorm).
  SEA-RAFT's convs have biases and its branch ends in a ReLU; torchvision's (`use_bias=False`,
  `branch_relu=False`) do not."""
  features: int
  stride: int = 1
  dtype: Dtype = None
  use_bias: bool = True
  branch_relu: bool = True

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_conv, dtype=self.dtype, use_bias=self.use_bias)
    y = nn.relu(BatchNorm(self.dtype, name="bn1")(conv(self.features, 3, "conv1", self.stride)(x)))
    y = BatchNorm(self.dtype, name="bn2")(conv(self.features, 3, "conv2")(y))
    y = nn.relu(y) if self.branch_relu else y
    if self.stride != 1 or x.shape[-1] != self.features:
      x = BatchNorm(self.dtype, name="downsample_1")(
          conv(self.features, 1, "downsample_0", self.stride)(x))
    return nn.relu(x + y)


class ResNetFPN(nn.Module):
  """The stride-8 ResNet encoder (`cnet` on both images stacked, `fnet` on each image)."""
  output_dim: int
  initial_dim: int = 64
  block_dims: tuple[int, ...] = (64, 128, 256)
  blocks: tuple[int, ...] = (2, 2, 2)
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    x = _conv(self.initial_dim, 7, "conv1", 2, dtype=self.dtype)(x)
    x = nn.relu(BatchNorm(self.dtype, name="bn1")(x))
    for stage, (features, count) in enumerate(zip(self.block_dims, self.blocks)):
      for i in range(count):
        stride = 2 if stage > 0 and i == 0 else 1
        x = BasicBlock(features, stride, self.dtype, name=f"layer{stage + 1}_{i}")(x)
    return _conv(self.output_dim, 1, "final_conv", dtype=self.dtype)(x)


class MotionEncoder(nn.Module):
  """Motion features from the correlation lookup and the current 1/8 flow (flow channels last)."""
  dim: int = 128
  dtype: Dtype = None

  @nn.compact
  def __call__(self, flow8, corr):
    cor = nn.relu(_conv(2 * self.dim, 1, "convc1", dtype=self.dtype)(corr))
    cor = nn.relu(_conv(self.dim + self.dim // 2, 3, "convc2", dtype=self.dtype)(cor))
    flo = nn.relu(_conv(self.dim, 7, "convf1", dtype=self.dtype)(flow8))
    flo = nn.relu(_conv(self.dim // 2, 3, "convf2", dtype=self.dtype)(flo))
    out = nn.relu(_conv(self.dim - 2, 3, "conv", dtype=self.dtype)(
        jnp.concatenate([cor, flo], -1)))
    return jnp.concatenate([out, flow8.astype(out.dtype)], -1)


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv (zero padding k // 2, bias) as k^2 shifted multiply-adds: XLA:CPU runs
  grouped convolutions ~20x slower than this fused elementwise loop. Params as nn.Conv's."""
  kernel_size: int = 7
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = sum(padded[:, i:i + h, j:j + w] * kernel[i, j, 0].astype(dtype)
              for i in range(k) for j in range(k))
    return out + bias.astype(dtype)


class ConvNextBlock(nn.Module):
  """Depthwise 7x7, LayerNorm, MLP (exact GELU), layer scale; residual before the 1x1 output conv."""
  output_dim: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, z):
    c = z.shape[-1]
    a = DepthwiseConv(7, self.dtype, name="dwconv")(z)
    a = LayerNorm(dtype=self.dtype, name="norm")(a)
    a = nn.gelu(nn.Dense(4 * self.output_dim, dtype=self.dtype, name="pwconv1")(a),
                approximate=False)
    a = nn.Dense(c, dtype=self.dtype, name="pwconv2")(a)
    a = a * self.param("gamma", nn.initializers.constant(1e-6), (c,)).astype(a.dtype)
    return _conv(self.output_dim, 1, "final", dtype=self.dtype)(z + a)


class UpdateBlock(nn.Module):
  dim: int = 128
  num_blocks: int = 2
  dtype: Dtype = None

  @nn.compact
  def __call__(self, net, context, corr, flow8):
    motion = MotionEncoder(self.dim, self.dtype, name="encoder")(flow8, corr)
    inp = jnp.concatenate([context, motion], -1)
    for i in range(self.num_blocks):
      net = ConvNextBlock(self.dim, self.dtype, name=f"refine_{i}")(
          jnp.concatenate([net, inp], -1))
    return net


def normalize_and_pad(image: jax.Array) -> tuple[jax.Array, tuple[int, int, int, int]]:
  """2 * x / 255 - 1, then centred edge padding to multiples of 8; returns (top, bottom, left, right)."""
  h, w = image.shape[1:3]
  ph, pw = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
  pads = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
  x = 2 * (image / 255.0) - 1
  return jnp.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)), mode="edge"), pads


def half_resolution(fmap: jax.Array) -> jax.Array:
  """`interpolate(scale_factor=0.5, bilinear, align_corners=False)`: 2x2 means, odd edge dropped."""
  n, h, w, c = fmap.shape
  fmap = fmap[:, :h // 2 * 2, :w // 2 * 2]
  return fmap.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


def correlation_pyramid(fmap1: jax.Array, fmap2: jax.Array,
                        levels: int = CORR_LEVELS) -> list[jax.Array]:
  """All-pairs correlations (N, h, w, h_l, w_l) of fmap1 with fmap2 halved l times, / sqrt(C)."""
  scale = 1.0 / math.sqrt(fmap1.shape[-1])
  pyramid = []
  for _ in range(levels):
    corr = jnp.einsum("nyxc,nijc->nyxij", fmap1, fmap2, preferred_element_type=jnp.float32)
    pyramid.append(corr * scale)
    fmap2 = half_resolution(fmap2)
  return pyramid


def lookup(pyramid: list[jax.Array], coords: jax.Array, radius: int) -> jax.Array:
  """Bilinear samples (zero outside) of each level around coords / 2^l, float32 (N, h, w, L*(2r+1)^2).

  Channel `l * (2r+1)^2 + i * (2r+1) + j` samples x = cx + i - r, y = cy + j - r. All samples of a
  pixel share one fractional offset, so each level gathers one (2r+2)^2 integer window and mixes
  its four shifted copies.
  """
  n, h, w, _ = coords.shape
  side = 2 * radius + 1
  out = []
  for level, corr in enumerate(pyramid):
    hl, wl = corr.shape[3:]
    if hl == 0 or wl == 0:
      out.append(jnp.zeros((n, h, w, side * side), jnp.float32))
      continue
    centre = coords / 2**level
    base = jnp.floor(centre)
    frac = centre - base
    offsets = jnp.arange(-radius, radius + 2, dtype=jnp.float32)
    xs = base[..., 0, None] + offsets  # (n, h, w, 2r+2)
    ys = base[..., 1, None] + offsets
    x_ok = (xs >= 0) & (xs <= wl - 1)
    y_ok = (ys >= 0) & (ys <= hl - 1)
    xi = jnp.clip(xs, 0, wl - 1).astype(jnp.int32)
    yi = jnp.clip(ys, 0, hl - 1).astype(jnp.int32)
    index = (yi[..., :, None] * wl + xi[..., None, :]).reshape(n, h, w, -1)  # [y, x] window
    window = jnp.take_along_axis(corr.reshape(n, h, w, hl * wl), index, axis=-1)
    window = window.reshape(n, h, w, side + 1, side + 1)
    window = window * (y_ok[..., :, None] & x_ok[..., None, :])
    fx, fy = frac[..., 0, None, None], frac[..., 1, None, None]
    sampled = ((1 - fy) * ((1 - fx) * window[..., :-1, :-1] + fx * window[..., :-1, 1:]) +
               fy * ((1 - fx) * window[..., 1:, :-1] + fx * window[..., 1:, 1:]))
    # sampled is [j (y offset), i (x offset)]; the reference orders channels by i first.
    out.append(jnp.swapaxes(sampled, -1, -2).reshape(n, h, w, side * side))
  return jnp.concatenate(out, -1).astype(jnp.float32)


def convex_upsample(data: jax.Array, mask: jax.Array) -> jax.Array:
  """(N, h, w, C) -> (N, 8h, 8w, C): per output pixel a softmax-weighted mix of the 3x3 zero-padded
  neighbourhood; mask channel `q * 64 + a * 8 + b` weighs neighbour q for sub-pixel (a, b)."""
  n, h, w, c = data.shape
  weights = jax.nn.softmax(mask.reshape(n, h, w, 9, 8, 8).astype(jnp.float32), axis=3)
  padded = jnp.pad(data, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.stack([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], 3)
  up = jnp.einsum("nyxqab,nyxqc->nyaxbc", weights, patches.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return up.reshape(n, 8 * h, 8 * w, c)


class SEARAFT(nn.Module):
  """SEA-RAFT (spring-S by default). `__call__(image1, image2)` -> {"flow", "info"}, and with
  `all_predictions=True` also "flow_iter" (iters + 1, N, H, W, 2), prediction 0 from the context
  net alone. `dtype` is the compute dtype of the convolutions (e.g. jnp.bfloat16); the correlation,
  the lookup, the flow accumulation and the upsampling stay float32."""
  dim: int = 128
  radius: int = 4
  iters: int = 4
  num_blocks: int = 2
  initial_dim: int = 64
  block_dims: tuple[int, ...] = (64, 128, 256)
  blocks_per_stage: tuple[int, ...] = (2, 2, 2)
  dtype: Dtype = None

  def setup(self):
    encoder = functools.partial(ResNetFPN, 2 * self.dim, self.initial_dim, self.block_dims,
                                self.blocks_per_stage, self.dtype)
    self.cnet = encoder()
    self.fnet = encoder()
    self.init_conv = _conv(2 * self.dim, 3, "init_conv", dtype=self.dtype)
    self.upsample_weight_0 = _conv(2 * self.dim, 3, "upsample_weight_0", dtype=self.dtype)
    self.upsample_weight_2 = _conv(64 * 9, 1, "upsample_weight_2", dtype=self.dtype)
    self.flow_head_0 = _conv(2 * self.dim, 3, "flow_head_0", dtype=self.dtype)
    self.flow_head_2 = _conv(6, 3, "flow_head_2", dtype=self.dtype)
    self.update_block = UpdateBlock(self.dim, self.num_blocks, self.dtype)

  def flow_head(self, net):
    return self.flow_head_2(nn.relu(self.flow_head_0(net))).astype(jnp.float32)

  def up_mask(self, net):
    return 0.25 * self.upsample_weight_2(nn.relu(self.upsample_weight_0(net))).astype(jnp.float32)

  def _update(self, carry, _, pyramid, context, grid):
    net, flow8 = carry
    corr = lookup(pyramid, grid + flow8, self.radius).astype(context.dtype)
    net = self.update_block(net, context, corr, flow8.astype(context.dtype))
    head = self.flow_head(net)
    flow8 = flow8 + head[..., :2]
    return (net, flow8), (net, head, flow8)

  def upsample(self, net, head, flow8):
    """Full-resolution (flow, info) of one prediction from its hidden state and 1/8 fields."""
    up = convex_upsample(jnp.concatenate([8 * flow8, head[..., 2:]], -1), self.up_mask(net))
    return up[..., :2], up[..., 2:]

  def features(self, image):
    """fnet features (N, h, w, 2 * dim) of (N, H, W, 3) images on 0-255. A frame in several pairs
    needs them once: `__call__(..., fmap1=, fmap2=)` takes them precomputed."""
    x, _ = normalize_and_pad(jnp.asarray(image, jnp.float32))
    return self.fnet(x.astype(self.dtype or jnp.float32))

  def __call__(self, image1, image2, all_predictions: bool = False, fmap1=None, fmap2=None):
    if image1.shape != image2.shape or image1.ndim != 4 or image1.shape[-1] != 3:
      raise ValueError("image1 and image2 must both be (N, H, W, 3) RGB on 0-255; got "
                       f"{image1.shape} and {image2.shape}")
    n, height, width, _ = image1.shape
    x1, pads = normalize_and_pad(jnp.asarray(image1, jnp.float32))
    x2, _ = normalize_and_pad(jnp.asarray(image2, jnp.float32))
    dtype = self.dtype or jnp.float32
    c = self.cnet(jnp.concatenate([x1, x2], -1).astype(dtype))
    self.sow("intermediates", "context_features", c)
    c = self.init_conv(c)
    self.sow("intermediates", "hidden_and_context", c)
    net, context = c[..., :self.dim], c[..., self.dim:]
    head = self.flow_head(net)
    flow8 = head[..., :2]
    if fmap1 is None or fmap2 is None:
      fmaps = self.fnet(jnp.concatenate([x1, x2], 0).astype(dtype))
      fmap1, fmap2 = fmaps[:n], fmaps[n:]
    self.sow("intermediates", "fmap1", fmap1)
    self.sow("intermediates", "fmap2", fmap2)
    pyramid = correlation_pyramid(fmap1, fmap2)
    h, w = net.shape[1:3]
    gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    grid = jnp.stack([gx, gy], -1)
    body = nn.scan(lambda module, carry, x: module._update(carry, x, pyramid, context, grid),
                   variable_broadcast="params", split_rngs={"params": False}, length=self.iters)
    (net_last, flow8_last), (nets, heads, flows8) = body(self, (net, flow8), None)
    top, bottom, left, right = pads
    crop = lambda x: x[..., top:x.shape[-3] - bottom, left:x.shape[-2] - right, :]
    flow, info = self.upsample(net_last, heads[-1], flow8_last)
    out = {"flow": crop(flow), "info": crop(info)}
    if all_predictions:
      nets = jnp.concatenate([net[None], nets], 0)
      heads = jnp.concatenate([head[None], heads], 0)
      flows8 = jnp.concatenate([flow8[None], flows8], 0)
      k = self.iters + 1
      merge = lambda x: x.reshape((k * n,) + x.shape[2:])
      flows, _ = self.upsample(merge(nets), merge(heads), merge(flows8))
      out["flow_iter"] = crop(flows).reshape((k, n, height, width, 2))
      out["net_iter"], out["head_iter"], out["flow8_iter"] = nets, heads, flows8
    return out


def from_reference_config(cfg: Mapping[str, Any], **overrides: Any) -> SEARAFT:
  """SEARAFT from a reference JSON config (e.g. `config/module/spring-S.json`, keys as written)."""
  unknown = sorted(set(cfg) - _IGNORED_KEYS - {
      "pretrain", "initial_dim", "block_dims", "dim", "radius", "num_blocks", "iters"})
  if unknown:
    raise ValueError(f"unknown SEA-RAFT config keys {unknown}")
  pretrain = cfg.get("pretrain", "resnet18")
  if pretrain not in _BLOCKS_PER_STAGE:
    raise ValueError(f"pretrain must be one of {sorted(_BLOCKS_PER_STAGE)}; got {pretrain!r}")
  kwargs: dict[str, Any] = {"blocks_per_stage": _BLOCKS_PER_STAGE[pretrain]}
  for key in ("initial_dim", "dim", "radius", "num_blocks", "iters"):
    if key in cfg:
      if not isinstance(cfg[key], int) or cfg[key] < 1:
        raise ValueError(f"{key} must be a positive int; got {cfg[key]!r}")
      kwargs[key] = cfg[key]
  if kwargs.get("dim", SEARAFT.dim) % 2:
    raise ValueError(f"dim must be even; got {cfg['dim']}")
  if "block_dims" in cfg:
    dims = cfg["block_dims"]
    if (not isinstance(dims, (list, tuple)) or len(dims) != 3 or
        not all(isinstance(d, int) and d > 0 for d in dims)):
      raise ValueError(f"block_dims must be a list of 3 positive ints; got {dims!r}")
    kwargs["block_dims"] = tuple(dims)
  fields = set(SEARAFT.__dataclass_fields__) - {"parent", "name"}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown SEA-RAFT overrides {bad}; fields: {sorted(fields)}")
  return SEARAFT(**{**kwargs, **overrides})


def variant_config(variant: str) -> dict[str, Any]:
  """The reference config of an official checkpoint size: "S", "M" or "L" (spring eval configs)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown SEA-RAFT variant {variant!r}; choose from {sorted(VARIANTS)}")
  return {"initial_dim": 64, "block_dims": [64, 128, 256], "dim": 128, "radius": 4,
          "num_blocks": 2, **VARIANTS[variant]}


# --- PyTorch state-dict naming ------------------------------------------------------------------

_INDEX = re.compile(r"^(.*?)((?:_\d+)+)$")
_BLOCK = re.compile(r"^(cnet|fnet)\.(layer\d+)\.(\d+)\.")


# `cnet.layer1.0.conv1.weight` -> ('cnet', 'layer1_0', 'conv1', 'kernel'); Linear and conv weights
# become `kernel`, BatchNorm / LayerNorm weights stay `weight`.
torch_name_to_flax_path = functools.partial(naming.torch_name_to_flax_path, kernel_ndims=(2, 4))


def flax_path_to_torch_name(path: tuple[str, ...]) -> str:
  parts = []
  for part in path[:-1]:
    match = _INDEX.match(part)
    parts.append(match.group(1) + match.group(2).replace("_", ".") if match else part)
  return ".".join(parts + ["weight" if path[-1] == "kernel" else path[-1]])


def torch_to_flax_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return array
  return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def flax_to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return array
  return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T


TORCH_NAMING = dict(to_flax_path=torch_name_to_flax_path, to_torch_name=flax_path_to_torch_name,
                    to_flax_layout=torch_to_flax_layout, to_torch_layout=flax_to_torch_layout)


def drop_aliases(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The state dict without what the forward does not read: `num_batches_tracked` counters and the
  `layerK.0.bn3.*` copies of `layerK.0.downsample.1.*` (one module under two names; checked equal)."""
  out = {}
  for name, value in state_dict.items():
    if name.endswith("num_batches_tracked"):
      continue
    if ".bn3." in name and _BLOCK.match(name):
      alias = name.replace(".bn3.", ".downsample.1.")
      if alias in state_dict and not np.array_equal(np.asarray(state_dict[alias]), value):
        raise ValueError(f"{name!r} and {alias!r} name the same BatchNorm but differ")
      if alias in state_dict:
        continue
      name = alias
    out[name] = value
  return out


def config_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The reference config (forward-pass keys) that produced a SEA-RAFT state dict."""
  def shape(name):
    if name not in state_dict:
      raise ValueError(f"missing tensor {name!r} (needed to infer the SEA-RAFT config)")
    return np.shape(state_dict[name])

  counts = tuple(len({m.group(1) for m in (re.match(rf"fnet\.layer{s}\.(\d+)\.", k)
                                            for k in state_dict) if m}) for s in (1, 2, 3))
  pretrain = {v: k for k, v in _BLOCKS_PER_STAGE.items()}.get(counts)
  if pretrain is None:
    raise ValueError(f"fnet has {counts} blocks per stage; SEA-RAFT uses "
                     f"{sorted(_BLOCKS_PER_STAGE.values())}")
  dim = shape("flow_head.0.weight")[1]
  corr_channels = shape("update_block.encoder.convc1.weight")[1]
  radius = (math.isqrt(corr_channels // CORR_LEVELS) - 1) // 2
  return {
      "pretrain": pretrain, "initial_dim": shape("fnet.conv1.weight")[0],
      "block_dims": [shape(f"fnet.layer{s}.0.conv1.weight")[0] for s in (1, 2, 3)],
      "dim": dim, "radius": radius,
      "num_blocks": len({k.split(".")[2] for k in state_dict
                         if k.startswith("update_block.refine.")}),
  }


def abstract_params(state_dict: Mapping[str, np.ndarray]) -> Any:
  model = from_reference_config(config_from_state_dict(state_dict))
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]


def load(path: str, variant: Optional[str] = None, dtype: Dtype = None):
  """(module, params) from an official checkpoint file, e.g. Tartan-C-T-TSKH-spring540x960-S.pth.

  The architecture comes from the tensors; `variant` ("S", "M", "L") only sets the iteration count
  (L runs 12) and is checked against the encoder depth.
  """
  from vidfusion_jax import weights  # pylint: disable=import-outside-toplevel
  state_dict = weights.load_torch_checkpoint(path)
  cfg = config_from_state_dict(drop_aliases(state_dict))
  if variant is not None:
    preset = variant_config(variant)
    if preset["pretrain"] != cfg["pretrain"]:
      raise ValueError(f"{path} holds a {cfg['pretrain']} encoder, variant {variant} uses "
                       f"{preset['pretrain']}")
    cfg["iters"] = preset["iters"]
  return (from_reference_config(cfg, dtype=dtype),
          weights.from_torch_state_dict("sea_raft", state_dict))
