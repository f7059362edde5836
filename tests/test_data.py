"""The Grain pipeline: sharding over processes, exact resumption, determinism, augmentation."""

import os
import pathlib
import subprocess
import sys
import threading
import time
import types

import grain
import numpy as np
import pytest

from vidfusion_jax import data
from vidfusion_jax.data import degrade
from vidfusion_jax.data import records

HEIGHT, WIDTH, FRAMES, K = 24, 32, 8, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """4 sequences x 8 frames, K = 4, stride 4: 8 records in 3 shards."""
  path = tmp_path_factory.mktemp("synthetic")
  data.make_synthetic_dataset(path, num_sequences=4, num_frames=FRAMES, height=HEIGHT,
                              width=WIDTH, clip_length=K, records_per_shard=3, seed=5)
  return path


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
  path = tmp_path_factory.mktemp("clean")
  data.make_synthetic_dataset(path, num_sequences=2, num_frames=K, height=HEIGHT, width=WIDTH,
                              clip_length=K, frame_encoding="raw", clean_only=True, seed=6)
  return path


def _batches(data_dir, count, **kwargs):
  options = dict(global_batch_size=2, clip_length=K, crop_size=(HEIGHT, WIDTH), seed=0,
                 process_index=0, process_count=1) | kwargs
  iterator = data.make_train_iterator(data_dir, "train", **options)
  return [next(iterator) for _ in range(count)]


def _record_ids(dataset_dir):
  """Fingerprint of every record's full gt_ir clip -> record number."""
  source = data.ClipRecordSource(dataset_dir, "train")
  info = data.read_dataset_info(dataset_dir)
  codec = data.records.ClipCodec(info["streams"], info["clip_length"])
  return {codec.parse(source[i]).decode("gt_ir").tobytes(): i for i in range(len(source))}


def _ids_of(batches, ids):
  return [ids[clip.tobytes()] for batch in batches for clip in batch["gt_ir"]]


def test_processes_get_disjoint_parts_covering_each_epoch(dataset):
  ids = _record_ids(dataset)
  assert len(ids) == 8
  per_process = [_ids_of(_batches(dataset, 4, global_batch_size=4, process_index=p,
                                  process_count=2), ids) for p in range(2)]
  for p in range(2):
    assert all(b["gt_ir"].shape == (2, K, HEIGHT, WIDTH, 3) for b in
               _batches(dataset, 1, global_batch_size=4, process_index=p, process_count=2))
  for epoch in range(2):
    parts = [set(ids_[epoch * 4:(epoch + 1) * 4]) for ids_ in per_process]
    assert parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == set(range(8))
  single = _ids_of(_batches(dataset, 4, global_batch_size=4), ids)
  assert sorted(single[:8]) == sorted(single[8:]) == list(range(8))
  assert single[:8] != single[8:]  # reshuffled each epoch
  # Each global batch of 4 is process 0's 2 rows, then process 1's.
  merged = [i for step in range(4) for part in per_process for i in part[2 * step:2 * step + 2]]
  assert merged == single


def test_restored_iterator_state_reproduces_next_batches(dataset, tmp_path):
  options = dict(global_batch_size=3, clip_length=3, crop_size=16, seed=11, flip=True,
                 rotate=True)
  iterator = data.make_train_iterator(dataset, "train", process_index=0, process_count=1,
                                      **options)
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(iterator))
  expected = [next(iterator) for _ in range(4)]
  restored = data.make_train_iterator(dataset, "train", process_index=0, process_count=1,
                                      **options)
  restored.set_state(state)
  from_file = handler.restore(tmp_path, args=grain.checkpoint.CheckpointRestore(
      data.make_train_iterator(dataset, "train", process_index=0, process_count=1, **options)))
  for batch in expected:
    for other in (next(restored), next(from_file)):
      for key in data.STREAMS:
        np.testing.assert_array_equal(other[key], batch[key])


@pytest.mark.multiprocess
def test_worker_processes_give_the_same_batches_and_resume(dataset):
  options = dict(global_batch_size=2, clip_length=3, crop_size=16, seed=2,
                 process_index=0, process_count=1, worker_count=1)
  reference = _batches(dataset, 5, **(options | {"worker_count": 0}))
  iterator = data.make_train_iterator(dataset, "train", **options)
  resumed = data.make_train_iterator(dataset, "train", **options)
  try:
    first = [next(iterator) for _ in range(2)]
    state = iterator.get_state()
    rest = [next(iterator) for _ in range(3)]
    resumed.set_state(state)
    again = [next(resumed) for _ in range(3)]
  finally:
    iterator.close()
    resumed.close()
  for got, want in zip(first + rest + again, reference + reference[2:]):
    for key in data.STREAMS:
      np.testing.assert_array_equal(got[key], want[key])


def test_same_seed_same_batches_other_seed_differs(dataset):
  a = _batches(dataset, 3, crop_size=12, clip_length=2, seed=7, flip=True)
  b = _batches(dataset, 3, crop_size=12, clip_length=2, seed=7, flip=True)
  c = _batches(dataset, 3, crop_size=12, clip_length=2, seed=8, flip=True)
  for x, y in zip(a, b):
    for key in data.STREAMS:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["gt_ir"], z["gt_ir"]) for x, z in zip(a, c))


def test_window_and_crop_come_from_the_record(dataset):
  source = data.ClipRecordSource(dataset, "train")
  codec = data.records.ClipCodec(data.STREAMS, K)
  clips = [{key: codec.parse(source[i]).decode(key) for key in data.STREAMS}
           for i in range(len(source))]
  for batch in _batches(dataset, 4, crop_size=(10, 14), clip_length=2, seed=3):
    assert batch["lq_vis"].shape == (2, 2, 10, 14, 3) and batch["lq_vis"].dtype == np.uint8
    for n in range(2):
      matches = [(i, t, y, x) for i, clip in enumerate(clips) for t in range(K - 1)
                 for y in range(HEIGHT - 9) for x in range(WIDTH - 13)
                 if all(np.array_equal(clip[key][t:t + 2, y:y + 10, x:x + 14], batch[key][n])
                        for key in data.STREAMS)]
      assert len(matches) == 1, f"{len(matches)} windows of the records match the element"


def test_flips_and_rotations_are_dihedral_transforms(dataset):
  plain = _batches(dataset, 4, crop_size=16, seed=4)
  augmented = _batches(dataset, 4, crop_size=16, seed=4, flip=True, rotate=True)
  seen = set()
  for p, a in zip(plain, augmented):
    for n in range(2):
      candidates = {}
      for k in range(4):
        for flip_h in (False, True):
          view = p["gt_ir"][n][:, :, ::-1] if flip_h else p["gt_ir"][n]
          candidates[(k, flip_h)] = np.rot90(view, k, axes=(1, 2))
      found = [key for key, v in candidates.items() if np.array_equal(v, a["gt_ir"][n])]
      assert found
      seen.add(found[0])
  assert len(seen) > 1


def _mean_gradient(clips: np.ndarray) -> float:
  return float(np.abs(np.diff(clips.astype(float), axis=3)).mean())


def test_degradation_synthesis_for_clean_only_data(clean_dataset):
  auto = _batches(clean_dataset, 2, degrade="auto")
  again = _batches(clean_dataset, 2, degrade="auto")
  identity = _batches(clean_dataset, 2, degrade="identity")
  for a, b, i in zip(auto, again, identity):
    np.testing.assert_array_equal(a["lq_ir"], b["lq_ir"])
    np.testing.assert_array_equal(i["lq_ir"], i["gt_ir"])
    np.testing.assert_array_equal(i["lq_vis"], i["gt_vis"])
    np.testing.assert_array_equal(a["gt_ir"], i["gt_ir"])
    ir_noise = a["lq_ir"].astype(float) - a["gt_ir"]
    assert 2.0 < ir_noise.std() < 25.0
    assert np.array_equal(a["lq_ir"][..., 0], a["lq_ir"][..., 2])  # gray IR stays gray
    assert a["lq_vis"].mean() < 0.9 * a["gt_vis"].mean()  # low light
    assert _mean_gradient(a["lq_vis"]) < _mean_gradient(a["gt_vis"])  # blur


def test_degrade_functions_are_seeded():
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  first = degrade.degrade_clip(clip, clip, np.random.default_rng(1))
  second = degrade.degrade_clip(clip, clip, np.random.default_rng(1))
  third = degrade.degrade_clip(clip, clip, np.random.default_rng(2))
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(first[0], third[0])
  # The stripe pattern is shared by the frames: per-column mean offsets correlate across time.
  flat = np.full((2, 64, 64, 3), 128, np.uint8)
  noisy = degrade.degrade_infrared(flat, np.random.default_rng(3)).astype(float) - 128
  columns = noisy.mean(axis=(1, 3))
  assert np.corrcoef(columns[0], columns[1])[0, 1] > 0.5


def test_bad_options_are_rejected(dataset):
  with pytest.raises(ValueError, match="divisible by the process count 2"):
    data.make_train_dataset(dataset, global_batch_size=3, process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r"clip_length 5 must be in \[1, 4\]"):
    data.make_train_dataset(dataset, global_batch_size=2, clip_length=5, process_index=0,
                            process_count=1)
  with pytest.raises(ValueError, match="crop 32x32 is larger than the 24x32"):
    _batches(dataset, 1, crop_size=32)
  with pytest.raises(ValueError, match="no split 'val'"):
    data.make_train_dataset(dataset, "val", global_batch_size=2, clip_length=2,
                            process_index=0, process_count=1)


def test_global_batch_over_a_four_device_mesh(dataset):
  script = (
      "import jax, numpy as np\n"
      "from vidfusion_jax import data\n"
      "mesh = jax.make_mesh((2, 2), ('data', 'model'))\n"
      f"it = data.make_train_iterator({str(dataset)!r}, global_batch_size=4, clip_length=2,"
      " crop_size=8, process_index=0, process_count=1)\n"
      "host = next(it)\n"
      "batch = data.to_global_batch(host, mesh, 'data')\n"
      "for key, value in batch.items():\n"
      "  assert value.shape == (4, 2, 8, 8, 3) and value.dtype == np.uint8\n"
      "  assert value.sharding.spec == jax.sharding.PartitionSpec(('data',))\n"
      "  np.testing.assert_array_equal(np.asarray(value), host[key])\n"
      "  for shard in value.addressable_shards:\n"
      "    assert shard.data.shape == (2, 2, 8, 8, 3)\n"
      "    np.testing.assert_array_equal(np.asarray(shard.data), host[key][shard.index])\n"
      "both = data.to_global_batch(host, mesh, ('data', 'model'))\n"
      "assert {s.data.shape[0] for s in both['gt_ir'].addressable_shards} == {1}\n"
      "print('ok')\n")
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                      "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=pathlib.Path(__file__).parents[1], check=False)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("streams, clip_length", [(data.STREAMS, 3), (("gt_ir", "gt_vis"), 1)])
def test_records_are_the_examples_tfds_serializes(streams, clip_length):
  """ClipCodec writes the tf.train.Example's wire format itself: the bytes of tfds's serializer
  (multi-byte varints in the ints and lengths included), framed as one TFRecord."""
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.features import feature  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  encoded = {s: [rng.bytes(int(rng.integers(1, 5000))) for _ in range(clip_length)]
             for s in streams}
  codec = data.records.ClipCodec(streams, clip_length)
  spec = data.records.feature_spec(codec.streams, clip_length)
  serializer = example_serializer.ExampleSerializer(
      {name: feature.TensorInfo(shape=tuple(f["shape"]),
                                dtype=np.object_ if f["dtype"] == "string" else np.int64)
       for name, f in spec.items()})
  expected = serializer.get_tf_example(
      {"sequence": "seq_é".encode(), "first_frame": 1234567, "num_frames": clip_length,
       "height": 1080, "width": 1920, "frame_encoding": b"png", **encoded}).SerializeToString(
           deterministic=True)
  parts = codec.serialized_parts("seq_é", 1234567, 1080, 1920, "png", encoded)
  assert codec.serialize("seq_é", 1234567, 1080, 1920, "png", encoded) == b"".join(parts)
  assert b"".join(parts) == expected
  assert b"".join(data.tfrecord.frame_record(*parts)) == b"".join(
      data.tfrecord.frame_record(expected))
  with pytest.raises(ValueError, match="expected"):
    codec.serialize("seq", 0, 48, 64, "png", {**encoded, streams[0]: encoded[streams[0]] * 2})


def test_conversion_workers_do_not_import_jax():
  """A data_prep worker needs the record writer only: no Grain, no JAX (each costs seconds),
  no tensorflow-datasets (0.2 s)."""
  code = ("import sys; import data_prep.sources, vidfusion_jax.data.writer; "
          "print(sorted({'jax', 'grain', 'tensorflow_datasets'} & set(sys.modules)))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.stdout.strip() == "[]"


def test_parser_resolves_the_proto_class_in_one_thread_at_a_time(monkeypatch):
  """Grain's prefetch threads parse records at once; two threads inside tfds's lazy imports
  together deadlocked a worker (records._example_class). A stand-in tfds whose resolution takes
  0.2 s records how many threads are inside it at once."""
  inside, most_inside, lock = [0], [0], threading.Lock()

  class LazyProtoModule:  # tfds's protos are etils LazyModules, resolved on attribute access
    @property
    def Example(self):  # pylint: disable=invalid-name
      with lock:
        inside[0] += 1
        most_inside[0] = max(most_inside[0], inside[0])
      time.sleep(0.2)
      with lock:
        inside[0] -= 1
      return "Example"

  proto = types.ModuleType("tensorflow_datasets.proto")
  proto.tf_example_pb2 = LazyProtoModule()
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.ModuleType("tensorflow_datasets"))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets.proto", proto)
  records._example_class.cache_clear()
  try:
    start = threading.Barrier(4)
    results = []
    def parse():
      start.wait()
      results.append(records._example_class())
    threads = [threading.Thread(target=parse) for _ in range(4)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join(10)
  finally:
    records._example_class.cache_clear()
  assert results == ["Example"] * 4
  assert most_inside[0] == 1
