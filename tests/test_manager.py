import os
import threading
import uuid

import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _commit
from jaxckpt import _manager

TIMEOUT = 120


def _names(paths):
  return [os.path.basename(p) for p in paths]


def _on_disk(directory):
  return sorted(n for n in os.listdir(directory) if not n.startswith("checkpoint"))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"max_to_keep": 0}, "max_to_keep"),
    ({"max_to_keep": -1}, "max_to_keep"),
    ({"max_to_keep": 2, "checkpoint_interval": 5}, "step_counter"),
    ({"max_to_keep": 2, "keep_checkpoint_every_n_hours": -1}, "keep_checkpoint_every_n_hours"),
    ({"max_to_keep": 2, "checkpoint_name": "../b"}, "checkpoint_name"),
    ({"max_to_keep": 2, "checkpoint_interval": -1, "step_counter": "s"}, "checkpoint_interval"),
  ],
)
def test_validation_errors(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=1), tmp_path, **kwargs)


def test_directory_that_is_a_file_is_rejected(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match="not a directory"):
    jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=1), tmp_path / "f", max_to_keep=1)


def test_sweeps_beyond_max_to_keep(tmp_path):
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=jnp.ones(2)), tmp_path, 2)
  paths = [manager.save() for _ in range(4)]
  assert _names(paths) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
  assert _names(manager.checkpoints) == ["ckpt-3", "ckpt-4"]
  assert manager.latest_checkpoint == paths[-1] == jaxckpt.latest_checkpoint(tmp_path)
  assert _on_disk(tmp_path) == ["ckpt-3", "ckpt-4"]
  state = (tmp_path / "checkpoint").read_text()
  assert 'model_checkpoint_path: "ckpt-4"' in state
  assert state.count("all_model_checkpoint_paths") == 2
  assert state.count("all_model_checkpoint_timestamps") == 2 and "last_preserved_timestamp" in state


def test_max_to_keep_none_keeps_all_and_checkpoint_number_names(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, None, checkpoint_name="model")
  assert _names([manager.save(checkpoint_number=n) for n in (10, 20, 30)]) == [
    "model-10",
    "model-20",
    "model-30",
  ]
  assert ckpt.save_counter == 3  # Always incremented.
  assert _on_disk(tmp_path) == ["model-10", "model-20", "model-30"]


def test_checkpoint_interval(tmp_path):
  step = {"value": 0}
  manager = jaxckpt.CheckpointManager(
    jaxckpt.Checkpoint(x=jnp.ones(2)),
    tmp_path,
    None,
    step_counter=lambda: jnp.asarray(step["value"]),
    checkpoint_interval=5,
  )
  saved = []
  for s in (0, 3, 5, 7, 10):
    step["value"] = s
    saved.append(manager.save(checkpoint_number=s) is not None)
  assert saved == [True, False, True, False, True]
  assert manager.save(checkpoint_number=10) is None  # Same step again.
  step["value"] = 11
  assert manager.save(checkpoint_number=11, check_interval=False) is not None


def test_keep_checkpoint_every_n_hours(tmp_path, monkeypatch):
  clock = {"now": 1_000_000.0}
  monkeypatch.setattr(_manager.time, "time", lambda: clock["now"])
  manager = jaxckpt.CheckpointManager(
    jaxckpt.Checkpoint(x=jnp.ones(2)), tmp_path, 2, keep_checkpoint_every_n_hours=1
  )
  for _ in range(6):
    clock["now"] += 1800  # Half an hour between saves.
    manager.save()
  # ckpt-1 (t0+0.5h) is within the hour; ckpt-2 (t0+1h) is kept forever, ckpt-4 (t0+2h) too.
  assert _names(manager.checkpoints) == ["ckpt-5", "ckpt-6"]
  assert _on_disk(tmp_path) == ["ckpt-2", "ckpt-4", "ckpt-5", "ckpt-6"]


def test_state_is_recovered_when_reopening(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.arange(3.0))
  first = jaxckpt.CheckpointManager(ckpt, tmp_path, 3)
  for _ in range(4):
    first.save()
  again = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=jnp.zeros(3)), tmp_path, 3)
  assert again.checkpoints == first.checkpoints
  assert again.latest_checkpoint == first.latest_checkpoint
  assert again.restore_or_initialize() == first.latest_checkpoint
  assert again.checkpoint.x.tolist() == [0.0, 1.0, 2.0]
  assert again.checkpoint.save_counter == 4
  assert _names([again.save()]) == ["ckpt-5"]
  assert _names(again.checkpoints) == ["ckpt-3", "ckpt-4", "ckpt-5"]


def test_restore_or_initialize_calls_init_fn_on_empty_directory(tmp_path):
  calls = []
  manager = jaxckpt.CheckpointManager(
    jaxckpt.Checkpoint(x=1), tmp_path / "new", 1, init_fn=lambda: calls.append(1)
  )
  assert manager.restore_or_initialize() is None
  assert calls == [1]


def test_async_sweep_and_state_update_chain_off_the_commit(tmp_path):
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, 1)
  first = manager.save()
  opts = jaxckpt.CheckpointOptions(
    enable_async=True, experimental_write_callbacks=[lambda: release.wait(TIMEOUT)]
  )
  second = manager.save(options=opts)
  # The save may still be writing (hidden staging) or committed with its
  # callback blocked; either way ckpt-1 is not swept and the state not updated.
  visible = [n for n in _on_disk(tmp_path) if not n.startswith(".")]
  assert visible in (["ckpt-1"], ["ckpt-1", "ckpt-2"]) and manager.checkpoints == [first]
  release.set()
  assert second.future.result(timeout=TIMEOUT) == second
  assert _on_disk(tmp_path) == ["ckpt-2"] and manager.checkpoints == [second]


def test_restore_or_initialize_waits_for_pending_save(tmp_path):
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(x=jnp.full(2, 3.0))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, 2)
  opts = jaxckpt.CheckpointOptions(
    enable_async=True, experimental_write_callbacks=[lambda: release.wait(TIMEOUT)]
  )
  path = manager.save(options=opts)
  got = []
  t = threading.Thread(target=lambda: got.append(manager.restore_or_initialize()))
  t.start()
  t.join(timeout=1.0)
  assert t.is_alive()
  release.set()
  t.join(timeout=TIMEOUT)
  assert got == [path]


def test_leftovers_of_interrupted_saves_are_removed_and_never_listed(tmp_path):
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=jnp.ones(2)), tmp_path, 3)
  manager.save()
  for leftover in (
    ".ckpt-2.jaxckpt-tmp-123",
    ".ckpt-2.jaxckpt-tmp-123.orbax-checkpoint-tmp-9",
    ".ckpt-1.jaxckpt-del-77",
  ):
    (tmp_path / leftover / "state").mkdir(parents=True)
  (tmp_path / "unrelated.txt").write_text("keep me")
  reopened = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=jnp.ones(2)), tmp_path, 3)
  assert _names(reopened.checkpoints) == ["ckpt-1"]
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1", "unrelated.txt"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_new_manager_waits_for_saves_in_flight_into_its_directory(tmp_path, monkeypatch, where):
  # A new manager sweeps interrupted saves' data, which an in-flight save's data
  # looks like; sweeping it would fail that save (or worse).
  directory = str(tmp_path) if where == "local" else f"memory://{uuid.uuid4().hex}/run"
  reached, release = threading.Event(), threading.Event()
  original = _commit._take_checksums

  def held(*args):  # The arrays are written (or being written), not committed.
    reached.set()
    release.wait(TIMEOUT)
    return original(*args)

  monkeypatch.setattr(_commit, "_take_checksums", held)
  value = jnp.arange(4096.0)
  path = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=value), directory, 3).save(
    options=jaxckpt.CheckpointOptions(enable_async=True)
  )
  assert reached.wait(TIMEOUT)
  made = []
  t = threading.Thread(
    target=lambda: made.append(
      jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=jnp.zeros(4096)), directory, 3)
    )
  )
  t.start()
  t.join(timeout=0.5)
  assert t.is_alive() and not made  # Waiting for the save, not sweeping its data.
  release.set()
  t.join(TIMEOUT)
  assert path.future.result(timeout=TIMEOUT) == path
  assert made[0].latest_checkpoint == path
  assert made[0].restore_or_initialize() == path
  np.testing.assert_array_equal(made[0].checkpoint.x, value)


def test_a_manager_made_in_a_write_callback_does_not_wait_for_its_own_save(tmp_path):
  made = []
  opts = jaxckpt.CheckpointOptions(
    enable_async=True,
    experimental_write_callbacks=[
      lambda: made.append(jaxckpt.CheckpointManager(jaxckpt.Checkpoint(), tmp_path, 3))
    ],
  )
  path = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=jnp.ones(2)), tmp_path, 3).save(
    options=opts
  )
  assert path.future.result(timeout=TIMEOUT) == path  # No deadlock.
  assert len(made) == 1
