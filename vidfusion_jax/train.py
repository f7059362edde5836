r"""Sharded training and evaluation of the fusion models.

  python -m vidfusion_jax.train --config=configs/videofusion.py:tiny --workdir=/tmp/vf \
      --config.data.path=/tmp/m3svd_mini_tfrecord

The run resumes from the latest checkpoint in `--workdir`. See docs/training.md for every config
field and the multi-process launch commands.
"""

import dataclasses
import functools
import logging as std_logging
import math
import os
import signal
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import flax
import grain
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from vidfusion_jax import checkpointing
from vidfusion_jax import cli
from vidfusion_jax import compilation_cache
from vidfusion_jax import data
from vidfusion_jax import files
from vidfusion_jax import frames
from vidfusion_jax import logging_utils
from vidfusion_jax import metrics
from vidfusion_jax import objectives
from vidfusion_jax import sharding
from vidfusion_jax import weights
from vidfusion_jax.models import schedule as schedule_lib

PyTree = Any
STREAMS = ("lq_ir", "lq_vis", "gt_ir", "gt_vis")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of completed updates
  params: PyTree
  opt_state: PyTree
  rng: jax.Array


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; training stopped without saving that state."""


# ----------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate of optax update `count` (0-based), i.e. of 1-based iteration i = count + 1.

  "warmup_cosine" is BasicSR's warm-up + CosineAnnealingRestartLR as the spec writes it:
  lr = base * i / warmup for i < warmup, else min + (base - min) (1 + cos(pi (i-1) / period)) / 2.
  "step_decay" multiplies by `decay_rate` after every `decay_every_steps` updates.
  """
  base = opt.learning_rate
  if opt.schedule == "constant":
    return optax.constant_schedule(base)
  if opt.schedule == "step_decay":
    return optax.exponential_decay(base, opt.decay_every_steps, opt.decay_rate, staircase=True)
  if opt.schedule == "warmup_cosine":
    def schedule(count):
      i = jnp.asarray(count, jnp.float32) + 1.0
      cosine = opt.min_learning_rate + 0.5 * (base - opt.min_learning_rate) * (
          1.0 + jnp.cos(jnp.pi * (i - 1.0) / opt.cosine_period))
      return jnp.where(i < opt.warmup_steps, base * i / opt.warmup_steps, cosine)
    return schedule
  raise ValueError(f"optimizer.schedule must be 'warmup_cosine', 'step_decay' or 'constant'; "
                   f"got {opt.schedule!r}")


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """`torch.nn.utils.clip_grad_norm_`: scale by min(1, max_norm / (norm + 1e-6))."""
  def clip(updates, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
  return optax.stateless(clip)


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Gradient clipping (when `grad_clip_norm` > 0) then AdamW (PyTorch semantics)."""
  adamw = optax.adamw(learning_rate_schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay)
  if opt.grad_clip_norm > 0:
    return optax.chain(clip_by_global_norm_torch(opt.grad_clip_norm), adamw)
  return adamw


# ---------------------------------------------------------------------------------- train step


def loss_and_grads(model, objective: objectives.Objective, params: PyTree,
                   batch: dict[str, jax.Array], teachers: PyTree = None):
  """((loss, terms), grads) of the objective on a float32 batch in [0, 1]."""
  def loss_fn(p):
    total, (terms, _) = objectives.forward_and_loss(model, objective, p, batch, teachers)
    return total, terms
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def make_train_step(model, objective: objectives.Objective, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1) -> Callable:
  """`train_step(state, uint8 batch, teachers) -> (state, metrics)`; gradients are averaged over
  `grad_accum_steps` equal microbatches (each loss term is a mean, so this is the full-batch
  gradient)."""

  def grads_and_metrics(params, batch, teachers):
    (loss, terms), grads = loss_and_grads(model, objective, params, objectives.to_float(batch),
                                          teachers)
    return grads, {"loss": loss, **terms}

  def train_step(state: TrainState, batch, teachers):
    if grad_accum_steps == 1:
      grads, metrics = grads_and_metrics(state.params, batch, teachers)
    else:
      # Row r of the batch goes to microbatch r % n, so every device keeps its own rows.
      micro = jax.tree.map(
          lambda x: jnp.moveaxis(x.reshape(-1, grad_accum_steps, *x.shape[1:]), 1, 0), batch)
      def accumulate(total, microbatch):
        step_result = grads_and_metrics(state.params, microbatch, teachers)
        return jax.tree.map(jnp.add, total, step_result), None
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
          grads_and_metrics, state.params, jax.tree.map(lambda x: x[0], micro), teachers))
      total, _ = jax.lax.scan(accumulate, zeros, micro)
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, total)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["update_norm"] = optax.tree.norm(updates)  # finite iff the new params are
    metrics["learning_rate"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


@dataclasses.dataclass
class Trainer:
  """The model, optimizer and compiled, sharded functions of one run on one mesh."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: Any
  objective: objectives.Objective
  optimizer: optax.GradientTransformation
  state_shardings: PyTree
  abstract_state: PyTree
  batch_sharding: jax.sharding.NamedSharding
  init_state: Callable[[], TrainState]
  train_step: Callable
  apply: Callable


def make_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 platform: str | None = None) -> Trainer:
  """Builds everything that depends on config and mesh; compiles lazily.

  `platform` is the backend the steps are compiled for (default: that of the mesh's devices); with
  an `AbstractMesh` the steps can be lowered for "cuda" or "tpu" without devices.
  """
  platform = platform or mesh.devices.flat[0].platform
  model = objectives.build_model(config.model, platform)
  objective = objectives.get_objective(config.model.name)
  schedule = learning_rate_schedule(config.optimizer)
  optimizer = make_optimizer(config.optimizer)
  clip_shape = (1, config.data.clip_length, config.data.crop_size, config.data.crop_size, 3)

  def init() -> TrainState:
    params_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    clip = jnp.zeros(clip_shape, jnp.float32)
    params = model.init(params_rng, clip, clip)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=state_rng)

  abstract_state = jax.eval_shape(init)
  state_shardings = sharding.state_shardings(abstract_state, mesh, config)
  batch_sharding = data.batch_sharding(mesh, config.sharding.batch_axes)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step_fn = make_train_step(model, objective, optimizer, schedule, config.grad_accum_steps)

  options = schedule_lib.compiler_options(platform)

  def traced_for_mesh(fn: Callable) -> Callable:
    def traced(*args):
      with sharding.mesh_context(mesh):
        return fn(*args)
    return traced

  return Trainer(
      config=config, mesh=mesh, model=model, objective=objective, optimizer=optimizer,
      state_shardings=state_shardings,
      abstract_state=checkpointing.abstract_with_shardings(abstract_state, state_shardings),
      batch_sharding=batch_sharding,
      init_state=jax.jit(init, out_shardings=state_shardings,
                         compiler_options=schedule_lib.init_compiler_options(platform)),
      train_step=jax.jit(traced_for_mesh(step_fn),
                         in_shardings=(state_shardings, batch_sharding, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=0,
                         compiler_options=options),
      apply=jax.jit(traced_for_mesh(
          lambda params, ir, vis: model.apply({"params": params}, ir, vis)),
                    in_shardings=(state_shardings.params, replicated, replicated),
                    out_shardings=replicated, compiler_options=options))


def batch_problems(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> list[str]:
  """What stops `config.batch_size` from splitting over `mesh`'s batch shards, the gradient
  accumulation steps and the processes (empty when it splits)."""
  shards = sharding.batch_shard_count(mesh, config.sharding.batch_axes)
  per_step = shards * config.grad_accum_steps
  if config.batch_size % per_step or config.batch_size % jax.process_count():
    return [f"batch_size {config.batch_size} must be divisible by the batch shards ({shards} over "
            f"{tuple(config.sharding.batch_axes)}) x grad_accum_steps ({config.grad_accum_steps})"
            f" and by the process count ({jax.process_count()})"]
  return []


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> bool:
  """Checks the whole config against the dataset, the devices and the files it names, before
  anything is compiled or loaded; returns whether the run evaluates.

  Raises one ValueError listing every problem with its fix. Evaluation without evaluation data
  (synthetic clips, or a dataset without `data.eval_split`) is skipped with a warning at start.
  """
  problems = batch_problems(config, mesh)
  for field in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
    if config[field] < 1:
      problems.append(f"{field} is {config[field]}; set --config.{field} to a positive number")
  if config.eval_every_steps < 0:
    problems.append(f"eval_every_steps is {config.eval_every_steps}; use 0 to disable evaluation")
  if config.model.init_checkpoint and not files.as_path(config.model.init_checkpoint).is_file():
    problems.append(f"model.init_checkpoint {config.model.init_checkpoint!r} is not a file; fix "
                    "the path or set --config.model.init_checkpoint=''")
  objective = objectives.get_objective(config.model.name)
  problems += objective.check_teachers(config)
  evaluates = bool(config.eval_every_steps)
  if config.data.source == "synthetic":
    if evaluates:
      logging.warning("data.source='synthetic' has no evaluation data: evaluation is skipped "
                      "(set --config.eval_every_steps=0 to silence this)")
    evaluates = False
  elif config.data.source == "tfrecord":
    evaluates = _check_tfrecord_data(config, evaluates, problems)
  else:
    problems.append(f"data.source must be 'tfrecord' or 'synthetic'; got {config.data.source!r}")
  if problems:
    raise ValueError("the training config cannot run:\n" +
                     "\n".join(f"  - {problem}" for problem in problems))
  return evaluates


def _check_tfrecord_data(config: ml_collections.ConfigDict, evaluates: bool,
                         problems: list[str]) -> bool:
  """Appends the problems of `config.data` against the converted dataset; returns whether the run
  evaluates (`evaluates` and the dataset has the evaluation split)."""
  path = config.data.path
  if not path:
    problems.append("data.path is empty: set --config.data.path to a dataset converted with "
                    "`python -m data_prep` (or use --config.data.source=synthetic)")
    return False
  try:
    info = data.read_dataset_info(path)
    splits, stored = info["splits"], info["clip_length"]
  except (OSError, ValueError) as error:
    problems.append(f"data.path: {error}")
    return False
  except (KeyError, TypeError) as error:
    problems.append(f"data.path: the dataset_info.json of {path} lacks {error}; re-run the "
                    "conversion with `python -m data_prep`")
    return False
  train_split = splits.get(config.data.train_split)
  eval_split = splits.get(config.data.eval_split) if evaluates else None
  for name, split in ((config.data.train_split, train_split), (config.data.eval_split, eval_split)):
    problems += _shard_problems(path, name, split)
  if train_split is None:
    problems.append(f"{path} has no split {config.data.train_split!r} (it has {sorted(splits)}); "
                    "set --config.data.train_split or convert one with `--split`")
  else:
    if not 1 <= config.data.clip_length <= stored:
      problems.append(f"data.clip_length {config.data.clip_length} must be in [1, {stored}]: the "
                      f"records of {path} hold {stored} frames; lower --config.data.clip_length "
                      "or convert with a longer --clip_length")
    else:
      _warn_unsampled_window_starts(config.data.clip_length, stored,
                                    train_split.get("clip_stride", info.get("clip_stride")), path)
    smallest = _smallest_frame(train_split)
    if smallest and config.data.crop_size > min(smallest):
      problems.append(f"data.crop_size {config.data.crop_size} exceeds the smallest frame "
                      f"{smallest[0]}x{smallest[1]} of split {config.data.train_split!r}; lower "
                      "--config.data.crop_size")
  if evaluates and eval_split is None:
    logging.warning(
        "%s has no split %r (it has %s): evaluation is skipped. Convert one with `python -m "
        "data_prep ... --split %s=SEQUENCES`, set --config.data.eval_split, or set "
        "--config.eval_every_steps=0 to silence this", path, config.data.eval_split,
        sorted(splits), config.data.eval_split)
  if evaluates and eval_split is not None:
    longest = max((s["num_frames"] for s in eval_split["sequences"].values()), default=0)
    if config.eval.clip_length > longest:
      problems.append(f"eval.clip_length {config.eval.clip_length} exceeds the longest sequence "
                      f"({longest} frames) of split {config.data.eval_split!r}: no evaluation "
                      "clip; lower --config.eval.clip_length")
    smallest = _smallest_frame(eval_split)
    if smallest and config.eval.crop_size > min(smallest):
      problems.append(f"eval.crop_size {config.eval.crop_size} exceeds the smallest frame "
                      f"{smallest[0]}x{smallest[1]} of split {config.data.eval_split!r}; lower "
                      "--config.eval.crop_size (0: full frames)")
  return eval_split is not None


def _shard_problems(path: str, name: str, split: dict[str, Any] | None) -> list[str]:
  """Shards of a split that are missing or not the size dataset_info.json records."""
  problems = []
  for shard in (split or {}).get("shards", []):
    shard_path = files.as_path(path) / shard["file"]
    if not shard_path.is_file():
      problems.append(f"shard {shard['file']} of split {name!r} is missing from {path}; re-run "
                      "the conversion")
    elif files.file_size(shard_path) != shard["num_bytes"]:
      problems.append(f"shard {shard['file']} of split {name!r} is {files.file_size(shard_path)} "
                      f"bytes, dataset_info.json says {shard['num_bytes']}: it is truncated or "
                      "was replaced; re-run the conversion")
  return problems


def _smallest_frame(split: dict[str, Any]) -> tuple[int, int] | None:
  sizes = [(s["height"], s["width"]) for s in split.get("sequences", {}).values()]
  return min(sizes, key=min) if sizes else None


def unsampled_window_starts(window: int, record_length: int, stride: int) -> list[int]:
  """Offsets (mod `stride`) at which no training window of `window` frames can start.

  Windows start at offsets 0..record_length - window of records that start every `stride`
  frames, so a sequence frame f can start a window iff f mod stride is one of those offsets
  (the last record of a sequence, aligned to its end, aside).
  """
  return list(range(record_length - window + 1, stride))


def _warn_unsampled_window_starts(window: int, record_length: int, stride: int | None,
                                  path: str) -> None:
  stride = stride or record_length
  missing = unsampled_window_starts(window, record_length, stride)
  if missing:
    logging.warning(
        "data.clip_length %d on the %d-frame records of %s (clip stride %d): windows never start "
        "at frames %s mod %d. Convert with --clip_stride <= %d (or --clip_length >= %d) to "
        "sample every start", window, record_length, path, stride, missing, stride,
        record_length - window + 1, window + stride - 1)


# ---------------------------------------------------------------------------------------- data


def _synthetic_batch(seed: int, step: int, rows: slice, config: ml_collections.ConfigDict):
  """Rows `rows` of the global random batch of `step` (identical for any process layout)."""
  rng = np.random.default_rng([seed, step])
  shape = (config.batch_size, config.data.clip_length, config.data.crop_size,
           config.data.crop_size, 3)
  return {name: rng.integers(0, 256, shape, np.uint8)[rows] for name in STREAMS}


def process_rows(batch_sharding: jax.sharding.NamedSharding, global_batch_size: int) -> slice:
  """The rows of the global batch that this process's devices hold.

  Every input source serves one contiguous block of batch_size / process_count rows per process;
  a layout where a process holds scattered rows, or rows another process holds too, is refused.
  """
  index_map = batch_sharding.addressable_devices_indices_map((global_batch_size,))
  held = sorted({row for idx in index_map.values() for row in range(global_batch_size)[idx[0]]})
  expected = global_batch_size // jax.process_count()
  if len(held) != expected or held[-1] - held[0] + 1 != len(held):
    raise ValueError(
        f"process {jax.process_index()} of {jax.process_count()} holds batch rows {held} of "
        f"{global_batch_size} under mesh {dict(batch_sharding.mesh.shape)} with the batch split "
        f"over {batch_sharding.spec[0]}; the input pipeline serves only one contiguous block of "
        f"{expected} rows per process: split the batch over mesh axes that span every process "
        "(sharding.batch_axes) and order the mesh devices by process (jax.make_mesh does)")
  return slice(held[0], held[-1] + 1)


def make_train_iterator(config: ml_collections.ConfigDict,
                        batch_sharding: jax.sharding.NamedSharding) -> grain.DatasetIterator:
  """This process's batches (a checkpointable Grain iterator) of `config.data.source`."""
  rows = process_rows(batch_sharding, config.batch_size)
  if config.data.source == "synthetic":
    dataset = grain.MapDataset.range(sys.maxsize).map(
        functools.partial(_synthetic_batch, config.seed, rows=rows, config=config))
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                          prefetch_buffer_size=2)))
  if config.data.source == "tfrecord":
    if not config.data.path:
      raise ValueError("config.data.path is empty: set --config.data.path to a dataset converted "
                       "with `python -m data_prep` (or use --config.data.source=synthetic)")
    return data.make_train_iterator(
        config.data.path, config.data.train_split, global_batch_size=config.batch_size,
        clip_length=config.data.clip_length, crop_size=config.data.crop_size, seed=config.seed,
        process_index=rows.start // (rows.stop - rows.start), process_count=jax.process_count(),
        worker_count=config.data.worker_count, flip=config.data.flip, rotate=config.data.rotate,
        degrade=config.data.degrade)
  raise ValueError(f"config.data.source must be 'tfrecord' or 'synthetic'; "
                   f"got {config.data.source!r}")


# ---------------------------------------------------------------------------------- evaluation


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of two uint8 images (infinite when equal)."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def ssim_uint8(a: np.ndarray, b: np.ndarray) -> float:
  """BasicSR `calculate_ssim` of two uint8 (H, W, C) images: 11x11 Gaussian (sigma 1.5), valid
  region, mean over channels."""
  import cv2  # pylint: disable=g-import-not-at-top
  window = cv2.getGaussianKernel(11, 1.5)
  window = window @ window.T
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  values = []
  for channel in range(a.shape[-1]):
    x = a[..., channel].astype(np.float64)
    y = b[..., channel].astype(np.float64)
    blur = lambda z: cv2.filter2D(z, -1, window)[5:-5, 5:-5]  # pylint: disable=cell-var-from-loop
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    values.append(ssim_map.mean())
  return float(np.mean(values))


def _centre_crop(clip: np.ndarray, size: int) -> np.ndarray:
  if not size:
    return clip
  height, width = clip.shape[-3:-1]
  if size > min(height, width):
    raise ValueError(f"eval.crop_size {size} exceeds the frame size {height}x{width}")
  top, left = (height - size) // 2, (width - size) // 2
  return clip[..., top:top + size, left:left + size, :]


def evaluate(trainer: Trainer, params: PyTree) -> tuple[dict[str, float], np.ndarray | None]:
  """Validation metrics (mean over frames of each clip, then over clips) and an image grid.

  Sequences of `config.data.eval_split` are cut into non-overlapping clips of
  `config.eval.clip_length` frames (a shorter tail is dropped). Every process runs the same
  computation; process 0 writes the results.
  """
  config = trainer.config
  per_clip: dict[str, list[float]] = {}
  grid = None
  fusion_metric_names = tuple(config.eval.fusion_metrics)
  sequences = data.iter_sequences(config.data.path, config.data.eval_split,
                                  degrade=config.data.degrade, seed=config.seed)
  for index, (_, streams) in enumerate(sequences):
    if config.eval.max_sequences and index >= config.eval.max_sequences:
      break
    length = config.eval.clip_length
    for start in range(0, streams["lq_ir"].shape[0] - length + 1, length):
      clip = {k: _centre_crop(v[start:start + length], config.eval.crop_size)
              for k, v in streams.items()}
      inputs = objectives.to_float({k: clip[k][None] for k in ("lq_ir", "lq_vis")})
      outputs = jax.device_get(trainer.apply(params, inputs["lq_ir"], inputs["lq_vis"]))
      outputs = {k: frames.to_uint8(v[0]) for k, v in outputs.items()}
      frame_scores = _frame_scores(outputs, clip, fusion_metric_names)
      for name, values in frame_scores.items():
        per_clip.setdefault(name, []).append(float(np.mean(values)))
      if grid is None:
        shown = range(min(config.eval.num_grid_frames, length))
        grid = np.concatenate([np.concatenate(
            [clip["lq_ir"][t], clip["lq_vis"][t], outputs["fusion"][t]], axis=1) for t in shown])
  if not per_clip:
    raise ValueError(f"no evaluation clip of {config.eval.clip_length} frames in split "
                     f"{config.data.eval_split!r} of {config.data.path}")
  return {name: float(np.mean(values)) for name, values in per_clip.items()}, grid


def _frame_scores(outputs: dict[str, np.ndarray], clip: dict[str, np.ndarray],
                  fusion_metric_names: tuple[str, ...]) -> dict[str, list[float]]:
  """Per-frame scores: fused PSNR (mean of PSNR to both clean sources), restoration PSNR/SSIM,
  and the fusion metrics of the fused frames against the clean sources."""
  scores: dict[str, list[float]] = {}
  add = lambda name, value: scores.setdefault(name, []).append(value)
  for t in range(outputs["fusion"].shape[0]):
    fused, gt_ir, gt_vis = outputs["fusion"][t], clip["gt_ir"][t], clip["gt_vis"][t]
    add("psnr_fused", 0.5 * psnr_uint8(fused, gt_ir) + 0.5 * psnr_uint8(fused, gt_vis))
    for key, target in (("ir", gt_ir), ("vi", gt_vis)):
      if key in outputs:
        add(f"psnr_{key}", psnr_uint8(outputs[key][t], target))
        add(f"ssim_{key}", ssim_uint8(outputs[key][t], target))
  if fusion_metric_names:
    values = metrics.compute(outputs["fusion"], clip["gt_ir"], clip["gt_vis"], fusion_metric_names)
    for name, per_frame in values.items():
      scores[f"fusion/{name}"] = [float(v) for v in np.asarray(per_frame)]
  return scores


# ------------------------------------------------------------------------------------ the loop


class _Preemption:
  """SIGTERM flag (a context manager that restores the previous handler on exit).

  With several processes, the JAX coordination service notices the signal and all processes
  agree on the step at which to stop.
  """

  def __init__(self):
    self.requested = False
    self._previous_handler = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc_info):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _check_finite(step: int, metrics: dict[str, jax.Array], last_saved: int | None) -> None:
  """Raises when the loss of `step` or its parameter update is not finite."""
  loss, update_norm = float(metrics["loss"]), float(metrics["update_norm"])
  if not (math.isfinite(loss) and math.isfinite(update_norm)):
    raise NonFiniteLossError(
        f"non-finite training at step {step} (loss {loss}, update norm {update_norm}); "
        f"training stopped. The last good checkpoint is step {last_saved}, left as it was.")


def _interval_scalars(history: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Means over the logging interval; the learning rate of its last step."""
  scalars = {f"train/{name}": float(np.mean([m[name] for m in history])) for name in history[0]}
  scalars["train/learning_rate"] = float(history[-1]["learning_rate"])
  return scalars


def _restore_or_init(trainer: Trainer, checkpointer: checkpointing.Checkpointer, iterator):
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("Resuming from checkpoint step %d in %s", latest, checkpointer.directory)
    return checkpointer.restore(latest, trainer.abstract_state, iterator)
  state = trainer.init_state()
  model_config = trainer.config.model
  if model_config.init_checkpoint:
    torch_params = weights.from_torch_state_dict(
        model_config.name, weights.load_torch_checkpoint(model_config.init_checkpoint))
    params = jax.device_put(torch_params, trainer.state_shardings.params)
    state = state.replace(params=params)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       devices=None) -> TrainState:
  """Trains `config` in `workdir` (local or `gs://`) up to `config.total_steps`, resuming from its
  checkpoints.

  The checkpoint of a step is written before its evaluation, image grid and summaries (after its
  evaluation only when the best checkpoints are ranked by an evaluation metric). When anything in
  the loop raises, the last completed step is saved if that is safe, and the exception says what
  was kept.
  """
  workdir = files.as_path(workdir)
  mesh = sharding.mesh_from_config(config, devices)
  evaluates = validate_config(config, mesh)
  checkpointing.save_config(workdir, config)
  trainer = make_trainer(config, mesh)
  teachers = trainer.objective.load_teachers(config)
  iterator = make_train_iterator(config, trainer.batch_sharding)
  checkpointer = checkpointing.Checkpointer(
      workdir, save_every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints,
      keep_best=config.keep_best_checkpoints, best_metric=config.best_metric,
      best_mode=config.best_metric_mode, async_checkpointing=config.async_checkpointing)
  writer = logging_utils.MetricWriter(workdir)
  ranks_by_metric = bool(config.keep_best_checkpoints and config.best_metric)
  state = _restore_or_init(trainer, checkpointer, iterator)
  last_saved = checkpointer.latest_step()
  start_step = int(jax.device_get(state.step))
  logging.info("Mesh %s; %d parameters; training steps %d..%d", dict(mesh.shape),
               sum(x.size for x in jax.tree.leaves(state.params)), start_step + 1,
               config.total_steps)
  progress = tqdm.tqdm(initial=start_step, total=config.total_steps, unit="step",
                       disable=jax.process_index() != 0, dynamic_ncols=True)
  pending = None  # (step, metrics) not yet checked on the host: keeps the devices busy
  interval_metrics = []  # device metrics of the steps since the last log
  completed = start_step  # the step whose train state `state` holds
  position = None  # iterator state before the batch of a step in flight
  try:
    with _Preemption() as preemption:
      for step in range(start_step + 1, config.total_steps + 1):
        position = iterator.get_state()
        batch = data.to_global_batch(next(iterator), mesh, config.sharding.batch_axes)
        state, metrics = trainer.train_step(state, batch, teachers)
        completed, position = step, None
        if pending is not None:
          _check_finite(*pending, last_saved)
        pending = (step, metrics)
        interval_metrics.append(metrics)
        progress.update(1)
        is_last = step == config.total_steps
        preempted = preemption.reached(step)
        if step % config.log_every_steps == 0 or is_last:
          _check_finite(step, metrics, last_saved)
          scalars = _interval_scalars(jax.device_get(interval_metrics))
          interval_metrics = []
          scalars["train/steps_per_second"] = progress.format_dict["rate"] or 0.0
          writer.write_scalars(step, scalars)
          progress.set_postfix(loss=f"{scalars['train/loss']:.4f}")
        evaluates_now = evaluates and (step % config.eval_every_steps == 0 or is_last)
        saves_now = step % config.checkpoint_every_steps == 0 or is_last or preempted
        eval_metrics = grid = None
        if evaluates_now and saves_now and ranks_by_metric:
          eval_metrics, grid = evaluate(trainer, state.params)
        if saves_now:
          _check_finite(step, metrics, last_saved)
          if checkpointer.save(step, state, iterator, metrics=eval_metrics,
                               force=is_last or preempted):
            last_saved = step
        if evaluates_now:
          if eval_metrics is None:
            eval_metrics, grid = evaluate(trainer, state.params)
          writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
          _write_grid(workdir, writer, step, grid)
        if preempted:
          checkpointer.wait_until_finished()
          logging.warning("Preempted (SIGTERM): saved checkpoint at step %d; exiting.", step)
          break
  except BaseException as error:
    _keep_what_is_safe(error, checkpointer, state, iterator, completed, position, pending)
    raise
  finally:
    progress.close()
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()
  return state


def _keep_what_is_safe(error: BaseException, checkpointer: checkpointing.Checkpointer,
                       state: TrainState, iterator, completed: int, position, pending) -> None:
  """After `error` stopped the loop: saves the last completed step when that is safe, and adds a
  note to the error (and the log) naming the checkpoint that was kept.

  Not saved: a non-finite state, a state whose buffers the failed step consumed, and (with
  several processes, where a save needs every process) anything.
  """
  try:
    checkpointer.wait_until_finished()
  except Exception as save_error:  # pylint: disable=broad-exception-caught
    logging.error("a checkpoint save in progress failed: %r", save_error)
  reason = None
  if isinstance(error, NonFiniteLossError):
    reason = "that state is not finite"
  elif jax.process_count() > 1:
    reason = "with several processes a save needs all of them"
  elif completed == checkpointer.latest_step() or completed == 0:
    reason = None if completed else "no step completed"
  elif any(leaf.is_deleted() for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)):
    reason = "the failed step consumed its buffers"
  else:
    try:
      if pending is not None and pending[0] == completed:
        _check_finite(*pending, checkpointer.latest_step())
      if position is not None:  # the failed step took a batch: rewind to the step's position
        iterator.set_state(position)
      checkpointer.save(completed, state, iterator, force=True)
      checkpointer.wait_until_finished()
    except Exception as save_error:  # pylint: disable=broad-exception-caught
      reason = f"saving it failed: {save_error!r}"
  latest = checkpointer.latest_step()
  if reason is None:
    note = (f"Kept: checkpoint step {latest} (the last completed step) in "
            f"{checkpointer.directory}; rerun the same command to resume from it.")
  else:
    kept = (f"the latest checkpoint is step {latest} in {checkpointer.directory}"
            if latest is not None else f"no checkpoint in {checkpointer.directory}")
    note = f"Kept: {kept}; step {completed} was not saved ({reason})."
  error.add_note(note)
  logging.error("Training stopped after step %d by %s: %s. %s", completed,
                type(error).__name__, error, note)


def _write_grid(workdir: files.Path, writer: logging_utils.MetricWriter, step: int,
                grid: np.ndarray | None) -> None:
  """Saves the IR | VIS | fused grid as `workdir/eval/step_<step>.png` and to TensorBoard."""
  if grid is None or jax.process_index() != 0:
    return
  frames.write_png(workdir / "eval" / f"step_{step:08d}.png", grid)
  writer.write_images(step, {"eval/ir_vis_fused": grid})


# ---------------------------------------------------------------------------------------- main

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/videofusion.py or "
    "configs/videofusion.py:tiny; override fields with --config.<field>=<value>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json, "
                               "local or gs:// (needs the cloud extra); an existing one is "
                               "resumed.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize(); without the flags below JAX "
    "detects SLURM, Open MPI, TPU pods and Kubernetes clusters from the environment.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0-based).")
compilation_cache.define_flags(flags.FLAGS)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """`jax.distributed.initialize`; CPU collectives go over gloo (needed by multi-process CPU)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _without_library_info(record) -> bool:
  """Keeps warnings and errors from everyone, info only from this package (Orbax is chatty)."""
  return record.levelno >= std_logging.WARNING or "vidfusion_jax" in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.get_absl_handler().addFilter(_without_library_info)
  compilation_cache.configure(flags.FLAGS.compilation_cache, flags.FLAGS.compilation_cache_dir)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("JAX process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (NonFiniteLossError, ValueError, OSError) as error:
    print("\n".join([f"error: {error}", *getattr(error, "__notes__", [])]), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.app_flags_parser(__doc__))
