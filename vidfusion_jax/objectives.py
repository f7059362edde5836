"""Per-model training objectives: how `config.model` becomes a network and a batch becomes a loss.

Each registered `Objective` gives the loss on the network outputs and, when the model is distilled
from frozen networks, a loader for their parameters (passed to the loss as `teachers`).
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vidfusion_jax import files
from vidfusion_jax import losses
from vidfusion_jax import models
from vidfusion_jax import weights
from vidfusion_jax.models import schedule
from vidfusion_jax.models import teachers as teacher_models

PyTree = Any
Batch = dict[str, jax.Array]
# (outputs, batch, teachers) -> (total loss, dict of named loss terms); batch holds float32 NTHWC
# clips in [0, 1] under the keys lq_ir, lq_vis, gt_ir, gt_vis.
LossFn = Callable[[dict[str, jax.Array], Batch, PyTree], tuple[jax.Array, dict[str, jax.Array]]]


def _no_teachers(config: ml_collections.ConfigDict) -> PyTree:
  del config
  return None


def _no_teacher_problems(config: ml_collections.ConfigDict) -> list[str]:
  del config
  return []


def reference_model(name: str) -> Callable[..., nn.Module]:
  """Builder of `models.from_reference_config(name, config.model.config, **overrides)`."""
  def build(model_config: ml_collections.ConfigDict, **overrides) -> nn.Module:
    reference = model_config.config
    if isinstance(reference, ml_collections.ConfigDict):
      reference = reference.to_dict()
    return models.from_reference_config(name, dict(reference), **overrides)
  return build


@dataclasses.dataclass(frozen=True)
class Objective:
  """How one model family trains: its network, its loss and its frozen teachers (if any).

  `build_model(config.model, dtype=..., remat=...)` returns the flax module; `check_teachers`
  lists what keeps `load_teachers` from working (checked before any compute).
  """
  build_model: Callable[..., nn.Module]
  loss: LossFn
  load_teachers: Callable[[ml_collections.ConfigDict], PyTree] = _no_teachers
  check_teachers: Callable[[ml_collections.ConfigDict], list[str]] = _no_teacher_problems


def _videofusion_loss(outputs, batch, teachers):
  del teachers
  return losses.videofusion_loss(outputs, batch["gt_ir"], batch["gt_vis"])


TEMCOCO_TEACHER_SOURCES = (
    "teachers.vgg19: torchvision's VGG19 IMAGENET1K_V1 state dict "
    "(https://download.pytorch.org/models/vgg19-dcbb9e9d.pth); teachers.dinov2: facebookresearch "
    "DINOv2 ViT-L/14 (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/"
    "dinov2_vitl14_pretrain.pth). Or set teachers.distillation=False to train on the fusion loss "
    "alone")


def _temcoco_teacher_problems(config: ml_collections.ConfigDict) -> list[str]:
  cfg = config.teachers
  if not cfg.distillation:
    return []
  absent = [f"teachers.{k}={cfg[k]!r}" for k in ("vgg19", "dinov2")
            if not cfg[k] or not files.as_path(cfg[k]).is_file()]
  if absent:
    return [f"TemCoCo distillation needs the teacher checkpoint files; missing or not found: "
            f"{absent}. Get them from {TEMCOCO_TEACHER_SOURCES}"]
  return []


def _temcoco_teachers(config: ml_collections.ConfigDict) -> teacher_models.Teachers | None:
  """Frozen VGG19 / DINOv2 params from the official PyTorch checkpoints named in config.teachers."""
  cfg = config.teachers
  if not cfg.distillation:
    return None
  problems = _temcoco_teacher_problems(config)
  if problems:
    raise ValueError(problems[0])
  vgg = weights.from_torch_state_dict("vgg19", teacher_models.vgg19_features_only(
      weights.load_torch_checkpoint(cfg.vgg19)))
  dino = weights.from_torch_state_dict("dinov2", weights.load_torch_checkpoint(cfg.dinov2))
  width = dino["cls_token"].shape[-1]
  if width != teacher_models.VITL14["embed_dim"] or width % cfg.dinov2_num_heads:
    raise ValueError(f"{cfg.dinov2}: a DINOv2 of width {width} with {cfg.dinov2_num_heads} heads "
                     f"cannot teach TemCoCo, whose 1024-channel segmentation heads need a "
                     f"1024-wide ViT (ViT-L/14) and a head count dividing it")
  return teacher_models.Teachers(vgg=vgg, dino=dino, dino_num_heads=cfg.dinov2_num_heads)


def _temcoco_loss(outputs, batch, frozen):
  targets = (None if frozen is None else
             teacher_models.distillation_targets(frozen, batch["gt_ir"], batch["gt_vis"]))
  return losses.temcoco_loss(outputs, batch["gt_ir"], batch["gt_vis"], targets)


OBJECTIVES: dict[str, Objective] = {
    "videofusion": Objective(build_model=reference_model("videofusion"), loss=_videofusion_loss),
    "temcoco": Objective(build_model=reference_model("temcoco"), loss=_temcoco_loss,
                         load_teachers=_temcoco_teachers,
                         check_teachers=_temcoco_teacher_problems),
}


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"no training objective for model {name!r}; known: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def build_model(model_config: ml_collections.ConfigDict, platform: str | None = None) -> nn.Module:
  """The network of `config.model`, with its compute dtype, schedule and rematerialisation options.

  `model.schedule` ("auto" by default) is resolved for `platform`, the backend the program is
  compiled for (default: JAX's default backend), by `models.schedule.resolve`; networks without a
  `schedule` field ignore `model.schedule` and `model.remat_policy`.
  """
  objective = get_objective(model_config.name)
  model = objective.build_model(
      model_config, dtype=jnp.dtype(model_config.get("dtype", "float32")),
      remat=bool(model_config.get("remat", False)))
  if "schedule" not in model.__dataclass_fields__:
    return model
  policy = model_config.get("remat_policy", "full")
  schedule.remat_policy(policy)  # validates the name before anything is traced
  return model.clone(schedule=schedule.resolve(model_config.get("schedule", schedule.AUTO),
                                               platform),
                     remat_policy=policy)


def to_float(batch: dict[str, jax.Array]) -> Batch:
  """uint8 clips -> float32 in [0, 1] (done on device, inside the jitted step)."""
  return {k: v.astype(jnp.float32) / 255.0 for k, v in batch.items()}


def forward_and_loss(model: nn.Module, objective: Objective, params: PyTree, batch: Batch,
                     teachers: PyTree) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict]]:
  """Loss of the network on a float batch; returns (total, (terms, outputs)), outputs in float32."""
  outputs = model.apply({"params": params}, batch["lq_ir"], batch["lq_vis"])
  outputs = {k: v.astype(jnp.float32) for k, v in outputs.items()}
  total, terms = objective.loss(outputs, batch, teachers)
  return total, (terms, outputs)
