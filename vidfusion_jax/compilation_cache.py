"""JAX's persistent compilation cache, on by default for train, fuse and evaluate.

A restarted or preempted job, or a second run of the same command, then loads its compiled
programs from disk instead of recompiling them. The entries are keyed by the program, the
compile options, the devices and the jax/jaxlib versions, so one directory serves every run and
config. `--compilation_cache_dir` sets the directory (default: `$JAX_COMPILATION_CACHE_DIR`, else
`$XDG_CACHE_HOME/vidfusion_jax/xla`, i.e. `~/.cache/vidfusion_jax/xla`; a `gs://` path works
too); `--nocompilation_cache` turns it off. Only programs that took at least
`MIN_COMPILE_SECONDS` to compile are stored (jax's default is 1 s), so the many small eager-mode
ops are not; `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` overrides it.
"""

from __future__ import annotations

import os
import pathlib

from absl import flags
import jax

MIN_COMPILE_SECONDS = 0.1


def default_dir() -> str:
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return str(pathlib.Path(cache_home) / "vidfusion_jax" / "xla")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --[no]compilation_cache and --compilation_cache_dir on `flag_values`."""
  flags.DEFINE_bool("compilation_cache", True,
                    "Keep compiled programs in a persistent cache, so that a rerun or a resumed "
                    "run skips recompiling; --nocompilation_cache turns it off.",
                    flag_values=flag_values)
  flags.DEFINE_string("compilation_cache_dir", None,
                      "Directory of the persistent compilation cache (default: "
                      "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/vidfusion_jax/xla).",
                      flag_values=flag_values)


def enable(directory: str | os.PathLike | None = None) -> str:
  """Turns the cache on in `directory` (default: `default_dir()`) for this process.

  Call before the first compile: JAX opens the cache once per process.
  """
  directory = os.fspath(directory or default_dir())
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # Every size is kept.
  return directory


def disable() -> None:
  jax.config.update("jax_enable_compilation_cache", False)


def configure(enabled: bool, directory: str | None) -> str | None:
  """The cache as the two flags ask; returns its directory, or None when it is off."""
  if not enabled:
    disable()
    return None
  return enable(directory)
