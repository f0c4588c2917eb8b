"""_compat.py: every private fast path is taken on the pinned versions, and each
public fallback gives the same results after exactly one WARNING."""

import atexit
import contextlib
import gc
import json
import logging
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import types

import jaxckpt
from jaxckpt import _compat
from jaxckpt import _fastread
from jaxckpt import _fastwrite
from jaxckpt import _multihost
from jaxckpt import _staging
from jaxckpt._errors import SaveError

ORBAX_RAW_BYTES = ts_utils.get_tensorstore_raw_bytes


def _clear_caches():
  _compat.clear_caches()
  _staging._layout.cache_clear()  # Per-sharding results of the compat functions.
  _fastwrite._WRITE_SHAPES.clear()


def _unavailable(caplog):
  return [
    r
    for r in caplog.records
    if r.name == "jaxckpt" and r.levelno == logging.WARNING and "is unavailable" in r.getMessage()
  ]


@pytest.fixture
def fresh():
  _clear_caches()
  yield
  _clear_caches()


@contextlib.contextmanager
def _without(name, monkeypatch, caplog, find=lambda: None):
  """Feature ``name`` replaced by ``find``'s result (default: missing). Afterwards:
  exactly one WARNING, naming it; and with the caches cleared it is back."""
  _clear_caches()
  caplog.set_level(logging.WARNING, logger="jaxckpt")
  monkeypatch.setattr(_compat._FEATURES[name], "find", find)
  yield
  warnings = _unavailable(caplog)
  assert len(warnings) == 1, [r.getMessage() for r in warnings]
  assert _compat._FEATURES[name].what in warnings[0].getMessage()
  assert not _compat.fast_paths()[name]
  monkeypatch.undo()
  _clear_caches()
  assert all(_compat.fast_paths().values())


def _sharded(n=1024):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
  return jax.device_put(
    jnp.arange(n, dtype=jnp.float32),
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")),
  )


def _replicated(n=1024):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
  return jax.device_put(
    jnp.arange(n, dtype=jnp.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  )


def _save_and_restore(tmp_path, options=None, **items):
  ckpt = jaxckpt.Checkpoint(**items)
  path = ckpt.save(tmp_path / "c", options=options)
  ckpt.sync()
  saved = {name: np.asarray(value) for name, value in items.items()}
  for name, value in items.items():
    setattr(ckpt, name, jnp.zeros_like(value) if isinstance(value, jax.Array) else 0 * value)
  ckpt.restore(path).assert_consumed()
  for name, value in saved.items():
    np.testing.assert_array_equal(np.asarray(getattr(ckpt, name)), value)
  return path


# -- (a) the installed versions ------------------------------------------------


def test_every_private_fast_path_is_there_and_stays_taken(tmp_path, caplog, fresh):
  caplog.set_level(logging.WARNING, logger="jaxckpt")
  assert _compat.fast_paths() == {name: True for name in _compat._FEATURES}, _compat.fast_paths()
  assert sorted(_compat.fast_paths()) == sorted(
    [
      "shard_args",
      "batched_copy",
      "hlo_sharding",
      "device_assignment",
      "uncommit",
      "distributed_client",
      "early_atexit",
      "replica_slices",
      "subchunking",
      "numpy_on_process",
      "barrier_timeout",
      "metrics_fix",
      "ocdbt_dump",
      "host_put",
    ]
  )
  # Each path once, as saves and restores use them: none fails at call time.
  async_opts = jaxckpt.CheckpointOptions(enable_async=True, chunk_byte_size=1024)
  _save_and_restore(tmp_path / "a", async_opts, s=_sharded(), r=_replicated(), x=jnp.ones(8))
  _save_and_restore(
    tmp_path / "z", jaxckpt.CheckpointOptions(compression=True), s=_sharded(), u=jnp.ones(2 << 20)
  )  # Uncommitted, read by Orbax as a jax.Array.
  _compat.copy_arrays([jnp.ones(4)], [jax.sharding.SingleDeviceSharding(jax.devices()[1])])
  pool = _staging.StagingPool(min_bytes=0)
  pool.copy([_sharded()], keep_bytes=1 << 20)
  assert _compat.sharding_layout(_sharded().sharding, 1) is not None
  assert _compat.distributed_client() is None  # Not initialized in this process.
  assert isinstance(
    _compat.registry_writing_on(1).get(np.ndarray), _compat._FEATURES["numpy_on_process"].get()
  )
  assert not _unavailable(caplog)
  assert all(_compat.fast_paths().values()), _compat.fast_paths()


# -- (b) each fallback -----------------------------------------------------------


def test_without_the_batched_copy_snapshots_use_shard_args(tmp_path, monkeypatch, caplog):
  with _without("batched_copy", monkeypatch, caplog):
    values = [_sharded(), jnp.arange(5.0)]
    targets = [v.sharding for v in values]
    for _ in range(2):
      copies = _compat.copy_in_place(values, targets)
      for v, c in zip(values, copies, strict=True):
        np.testing.assert_array_equal(np.asarray(c), np.asarray(v))
        assert c.sharding == v.sharding and c is not v
    _save_and_restore(tmp_path, jaxckpt.CheckpointOptions(enable_async=True), s=_sharded())


def test_without_shard_args_snapshots_use_device_put(monkeypatch, caplog):
  with _without("shard_args", monkeypatch, caplog):
    target = jax.sharding.SingleDeviceSharding(jax.devices()[2])
    for _ in range(2):
      (copy,) = _compat.copy_arrays([jnp.arange(6.0)], [target])
      np.testing.assert_array_equal(np.asarray(copy), np.arange(6.0))
      assert copy.sharding == target


def _assert_placed_like_device_put():
  one = jax.sharding.SingleDeviceSharding(jax.devices()[1])
  mesh = jax.sharding.NamedSharding(jax.make_mesh((4,), ("d",)), jax.P("d"))
  values = [np.arange(12.0, dtype=np.float32).reshape(3, 4), np.arange(8, dtype=np.int64)]
  values += [np.ones((2, 2), jnp.bfloat16), np.arange(16.0)[::2], np.arange(8.0, dtype=np.float32)]
  targets = [one, one, one, one, mesh]
  for committed in (True, False):
    placed = _compat.put_host_arrays(values, targets if committed else None)
    expected = jax.device_put(values, targets) if committed else jax.device_put(values)
    for got, want in zip(placed, expected, strict=True):
      assert got.dtype == want.dtype and got.shape == want.shape  # int64: int32 without x64.
      assert got.sharding == want.sharding and got.committed == want.committed == committed
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_host_arrays_are_placed_as_jax_device_put_places_them(caplog, fresh):
  caplog.set_level(logging.WARNING, logger="jaxckpt")
  _assert_placed_like_device_put()
  assert not _unavailable(caplog) and _compat.fast_paths()["host_put"]


def test_without_the_batched_device_put_restores_use_device_put(tmp_path, monkeypatch, caplog):
  with _without("host_put", monkeypatch, caplog):
    _assert_placed_like_device_put()
    assert not _compat.fast_paths()["host_put"]  # The fallback placed them.
    _save_and_restore(tmp_path, x=jnp.arange(8.0), n=np.arange(3))


def test_deleted_arrays_get_jax_s_own_error_and_no_warning(caplog, fresh):
  caplog.set_level(logging.WARNING, logger="jaxckpt")
  x = jnp.ones(4)
  x.delete()
  with pytest.raises(RuntimeError, match="deleted"):
    _compat.copy_in_place([x], [x.sharding])
  assert not _unavailable(caplog) and all(_compat.fast_paths().values())


def test_an_api_change_at_call_time_loses_the_path_for_good(monkeypatch, caplog, fresh):
  def changed(*args):
    raise TypeError("batched_copy() takes 3 positional arguments")

  always_copy = _compat._find_batched_copy()[1]
  with _without("batched_copy", monkeypatch, caplog, find=lambda: (changed, always_copy)):
    for _ in range(2):
      (copy,) = _compat.copy_in_place(
        [jnp.arange(3.0)], [jax.sharding.SingleDeviceSharding(jax.devices()[0])]
      )
      np.testing.assert_array_equal(np.asarray(copy), np.arange(3.0))
    assert "TypeError" in _unavailable(caplog)[0].getMessage()


def test_a_runtime_error_falls_back_for_that_call_only(monkeypatch, caplog, fresh):
  calls = []

  def flaky(*args):
    calls.append(1)
    raise RuntimeError("RESOURCE_EXHAUSTED: pinned host memory")

  caplog.set_level(logging.WARNING, logger="jaxckpt")
  always_copy = _compat._find_batched_copy()[1]
  monkeypatch.setattr(_compat._FEATURES["batched_copy"], "find", lambda: (flaky, always_copy))
  for _ in range(2):
    (copy,) = _compat.copy_in_place(
      [jnp.arange(3.0)], [jax.sharding.SingleDeviceSharding(jax.devices()[0])]
    )
    np.testing.assert_array_equal(np.asarray(copy), np.arange(3.0))
  assert len(calls) == 2 and len(_unavailable(caplog)) == 1
  assert _compat.fast_paths()["batched_copy"]


def test_a_finder_that_raises_is_a_missing_feature(monkeypatch, caplog):
  def broken():
    raise ImportError("No module named 'jax._src.lib'")

  with _without("uncommit", monkeypatch, caplog, find=broken):
    x = jax.device_put(jnp.arange(8.0), jax.devices()[0])
    for _ in range(2):
      y = _compat.uncommitted(x)
      assert x.committed and not y.committed
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_without_hlo_shardings_staging_matches_exact_shardings(monkeypatch, caplog):
  with _without("hlo_sharding", monkeypatch, caplog):
    x = _sharded()
    assert _staging._layout(x.sharding, 1) == x.sharding
    pool = _staging.StagingPool(min_bytes=0)
    for _ in range(2):
      copies, sets = pool.copy([x], keep_bytes=1 << 20)
      np.testing.assert_array_equal(np.asarray(copies[0]), np.asarray(x))
      pool.give_back(sets)
    assert pool.reused == 1


def test_without_device_assignments_named_and_single_device_shardings_stage(monkeypatch, caplog):
  shardings = [_sharded().sharding, jax.sharding.SingleDeviceSharding(jax.devices()[3])]
  private = [_compat.device_assignment(s) for s in shardings]
  with _without("device_assignment", monkeypatch, caplog):
    assert [_compat.device_assignment(s) for s in shardings] == private
    pool = _staging.StagingPool(min_bytes=0)
    copies, _ = pool.copy([_sharded()])
    np.testing.assert_array_equal(np.asarray(copies[0]), np.arange(1024.0))


def test_without_array_impl_uncommit_copies(tmp_path, monkeypatch, caplog):
  with _without("uncommit", monkeypatch, caplog):
    ckpt = jaxckpt.Checkpoint(x=jnp.arange(2 << 20, dtype=jnp.float32))  # Device-read size.
    path = ckpt.save(tmp_path / "c", options=jaxckpt.CheckpointOptions(compression=True))
    for _ in range(2):
      ckpt.x = jnp.zeros(2 << 20, jnp.float32)
      ckpt.restore(path)
      assert not ckpt.x.committed
      np.testing.assert_array_equal(np.asarray(ckpt.x), np.arange(2 << 20, dtype=np.float32))


def test_without_the_distributed_handle_an_uninitialized_client_reads_the_same(monkeypatch, caplog):
  with _without("distributed_client", monkeypatch, caplog):
    for _ in range(2):
      assert _compat.distributed_client() is None
      with pytest.raises(_multihost.CoordinationError, match="not initialized"):
        _multihost._client()
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="no handle"):
      _compat.distributed_client()


def test_without_the_early_atexit_hook_a_plain_one_is_used(monkeypatch, caplog):
  registered = []
  monkeypatch.setattr(atexit, "register", registered.append)
  with _without("early_atexit", monkeypatch, caplog):
    for fn in (print, repr):
      _compat.register_early_atexit(fn)
    assert registered == [print, repr]


def test_without_replica_slices_the_fast_writer_chunks_by_shard(tmp_path, monkeypatch, caplog):
  orbax_shape = _compat.orbax_write_shape(_replicated())
  with _without("replica_slices", monkeypatch, caplog):
    assert _compat.orbax_write_shape(_replicated()) == (1024,) != orbax_shape
    assert _compat.orbax_write_shape(_sharded()) == (256,)
    path = _save_and_restore(tmp_path, r=_replicated(), s=_sharded())
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
    np.testing.assert_array_equal(np.asarray(restored["r"]), np.arange(1024.0))


def test_without_subchunking_chunk_byte_size_is_not_applied(tmp_path, monkeypatch, caplog):
  with _without("subchunking", monkeypatch, caplog):
    path = _save_and_restore(
      tmp_path,
      jaxckpt.CheckpointOptions(chunk_byte_size=1024),
      x=jnp.arange(4096.0),
      y=jnp.ones(4096),
    )
    entries = _compat.ocdbt_chunk_entries(os.path.join(path, "state"))
    assert json.loads(entries[b"x/.zarray"])["chunks"] == [4096]


def test_without_the_numpy_override_only_process_0_can_write(monkeypatch, caplog):
  with _without("numpy_on_process", monkeypatch, caplog):
    handler = _compat.registry_writing_on(0).get(np.ndarray)
    assert type(handler) is ocp.type_handlers.NumpyHandler
    with pytest.raises(SaveError, match="process 1"):
      _compat.registry_writing_on(1)


def test_the_numpy_override_writes_on_the_chosen_process(fresh):
  handler = _compat.registry_writing_on(1).get(np.ndarray)
  assert isinstance(handler, ocp.type_handlers.NumpyHandler) and handler._writer == 1


def test_without_the_metrics_fix_orbax_saves_still_work(tmp_path, monkeypatch, caplog):
  with _without("metrics_fix", monkeypatch, caplog):
    for i in range(2):
      _save_and_restore(
        tmp_path / str(i), jaxckpt.CheckpointOptions(compression=True), x=jnp.arange(64.0)
      )
    assert ts_utils.get_tensorstore_raw_bytes is ORBAX_RAW_BYTES


def test_without_ocdbt_dump_orbax_reads_everything(tmp_path, monkeypatch, caplog):
  path = jaxckpt.Checkpoint(x=jnp.arange(64.0)).save(tmp_path / "c")
  with _without("ocdbt_dump", monkeypatch, caplog):
    for _ in range(2):
      assert _fastread.read(os.path.join(path, "state"), [("x", (64,), np.float32)]) == ({}, {})
    _save_and_restore(tmp_path / "d", x=jnp.arange(64.0))


def test_an_unknown_dump_format_turns_the_fast_read_off(tmp_path, monkeypatch, caplog):
  class Done:
    def __init__(self, value):
      self.value = value

    def result(self):
      return self.value

  def dump(base, location=None):  # A manifest as before, a node in another layout.
    if location is None:
      return Done(
        {"versions": [{"generation_number": 1, "root_height": 0, "root": {"location": "x"}}]}
      )
    return Done({"leaves": []})

  path = jaxckpt.Checkpoint(x=jnp.arange(64.0)).save(tmp_path / "c")
  with _without("ocdbt_dump", monkeypatch, caplog, find=lambda: dump):
    for _ in range(2):
      assert _compat.ocdbt_chunk_entries(os.path.join(path, "state")) is None
    assert "KeyError" in _unavailable(caplog)[0].getMessage()


def test_a_database_the_fast_read_does_not_handle_is_no_lost_feature(tmp_path, caplog, fresh):
  caplog.set_level(logging.WARNING, logger="jaxckpt")
  (tmp_path / "state").mkdir()
  assert _compat.ocdbt_chunk_entries(str(tmp_path / "state")) is None  # Not OCDBT.
  assert not _unavailable(caplog) and _compat.fast_paths()["ocdbt_dump"]


# -- Orbax's TensorStore byte counts ---------------------------------------------


def _count_with_leaking_api(suffix):
  total = 0
  for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/"):
    if metric["name"].endswith(suffix):
      total += sum(v.get("value", 0) for v in metric.get("values", []))
  return total


def test_raw_byte_counts_match_orbax_s(tmp_path):
  _save_and_restore(tmp_path, w=jnp.arange(4096.0))
  written = _compat._raw_bytes(types.IoDirection.WRITE)
  read = _compat._raw_bytes(types.IoDirection.READ)
  assert written >= 4096 * 4 and read > 0
  assert written == _count_with_leaking_api("/bytes_written") == _compat._raw_bytes()
  assert read == _count_with_leaking_api("/bytes_read")


def test_raw_byte_counts_do_not_leak(tmp_path):
  jaxckpt.Checkpoint(w=jnp.ones(64)).save(tmp_path / "c")  # File-kvstore metrics exist now.
  gc.collect()
  tracemalloc.start()
  try:
    before = tracemalloc.take_snapshot()
    for _ in range(2000):
      _compat._raw_bytes()
    gc.collect()
    after = tracemalloc.take_snapshot()
  finally:
    tracemalloc.stop()
  growth = sum(d.size_diff for d in after.compare_to(before, "filename"))
  # ts.experimental_collect_matching_metrics leaked ~4.3 KB per call: ~8.6 MB here.
  assert growth < 200_000, growth


def test_orbax_sees_its_own_count_after_jaxckpt_s_orbax_calls(tmp_path, monkeypatch, fresh):
  diverted, raw_bytes = [], _compat._raw_bytes

  def counting(direction=None):
    diverted.append(direction)
    return raw_bytes(direction)

  monkeypatch.setattr(_compat, "_raw_bytes", counting)
  zstd = jaxckpt.CheckpointOptions(compression=True)
  ckpt = jaxckpt.Checkpoint(w=_sharded())  # Orbax reads it as a jax.Array (counted).
  path = ckpt.save(tmp_path / "c", options=zstd)  # Orbax's AsyncCheckpointer.
  assert ts_utils.get_tensorstore_raw_bytes is ORBAX_RAW_BYTES
  saves = len(diverted)
  assert saves >= 1
  ckpt.restore(path)  # zstd: Orbax reads it.
  assert ts_utils.get_tensorstore_raw_bytes is ORBAX_RAW_BYTES and len(diverted) > saves
  ckpt.save(
    tmp_path / "c", options=jaxckpt.CheckpointOptions(compression=True, enable_async=True)
  ).future.result()
  assert ts_utils.get_tensorstore_raw_bytes is ORBAX_RAW_BYTES
  ckpt.sync()
  assert ts_utils.get_tensorstore_raw_bytes is ORBAX_RAW_BYTES


def test_overlapping_scopes_put_orbax_s_function_back_once_the_last_ends(fresh):
  first, second = _compat.stop_metrics_leak(), _compat.stop_metrics_leak()
  first.__enter__()
  second.__enter__()
  first.__exit__(None, None, None)
  assert ts_utils.get_tensorstore_raw_bytes is _compat._raw_bytes
  second.__exit__(None, None, None)
  assert ts_utils.get_tensorstore_raw_bytes is ORBAX_RAW_BYTES
