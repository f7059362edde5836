"""TemCoCo fusion network (Gong et al., ICCV 2025): a Flax port of `archs/Net.py: Fusion`.

Layout is channels-last throughout: inputs and outputs are (B, T, H, W, C). The parameter tree mirrors
the PyTorch state dict (every `.` of a PyTorch name is one level of nesting, leaves are `kernel`,
`bias`, `scale` or `relative_position_bias_table`), so the weight importer is a mechanical transpose.

Behaviours of the reference that are reproduced on purpose (spec `specs/temcoco.md`, section (e)):
the raw reshape that mixes time and channels in the segmentation branch, unmasked zero-padding tokens
in the window cross-attention, sequential cross-attention (y attends to the updated x), DCN offsets
upsampled by nearest x2 without rescaling, frames 0 and 1 used as their own neighbours, and a final
LeakyReLU with no clamp.
"""

import functools
import math
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax.models import schedule as schedule_lib
from vidfusion_jax.models.deform_conv import deform_conv2d
from vidfusion_jax.models.layers import torch_bias_init
from vidfusion_jax.models.layers import torch_kernel_init
from vidfusion_jax.models.schedule import CPU_MEMORY

N_FEAT = 32  # The only width the reference supports (other channel counts are hard-coded there).
WINDOW = (2, 8, 8)
SWIN_HEADS = 4
TEMPORAL_HEADS = 8
TEMPORAL_HEAD_DIM = 64
DEFORMABLE_GROUPS = 8
SIZE_MULTIPLE = 16

Dtype = Any


def _lrelu(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, 0.2)


def _softmax(scores: jax.Array) -> jax.Array:
  """Softmax over the last axis in at least float32 (bfloat16 scores are upcast, float64 kept)."""
  return jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), axis=-1)


def _normal(std: float) -> Callable:
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)
  return init


def _torch_conv(features: int, kernel: tuple[int, ...], in_features: int, *, name: str,
                strides: Optional[tuple[int, ...]] = None, padding: Any = None,
                dtype: Dtype = None, weight_init: Optional[Callable] = None) -> nn.Conv:
  """nn.Conv (with bias) with PyTorch's default initialisation (uniform +-1/sqrt(fan_in)) and
  symmetric padding k // 2 unless given."""
  if padding is None:
    padding = [(k // 2, k // 2) for k in kernel]
  return nn.Conv(features, kernel, strides=strides, padding=padding, dtype=dtype,
                 kernel_init=weight_init or torch_kernel_init,
                 bias_init=torch_bias_init(in_features * math.prod(kernel)), name=name)


def _torch_dense(features: int, in_features: int, *, name: str, use_bias: bool = True,
                 dtype: Dtype = None) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=torch_kernel_init,
                  bias_init=torch_bias_init(in_features), name=name)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name)


class Seq(nn.Module):
  """A one-child wrapper (e.g. a one-entry `nn.Sequential`, child `0`) so names match PyTorch."""
  layer: Callable[..., nn.Module]
  child: str = "0"

  @nn.compact
  def __call__(self, *args):
    return self.layer(name=self.child)(*args)


class Conv3d(nn.Module):
  """torch.nn.Conv3d with kernel (1, k, k) (spatial, stride (1, s, s)), (3, 1, 1) (temporal) or
  (1, 1, 1), zero padding k // 2, on (B, T, H, W, C); kernel stored (kt, kh, kw, in, out).

  In the "cpu_memory" schedule it is computed as 2-D convolutions / matmuls over folded frames
  (XLA:CPU's 3-D convolution is several times slower); "plain" is one 3-D convolution.
  """
  features: int
  kernel: tuple[int, int, int]
  stride: int = 1
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    kt, kh, kw = self.kernel
    kernel = self.param("kernel", torch_kernel_init, (kt, kh, kw, c, self.features))
    bias = self.param("bias", torch_bias_init(c * kt * kh * kw), (self.features,))
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if self.schedule != CPU_MEMORY:
      y = jax.lax.conv_general_dilated(
          x, kernel, (1, self.stride, self.stride), [(k // 2, k // 2) for k in self.kernel],
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    elif kt == 1 and kh > 1:
      y = jax.lax.conv_general_dilated(
          x.reshape(b * t, h, w, c), kernel[0], (self.stride, self.stride),
          [(kh // 2, kh // 2), (kw // 2, kw // 2)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y.reshape(b, t, *y.shape[1:])
    elif kh == kw == 1 and self.stride == 1:
      # Frames t-1, t, t+1 (zeros beyond the ends) stacked on channels, then one matmul.
      padded = jnp.pad(x, ((0, 0), (kt // 2, kt // 2), (0, 0), (0, 0), (0, 0)))
      stacked = jnp.concatenate([padded[:, i:i + t] for i in range(kt)], axis=-1)
      y = jnp.einsum("bthwc,cd->bthwd", stacked, kernel.reshape(kt * c, self.features))
    else:
      raise ValueError(f"unsupported Conv3d kernel {self.kernel} with stride {self.stride}")
    return y + bias.astype(dtype)


class Conv3DModule(nn.Module):
  """Conv3d (child `conv3d`) followed by LeakyReLU(0.2)."""
  features: int
  kernel: tuple[int, int, int]
  stride: int = 1
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _lrelu(Conv3d(self.features, self.kernel, self.stride, self.dtype, self.schedule,
                        name="conv3d")(x))


class Separable3DConv(nn.Module):
  """(1,3,3) spatial conv (stride (1,s,s)) then (3,1,1) temporal conv, each with LeakyReLU."""
  features: int
  stride: int = 1
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv3DModule, self.features, dtype=self.dtype, schedule=self.schedule)
    x = conv((1, 3, 3), self.stride, name="spatial_conv")(x)
    return conv((3, 1, 1), name="depth_conv")(x)


class ResBlock(nn.Module):
  features: int
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layer = functools.partial(Separable3DConv, self.features, dtype=self.dtype,
                              schedule=self.schedule)
    return x + Seq(layer, name="main_branch")(x)


class ConvResBlockTwo(nn.Module):
  """`conv_resblock_two`: Separable3DConv (`0`) then two ResBlocks (`1`, `2`)."""
  features: int
  stride: int = 1
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Separable3DConv(self.features, self.stride, self.dtype, self.schedule, name="0")(x)
    x = ResBlock(self.features, self.dtype, self.schedule, name="1")(x)
    return ResBlock(self.features, self.dtype, self.schedule, name="2")(x)


class Encoder(nn.Module):
  """`Encoder_v3(3, 32)`: returns features at full, 1/2 and 1/4 resolution."""
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = Separable3DConv(N_FEAT, dtype=self.dtype, schedule=self.schedule, name="conv0")(x)
    f1 = ConvResBlockTwo(N_FEAT, 1, self.dtype, self.schedule, name="conv1")(x)
    f2 = ConvResBlockTwo(2 * N_FEAT, 2, self.dtype, self.schedule, name="conv2")(f1)
    f3 = ConvResBlockTwo(4 * N_FEAT, 2, self.dtype, self.schedule, name="conv3")(f2)
    return f1, f2, f3


class ConvTranspose2x4(nn.Module):
  """ConvTranspose2d(k=3, stride=4, padding=0, output_padding=1).

  With stride 4 > kernel 3 the output blocks do not overlap: block (i, j) is the 3x3 kernel scaled
  by the input pixel, and the 4th row and column of every block hold only the bias. The kernel is
  stored as (kh, kw, in, out) (PyTorch's (in, out, kh, kw) transposed (2, 3, 0, 1)).
  """
  features: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = torch_bias_init(self.features * 9)  # PyTorch's bound for a transposed conv.
    kernel = self.param("kernel", init, (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", init, (self.features,))
    dtype = self.dtype or x.dtype
    n, h, w, _ = x.shape
    blocks = jnp.einsum("nijc,klco->nikjlo", x.astype(dtype), kernel.astype(dtype))
    blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, 1), (0, 0), (0, 1), (0, 0)))
    return blocks.reshape(n, 4 * h, 4 * w, self.features) + bias.astype(dtype)


class BranchSeg(nn.Module):
  """`Branch_Seg`: returns (feature, 1024-channel distillation head at 1/16 resolution)."""
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    nf = 4 * N_FEAT
    b, t, h, w, _ = x.shape
    block = functools.partial(ConvResBlockTwo, nf, dtype=self.dtype, schedule=self.schedule)
    f1 = Seq(block, name="conv1")(x)
    frames = f1.reshape(b * t, h, w, nf)
    seg = _torch_conv(1024, (3, 3), nf, strides=(4, 4), padding="VALID", dtype=self.dtype,
                      name="down")(frames)
    up = ConvTranspose2x4(nf, self.dtype, name="up")(seg)
    # The reference's raw torch.reshape of the (b t) c h w tensor to b c t h w (mixes T and C).
    up = up.transpose(0, 3, 1, 2).reshape(b, nf, t, h, w).transpose(0, 2, 3, 4, 1)
    f2 = Seq(block, name="conv2")(jnp.concatenate([up, f1], axis=-1))
    return f2, seg.reshape(b, t, *seg.shape[1:])


class BranchVisual(nn.Module):
  """`Branch_Visual`: returns (feature, 256-channel distillation head)."""
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    v = ConvResBlockTwo(8 * N_FEAT, 1, self.dtype, self.schedule, name="conv1")(x)
    return ConvResBlockTwo(4 * N_FEAT, 1, self.dtype, self.schedule, name="conv2")(v), v


@functools.cache
def relative_position_index() -> np.ndarray:
  """(128, 128) int64 index into the (3*15*15, heads) bias table for a (2, 8, 8) window."""
  coords = np.stack(np.meshgrid(*[np.arange(s) for s in WINDOW], indexing="ij")).reshape(3, -1)
  rel = coords[:, :, None] - coords[:, None, :]
  rel += np.array([s - 1 for s in WINDOW])[:, None, None]
  index = ((rel[0] * (2 * WINDOW[1] - 1) + rel[1]) * (2 * WINDOW[2] - 1) + rel[2]).astype(np.int64)
  index.setflags(write=False)
  return index


def _to_windows(x: jax.Array) -> jax.Array:
  """(B, T, H, W, C) with T, H, W multiples of the window -> (B * nW, 128, C)."""
  b, t, h, w, c = x.shape
  wt, wh, ww = WINDOW
  x = x.reshape(b, t // wt, wt, h // wh, wh, w // ww, ww, c)
  return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wt * wh * ww, c)


def _from_windows(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  b, t, h, w, c = shape
  wt, wh, ww = WINDOW
  x = x.reshape(b, t // wt, h // wh, w // ww, wt, wh, ww, c)
  return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(shape)


class WindowAttention(nn.Module):
  """Window cross-attention: queries from x, keys/values from y, relative position bias."""
  dim: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * WINDOW[0] - 1) * (2 * WINDOW[1] - 1) * (2 * WINDOW[2] - 1),
                        SWIN_HEADS))
    head_dim = self.dim // SWIN_HEADS
    q = _torch_dense(self.dim, self.dim, dtype=self.dtype, name="q")(x)
    kv = _torch_dense(2 * self.dim, self.dim, dtype=self.dtype, name="kv")(y)
    k, v = jnp.split(kv, 2, axis=-1)
    split = lambda a: a.reshape(*a.shape[:-1], SWIN_HEADS, head_dim)
    q, k, v = split(q) * head_dim ** -0.5, split(k), split(v)
    bias = table[relative_position_index().reshape(-1)]
    n = x.shape[1]
    bias = bias.reshape(n, n, SWIN_HEADS).transpose(2, 0, 1)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) + bias.astype(q.dtype)
    attn = _softmax(scores).astype(v.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v).reshape(x.shape[0], n, self.dim)
    return _torch_dense(self.dim, self.dim, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  dim: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _torch_dense(4 * self.dim, self.dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return _torch_dense(self.dim, 4 * self.dim, dtype=self.dtype, name="fc2")(x)


class SwinCrossBlock(nn.Module):
  """Swin block (no shift) whose attention takes keys/values from a second stream.

  The normalised streams are zero-padded to window multiples and the padding is NOT masked, as in
  the reference: padded tokens act as keys/values equal to the kv bias.
  """
  dim: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    shape = x.shape
    pads = [(0, 0)] + [(0, -s % w) for s, w in zip(shape[1:4], WINDOW)] + [(0, 0)]
    xn = jnp.pad(_layer_norm("norm1", self.dtype)(x), pads)
    yn = jnp.pad(_layer_norm("norm1y", self.dtype)(y), pads)
    attn = WindowAttention(self.dim, self.dtype, name="attn")(_to_windows(xn), _to_windows(yn))
    attn = _from_windows(attn, xn.shape)[:, :shape[1], :shape[2], :shape[3]]
    x = x + attn
    return x + Mlp(self.dim, self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))


class CombineAttn(nn.Module):
  """x' = CA(x, y); y' = CA(y, x') (the second block sees the updated x)."""
  dim: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = SwinCrossBlock(self.dim, self.dtype, name="blocks_CAx")(x, y)
    y = SwinCrossBlock(self.dim, self.dtype, name="blocks_CAy")(y, x)
    return x, y


class TemporalAttention(nn.Module):
  """`CrossAttention` used as self-attention over time, independently for every pixel."""
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    inner = TEMPORAL_HEADS * TEMPORAL_HEAD_DIM
    s = _layer_norm("norm", self.dtype)(x)
    heads = lambda a: a.reshape(*a.shape[:-1], TEMPORAL_HEADS, TEMPORAL_HEAD_DIM)
    q, k, v = (heads(_torch_dense(inner, dim, use_bias=False, dtype=self.dtype, name=n)(s))
               for n in ("to_q", "to_k", "to_v"))
    scores = jnp.einsum("bthwnd,bshwnd->bhwnts", q * TEMPORAL_HEAD_DIM ** -0.5, k)
    attn = _softmax(scores).astype(v.dtype)
    out = jnp.einsum("bhwnts,bshwnd->bthwnd", attn, v).reshape(*x.shape[:-1], inner)
    out = Seq(functools.partial(_torch_dense, dim, inner, dtype=self.dtype), name="to_out")(out)
    return x + out


class BranchAndCombine(nn.Module):
  """`Branch_and_Combine(nf=128)` on the 1/4-resolution encoder features."""
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, feat_ir: jax.Array, feat_vi: jax.Array) -> dict[str, jax.Array]:
    nf = 4 * N_FEAT
    vi_s, vi_seg = BranchSeg(self.dtype, self.schedule, name="Branch_s1")(feat_vi)
    vi_v, vi_visual = BranchVisual(self.dtype, self.schedule, name="Branch_v1")(feat_vi)
    ir_s, ir_seg = BranchSeg(self.dtype, self.schedule, name="Branch_s2")(feat_ir)
    ir_v, ir_visual = BranchVisual(self.dtype, self.schedule, name="Branch_v2")(feat_ir)
    feat_seg = jnp.concatenate(CombineAttn(nf, self.dtype, name="combine_seg")(vi_s, ir_s), -1)
    feat_vis = jnp.concatenate(CombineAttn(nf, self.dtype, name="combine_vis")(vi_v, ir_v), -1)
    a_s, a_v = CombineAttn(2 * nf, self.dtype, name="SegVisAttn")(feat_seg, feat_vis)
    feat = ConvResBlockTwo(nf, 1, self.dtype, self.schedule, name="combine")(
        jnp.concatenate([a_s, a_v], -1))
    feat = TemporalAttention(self.dtype, name="attn_temp")(feat)
    return dict(feat=feat, ir_seg=ir_seg, ir_visual=ir_visual, vi_seg=vi_seg,
                vi_visual=vi_visual)


def neighbour_frames(num_frames: int) -> tuple[jax.Array, jax.Array]:
  """Frame indices of the two DCN neighbours: i-1 and i-2, frames 0 and 1 use themselves.

  jnp (not np) so that a symbolic time dimension (jax.export) traces.
  """
  frames = jnp.arange(num_frames)
  return (jnp.where(frames < 2, frames, frames - 1), jnp.where(frames < 2, frames, frames - 2))


def _upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 on the two axes before channels."""
  return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


class DeformConv(nn.Module):
  """DCNv1 3x3 (no bias, no mask); kernel stored as (3, 3, C/groups, out)."""
  features: int
  groups: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, offset: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param("kernel", torch_bias_init(channels * 9),
                        (3, 3, channels // self.groups, self.features))
    dtype = self.dtype or x.dtype
    return deform_conv2d(x.astype(dtype), offset, kernel.astype(dtype), groups=self.groups,
                         deformable_groups=DEFORMABLE_GROUPS)


class VITDCN(nn.Module):
  """`VI_TDCN(E)`: upsamples x, aligns neighbour frames with two DCNs, fuses.

  The reference loops over frames; here the per-frame work is batched over (B, T) and the
  neighbour frames are gathered with `neighbour_frames`.
  """
  embed_dim: int
  dtype: Dtype = None
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array, feat_a: jax.Array, feat_b: jax.Array,
               prev_offsets: Optional[tuple[jax.Array, jax.Array]] = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    e = self.embed_dim
    half = e // 2
    b, t = x.shape[:2]
    offset_channels = DEFORMABLE_GROUPS * 18

    def conv2d(features, in_features, name):
      # The reference re-draws every VI_TDCN Conv2d weight as N(0, 2 / (9 * out)).
      return _torch_conv(features, (3, 3), in_features, dtype=self.dtype, name=name,
                         weight_init=_normal(math.sqrt(2 / (9 * features))))

    def seq_conv(name, in_features):
      return Seq(functools.partial(conv2d, half, in_features), name=name)

    x = Conv3d(half, (1, 1, 1), dtype=self.dtype, name="ConvTrans")(x)
    x = _upsample2(x)
    frames = lambda a: a.reshape(b * t, *a.shape[2:])
    videos = lambda a: a.reshape(b, t, *a.shape[1:])
    ref = frames(jnp.concatenate([x, feat_a, feat_b], axis=-1))
    idx1, idx2 = neighbour_frames(t)
    fea = _lrelu(seq_conv("cross_modality", 3 * half)(ref))
    nf1 = frames(videos(_lrelu(seq_conv("cross_frame", 3 * half)(ref)))[:, idx1])
    nf2 = frames(videos(_lrelu(seq_conv("cross_frame2", 3 * half)(ref)))[:, idx2])

    aligned, offsets = [], []
    for n, neighbour in ((1, nf1), (2, nf2)):
      suffix = "" if n == 1 else "2"
      c = _lrelu(seq_conv(f"temporary_cat{suffix}", e)(jnp.concatenate([fea, neighbour], -1)))
      c = conv2d(half, half, f"before_offsets{suffix}")(c)
      offset = conv2d(offset_channels, half, f"off2d_{n}")(c)
      if prev_offsets is not None:
        offset = offset + frames(_upsample2(prev_offsets[n - 1])).astype(offset.dtype)
      aligned.append(DeformConv(half, e // 16, self.dtype, name=f"dconv_{n}")(neighbour, offset))
      offsets.append(videos(offset))
    y = _lrelu(seq_conv("fuse_neighb", e)(jnp.concatenate(aligned, -1)))
    y = videos(y)
    fuse = Separable3DConv(half, dtype=self.dtype, schedule=self.schedule, name="fuse_feature")
    enhanced = fuse(jnp.concatenate([x, y], -1)) + x
    return enhanced, tuple(offsets)


class TemCoCo(nn.Module):
  """TemCoCo `Fusion()` network.

  `apply(variables, ir, vis)` with ir, vis float (B, T, H, W, 3) in [0, 1], H and W multiples of 16,
  returns a dict: `fusion` (B, T, H, W, 3), unclamped (the last op is a LeakyReLU); the distillation
  heads `ir_seg`, `vi_seg` (B, T, H/16, W/16, 1024) and `ir_visual`, `vi_visual`
  (B, T, H/4, W/4, 256).

  Attributes:
    dtype: compute dtype (parameters stay float32).
    remat: rematerialise the top-level stages (encoders, branch/combine, both DCN stages) in the
      backward pass (saves activation memory).
    remat_policy: what the rematerialised stages save (`schedule.REMAT_POLICIES`; "full" saves
      nothing).
    schedule: "cpu_memory" (3-D convolutions as 2-D ones, fast on XLA:CPU) or "plain" (native
      3-D convolutions, for GPU and TPU); `schedule.resolve` picks it from "auto". Parameters and
      outputs are the same in both.
  """
  dtype: Dtype = None
  remat: bool = False
  remat_policy: str = "full"
  schedule: str = CPU_MEMORY

  spatial_multiple: ClassVar[int] = SIZE_MULTIPLE  # H and W must be multiples of this
  min_frames: ClassVar[int] = 1

  @nn.compact
  def __call__(self, ir: jax.Array, vis: jax.Array) -> dict[str, jax.Array]:
    check_input_shapes(ir, vis)
    if self.schedule not in (schedule_lib.CPU_MEMORY, schedule_lib.PLAIN):
      raise ValueError(f"TemCoCo.schedule must be {schedule_lib.CPU_MEMORY!r} or "
                       f"{schedule_lib.PLAIN!r} (resolve 'auto' with schedule.resolve); "
                       f"got {self.schedule!r}")
    policy = schedule_lib.remat_policy(self.remat_policy)
    wrap = (lambda cls: nn.remat(cls, policy=policy)) if self.remat else (lambda cls: cls)
    dtype, sched = self.dtype, self.schedule
    if dtype is not None:
      ir, vis = ir.astype(dtype), vis.astype(dtype)
    f1_ir, f2_ir, f3_ir = wrap(Encoder)(dtype, sched, name="Enc_ir")(ir)
    f1_vi, f2_vi, f3_vi = wrap(Encoder)(dtype, sched, name="Enc_vis")(vis)
    heads = wrap(BranchAndCombine)(dtype, sched, name="SegBranchCombine")(f3_ir, f3_vi)
    dcn1, offsets = wrap(VITDCN)(8 * N_FEAT // 2, dtype, sched, name="DCN_1")(
        heads["feat"], f2_ir, f2_vi)
    dcn2, _ = wrap(VITDCN)(4 * N_FEAT // 2, dtype, sched, name="DCN_2")(dcn1, f1_ir, f1_vi,
                                                                        offsets)
    fused = Seq(functools.partial(Separable3DConv, 3, dtype=dtype, schedule=sched), "conv0",
                name="dec")(dcn2)
    return dict(fusion=fused, **{k: v for k, v in heads.items() if k != "feat"})


def check_input_shapes(ir: jax.Array, vis: jax.Array) -> None:
  """Raises ValueError unless ir and vis are equal (B, T, H, W, 3) with H, W multiples of 16."""
  if ir.shape != vis.shape:
    raise ValueError(f"ir and vis must have the same shape; got {ir.shape} and {vis.shape}")
  if ir.ndim != 5 or ir.shape[-1] != 3:
    raise ValueError(f"TemCoCo inputs must be (B, T, H, W, 3); got {ir.shape}")
  _, t, h, w, _ = ir.shape
  if t < 1:
    raise ValueError(f"TemCoCo needs at least one frame; got T={t}")
  if h < SIZE_MULTIPLE or w < SIZE_MULTIPLE or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
    raise ValueError(f"TemCoCo needs H and W to be positive multiples of {SIZE_MULTIPLE} (the "
                     f"segmentation branch's stride-4 down/up convolution at 1/4 resolution); "
                     f"got H={h}, W={w}. Pad or crop the frames.")


def from_reference_config(cfg: Optional[dict] = None, **overrides: Any) -> TemCoCo:
  """Builds TemCoCo from the reference constructor arguments (`Fusion(n_feat=32)`).

  `overrides` set module fields (`dtype`, `remat`, `remat_policy`, `schedule`), as
  `objectives.build_model` does.
  """
  cfg = dict(cfg or {})
  n_feat = cfg.pop("n_feat", N_FEAT)
  if cfg:
    raise ValueError(f"unknown TemCoCo constructor arguments {sorted(cfg)}; only 'n_feat' exists")
  if n_feat != N_FEAT:
    raise ValueError(f"TemCoCo supports only n_feat={N_FEAT}: the reference hard-codes the "
                     f"channel counts 64/128/256 that follow from it; got n_feat={n_feat}")
  fields = set(TemCoCo.__dataclass_fields__) - {"parent", "name"}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown TemCoCo overrides {bad}; fields: {sorted(fields)}")
  return TemCoCo(**overrides)


# ------------------------------------------------------------------------------------------------
# PyTorch state dict <-> Flax params naming and layouts (registered in `vidfusion_jax.weights`).
# Every `.` of a PyTorch name is one level of the params tree; `weight` becomes `kernel` (or `scale`
# for 1-D LayerNorm weights). Layouts: Linear (out, in) -> (in, out); Conv2d (out, in, kh, kw) ->
# (kh, kw, in, out); Conv3d (out, in, kt, kh, kw) -> (kt, kh, kw, in, out); ConvTranspose2d
# (in, out, kh, kw) -> (kh, kw, in, out).

INDEX_BUFFER = "relative_position_index"
TRANSPOSED_CONVS = ("up",)


def torch_name_to_flax_path(name: str, ndim: int) -> tuple[str, ...]:
  *path, leaf = name.split(".")
  if leaf == "weight":
    leaf = "scale" if ndim == 1 else "kernel"
  return (*path, leaf)


def flax_path_to_torch_name(path: tuple[str, ...]) -> str:
  leaf = "weight" if path[-1] in ("kernel", "scale") else path[-1]
  return ".".join((*path[:-1], leaf))


def _kernel_order(path: tuple[str, ...], ndim: int,
                  transposed_convs: tuple[str, ...]) -> Optional[tuple[int, ...]]:
  """Axis order taking a PyTorch weight to the Flax kernel (None for other leaves)."""
  if path[-1] != "kernel":
    return None
  if ndim == 4 and len(path) > 1 and path[-2] in transposed_convs:
    return (2, 3, 0, 1)
  return {2: (1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}[ndim]


def torch_to_flax_layout(path: tuple[str, ...], array: np.ndarray,
                         transposed_convs: tuple[str, ...] = TRANSPOSED_CONVS) -> np.ndarray:
  order = _kernel_order(path, array.ndim, transposed_convs)
  return array if order is None else array.transpose(order)


def flax_to_torch_layout(path: tuple[str, ...], array: np.ndarray,
                         transposed_convs: tuple[str, ...] = TRANSPOSED_CONVS) -> np.ndarray:
  order = _kernel_order(path, array.ndim, transposed_convs)
  return array if order is None else array.transpose(np.argsort(order))


@functools.cache
def _abstract_params() -> Any:
  x = jax.ShapeDtypeStruct((1, 1, SIZE_MULTIPLE, SIZE_MULTIPLE, 3), jnp.float32)
  return jax.eval_shape(TemCoCo().init, jax.random.key(0), x, x)["params"]


TORCH_NAMING = dict(to_flax_path=torch_name_to_flax_path, to_torch_name=flax_path_to_torch_name,
                    to_flax_layout=torch_to_flax_layout, to_torch_layout=flax_to_torch_layout)


def abstract_params(state_dict: Any = None) -> Any:
  """The TemCoCo params tree as ShapeDtypeStructs (the architecture is fixed: nothing inferred)."""
  del state_dict
  return _abstract_params()


def state_dict_buffers() -> dict[str, np.ndarray]:
  """The six int64 `relative_position_index` buffers of the reference state dict."""
  blocks = [f"SegBranchCombine.{attn}.{block}.attn.{INDEX_BUFFER}"
            for attn in ("combine_seg", "combine_vis", "SegVisAttn")
            for block in ("blocks_CAx", "blocks_CAy")]
  return {name: relative_position_index() for name in blocks}
