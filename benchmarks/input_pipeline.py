"""Training clips per second: TFRecord clips (PNG and raw) against reading PNG frame folders.

    python benchmarks/input_pipeline.py --data-root ../shared/data/m3svd_mini --seconds 20

Converts the M3SVD-layout root twice (PNG and raw records, into --work-dir, resumable), then for
each reader and each worker count runs the training pipeline (T frames, square crops, batches)
for --seconds after one warm-up batch. The folder reader does what the official PyTorch loader
does per clip: decode T full PNG frames of each of the four streams, then crop; it runs in the
same Grain machinery (same shuffling, threads and worker processes) so only the reading differs.
Prints one JSON line per run, and one per encoding with the bytes on disk per frame.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-root", type=pathlib.Path, default=pathlib.Path(
      __file__).resolve().parents[2] / "shared" / "data" / "m3svd_mini",
                      help="M3SVD-layout root (default: ../shared/data/m3svd_mini)")
  parser.add_argument("--work-dir", type=pathlib.Path, default=None,
                      help="where the converted records go (default: a temporary folder)")
  parser.add_argument("--record-clip-length", type=int, default=12,
                      help="frames per record K (default: %(default)s)")
  parser.add_argument("--clip-length", type=int, default=6, help="T (default: %(default)s)")
  parser.add_argument("--crop-size", type=int, default=128, help="(default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=12, help="(default: %(default)s)")
  parser.add_argument("--workers", default="0,1,2",
                      help="comma-separated worker counts (default: %(default)s)")
  parser.add_argument("--read-threads", type=int, default=2,
                      help="Grain read threads per process (default: %(default)s)")
  parser.add_argument("--seconds", type=float, default=20.0,
                      help="measured time per run (default: %(default)s)")
  parser.add_argument("--readers", default="folder,png,raw",
                      help="comma-separated subset of folder,png,raw (default: %(default)s)")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags (defaults here)

  work_dir = args.work_dir or pathlib.Path(tempfile.mkdtemp(prefix="input_pipeline_"))
  sequences = sources.m3svd_sequences(args.data_root, sources.M3SVD_FOLDERS)
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
  for workers in (int(w) for w in args.workers.split(",")):
    for reader in args.readers.split(","):
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
