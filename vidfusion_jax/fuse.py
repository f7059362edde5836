"""Fuses an infrared and a visible video with an exported model.

  python -m vidfusion_jax.fuse --model=OUT --ir=PATH --vis=PATH --output=DIR

PATH is a folder of frames or a video file. Writes one `DIR/NNNN.png` per input frame (each
atomically) and, on request, an mp4 of the fused frames and a side-by-side IR | VIS | fused mp4.
See docs/inference.md.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import re
import sys
from typing import Sequence

import numpy as np
import tqdm

from vidfusion_jax import frames as frame_io
from vidfusion_jax import host_memory
from vidfusion_jax import inference

FRAME_NAME = re.compile(r"^\d{4,}\.png$")


def frame_name(index: int) -> str:
  return f"{index:04d}.png"


def existing_frames(folder: pathlib.Path) -> list[pathlib.Path]:
  """Files of the output frame pattern (`NNNN.png`, 4 or more digits) already in `folder`."""
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir() if FRAME_NAME.match(p.name))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m vidfusion_jax.fuse", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True,
                      help="model directory written by `python -m vidfusion_jax.export`")
  parser.add_argument("--ir", required=True, help="infrared frames: a folder or a video file")
  parser.add_argument("--vis", required=True, help="visible frames: a folder or a video file")
  parser.add_argument("--output", required=True, help="folder for the fused NNNN.png frames")
  parser.add_argument("--backend", choices=("model", "artifact"), default="model",
                      help="run the params through the model code, or the exported jax.export "
                      "function alone (default: %(default)s)")
  parser.add_argument("--window", type=int, default=None,
                      help="frames per temporal window (default: 7 for videofusion, 30 for "
                      "temcoco)")
  parser.add_argument("--overlap", type=int, default=None,
                      help="frames shared by consecutive windows (default: 2 for videofusion, 5 "
                      "for temcoco, 0 with --reference for videofusion; at most --window - 1)")
  parser.add_argument("--blend", choices=inference.BLEND_MODES, default=None,
                      help="overlapping frames: 'linear' cross-fades the windows, 'last' keeps "
                      "the later window (default: linear; last with --reference)")
  parser.add_argument("--stretch", action=argparse.BooleanOptionalAction, default=None,
                      help="min-max stretch each fused frame to [0, 255] instead of clipping "
                      "(default: off; on with --reference for videofusion)")
  parser.add_argument("--reference", action="store_true",
                      help="the official test procedure's windows, blending and saving; the "
                      "flags above override its parts")
  parser.add_argument("--windows_per_call", type=int, default=1,
                      help="windows stacked into one device call (more: faster, more memory; "
                      "default: %(default)s)")
  parser.add_argument("--truncate", action="store_true",
                      help="fuse only the first N frames when the two inputs have different "
                      "frame counts (default: an error)")
  parser.add_argument("--resize", action="store_true",
                      help="resize visible frames to the infrared frame size when they differ "
                      "(default: an error)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace NNNN.png frames already in --output (default: refuse to run)")
  parser.add_argument("--mp4", default=None, help="also write the fused video to this mp4 path")
  parser.add_argument("--side_by_side", default=None,
                      help="also write an IR | VIS | fused mp4 to this path")
  parser.add_argument("--fps", type=float, default=30.0,
                      help="frame rate of the mp4 outputs (default: %(default)s)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
  return parser


def window_settings(model_name: str, args: argparse.Namespace) -> inference.WindowSettings:
  """The model's default (or --reference) windows with the explicitly given flags applied."""
  base = (inference.REFERENCE_WINDOWS if args.reference else inference.DEFAULT_WINDOWS)[model_name]
  given = {k: getattr(args, k) for k in ("window", "overlap", "blend", "stretch")
           if getattr(args, k) is not None}
  if "window" in given and "overlap" not in given:  # A default overlap must fit a smaller window.
    given["overlap"] = max(0, min(base.overlap, given["window"] - 1))
  return inference.WindowSettings(**{**vars(base), **given})


def _count(path: str, what: str) -> int:
  if not pathlib.Path(path).exists():
    raise ValueError(f"--{what} {path} does not exist")
  try:
    return frame_io.count_frames(path)
  except (OSError, RuntimeError) as error:
    raise frame_io.FrameReadError(f"cannot read --{what} {path}: {error}") from error


def run(args: argparse.Namespace) -> int:
  """Fuses the clips of `args`; returns the number of frames written."""
  manifest = inference.read_manifest(args.model)
  output = pathlib.Path(args.output)
  if output.exists() and not output.is_dir():
    raise ValueError(f"--output {output} is a file; give a folder")
  old_frames = existing_frames(output)
  if old_frames and not args.overwrite:
    raise ValueError(f"--output {output} already holds {len(old_frames)} frames "
                     f"({old_frames[0].name}, ...) from another run; choose an empty folder or "
                     "pass --overwrite to replace them")
  counts = {what: _count(getattr(args, what), what) for what in ("ir", "vis")}
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
  stream = fuser.fuse_stream(frame_io.iter_frames(args.ir), frame_io.iter_frames(args.vis),
                             truncate=args.truncate, resize=args.resize, with_inputs=True)
  written = 0
  with contextlib.ExitStack() as stack:
    videos = [stack.enter_context(frame_io.VideoWriter(path, fps=args.fps)) if path else None
              for path in (args.mp4, args.side_by_side)]
    progress = stack.enter_context(tqdm.tqdm(total=total, unit="frame", disable=args.quiet,
                                             desc="fusing"))
    try:
      for ir, vis, fused in stream:
        image = inference.to_uint8(fused, settings.stretch)
        frame_io.write_png(output / frame_name(written), image)
        if videos[0]:
          videos[0].write(image)
        if videos[1]:
          videos[1].write(np.concatenate(
              [inference.to_uint8(ir), inference.to_uint8(vis), image], axis=1))
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
  args = build_parser().parse_args(argv)
  host_memory.return_large_blocks_to_os()
  try:
    written = run(args)
  except (ValueError, OSError) as error:
    sys.exit("\n".join([f"error: {error}", *getattr(error, "__notes__", [])]))
  if not args.quiet:
    print(f"wrote {written} fused frames to {args.output}")


if __name__ == "__main__":
  main()
