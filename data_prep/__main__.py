"""Converts frame folders, video files or synthetic scenes to TFRecord clip shards.

    python -m data_prep m3svd --input ROOT --output OUT [--split train=@train.txt ...]
    python -m data_prep pairs --ir DIR --vis DIR [--ir-clean DIR --vis-clean DIR] --output OUT
    python -m data_prep videos --ir A.mp4 --vis B.mp4 --output OUT
    python -m data_prep synthetic --output OUT

Writes OUT/<split>-NNNNN-of-MMMMM.tfrecord, one `.idx` index per shard and, last,
OUT/dataset_info.json. Re-running the same command resumes an interrupted conversion. See
docs/data.md for the record format.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

from data_prep import sources
from vidfusion_jax import frames as frames_lib
from vidfusion_jax.data import synthetic
from vidfusion_jax.data import tfrecord
from vidfusion_jax.data import writer

DEFAULT_CLIP_LENGTH = 12
TRAIN_WINDOW = 6
_STREAM_WORDS = {"lq_ir": "degraded infrared inputs", "lq_vis": "degraded visible inputs",
                 "gt_ir": "clean infrared targets", "gt_vis": "clean visible targets"}


def _common_flags(parser: argparse.ArgumentParser, split_help: str) -> None:
  parser.add_argument("--output", required=True, type=pathlib.Path,
                      help="output folder for the shards, their indexes and dataset_info.json")
  parser.add_argument("--split", action="append", default=None, metavar="SPEC", help=split_help)
  parser.add_argument("--clip-length", type=int, default=DEFAULT_CLIP_LENGTH, metavar="K",
                      help="frames per record (default: %(default)s)")
  parser.add_argument("--clip-stride", type=int, default=None, metavar="S",
                      help=f"first-frame distance of consecutive records (default: K-"
                           f"{TRAIN_WINDOW - 1}, or K when K<{TRAIN_WINDOW}, so every "
                           f"{TRAIN_WINDOW}-frame window lies inside a record); the last record "
                           "of a sequence always ends on its last frame")
  parser.add_argument("--encoding", choices=("png", "raw"), default="png",
                      help="frame encoding: png (lossless, small) or raw uint8 (fast to read, "
                           "large) (default: %(default)s)")
  parser.add_argument("--records-per-shard", type=int, default=32, metavar="N",
                      help="records per shard file (default: %(default)s)")
  parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                      help="conversion processes (default: min(4, CPUs) = %(default)s)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Run `python -m data_prep <source> --help` for the flags of each source.")
  subparsers = parser.add_subparsers(dest="source", required=True, metavar="<source>")

  m3svd = subparsers.add_parser(
      "m3svd", help="M3SVD-style root: four stream folders of sequence folders of frames",
      description="ROOT/<stream folder>/<sequence>/<frame>.png for the four streams; frame "
                  "names must be identical across the streams of a sequence.")
  m3svd.add_argument("--input", required=True, type=pathlib.Path, metavar="ROOT",
                     help="dataset root holding the four stream folders")
  for stream, folder in sources.M3SVD_FOLDERS.items():
    m3svd.add_argument(f"--{stream.replace('_', '-')}-dir", default=folder, metavar="NAME",
                       help=f"folder under ROOT with the {_STREAM_WORDS[stream]} "
                            "(default: %(default)s)")
  _common_flags(m3svd, "NAME (every sequence), NAME=SEQ,SEQ,... or NAME=@FILE (one sequence a "
                       "line); repeat for several splits (default: train)")

  pairs = subparsers.add_parser(
      "pairs", help="generic IR/VIS frame folders, frames paired by sorted name",
      description="Each of --ir/--vis is a folder of frames (one sequence) or a folder of "
                  "sequence folders (matched by folder name). Frames are paired by position in "
                  "natural-sorted order. Without --ir-clean/--vis-clean the frames are stored as "
                  "clean targets (gt_ir, gt_vis), and the pipeline synthesises the inputs.")
  pairs.add_argument("--ir", required=True, type=pathlib.Path, help="infrared frames")
  pairs.add_argument("--vis", required=True, type=pathlib.Path, help="visible frames")
  pairs.add_argument("--ir-clean", type=pathlib.Path,
                     help="clean infrared frames; with it, --ir are the degraded inputs")
  pairs.add_argument("--vis-clean", type=pathlib.Path,
                     help="clean visible frames; with it, --vis are the degraded inputs")
  pairs.add_argument("--name", help="sequence name when the folders hold frames directly "
                                    "(default: the --ir folder's name)")
  _common_flags(pairs, "split name (default: train)")

  videos = subparsers.add_parser(
      "videos", help="paired IR/VIS video files (stored as clean targets)",
      description="Decodes paired video files with imageio-ffmpeg. Repeat --ir/--vis (paired by "
                  "order) for several sequences. The frames are stored as clean targets.")
  videos.add_argument("--ir", required=True, action="append", type=pathlib.Path,
                      help="infrared video (repeatable)")
  videos.add_argument("--vis", required=True, action="append", type=pathlib.Path,
                      help="visible video (repeatable)")
  videos.add_argument("--name", action="append",
                      help="sequence name per pair (repeatable; default: the IR file's stem)")
  _common_flags(videos, "split name (default: train)")

  synth = subparsers.add_parser(
      "synthetic", help="procedural, seeded IR/VIS scenes with degraded versions",
      description="Moving warm objects over textured, lit backgrounds, with synthesised "
                  "degraded inputs: a dataset that needs no download.")
  synth.add_argument("--num-sequences", type=int, default=4, help="(default: %(default)s)")
  synth.add_argument("--num-frames", type=int, default=24,
                     help="frames per sequence (default: %(default)s)")
  synth.add_argument("--height", type=int, default=128, help="(default: %(default)s)")
  synth.add_argument("--width", type=int, default=160, help="(default: %(default)s)")
  synth.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
  synth.add_argument("--clean-only", action="store_true",
                     help="store only the clean streams gt_ir, gt_vis")
  _common_flags(synth, "split name (default: train)")
  return parser


def _single_split(args: argparse.Namespace) -> str:
  if args.split and (len(args.split) > 1 or "=" in args.split[0]):
    raise ValueError(f"the {args.source} source takes one plain split name, got {args.split}")
  return args.split[0] if args.split else "train"


def _sequences(args: argparse.Namespace) -> dict[str, list[writer.SequenceSource]]:
  """{split: sequences} for the chosen source, all inputs checked."""
  if args.source == "m3svd":
    folders = {s: getattr(args, f"{s}_dir") for s in sources.M3SVD_FOLDERS}
    return sources.select_splits(sources.m3svd_sequences(args.input, folders),
                                 args.split or ["train"])
  split = _single_split(args)
  if args.source == "pairs":
    if (args.ir_clean is None) != (args.vis_clean is None):
      raise ValueError("give both --ir-clean and --vis-clean, or neither")
    if args.ir_clean is None:
      folders = {"gt_ir": args.ir, "gt_vis": args.vis}
    else:
      folders = {"lq_ir": args.ir, "lq_vis": args.vis, "gt_ir": args.ir_clean,
                 "gt_vis": args.vis_clean}
    return {split: sources.pair_sequences(folders, args.name)}
  if args.source == "videos":
    names = args.name or [path.stem for path in args.ir]
    if not len(args.ir) == len(args.vis) == len(names):
      raise ValueError(f"got {len(args.ir)} --ir, {len(args.vis)} --vis and {len(names)} --name "
                       "values; they are paired by order and must be as many")
    return {split: [sources.VideoSequence.from_videos(name, {"gt_ir": ir, "gt_vis": vis})
                    for name, ir, vis in zip(names, args.ir, args.vis)]}
  streams = ("gt_ir", "gt_vis") if args.clean_only else ("lq_ir", "lq_vis", "gt_ir", "gt_vis")
  return {split: synthetic.synthetic_sequences(args.num_sequences, args.num_frames, args.height,
                                               args.width, args.seed, streams)}


def _source_description(args: argparse.Namespace) -> dict:
  return {"converter": args.source} | {
      key: (str(value) if isinstance(value, pathlib.Path) else
            [str(v) for v in value] if isinstance(value, list) else value)
      for key, value in vars(args).items()
      if key not in ("source", "output", "workers", "no_progress")}


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  stride = args.clip_stride or (args.clip_length - TRAIN_WINDOW + 1
                                if args.clip_length >= TRAIN_WINDOW else args.clip_length)
  try:
    split_infos = {
        split: writer.convert_split(args.output, split, sequences, clip_length=args.clip_length,
                                    clip_stride=stride, frame_encoding=args.encoding,
                                    records_per_shard=args.records_per_shard,
                                    workers=args.workers, progress=not args.no_progress)
        for split, sequences in _sequences(args).items()}
    for split, split_info in split_infos.items():  # dataset_info.json last
      writer.write_dataset_info(args.output, split, split_info, _source_description(args))
  except (ValueError, FileNotFoundError, frames_lib.FrameReadError,
          tfrecord.RecordCorruptError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"wrote {args.output / writer.INFO_FILE}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
