"""Several threads saving and restoring through one Checkpoint or manager."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt


def _run_threads(target, count: int) -> list:
  results, errors = [None] * count, []

  def run(i):
    try:
      results[i] = target(i)
    except BaseException as e:  # Collected and re-raised on the test's thread.
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  if errors:
    raise errors[0]
  return results


@pytest.mark.slow
@pytest.mark.parametrize("enable_async", [False, True])
def test_concurrent_saves_get_distinct_complete_checkpoints(tmp_path, enable_async):
  ckpt = jaxckpt.Checkpoint(w=jnp.arange(4096.0))
  opts = jaxckpt.CheckpointOptions(enable_async=enable_async)
  paths = _run_threads(lambda i: [ckpt.save(tmp_path / "c", options=opts) for _ in range(6)], 8)
  ckpt.sync()
  flat = [p for per_thread in paths for p in per_thread]
  assert len(set(flat)) == 48 and ckpt.save_counter == 48
  for path in flat:
    target = jaxckpt.Checkpoint(w=jnp.zeros(4096))
    target.restore(path).assert_consumed()
    np.testing.assert_array_equal(target.w, np.arange(4096.0))
  assert jaxckpt.latest_checkpoint(tmp_path) in flat


def test_concurrent_manager_saves_and_restores(tmp_path):
  ckpt = jaxckpt.Checkpoint(w=jnp.ones(256))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
  manager.save().future.result(timeout=60)
  opts = jaxckpt.CheckpointOptions(enable_async=True)

  reader = jaxckpt.Checkpoint(w=jnp.zeros(256))

  def restore_latest() -> bool:
    # Into another Checkpoint: restore() and read() (as in TF) would set the saving
    # Checkpoint's save counter back, and its next save would reuse a number.
    try:
      reader.restore(manager.latest_checkpoint).assert_consumed()
      return True
    except jaxckpt.CheckpointNotFoundError:  # Swept by another thread's save meanwhile.
      return False

  def work(i):
    if i % 2:
      return [str(manager.save(options=opts)) for _ in range(3)]
    return [restore_latest() for _ in range(3)]

  results = _run_threads(work, 4)
  manager.sync()
  saved = results[1] + results[3]
  assert len(set(saved)) == 6 and restore_latest()
  assert manager.checkpoints == sorted(saved, key=lambda p: int(p.rsplit("-", 1)[1]))[-3:]


@pytest.mark.slow
@pytest.mark.parametrize("enable_async", [False, True])
def test_eight_threads_saving_through_one_manager(tmp_path, enable_async):
  ckpt = jaxckpt.Checkpoint(w=jnp.arange(1024.0), n=np.arange(3, dtype=np.int32))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=None)
  opts = jaxckpt.CheckpointOptions(enable_async=enable_async)
  paths = _run_threads(lambda i: [manager.save(options=opts) for _ in range(6)], 8)
  manager.sync()
  flat = [str(p) for per_thread in paths for p in per_thread]
  flat.sort(key=lambda p: int(p.rsplit("-", 1)[1]))
  assert len(set(flat)) == 48 and manager.checkpoints == flat
  assert manager.latest_checkpoint == flat[-1] == jaxckpt.latest_checkpoint(tmp_path)
  for path in flat:
    target = jaxckpt.Checkpoint(w=jnp.zeros(1024), n=np.zeros(3, np.int32))
    target.restore(path).assert_consumed()
    np.testing.assert_array_equal(target.w, np.arange(1024.0))
    np.testing.assert_array_equal(target.n, np.arange(3))


def test_a_save_while_the_manager_lock_is_held_does_not_deadlock(tmp_path):
  # What a SIGTERM handler's save does when the signal lands inside a manager
  # call on the same thread.
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.ones(4)), tmp_path, max_to_keep=2)
  done = []

  def handler_like():
    with manager._lock:
      done.append(manager.save(check_interval=False))

  thread = threading.Thread(target=handler_like)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive() and done and manager.latest_checkpoint == done[0]
