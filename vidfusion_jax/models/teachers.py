"""Frozen distillation teachers of TemCoCo: VGG19 `features[:12]` and the DINOv2 ViT.

Both run on raw [0, 1] RGB (no ImageNet normalisation, as the reference does), channels-last.
Parameters mirror the official PyTorch state dicts (torchvision `vgg19`, facebookresearch `dinov2`)
with TemCoCo's naming and layout rules; `vidfusion_jax.weights` imports and exports them under the
names "vgg19" and "dinov2".
"""

import functools
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax.models import temcoco

# torchvision vgg19().features[:12]: conv indices and widths (ReLU after each, max-pool at 4 and 9).
VGG_CONVS = ((0, 64), (2, 64), (5, 128), (7, 128), (10, 256))
VGG_POOL_AFTER = (2, 7)

DINO_PATCH = 14
DINO_GRID = 37  # img_size 518 / patch 14: the pos_embed grid side of every hub DINOv2.
DINO_INTERPOLATE_OFFSET = 0.1
DINO_MLP_RATIO = 4
# The hub `dinov2_vitl14` construction.
VITL14 = dict(embed_dim=1024, depth=24, num_heads=16)


class _VGGLayers(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for index, features in VGG_CONVS:
      x = nn.relu(nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), name=str(index))(x))
      if index in VGG_POOL_AFTER:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


class VGG19Features(nn.Module):
  """`vgg19().features[:12]`, ending at relu3_1: (N, H, W, 3) -> (N, H/4, W/4, 256).

  Params live under `features` like the torchvision state dict (`features.0.weight`, ...).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _VGGLayers(name="features")(x)


def _bicubic_weights(src: np.ndarray, size: int, a: float = -0.75) -> np.ndarray:
  """(len(src), size) matrix of PyTorch's bicubic taps (a = -0.75, border indices clamped)."""
  floor = np.floor(src)
  t = src - floor
  near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1
  far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
  matrix = np.zeros((len(src), size))
  for offset, weight in zip((-1, 0, 1, 2), taps):
    index = np.clip(floor.astype(int) + offset, 0, size - 1)
    np.add.at(matrix, (np.arange(len(src)), index), weight)
  return matrix


def _linear_weights(out_size: int, in_size: int) -> np.ndarray:
  """(out, in) matrix of PyTorch's bilinear resize, align_corners=False, no antialias."""
  # Source coordinates in float32 arithmetic, as PyTorch computes them (keeps the match to ~1e-7).
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) -
                   np.float32(0.5), np.float32(0))
  low = np.minimum(np.floor(src).astype(int), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = (src - low.astype(np.float32)).astype(np.float64)
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.arange(out_size), low), 1 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """`F.interpolate(x, (height, width), mode="bilinear", align_corners=False)` on (N, H, W, C)."""
  rows = jnp.asarray(_linear_weights(height, x.shape[1]), x.dtype)
  cols = jnp.asarray(_linear_weights(width, x.shape[2]), x.dtype)
  return jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols, precision="highest")


def interpolate_pos_embed(pos_embed: jax.Array, rows: int, cols: int) -> jax.Array:
  """DINOv2 `interpolate_pos_encoding` for a rows x cols patch grid: (1, 1 + M*M, D) -> (1, 1 +
  rows*cols, D).

  Bicubic (a = -0.75, no antialias) with the 0.1 offset passed as a scale factor, so sources are
  (i + 0.5) * M / (n + 0.1) - 0.5 and not the output-size mapping.
  """
  if rows * cols == DINO_GRID ** 2 and rows == cols:
    return pos_embed
  cls_pos, grid = pos_embed[:, :1], pos_embed[0, 1:].reshape(DINO_GRID, DINO_GRID, -1)
  source = lambda n: (np.arange(n) + 0.5) * DINO_GRID / (n + DINO_INTERPOLATE_OFFSET) - 0.5
  row_w = jnp.asarray(_bicubic_weights(source(rows), DINO_GRID), jnp.float32)
  col_w = jnp.asarray(_bicubic_weights(source(cols), DINO_GRID), jnp.float32)
  grid = jnp.einsum("im,mnd,jn->ijd", row_w, grid.astype(jnp.float32), col_w,
                    precision="highest")
  return jnp.concatenate([cls_pos, grid.reshape(1, rows * cols, -1)], axis=1)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)


class LayerScale(nn.Module):
  """Per-channel scale `gamma` (DINOv2's LayerScale, init_values 1.0)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.param("gamma", nn.initializers.ones, (x.shape[-1],))


class DinoBlock(nn.Module):
  num_heads: int

  """Pre-norm block with LayerScale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + LayerScale(name="ls1")(Attention(self.num_heads, name="attn")(_layer_norm("norm1")(x)))
    return x + LayerScale(name="ls2")(Mlp(name="mlp")(_layer_norm("norm2")(x)))


class Attention(nn.Module):
  """Multi-head self-attention; the qkv features are laid out (3, heads, head_dim)."""
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return nn.Dense(d, name="proj")(out.reshape(b, n, d))


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.gelu(nn.Dense(DINO_MLP_RATIO * d, name="fc1")(x), approximate=False)
    return nn.Dense(d, name="fc2")(x)


class Blocks(nn.Module):
  depth: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = DinoBlock(self.num_heads, name=str(i))(x)
    return x


class DinoVisionTransformer(nn.Module):
  """DINOv2 ViT `forward_features` (no masks, no registers): (N, H, W, 3), H and W multiples of 14.

  Returns `x_norm_clstoken` (N, D), `x_norm_patchtokens` (N, H/14 * W/14, D) (row-major grid) and
  `x_prenorm` (N, 1 + Np, D).
  """
  embed_dim: int = VITL14["embed_dim"]
  depth: int = VITL14["depth"]
  num_heads: int = VITL14["num_heads"]

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    n, h, w, _ = x.shape
    if h % DINO_PATCH or w % DINO_PATCH:
      raise ValueError(f"DINOv2 input height and width must be multiples of {DINO_PATCH}; "
                       f"got {h}x{w}")
    d = self.embed_dim
    normal = nn.initializers.truncated_normal(0.02)
    cls_token = self.param("cls_token", normal, (1, 1, d))
    pos_embed = self.param("pos_embed", normal, (1, 1 + DINO_GRID ** 2, d))
    self.param("mask_token", nn.initializers.zeros, (1, d))  # unused without masks
    conv = functools.partial(nn.Conv, d, (DINO_PATCH, DINO_PATCH),
                             strides=(DINO_PATCH, DINO_PATCH), padding="VALID")
    patches = temcoco.Seq(conv, "proj", name="patch_embed")(x)
    rows, cols = h // DINO_PATCH, w // DINO_PATCH
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls_token, (n, 1, d)), patches.reshape(n, rows * cols, d)], axis=1)
    tokens = tokens + interpolate_pos_embed(pos_embed, rows, cols)
    tokens = Blocks(self.depth, self.num_heads, name="blocks")(tokens)
    normed = _layer_norm("norm")(tokens)
    return dict(x_norm_clstoken=normed[:, 0], x_norm_patchtokens=normed[:, 1:],
                x_prenorm=tokens)


@flax.struct.dataclass
class Teachers:
  """Frozen teacher parameters; the DINOv2 head count is static (it is not in the weights)."""
  vgg: Any
  dino: Any
  dino_num_heads: int = flax.struct.field(pytree_node=False, default=VITL14["num_heads"])


def dino_input_size(height: int, width: int) -> tuple[int, int]:
  """The reference resizes frames to (H//16*14, W//16*14): one patch per 16x16 student cell."""
  return height // 16 * DINO_PATCH, width // 16 * DINO_PATCH


def distillation_targets(teachers: Teachers, gt_ir: jax.Array,
                         gt_vi: jax.Array) -> dict[str, jax.Array]:
  """Teacher targets of `losses.temcoco_loss` from (B, T, H, W, 3) GT clips in [0, 1].

  `vgg_vi`: relu3_1 of the VIS frames (the reference drops its IR VGG term, so it is not computed);
  `dino_ir`, `dino_vi`: `x_norm_patchtokens` of the bilinearly resized frames. No gradients.
  """
  teachers = jax.lax.stop_gradient(teachers)
  frames = lambda x: x.reshape(-1, *x.shape[2:])
  vgg = VGG19Features().apply({"params": teachers.vgg}, frames(gt_vi))
  d = teachers.dino["cls_token"].shape[-1]
  depth = len(teachers.dino["blocks"])
  dino = DinoVisionTransformer(d, depth, teachers.dino_num_heads)
  size = dino_input_size(*gt_ir.shape[2:4])
  both = resize_bilinear(jnp.concatenate([frames(gt_ir), frames(gt_vi)]), *size)
  tokens = dino.apply({"params": teachers.dino}, both)["x_norm_patchtokens"]
  dino_ir, dino_vi = jnp.split(tokens, 2)
  return jax.lax.stop_gradient(dict(vgg_vi=vgg, dino_ir=dino_ir, dino_vi=dino_vi))


# ------------------------------------------------------------------------------------------------
# PyTorch checkpoints (registered as "vgg19" and "dinov2" in `vidfusion_jax.weights`).

TORCH_NAMING = dict(
    to_flax_path=temcoco.torch_name_to_flax_path,
    to_torch_name=temcoco.flax_path_to_torch_name,
    to_flax_layout=functools.partial(temcoco.torch_to_flax_layout, transposed_convs=()),
    to_torch_layout=functools.partial(temcoco.flax_to_torch_layout, transposed_convs=()))

_VGG_FEATURE = re.compile(r"^features\.(\d+)\.")
VGG_USED_LAYERS = 12


def vgg19_features_only(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops what `features[:12]` does not use from a torchvision `vgg19` state dict (later feature
  layers and `classifier.*`); every other name is kept so the importer can report it."""
  kept = {}
  for name, value in state_dict.items():
    match = _VGG_FEATURE.match(name)
    if name.startswith("classifier.") or (match and int(match.group(1)) >= VGG_USED_LAYERS):
      continue
    kept[name] = value
  return kept


def vgg19_abstract_params(state_dict: Any = None) -> Any:
  """The VGG19Features params tree as ShapeDtypeStructs."""
  del state_dict
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  return jax.eval_shape(VGG19Features().init, jax.random.key(0), x)["params"]


def dinov2_dims(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """embed_dim and depth of a DINOv2 ViT state dict (the head count is not in the weights)."""
  if "cls_token" not in state_dict:
    raise ValueError("not a DINOv2 ViT state dict: it has no 'cls_token'")
  blocks = {m.group(1) for m in map(re.compile(r"^blocks\.(\d+)\.").match, state_dict) if m}
  return dict(embed_dim=int(np.shape(state_dict["cls_token"])[-1]), depth=len(blocks))


def dinov2_abstract_params(state_dict: Mapping[str, Any]) -> Any:
  """The params tree of the DINOv2 ViT that `state_dict` describes (embed_dim and depth)."""
  # Parameter shapes do not depend on the head count; one head keeps any embed_dim valid.
  model = DinoVisionTransformer(**dinov2_dims(state_dict), num_heads=1)
  x = jax.ShapeDtypeStruct((1, DINO_PATCH, DINO_PATCH, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]
