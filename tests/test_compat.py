"""_compat.py: Orbax's TensorStore byte counts, diverted only during jaxckpt's own Orbax calls."""

import gc
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import types

import jaxckpt
from jaxckpt import _compat
from jaxckpt import _fastwrite
from jaxckpt import _staging

ORBAX_RAW_BYTES = ts_utils.get_tensorstore_raw_bytes


def _clear_caches():
  _compat.clear_caches()
  _staging._layout.cache_clear()  # Per-sharding results of the compat functions.
  _fastwrite._WRITE_SHAPES.clear()


@pytest.fixture
def fresh():
  _clear_caches()
  yield
  _clear_caches()


def _sharded(n=1024):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
  return jax.device_put(jnp.arange(n, dtype=jnp.float32),
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))


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
  ckpt.save(tmp_path / "c", options=jaxckpt.CheckpointOptions(compression=True,
                                                               enable_async=True)).future.result()
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
