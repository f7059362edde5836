"""Fuses an infrared and a visible video with an exported model.

  python -m vidfusion_jax.fuse --model=OUT --ir=PATH --vis=PATH --output=DIR
  python -m vidfusion_jax.fuse --model=OUT --split=CSV --split_root=DIR --output=DIR

PATH is a folder of frames or a video file; a VF-Bench split CSV (columns ir,rgb) with its dataset
root lists the frame pairs instead. Writes one `DIR/NNNN.png` per input frame (each
atomically) and, on request, an mp4 of the fused frames and a side-by-side IR | VIS | fused mp4.
Every path may be a `gs://` or `s3://` URL (the `cloud` extra). See docs/inference.md.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from typing import Sequence

from absl import flags
import numpy as np
import tqdm

from vidfusion_jax import cli
from vidfusion_jax import compilation_cache
from vidfusion_jax import files
from vidfusion_jax import frames as frame_io
from vidfusion_jax import host_memory
from vidfusion_jax import inference
from vidfusion_jax import splits

FRAME_NAME = re.compile(r"^\d{4,}\.png$")


def frame_name(index: int) -> str:
  return f"{index:04d}.png"


def existing_frames(folder: files.Path) -> list[files.Path]:
  """Files of the output frame pattern (`NNNN.png`, 4 or more digits) already in `folder`."""
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir() if FRAME_NAME.match(p.name))


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of `python -m vidfusion_jax.fuse`."""
  flags.DEFINE_string("model", None, "model directory written by `python -m vidfusion_jax.export`",
                      flag_values=fv)
  flags.DEFINE_string("ir", None, "infrared frames: a folder or a video file (or use --split)",
                      flag_values=fv)
  flags.DEFINE_string("vis", None, "visible frames: a folder or a video file (or use --split)",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "folder for the fused NNNN.png frames", flag_values=fv)
  flags.mark_flags_as_required(["model", "output"], flag_values=fv)
  flags.DEFINE_enum("backend", "model", ["model", "artifact"],
                    "run the params through the model code, or the exported jax.export function "
                    "alone", flag_values=fv)
  flags.DEFINE_integer("window", None, "frames per temporal window (default: 7 for videofusion, "
                       "30 for temcoco)", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("overlap", None, "frames shared by consecutive windows (default: 2 for "
                       "videofusion, 5 for temcoco, 0 with --reference for videofusion; at most "
                       "--window - 1)", lower_bound=0, flag_values=fv)
  flags.DEFINE_enum("blend", None, list(inference.BLEND_MODES),
                    "overlapping frames: 'linear' cross-fades the windows, 'last' keeps the later "
                    "window (default: linear; last with --reference)", flag_values=fv)
  flags.DEFINE_bool("stretch", None, "min-max stretch each fused frame to [0, 255] instead of "
                    "clipping (default: off; on with --reference for videofusion)",
                    flag_values=fv)
  flags.DEFINE_bool("reference", False, "the official test procedure's windows, blending and "
                    "saving; the flags above override its parts", flag_values=fv)
  flags.DEFINE_integer("windows_per_call", 1, "windows stacked into one device call (more: "
                       "faster, more memory)", lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("truncate", False, "fuse only the first N frames when the two inputs have "
                    "different frame counts (default: an error)", flag_values=fv)
  flags.DEFINE_bool("resize", False, "resize visible frames to the infrared frame size when "
                    "they differ (default: an error)", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace NNNN.png frames already in --output (default: "
                    "refuse to run)", flag_values=fv)
  flags.DEFINE_string("mp4", None, "also write the fused video to this mp4 path", flag_values=fv)
  flags.DEFINE_string("side_by_side", None, "also write an IR | VIS | fused mp4 to this path",
                      flag_values=fv)
  flags.DEFINE_float("fps", 30.0, "frame rate of the mp4 outputs", flag_values=fv)
  flags.DEFINE_bool("quiet", False, "no progress bar or summary line", flag_values=fv)
  flags.DEFINE_string("split", None, "a VF-Bench split CSV (columns ir,rgb; e.g. "
                      "data_split/IVF/VTMOT/Vtuav-02.csv) listing the frame pairs, instead of "
                      "--ir and --vis (vidfusion_jax/splits.py)", flag_values=fv)
  flags.DEFINE_string("split_root", None, "the dataset root of --split: frames are "
                      "DIR/<CSV name>/<path in CSV>", flag_values=fv)
  compilation_cache.define_flags(fv)


def parse_flags(argv: Sequence[str] | None = None) -> argparse.Namespace:
  return cli.parse(argv, define_flags, prog="python -m vidfusion_jax.fuse", usage=__doc__)


def window_settings(model_name: str, args: argparse.Namespace) -> inference.WindowSettings:
  """The model's default (or --reference) windows with the explicitly given flags applied."""
  base = (inference.REFERENCE_WINDOWS if args.reference else inference.DEFAULT_WINDOWS)[model_name]
  given = {k: getattr(args, k) for k in ("window", "overlap", "blend", "stretch")
           if getattr(args, k) is not None}
  if "window" in given and "overlap" not in given:  # A default overlap must fit a smaller window.
    given["overlap"] = max(0, min(base.overlap, given["window"] - 1))
  return inference.WindowSettings(**{**vars(base), **given})


def _count(path: splits.FrameSource, what: str) -> int:
  if not isinstance(path, (list, tuple)) and not path.exists():
    raise ValueError(f"--{what} {path} does not exist")
  try:
    return splits.count_frames(path)
  except (OSError, RuntimeError) as error:
    raise frame_io.FrameReadError(f"cannot read --{what} {path}: {error}") from error


def input_sources(args: argparse.Namespace) -> dict[str, splits.FrameSource]:
  """{"ir": ..., "vis": ...}: the --ir/--vis paths, or the frame lists of --split."""
  if args.split is None:
    if args.ir is None or args.vis is None:
      raise ValueError("give --ir and --vis, or --split with --split_root")
    return {"ir": files.as_path(args.ir), "vis": files.as_path(args.vis)}
  if args.ir is not None or args.vis is not None or args.split_root is None:
    raise ValueError("--split replaces --ir and --vis and needs --split_root")
  split = splits.read_vfbench_split(args.split, args.split_root)
  return {"ir": split.ir, "vis": split.vis}


def run(args: argparse.Namespace) -> int:
  """Fuses the clips of `args`; returns the number of frames written."""
  manifest = inference.read_manifest(args.model)
  output = files.as_path(args.output)
  if output.exists() and not output.is_dir():
    raise ValueError(f"--output {output} is a file; give a folder")
  old_frames = existing_frames(output)
  if old_frames and not args.overwrite:
    raise ValueError(f"--output {output} already holds {len(old_frames)} frames "
                     f"({old_frames[0].name}, ...) from another run; choose an empty folder or "
                     "pass --overwrite to replace them")
  sources = input_sources(args)
  counts = {what: _count(source, what) for what, source in sources.items()}
  if counts["ir"] != counts["vis"] and not args.truncate:
    raise ValueError(f"--ir has {counts['ir']} frames but --vis has {counts['vis']}; give clips "
                     "of equal length, or pass --truncate to fuse the first "
                     f"{min(counts.values())}")
  total = min(counts.values())
  if total == 0:
    raise ValueError(f"no frames to fuse (--ir: {counts['ir']}, --vis: {counts['vis']})")

  frame_io.check_writable_folder(output, "--output")
  settings = window_settings(manifest["model"]["name"], args)
  fuser = inference.Fuser.load(args.model, backend=args.backend, windows=settings,
                               windows_per_call=args.windows_per_call)
  output.mkdir(parents=True, exist_ok=True)
  stream = fuser.fuse_stream(splits.iter_frames(sources["ir"]), splits.iter_frames(sources["vis"]),
                             truncate=args.truncate, resize=args.resize, with_inputs=True)
  written = 0
  with contextlib.ExitStack() as stack:
    videos = [stack.enter_context(frame_io.VideoWriter(path, fps=args.fps)) if path else None
              for path in (args.mp4, args.side_by_side)]
    progress = stack.enter_context(tqdm.tqdm(total=total, unit="frame", disable=args.quiet,
                                             desc="fusing"))
    try:
      for ir, vis, fused in stream:
        image = frame_io.to_uint8(fused, stretch=settings.stretch)
        frame_io.write_png(output / frame_name(written), image)
        if videos[0]:
          videos[0].write(image)
        if videos[1]:
          videos[1].write(np.concatenate(
              [frame_io.to_uint8(ir), frame_io.to_uint8(vis), image], axis=1))
        written += 1
        progress.update()
    except (ValueError, OSError) as error:
      error.add_note(f"(frames 0000.png..{frame_name(written - 1)} were written and are complete;"
                     " fix the input and rerun with --overwrite)" if written else
                     "(no frame was written; fix the input and rerun)")
      raise
  keep = {frame_name(i) for i in range(written)}
  for stale in existing_frames(output):
    if stale.name not in keep:
      stale.unlink()
  return written


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_flags(argv)
  compilation_cache.configure(args.compilation_cache, args.compilation_cache_dir)
  host_memory.return_large_blocks_to_os()
  try:
    written = run(args)
  except (ValueError, OSError) as error:
    sys.exit("\n".join([f"error: {error}", *getattr(error, "__notes__", [])]))
  if not args.quiet:
    print(f"wrote {written} fused frames to {args.output}")


if __name__ == "__main__":
  main()
