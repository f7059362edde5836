"""The launch commands of docs/training.md, each built, meshed and lowered for its platform.

The commands are read from the docs: every `python -m vidfusion_jax.train` block of the launch
guide is parsed with the trainer's own config flags. A flag given again on a later line (the
"memory-bound" alternative) is a second variant of the same command. Each variant's config is
built, its mesh resolved over the cluster's device count (simulated CPU devices) and its train
step lowered with `lowering_platforms` for the cluster's platform; nothing is compiled.
"""

import json
import re
import subprocess
import sys
import textwrap

import pytest

from test_train_standin import REPO, subprocess_env

# A marker of each launch block -> (platform, number of devices of the cluster it describes).
CLUSTERS = {
    "--config.batch_size=24": ("cuda", 8),  # multi-GPU host: 8 GPUs
    "#SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8": ("cuda", 32),
    "gcloud compute tpus": ("tpu", 16),  # v4-32: 16 chips
}
MAX_DEVICES = 32


def launch_commands() -> list[tuple[str, str, list[str], str, int]]:
  """(block marker, --config value, --config.* overrides, platform, devices) per variant."""
  text = (REPO / "docs" / "training.md").read_text()
  guide = text.split("## Launch guide", 1)[1].split("\n## ", 1)[0]
  commands = []
  for block in re.findall(r"```sh\n(.*?)```", guide, re.S):
    marker = next((m for m in CLUSTERS if m in block), None)
    if marker is None:
      continue
    config_file = re.search(r"--config=(\S+)", block).group(1)
    overrides = re.findall(r"(--config\.[\w.]+)=('[^']*'|\S+)", block)
    first: dict[str, str] = {}
    for key, value in overrides:
      first.setdefault(key, value)
    variants = [dict(first)] + [dict(first, **{key: value}) for i, (key, value) in
                                enumerate(overrides) if key in dict(overrides[:i])]
    for variant in variants:
      flags = [f"{k}={v.strip(chr(39))}" for k, v in variant.items()]
      commands.append((marker, config_file, flags, *CLUSTERS[marker]))
  return commands


SCRIPT = textwrap.dedent("""
    import json, sys
    from absl import flags
    import jax
    import numpy as np
    from ml_collections import config_flags
    from vidfusion_jax import sharding, train
    results = []
    for config_file, overrides, platform, num_devices in json.loads(sys.argv[1]):
      argv = ["train", f"--config={config_file}", *overrides]
      flag_values = flags.FlagValues()
      config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
      flag_values(argv)
      config = flag_values.config
      mesh = sharding.mesh_from_config(config, jax.devices()[:num_devices])
      assert not train.batch_problems(config, mesh), train.batch_problems(config, mesh)
      trainer = train.make_trainer(config, mesh)
      clips = (config.batch_size, config.data.clip_length, config.data.crop_size,
               config.data.crop_size, 3)
      batch = {k: jax.ShapeDtypeStruct(clips, np.uint8, sharding=trainer.batch_sharding)
               for k in train.STREAMS}
      lowered = trainer.train_step.trace(trainer.abstract_state, batch, None).lower(
          lowering_platforms=(platform,))
      text = lowered.as_text()
      results.append({"mesh": dict(mesh.shape), "batch_size": config.batch_size,
                      "num_partitions": int(text.split("mhlo.num_partitions = ")[1].split(" ")[0])})
    print(json.dumps(results))
""")


def test_launch_guide_lists_every_cluster():
  commands = launch_commands()
  assert {c[0] for c in commands} == set(CLUSTERS)
  assert len(commands) == 4  # the multi-GPU host has a data-parallel and a 4 x 2 variant


def test_launch_commands_lower_for_their_platform(compilation_cache):
  commands = launch_commands()
  result = subprocess.run(
      [sys.executable, "-c", SCRIPT, json.dumps([c[1:] for c in commands])],
      env=subprocess_env(compilation_cache, num_devices=MAX_DEVICES), cwd=REPO,
      capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-5000:]
  lowered = json.loads(result.stdout.strip().splitlines()[-1])
  expected_meshes = [{"data": 8, "fsdp": 1}, {"data": 4, "fsdp": 2}, {"data": 4, "fsdp": 8},
                     {"data": 16, "fsdp": 1}]
  assert [r["mesh"] for r in lowered] == expected_meshes
  assert [r["batch_size"] for r in lowered] == [24, 24, 96, 32]
  assert [r["num_partitions"] for r in lowered] == [c[4] for c in commands]
