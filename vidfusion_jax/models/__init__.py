"""Model registry: build the ported networks from the official PyTorch constructor configs."""

from typing import Any, Callable, Mapping

import flax.linen as nn

from vidfusion_jax.models import sea_raft
from vidfusion_jax.models import temcoco
from vidfusion_jax.models.temcoco import TemCoCo
from vidfusion_jax.models.videofusion import VideoFusion

_VIDEOFUSION_TYPE = "VideoFusion_Trans"
_VIDEOFUSION_KEYS = frozenset({
    "type", "in_channels", "out_channels", "num_features", "num_blocks", "num_decoder_blocks",
    "num_heads", "ffn_expansion_factor", "bias", "LayerNorm_type", "embed_dim", "groups"})
_LAYER_NORM_TYPES = ("WithBias", "BiasFree")


def _int_list(cfg: Mapping[str, Any], key: str, length: int) -> tuple[int, ...]:
  value = cfg[key]
  if (not isinstance(value, (list, tuple)) or len(value) != length or
      not all(isinstance(v, int) and v > 0 for v in value)):
    raise ValueError(f"network_g.{key} must be a list of {length} positive ints; got {value!r}")
  return tuple(value)


def videofusion_from_reference_config(cfg: Mapping[str, Any], **overrides: Any) -> VideoFusion:
  """VideoFusion from the YAML `network_g` mapping of the official repository (keys as written)."""
  unknown = sorted(set(cfg) - _VIDEOFUSION_KEYS)
  if unknown:
    raise ValueError(f"unknown VideoFusion network_g keys {unknown}; "
                     f"supported: {sorted(_VIDEOFUSION_KEYS)}")
  if cfg.get("type", _VIDEOFUSION_TYPE) != _VIDEOFUSION_TYPE:
    raise ValueError(f"network_g.type must be {_VIDEOFUSION_TYPE!r}; got {cfg['type']!r}")
  kwargs: dict[str, Any] = {}
  for key in ("in_channels", "out_channels", "num_features", "num_decoder_blocks"):
    if key in cfg:
      if not isinstance(cfg[key], int) or cfg[key] <= 0:
        raise ValueError(f"network_g.{key} must be a positive int; got {cfg[key]!r}")
      kwargs[key] = cfg[key]
  for key in ("num_blocks", "num_heads"):
    if key in cfg:
      kwargs[key] = _int_list(cfg, key, 3)
  if "ffn_expansion_factor" in cfg:
    kwargs["ffn_expansion_factor"] = float(cfg["ffn_expansion_factor"])
  if "bias" in cfg:
    if not isinstance(cfg["bias"], bool):
      raise ValueError(f"network_g.bias must be true or false; got {cfg['bias']!r}")
    kwargs["bias"] = cfg["bias"]
  if "LayerNorm_type" in cfg:
    if cfg["LayerNorm_type"] not in _LAYER_NORM_TYPES:
      raise ValueError(f"network_g.LayerNorm_type must be one of {_LAYER_NORM_TYPES}; "
                       f"got {cfg['LayerNorm_type']!r}")
    kwargs["layer_norm_type"] = cfg["LayerNorm_type"]
  # `embed_dim` and `groups` only matter when a group equals 1 (unused Linear layers appear).
  if "embed_dim" in cfg and (not isinstance(cfg["embed_dim"], int) or cfg["embed_dim"] <= 0):
    raise ValueError(f"network_g.embed_dim must be a positive int; got {cfg['embed_dim']!r}")
  if "groups" in cfg and 1 in _int_list(cfg, "groups", 3):
    raise ValueError("network_g.groups containing 1 (which adds unused ln1/ln2 Linear layers to "
                     f"the reference) is not supported; got {cfg['groups']!r}")
  features = kwargs.get("num_features", VideoFusion.num_features)
  if features % 4 or features < 16:
    raise ValueError("network_g.num_features must be a multiple of 4 and >= 16 (the channel "
                     f"attention hidden width is num_features // 16); got {features}")
  fields = set(VideoFusion.__dataclass_fields__) - {"parent", "name"}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown VideoFusion overrides {bad}; fields: {sorted(fields)}")
  return VideoFusion(**{**kwargs, **overrides})


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "videofusion": videofusion_from_reference_config,
    "temcoco": temcoco.from_reference_config,
    "sea_raft": sea_raft.from_reference_config,
}


def from_reference_config(name: str, cfg: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """Builds model `name` from its official PyTorch constructor mapping.

  `overrides` set module fields by their Python names, e.g. `dtype=jnp.bfloat16`, `remat=True`.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(_BUILDERS)}")
  return _BUILDERS[name](cfg, **overrides)


__all__ = ["TemCoCo", "VideoFusion", "from_reference_config", "videofusion_from_reference_config"]
