"""Issue 4: SIGKILL at random moments, real write faults, preemption, soak."""

import os
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _store
from jaxckpt._manifest import data_of

sys.path.insert(0, os.path.dirname(__file__))
import crash_harness  # noqa: E402

TIMEOUT = 120


def test_sigkill_at_random_moments_never_leaves_a_bad_latest(tmp_path):
  steps = crash_harness.run(str(tmp_path), kills=4, seed=1, max_delay=1.5)
  assert any(s is not None for s in steps)
  resumed = [s for s in steps if s is not None]
  assert resumed == sorted(resumed)  # Each run resumed from where the last one stopped.
  manager = jaxckpt.CheckpointManager(
    jaxckpt.Checkpoint(**crash_harness.state_at(0)), tmp_path, max_to_keep=3
  )
  assert not [n for n in os.listdir(tmp_path) if ".jaxckpt-" in n]  # Leftovers cleaned.
  assert len(manager.checkpoints) <= 3


FSIZE_CHILD = r"""
import resource, signal, sys
import jax.numpy as jnp, numpy as np
import jaxckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Get EFBIG instead of being killed.
d = sys.argv[1]
ckpt = jaxckpt.Checkpoint(x=jnp.ones(16))
manager = jaxckpt.CheckpointManager(ckpt, d, max_to_keep=5)
opts = jaxckpt.CheckpointOptions(enable_async=True)
print("small", manager.save(options=opts).future.result(), flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
ckpt.x = jnp.arange(4 << 20, dtype=jnp.float32)  # 16 MiB: over the 1 MiB file limit.
big = manager.save(options=opts)
print("big-error", type(big.future.exception(timeout=120)).__name__, flush=True)
try:
  manager.save(options=opts)
except jaxckpt.SaveError as e:
  print("surfaced", "File too large" in str(e) or "EFBIG" in str(e) or "27" in str(e), flush=True)
print("listed", [p.rsplit("/", 1)[1] for p in manager.checkpoints], flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
ok = manager.save(options=opts)
print("after", ok.future.result(timeout=120).rsplit("/", 1)[1],
      float(jaxckpt.load_checkpoint(ok).get_tensor("x")[-1]), flush=True)
"""


def test_file_too_large_surfaces_lists_nothing_and_recovers(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-c", FSIZE_CHILD, str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert lines["big-error"] == "SaveError"
  assert lines["surfaced"] == "True", proc.stderr[-3000:]
  assert lines["listed"] == "['ckpt-1']"  # The failed save is not listed...
  assert lines["after"] == f"ckpt-3 {float((4 << 20) - 1)}"  # ...and the loop recovers.
  assert not [n for n in os.listdir(tmp_path) if ".jaxckpt-" in n]


def test_failed_staging_removal_outlasts_late_writes(tmp_path, monkeypatch):
  # A failed TensorStore commit returns while other data files are still being
  # written (recreating their directories): removal goes on until it is quiet.
  staging = tmp_path / ".ckpt-2.jaxckpt-tmp-x"
  (staging / "state" / "d").mkdir(parents=True)
  real, calls = _store._remove_staging_once, []

  def late_write_after_second_look(path):
    found = real(path)
    calls.append(found)
    if len(calls) == 2:
      (staging / "state" / "d").mkdir(parents=True)  # A write lands after a clean look.
    return found

  monkeypatch.setattr(_store, "_remove_staging_once", late_write_after_second_look)
  _store.LOCAL.abort(str(staging), str(staging))
  assert calls[:3] == [True, False, True]
  assert not staging.exists() and os.listdir(tmp_path) == []


def test_vanished_directory_is_recreated(tmp_path):
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(3))
  ckpt.save(
    tmp_path / "a" / "m",
    options=jaxckpt.CheckpointOptions(
      enable_async=True,
      max_in_flight=2,
      experimental_write_callbacks=[lambda: release.wait(TIMEOUT)],
    ),
  )
  (tmp_path / "b").mkdir()
  path = ckpt.save(
    tmp_path / "b" / "m", options=jaxckpt.CheckpointOptions(enable_async=True, max_in_flight=2)
  )
  os.rmdir(tmp_path / "b")  # Vanishes while the save is queued.
  release.set()
  assert path.future.result(timeout=TIMEOUT) == path
  assert jaxckpt.latest_checkpoint(tmp_path / "b") == path


PREEMPT_CHILD = r"""
import sys, time, logging
import jax.numpy as jnp
import jaxckpt
logging.basicConfig(level=logging.WARNING, format="%(message)s")
d = sys.argv[1]
ckpt = jaxckpt.Checkpoint(w=jnp.zeros(4), step=0)
manager = jaxckpt.CheckpointManager(ckpt, d, max_to_keep=2)
done = []
opts = jaxckpt.CheckpointOptions(enable_async=True,
                                 experimental_write_callbacks=[lambda p: done.append(p)])
jaxckpt.install_preemption_handler(manager, options=jaxckpt.CheckpointOptions(
    experimental_write_callbacks=[lambda p: print("final-callback", p, flush=True)]))
step = 0
while True:
  step += 1
  ckpt.w, ckpt.step = jnp.full(4, float(step)), step
  if step % 5 == 0:
    manager.save(options=opts)
  if step == 12:
    print("training", flush=True)
  time.sleep(0.01)
"""


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  child = subprocess.Popen(
    [sys.executable, "-c", PREEMPT_CHILD, str(tmp_path)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  for line in child.stdout:  # Ends at EOF if the child dies early.
    if line.strip() == "training":
      break
  child.send_signal(signal.SIGTERM)
  out, err = child.communicate(timeout=TIMEOUT)
  assert child.returncode == 0, err[-3000:]
  latest = jaxckpt.latest_checkpoint(tmp_path)
  assert f"final-callback {latest}" in out
  assert "SIGTERM received" in err and f"Saved {latest} after SIGTERM" in err
  reader = jaxckpt.load_checkpoint(latest)
  step = int(reader.get_tensor("step"))
  assert step >= 12 and reader.get_tensor("w").tolist() == [float(step)] * 4


def test_soak_200_async_saves_keep_order_threads_and_memory_flat(tmp_path):
  ckpt = jaxckpt.Checkpoint(w=jnp.zeros((512, 512)), step=0)  # 1 MiB: a leak would show.
  calls = []
  opts = jaxckpt.CheckpointOptions(enable_async=True, experimental_write_callbacks=[calls.append])
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
  threads, rss = [], []
  for step in range(1, 201):
    ckpt.w, ckpt.step = jnp.full((512, 512), float(step)), step
    manager.save(options=opts)
    if step % 50 == 0:
      manager.sync()
      # The worker thread may still be exiting right after sync(): don't count it.
      threads.append(len([t for t in threading.enumerate() if t.name != "jaxckpt-save"]))
      with open("/proc/self/statm") as f:
        rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
  manager.sync()
  assert calls == [str(tmp_path / f"ckpt-{i}") for i in range(1, 201)]  # Once each, in order.
  assert _names(manager.checkpoints) == ["ckpt-198", "ckpt-199", "ckpt-200"]
  # Threads left by earlier tests may still exit; none may be added by saving.
  assert threads == sorted(threads, reverse=True), threads
  assert rss[-1] - rss[0] < 48 * 2**20, [r // 2**20 for r in rss]  # 150 MiB if leaked.
  assert jaxckpt.load_checkpoint(tmp_path).get_tensor("step") == 200


def _names(paths):
  return [os.path.basename(p) for p in paths]


def test_harness_state_is_deterministic():
  a, b = crash_harness.state_at(7), crash_harness.state_at(7)
  assert np.array_equal(a["params"]["w"], b["params"]["w"]) and a["step"] == 7
  assert not np.array_equal(a["params"]["w"], crash_harness.state_at(8)["params"]["w"])


HELD_SAVE_CHILD = r"""
import sys, threading
import jax.numpy as jnp
import jaxckpt
from jaxckpt import _commit
release = threading.Event()
original = _commit._take_checksums
def held(*args):  # The arrays are being written; nothing is committed yet.
  print("writing", flush=True)
  release.wait()
  return original(*args)
_commit._take_checksums = held
threading.Thread(target=lambda: (sys.stdin.readline(), release.set()), daemon=True).start()
ckpt = jaxckpt.Checkpoint(w=jnp.arange(65536.0))
path = jaxckpt.CheckpointManager(ckpt, sys.argv[1], 3).save(
    options=jaxckpt.CheckpointOptions(enable_async=True))
print("committed", path.future.result(), flush=True)
"""


def _start_held_save(directory):
  child = subprocess.Popen(
    [sys.executable, "-c", HELD_SAVE_CHILD, str(directory)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  line = child.stdout.readline()  # Empty at EOF if the child dies early.
  if line.strip() != "writing":
    child.kill()
    raise AssertionError(
      f"child did not start its save: {line!r}: {child.communicate(timeout=TIMEOUT)[1][-3000:]}"
    )
  return child


def test_a_manager_in_another_process_leaves_an_in_flight_save_alone(tmp_path):
  # E.g. an evaluator following the training directory: its manager sweeps
  # interrupted saves' leftovers, which the training's in-flight save looks like.
  child = _start_held_save(tmp_path)
  in_flight = sorted(n for n in os.listdir(tmp_path) if n.startswith(".ckpt-1."))
  assert in_flight and any(n.endswith(".lock") for n in in_flight), in_flight
  evaluator = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.zeros(65536)), tmp_path, 3)
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".ckpt-1.")) == in_flight
  out, err = child.communicate("go\n", timeout=TIMEOUT)
  assert child.returncode == 0, err[-3000:]
  path = str(tmp_path / "ckpt-1")
  assert f"committed {path}" in out
  assert evaluator.latest_checkpoint is None  # It looked before the commit.
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1"]  # Lock file gone.
  target = jaxckpt.Checkpoint(w=jnp.zeros(65536))
  target.restore(path).assert_consumed()
  np.testing.assert_array_equal(target.w, np.arange(65536.0))


def test_a_killed_saves_leftovers_and_lock_are_swept(tmp_path):
  child = _start_held_save(tmp_path)
  child.kill()  # The kernel releases its lock.
  child.communicate(timeout=TIMEOUT)
  assert any(n.startswith(".ckpt-1.") for n in os.listdir(tmp_path))
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.zeros(4)), tmp_path, 3)
  assert manager.latest_checkpoint is None
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tmpfile", [True, False])
def test_staging_lock_is_never_seen_unlocked_and_stale_temp_files_go(
  tmp_path, monkeypatch, tmpfile
):
  # O_TMPFILE: the lock file gets its name already locked. Without it (other
  # systems) a temporary name is renamed, and a kill in between leaves that
  # name, which a sweep deletes once it is stale.
  if not tmpfile:
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)
  elif _supports_tmpfile(tmp_path):  # Then no rename (the temporary name) is needed.
    monkeypatch.setattr(os, "rename", lambda *a: pytest.fail("renamed a temporary lock"))
  staging = _store.LOCAL.new_staging(str(tmp_path / "ckpt-1"))
  fd = _store.LOCAL.hold(staging)
  monkeypatch.undo()
  os.makedirs(os.path.join(staging, "state"))
  assert sorted(os.listdir(tmp_path)) == sorted(
    [os.path.basename(staging), os.path.basename(staging) + ".lock"]
  )
  assert _store.LOCAL.remove_leftovers(str(tmp_path), data_of) == []  # Held: nothing swept.
  _store.LOCAL.release(staging, fd)
  assert os.listdir(tmp_path) == [os.path.basename(staging)]
  # Also the state file's temporaries (a kill inside write_state), once stale.
  fresh, stale = tmp_path / ".aaaa.jaxckpt-locking", tmp_path / ".bbbb.jaxckpt-locking"
  fresh_state, stale_state = tmp_path / ".checkpoint.x1.tmp", tmp_path / ".checkpoint.x2.tmp"
  for path in (fresh, stale, fresh_state, stale_state):
    path.write_text("")
  for path in (stale, stale_state):
    os.utime(path, (time.time() - 120, time.time() - 120))
  removed = _store.LOCAL.remove_leftovers(str(tmp_path), data_of)
  assert sorted(removed) == sorted([os.path.basename(staging), stale.name, stale_state.name])
  assert sorted(os.listdir(tmp_path)) == sorted([fresh.name, fresh_state.name])


def _supports_tmpfile(directory) -> bool:
  try:
    os.close(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o644))
    return True
  except (AttributeError, OSError):
    return False
