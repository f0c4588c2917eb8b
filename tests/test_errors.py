import os
import subprocess
import sys
import textwrap
import threading

import jax.numpy as jnp
import pytest

import jaxckpt
from jaxckpt import _store

TIMEOUT = 120


def _async(*callbacks):
  return jaxckpt.CheckpointOptions(enable_async=True, experimental_write_callbacks=list(callbacks))


def _boom():
  raise RuntimeError("callback exploded")


def test_path_under_a_file_fails_the_call_and_writes_nothing(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(3))
  with pytest.raises(jaxckpt.InvalidPathError, match=r"'.*/file' is a file, not a directory"):
    ckpt.save(tmp_path / "file" / "sub" / "m", options=_async())
  with pytest.raises(jaxckpt.InvalidPathError, match="exists and is not a directory"):
    ckpt.write(tmp_path / "file")
  assert ckpt.save_counter == 0 and (tmp_path / "file").read_text() == "not a directory"


def test_background_write_failure_fails_future_and_surfaces_once_at_next_save(tmp_path):
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(3))
  opts = jaxckpt.CheckpointOptions(enable_async=True, max_in_flight=2)
  first = ckpt.save(
    tmp_path / "a" / "m",
    options=jaxckpt.CheckpointOptions(
      enable_async=True,
      max_in_flight=2,
      experimental_write_callbacks=[lambda: release.wait(TIMEOUT)],
    ),
  )
  (tmp_path / "b").mkdir()
  second = ckpt.save(tmp_path / "b" / "m", options=opts)  # Queued behind the first.
  (tmp_path / "b").rmdir()
  (tmp_path / "b").write_text("now a file")  # The directory became a file: a real fault.
  release.set()
  assert first.future.result(timeout=TIMEOUT) == first
  error = second.future.exception(timeout=TIMEOUT)
  assert isinstance(error, jaxckpt.SaveError) and str(second) in str(error)
  assert isinstance(error.__cause__, (NotADirectoryError, FileExistsError))
  with pytest.raises(jaxckpt.SaveError, match="was not committed"):
    ckpt.save(tmp_path / "a" / "m")
  # The call that reports the error saves nothing; the next one works.
  assert ckpt.save(tmp_path / "a" / "m") == str(tmp_path / "a" / "m-3")
  assert jaxckpt.latest_checkpoint(tmp_path / "a") == str(tmp_path / "a" / "m-3")


@pytest.mark.parametrize("surface", ["save", "write", "sync", "restore"])
def test_raising_callback_fails_future_and_surfaces_at(tmp_path, surface):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(3))
  good = ckpt.save(tmp_path / "m")
  later = []
  bad = ckpt.save(tmp_path / "m", options=_async(_boom, lambda: later.append(1)))
  with pytest.raises(jaxckpt.WriteCallbackError, match="callback #0.*callback exploded"):
    bad.future.result(timeout=TIMEOUT)
  assert later == []  # Later callbacks do not run.
  assert jaxckpt.latest_checkpoint(tmp_path) == good  # A failed save never becomes latest.
  call = {
    "save": lambda: ckpt.save(tmp_path / "m"),
    "write": lambda: ckpt.write(tmp_path / "w"),
    "sync": ckpt.sync,
    "restore": lambda: ckpt.restore(good),
  }[surface]
  with pytest.raises(jaxckpt.WriteCallbackError):
    call()
  call()  # Raised once; the next call works.


def test_sync_save_failure_raises_immediately_and_keeps_latest(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(3))
  good = ckpt.save(tmp_path / "m")
  opts = jaxckpt.CheckpointOptions(experimental_write_callbacks=[_boom])
  with pytest.raises(jaxckpt.WriteCallbackError) as info:
    ckpt.save(tmp_path / "m", options=opts)
  assert isinstance(info.value.__cause__, RuntimeError)
  assert jaxckpt.latest_checkpoint(tmp_path) == good
  ckpt.sync()  # Already reported by the raise; nothing pending.


def test_failed_overwrite_never_damages_the_earlier_checkpoint(tmp_path, monkeypatch):
  ckpt = jaxckpt.Checkpoint(x=jnp.full(3, 1.0))
  ckpt.write(tmp_path / "w")

  def failing_fsync(root):
    raise OSError(5, "simulated I/O error during fsync")

  monkeypatch.setattr(_store, "fsync_tree", failing_fsync)
  ckpt.x = jnp.full(3, 2.0)
  with pytest.raises(jaxckpt.SaveError, match="simulated I/O error"):
    ckpt.write(tmp_path / "w")
  assert os.listdir(tmp_path) == ["w"]  # Old checkpoint intact, no staging leftovers.
  assert jaxckpt.load_checkpoint(tmp_path / "w").get_tensor("x").tolist() == [1.0] * 3


def test_failed_async_save_leaves_no_staging_and_is_not_latest(tmp_path, monkeypatch):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(3))
  good = ckpt.save(tmp_path / "m")
  monkeypatch.setattr(
    _store, "fsync_tree", lambda root: (_ for _ in ()).throw(OSError(28, "No space left on device"))
  )
  bad = ckpt.save(tmp_path / "m", options=_async())
  assert isinstance(bad.future.exception(timeout=TIMEOUT), jaxckpt.SaveError)
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "m-1"]
  assert jaxckpt.latest_checkpoint(tmp_path) == good


def _run_script(body: str, tmp_path) -> subprocess.CompletedProcess:
  script = textwrap.dedent("""
      import sys, time, threading
      import jax.numpy as jnp
      import jaxckpt
      from jaxckpt import _knobs
      d = sys.argv[1]
      """) + textwrap.dedent(body)
  return subprocess.run(
    [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT
  )


def test_pending_async_save_is_joined_at_exit(tmp_path):
  proc = _run_script(
    """
      def slow(path):
        time.sleep(1.0)
        open(d + "/callback-ran", "w").write(path)
      ckpt = jaxckpt.Checkpoint(x=jnp.arange(4.0))
      ckpt.save(d + "/m", options=jaxckpt.CheckpointOptions(
          enable_async=True, experimental_write_callbacks=[slow]))
      # Exit without sync().
      """,
    tmp_path,
  )
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "callback-ran").read_text() == str(tmp_path / "m-1")
  assert jaxckpt.latest_checkpoint(tmp_path) == str(tmp_path / "m-1")


def test_save_that_cannot_finish_by_exit_is_reported(tmp_path):
  proc = _run_script(
    """
      _knobs.EXIT_TIMEOUT_S = 0.5
      ckpt = jaxckpt.Checkpoint(x=jnp.arange(4.0))
      ckpt.save(d + "/m", options=jaxckpt.CheckpointOptions(
          enable_async=True, experimental_write_callbacks=[lambda: time.sleep(60)]))
      """,
    tmp_path,
  )
  assert "did not finish within" in proc.stderr and "NOT committed" in proc.stderr
  assert jaxckpt.latest_checkpoint(tmp_path) is None


def test_unreported_background_failure_is_reported_at_exit(tmp_path):
  proc = _run_script(
    """
      def boom():
        raise RuntimeError("disk on fire")
      ckpt = jaxckpt.Checkpoint(x=jnp.arange(4.0))
      ckpt.save(d + "/m", options=jaxckpt.CheckpointOptions(
          enable_async=True, experimental_write_callbacks=[boom]))
      """,
    tmp_path,
  )
  assert "never reported" in proc.stderr and "disk on fire" in proc.stderr
