"""Shared test fixtures: the read-only reference material in ../shared, and the stand-in
training run used by several modules (built once per session)."""

import os
import pathlib
import tempfile

import jax
import pytest

from test_train_standin import get_config, losses_by_step, register

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
def temporary_files_in_session_folder(tmp_path_factory):
  """The session's processes make their temporary files in a folder of its own: Beam's job
  server leaves a `beam-temp*` folder in the system's temporary folder for every pipeline."""
  folder = tmp_path_factory.mktemp("tmp")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TMPDIR", str(folder))
    patch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    yield folder


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


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory) -> pathlib.Path:
  """A persistent compilation cache shared by the test subprocesses of a session."""
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def standin_reference(tmp_path_factory):
  """An uninterrupted 20-step stand-in run on this process's single device: workdir, losses,
  params (tests/test_train_standin.py)."""
  from vidfusion_jax import train  # pylint: disable=g-import-not-at-top
  register()
  workdir = tmp_path_factory.mktemp("reference")
  config = get_config()
  state = train.train_and_evaluate(config, workdir)
  return {"workdir": workdir, "config": config, "losses": losses_by_step(workdir),
          "params": jax.device_get(state.params)}


@pytest.fixture(scope="session")
def records(tmp_path_factory):
  """A converted synthetic dataset: split train (3 sequences) and val (1), 8 frames of 24x24 each,
  in records of 4 raw frames."""
  from vidfusion_jax import data  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("records")
  for split, sequences in (("train", 3), ("val", 1)):
    data.make_synthetic_dataset(path, split=split, num_sequences=sequences, num_frames=8,
                                height=24, width=24, clip_length=4, frame_encoding="raw",
                                seed=len(split))
  return path
