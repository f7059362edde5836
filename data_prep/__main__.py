"""Converts frame folders, video files or synthetic scenes to TFRecord clip shards.

    python -m data_prep m3svd --input ROOT --output OUT [--split train=@train.txt ...]
    python -m data_prep pairs --ir DIR --vis DIR [--ir_clean DIR --vis_clean DIR] --output OUT
    python -m data_prep videos --ir A.mp4 --vis B.mp4 --output OUT
    python -m data_prep synthetic --output OUT

Writes OUT/<split>-NNNNN-of-MMMMM.tfrecord, one `.idx` index per shard and, last,
OUT/dataset_info.json. Re-running the same command resumes an interrupted conversion. Without
`--runner` the conversion runs on a local process pool (`--workers`); with `--runner=...` it runs
as an Apache Beam job (the `beam` extra), and every flag that is not one of ours is a Beam
pipeline option (`--runner=DataflowRunner --project=... --region=...`). Both write the same bytes.
See docs/data.md for the record format and the Beam command lines.
"""

from __future__ import annotations

import os
import pathlib
import sys
import warnings
from typing import Sequence

from absl import flags

from data_prep import engines
from data_prep import sources
from vidfusion_jax import files
from vidfusion_jax import frames as frames_lib
from vidfusion_jax.data import synthetic
from vidfusion_jax.data import tfrecord
from vidfusion_jax.data import writer

DEFAULT_CLIP_LENGTH = 12
TRAIN_WINDOW = 6
SOURCES = ("m3svd", "pairs", "videos", "synthetic")
_STREAM_WORDS = {"lq_ir": "degraded infrared inputs", "lq_vis": "degraded visible inputs",
                 "gt_ir": "clean infrared targets", "gt_vis": "clean visible targets"}

# Our own flags, apart from absl's global ones, so that Beam's options pass through untouched.
FLAGS = flags.FlagValues()
_SOURCE_FLAGS: dict[str, list[str]] = {source: [] for source in SOURCES}


def _define(define, name: str, default, help_text: str, sources_using: Sequence[str] = SOURCES,
            **kwargs) -> None:
  define(name, default, help=help_text, flag_values=FLAGS, **kwargs)
  for source in sources_using:
    _SOURCE_FLAGS[source].append(name)


_define(flags.DEFINE_string, "output", None,
        "output folder for the shards, their indexes and dataset_info.json; local or a gs:// / "
        "s3:// URL (the cloud extra)")
_define(flags.DEFINE_multi_string, "split", None,
        "m3svd: NAME (every sequence), NAME=SEQ,SEQ,... or NAME=@FILE (one sequence a line), "
        "repeat for several splits; other sources: one split name (default: train)")
_define(flags.DEFINE_integer, "clip_length", DEFAULT_CLIP_LENGTH, "frames per record (K)")
_define(flags.DEFINE_integer, "clip_stride", None,
        f"first-frame distance of consecutive records (default: K-{TRAIN_WINDOW - 1}, or K when "
        f"K<{TRAIN_WINDOW}, so every {TRAIN_WINDOW}-frame window lies inside a record); the last "
        "record of a sequence always ends on its last frame")
_define(flags.DEFINE_enum, "encoding", "png", "frame encoding: png (lossless, small) or raw "
        "uint8 (fast to read, large)", enum_values=["png", "raw"])
_define(flags.DEFINE_integer, "records_per_shard", 32, "records per shard file")
_define(flags.DEFINE_integer, "workers", min(4, os.cpu_count() or 1),
        "conversion processes of the local pool (without --runner)")
_define(flags.DEFINE_boolean, "progress", True, "show a progress bar (local pool)")
_define(flags.DEFINE_string, "input", None, "dataset root holding the four stream folders",
        ["m3svd"])
for _stream, _folder in sources.M3SVD_FOLDERS.items():
  _define(flags.DEFINE_string, f"{_stream}_dir", _folder,
          f"folder under --input with the {_STREAM_WORDS[_stream]}", ["m3svd"])
_define(flags.DEFINE_multi_string, "ir", None,
        "pairs: infrared frames (a folder of frames or of sequence folders); videos: infrared "
        "video (repeatable, paired with --vis by order)", ["pairs", "videos"])
_define(flags.DEFINE_multi_string, "vis", None, "visible frames or video, as --ir",
        ["pairs", "videos"])
_define(flags.DEFINE_multi_string, "name", None,
        "pairs: sequence name when the folders hold frames directly (default: the --ir folder's "
        "name); videos: sequence name per pair (default: the IR file's stem)",
        ["pairs", "videos"])
_define(flags.DEFINE_string, "ir_clean", None,
        "clean infrared frames; with it, --ir are the degraded inputs", ["pairs"])
_define(flags.DEFINE_string, "vis_clean", None,
        "clean visible frames; with it, --vis are the degraded inputs", ["pairs"])
_define(flags.DEFINE_integer, "num_sequences", 4, "synthetic sequences", ["synthetic"])
_define(flags.DEFINE_integer, "num_frames", 24, "frames per sequence", ["synthetic"])
_define(flags.DEFINE_integer, "height", 128, "frame height", ["synthetic"])
_define(flags.DEFINE_integer, "width", 160, "frame width", ["synthetic"])
_define(flags.DEFINE_integer, "seed", 0, "random seed", ["synthetic"])
_define(flags.DEFINE_boolean, "clean_only", False, "store only the clean streams gt_ir, gt_vis",
        ["synthetic"])

# The argparse spellings of the previous release, accepted with a warning until the next one.
DEPRECATED_FLAGS = {f"--{name.replace('_', '-')}": f"--{name}" for name in FLAGS if "_" in name}
DEPRECATED_FLAGS["--no-progress"] = "--noprogress"

_SOURCE_HELP = {
    "m3svd": "M3SVD-style root: ROOT/<stream folder>/<sequence>/<frame>.png for the four streams; "
             "frame names must be identical across the streams of a sequence.",
    "pairs": "Generic IR/VIS frame folders. Each of --ir/--vis is a folder of frames (one "
             "sequence) or a folder of sequence folders (matched by folder name); frames are "
             "paired by natural-sorted position. Without --ir_clean/--vis_clean the frames are "
             "stored as clean targets and the pipeline synthesises the inputs.",
    "videos": "Paired IR/VIS video files decoded with imageio-ffmpeg (the `video` extra), stored "
              "as clean targets.",
    "synthetic": "Procedural, seeded IR/VIS scenes with degraded versions: a dataset that needs "
                 "no download.",
}


class UsageError(ValueError):
  """A command line that does not fit the chosen source."""


def usage(source: str | None = None) -> str:
  """The help text: every source, or one source and its flags."""
  if source is None:
    lines = [__doc__, "Sources:"] + [f"  {s:10s} {_SOURCE_HELP[s]}" for s in SOURCES]
    lines.append("\nRun `python -m data_prep <source> --help` for the flags of each source.")
    return "\n".join(lines) + "\n"
  lines = [f"python -m data_prep {source} [flags] [Beam pipeline options]", "",
           _SOURCE_HELP[source], "", "Flags:"]
  for name in _SOURCE_FLAGS[source]:
    flag = FLAGS[name]
    default = "" if flag.default is None else f" (default: {flag.default_as_str})"
    lines.append(f"  --{name}: {flag.help}{default}")
  lines.append("\nOld hyphenated spellings (--clip-length, --no-progress, ...) still work in "
               "this release, with a warning.")
  return "\n".join(lines) + "\n"


def _replace_deprecated(args: Sequence[str]) -> list[str]:
  replaced = []
  for arg in args:
    old, sep, value = arg.partition("=")
    if old in DEPRECATED_FLAGS:
      warnings.warn(f"{old} is deprecated and goes away in the next release; use "
                    f"{DEPRECATED_FLAGS[old]}", FutureWarning, stacklevel=3)
      arg = DEPRECATED_FLAGS[old] + sep + value
    replaced.append(arg)
  return replaced


def parse(argv: Sequence[str]) -> tuple[str, list[str]]:
  """Parses our flags into FLAGS; returns the source and the remaining (Beam) arguments."""
  if not argv or argv[0] not in SOURCES:
    raise UsageError(f"the first argument must be a source, one of {', '.join(SOURCES)}; "
                     f"got {argv[0] if argv else 'nothing'} (see --help)")
  source = argv[0]
  FLAGS.unparse_flags()
  try:
    rest = FLAGS(["data_prep"] + _replace_deprecated(argv[1:]), known_only=True)[1:]
  except flags.Error as error:
    raise UsageError(str(error)) from error
  foreign = sorted(name for name in FLAGS if FLAGS[name].present
                   and name not in _SOURCE_FLAGS[source])
  if foreign:
    raise UsageError(f"the {source} source does not take {', '.join('--' + n for n in foreign)}")
  if FLAGS.output is None:
    raise UsageError("--output is required")
  if rest and not any(arg.startswith("--runner") for arg in rest):
    raise UsageError(f"unknown arguments {rest}: these are neither data_prep flags nor, without "
                     "--runner, Beam pipeline options (see --help)")
  return source, rest


def _required(name: str) -> list[str]:
  if not FLAGS[name].value:
    raise UsageError(f"--{name} is required")
  return FLAGS[name].value


def _single(name: str) -> str | None:
  values = FLAGS[name].value or []
  if len(values) > 1:
    raise UsageError(f"the pairs source takes one --{name}, got {values}")
  return values[0] if values else None


def _single_split(source: str) -> str:
  split = FLAGS.split
  if split and (len(split) > 1 or "=" in split[0]):
    raise UsageError(f"the {source} source takes one plain split name, got {split}")
  return split[0] if split else "train"


def _sequences(source: str) -> dict[str, list[writer.SequenceSource]]:
  """{split: sequences} for the chosen source, all inputs checked."""
  if source == "m3svd":
    if FLAGS.input is None:
      raise UsageError("--input is required")
    folders = {s: FLAGS[f"{s}_dir"].value for s in sources.M3SVD_FOLDERS}
    return sources.select_splits(sources.m3svd_sequences(files.as_path(FLAGS.input), folders),
                                 FLAGS.split or ["train"])
  split = _single_split(source)
  if source == "pairs":
    ir, vis = _single("ir"), _single("vis")
    if ir is None or vis is None:
      raise UsageError("--ir and --vis are required")
    if (FLAGS.ir_clean is None) != (FLAGS.vis_clean is None):
      raise UsageError("give both --ir_clean and --vis_clean, or neither")
    if FLAGS.ir_clean is None:
      folders = {"gt_ir": ir, "gt_vis": vis}
    else:
      folders = {"lq_ir": ir, "lq_vis": vis, "gt_ir": FLAGS.ir_clean, "gt_vis": FLAGS.vis_clean}
    return {split: sources.pair_sequences({s: files.as_path(f) for s, f in folders.items()},
                                          _single("name"))}
  if source == "videos":
    ir_paths, vis_paths = _required("ir"), _required("vis")
    urls = [p for p in (*ir_paths, *vis_paths) if files.is_url(p)]
    if urls:
      raise UsageError(f"video files must be local (OpenCV reads them): {', '.join(urls)}; "
                       "copy them to a local disk first (frame folders may be URLs)")
    irs, viss = [pathlib.Path(p) for p in ir_paths], [pathlib.Path(p) for p in vis_paths]
    names = FLAGS.name or [path.stem for path in irs]
    if not len(irs) == len(viss) == len(names):
      raise UsageError(f"got {len(irs)} --ir, {len(viss)} --vis and {len(names)} --name values; "
                       "they are paired by order and must be as many")
    return {split: [sources.VideoSequence.from_videos(name, {"gt_ir": ir, "gt_vis": vis})
                    for name, ir, vis in zip(names, irs, viss)]}
  streams = ("gt_ir", "gt_vis") if FLAGS.clean_only else ("lq_ir", "lq_vis", "gt_ir", "gt_vis")
  return {split: synthetic.synthetic_sequences(FLAGS.num_sequences, FLAGS.num_frames,
                                               FLAGS.height, FLAGS.width, FLAGS.seed, streams)}


def _source_description(source: str) -> dict:
  """The conversion's inputs and options as recorded in dataset_info.json (not the engine's)."""
  return {"converter": source} | {
      name: FLAGS[name].value for name in _SOURCE_FLAGS[source]
      if name not in ("output", "workers", "progress")}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "--helpshort", "--helpfull"):
    print(usage())
    return 0
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
    if argv[0] in SOURCES:
      print(usage(argv[0]))
      return 0
  try:
    source, pipeline_args = parse(argv)
    output = files.as_path(FLAGS.output)
    stride = FLAGS.clip_stride or (FLAGS.clip_length - TRAIN_WINDOW + 1
                                   if FLAGS.clip_length >= TRAIN_WINDOW else FLAGS.clip_length)
    plans = [writer.plan_split(output, split, sequences, clip_length=FLAGS.clip_length,
                               clip_stride=stride, frame_encoding=FLAGS.encoding,
                               records_per_shard=FLAGS.records_per_shard)
             for split, sequences in _sequences(source).items()]
    if pipeline_args:
      engines.run_beam(output, plans, _source_description(source), pipeline_args)
    else:
      engines.run_pool(output, plans, _source_description(source), workers=FLAGS.workers,
                       progress=FLAGS.progress)
  except (ValueError, FileNotFoundError, frames_lib.FrameReadError, tfrecord.RecordCorruptError,
          writer.ConversionError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"wrote {output / writer.INFO_FILE}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
