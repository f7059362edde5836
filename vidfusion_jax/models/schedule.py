"""How the networks are scheduled on a backend: the one place that decides.

XLA:CPU's scheduler keeps independent branches and whole backward passes alive at once, so on CPU
the networks order their work explicitly ("cpu_memory": ordering ties, blocks whose backward runs
as one unit, CPU-friendly formulations of depthwise convolutions, LayerNorm and 3-D convolutions).
GPU and TPU schedulers need none of that, and it costs them ops and compile time: there the modules
are plain `flax.linen` ("plain"), rematerialised by a named `jax.checkpoint` policy.

`config.model.schedule` is "auto" (the default: "cpu_memory" on CPU, "plain" elsewhere),
"cpu_memory" or "plain". The platform is the one the program is compiled for, which need not be
the host's (lowering for "cuda" or "tpu" from a CPU machine).
"""

import os
from typing import Callable

import jax

AUTO = "auto"
CPU_MEMORY = "cpu_memory"
PLAIN = "plain"
SCHEDULES = (AUTO, CPU_MEMORY, PLAIN)

# `config.model.remat_policy` names -> `jax.checkpoint` policies (MaxText's `remat_policy`).
# "full" saves nothing (everything is recomputed); "dots" keeps matmul/conv outputs without a
# batch dimension; "dots_with_no_batch_dims" keeps only those without batch dims.
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve(schedule: str, platform: str | None = None) -> str:
  """"cpu_memory" or "plain" for `schedule` on `platform` (default: JAX's default backend)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"model.schedule must be one of {SCHEDULES}; got {schedule!r}")
  if schedule != AUTO:
    return schedule
  platform = platform or jax.default_backend()
  return CPU_MEMORY if platform == "cpu" else PLAIN


def for_platforms(schedule: str, platforms) -> str:
  """The schedule of one program lowered for all of `platforms` (e.g. a multi-platform export):
  "auto" is "cpu_memory" only when every platform is "cpu"."""
  if schedule == AUTO and any(p != "cpu" for p in platforms):
    return PLAIN
  return resolve(schedule, "cpu")


# XLA:CPU (jax 0.10) hands matrix products, reductions and large convolutions to YNNPACK by default.
# On AVX-512 Xeons YNNPACK's weight-gradient convolutions (a window the size of the feature map)
# run at ~27 GFLOP/s against ~100 in XLA's own kernels, and its input-gradient ones slower too
# (docs/benchmarks.md). CPU programs keep YNNPACK for reductions only: its matrix products, as DOT
# fusions, multiplied the official forward's temporaries at 640x480 by 7.6 (15.0 GB against 1.96)
# and halved its speed; XLA's own products ran within 7% of its INDIVIDUAL_DOT ones (inference
# 60.9 against 65.4 s a window, value and grad 18.09 against 17.74 s a step).
_YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
CPU_COMPILER_OPTIONS = {_YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(platform: str | None = None) -> dict[str, str]:
  """`jax.jit(..., compiler_options=...)` for the networks' programs on `platform` (default: JAX's
  default backend). Empty off CPU, and when the user sets the YNNPACK fusion types in XLA_FLAGS."""
  platform = platform or jax.default_backend()
  if platform != "cpu" or _YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
    return {}
  return dict(CPU_COMPILER_OPTIONS)


def init_compiler_options(platform: str | None = None) -> dict[str, int]:
  """`jax.jit(..., compiler_options=...)` for parameter initialisation on `platform`.

  On CPU, JAX lowers each threefry draw to a rolled loop, two or more per parameter, and XLA:CPU
  compiles every loop's kernels separately, most of that time in LLVM's optimisations. Init runs
  once, so on CPU it compiles without them, in about half the time (tiny VideoFusion: 18.4 s
  against 37.7 s): the same random bits, scaled without fused multiply-adds (each value
  within 2 float32 eps x its array's largest magnitude of the optimised program's).
  """
  platform = platform or jax.default_backend()
  return {"xla_backend_optimization_level": 0} if platform == "cpu" else {}


def remat_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy called `name` (see REMAT_POLICIES)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy must be one of {sorted(REMAT_POLICIES)}; got {name!r}")
  return REMAT_POLICIES[name]
