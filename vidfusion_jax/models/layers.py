"""PyTorch-compatible primitives in channels-last layout, shared by the ported models.

Parameters keep PyTorch's initialisation (Kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in)) for
weights and biases) so that training from scratch matches the reference; layouts are Flax's
(HWIO kernels). Convolutions are cross-correlations with PyTorch's symmetric zero padding k // 2.
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax.models import schedule as schedule_lib
from vidfusion_jax.models.schedule import CPU_MEMORY, PLAIN

Dtype = Any
Initializer = Callable[..., jax.Array]

# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Conv weights.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# Name scope of every "cpu_memory"-only computation, so that a lowered program (with debug info)
# shows whether any reached it.
CPU_ONLY_SCOPE = "cpu_memory_only"


def cpu_only(fn: Callable) -> Callable:
  """`fn`, its ops traced under the CPU_ONLY_SCOPE name scope."""
  def scoped(*args, **kwargs):
    with jax.named_scope(CPU_ONLY_SCOPE):
      return fn(*args, **kwargs)
  return scoped


@cpu_only
def _after(tree: Any, dependencies: Any) -> Any:
  """`tree` with 0 * min(each float leaf of `dependencies`) added to each float leaf.

  The values are unchanged (for finite dependencies), but XLA must now compute `dependencies`
  before anything that reads `tree`. An optimisation barrier would not do: XLA:CPU removes them
  before scheduling.
  """
  anchors = [jnp.min(d).astype(jnp.float32) for d in jax.tree.leaves(dependencies)
             if jnp.issubdtype(d.dtype, jnp.inexact)]
  zero = 0 * sum(anchors)
  return jax.tree.map(
      lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def after(x: Any, dependency: Any) -> Any:
  """`x`, made to be computed after `dependency`; backward: `dependency`'s cotangent waits for x's.

  For the "cpu_memory" schedule only. Orders independent branches, which XLA:CPU's default
  scheduler runs concurrently (keeping all their working sets alive): with `b = f(after(x, a))`,
  the forward computes `a` before `f` and the backward runs f's before a's.
  """
  shapes = jax.tree.map(lambda d: jax.ShapeDtypeStruct(d.shape, d.dtype), dependency)

  @jax.custom_vjp
  def tie(x, dependency):
    return _after(x, dependency)

  def tie_fwd(x, dependency):
    return _after(x, dependency), None

  def tie_bwd(_, cotangent):
    zeros = jax.tree.map(lambda d: jnp.zeros(d.shape, d.dtype), shapes)
    return cotangent, _after(zeros, cotangent)

  tie.defvjp(tie_fwd, tie_bwd)
  return tie(x, dependency)


def _ordered_vjp(fn: Callable, residuals: Any, cotangent: Any, remat: bool) -> tuple[Any, Any]:
  """(param cotangents, input cotangents) of `fn(params, *xs)`, computed after `cotangent` exists.
  `residuals` are (params, xs) with `remat` (the forward is recomputed here), else the forward's
  VJP function."""
  if remat:
    params, xs = _after(residuals, cotangent)
    vjp_fn = jax.vjp(fn, params, *xs)[1]
  else:
    vjp_fn = _after(residuals, cotangent)
  param_grads, *input_grads = vjp_fn(cotangent)
  return param_grads, input_grads


def ordered_call(module: nn.Module, *args: jax.Array, remat: bool = False) -> Any:
  """`module(*args)` whose backward pass runs as one unit, in order; optionally rematerialised.

  For the "cpu_memory" schedule only (`scheduled_call` picks it). XLA's CPU schedulers may move
  backward work that depends only on forward values (weight gradients, a rematerialised forward)
  anywhere in the backward pass, and do: they then keep the activations and cotangents of many
  blocks alive at once (many GB for this network), and CSE merges a `jax.checkpoint` forward back
  into the original one. Here the block's residuals are made to depend on its incoming
  cotangent, so its backward starts when the cotangent arrives. With `remat` the residuals are
  the params and inputs and the forward is recomputed from them then. (Making the input
  cotangents also wait for the param cotangents changed no temporaries once the repeated blocks
  ran as scans, and cost one reduction kernel per param: it was dropped.)
  """
  template = module.clone(parent=None)

  def apply(mdl, *xs):
    return mdl(*xs)

  def forward(mdl, *xs):
    if remat:
      return apply(mdl, *xs), (mdl.variables["params"], xs)
    return nn.vjp(apply, mdl, *xs)

  def backward(residuals, cotangent):
    param_grads, input_grads = _ordered_vjp(
        lambda p, *a: template.apply({"params": p}, *a), residuals, cotangent, remat)
    return ({"params": param_grads} if remat else param_grads, *input_grads)

  return nn.custom_vjp(apply, forward, backward)(module, *args)


def _call(module: nn.Module, *args: jax.Array) -> Any:
  return module(*args)


def gathered(param: jax.Array) -> jax.Array:
  """`param` whole on every device where it is used: an FSDP-split weight is all-gathered there.

  Without this, XLA propagates a scanned block's weight split into its activations (channels
  split over "fsdp") and moves whole feature maps between devices. The identity outside
  `sharding.mesh_context` (single-device inference, tests).
  """
  if jax.sharding.get_abstract_mesh().empty:
    return param
  return jax.lax.with_sharding_constraint(param, jax.sharding.PartitionSpec())


def scheduled_call(module: nn.Module, *args: jax.Array, schedule: str, remat: bool = False,
                   remat_policy: str = "full") -> Any:
  """`module(*args)` as one block of the network: through `ordered_call` in the "cpu_memory"
  schedule; plain otherwise, rematerialised by `jax.checkpoint` with the named policy if `remat`."""
  if schedule == CPU_MEMORY:
    return ordered_call(module, *args, remat=remat)
  if remat:
    return nn.remat(_call, policy=schedule_lib.remat_policy(remat_policy))(module, *args)
  return module(*args)


def shifted(x: jax.Array, axis: int, offset: int) -> jax.Array:
  """y[..., i, ...] = x[..., i + offset, ...] along `axis`, zero where i + offset is out of range.

  A slice plus an edge pad, which XLA fuses into the consuming elementwise op.
  """
  if offset == 0:
    return x
  size = x.shape[axis]
  start, stop = max(offset, 0), size + min(offset, 0)
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (max(-offset, 0), max(offset, 0), 0)
  return jax.lax.pad(jax.lax.slice_in_dim(x, start, stop, axis=axis), jnp.zeros((), x.dtype),
                     config)


@cpu_only
def _depthwise_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid depthwise 3x3 cross-correlation: nine shifted products in one fused loop."""
  height, width = x.shape[1] - 2, x.shape[2] - 2
  out = None
  for i in range(3):
    for j in range(3):
      term = x[:, i:i + height, j:j + width, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _custom_vjp_saving_inputs(primal: Callable, backward: Callable) -> Callable:
  """`primal` with a custom VJP: its inputs are the residuals of `backward(inputs, cotangent)`."""
  fn = jax.custom_vjp(primal)
  fn.defvjp(lambda *args: (primal(*args), args), backward)
  return fn


# Bytes of x and dy that one pass of the depthwise kernel gradient's nine tap sums reads: about a
# third of a 32 MiB L3, so that the nine passes over a chunk of frames hit the cache.
_TAP_SUM_CHUNK_BYTES = 10 * 2**20


def _tap_sums(x: jax.Array, dy: jax.Array) -> jax.Array:
  """(3, 3, C): tap (i, j) is the sum over (n, h, w) of x[n, h + i, w + j] * dy[n, h, w]."""
  return jnp.stack([
      jnp.stack([jnp.sum(x * jnp.pad(dy, ((0, 0), (i, 2 - i), (j, 2 - j), (0, 0))),
                         axis=(0, 1, 2)) for j in range(3)]) for i in range(3)])


def _frames_per_chunk(x: jax.Array, dy: jax.Array) -> int:
  """Frames per chunk of `_chunked_tap_sums`: the most that divide N and fit _TAP_SUM_CHUNK_BYTES,
  or all N when x and dy fit a few chunks anyway, no chunk of 2 or more frames fits, or the
  program runs on several devices (whose frames a loop over chunks would gather)."""
  frames = x.shape[0]
  if jax.sharding.get_abstract_mesh().size > 1:
    return frames
  frame_bytes = (math.prod(x.shape[1:]) + math.prod(dy.shape[1:])) * x.dtype.itemsize
  if frames * frame_bytes <= 3 * _TAP_SUM_CHUNK_BYTES:
    return frames
  fitting = [k for k in range(2, frames)
             if frames % k == 0 and k * frame_bytes <= _TAP_SUM_CHUNK_BYTES]
  return max(fitting, default=frames)


def _chunked_tap_sums(x: jax.Array, dy: jax.Array) -> jax.Array:
  """`_tap_sums` accumulated over chunks of frames. Each tap sum reads x and dy once; over whole
  full-resolution maps the nine reads stream from memory, over a chunk that fits the cache only
  the first does (at (18, 128, 128, 32): 17 against 28 ms, docs/benchmarks.md)."""
  frames_per_chunk = _frames_per_chunk(x, dy)
  if frames_per_chunk == x.shape[0]:
    return _tap_sums(x, dy)
  chunks = x.shape[0] // frames_per_chunk
  chunked = tuple(a.reshape(chunks, frames_per_chunk, *a.shape[1:]) for a in (x, dy))

  def accumulate(total, chunk):
    return total + _tap_sums(*chunk).astype(jnp.float32), None

  return jax.lax.scan(accumulate, jnp.zeros((3, 3, x.shape[-1]), jnp.float32), chunked)[0]


@cpu_only
def _depthwise_bwd(residuals, dy):
  # Autodiff of the nine slices would build nine padded cotangents per conv (which XLA keeps
  # live at once); the transposed conv is again one fused depthwise pass. Each kernel tap's
  # gradient pads dy to x's size rather than slicing x: XLA:CPU materialises the nine slices
  # (and keeps them live together), while the pads fuse into the reductions.
  x, kernel = residuals
  dy_padded = jnp.pad(dy, ((0, 0), (2, 2), (2, 2), (0, 0)))
  dx = _depthwise_valid(dy_padded, kernel[::-1, ::-1])
  dkernel = _chunked_tap_sums(x, dy)[:, :, None, :]
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_depthwise_valid_vjp = _custom_vjp_saving_inputs(_depthwise_valid, _depthwise_bwd)


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, padding: int = 1) -> jax.Array:
  """Depthwise 3x3 cross-correlation with zero padding 0 or 1, as a sum of nine shifted products.

  One fused elementwise loop (forward and, via a custom VJP, backward): faster than a grouped
  convolution on CPU, where XLA lowers feature groups poorly. x: (N, H, W, C); kernel: (3, 3, 1, C).
  """
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return _depthwise_valid_vjp(x, kernel)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_nhwc(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding),) * 2,
                                      dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_nhwc(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """Stride-1 NHWC/HWIO convolution whose gradients are NHWC/HWIO convolutions again.

  Autodiff's gradient convolutions have transposed dimension orders (weight gradient
  `f01b_i01o->01bf`). XLA:CPU rewrites them into its fast kernels' order at the top level but
  not inside a while loop, i.e. in a scanned block's backward pass, where it runs them with a
  naive loop nest 30-50x slower. Here the transposes are explicit, so every pass is canonical.
  """
  return _conv_nhwc(x, kernel, padding)


def _conv2d_nhwc_fwd(x, kernel, padding):
  return _conv_nhwc(x, kernel, padding), (x, kernel)


@cpu_only
def _conv2d_nhwc_bwd(padding, residuals, dy):
  x, kernel = residuals
  size = kernel.shape[0]
  dx = _conv_nhwc(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), size - 1 - padding)
  # dkernel[i, j, c, o] = sum over (n, h, w) of x_padded[n, h + i, w + j, c] dy[n, h, w, o]: a
  # convolution of x_padded with channels as batch and batch as channels, by dy as the kernel.
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dkernel = _conv_nhwc(padded.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), 0)
  return dx.astype(x.dtype), dkernel.transpose(1, 2, 0, 3).astype(kernel.dtype)


conv2d_nhwc.defvjp(_conv2d_nhwc_fwd, _conv2d_nhwc_bwd)


def _pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 convolution: x (..., C), kernel (C, D)."""
  return jnp.einsum("...c,cd->...d", x, kernel)


@cpu_only
def _pointwise_bwd(residuals, dy):
  # Autodiff's weight gradient contracts x and dy over all their pixel axes at once; XLA:CPU then
  # writes one operand transposed for its matrix product, from the fusion that produces it (for a
  # conv feeding a depthwise conv, dy's nine taps, ~7x slower written that way). As a product of
  # (pixels, C) and (pixels, D) views both operands are read in place.
  x, kernel = residuals
  dx = jnp.einsum("...d,cd->...c", dy, kernel)
  dkernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]),
                                (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


# The 1x1 convolution of the "cpu_memory" schedule: a weight gradient without transposes.
pointwise_conv = _custom_vjp_saving_inputs(_pointwise, _pointwise_bwd)


class Conv2d(nn.Module):
  """torch.nn.Conv2d (stride 1, zero padding, default kernel_size // 2) on NHWC.

  Kernel layout (kh, kw, in/groups, out). With `output_splits` = n > 1 the output channels form n
  equal blocks computed separately: `conv(x)` returns all n as a tuple and `conv(x, part=i)` only
  block i, so that a caller can order the blocks and XLA need not keep a wide projection alive at
  once. A depthwise conv maps blocks to blocks: it takes the tuple of all n blocks, or block i with
  `part=i`. `schedule` "cpu_memory" computes depthwise 3x3 convs as nine shifted products
  (`depthwise_conv3x3`), 1x1 convs through `pointwise_conv` and other ungrouped convs through
  `conv2d_nhwc`; "plain" (the default) lets autodiff differentiate one `conv_general_dilated` (a
  matrix product for 1x1 convs).
  """
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  groups: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = torch_kernel_init
  padding: int | None = None
  output_splits: int = 1
  schedule: str = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array | tuple[jax.Array, ...],
               part: int | None = None) -> jax.Array | tuple[jax.Array, ...]:
    depthwise = self.groups > 1 and self.groups == self.features
    if isinstance(x, (tuple, list)) and not (depthwise and part is None):
      raise ValueError("only a depthwise Conv2d takes a tuple (of all its channel blocks)")
    splits = len(x) if isinstance(x, (tuple, list)) else self.output_splits
    parts = tuple(range(splits)) if part is None else (part,)
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,) * len(parts)
    in_features = self.features if depthwise else inputs[0].shape[-1]
    k = self.kernel_size
    kernel = gathered(self.param("kernel", self.kernel_init,
                                 (k, k, in_features // self.groups, self.features)))
    kernels = jnp.split(kernel.astype(self.dtype), splits, axis=-1)
    if self.use_bias:
      bias = self.param("bias", torch_bias_init(k * k * in_features // self.groups),
                        (self.features,))
      biases = jnp.split(bias.astype(self.dtype), splits)
    pad = k // 2 if self.padding is None else self.padding
    block_groups = self.groups // splits if depthwise else self.groups
    outs = []
    for i, xi in zip(parts, inputs):
      xi = xi.astype(self.dtype)
      if k == 1 and self.groups == 1 and pad == 0:
        y = (pointwise_conv if self.schedule == CPU_MEMORY else _pointwise)(xi, kernels[i][0, 0])
      elif k == 3 and depthwise and self.schedule == CPU_MEMORY:
        y = depthwise_conv3x3(xi, kernels[i], pad)
      elif block_groups == 1 and self.schedule == CPU_MEMORY:
        y = conv2d_nhwc(xi, kernels[i], pad)
      else:
        y = jax.lax.conv_general_dilated(
            xi, kernels[i], (1, 1), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=block_groups)
      outs.append(y + biases[i] if self.use_bias else y)
    return tuple(outs) if len(outs) > 1 else outs[0]


class Conv3d(nn.Module):
  """torch.nn.Conv3d 3x3x3, stride 1, zero padding 1, with bias, on NTHWC; kernel (kt, kh, kw, in, out).

  In the "cpu_memory" schedule it is three 2-D convolutions of all frames, one per temporal tap,
  whose outputs are summed with a shift in time (zero beyond the ends): XLA's CPU 3-D convolution
  is ~3x slower than its 2-D one. "plain" is one 3-D convolution.
  """
  features: int
  dtype: Dtype = jnp.float32
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    kernel = gathered(self.param("kernel", torch_kernel_init,
                                 (3, 3, 3, in_features, self.features)))
    bias = self.param("bias", torch_bias_init(27 * in_features), (self.features,))
    if self.schedule != CPU_MEMORY:
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype), (1, 1, 1), ((1, 1),) * 3,
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
      return y + bias.astype(self.dtype)
    with jax.named_scope(CPU_ONLY_SCOPE):
      return self._as_2d_taps(x, kernel, bias)

  def _as_2d_taps(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    batch, time, height, width, in_features = x.shape
    frames = x.astype(self.dtype).reshape(batch * time, height, width, in_features)
    y = bias.astype(self.dtype)
    for dt in range(3):
      tap = jax.lax.conv_general_dilated(
          frames, kernel[dt].astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y + shifted(tap.reshape(batch, time, height, width, self.features), 1, dt - 1)
    return y


def _channel_mean(x: jax.Array) -> jax.Array:
  """Mean over the last axis, keeping it, as a matrix-vector product with a 1/C vector."""
  features = x.shape[-1]
  return jnp.dot(x, jnp.full((features, 1), 1.0 / features, x.dtype), precision="highest")


def _normalise(x: jax.Array, weight: jax.Array, bias: jax.Array | None):
  """Restormer's LayerNorm of float32 `x` (BiasFree when `bias` is None) through `_channel_mean`;
  also returns the per-pixel mean and standard deviation."""
  mean = _channel_mean(x)
  centred = x - mean
  std = jnp.sqrt(_channel_mean(jnp.square(centred)) + 1e-5)
  if bias is None:
    return x / std * weight, mean, std
  return centred / std * weight + bias, mean, std


@jax.custom_vjp
def _layer_norm_cpu(x: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
  return _normalise(x, weight, bias)[0]


def _layer_norm_cpu_fwd(x, weight, bias):
  y, mean, std = _normalise(x, weight, bias)
  return y, (x, mean, 1 / std, weight, bias)


@cpu_only
def _layer_norm_cpu_bwd(residuals, dy):
  # Autodiff turns the broadcasts of the per-pixel statistics into sums over the channel axis
  # (32 to 128 contiguous values per pixel), which XLA:CPU runs 3-4x slower than these
  # `_channel_mean` products (docs/benchmarks.md).
  x, mean, inv_std, weight, bias = residuals
  dnormed = dy * weight
  pixels = tuple(range(dy.ndim - 1))
  if bias is None:  # y = x * inv_std * w, inv_std from the centred variance
    dx = inv_std * (dnormed - jnp.square(inv_std) * (x - mean) * _channel_mean(dnormed * x))
    return dx, jnp.sum(dy * x * inv_std, pixels), None
  normed = (x - mean) * inv_std
  dx = inv_std * (dnormed - _channel_mean(dnormed) - normed * _channel_mean(dnormed * normed))
  return dx, jnp.sum(dy * normed, pixels), jnp.sum(dy, pixels)


_layer_norm_cpu.defvjp(_layer_norm_cpu_fwd, _layer_norm_cpu_bwd)


class LayerNormBody(nn.Module):
  """Restormer's per-pixel LayerNorm over channels (biased variance, eps 1e-5 inside the sqrt).

  `with_bias=False` is the "BiasFree" variant: no mean subtraction and no bias, x / sqrt(var + eps) * w.
  Statistics are computed in float32 whatever the compute dtype. In the "cpu_memory" schedule they
  are matrix-vector products with a 1/C vector, forward and (by a custom VJP) backward: XLA:CPU
  then normalises in a plain elementwise loop. With reductions it forms a reduction fusion that
  materialises the weight and bias broadcasts (a full activation each) when one norm is applied to
  several inputs, as in the cross-attention blocks, and its backward sums over the channel axis
  run 3-4x slower than the products. "plain" uses reductions.
  """
  with_bias: bool = True
  dtype: Dtype = jnp.float32
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,)) if self.with_bias else None
    x32 = x.astype(jnp.float32)
    if self.schedule == CPU_MEMORY:
      with jax.named_scope(CPU_ONLY_SCOPE):
        return _layer_norm_cpu(x32, weight, bias).astype(self.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    if self.with_bias:
      y = (x32 - mean) / jnp.sqrt(var + 1e-5) * weight + bias
    else:
      y = x32 / jnp.sqrt(var + 1e-5) * weight
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """The reference `LayerNorm(dim, type)` wrapper; its parameters live in `body` as in PyTorch."""
  layer_norm_type: str = "WithBias"
  dtype: Dtype = jnp.float32
  schedule: str = CPU_MEMORY

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return LayerNormBody(self.layer_norm_type != "BiasFree", self.dtype, self.schedule,
                         name="body")(x)


def pixel_unshuffle(x: jax.Array, factor: int = 2) -> jax.Array:
  """torch.nn.PixelUnshuffle on NHWC: output channel c*f*f + i*f + j holds pixel (f*y+i, f*x+j)."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(n, h // factor, w // factor, c * factor * factor)


def _interp_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """Linear interpolation along one axis with align_corners=True (PyTorch's index arithmetic)."""
  in_size = x.shape[axis]
  if out_size == 1 or in_size == 1:
    return jnp.take(x, jnp.zeros((out_size,), jnp.int32), axis=axis)
  scale = jnp.float32(in_size - 1) / jnp.float32(out_size - 1)
  src = jnp.arange(out_size, dtype=jnp.float32) * scale
  lo = jnp.floor(src).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(jnp.float32)).astype(x.dtype)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = frac.reshape(shape)
  return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


def upsample_bilinear_align_corners(x: jax.Array, factor: int = 2) -> jax.Array:
  """nn.Upsample(scale_factor=factor, mode='bilinear', align_corners=True) on NHWC."""
  x = _interp_axis(x, 2, x.shape[2] * factor)
  return _interp_axis(x, 1, x.shape[1] * factor)


def head_affinities(q: jax.Array, k: jax.Array, heads: int) -> jax.Array:
  """Per-head normalize(q) normalize(k)^T for transposed (channel) attention, in float32.

  q, k: (N, H, W, C); head h owns channels [h*C/heads, (h+1)*C/heads); the L2 norms run over the
  pixels and are clamped at 1e-12 like F.normalize. Returns (N, heads, C/heads, C/heads). The full
  C x C Gram matrix is formed in the native (N, pixels, C) layout (no transposes; the extra
  off-diagonal blocks cost ~2*C^2 FLOPs per pixel, negligible next to the convolutions) and its
  diagonal blocks are kept. Normalising after the product equals normalising before it.
  """
  n, c = q.shape[0], q.shape[-1]
  q = q.reshape(n, -1, c)
  k = k.reshape(n, -1, c)
  gram = jnp.einsum("npc,npd->ncd", q, k, preferred_element_type=jnp.float32)
  d = c // heads
  blocks = gram.reshape(n, heads, d, heads, d)[:, jnp.arange(heads), :, jnp.arange(heads), :]
  blocks = blocks.transpose(1, 0, 2, 3)  # advanced indexing put the head axis first
  q_norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(q.astype(jnp.float32)), axis=1)), 1e-12)
  k_norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(k.astype(jnp.float32)), axis=1)), 1e-12)
  return blocks / (q_norm.reshape(n, heads, d, 1) * k_norm.reshape(n, heads, 1, d))


def apply_head_attention(attn: jax.Array, v: jax.Array) -> jax.Array:
  """out[n, y, x, h*d + i] = sum_j attn[n, h, i, j] v[n, y, x, h*d + j] (merged heads).

  attn: (N, heads, d, d); v: (N, H, W, heads*d). Uses the block-diagonal C x C matrix so that v
  stays in its (N, pixels, C) layout.
  """
  n, heads, d, _ = attn.shape
  block_diag = jnp.einsum("nhij,hg->nhigj", attn, jnp.eye(heads, dtype=attn.dtype))
  block_diag = block_diag.reshape(n, heads * d, heads * d).astype(v.dtype)
  return jnp.einsum("nyxj,nij->nyxi", v, block_diag)


def leaky_relu(x: jax.Array, slope: float) -> jax.Array:
  return jnp.where(x >= 0, x, slope * x)
