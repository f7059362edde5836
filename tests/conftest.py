"""Shared test fixtures: the read-only reference material in ../shared."""

import os
import pathlib

import jax
import pytest

# Parity needs full float32 matmuls (GPUs default to TF32); set for the whole session so that
# module- and session-scoped fixtures computing golden comparisons get it too.
jax.config.update("jax_default_matmul_precision", "float32")

SHARED_DIR = pathlib.Path(os.environ.get(
    "VIDFUSION_SHARED", pathlib.Path(__file__).resolve().parents[1].parent / "shared"))


def shared_file(relative: str) -> pathlib.Path:
  """Path of a file under ../shared; skips (or fails in CI) when it is absent."""
  path = SHARED_DIR / relative
  if not path.exists():
    message = (f"{path} is missing: the reference material in ../shared is needed "
               "(clone it beside the project or set VIDFUSION_SHARED)")
    if os.environ.get("VIDFUSION_REQUIRE_SHARED") == "1":
      pytest.fail(message)
    pytest.skip(message)
  return path


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """Commands run in-process (`fuse.main`, `evaluate.main`) turn on the persistent compilation
  cache (`vidfusion_jax.compilation_cache`): keep it in the session's temporary folder."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="session")
def shared():
  """`shared("golden/x.npz")` gives the path, or skips (fails in CI) when absent."""
  return shared_file
