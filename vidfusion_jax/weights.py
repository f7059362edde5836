"""PyTorch <-> Flax weight conversion for the ported models.

A PyTorch state_dict (name -> numpy array, PyTorch names and layouts) maps to the Flax params tree by a
name transform (`a.b.0.1.c.weight` -> `a/b_0_1/c/kernel`: numeric indices join the preceding name;
conv `weight` becomes `kernel`) plus a layout transform (Conv2d (O, I/g, kh, kw) -> (kh, kw, I/g, O),
Conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O), attention `temperature` (h, 1, 1) -> (h,)).
Every model registers a `TorchMapping` in `_MAPPINGS`; its `abstract_params` gives the Flax params
expected for a given state_dict, against which names and shapes are checked. Blocks that a model
scans have their params stacked along a leading axis: the mapping's `unstack`/`stack` convert
between that layout and one entry per PyTorch block.
"""

import dataclasses
import os
import re
from typing import Any, Callable, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vidfusion_jax import files
from vidfusion_jax import models
from vidfusion_jax.models import naming
from vidfusion_jax.models import resnet
from vidfusion_jax.models import sea_raft
from vidfusion_jax.models import teachers
from vidfusion_jax.models import temcoco

StateDict = dict[str, np.ndarray]
FlaxPath = tuple[str, ...]

_INDEX_SUFFIX = re.compile(r"^(.*?[A-Za-z])((?:_\d+)+)$")


def torch_name_to_flax_path(name: str, ndim: int) -> FlaxPath:
  """`conv3d_ir_1.module.0.weight` (5-D) -> ('conv3d_ir_1', 'module_0', 'kernel')."""
  return naming.torch_name_to_flax_path(name, ndim, kernel_ndims=(4, 5))


def flax_path_to_torch_name(path: FlaxPath) -> str:
  """Inverse of `torch_name_to_flax_path`; the first (top-level) name is kept verbatim."""
  parts = [path[0]]
  for part in path[1:-1]:
    match = _INDEX_SUFFIX.match(part)
    parts.append(match.group(1) + match.group(2).replace("_", ".") if match else part)
  parts.append("weight" if path[-1] == "kernel" else path[-1])
  return ".".join(parts)


def torch_to_flax_layout(path: FlaxPath, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if path[-1] == "kernel" and array.ndim == 5:
    return array.transpose(2, 3, 4, 1, 0)
  if path[-1] == "temperature":
    return array.reshape(array.shape[0])
  return array


def flax_to_torch_layout(path: FlaxPath, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if path[-1] == "kernel" and array.ndim == 5:
    return array.transpose(4, 3, 0, 1, 2)
  if path[-1] == "temperature":
    return array.reshape(array.shape[0], 1, 1)
  return array


@dataclasses.dataclass(frozen=True)
class TorchMapping:
  """How one model's state_dict maps to its Flax params.

  abstract_params: state_dict -> the expected Flax params tree (leaves with .shape, e.g. from
    `jax.eval_shape`), usually by inferring the constructor config from a few tensor shapes.
  The name/layout functions default to the generic PyTorch conventions above.
  buffers: constant non-parameter tensors of the state_dict (e.g. TemCoCo's int64 attention index
    buffers): required and compared on import, regenerated on export, never part of the params.
  prepare: state_dict -> the state_dict to import, dropping (after checking) tensors the forward
    does not read, e.g. SEA-RAFT's BatchNorm counters and its aliased shortcut BatchNorms.
  unstack: flat params (path -> leaf) -> one entry per PyTorch block (stacked leaves split);
    leaves may be arrays or ShapeDtypeStructs. stack: its inverse, on arrays.
  """
  abstract_params: Callable[[Mapping[str, np.ndarray]], Any]
  to_flax_path: Callable[[str, int], FlaxPath] = torch_name_to_flax_path
  to_torch_name: Callable[[FlaxPath], str] = flax_path_to_torch_name
  to_flax_layout: Callable[[FlaxPath, np.ndarray], np.ndarray] = torch_to_flax_layout
  to_torch_layout: Callable[[FlaxPath, np.ndarray], np.ndarray] = flax_to_torch_layout
  buffers: Callable[[], Mapping[str, np.ndarray]] = dict
  prepare: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] = dict
  unstack: Callable[[Mapping[FlaxPath, Any]], dict[FlaxPath, Any]] = dict
  stack: Callable[[Mapping[FlaxPath, Any]], dict[FlaxPath, Any]] = dict


def _count_indices(state_dict: Mapping[str, Any], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  return len({m.group(1) for m in map(pattern.match, state_dict) if m})


def _require(state_dict: Mapping[str, Any], name: str) -> np.ndarray:
  if name not in state_dict:
    raise ValueError(f"missing tensor {name!r} (needed to infer the model config)")
  return np.asarray(state_dict[name])


def infer_videofusion_config(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The reference `network_g` mapping that produced a VideoFusion state_dict (dead keys omitted)."""
  conv_in = _require(state_dict, "conv3d_ir_1.module.0.weight")
  features = conv_in.shape[0]
  project_in = _require(state_dict, "fusion_1.cross_transformer.ffn.project_in.weight")
  heads = [_require(state_dict, f"fusion_{s}.cross_transformer.attn.temperature").shape[0]
           for s in (1, 2, 3)]
  return {
      "in_channels": int(conv_in.shape[1]),
      "out_channels": int(_require(state_dict, "decoder_fusion.conv.2.weight").shape[0]),
      "num_features": int(features),
      "num_blocks": [_count_indices(state_dict, "fusion_enhance_1.transformer"),
                     _count_indices(state_dict, "fusion_enhance_2.transformer"),
                     _count_indices(state_dict, "co_attention_3.layers")],
      "num_decoder_blocks": _count_indices(state_dict, "decoder_fusion.decoder"),
      "num_heads": [int(h) for h in heads],
      "ffn_expansion_factor": project_in.shape[0] // 2 / features,
      "bias": "fusion_1.cross_transformer.attn.q.bias" in state_dict,
      "LayerNorm_type": ("WithBias" if "fusion_1.cross_transformer.norm1.body.bias" in state_dict
                         else "BiasFree"),
  }


def abstract_model_params(model, sample_shape: tuple[int, ...]) -> Any:
  """Shapes of `model`'s params, from tracing `init` on zeros of `sample_shape` (nothing computed)."""
  sample = jnp.zeros(sample_shape, jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), sample, sample))["params"]


# VideoFusion's scanned blocks: (child of a top-level module) -> stacked along axis 0, one entry
# per PyTorch block `<name>.<i>` (flax path element `<name>_<i>`).
_VIDEOFUSION_STACKED = ("transformer", "layers", "decoder", "blocks_0")
_VIDEOFUSION_BLOCK = re.compile(r"^(%s)_(\d+)$" % "|".join(_VIDEOFUSION_STACKED))


def _leaf_at(leaf: Any, index: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return np.asarray(leaf)[index]


def _videofusion_unstack(flat: Mapping[FlaxPath, Any]) -> dict[FlaxPath, Any]:
  out = {}
  for path, leaf in flat.items():
    if len(path) > 2 and path[1] in _VIDEOFUSION_STACKED:
      for i in range(leaf.shape[0]):
        out[(path[0], f"{path[1]}_{i}", *path[2:])] = _leaf_at(leaf, i)
    else:
      out[path] = leaf
  return out


def _videofusion_stack(flat: Mapping[FlaxPath, Any]) -> dict[FlaxPath, Any]:
  blocks: dict[FlaxPath, dict[int, Any]] = {}
  out = {}
  for path, leaf in flat.items():
    match = _VIDEOFUSION_BLOCK.match(path[1]) if len(path) > 2 else None
    if match:
      blocks.setdefault((path[0], match.group(1), *path[2:]), {})[int(match.group(2))] = leaf
    else:
      out[path] = leaf
  for path, by_index in blocks.items():
    out[path] = np.stack([by_index[i] for i in range(len(by_index))])
  return out


def _videofusion_abstract_params(state_dict: Mapping[str, np.ndarray]) -> Any:
  cfg = infer_videofusion_config(state_dict)
  model = models.from_reference_config("videofusion", cfg)
  return abstract_model_params(model, (1, 2, 4, 4, cfg["in_channels"]))


_MAPPINGS: dict[str, TorchMapping] = {
    "videofusion": TorchMapping(_videofusion_abstract_params, unstack=_videofusion_unstack,
                                stack=_videofusion_stack),
    "temcoco": TorchMapping(temcoco.abstract_params, buffers=temcoco.state_dict_buffers,
                            **temcoco.TORCH_NAMING),
    "vgg19": TorchMapping(teachers.vgg19_abstract_params, **teachers.TORCH_NAMING),
    "dinov2": TorchMapping(teachers.dinov2_abstract_params, **teachers.TORCH_NAMING),
    "sea_raft": TorchMapping(sea_raft.abstract_params, prepare=sea_raft.drop_aliases,
                             **sea_raft.TORCH_NAMING),
    "resnet18": TorchMapping(resnet.abstract_params, prepare=resnet.drop_counters,
                             **sea_raft.TORCH_NAMING),
}


def _mapping(name: str) -> TorchMapping:
  if name not in _MAPPINGS:
    raise ValueError(f"no weight mapping for model {name!r}; known: {sorted(_MAPPINGS)}")
  return _MAPPINGS[name]


def _name_list(names) -> str:
  names = sorted(names)
  shown = ", ".join(repr(n) for n in names[:10])
  return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Flax params (the tree under "params") of model `name` from a PyTorch state_dict.

  Raises ValueError naming any missing, unexpected or mis-shaped tensor.
  """
  mapping = _mapping(name)
  state_dict = {k: np.asarray(v) for k, v in mapping.prepare(state_dict).items()}
  abstract_params = traverse_util.flatten_dict(mapping.abstract_params(state_dict))
  expected = {mapping.to_torch_name(path): (path, leaf)
              for path, leaf in mapping.unstack(abstract_params).items()}
  buffers = mapping.buffers()
  for buffer_name, value in buffers.items():
    if buffer_name in state_dict and not np.array_equal(state_dict[buffer_name], value):
      raise ValueError(f"buffer {buffer_name!r} differs from the one the {name} model computes")
  missing = (set(expected) | set(buffers)) - set(state_dict)
  unexpected = set(state_dict) - set(expected) - set(buffers)
  if missing or unexpected:
    problems = []
    if missing:
      problems.append(f"missing tensors: {_name_list(missing)}")
    if unexpected:
      problems.append(f"unexpected tensors: {_name_list(unexpected)}")
    raise ValueError(f"state_dict does not match the {name} model: " + "; ".join(problems))
  flat = {}
  for torch_name, (path, leaf) in expected.items():
    array = state_dict[torch_name]
    converted = mapping.to_flax_layout(path, array)
    if tuple(converted.shape) != tuple(leaf.shape):
      expected_torch = mapping.to_torch_layout(path, np.empty(leaf.shape, np.float32)).shape
      raise ValueError(f"tensor {torch_name!r} has shape {tuple(array.shape)}, the {name} model "
                       f"expects {tuple(expected_torch)}")
    flat[path] = np.ascontiguousarray(converted, dtype=leaf.dtype)
  return traverse_util.unflatten_dict(mapping.stack(flat))


def to_torch_state_dict(name: str, params: Mapping[str, Any]) -> StateDict:
  """PyTorch state_dict (numpy arrays, PyTorch names and layouts) of Flax params (or variables)."""
  mapping = _mapping(name)
  if set(params) == {"params"}:
    params = params["params"]
  state_dict = {}
  for path, leaf in mapping.unstack(traverse_util.flatten_dict(params)).items():
    state_dict[mapping.to_torch_name(path)] = np.ascontiguousarray(
        mapping.to_torch_layout(path, np.asarray(leaf)))
  state_dict.update((k, np.array(v)) for k, v in mapping.buffers().items())
  return state_dict


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading/writing .pth checkpoints needs PyTorch: "
                      "pip install 'vidfusion-jax[torch]'") from e
  return torch


def load_torch_checkpoint(path: str | os.PathLike) -> StateDict:
  """State_dict of a PyTorch checkpoint (BasicSR `{"params": ...}` or a bare state_dict).

  Loads with `weights_only=True` and strips a leading `module.` (DataParallel / DDP). `path` may
  be a `gs://` / `s3://` URL (downloaded to a temporary file first).
  """
  torch = _import_torch()
  with files.local_copy(path) as local:
    checkpoint = torch.load(os.fspath(local), map_location="cpu", weights_only=True)
  if isinstance(checkpoint, dict) and isinstance(checkpoint.get("params"), dict):
    checkpoint = checkpoint["params"]
  if not isinstance(checkpoint, dict):
    raise ValueError(f"{path}: expected a state_dict or a BasicSR {{'params': state_dict}}; "
                     f"got {type(checkpoint).__name__}")
  return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in checkpoint.items()}


def save_torch_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes `state_dict` as a BasicSR checkpoint `{"params": state_dict}` that PyTorch loads."""
  torch = _import_torch()
  torch.save({"params": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}},
             os.fspath(path))

