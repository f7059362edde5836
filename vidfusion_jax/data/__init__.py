"""Clip records in TFRecord shards and the Grain input pipeline (see docs/data.md)."""

from vidfusion_jax.data.degrade import DegradeOptions
from vidfusion_jax.data.pipeline import DEGRADE_MODES
from vidfusion_jax.data.pipeline import ClipTransform
from vidfusion_jax.data.pipeline import iter_sequences
from vidfusion_jax.data.pipeline import make_train_dataset
from vidfusion_jax.data.pipeline import make_train_iterator
from vidfusion_jax.data.records import STREAMS
from vidfusion_jax.data.sharding import batch_sharding
from vidfusion_jax.data.sharding import to_global_batch
from vidfusion_jax.data.source import ClipRecordSource
from vidfusion_jax.data.source import read_dataset_info
from vidfusion_jax.data.synthetic import make_synthetic_dataset
from vidfusion_jax.data.tfrecord import RecordCorruptError
