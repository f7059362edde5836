"""Conversion speed: frames per second of the local process pool and of Beam's direct runner.

    python benchmarks/data_prep.py --data_root ../shared/data/m3svd_mini
    python benchmarks/data_prep.py --compare_with ../main-old   # also time another checkout
    python benchmarks/data_prep.py --quick                      # 4 frames: checks the script

One frame is one time step of all four streams. Each engine converts the M3SVD-layout root into a
fresh folder (PNG records, K=12, default stride) with `python -m data_prep m3svd ...` in a fresh
Python process, timed from after the imports: the time includes starting the pool's processes or
the Beam job and its workers. Runs are interleaved and repeated so that a machine shared with
other work affects them alike. Every run must write the same bytes. `--compare_with` times the
pool of another checkout (e.g. the previous release) in the same run. Last, the stages of
converting one frame are timed in this process: reading the files, storing them
(`records.stored_png`: verifying the PNGs that pass through, decoding and encoding the others),
the CRCs, writing and, for comparison, a full decode of every file. Prints one JSON line per
engine and one for the stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import sources  # pylint: disable=wrong-import-position
from vidfusion_jax import cli  # pylint: disable=wrong-import-position
from vidfusion_jax import frames as frames_lib  # pylint: disable=wrong-import-position
from vidfusion_jax.data import records  # pylint: disable=wrong-import-position
from vidfusion_jax.data import tfrecord  # pylint: disable=wrong-import-position

_DATA_ROOT = flags.DEFINE_string("data_root", str(ROOT.parent / "shared" / "data" / "m3svd_mini"),
                                 "M3SVD-layout root to convert")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "scratch folder (default: a temporary one)")
_REPEATS = flags.DEFINE_integer("repeats", 2, "runs per engine; the median is reported")
_RECORDS_PER_SHARD = flags.DEFINE_integer(
    "records_per_shard", 3, "records per shard; 3 gives m3svd_mini one shard per sequence, so "
    "two workers have one shard each")
_COMPARE_WITH = flags.DEFINE_string(
    "compare_with", None, "another checkout whose process pool is timed as well (it is given "
    "the hyphenated flag spellings, which every release accepts)")
_QUICK = flags.DEFINE_boolean("quick", False, "the first 4 frames, K=2, one run each")

BEAM = ["--runner=DirectRunner", "--direct_running_mode=multi_processing"]


def _engines() -> dict[str, tuple[str, list[str]]]:
  """{engine: (checkout, extra arguments)}; --quick: one worker each."""
  engines = {f"{engine}, {n} worker{'s' * (n > 1)}": (str(ROOT), extra + [f"{flag}={n}"])
             for n in ((1,) if _QUICK.value else (1, 2))
             for engine, extra, flag in (("pool", [], "--workers"),
                                         ("beam", BEAM, "--direct_num_workers"))}
  if _COMPARE_WITH.value:
    engines["compared checkout, pool, 2 workers"] = (_COMPARE_WITH.value, ["--workers", "2"])
  return engines


# Times `python -m data_prep` after Python and the converter have been imported.
_TIMED_MAIN = ("import sys, time\n"
               "from data_prep import __main__ as cli\n"
               "start = time.perf_counter()\n"
               "assert cli.main(sys.argv[1:]) == 0\n"
               "print(time.perf_counter() - start)\n")


def _convert(checkout: str, root: pathlib.Path, output: pathlib.Path, clip_length: int,
             extra: list[str]) -> float:
  """Seconds of one conversion by `checkout`'s converter, in a fresh Python process."""
  args = ["m3svd", "--input", str(root), "--output", str(output), "--clip-length",
          str(clip_length), "--records-per-shard", str(_RECORDS_PER_SHARD.value), "--no-progress",
          *extra]
  result = subprocess.run([sys.executable, "-W", "ignore::FutureWarning", "-c", _TIMED_MAIN,
                           *args], check=True, cwd=checkout, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": checkout})
  return float(result.stdout.split()[-1])


def _digest(folder: pathlib.Path) -> str:
  digest = hashlib.sha256()
  for path in sorted(folder.iterdir()):
    digest.update(path.name.encode() + path.read_bytes())
  return digest.hexdigest()


def _subset(root: pathlib.Path, work: pathlib.Path, frames: int) -> pathlib.Path:
  """Symlinks to the first `frames` frames of every sequence."""
  for stream_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    for sequence in sorted(p for p in stream_dir.iterdir() if p.is_dir()):
      (work / stream_dir.name / sequence.name).mkdir(parents=True)
      for path in frames_lib.list_frame_files(sequence)[:frames]:
        (work / stream_dir.name / sequence.name / path.name).symlink_to(path.resolve())
  return work


def _stages(sequences: list[sources.FolderSequence]) -> dict[str, float]:
  """Milliseconds per frame (four streams) of each stage, in this process."""
  totals = dict.fromkeys(("read", "store", "crc", "write", "full_decode"), 0.0)
  frames = 0
  with tempfile.TemporaryFile() as sink:
    for sequence in sequences:
      for index in range(sequence.num_frames):
        for paths in sequence.files.values():
          start = time.perf_counter()
          data = paths[index].read_bytes()
          read = time.perf_counter()
          stored = records.stored_png(data, str(paths[index]), (sequence.height, sequence.width))
          encoded = time.perf_counter()
          tfrecord.masked_crc32c(stored)
          crc = time.perf_counter()
          sink.write(stored)
          written = time.perf_counter()
          frames_lib.decode_frame(data, str(paths[index]))
          totals["read"] += read - start
          totals["store"] += encoded - read
          totals["crc"] += crc - encoded
          totals["write"] += written - crc
          totals["full_decode"] += time.perf_counter() - written
        frames += 1
    start = time.perf_counter()
    os.fsync(sink.fileno())
    totals["write"] += time.perf_counter() - start
  return {stage: round(1e3 * seconds / frames, 2) for stage, seconds in totals.items()}


def main(argv):
  del argv
  frames, clip_length, repeats = (4, 2, 1) if _QUICK.value else (None, 12, _REPEATS.value)
  with tempfile.TemporaryDirectory(dir=_WORK_DIR.value) as work:
    work = pathlib.Path(work)
    root = pathlib.Path(_DATA_ROOT.value)
    if frames:
      root = _subset(root, work / "root", frames)
    sequences = sources.m3svd_sequences(root, sources.M3SVD_FOLDERS)
    num_frames = sum(s.num_frames for s in sequences)
    seconds: dict[str, list[float]] = {engine: [] for engine in _engines()}
    digests = set()
    for _ in range(repeats):
      for engine, (checkout, extra) in _engines().items():
        output = work / "out"
        shutil.rmtree(output, ignore_errors=True)
        seconds[engine].append(_convert(checkout, root, output, clip_length, extra))
        if checkout == str(ROOT):
          digests.add(_digest(output))
    if len(digests) != 1:
      raise RuntimeError(f"the engines wrote different bytes ({len(digests)} digests)")
    for engine, runs in seconds.items():
      print(json.dumps({"benchmark": "data_prep", "engine": engine, "frames": num_frames,
                        "seconds": round(statistics.median(runs), 2),
                        "frames_per_s": round(num_frames / statistics.median(runs), 2),
                        "runs": [round(s, 2) for s in runs], "quick": _QUICK.value}))
    print(json.dumps({"benchmark": "data_prep", "stage_ms_per_frame": _stages(sequences),
                      "frames": num_frames, "quick": _QUICK.value}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.app_flags_parser(__doc__))
