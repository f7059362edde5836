"""End to end on a built-in synthetic dataset: convert, train briefly, export, fuse, evaluate.

  python -m vidfusion_jax.demo --workdir=demo_out

Each step runs the project's own command line, printed before it runs, so the demo doubles as a
walk-through of the tools (docs/*.md describe each one). Everything is written under `--workdir`.
"""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import sys
import time

from absl import flags
import numpy as np

from vidfusion_jax import cli
from vidfusion_jax import frames
from vidfusion_jax.data import synthetic

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
  command = [sys.executable, "-m", *args]
  print("\n$ " + " ".join(shlex.quote(a) for a in ["python", "-m", *args]), flush=True)
  subprocess.run(command, check=True, cwd=REPO_ROOT)


def write_clip(folder: pathlib.Path, num_frames: int, height: int, width: int, seed: int) -> None:
  """Degraded IR/VIS frame folders of one unseen synthetic sequence, plus a naive baseline."""
  sequence = synthetic.synthetic_sequence(seed, num_frames, height, width)
  baseline = ((sequence["lq_ir"].astype(np.uint16) + sequence["lq_vis"]) // 2).astype(np.uint8)
  for name, video in (("ir", sequence["lq_ir"]), ("vis", sequence["lq_vis"]),
                      ("mean_of_sources", baseline)):
    for t, frame in enumerate(video):
      frames.write_png(folder / name / f"{t:04d}.png", frame)


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of `python -m vidfusion_jax.demo`."""
  flags.DEFINE_string("workdir", "demo_out", "folder for every output", flag_values=fv)
  flags.DEFINE_integer("steps", 300, "training steps (tiny config)", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("frames", 24, "length of the clip to fuse", lower_bound=1, flag_values=fv)


def main(argv: list[str] | None = None) -> None:
  args = cli.parse(argv, define_flags, prog="python -m vidfusion_jax.demo", usage=__doc__)
  config = REPO_ROOT / "configs" / "videofusion.py"
  if not config.exists():
    sys.exit(f"error: {config} not found: run the demo from a clone of the repository "
             "(pip install -e '.[video]')")
  workdir = pathlib.Path(args.workdir).resolve()
  if (workdir / "train").exists():
    sys.exit(f"error: {workdir} holds an earlier demo run; remove it or pass another --workdir")
  start = time.time()

  data_dir, clip = workdir / "data", workdir / "clip"
  run("data_prep", "synthetic", f"--output={data_dir}", "--split=train", "--num_sequences=4",
      "--num_frames=16", "--height=64", "--width=64", "--clip_length=8", "--noprogress")
  run("data_prep", "synthetic", f"--output={data_dir}", "--split=val", "--num_sequences=1",
      "--num_frames=16", "--height=64", "--width=64", "--clip_length=8", "--seed=1",
      "--noprogress")
  run("vidfusion_jax.train", f"--config={config}:tiny", f"--workdir={workdir / 'train'}",
      f"--config.data.path={data_dir}", f"--config.total_steps={args.steps}",
      f"--config.optimizer.cosine_period={args.steps}", "--config.eval_every_steps=100",
      "--config.checkpoint_every_steps=100")
  run("vidfusion_jax.export", f"--workdir={workdir / 'train'}", f"--output={workdir / 'model'}")

  write_clip(clip, args.frames, 96, 128, seed=12345)
  run("vidfusion_jax.fuse", f"--model={workdir / 'model'}", f"--ir={clip / 'ir'}",
      f"--vis={clip / 'vis'}", f"--output={workdir / 'fused'}",
      f"--mp4={workdir / 'fused.mp4'}", f"--side_by_side={workdir / 'side_by_side.mp4'}",
      "--fps=10")
  run("vidfusion_jax.evaluate", f"--ir={clip / 'ir'}", f"--vis={clip / 'vis'}",
      f"--fused=videofusion={workdir / 'fused'}",
      f"--fused=mean_of_sources={clip / 'mean_of_sources'}", f"--output={workdir / 'metrics'}")

  print(f"\nDemo finished in {time.time() - start:.0f} s. Outputs in {workdir}:")
  print(f"  fused video:       {workdir / 'fused.mp4'}")
  print(f"  IR | VIS | fused:  {workdir / 'side_by_side.mp4'}")
  print(f"  fused frames:      {workdir / 'fused'}/NNNN.png")
  print(f"  metrics:           {workdir / 'metrics' / 'summary.md'}")
  print(f"  training logs:     {workdir / 'train'} (tensorboard --logdir {workdir / 'train'})")


if __name__ == "__main__":
  main()
