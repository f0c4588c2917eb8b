import concurrent.futures
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt

TIMEOUT = 120


def _async(*callbacks):
  return jaxckpt.CheckpointOptions(enable_async=True, experimental_write_callbacks=list(callbacks))


def test_async_save_returns_before_commit_and_future_resolves_to_path(tmp_path):
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(4))
  path = ckpt.save(tmp_path / "m", options=_async(lambda: release.wait(TIMEOUT)))
  assert path == str(tmp_path / "m-1")
  future = path.future
  assert isinstance(future, concurrent.futures.Future)
  assert not future.done()  # Blocked in the callback, so not complete.
  assert jaxckpt.latest_checkpoint(tmp_path) is None
  release.set()
  assert future.result(timeout=TIMEOUT) == path
  assert future.done() and future.exception() is None
  assert jaxckpt.latest_checkpoint(tmp_path) == path


def test_future_supports_done_callbacks_and_wait(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(4))
  seen = []
  path = ckpt.save(tmp_path / "m", options=_async())
  path.future.add_done_callback(lambda f: seen.append(f.result()))
  done, _ = concurrent.futures.wait([path.future], timeout=TIMEOUT)
  assert done == {path.future}
  ckpt.sync()
  assert seen == [path]


def test_sync_save_has_a_resolved_future_too(tmp_path):
  path = jaxckpt.Checkpoint(x=1).save(tmp_path / "m")
  assert path.future.done() and path.future.result() == path


def test_callbacks_run_in_order_on_background_thread_after_commit(tmp_path):
  events = []

  def first(save_path):
    # The callback sees the complete checkpoint at its final path...
    reader = jaxckpt.load_checkpoint(save_path)
    events.append(
      (
        "first",
        save_path,
        threading.current_thread() is threading.main_thread(),
        reader.get_tensor("x").tolist(),
      )
    )
    # ...while the state file still names the previous save (TF's order).
    events.append(("latest", jaxckpt.latest_checkpoint(tmp_path)))

  def second():
    events.append(("second",))

  ckpt = jaxckpt.Checkpoint(x=jnp.arange(3.0))
  first_path = ckpt.save(tmp_path / "m")
  path = ckpt.save(tmp_path / "m", options=_async(first, second))
  path.future.result(timeout=TIMEOUT)
  assert events == [("first", path, False, [0.0, 1.0, 2.0]), ("latest", first_path), ("second",)]


def test_sync_save_runs_callbacks_before_returning(tmp_path):
  events = []
  opts = jaxckpt.CheckpointOptions(
    experimental_write_callbacks=[
      lambda p: events.append((p, threading.current_thread() is threading.main_thread()))
    ]
  )
  path = jaxckpt.Checkpoint(x=1).save(tmp_path / "m", options=opts)
  assert events == [(path, True)]


def test_write_callbacks_get_the_write_path(tmp_path):
  got = []
  ckpt = jaxckpt.Checkpoint(x=1)
  path = ckpt.write(tmp_path / "w", options=_async(got.append))
  ckpt.sync()
  assert got == [str(tmp_path / "w")] == [path]


def test_at_most_one_save_in_flight(tmp_path):
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(4))
  first = ckpt.save(tmp_path / "m", options=_async(lambda: release.wait(TIMEOUT)))
  second = []
  t = threading.Thread(target=lambda: second.append(ckpt.save(tmp_path / "m", options=_async())))
  t.start()
  t.join(timeout=1.0)
  assert t.is_alive() and second == []  # Cannot start while the first is uncommitted.
  release.set()
  t.join(timeout=TIMEOUT)
  assert first.future.done() and second == [str(tmp_path / "m-2")]
  ckpt.sync()


def test_donating_step_right_after_async_save_does_not_corrupt_saved_values(tmp_path):
  @jax.jit
  def produce(x):
    for _ in range(3):
      x = jnp.tanh(x @ x.T) @ x
    return x

  step = jax.jit(lambda x: x * 0.0 - 1.0, donate_argnums=0)
  x = produce(jax.random.normal(jax.random.key(0), (512, 512)))
  expected = np.asarray(produce(jax.random.normal(jax.random.key(0), (512, 512))))
  ckpt = jaxckpt.Checkpoint(x=x)
  path = ckpt.save(tmp_path / "m", options=_async())
  y = step(x)  # Donates (frees / reuses) x's buffer while the save is in flight.
  ckpt.x = y
  for _ in range(5):
    y = step(y)
  path.future.result(timeout=TIMEOUT)
  assert x.is_deleted()
  restored = jaxckpt.load_checkpoint(path).get_tensor("x")
  np.testing.assert_array_equal(restored, expected)


def test_numpy_leaves_mutated_after_async_save_keep_saved_values(tmp_path):
  arr = np.arange(5.0)
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(a=arr)
  path = ckpt.save(tmp_path / "m", options=_async(lambda: release.wait(TIMEOUT)))
  arr[:] = -1
  release.set()
  path.future.result(timeout=TIMEOUT)
  assert jaxckpt.load_checkpoint(path).get_tensor("a").tolist() == [0, 1, 2, 3, 4]


def test_restore_waits_for_pending_async_save(tmp_path):
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(x=jnp.full(3, 2.0))
  path = ckpt.save(tmp_path / "m", options=_async(lambda: release.wait(TIMEOUT)))
  result = []
  t = threading.Thread(target=lambda: result.append(ckpt.restore(path)))
  t.start()
  t.join(timeout=1.0)
  assert t.is_alive()
  release.set()
  t.join(timeout=TIMEOUT)
  assert result and result[0].matched == {"x"}


def test_many_async_saves_keep_threads_flat(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(8))
  ckpt.save(tmp_path / "m", options=_async())
  ckpt.sync()
  before = threading.active_count()
  for _ in range(10):
    ckpt.save(tmp_path / "m", options=_async())
  ckpt.sync()
  assert threading.active_count() <= before
  assert jaxckpt.latest_checkpoint(tmp_path) == str(tmp_path / "m-11")
  assert len([n for n in os.listdir(tmp_path) if n.startswith("m-")]) == 11


@pytest.mark.parametrize("async_", [False, True])
def test_io_device_routing_saves_same_values(tmp_path, async_):
  mesh = jax.make_mesh((4,), ("d",))
  sharding = jax.NamedSharding(mesh, jax.P("d"))
  x = jax.device_put(jnp.arange(16.0), sharding)
  opts = jaxckpt.CheckpointOptions(
    "/job:localhost/replica:0/task:0/device:CPU:1", enable_async=async_
  )
  ckpt = jaxckpt.Checkpoint(x=x)
  path = ckpt.save(tmp_path / "m", options=opts)
  ckpt.sync()
  ckpt.x = jax.device_put(jnp.zeros(16), sharding)
  ckpt.restore(path, options=opts).assert_consumed()
  assert ckpt.x.sharding == sharding
  assert ckpt.x.tolist() == list(range(16))


def test_info_logs_say_what_was_saved_and_how_long_it_took(tmp_path, caplog):
  import logging

  with caplog.at_level(logging.INFO, logger="jaxckpt"):
    ckpt = jaxckpt.Checkpoint(x=jnp.ones(1024))
    path = ckpt.save(tmp_path / "m", options=_async())
    ckpt.sync()
  messages = [r.getMessage() for r in caplog.records]
  assert any(
    m.startswith(f"Saving {path} in the background: 1 arrays, 0.0 MiB") and "blocked" in m
    for m in messages
  )
  assert any(m.startswith(f"Committed checkpoint {path}") and " in " in m for m in messages)
