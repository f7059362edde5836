"""Training clips per second: TFRecord clips (PNG and raw) against reading PNG frame folders.

    python benchmarks/input_pipeline.py --data_root=../shared/data/m3svd_mini --seconds=20

Converts the M3SVD-layout root twice (PNG and raw records, into --work_dir, resumable), then for
each reader and each worker count runs the training pipeline (T frames, square crops, batches)
for --seconds after one warm-up batch. The folder reader does what the official PyTorch loader
does per clip: decode T full PNG frames of each of the four streams, then crop; it runs in the
same Grain machinery (same shuffling, threads and worker processes) so only the reading differs.
Prints one JSON line per run, and one per encoding with the bytes on disk per frame.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import tempfile
import time

from absl import flags
import grain
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from data_prep import sources  # pylint: disable=wrong-import-position
from vidfusion_jax import cli  # pylint: disable=wrong-import-position
from vidfusion_jax import frames as frames_lib  # pylint: disable=wrong-import-position
from vidfusion_jax import data  # pylint: disable=wrong-import-position
from vidfusion_jax.data import writer  # pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class FolderClips(grain.transforms.RandomMap):
  """(sequence) -> a random T-frame window of the four streams, read from PNG files."""
  sequences: tuple[sources.FolderSequence, ...]
  window: int
  crop: int

  def random_map(self, element: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sequence = self.sequences[element]
    start = int(rng.integers(0, sequence.num_frames - self.window + 1))
    top = int(rng.integers(0, sequence.height - self.crop + 1))
    left = int(rng.integers(0, sequence.width - self.crop + 1))
    return {stream: np.stack([frames_lib.read_frame(path)[top:top + self.crop,
                                                          left:left + self.crop]
                              for path in paths[start:start + self.window]])
            for stream, paths in sequence.files.items()}


def folder_dataset(sequences, args, workers: int) -> grain.IterDataset:
  ds = grain.MapDataset.range(len(sequences)).repeat(None).shuffle(seed=0)
  ds = ds.random_map(FolderClips(tuple(sequences), args.clip_length, args.crop_size), seed=0)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=args.read_threads,
                                            prefetch_buffer_size=2 * args.batch_size))
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds.batch(args.batch_size, drop_remainder=True)


def measure(dataset: grain.IterDataset, batch_size: int, seconds: float) -> dict:
  iterator = iter(dataset)
  try:
    next(iterator)  # warm-up: worker start, first reads
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      next(iterator)
      batches += 1
    elapsed = time.perf_counter() - start
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return {"clips_per_s": round(batches * batch_size / elapsed, 2), "batches": batches,
          "seconds": round(elapsed, 2)}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("data_root", str(pathlib.Path(__file__).resolve().parents[2] / "shared" /
                                       "data" / "m3svd_mini"),
                      "M3SVD-layout root (default: ../shared/data/m3svd_mini)", flag_values=fv)
  flags.DEFINE_string("work_dir", None, "where the converted records go (default: a temporary "
                      "folder)", flag_values=fv)
  flags.DEFINE_integer("record_clip_length", 12, "frames per record K", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("clip_length", 6, "T", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("crop_size", 128, "crop side in pixels", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("batch_size", 12, "clips per batch", lower_bound=1, flag_values=fv)
  flags.DEFINE_list("workers", ["0", "1", "2"], "worker counts", flag_values=fv)
  flags.DEFINE_integer("read_threads", 2, "Grain read threads per process", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_float("seconds", 20.0, "measured time per run", lower_bound=0.0, flag_values=fv)
  flags.DEFINE_list("readers", ["folder", "png", "raw"], "subset of folder,png,raw",
                    flag_values=fv)


def main() -> None:
  args = cli.parse(None, define_flags, prog="python benchmarks/input_pipeline.py", usage=__doc__)
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags (defaults here)

  work_dir = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="input_pipeline_"))
  sequences = sources.m3svd_sequences(pathlib.Path(args.data_root), sources.M3SVD_FOLDERS)
  record_dirs = {}
  for encoding in ("png", "raw"):
    record_dirs[encoding] = work_dir / encoding
    info = writer.convert(record_dirs[encoding], "train", sequences, {"converter": "benchmark"},
                          clip_length=args.record_clip_length,
                          clip_stride=args.record_clip_length - args.clip_length + 1,
                          frame_encoding=encoding, workers=2, progress=False)
    split = info["splits"]["train"]
    frames_stored = split["num_records"] * args.record_clip_length * len(info["streams"])
    print(json.dumps({"encoding": encoding, "storage": "records",
                      "bytes_per_frame": round(sum(s["num_bytes"] for s in split["shards"])
                                               / frames_stored)}), flush=True)
  png_files = [p for s in sequences for paths in s.files.values() for p in paths]
  print(json.dumps({"encoding": "png", "storage": "folders", "bytes_per_frame": round(
      sum(p.stat().st_size for p in png_files) / len(png_files))}), flush=True)

  common = {"batch_size": args.batch_size, "clip_length": args.clip_length,
            "crop_size": args.crop_size, "record_clip_length": args.record_clip_length}
  for workers in (int(w) for w in args.workers):
    for reader in args.readers:
      if reader == "folder":
        dataset = folder_dataset(sequences, args, workers)
      else:
        dataset = data.make_train_dataset(
            record_dirs[reader], "train", global_batch_size=args.batch_size,
            clip_length=args.clip_length, crop_size=args.crop_size, seed=0, process_index=0,
            process_count=1, worker_count=workers, read_threads=args.read_threads)
      result = measure(dataset, args.batch_size, args.seconds)
      print(json.dumps({"reader": reader, "workers": workers} | result | common), flush=True)


if __name__ == "__main__":
  main()
