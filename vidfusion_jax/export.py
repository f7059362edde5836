"""Exports a trained model as a self-describing directory for inference.

  python -m vidfusion_jax.export --workdir=DIR --output=OUT [--step=N] [--dtype=bfloat16]
  python -m vidfusion_jax.export --from_torch=CKPT.pth --model=videofusion --output=OUT

OUT holds `manifest.json` (model name and reference config, dtype, versions, param shapes,
input rules), `params.msgpack` (params only, no optimizer state; flax msgpack) and
`fusion.jax_export` (the serialized `jax.export` inference function with symbolic batch, time,
height and width, params passed as arguments). The directory is built beside OUT and renamed
into place, so OUT is either the previous export or the complete new one. OUT may be a `gs://` or
`s3://` URL: object stores cannot rename a folder, so there the files are written in place with
`manifest.json` removed first and written last (readers refuse a folder without it). See
docs/inference.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
from typing import Any, Mapping, Sequence

from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

import vidfusion_jax
from vidfusion_jax import cli
from vidfusion_jax import files
from vidfusion_jax import frames as frame_io
from vidfusion_jax import inference
from vidfusion_jax.models import schedule

DTYPES = ("float32", "bfloat16")
DEFAULT_PLATFORMS = ("cpu", "cuda")


def input_shape(spec: inference.InputSpec) -> tuple[str, tuple[str, ...]]:
  """Symbolic NTHWC input shape (H, W as multiples of the spatial multiple) and constraints."""
  m = spec.spatial_multiple
  constraints = (f"t >= {spec.min_frames}",) if spec.min_frames > 1 else ()
  return f"b, t, {m}*h, {m}*w, 3", constraints


def export_function(module: Any, params: Mapping[str, Any], spec: inference.InputSpec,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  """`jax.export` of `inference.make_infer_fn(module)` with symbolic b, t, h, w."""
  shape, constraints = input_shape(spec)
  video = jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape, constraints=constraints),
                               jnp.float32)
  params_struct = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  infer = jax.jit(inference.make_infer_fn(module))
  return jax.export.export(infer, platforms=tuple(platforms))(params_struct, video, video)


def _versions() -> dict[str, str]:
  return {"vidfusion_jax": vidfusion_jax.__version__, "jax": jax.__version__,
          "jaxlib": importlib.metadata.version("jaxlib"),
          "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version()}


def export_model(output: str | os.PathLike, model_name: str, model_config: Mapping[str, Any],
                 params: Mapping[str, Any], *, dtype: str = "float32",
                 source: Mapping[str, Any] | None = None,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS,
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes an exported model directory and returns its manifest.

  Args:
    output: the directory to create (refused if it exists and is not empty, unless overwrite).
    model_name: "videofusion" or "temcoco" (`vidfusion_jax.models` registry).
    model_config: the reference constructor mapping (`from_reference_config`).
    params: the model params (the tree under "params"), any float dtype.
    dtype: "float32", or "bfloat16" for bf16 params and bf16 compute.
    source: where the params came from, recorded in the manifest.
    platforms: platforms the serialized function is lowered for.
    overwrite: replace an existing OUT.
  """
  output = files.as_path(output)
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  _check_output(output, overwrite)
  model_config = json.loads(json.dumps(dict(model_config)))  # Plain JSON types (tuples->lists).
  # One program serves every platform: CPU memory orderings only in a CPU-only export.
  module = inference.build_model(model_name, model_config, dtype,
                                 schedule.for_platforms(schedule.AUTO, platforms))
  spec = inference.input_spec(module)
  params = jax.tree.map(lambda p: np.asarray(p, jnp.dtype(dtype)), dict(params))
  check_params(module, params, spec)
  exported = export_function(module, params, spec, platforms)
  shape, constraints = input_shape(spec)
  flat = inference.flatten_params(params)
  manifest = {
      "format": inference.FORMAT_NAME,
      "format_version": inference.FORMAT_VERSION,
      "model": {"name": model_name, "config": model_config},
      "dtype": dtype,
      "source": dict(source or {}),
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "versions": _versions(),
      "params": {
          "file": inference.PARAMS_FILE,
          "count": int(sum(v.size for v in flat.values())),
          "shapes": {k: [list(v.shape), str(v.dtype)] for k, v in flat.items()},
      },
      "exported": {
          "file": inference.EXPORTED_FILE,
          "call": "fusion = f(params, ir, vis)",
          "inputs": "ir, vis: float32 RGB in [0, 1], NTHWC",
          "input_shape": shape,
          "constraints": list(constraints),
          "input_spec": {"spatial_multiple": spec.spatial_multiple,
                         "min_frames": spec.min_frames},
          "output": "fusion: float32 NTHWC (clip to [0, 1] before saving)",
          "platforms": list(exported.platforms),
          "calling_convention_version": exported.calling_convention_version,
      },
  }
  contents = {inference.PARAMS_FILE: serialization.msgpack_serialize(params),
              inference.EXPORTED_FILE: exported.serialize(),
              inference.MANIFEST_FILE: json.dumps(manifest, indent=1) + "\n"}
  if files.is_url(output):
    (output / inference.MANIFEST_FILE).unlink(missing_ok=True)
    for name, data in contents.items():  # the manifest last
      files.atomic_write(output / name, data)
    return manifest
  tmp = files.as_path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
  try:
    for name, data in contents.items():
      files.atomic_write(tmp / name, data)
    _replace_dir(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _check_output(output: files.Path, overwrite: bool) -> None:
  if output.exists() and not output.is_dir():
    raise ValueError(f"--output {output} is a file; give a directory path")
  if output.is_dir() and any(output.iterdir()) and not overwrite:
    raise ValueError(f"--output {output} exists and is not empty; choose a new directory or pass "
                     "--overwrite to replace it")
  frame_io.check_writable_folder(output.parent, "the folder of --output")


def _replace_dir(new: files.Path, output: files.Path) -> None:
  """Renames `new` to `output`, moving an old `output` aside first and deleting it after."""
  old = None
  if output.exists():
    old = files.as_path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
    os.replace(output, old / "dir")
  os.replace(new, output)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def params_from_workdir(workdir: str, step: int | None
                        ) -> tuple[str, dict[str, Any], Any, int | None]:
  """(model name, reference config, params, step) of a training workdir's checkpoint."""
  from vidfusion_jax import checkpointing  # pylint: disable=import-outside-toplevel
  checkpointing.load_config(workdir)  # Says clearly when `workdir` is not a training workdir.
  if step is None:
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    try:
      step = checkpointer.latest_step()
    finally:
      checkpointer.close()
  params, config = checkpointing.load_params(workdir, step=step)
  model_config = config.model.config
  if hasattr(model_config, "to_dict"):
    model_config = model_config.to_dict()
  return config.model.name, dict(model_config), params, step


def params_from_torch(path: str, model_name: str) -> tuple[Any, dict[str, Any]]:
  """Params of an official PyTorch checkpoint (BasicSR `{"params": ...}` or a state dict), and
  the reference config they imply (VideoFusion: read off the tensor shapes; TemCoCo: `{}`)."""
  from vidfusion_jax import weights  # pylint: disable=import-outside-toplevel
  state_dict = weights.load_torch_checkpoint(path)
  params = weights.from_torch_state_dict(model_name, state_dict)
  config = weights.infer_videofusion_config(state_dict) if model_name == "videofusion" else {}
  return params, config


def check_params(module: Any, params: Mapping[str, Any], spec: inference.InputSpec) -> None:
  """Raises ValueError unless `params` has exactly the paths and shapes `module` creates."""
  sample = jax.ShapeDtypeStruct(
      (1, spec.min_frames, spec.spatial_multiple, spec.spatial_multiple, 3), jnp.float32)
  expected = inference.flatten_params(
      jax.eval_shape(module.init, jax.random.key(0), sample, sample)["params"])
  got = inference.flatten_params(params)
  problems = [f"{k} is missing" for k in sorted(set(expected) - set(got))]
  problems += [f"{k} is unexpected" for k in sorted(set(got) - set(expected))]
  problems += [f"{k} has shape {tuple(got[k].shape)}, the model expects {tuple(expected[k].shape)}"
               for k in sorted(set(got) & set(expected)) if got[k].shape != expected[k].shape]
  if problems:
    raise ValueError(f"the params do not fit the model config ({len(problems)} problems, e.g. "
                     f"{'; '.join(problems[:3])}): pass the config they were trained with")


def _parse_config(text: str) -> dict[str, Any]:
  path = files.as_path(text)
  try:
    return json.loads(path.read_text() if path.is_file() else text)
  except json.JSONDecodeError as error:
    raise ValueError(f"--config must be a JSON object or a JSON file: {error}") from error


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of `python -m vidfusion_jax.export`."""
  flags.DEFINE_string("workdir", None, "training workdir to export (its latest or --step "
                      "checkpoint; params only)", flag_values=fv)
  flags.DEFINE_string("from_torch", None, "official PyTorch checkpoint (.pth, BasicSR "
                      "{'params': ...} or a plain state dict); needs the torch extra",
                      flag_values=fv)
  flags.mark_flags_as_mutual_exclusive(["workdir", "from_torch"], required=True, flag_values=fv)
  flags.DEFINE_string("output", None, "model directory to write", flag_values=fv)
  flags.mark_flag_as_required("output", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step with --workdir (default: the latest)",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_enum("model", None, ["videofusion", "temcoco"],
                    "model of --from_torch (required with it)", flag_values=fv)
  flags.DEFINE_string("config", None, "reference constructor config of --from_torch as a JSON "
                      "object or JSON file (default: VideoFusion's read off the checkpoint's "
                      "shapes; TemCoCo's {})", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "params and compute dtype of the export",
                    flag_values=fv)
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                    "comma-separated platforms to lower the exported function for",
                    flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace --output if it already exists", flag_values=fv)


def parse_flags(argv: Sequence[str] | None = None) -> argparse.Namespace:
  return cli.parse(argv, define_flags, prog="python -m vidfusion_jax.export", usage=__doc__)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_flags(argv)
  try:
    if args.workdir:
      if args.model or args.config:
        raise ValueError("--model and --config are read from the workdir's config; drop them")
      name, config, params, step = params_from_workdir(args.workdir, args.step)
      source = {"kind": "workdir", "path": str(files.absolute(args.workdir)), "step": step}
    else:
      if not args.model:
        raise ValueError("--from_torch needs --model=videofusion|temcoco")
      if args.step is not None:
        raise ValueError("--step applies to --workdir only")
      name = args.model
      params, config = params_from_torch(args.from_torch, name)
      if args.config:
        config = _parse_config(args.config)
      source = {"kind": "torch", "path": str(files.absolute(args.from_torch))}
    manifest = export_model(args.output, name, config, params, dtype=args.dtype, source=source,
                            platforms=args.platforms, overwrite=args.overwrite)
  except (ValueError, OSError, ImportError, KeyError) as error:
    sys.exit(f"error: {error}")
  print(f"exported {name} ({manifest['params']['count']:,} params, {args.dtype}) to "
        f"{args.output}")


if __name__ == "__main__":
  main()
