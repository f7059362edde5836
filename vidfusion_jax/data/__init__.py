"""Clip records in TFRecord shards and the Grain input pipeline (see docs/data.md).

The names below load their submodule on first use (PEP 562), so that the conversion workers of
`data_prep`, which need only the record writer, start without importing Grain and JAX.
"""

import importlib

_EXPORTS = {
    "DegradeOptions": "degrade",
    "DEGRADE_MODES": "pipeline",
    "ClipTransform": "pipeline",
    "iter_sequences": "pipeline",
    "make_train_dataset": "pipeline",
    "make_train_iterator": "pipeline",
    "STREAMS": "records",
    "batch_sharding": "sharding",
    "to_global_batch": "sharding",
    "ClipRecordSource": "source",
    "read_dataset_info": "source",
    "make_synthetic_dataset": "synthetic",
    "RecordCorruptError": "tfrecord",
}
_SUBMODULES = ("degrade", "pipeline", "records", "sharding", "source", "synthetic", "tfrecord",
               "writer")
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _SUBMODULES:  # `data.records` etc., as when this package imported them all
    return importlib.import_module(f"{__name__}.{name}")
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
