"""Staging buffers reused across async saves (_staging.py)."""

import gc
import os
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _compat
from jaxckpt import _knobs
from jaxckpt import _staging

TIMEOUT = 60
KEEP = 1 << 30  # keep_staging_bytes: everything these tests stage.


@pytest.fixture(autouse=True)
def stage_small_arrays(monkeypatch):
  monkeypatch.setattr(_staging, "MIN_BYTES", 0)  # Test arrays are KiB, not 32 MiB.


def _state():
  mesh = jax.make_mesh((4,), ("d",))
  return {
    "sharded": jax.device_put(
      jnp.arange(64 * 1024, dtype=jnp.float32), jax.NamedSharding(mesh, jax.P("d"))
    ),
    "replicated": jax.device_put(
      jnp.ones((128, 32), jnp.bfloat16), jax.NamedSharding(mesh, jax.P())
    ),
    "single": jnp.arange(1000, dtype=jnp.int32),
    "key": jax.random.key(0),  # Not stageable: copied by device_put, saved all the same.
    "step": 3,
  }


def _pointers(pool: _staging.StagingPool) -> list[int]:
  return sorted(
    shard.data.unsafe_buffer_pointer()
    for buffers, _ in pool._idle.values()
    for c in buffers
    for shard in c.addressable_shards
  )


def _fifty_saves(tmp_path, state, step, names):
  """50 async saves of ``state``, each followed by a ``step`` that donates it;
  returns the pool, {path: saved values of ``names``} and the pool's buffer
  pointers after each save."""
  ckpt = jaxckpt.Checkpoint(state=state)
  opts = jaxckpt.CheckpointOptions(enable_async=True, keep_staging_bytes=KEEP)
  pool = ckpt._saver.staging
  expected, pointers = {}, []
  for _ in range(50):
    ckpt.state = state
    path = ckpt.save(tmp_path / "m", options=opts)
    expected[path] = {k: np.asarray(state[k]).copy() for k in names}
    state = step(state)  # Donates what the save just snapshotted.
    path.future.result(timeout=TIMEOUT)
    pointers.append(_pointers(pool))
  return pool, expected, pointers


def _check_some_restores(expected):
  """Every 7th checkpoint and the last read back bit-exactly; returns the last reader."""
  for path in list(expected)[::7] + [list(expected)[-1]]:
    reader = jaxckpt.load_checkpoint(path)
    for name, value in expected[path].items():
      got = reader.get_tensor(f"state/{name}")
      assert got.dtype == value.dtype and got.shape == value.shape, name
      np.testing.assert_array_equal(got, value)
  return reader


def test_fifty_async_saves_in_a_donating_loop_reuse_one_set_of_buffers(tmp_path):
  step = jax.jit(
    lambda s: {**s, "sharded": s["sharded"] * 1.5 + 1, "single": s["single"] + 1}, donate_argnums=0
  )
  state = step(_state())  # The shardings a training loop saves: the step's outputs'.
  pool, expected, pointers = _fifty_saves(tmp_path, state, step, ("sharded", "single"))
  # The first save allocates; every later one copies into those same buffers.
  assert pool.reused == 49
  assert pointers[0] and all(p == pointers[0] for p in pointers)
  reader = _check_some_restores(expected)
  assert reader.get_tensor("state/step") == 3


def test_a_buffer_something_still_views_is_not_overwritten():
  pool = _staging.StagingPool()
  first, sets = pool.copy([jnp.ones(4096)], keep_bytes=KEEP)
  view = np.asarray(first[0])  # E.g. a writer that has not let go yet.
  pool.give_back(sets)
  second, _ = pool.copy([jnp.zeros(4096)], keep_bytes=KEEP)
  assert pool.reused == 1
  # XLA does not donate a buffer with an external reference: new memory instead.
  assert view.sum() == 4096 and np.asarray(second[0]).sum() == 0


def test_the_copy_is_not_too_cheap_to_run_in_the_background():
  # XLA:CPU runs computations under 1000 estimated flops inline on the calling
  # thread; the ballast keeps the copy above that (see _staging.py).
  values = [jnp.ones((512, 512)), jnp.ones(7, jnp.int32)]
  ballast = _staging._ballast(_compat.device_assignment(values[0].sharding))
  compiled = _staging._copy_into.lower(values, values, ballast).compile()
  assert compiled.cost_analysis()["flops"] >= 1000
  aliases = compiled.as_text().split("\n", 1)[0]
  assert "input_output_alias" in aliases  # The donated buffers are kept and reused.


def test_a_dropped_checkpoint_frees_its_staging_buffers(tmp_path):
  before = set(threading.enumerate())
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(1 << 16))
  ckpt.save(
    tmp_path / "m", options=jaxckpt.CheckpointOptions(enable_async=True, keep_staging_bytes=KEEP)
  )
  ckpt.sync()
  pool = ckpt._saver.staging
  assert pool.idle_bytes == 4 << 16
  idle = weakref.ref(next(iter(pool._idle.values()))[0][0])
  workers = [t for t in set(threading.enumerate()) - before if t.name == "jaxckpt-save"]
  assert len(workers) == 1
  del ckpt, pool
  gc.collect()
  assert idle() is None  # Not kept alive by the waiting worker thread,
  for worker in workers:  # which is woken and exits.
    worker.join(timeout=TIMEOUT)
    assert not worker.is_alive()


def test_idle_staging_buffers_are_freed_and_the_worker_exits(tmp_path, monkeypatch):
  monkeypatch.setattr(_knobs, "WORKER_IDLE_S", 0.05)
  monkeypatch.setattr(_knobs, "STAGING_IDLE_S", 0.3)
  before = threading.active_count()
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(1 << 16))
  ckpt.save(
    tmp_path / "m", options=jaxckpt.CheckpointOptions(enable_async=True, keep_staging_bytes=KEEP)
  )
  ckpt.sync()
  assert ckpt._saver.staging.idle_bytes > 0
  deadline = time.monotonic() + TIMEOUT
  while (ckpt._saver.staging.idle_bytes or threading.active_count() > before) and (
    time.monotonic() < deadline
  ):
    time.sleep(0.05)
  assert ckpt._saver.staging.idle_bytes == 0
  assert threading.active_count() == before


def test_a_failed_save_does_not_give_its_buffers_back(tmp_path):
  def fail():
    raise RuntimeError("callback failed")

  ckpt = jaxckpt.Checkpoint(x=jnp.ones(1 << 16))
  opts = jaxckpt.CheckpointOptions(
    enable_async=True, experimental_write_callbacks=[fail], keep_staging_bytes=KEEP
  )
  ckpt.save(tmp_path / "m", options=opts)
  with pytest.raises(jaxckpt.WriteCallbackError):
    ckpt.sync()
  assert ckpt._saver.staging.idle_bytes == 0


def test_only_arrays_of_min_bytes_and_more_are_staged():
  pool = _staging.StagingPool(min_bytes=1024)
  copies, sets = pool.copy([jnp.ones(256), jnp.ones(255)], keep_bytes=KEEP)  # 1024, 1020 bytes.
  assert copies[0] is not None and copies[1] is None
  devices = _compat.device_assignment(copies[0].sharding)
  assert [group.key for group, _, _ in sets] == [
    (devices, ((256,), jnp.ones(1).dtype, _staging._layout(copies[0].sharding, 1)))
  ]


def test_pool_keeps_at_most_max_idle_sets():
  pool = _staging.StagingPool(max_idle=2)
  for n in (8, 16, 32):
    _, sets = pool.copy([jnp.ones(n)], keep_bytes=KEEP)
    pool.give_back(sets)
  assert sorted(k[1][0] for k in pool._idle) == [(16,), (32,)]  # The oldest went.


@pytest.mark.parametrize("knob", ["compression", "incremental"])
def test_saves_written_by_orbax_reuse_staging_buffers_too(tmp_path, knob):
  # Orbax (not the fast writer) writes these: it must not keep reading the
  # snapshot after the save, because the next save overwrites those buffers.
  step = jax.jit(lambda s: {"w": s["w"] + 1, "frozen": s["frozen"]}, donate_argnums=0)
  state = step({"w": jnp.zeros((64, 64)), "frozen": jnp.ones((32, 32))})
  ckpt = jaxckpt.Checkpoint(state=state)
  opts = jaxckpt.CheckpointOptions(enable_async=True, keep_staging_bytes=KEEP, **{knob: True})
  expected = {}
  for _ in range(5):
    ckpt.state = state
    path = ckpt.save(tmp_path / "m", options=opts)
    expected[path] = np.asarray(state["w"]).copy()
    state = step(state)
    path.future.result(timeout=TIMEOUT)
  assert ckpt._saver.staging.reused >= 3
  for path, w in expected.items():
    reader = jaxckpt.load_checkpoint(path)
    np.testing.assert_array_equal(reader.get_tensor("state/w"), w)
    np.testing.assert_array_equal(reader.get_tensor("state/frozen"), np.ones((32, 32)))


def _compiles():
  """A counter of XLA compilations from now on (``counter[0]``)."""
  counter = [0]

  def listener(event, _duration, **_kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      counter[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  return counter


@pytest.mark.parametrize("keep", [0, 1 << 20, 100])
def test_staging_buffers_are_kept_only_within_keep_staging_bytes(tmp_path, keep):
  state = {"a": jnp.ones(1 << 16), "b": jnp.arange(1 << 16, dtype=jnp.int32)}  # 512 KiB.
  ckpt = jaxckpt.Checkpoint(state=state)
  opts = jaxckpt.CheckpointOptions(enable_async=True, keep_staging_bytes=keep)
  for i in range(3):
    ckpt.write(tmp_path / f"w{i}", options=opts).future.result(timeout=TIMEOUT)
    # 0 (the default): freed at commit; 100: the set does not fit, freed too.
    assert ckpt._saver.staging.idle_bytes == (8 << 16 if keep == 1 << 20 else 0)
  assert ckpt._saver.staging.reused == (2 if keep == 1 << 20 else 0)
  np.testing.assert_array_equal(
    jaxckpt.load_checkpoint(tmp_path / "w2").get_tensor("state/b"), state["b"]
  )


def test_the_default_keeps_what_fits_in_an_eighth_of_physical_memory(tmp_path, monkeypatch):
  assert jaxckpt.CheckpointOptions().keep_staging_bytes is None
  eighth = _staging.default_keep_bytes()
  assert eighth * 8 <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") < (eighth + 1) * 8
  opts = jaxckpt.CheckpointOptions(enable_async=True)
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(1 << 16))
  ckpt.save(tmp_path / "m", options=opts).future.result(timeout=TIMEOUT)
  assert ckpt._saver.staging.idle_bytes == 4 << 16  # Fits: kept.
  monkeypatch.setattr(_staging, "default_keep_bytes", lambda: (4 << 16) - 1)
  ckpt.save(tmp_path / "m", options=opts).future.result(timeout=TIMEOUT)
  assert ckpt._saver.staging.idle_bytes == 0  # Over the budget: freed at commit.


@pytest.mark.parametrize("keep", [0, KEEP])
def test_no_save_after_the_first_compiles(tmp_path, keep, monkeypatch):
  # Neither policy compiles on save()'s path; kept buffers' donated copy is
  # compiled once, when the first save gives them back.
  monkeypatch.setattr(_staging, "MIN_BYTES", 1 << 12)  # "big" staged, "small" not.
  state = {
    "big": jnp.ones((64, 64)),
    "small": [jnp.full((3, i + 1), i, jnp.float32) for i in range(20)],
    "step": jnp.int32(0),
  }
  ckpt = jaxckpt.Checkpoint(state=state)
  opts = jaxckpt.CheckpointOptions(enable_async=True, keep_staging_bytes=keep)
  ckpt.write(tmp_path / "w0", options=opts).future.result(timeout=TIMEOUT)
  compiles = _compiles()
  for i in (1, 2):
    ckpt.write(tmp_path / f"w{i}", options=opts).future.result(timeout=TIMEOUT)
  assert compiles[0] == 0
  assert ckpt._saver.staging.reused == (2 if keep else 0)
  reader = jaxckpt.load_checkpoint(tmp_path / "w2")
  np.testing.assert_array_equal(reader.get_tensor("state/small/7"), np.full((3, 8), 7))
