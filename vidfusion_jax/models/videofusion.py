"""VideoFusion (Tang et al., CVPR 2026): a Flax port of the official `VideoFusion_Trans`.

Layout is NTHWC throughout; 2-D blocks see frames flattened batch-major to (B*T, H, W, C). Module and
parameter names mirror the PyTorch state_dict (`fusion_1/cross_transformer/attn/q/kernel` for
`fusion_1.cross_transformer.attn.q.weight`), so `vidfusion_jax.weights` converts checkpoints by a name
and layout transform. Reference quirks are kept on purpose (see specs/videofusion.md section 6): the
unused `attn.norm` LayerNorm of every cross-attention block, the double softmax of the co-attention,
shared cross blocks in the fusion module, boundary frames as their own neighbours.
"""

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vidfusion_jax.models import schedule as schedule_lib
from vidfusion_jax.models.layers import (Conv2d, Conv3d, LayerNorm, apply_head_attention,
                                         after, head_affinities, leaky_relu, ordered_call,
                                         pixel_unshuffle, scheduled_call,
                                         upsample_bilinear_align_corners)

Dtype = Any


def _frames(x: jax.Array) -> jax.Array:
  """(B, T, H, W, C) -> (B*T, H, W, C), batch-major."""
  return x.reshape((-1,) + x.shape[2:])


def _video(x: jax.Array, batch: int) -> jax.Array:
  """(B*T, H, W, C) -> (B, T, H, W, C)."""
  return x.reshape((batch, -1) + x.shape[1:])


class Scheduled(nn.Module):
  """Compute dtype and how the module is scheduled (`models.schedule`): "cpu_memory" or "plain".

  `remat` rematerialises the blocks run through `call_block` in the backward pass; in the "plain"
  schedule with the `jax.checkpoint` policy named `remat_policy`.
  """
  dtype: Dtype = jnp.float32
  remat: bool = False
  schedule: str = schedule_lib.CPU_MEMORY
  remat_policy: str = "full"

  def after(self, x: Any, dependency: Any) -> Any:
    """`layers.after` in the "cpu_memory" schedule; `x` unchanged otherwise."""
    return after(x, dependency) if self.schedule == schedule_lib.CPU_MEMORY else x

  def call_block(self, module: nn.Module, *args: jax.Array) -> Any:
    return scheduled_call(module, *args, schedule=self.schedule, remat=self.remat,
                          remat_policy=self.remat_policy)

  def repeat(self, module: nn.Module, x: jax.Array, length: int) -> jax.Array:
    """`module` applied `length` times in sequence, each time with its own params.

    One `nn.scan` of `call_block`, traced and compiled once, with params stacked along a leading
    axis of size `length` (`weights` maps them to the per-block PyTorch names). Its loop runs
    the blocks one at a time, forward and backward, in every schedule.
    """
    def step(block, carry, _):
      return self.call_block(block, carry), None

    scan = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True}, length=length)
    return scan(module, x, None)[0]


class BlockConfig(Scheduled):
  """Fields shared by the transformer-style blocks and their containers."""
  num_heads: int = 1
  ffn_expansion_factor: float = 1.0
  bias: bool = False
  layer_norm_type: str = "WithBias"

  def block_kwargs(self) -> dict[str, Any]:
    """Fields of the blocks inside a container: no `remat` (the container rematerialises them)."""
    return dict(num_heads=self.num_heads, ffn_expansion_factor=self.ffn_expansion_factor,
                bias=self.bias, layer_norm_type=self.layer_norm_type, dtype=self.dtype,
                schedule=self.schedule)

  def conv(self, features: int, kernel_size: int, name: str, depthwise: bool = False,
           padding: int | None = None, output_splits: int = 1) -> Conv2d:
    return Conv2d(features, kernel_size, self.bias, features if depthwise else 1, self.dtype,
                  padding=padding, output_splits=output_splits, schedule=self.schedule, name=name)

  def norm(self, name: str) -> LayerNorm:
    return LayerNorm(self.layer_norm_type, self.dtype, self.schedule, name=name)

  def projection(self, features: int, name: str, dw_name: str, splits: int = 1):
    """`project(x, part=None)`: 1x1 projection then depthwise 3x3 (the "DConv" of MDTA / GDFN).

    The output channels form `splits` blocks (q, k, v...). In the "cpu_memory" schedule each is
    computed on its own and `part=i` computes block i only, so attention can compute v after its
    affinities and XLA never holds all blocks at once. In "plain" all blocks are one convolution
    pair, computed once per input. Without biases the 1x1 projection of a zero border is zero, so
    the input is padded (in one fusion with the LayerNorm before it) instead of the projection.
    """
    padding = None if self.bias else 0
    ordered = self.schedule == schedule_lib.CPU_MEMORY
    blocks = splits if ordered else 1
    pointwise = self.conv(features, 1, name, padding=padding, output_splits=blocks)
    depthwise = self.conv(features, 3, dw_name, depthwise=True, padding=padding,
                          output_splits=blocks)
    computed = []  # "plain": [(input, all blocks)] of the last input projected

    def project(x: jax.Array, part: int | None = None) -> jax.Array | tuple[jax.Array, ...]:
      padded = x if self.bias else jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      if ordered:
        return depthwise(pointwise(padded, part), part)
      if not computed or computed[0][0] is not x:
        out = depthwise(pointwise(padded))
        computed[:] = [(x, tuple(jnp.split(out, splits, axis=-1)) if splits > 1 else out)]
      return computed[0][1] if part is None else computed[0][1][part]

    return project

  def temperature(self) -> jax.Array:
    """The learnable per-head temperature, shaped to scale (N, heads, c, c) affinities."""
    return self.param("temperature", nn.initializers.ones, (self.num_heads,))[:, None, None]


def _shift_frames(x: jax.Array, offset: int) -> jax.Array:
  """Frame t of the result is frame clip(t + offset, 0, T-1) of x (B, T, ...), offset in {-1, 1}."""
  if offset < 0:
    return jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
  return jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)


class FeedForward(BlockConfig):
  """Gated-Dconv feed-forward network: 1x1 -> dw3x3 -> GELU(a) * g -> 1x1."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = int(x.shape[-1] * self.ffn_expansion_factor)
    a, g = self.projection(2 * hidden, "project_in", "dwconv", splits=2)(x)
    return self.conv(x.shape[-1], 1, "project_out")(jax.nn.gelu(a, approximate=False) * g)


class Attention(BlockConfig):
  """MDTA: transposed (channel) self-attention."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    temperature = self.temperature()
    qkv = self.projection(3 * c, "qkv", "qkv_dwconv", splits=3)
    attn = jax.nn.softmax(temperature * head_affinities(qkv(x, 0), qkv(x, 1), self.num_heads),
                          axis=-1)
    v = qkv(self.after(x, attn), 2)  # q and k are dead before v exists
    return self.conv(c, 1, "project_out")(apply_head_attention(attn, v))


class CrossAttention(BlockConfig):
  """Cross_Attention: queries from `a`, keys/values from `b`; owns an unused LayerNorm `norm`."""

  @nn.compact
  def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
    c = a.shape[-1]
    temperature = self.temperature()
    # The reference builds `norm` (always WithBias) but never calls it: create its params only.
    if self.is_initializing():
      LayerNorm("WithBias", schedule=self.schedule, name="norm")(a[:1, :1, :1])
    q = self.projection(c, "q", "q_dwconv")(a)
    kv = self.projection(2 * c, "kv", "kv_dwconv", splits=2)
    attn = jax.nn.softmax(temperature * head_affinities(q, kv(b, 0), self.num_heads), axis=-1)
    v = kv(self.after(b, attn), 1)  # q and k are dead before v exists
    return self.conv(c, 1, "project_out")(apply_head_attention(attn, v))


class CoAttention(BlockConfig):
  """Bi-temporal co-attention on (B, T, H, W, C) normalised frames, vectorised over time.

  Frame t reads the keys/values of frames t-1 and t+1 (frame 0 is its own previous, frame T-1 its
  own next), as the reference's per-frame loop does. The neighbours are gathered by shifted
  indexing of the input, which fuses into the padding before the (per-frame) projections. A =
  softmax(softmax(tau q k_prev^T) * softmax(tau q k_next^T)) and A v_prev + A v_next is computed
  as A (v_prev + v_next).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, c = x.shape[0], x.shape[-1]
    temperature = self.temperature()
    q = self.projection(c, "q", "q_dwconv")(_frames(x))
    kv_prev = self.projection(2 * c, "kv_prev", "kv_dwconv_prev", splits=2)
    kv_next = self.projection(2 * c, "kv_next", "kv_dwconv_next", splits=2)

    def neighbours(video, offset):  # Taken at each use: the gather fuses into the pad.
      return _frames(_shift_frames(video, offset))

    def affinities(k):
      return jax.nn.softmax(temperature * head_affinities(q, k, self.num_heads), axis=-1)

    attn_prev = affinities(kv_prev(neighbours(x, -1), 0))
    attn_next = affinities(kv_next(neighbours(self.after(x, attn_prev), 1), 0))  # one key map at a time
    attn = jax.nn.softmax(attn_prev * attn_next, axis=-1)
    x = self.after(x, attn)
    v = kv_prev(neighbours(x, -1), 1) + kv_next(neighbours(x, 1), 1)
    return _video(self.conv(c, 1, "project_out")(apply_head_attention(attn, v)), batch)


class TransformerBlock(BlockConfig):
  """x + Attention(LN1 x), then x + FFN(LN2 x)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + Attention(**self.block_kwargs(), name="attn")(self.norm("norm1")(x))
    return x + FeedForward(**self.block_kwargs(), name="ffn")(self.norm("norm2")(x))


class CrossTransformerBlock(BlockConfig):
  """x + CrossAttention(LN1 x, LN1 s) (one shared norm1), then x + FFN(LN2 x)."""

  @nn.compact
  def __call__(self, x: jax.Array, supple: jax.Array) -> jax.Array:
    norm1 = self.norm("norm1")
    x = x + CrossAttention(**self.block_kwargs(), name="attn")(norm1(x), norm1(supple))
    return x + FeedForward(**self.block_kwargs(), name="ffn")(self.norm("norm2")(x))


class CoTransformerBlock(BlockConfig):
  """On (B, T, H, W, C): x + CoAttention(LN1 x), then x + FFN(LN2 x)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + CoAttention(**self.block_kwargs(), name="attn")(self.norm("norm1")(x))
    ffn = FeedForward(**self.block_kwargs(), name="ffn")
    return x + _video(ffn(self.norm("norm2")(_frames(x))), x.shape[0])


class FusionModule(BlockConfig):
  """CMGF: CTB(ir + vi, ir) + CTB(ir + vi, vi) with one shared cross block."""

  @nn.compact
  def __call__(self, ir: jax.Array, vi: jax.Array) -> jax.Array:
    block = CrossTransformerBlock(**self.block_kwargs(), name="cross_transformer")
    query = ir + vi
    if self.schedule != schedule_lib.CPU_MEMORY:
      # Both calls as one over a doubled batch, interleaved (q0 q0 q1 q1 ...) so that each row's
      # pair stays in its batch shard: concatenating would move rows between devices.
      pairs = lambda a, b: jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])
      both = self.call_block(block, pairs(query, query), pairs(ir, vi))
      both = both.reshape(query.shape[0], 2, *both.shape[1:])
      return both[:, 0] + both[:, 1]
    with_ir = self.call_block(block, query, ir)
    return with_ir + self.call_block(block, *self.after((query, vi), with_ir))


class CrossModalityDiffEnhance(BlockConfig):
  """CmDRM, first half: CTB(x, s - x)."""

  @nn.compact
  def __call__(self, x: jax.Array, supple: jax.Array) -> jax.Array:
    block = CrossTransformerBlock(**self.block_kwargs(), name="cross_transformer")
    return self.call_block(block, x, supple - x)


class FusionEnhance(BlockConfig):
  """`num_blocks` TransformerBlocks, scanned (`transformer`: params stacked by block)."""
  num_blocks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block = TransformerBlock(**self.block_kwargs(), name="transformer")
    return self.repeat(block, x, self.num_blocks)


class CoAttentionModule(BlockConfig):
  """One co-attention layer (`co_transformer`) over all frames of (B, T, H, W, C)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return CoTransformerBlock(**self.block_kwargs(), name="co_transformer")(x)


class StackedCoAttention(BlockConfig):
  """`num_layers` co-attention layers on (B, T, H, W, C), scanned (`layers`: params stacked)."""
  num_layers: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.repeat(CoAttentionModule(**self.block_kwargs(), name="layers"), x, self.num_layers)


class Decoder3D(BlockConfig):
  """TransformerBlocks (scanned, `decoder`: params stacked), then 1x1 C -> C/2 (bias),
  LeakyReLU(0.2), 3x3 C/2 -> out (no bias).

  Purely 2-D despite the reference's name.
  """
  out_channels: int = 3
  num_blocks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = self.repeat(TransformerBlock(**self.block_kwargs(), name="decoder"), x, self.num_blocks)
    x = Conv2d(c // 2, 1, use_bias=True, dtype=self.dtype, schedule=self.schedule,
               name="conv_0")(x)
    x = leaky_relu(x, 0.2)
    return Conv2d(self.out_channels, 3, use_bias=False, dtype=self.dtype, name="conv_2")(x)


class Downsample(nn.Module):
  """Conv 3x3 C -> C/2 (no bias), then PixelUnshuffle(2): (2C, H/2, W/2)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv2d(x.shape[-1] // 2, 3, use_bias=False, dtype=self.dtype, name="body_0")(x)
    return pixel_unshuffle(x)


class Upsample(nn.Module):
  """Conv 3x3 C -> C/2 (no bias), bilinear x2 (align_corners=True), conv 3x3 (bias)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1] // 2
    x = Conv2d(c, 3, use_bias=False, dtype=self.dtype, name="body_0")(x)
    x = upsample_bilinear_align_corners(x)
    return Conv2d(c, 3, use_bias=True, dtype=self.dtype, name="body_2")(x)


class Conv3DModule(nn.Module):
  """Conv3d -> LeakyReLU(0.2) -> Conv3d on (B, T, H, W, C)."""
  features: int
  dtype: Dtype = jnp.float32
  schedule: str = schedule_lib.CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv3d(self.features, self.dtype, self.schedule, name="module_0")(x)
    return Conv3d(self.features, self.dtype, self.schedule, name="module_2")(leaky_relu(x, 0.2))


class ResidualBlockNoBN(nn.Module):
  """x + conv2(LeakyReLU_0.1(conv1 x)), with the reference's 0.1-scaled Kaiming-normal init."""
  dtype: Dtype = jnp.float32
  schedule: str = schedule_lib.CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.variance_scaling(0.02, "fan_in", "normal")
    c = x.shape[-1]
    conv1 = Conv2d(c, 3, dtype=self.dtype, kernel_init=init, schedule=self.schedule, name="conv1")
    conv2 = Conv2d(c, 3, dtype=self.dtype, kernel_init=init, schedule=self.schedule, name="conv2")
    return x + conv2(leaky_relu(conv1(x), 0.1))


class ResidualBlocks2D(Scheduled):
  """Four ResidualBlockNoBN in sequence (`blocks.0.{k}` in PyTorch), scanned (`blocks_0`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.repeat(ResidualBlockNoBN(self.dtype, self.schedule, name="blocks_0"), x, 4)


class ChannelAttention(nn.Module):
  """sigmoid(fc2(lrelu(fc1(avgpool x))) + fc2(lrelu(fc1(maxpool x)))) -> (N, 1, 1, C)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    fc1 = Conv2d(c // 16, 1, use_bias=False, dtype=self.dtype, name="fc1")
    fc2 = Conv2d(c, 1, use_bias=False, dtype=self.dtype, name="fc2")
    pooled = jnp.stack([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))])
    return jax.nn.sigmoid(jnp.sum(fc2(leaky_relu(fc1(pooled), 0.2)), axis=0))[:, None, None, :]


class SpatialAttention(nn.Module):
  """sigmoid(conv3x3([mean_c x, max_c x])) -> (N, H, W, 1)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pooled = jnp.stack([jnp.mean(x, axis=-1), jnp.max(x, axis=-1)], axis=-1)
    return jax.nn.sigmoid(Conv2d(1, 3, use_bias=False, dtype=self.dtype, name="conv1")(pooled))


def _channel_spatial_gate(x: jax.Array, ca: ChannelAttention, sa: SpatialAttention) -> jax.Array:
  x = ca(x) * x
  return sa(x) * x


class CrossModalAggregation(nn.Module):
  """CMA(main, sup): per-sample scalar gates from a 1x1 conv, then CA and SA on the gated main."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, main: jax.Array, supple: jax.Array) -> jax.Array:
    logits = Conv2d(2, 1, use_bias=False, dtype=self.dtype, name="conv")(
        jnp.concatenate([main, supple], axis=-1))
    gates = jnp.mean(jax.nn.sigmoid(logits), axis=(1, 2), keepdims=True)
    gated_main = gates[..., 0:1] * main
    ca = ChannelAttention(self.dtype, name="ChannelAttention")
    sa = SpatialAttention(self.dtype, name="SpatialAttention")
    return _channel_spatial_gate(gated_main, ca, sa) + gates[..., 1:2] * supple


class VideoDecomposition(nn.Module):
  """Splits the fused feature into IR and VI parts with separate CA + SA gates."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return tuple(
        _channel_spatial_gate(x, ChannelAttention(self.dtype, name=f"channel_attention_{m}"),
                              SpatialAttention(self.dtype, name=f"spatial_attention_{m}"))
        for m in ("ir", "vi"))


class VideoFusion(nn.Module):
  """The official VideoFusion_Trans network. Defaults are the official `network_g` config.

  `apply(variables, ir, vis)` with ir, vis (B, T, H, W, in_channels) in [0, 1] returns
  {"fusion", "ir", "vi"}, each (B, T, H, W, out_channels) in (0, 1). H and W must be multiples of 4
  and T >= 2. `dtype` is the compute dtype (params stay float32); `remat` rematerialises the heavy
  blocks in the backward pass. `schedule` ("auto", "cpu_memory" or "plain", see `models.schedule`;
  "auto" follows JAX's default backend) and `remat_policy` (a `schedule.REMAT_POLICIES` name, used
  by "plain") change how the network is computed, never its params or results. Activations of
  the top-level children (named as the reference's) can be captured with
  `capture_intermediates=capture_top_level`.
  """
  in_channels: int = 3
  out_channels: int = 3
  num_features: int = 32
  num_blocks: Sequence[int] = (2, 2, 4)
  num_decoder_blocks: int = 2
  num_heads: Sequence[int] = (2, 4, 8)
  ffn_expansion_factor: float = 1.0
  bias: bool = False
  layer_norm_type: str = "WithBias"
  dtype: Dtype = jnp.float32
  remat: bool = False
  schedule: str = schedule_lib.AUTO
  remat_policy: str = "full"
  spatial_multiple: ClassVar[int] = 4  # two 2x PixelUnshuffle stages
  min_frames: ClassVar[int] = 2  # the co-attention of frame 0 reads frame 1

  def _check_inputs(self, ir: jax.Array, vis: jax.Array) -> None:
    shape = tuple(ir.shape)
    if ir.ndim != 5 or vis.ndim != 5 or shape != tuple(vis.shape):
      raise ValueError(f"ir and vis must both be (batch, time, height, width, {self.in_channels}) "
                       f"arrays of the same shape; got {shape} and {tuple(vis.shape)}")
    _, time, height, width, channels = shape
    if channels != self.in_channels:
      raise ValueError(f"inputs need {self.in_channels} channels (NTHWC layout); got {shape}")
    if isinstance(time, int) and time < 2:
      raise ValueError(f"VideoFusion needs at least 2 frames (time >= 2); got {shape}")
    for size, axis in ((height, "height"), (width, "width")):
      if isinstance(size, int) and size % 4:
        raise ValueError(f"{axis} must be a multiple of 4 (two 2x down/up-samplings); got {shape}; "
                         "pad the frames (the reference pads bottom/right by reflection)")

  @nn.compact
  def __call__(self, ir: jax.Array, vis: jax.Array) -> dict[str, jax.Array]:
    self._check_inputs(ir, vis)
    schedule = schedule_lib.resolve(self.schedule)
    schedule_lib.remat_policy(self.remat_policy)  # validates the name
    batch = ir.shape[0]
    f, dt = self.num_features, self.dtype
    scheduled = dict(dtype=dt, remat=self.remat, schedule=schedule, remat_policy=self.remat_policy)

    def kwargs(scale):
      return dict(num_heads=self.num_heads[scale], ffn_expansion_factor=self.ffn_expansion_factor,
                  bias=self.bias, layer_norm_type=self.layer_norm_type, **scheduled)

    last_output = []

    def stage(module, *inputs):  # Runs after the previous stage; its backward runs before.
      if schedule != schedule_lib.CPU_MEMORY:
        return module(*inputs)
      if last_output:
        inputs = after(inputs, last_output[0])
      last_output[:] = [ordered_call(module, *inputs)]
      return last_output[0]

    def encode3d(frames, features, name):  # Conv3DModule on the video, returned as frames.
      return _frames(stage(Conv3DModule(features, dt, schedule, name=name), _video(frames, batch)))

    def scale_features(x_ir, x_vi, scale, suffix):  # Scales 2 and 3: 3-D conv, res blocks, CmDRM.
      features = f * 2 ** scale
      x_ir = encode3d(x_ir, features, f"conv3d_ir_{suffix}")
      x_vi = encode3d(x_vi, features, f"conv3d_vi_{suffix}")
      x_ir = stage(ResidualBlocks2D(**scheduled, name=f"ir_conv_enhance_{suffix}"), x_ir)
      x_vi = stage(ResidualBlocks2D(**scheduled, name=f"vi_conv_enhance_{suffix}"), x_vi)
      enhance = functools.partial(CrossModalityDiffEnhance, **kwargs(scale))
      e_ir = stage(enhance(name=f"cross_modal_enhance_ir_{suffix}"), x_ir, x_vi)
      e_vi = stage(enhance(name=f"cross_modal_enhance_vi_{suffix}"), x_vi, x_ir)
      e_ir = stage(CrossModalAggregation(dt, name=f"CMA_ir_{suffix}"), e_ir, x_ir)
      e_vi = stage(CrossModalAggregation(dt, name=f"CMA_vi_{suffix}"), e_vi, x_vi)
      return e_ir, e_vi

    def co_attention(x, scale, name):
      layers = StackedCoAttention(**kwargs(scale), num_layers=self.num_blocks[scale], name=name)
      return _frames(stage(layers, _video(x, batch)))

    def downsample_and_skip(ir_x, vi_x, scale):
      """Scale `scale` (0-based): downsampled IR/VI features and the enhanced fused skip."""
      n = scale + 1
      # The fusion reads ir_x before vi_x: downsampling around it frees each input early.
      ir_down = stage(Downsample(dt, name=f"down_ir_{n}"), ir_x)
      skip = stage(FusionModule(**kwargs(scale), name=f"fusion_{n}"), ir_x, vi_x)
      vi_down = stage(Downsample(dt, name=f"down_vi_{n}"), vi_x)
      skip = stage(FusionEnhance(**kwargs(scale), num_blocks=self.num_blocks[scale],
                                 name=f"fusion_enhance_{n}"), skip)
      return ir_down, vi_down, skip

    ir1 = encode3d(_frames(ir), f, "conv3d_ir_1")
    vi1 = encode3d(_frames(vis), f, "conv3d_vi_1")
    ir2, vi2, skip1 = downsample_and_skip(ir1, vi1, 0)
    ir2, vi2 = scale_features(ir2, vi2, 1, 2)
    ir3, vi3, skip2 = downsample_and_skip(ir2, vi2, 1)

    ir3, vi3 = scale_features(ir3, vi3, 2, 3)
    x = stage(FusionModule(**kwargs(2), name="fusion_3"), ir3, vi3)

    x = co_attention(x, 2, "co_attention_3")
    x = co_attention(stage(Upsample(dt, name="up2"), x) + skip2, 1, "co_attention_2")
    x = co_attention(stage(Upsample(dt, name="up1"), x) + skip1, 0, "co_attention_1")

    feat_ir, feat_vi = stage(VideoDecomposition(dt, name="decomposition"), x)
    outputs = {}
    for key, feat in (("ir", feat_ir), ("vi", feat_vi), ("fusion", x)):
      decoder = Decoder3D(**kwargs(0), out_channels=self.out_channels,
                          num_blocks=self.num_decoder_blocks, name=f"decoder_{key}")
      decoded = _video(stage(decoder, feat), batch).astype(jnp.float32)
      outputs[key] = (jnp.tanh(decoded) + 1) / 2
    return outputs


def capture_top_level(module: nn.Module, method_name: str) -> bool:
  """`capture_intermediates` filter keeping the outputs of the top-level children only.

  `model.apply(v, ir, vis, capture_intermediates=capture_top_level, mutable=["intermediates"])`
  then holds `intermediates[<child>]["__call__"]` for every child named as in the reference.
  """
  return len(module.path) == 1 and method_name == "__call__"
