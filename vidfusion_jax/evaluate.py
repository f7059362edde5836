"""Scores fused videos against their infrared and visible sources.

  python -m vidfusion_jax.evaluate --ir=IR --vis=VIS --fused NAME=PATH [--fused NAME2=PATH2 ...] \\
      --output=DIR

Every PATH is a folder of frames or a video file. Writes, under DIR: per_frame.csv, summary.csv,
summary.json, summary.md (one row per method), curves/<metric>.png (per-frame curves of every
method) and profiles/<method>.png (one pixel column of every frame, stacked over time). See
docs/metrics.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import pathlib
import re
import sys
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import tqdm  # pylint: disable=wrong-import-position

from vidfusion_jax import frames as frames_lib  # pylint: disable=wrong-import-position
from vidfusion_jax import metrics  # pylint: disable=wrong-import-position

_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _names(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
  if value.strip().lower() == "none":
    return ()
  names = tuple(n.strip() for n in value.split(",") if n.strip())
  unknown = [n for n in names if n not in allowed]
  if unknown:
    raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
  return names


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m vidfusion_jax.evaluate",
      description="Spatial (EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, CC, PSNR, MSE) and temporal "
                  "(flowD, BiSWE, MS2R, flicker) metrics of fused videos. PATHs are frame folders "
                  "or video files with the same frame count and frame size.")
  parser.add_argument("--ir", required=True, help="infrared source: frame folder or video")
  parser.add_argument("--vis", required=True, help="visible source: frame folder or video")
  parser.add_argument("--fused", required=True, action="append", metavar="NAME=PATH",
                      help="a fused result to score, named NAME (letters, digits, '_', '.', '-'); "
                           "repeat the flag for several methods")
  parser.add_argument("--output", required=True, help="folder for the tables and plots")
  parser.add_argument("--metrics", default=",".join(metrics.METRIC_NAMES),
                      type=lambda v: _names(v, metrics.METRIC_NAMES, "metrics"),
                      help="comma-separated spatial metrics, or 'none' (default: all)")
  parser.add_argument("--temporal", default=",".join(metrics.TEMPORAL_METRIC_NAMES),
                      type=lambda v: _names(v, metrics.TEMPORAL_METRIC_NAMES, "temporal metrics"),
                      help="comma-separated temporal metrics, or 'none' (default: all)")
  parser.add_argument("--convention", default="sum", choices=metrics.CONVENTIONS,
                      help="sum (CDDFuse reference) or mean of the two source scores of MI, VIF "
                           "and SSIM (default: sum)")
  parser.add_argument("--ssim-data-range", type=float, default=metrics.SSIM_DATA_RANGE_REFERENCE,
                      help="SSIM data range L: 2.0 reproduces the reference, 255 is the textbook "
                           "value (default: 2.0)")
  parser.add_argument("--mi-units", default="nats", choices=metrics.MI_UNITS,
                      help="units of MI (default: nats, like the reference)")
  parser.add_argument("--flow", default="farneback",
                      help="optical-flow backend of flowD, BiSWE and MS2R: "
                           f"{', '.join(sorted(metrics.FLOW_BACKENDS))}, or "
                           "'package.module:factory' returning a flow(frame_a, frame_b) callable "
                           "(default: farneback)")
  parser.add_argument("--max-frames", type=int, default=None,
                      help="score only the first N frames; every input then needs at least N "
                           "(default: all, and all inputs must have the same frame count)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="frames per jit-compiled spatial-metric call (default: 8)")
  parser.add_argument("--profile-column", type=int, default=None,
                      help="pixel column of the temporal profiles (default: the middle one)")
  return parser


def _parse_fused(specs: Sequence[str]) -> dict[str, pathlib.Path]:
  methods = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not path:
      raise ValueError(f"--fused {spec!r}: expected NAME=PATH")
    if not _METHOD_NAME.match(name):
      raise ValueError(f"--fused {spec!r}: NAME may hold only letters, digits, '_', '.', '-'")
    if name in methods:
      raise ValueError(f"--fused: method name {name!r} is given twice")
    methods[name] = pathlib.Path(path)
  return methods


def _check_inputs(paths: dict[str, pathlib.Path], max_frames: int | None) -> int:
  """Frame count to score; raises if the inputs disagree."""
  counts = {}
  for label, path in paths.items():
    if not path.exists():
      raise FileNotFoundError(f"{label}: {path} does not exist")
    try:
      counts[label] = frames_lib.count_frames(path)
    except (OSError, RuntimeError) as error:
      raise frames_lib.FrameReadError(f"cannot read {label} {path}: {error}") from error
  listing = ", ".join(f"{label} {n}" for label, n in counts.items())
  if min(counts.values()) == 0:
    raise ValueError(f"an input holds no frames ({listing})")
  if max_frames is not None and min(counts.values()) >= max_frames:
    return max_frames
  if len(set(counts.values())) != 1:
    raise ValueError(f"frame counts differ ({listing}): every input must hold the same number "
                     "of frames, or at least --max-frames frames")
  return next(iter(counts.values()))


def _triples(fused: pathlib.Path, ir: pathlib.Path, vis: pathlib.Path,
             count: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  readers = [frames_lib.iter_frames(p) for p in (fused, ir, vis)]
  for index, triple in enumerate(itertools.islice(zip(*readers), count)):
    shapes = [x.shape for x in triple]
    if not shapes[0] == shapes[1] == shapes[2]:
      raise ValueError(f"frame {index}: sizes differ (fused {shapes[0][:2]}, ir "
                       f"{shapes[1][:2]}, vis {shapes[2][:2]}); the inputs must be registered")
    yield triple


def evaluate_method(fused: pathlib.Path, ir: pathlib.Path, vis: pathlib.Path, count: int,
                    args: argparse.Namespace, name: str = "") -> dict:
  """Per-frame values of one method, its video summary and its temporal profile image."""
  spatial: dict[str, list[float]] = {n: [] for n in args.metrics}
  meter = metrics.TemporalMeter(args.flow, args.temporal) if args.temporal else None
  profile_columns = []
  batch = []

  full_batches = 0

  def flush():
    nonlocal full_batches
    if batch and args.metrics:
      # Once a full batch is compiled, pad the last one (repeating its last frame) to reuse it.
      padding = args.batch_size - len(batch) if full_batches else 0
      stacked = [np.stack(x) for x in zip(*(batch + batch[-1:] * padding))]
      values = metrics.compute(*stacked, names=args.metrics, convention=args.convention,
                               data_range=args.ssim_data_range, mi_units=args.mi_units)
      for metric, series in values.items():
        spatial[metric].extend(np.asarray(series, np.float64)[:len(batch)].tolist())
      full_batches += len(batch) == args.batch_size
    batch.clear()

  for f, a, b in tqdm.tqdm(_triples(fused, ir, vis, count), total=count, unit="frame",
                           desc=name or str(fused)):
    column = f.shape[1] // 2 if args.profile_column is None else args.profile_column
    if not 0 <= column < f.shape[1]:
      raise ValueError(f"--profile-column {column} is outside frames {f.shape[1]} pixels wide")
    profile_columns.append(f[:, column])
    batch.append((f, a, b))
    if len(batch) == args.batch_size:
      flush()
    if meter is not None:
      meter.update(f, a, b)
  flush()
  per_frame = {n: np.asarray(v) for n, v in spatial.items()}
  summary = {n: float(np.mean(v)) for n, v in per_frame.items()}
  flow_name = None
  if meter is not None:
    result = meter.result()
    per_frame.update(result.per_frame)
    summary.update(result.values)
    flow_name = result.flow_backend
  return {"per_frame": per_frame, "summary": summary, "flow_backend": flow_name,
          "profile": np.stack(profile_columns, axis=1)}


def _number(value: float) -> float | None:
  return None if math.isnan(value) else value


def _write_tables(out: pathlib.Path, results: dict[str, dict], columns: Sequence[str],
                  count: int) -> None:
  with open(out / "per_frame.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "frame", *columns])
    for method, result in results.items():
      for t in range(count):
        writer.writerow([method, t, *(repr(float(result["per_frame"][c][t])) for c in columns)])
  header = ["method", "frames", *columns, "flow_backend"]
  rows = [[method, count, *(r["summary"][c] for c in columns), r["flow_backend"] or ""]
          for method, r in results.items()]
  with open(out / "summary.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([[*row[:2], *(repr(v) for v in row[2:-1]), row[-1]] for row in rows])
  summary = {method: {"frames": count, "flow_backend": r["flow_backend"],
                      **{c: _number(r["summary"][c]) for c in columns}}
             for method, r in results.items()}
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [str(row[0]), str(row[1]), *(f"{v:.4f}" for v in row[2:-1]), row[-1] or "-"]
    lines.append("| " + " | ".join(cells) + " |")
  (out / "summary.md").write_text("\n".join(lines) + "\n")


def _write_plots(out: pathlib.Path, results: dict[str, dict], columns: Sequence[str]) -> None:
  curves = out / "curves"
  curves.mkdir(exist_ok=True)
  for column in columns:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for method, result in results.items():
      series = result["per_frame"][column]
      ax.plot(np.arange(len(series)), series, marker=".", label=method)
    title = column
    flow = next((r["flow_backend"] for r in results.values() if r["flow_backend"]), None)
    if column in metrics.TEMPORAL_METRIC_NAMES and column != "flicker" and flow:
      title += f" (flow: {flow})"
    ax.set(xlabel="frame", ylabel=column, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(curves / f"{column}.png", dpi=100)
    plt.close(fig)
  profiles = out / "profiles"
  profiles.mkdir(exist_ok=True)
  for method, result in results.items():
    frames_lib.write_png(profiles / f"{method}.png", result["profile"])


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.max_frames is not None and args.max_frames < 1:
    parser.error("--max-frames must be at least 1")
  if args.batch_size < 1:
    parser.error("--batch-size must be at least 1")
  if not args.metrics and not args.temporal:
    parser.error("nothing to compute: --metrics and --temporal are both 'none'")
  try:
    methods = _parse_fused(args.fused)
    ir, vis = pathlib.Path(args.ir), pathlib.Path(args.vis)
    count = _check_inputs({"ir": ir, "vis": vis, **{f"fused {k!r}": v for k, v in methods.items()}},
                          args.max_frames)
    if args.temporal:
      args.flow = metrics.get_flow_backend(args.flow)
    out = pathlib.Path(args.output)
    frames_lib.check_writable_folder(out, "--output")
    results = {name: evaluate_method(path, ir, vis, count, args, name)
               for name, path in methods.items()}
  except (ValueError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  columns = [*args.metrics, *args.temporal]
  _write_tables(out, results, columns, count)
  _write_plots(out, results, columns)
  print((out / "summary.md").read_text(), end="")
  if args.temporal:
    print(f"temporal metrics computed with the {metrics.backend_name(args.flow)!r} flow backend")
  return 0


if __name__ == "__main__":
  sys.exit(main())
