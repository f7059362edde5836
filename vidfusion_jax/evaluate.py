"""Scores fused videos against their infrared and visible sources.

Spatial (EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, CC, PSNR, MSE) and temporal (flowD, BiSWE, MS2R,
flicker) metrics of fused videos:

  python -m vidfusion_jax.evaluate --ir=IR --vis=VIS --fused NAME=PATH [--fused NAME2=PATH2 ...] \\
      --output=DIR [--protocol=vfbench --flow=sea_raft:CKPT[:S|M|L]]

Every PATH is a folder of frames or a video file; `--split=CSV --split_root=DIR` (a VF-Bench split
CSV and its dataset root) replaces --ir and --vis. PATH and DIR may be `gs://` or `s3://` URLs (the
`cloud` extra). Writes, under DIR: per_frame.csv, summary.csv, summary.json, summary.md (one row per
method, naming the temporal protocol and flow backend), curves/<metric>.png (per-frame curves of every
method) and profiles/<method>.png (one pixel column of every frame, stacked over time). See
docs/metrics.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import re
import sys
from typing import Any, Iterator, Sequence

from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import tqdm  # pylint: disable=wrong-import-position

from vidfusion_jax import cli  # pylint: disable=wrong-import-position
from vidfusion_jax import compilation_cache  # pylint: disable=wrong-import-position
from vidfusion_jax import files  # pylint: disable=wrong-import-position
from vidfusion_jax import frames as frames_lib  # pylint: disable=wrong-import-position
from vidfusion_jax import metrics  # pylint: disable=wrong-import-position
from vidfusion_jax import splits  # pylint: disable=wrong-import-position
from vidfusion_jax.metrics import feacd as feacd_lib  # pylint: disable=wrong-import-position
from vidfusion_jax.metrics import flow as flow_lib  # pylint: disable=wrong-import-position
from vidfusion_jax.metrics import temporal as temporal_lib  # pylint: disable=wrong-import-position

_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _names(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
  if value.strip().lower() == "none":
    return ()
  names = tuple(n.strip() for n in value.split(",") if n.strip())
  unknown = [n for n in names if n not in allowed]
  if unknown:
    raise ValueError(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
  return names


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of `python -m vidfusion_jax.evaluate`."""
  flags.DEFINE_string("ir", None, "infrared source: frame folder or video (or use --split)",
                      flag_values=fv)
  flags.DEFINE_string("vis", None, "visible source: frame folder or video (or use --split)",
                      flag_values=fv)
  flags.DEFINE_multi_string("fused", None, "NAME=PATH: a fused result to score, named NAME "
                            "(letters, digits, '_', '.', '-'); repeat the flag for several "
                            "methods", flag_values=fv)
  flags.DEFINE_string("output", None, "folder for the tables and plots", flag_values=fv)
  flags.mark_flags_as_required(["fused", "output"], flag_values=fv)
  flags.DEFINE_string("metrics", ",".join(metrics.METRIC_NAMES),
                      "comma-separated spatial metrics, or 'none'", flag_values=fv)
  flags.DEFINE_string("temporal", ",".join(metrics.TEMPORAL_METRIC_NAMES),
                      "comma-separated temporal metrics, or 'none'", flag_values=fv)
  flags.DEFINE_enum("convention", "sum", list(metrics.CONVENTIONS),
                    "sum (CDDFuse reference) or mean of the two source scores of MI, VIF and SSIM",
                    flag_values=fv)
  flags.DEFINE_float("ssim_data_range", metrics.SSIM_DATA_RANGE_REFERENCE,
                     "SSIM data range L: 2.0 reproduces the reference, 255 is the textbook value",
                     flag_values=fv)
  flags.DEFINE_enum("mi_units", "nats", list(metrics.MI_UNITS),
                    "units of MI (nats, like the reference)", flag_values=fv)
  flags.DEFINE_string("flow", "farneback", "optical-flow backend of flowD, BiSWE and MS2R: "
                      f"{', '.join(sorted(metrics.FLOW_BACKENDS))}, or 'package.module:factory' "
                      "returning a flow(frame_a, frame_b) callable", flag_values=fv)
  flags.DEFINE_integer("max_frames", None, "score only the first N frames; every input then "
                       "needs at least N (default: all, and all inputs must have the same frame "
                       "count)", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "frames per jit-compiled spatial-metric call",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("profile_column", None, "pixel column of the temporal profiles (default: "
                       "the middle one)", flag_values=fv)
  define_temporal_protocol_flags(fv)
  compilation_cache.define_flags(fv)


def parse_flags(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The flags, with --metrics and --temporal as tuples of metric names."""
  prog = "python -m vidfusion_jax.evaluate"
  args = cli.parse(argv, define_flags, prog=prog, usage=__doc__)
  try:
    args.metrics = _names(args.metrics, metrics.METRIC_NAMES, "metrics")
    args.temporal = _names(args.temporal, metrics.TEMPORAL_METRIC_NAMES, "temporal metrics")
  except ValueError as error:
    cli.usage_error(prog, str(error))
  if not args.metrics and not args.temporal and not args.feacd_weights:
    cli.usage_error(prog, "nothing to compute: --metrics and --temporal are both 'none'")
  return args


# --- Temporal protocols, learned flow and VF-Bench splits (docs/metrics.md) ---------------------
PROTOCOLS = ("project", "vfbench")
NOT_COMPARABLE = "not comparable with published tables"


def define_temporal_protocol_flags(fv: flags.FlagValues) -> None:
  """--protocol, --feacd_weights, --flow_batch, --split and --split_root (--flow is above)."""
  flags.DEFINE_enum("protocol", "project", list(PROTOCOLS),
                    "temporal definitions: 'vfbench' = BiSWE and MS2R exactly as VF-Bench (clamped "
                    "ends, occlusion masks) and flowD as TemCoCo released it; 'project' = this "
                    "project's own definitions", flag_values=fv)
  flags.DEFINE_string("feacd_weights", None, "also score TemCoCo's feaCD, with this torchvision "
                      "ResNet-18 state dict (e.g. resnet18-f37072fd.pth; nothing is downloaded)",
                      flag_values=fv)
  flags.DEFINE_integer("flow_batch", 4, "frame pairs per flow-network call under "
                       "--protocol=vfbench", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("split", None, "a VF-Bench split CSV (columns ir,rgb; e.g. "
                      "data_split/IVF/VTMOT/Vtuav-02.csv) listing the frame pairs, instead of "
                      "--ir and --vis", flag_values=fv)
  flags.DEFINE_string("split_root", None, "the dataset root of --split: frames are "
                      "DIR/<CSV name>/<path in CSV>", flag_values=fv)


def flow_label(flow, protocol: str) -> str:
  """The flow backend as reports name it; only SEA-RAFT under VF-Bench's protocol is comparable."""
  name = metrics.backend_name(flow)
  comparable = protocol == "vfbench" and name.startswith(flow_lib.SEA_RAFT_PREFIX)
  return name if comparable else f"{name} ({NOT_COMPARABLE})"


def batched_flow_fn(flow):
  """flow_fn over (N, H, W, 3) pairs: the backend itself when it has `pair_flows` (SEA-RAFT),
  else its own `batched`, else one pair at a time."""
  if hasattr(flow, "pair_flows"):
    return flow
  if hasattr(flow, "batched"):
    return flow.batched
  return lambda a, b: np.stack([flow(x, y) for x, y in zip(a, b)])


def published_protocol_metrics(fused: np.ndarray, ir: np.ndarray, vis: np.ndarray,
                               args: argparse.Namespace) -> dict[str, np.ndarray]:
  """Per-frame (T,) temporal metrics under --protocol=vfbench; NaN where undefined (flowD at 0)."""
  out = {}
  if {"BiSWE", "MS2R"} & set(args.temporal):
    if len(fused) < temporal_lib.VFBENCH_MIN_FRAMES:
      raise ValueError(f"--protocol=vfbench needs at least {temporal_lib.VFBENCH_MIN_FRAMES} "
                       f"frames (VF-Bench skips shorter sequences); got {len(fused)}")
    scores = temporal_lib.vfbench_temporal(fused, ir, vis, batched_flow_fn(args.flow),
                                           args.flow_batch)
    out.update({n: scores[n] for n in ("BiSWE", "MS2R") if n in args.temporal})
  if "flowD" in args.temporal:
    flowd = temporal_lib.temcoco_flowd(fused, vis, batched_flow_fn(args.flow),
                                       batch_size=args.flow_batch)
    out["flowD"] = np.concatenate([[np.nan], flowd])
  return out


def _input_sources(args: argparse.Namespace) -> tuple[splits.FrameSource, splits.FrameSource]:
  if args.split is None:
    if args.ir is None or args.vis is None:
      raise ValueError("give --ir and --vis, or --split with --split_root")
    return files.as_path(args.ir), files.as_path(args.vis)
  if args.ir is not None or args.vis is not None or args.split_root is None:
    raise ValueError("--split replaces --ir and --vis and needs --split_root")
  split = splits.read_vfbench_split(args.split, args.split_root)
  return split.ir, split.vis
# --- end of the temporal protocol block ---------------------------------------------------------


def _parse_fused(specs: Sequence[str]) -> dict[str, files.Path]:
  methods = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not path:
      raise ValueError(f"--fused {spec!r}: expected NAME=PATH")
    if not _METHOD_NAME.match(name):
      raise ValueError(f"--fused {spec!r}: NAME may hold only letters, digits, '_', '.', '-'")
    if name in methods:
      raise ValueError(f"--fused: method name {name!r} is given twice")
    methods[name] = files.as_path(path)
  return methods


def _check_inputs(paths: dict[str, splits.FrameSource], max_frames: int | None) -> int:
  """Frame count to score; raises if the inputs disagree."""
  counts = {}
  for label, path in paths.items():
    if not isinstance(path, (list, tuple)) and not path.exists():
      raise FileNotFoundError(f"{label}: {path} does not exist")
    try:
      counts[label] = splits.count_frames(path)
    except (OSError, RuntimeError) as error:
      raise frames_lib.FrameReadError(f"cannot read {label} {path}: {error}") from error
  listing = ", ".join(f"{label} {n}" for label, n in counts.items())
  if min(counts.values()) == 0:
    raise ValueError(f"an input holds no frames ({listing})")
  if max_frames is not None and min(counts.values()) >= max_frames:
    return max_frames
  if len(set(counts.values())) != 1:
    raise ValueError(f"frame counts differ ({listing}): every input must hold the same number "
                     "of frames, or at least --max_frames frames")
  return next(iter(counts.values()))


def _triples(fused: files.Path, ir: splits.FrameSource, vis: splits.FrameSource,
             count: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  readers = [splits.iter_frames(p) for p in (fused, ir, vis)]
  for index, triple in enumerate(itertools.islice(zip(*readers), count)):
    shapes = [x.shape for x in triple]
    if not shapes[0] == shapes[1] == shapes[2]:
      raise ValueError(f"frame {index}: sizes differ (fused {shapes[0][:2]}, ir "
                       f"{shapes[1][:2]}, vis {shapes[2][:2]}); the inputs must be registered")
    yield triple


def evaluate_method(fused: files.Path, ir: splits.FrameSource, vis: splits.FrameSource,
                    count: int, args: argparse.Namespace, name: str = "") -> dict:
  """Per-frame values of one method, its video summary and its temporal profile image."""
  spatial: dict[str, list[float]] = {n: [] for n in args.metrics}
  # Under --protocol=vfbench the flow metrics need the whole video; flicker stays streamed.
  streamed = [n for n in args.temporal if args.protocol == "project" or n == "flicker"]
  meter = metrics.TemporalMeter(args.flow, streamed) if streamed else None
  keep_video = len(streamed) < len(args.temporal) or args.feacd is not None
  video = []
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
      raise ValueError(f"--profile_column {column} is outside frames {f.shape[1]} pixels wide")
    profile_columns.append(f[:, column])
    batch.append((f, a, b))
    if len(batch) == args.batch_size:
      flush()
    if meter is not None:
      meter.update(f, a, b)
    if keep_video:
      video.append((f, a, b))
  flush()
  per_frame = {n: np.asarray(v) for n, v in spatial.items()}
  if meter is not None:
    per_frame.update(meter.result().per_frame)
  if keep_video:
    f, a, b = (np.stack(x).astype(np.float32) for x in zip(*video))
    if len(streamed) < len(args.temporal):
      per_frame.update(published_protocol_metrics(f, a, b, args))
    if args.feacd is not None:
      per_frame["feaCD"] = np.concatenate([[np.nan], feacd_lib.feacd(f, a, b, args.feacd)])
  summary = {n: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")
             for n, v in per_frame.items()}
  flow_name = flow_label(args.flow, args.protocol) if args.temporal else None
  return {"per_frame": per_frame, "summary": summary, "flow_backend": flow_name,
          "protocol": args.protocol if args.temporal or args.feacd else None,
          "profile": np.stack(profile_columns, axis=1)}


def _number(value: float) -> float | None:
  return None if math.isnan(value) else value


def _csv_text(rows: Sequence[Sequence[Any]]) -> str:
  text = io.StringIO(newline="")
  csv.writer(text).writerows(rows)
  return text.getvalue()


def _write_tables(out: files.Path, results: dict[str, dict], columns: Sequence[str],
                  count: int) -> None:
  per_frame = [["method", "frame", *columns]]
  for method, result in results.items():
    for t in range(count):
      per_frame.append([method, t, *(repr(float(result["per_frame"][c][t])) for c in columns)])
  files.atomic_write(out / "per_frame.csv", _csv_text(per_frame))
  header = ["method", "frames", *columns, "flow_backend", "protocol"]
  rows = [[method, count, *(r["summary"][c] for c in columns), r["flow_backend"] or "",
           r["protocol"] or ""] for method, r in results.items()]
  files.atomic_write(out / "summary.csv", _csv_text(
      [header, *([*row[:2], *(repr(v) for v in row[2:-2]), *row[-2:]] for row in rows)]))
  summary = {method: {"frames": count, "flow_backend": r["flow_backend"],
                      "protocol": r["protocol"], **{c: _number(r["summary"][c]) for c in columns}}
             for method, r in results.items()}
  files.atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [str(row[0]), str(row[1]), *(f"{v:.4f}" for v in row[2:-2]), row[-2] or "-",
             row[-1] or "-"]
    lines.append("| " + " | ".join(cells) + " |")
  files.atomic_write(out / "summary.md", "\n".join(lines) + "\n")


def _write_plots(out: files.Path, results: dict[str, dict], columns: Sequence[str]) -> None:
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
      title += f" ({results[next(iter(results))]['protocol']}, flow: {flow})"
    ax.set(xlabel="frame", ylabel=column, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    files.atomic_write(curves / f"{column}.png", image.getvalue())
  profiles = out / "profiles"
  profiles.mkdir(exist_ok=True)
  for method, result in results.items():
    frames_lib.write_png(profiles / f"{method}.png", result["profile"])


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_flags(argv)
  compilation_cache.configure(args.compilation_cache, args.compilation_cache_dir)
  try:
    methods = _parse_fused(args.fused)
    ir, vis = _input_sources(args)
    count = _check_inputs({"ir": ir, "vis": vis, **{f"fused {k!r}": v for k, v in methods.items()}},
                          args.max_frames)
    if args.temporal:
      args.flow = metrics.get_flow_backend(args.flow)
    args.feacd = (feacd_lib.ResNet18Logits.from_checkpoint(args.feacd_weights)
                  if args.feacd_weights else None)
    out = files.as_path(args.output)
    frames_lib.check_writable_folder(out, "--output")
    results = {name: evaluate_method(path, ir, vis, count, args, name)
               for name, path in methods.items()}
  except (ValueError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  columns = [*args.metrics, *args.temporal, *(["feaCD"] if args.feacd else [])]
  _write_tables(out, results, columns, count)
  _write_plots(out, results, columns)
  print((out / "summary.md").read_text(), end="")
  if args.temporal:
    print(f"temporal metrics ({args.protocol} protocol) computed with the "
          f"{flow_label(args.flow, args.protocol)!r} flow backend")
  return 0


if __name__ == "__main__":
  sys.exit(main())
