"""Hostile and concurrent use: two writers, failed state-file updates, lost checkpoints and
sweeps, undeletable leftovers, reads racing a sweep, SIGTERM at awkward moments, bounded reads."""

import errno
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import uuid

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

import jaxckpt
from jaxckpt import _fastread
from jaxckpt import _manager
from jaxckpt import _store
from jaxckpt._cli import main

SRC = str(pathlib.Path(jaxckpt.__file__).parent.parent)


def _python(script: str, *args: str) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": SRC, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
    [sys.executable, "-c", textwrap.dedent(script), *args],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    env=env,
  )


@pytest.mark.slow
def test_a_second_writing_process_gets_a_clear_error(tmp_path):
  writer = _python(
    """
    import sys, jax.numpy as jnp, jaxckpt
    manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.ones(4)), sys.argv[1], 5)
    print(manager.save(), flush=True)
    sys.stdin.readline()  # Holds the directory until told to exit.
    """,
    str(tmp_path),
  )
  try:
    first = writer.stdout.readline().strip()
    assert first.endswith("ckpt-1")
    manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.zeros(4)), tmp_path, 5)
    with pytest.raises(jaxckpt.ConcurrentWriterError, match="Another process is saving"):
      manager.save()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1"]  # Nothing written.
  finally:
    writer.communicate("exit\n", timeout=60)
  assert writer.returncode == 0
  assert manager.restore_or_initialize() == first
  np.testing.assert_array_equal(manager.checkpoint.w, np.ones(4))
  assert manager.save().endswith("ckpt-2")  # The first writer is gone, and its lock.


def test_managers_in_one_process_share_the_writer_lock(tmp_path):
  ckpt = jaxckpt.Checkpoint(w=jnp.ones(2))
  first = jaxckpt.CheckpointManager(ckpt, tmp_path, 3)
  first.save()
  assert jaxckpt.CheckpointManager(ckpt, tmp_path, 3).save().endswith("ckpt-2")


def test_a_failed_state_file_update_names_the_committed_checkpoint(tmp_path, monkeypatch):
  ckpt = jaxckpt.Checkpoint(w=jnp.arange(3.0))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
  first = manager.save()

  def full(directory, state):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(_manager, "write_state", full)
  with pytest.raises(jaxckpt.SaveError, match="ckpt-2' was committed, but updating") as info:
    manager.save()
  assert "No space left" in str(info.value)
  assert jaxckpt.latest_checkpoint(tmp_path) == first  # The old state file is intact...
  assert os.path.isdir(first)  # ...and what it names was not swept.
  monkeypatch.undo()
  reopened = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
  lost = os.path.join(tmp_path, "ckpt-2")
  assert reopened.latest_checkpoint == lost == jaxckpt.latest_checkpoint(tmp_path)
  assert reopened.checkpoints == [lost]  # Adopted, and the lost save's sweep done.
  assert not os.path.exists(first)
  third = reopened.save()
  assert reopened.checkpoints == [third] and sorted(os.listdir(tmp_path)) == [
    "checkpoint",
    "ckpt-3",
  ]


def test_a_manager_adopts_committed_checkpoints_the_state_file_lost(tmp_path):
  ckpt = jaxckpt.Checkpoint(w=jnp.ones(2))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=5)
  paths = [manager.save()]
  state = tmp_path / "checkpoint"
  after_first = state.read_text()
  paths += [manager.save() for _ in range(2)]
  state.write_text(after_first)  # Lost the newest two.
  jaxckpt.Checkpoint(w=jnp.ones(2)).write(tmp_path / "other-9")  # Not its name: left alone.
  (tmp_path / "ckpt-7").mkdir()  # Not committed: not adopted.
  reopened = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=5)
  assert reopened.checkpoints == paths and reopened.latest_checkpoint == paths[-1]
  assert jaxckpt.latest_checkpoint(tmp_path) == paths[-1]  # State file rewritten.


def test_adopted_checkpoints_beyond_max_to_keep_are_swept_on_open(tmp_path):
  # A kill between a save's commit and its state-file update also skipped its sweep.
  ckpt = jaxckpt.Checkpoint(w=jnp.ones(2))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
  paths = [manager.save() for _ in range(2)]
  state = tmp_path / "checkpoint"
  after_two = state.read_text()
  paths.append(manager.save())
  state.write_text(after_two)
  (tmp_path / "ckpt-1").mkdir()  # What the lost sweep deleted, back again: a committed copy.
  jaxckpt.Checkpoint(w=jnp.ones(2)).write(tmp_path / "ckpt-1")
  reopened = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
  assert reopened.checkpoints == paths[1:] and reopened.latest_checkpoint == paths[-1]
  assert not (tmp_path / "ckpt-1").exists()
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt-")) == ["ckpt-2", "ckpt-3"]


def test_an_undeletable_leftover_is_logged(tmp_path, monkeypatch, caplog):
  leftover = tmp_path / ".ckpt-1.jaxckpt-del-0123456789ab"
  (leftover / "state").mkdir(parents=True)

  def stuck(path, onerror=None, onexc=None):
    (onexc or onerror)(os.rmdir, path, PermissionError(errno.EACCES, "Permission denied"))

  monkeypatch.setattr(_store.shutil, "rmtree", stuck)
  with caplog.at_level(logging.WARNING, "jaxckpt"):
    jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.ones(2)), tmp_path, 1)
  assert leftover.exists() and "Could not delete" in caplog.text and leftover.name in caplog.text


def test_a_checkpoint_deleted_during_the_read_says_so(tmp_path, monkeypatch):
  path = jaxckpt.Checkpoint(w=jnp.arange(8.0)).save(tmp_path / "ckpt")
  read = _fastread.read

  def swept_meanwhile(state_dir, *args, **kwargs):
    _store.LocalStore().remove_checkpoint(path)  # What a manager's sweep does.
    return read(state_dir, *args, **kwargs)

  monkeypatch.setattr(_fastread, "read", swept_meanwhile)
  target = jaxckpt.Checkpoint(w=jnp.zeros(8))
  with pytest.raises(jaxckpt.CheckpointDeletedError, match="deleted while it was being read"):
    target.restore(path)
  assert isinstance(jaxckpt.CheckpointDeletedError("x"), FileNotFoundError)
  np.testing.assert_array_equal(target.w, np.zeros(8))  # Nothing restored.


@pytest.mark.slow
def test_reads_racing_a_sweeping_writer_are_right_or_deleted(tmp_path):
  step = {"w": jnp.zeros(2048)}
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(step=step), tmp_path, max_to_keep=1)
  manager.save()
  stop = threading.Event()

  def write():
    for i in range(1, 40):
      step["w"] = jnp.full(2048, float(i))
      manager.save()
    stop.set()

  writer = threading.Thread(target=write)
  writer.start()
  outcomes = set()
  try:
    while not stop.is_set():
      target = jaxckpt.Checkpoint(step={"w": jnp.zeros(2048)})
      latest = jaxckpt.latest_checkpoint(tmp_path)
      if latest is None:  # Named by the state file, swept before the check.
        continue
      try:
        target.read(latest).assert_existing_objects_matched()
      except jaxckpt.CheckpointNotFoundError as e:  # Swept before or during the read.
        outcomes.add(type(e).__name__)
        continue
      w = np.asarray(target.step["w"])
      assert w[0] == int(latest.rsplit("-", 1)[1]) - 1 and (w == w[0]).all()
      outcomes.add("read")
  finally:
    writer.join(timeout=120)
  assert "read" in outcomes, outcomes


# -- SIGTERM at the moments that used to deadlock or exit 1 ---------------------------

_TRAP = """
import os, signal, sys, threading, jax.numpy as jnp, jaxckpt
from jaxckpt import _layout, _locks
manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.arange(4.0)), sys.argv[1], 5)
"""


def _run_child(script: str, directory) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": SRC, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-c", _TRAP + textwrap.dedent(script), str(directory)],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )


@pytest.mark.slow
def test_sigterm_while_the_main_thread_holds_the_manager_lock(tmp_path):
  # An async save's state-file update needs the lock the main thread holds when
  # the signal lands: the old handler waited for that save there, forever.
  child = _run_child(
    """
    class Trap(_locks.TrackedRLock):
      armed = False
      def acquire(self, *args):
        got = super().acquire(*args)
        if Trap.armed and threading.current_thread() is threading.main_thread():
          Trap.armed = False
          os.kill(os.getpid(), signal.SIGTERM)  # Handled inside `with manager._lock`.
        return got
    manager._lock = Trap()
    jaxckpt.install_preemption_handler(manager)
    manager.save(options=jaxckpt.CheckpointOptions(enable_async=True))
    Trap.armed = True
    manager.checkpoints
    print("not reached")
    """,
    tmp_path,
  )
  assert child.returncode == 0, child.stderr
  assert "not reached" not in child.stdout
  assert jaxckpt.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-2")
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1", "ckpt-2"]


@pytest.mark.slow
def test_sigterm_during_a_sync_save_and_again_during_the_final_one(tmp_path):
  child = _run_child(
    """
    write = _layout.OrbaxLayout.write
    def interrupted(self, job, data_dir):
      os.kill(os.getpid(), signal.SIGTERM)  # Every write: the second lands in the final save.
      return write(self, job, data_dir)
    _layout.OrbaxLayout.write = interrupted
    jaxckpt.install_preemption_handler(manager, checkpoint_number=lambda: 100)
    print(manager.save(), flush=True)
    """,
    tmp_path,
  )
  assert child.returncode == 0, child.stderr
  assert "SaveError" not in child.stderr and "ignored" in child.stderr
  assert child.stdout == ""  # The handler exited as the interrupted save returned.
  assert jaxckpt.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-100")
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.zeros(4)), tmp_path, 5)
  assert manager.checkpoints == [str(tmp_path / "ckpt-1"), str(tmp_path / "ckpt-100")]
  manager.restore_or_initialize()
  np.testing.assert_array_equal(manager.checkpoint.w, np.arange(4.0))


# -- bounded reads -------------------------------------------------------------------


def _zstd_bomb(inflated: int) -> bytes:
  """A zstd frame of RLE blocks: 4 bytes per 128 KiB of zeros once inflated."""
  blocks = inflated // 131072
  out = bytearray((0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 0x38]))  # 128 KiB window.
  for i in range(blocks):
    header = (131072 << 3) | (1 << 1) | (i == blocks - 1)  # RLE block; the last one flagged.
    out += header.to_bytes(3, "little") + b"\x00"
  return bytes(out)


def test_a_chunk_grid_larger_than_the_array_is_refused_before_decoding(tmp_path, capsys):
  opts = jaxckpt.CheckpointOptions(compression=True)
  path = jaxckpt.Checkpoint(w=np.ones(1024, np.float32)).save(tmp_path / "c", options=opts)
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/state/"}).result()
  meta = json.loads(kv.read(b"w/.zarray").result().value)
  assert meta["compressor"]["id"] == "zstd"
  meta["chunks"] = [2**28]  # 1 GiB of float32 per chunk, from a 32 KiB chunk.
  kv.write(b"w/.zarray", json.dumps(meta).encode()).result()
  kv.write(b"w/0", _zstd_bomb(2**30)).result()
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"'w': its chunks \[268435456\] exceed"):
    jaxckpt.load_checkpoint(path).get_tensor("w")
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="nothing was decoded"):
    jaxckpt.Checkpoint(w=np.zeros(1024, np.float32)).restore(path)
  assert main(["inspect", "--values", path]) == 1
  assert main(["verify", path]) == 1
  assert "exceed its shape" in capsys.readouterr().out


def test_an_older_writer_on_a_key_value_store_stops(tmp_path):
  url = f"memory://{uuid.uuid4().hex}/run"
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(w=jnp.ones(2)), url, 3)
  manager.save()
  manager.save()  # Still the directory's writer.
  _store.KV.replace_file(f"{url}/.jaxckpt-writer", b"another-process")  # What it writes.
  with pytest.raises(jaxckpt.ConcurrentWriterError, match="Another process started saving"):
    manager.save()
  assert manager.latest_checkpoint == f"{url}/ckpt-2" == jaxckpt.latest_checkpoint(url)


def test_a_store_chunk_grid_larger_than_the_array_is_refused(tmp_path):
  url = f"memory://{uuid.uuid4().hex}/c"
  path = jaxckpt.Checkpoint(w=np.ones(1024, np.float32)).write(url)
  data = json.loads(_store.KV.read_bytes(f"{path}/jaxckpt/metadata"))["data"]
  key = f"{path}/{data}/w/zarr.json"
  meta = json.loads(_store.KV.read_bytes(key))
  meta["chunk_grid"]["configuration"]["chunk_shape"] = [2**28]
  _store.KV.replace_file(key, json.dumps(meta).encode())
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"chunks \(268435456,\) exceed"):
    jaxckpt.load_checkpoint(path).get_tensor("w")


def test_a_sweep_killed_after_the_state_file_write_is_finished_on_open(tmp_path, monkeypatch):
  ckpt = jaxckpt.Checkpoint(w=jnp.ones(2))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
  manager.save()
  killed = []
  monkeypatch.setattr(_manager, "retire_or_remove", lambda doomed, d: killed.extend(doomed))
  manager.save()  # "Killed" after its state-file write, before deleting ckpt-1.
  assert killed == [str(tmp_path / "ckpt-1")] and (tmp_path / "ckpt-1").is_dir()
  assert '# jaxckpt_sweeping: "ckpt-1"' in (tmp_path / "checkpoint").read_text()
  monkeypatch.undo()
  jaxckpt.Checkpoint(w=jnp.ones(2)).write(tmp_path / "ckpt-0")  # Not named there: kept.
  reopened = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
  assert reopened.checkpoints == [str(tmp_path / "ckpt-2")]
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-0", "ckpt-2"]
