"""Behaviours measured against tensorflow-cpu 2.21 (issue 18, items 1-14): each test is the
smallest reproduction of one divergence, asserting what TF does (or the documented
difference)."""

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _knobs


def _names(paths):
  return [os.path.basename(p) for p in paths]


def _on_disk(directory):
  return sorted(n for n in os.listdir(directory) if n != "checkpoint")


# 1: a manager opened on a directory whose state file Checkpoint.save wrote


def test_manager_does_not_manage_checkpoints_saved_without_it(tmp_path):
  ckpt = jaxckpt.Checkpoint(a=jnp.ones(2))
  ckpt.save(tmp_path / "ckpt")
  ckpt.save(tmp_path / "ckpt")
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
  assert manager.checkpoints == []
  assert _names([manager.latest_checkpoint]) == ["ckpt-2"]
  manager.save()
  assert _names(manager.checkpoints) == ["ckpt-3"]
  assert _on_disk(tmp_path) == ["ckpt-1", "ckpt-2", "ckpt-3"]  # Never swept.


# 2: the save counter exists once saved or restored (TF creates it then)


def test_restore_of_a_write_by_a_checkpoint_that_never_saved(tmp_path):
  path = jaxckpt.Checkpoint(a=jnp.ones(2)).write(tmp_path / "w")
  dst = jaxckpt.Checkpoint(a=jnp.zeros(2))
  status = dst.restore(path)
  for method in (status.assert_consumed, status.assert_existing_objects_matched):
    with pytest.raises(jaxckpt.LoadStatusError, match="save_counter"):
      method()
  status.assert_nontrivial_match()
  assert dst.save_counter == 0 and dst.a.tolist() == [1.0, 1.0]


def test_write_after_a_save_stores_the_counter(tmp_path):
  src = jaxckpt.Checkpoint(a=jnp.ones(2))
  src.save(tmp_path / "s")
  src.save(tmp_path / "s")
  path = src.write(tmp_path / "w")
  dst = jaxckpt.Checkpoint(a=jnp.zeros(2))
  dst.restore(path).assert_consumed()
  assert dst.save_counter == 2


def test_read_of_a_saved_checkpoint_defers_the_counter_until_it_exists(tmp_path):
  src = jaxckpt.Checkpoint(a=jnp.ones(2))
  src.save(tmp_path / "s")
  path = src.save(tmp_path / "s")
  fresh = jaxckpt.Checkpoint(a=jnp.zeros(2))
  status = fresh.read(path).assert_existing_objects_matched()
  with pytest.raises(jaxckpt.LoadStatusError, match="save_counter"):
    status.assert_consumed()
  assert _names([fresh.save(tmp_path / "t")]) == ["t-3"]  # TF: t-3 too.
  saved_once = jaxckpt.Checkpoint(a=jnp.zeros(2))
  saved_once.save(tmp_path / "u")
  saved_once.read(path).assert_consumed()
  assert saved_once.save_counter == 2


@pytest.mark.parametrize("create", ["read_attribute", "restore_none", "nothing"])
def test_counter_exists_once_read_or_restored(tmp_path, create):
  ckpt = jaxckpt.Checkpoint(a=jnp.ones(2))
  if create == "read_attribute":
    assert ckpt.save_counter == 0
  elif create == "restore_none":
    ckpt.restore(None)
  names = [name for name, _ in jaxckpt.list_variables(ckpt.write(tmp_path / "w"))]
  assert ("save_counter" in names) == (create != "nothing")


# 3: save_counter is listed like TF's variable


def test_list_variables_and_reader_show_save_counter(tmp_path):
  ckpt = jaxckpt.Checkpoint(a=jnp.ones((2, 3)))
  path = ckpt.save(tmp_path / "c")
  assert jaxckpt.list_variables(path) == [("a", [2, 3]), ("save_counter", [])]
  reader = jaxckpt.load_checkpoint(tmp_path)
  assert reader.get_variable_to_dtype_map()["save_counter"] == np.int64
  assert reader.has_tensor("save_counter") and reader.get_tensor("save_counter") == 1
  written = jaxckpt.Checkpoint(a=jnp.ones(2)).write(tmp_path / "w")
  assert jaxckpt.list_variables(written) == [("a", [2])]


# 4: write callbacks


def test_callback_with_a_defaulted_extra_parameter_gets_the_path(tmp_path):
  seen = []
  options = jaxckpt.CheckpointOptions(
    experimental_write_callbacks=[lambda path, extra=None: seen.append((path, extra))]
  )
  path = jaxckpt.Checkpoint(a=1).save(tmp_path / "c", options=options)
  assert seen == [(path, None)]


def test_callback_with_two_required_parameters_is_an_assertion_error():
  with pytest.raises(AssertionError, match="at most one positional"):
    jaxckpt.CheckpointOptions(experimental_write_callbacks=[lambda a, b: None])


# 5: the counter counts as a match


def test_assert_nontrivial_match_counts_save_counter(tmp_path):
  path = jaxckpt.Checkpoint(a=jnp.ones(2)).save(tmp_path / "c")
  status = jaxckpt.Checkpoint(z=jnp.zeros(2)).restore(path).expect_partial()
  status.assert_nontrivial_match()
  with pytest.raises(jaxckpt.LoadStatusError):
    status.assert_existing_objects_matched()


# 6: deferred restoration


def test_item_assigned_after_restore_is_restored(tmp_path):
  path = jaxckpt.Checkpoint(a=jnp.full(2, 5.0), b={"w": jnp.full(3, 7.0)}).save(tmp_path / "c")
  ckpt = jaxckpt.Checkpoint(a=jnp.zeros(2))
  status = ckpt.restore(path)
  with pytest.raises(jaxckpt.LoadStatusError, match="'b/w'"):
    status.assert_consumed()
  ckpt.save(tmp_path / "other")  # TF keeps deferred values across saves too.
  ckpt.b = {"w": jnp.zeros(3)}
  assert ckpt.b["w"].tolist() == [7.0, 7.0, 7.0]
  status.assert_consumed()
  ckpt.a = jnp.zeros(2)  # Already restored: re-assigning keeps the new value, as in TF.
  assert ckpt.a.tolist() == [0.0, 0.0]


def test_deferred_restore_checks_shapes(tmp_path):
  path = jaxckpt.Checkpoint(b=jnp.ones(3)).save(tmp_path / "c")
  ckpt = jaxckpt.Checkpoint()
  ckpt.restore(path).expect_partial()
  with pytest.raises(jaxckpt.ShapeMismatchError, match="'b'"):
    ckpt.b = jnp.zeros(4)
  assert not hasattr(ckpt, "b")


# 7: a state file naming a deleted checkpoint


def test_latest_checkpoint_deleted_fails_loudly_instead_of_initializing(tmp_path):
  ckpt = jaxckpt.Checkpoint(a=jnp.ones(2))
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
  manager.save()
  latest = manager.save()
  import shutil

  shutil.rmtree(latest)
  called = []
  manager = jaxckpt.CheckpointManager(
    ckpt, tmp_path, max_to_keep=3, init_fn=lambda: called.append(1)
  )
  assert manager.latest_checkpoint == latest
  with pytest.raises(jaxckpt.CheckpointNotFoundError):
    manager.restore_or_initialize()
  assert called == []
  assert jaxckpt.latest_checkpoint(tmp_path) is None  # As tf.train.latest_checkpoint.


# 8: restore_or_initialize records the restored step


def test_restore_or_initialize_records_the_step(tmp_path):
  ckpt = jaxckpt.Checkpoint(step=5)
  kwargs = dict(max_to_keep=3, step_counter="step", checkpoint_interval=5)
  assert jaxckpt.CheckpointManager(ckpt, tmp_path, **kwargs).save() is not None
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, **kwargs)
  assert _names([manager.restore_or_initialize()]) == ["ckpt-1"]
  assert manager.save() is None


# 9: constructor and save arguments TF accepts


@pytest.mark.parametrize(
  "kwargs, kept",
  [
    ({"max_to_keep": 2.0}, ["ckpt-2", "ckpt-3"]),
    ({"max_to_keep": True}, ["ckpt-3"]),
    ({"max_to_keep": 2, "keep_checkpoint_every_n_hours": 0}, ["ckpt-2", "ckpt-3"]),
    ({"max_to_keep": 2, "checkpoint_name": ""}, ["-2", "-3"]),
  ],
)
def test_manager_arguments_tf_accepts(tmp_path, kwargs, kept):
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(a=1), tmp_path, **kwargs)
  for _ in range(3):
    manager.save()
  assert _names(manager.checkpoints) == kept
  assert _on_disk(tmp_path) == kept


def test_checkpoint_interval_zero_skips_only_the_same_step(tmp_path):
  ckpt = jaxckpt.Checkpoint(step=0)
  manager = jaxckpt.CheckpointManager(
    ckpt, tmp_path, max_to_keep=None, step_counter="step", checkpoint_interval=0
  )
  saved = []
  for step in (0, 0, 1, 2):
    ckpt.step = step
    saved.append(manager.save() is not None)
  assert saved == [True, False, True, True]


def test_checkpoint_name_in_a_subdirectory(tmp_path):
  ckpt = jaxckpt.Checkpoint(a=1)
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=2, checkpoint_name="sub/ckpt")
  paths = [manager.save() for _ in range(3)]
  assert paths[-1] == str(tmp_path / "sub" / "ckpt-3")
  assert sorted(os.listdir(tmp_path / "sub")) == ["ckpt-2", "ckpt-3"]
  state = (tmp_path / "checkpoint").read_text()
  assert 'model_checkpoint_path: "sub/ckpt-3"' in state
  reopened = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=2, checkpoint_name="sub/ckpt")
  assert reopened.checkpoints == paths[1:]
  assert jaxckpt.latest_checkpoint(tmp_path) == paths[-1]


@pytest.mark.parametrize("number", [2.5, 2.0, "2", np.float32(2)])
def test_non_integer_checkpoint_number_is_refused(tmp_path, number):
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(a=1), tmp_path, max_to_keep=2)
  with pytest.raises(jaxckpt.InvalidOptionsError, match="checkpoint_number must be an integer"):
    manager.save(checkpoint_number=number)
  assert _names([manager.save(checkpoint_number=jnp.array(3))]) == ["ckpt-3"]


# 10: the missing API


def test_last_checkpoint_step_seeds_the_interval(tmp_path):
  ckpt = jaxckpt.Checkpoint(step=12)
  manager = jaxckpt.CheckpointManager(
    ckpt,
    tmp_path,
    max_to_keep=3,
    step_counter=lambda: ckpt.step,
    checkpoint_interval=5,
    last_checkpoint_step=10,
  )
  assert manager.save() is None
  ckpt.step = 15
  assert manager.save() is not None


def test_get_checkpoint_state_is_tf_shaped(tmp_path):
  assert jaxckpt.train.get_checkpoint_state(tmp_path) is None
  ckpt = jaxckpt.Checkpoint(a=1)
  path = ckpt.save(tmp_path / "c")
  state = jaxckpt.train.get_checkpoint_state(tmp_path)
  assert state.model_checkpoint_path == path
  assert state.all_model_checkpoint_paths == [path]
  assert state.all_model_checkpoint_timestamps == [] and state.last_preserved_timestamp == 0.0
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path / "m", max_to_keep=2)
  before = time.time()
  paths = [manager.save(), manager.save()]
  state = jaxckpt.get_checkpoint_state(tmp_path / "m")
  assert state.all_model_checkpoint_paths == paths
  assert all(t >= before for t in state.all_model_checkpoint_timestamps)
  assert state.last_preserved_timestamp < before


def test_checkpoints_iterator_times_out(tmp_path, monkeypatch):
  monkeypatch.setattr(_knobs, "POLL_INTERVAL_S", 0.01)
  assert list(jaxckpt.train.checkpoints_iterator(tmp_path, timeout=0.05)) == []
  ckpt = jaxckpt.Checkpoint(a=1)
  ckpt.save(tmp_path / "c")
  latest = ckpt.save(tmp_path / "c")
  calls = []

  def timeout_fn():  # As TF: asked after each yield and after each timeout.
    calls.append(1)
    return len(calls) >= 2

  found = list(jaxckpt.train.checkpoints_iterator(tmp_path, timeout=0.05, timeout_fn=timeout_fn))
  assert found == [latest] and len(calls) == 2


def test_checkpoints_iterator_yields_new_checkpoints(tmp_path, monkeypatch):
  monkeypatch.setattr(_knobs, "POLL_INTERVAL_S", 0.01)
  ckpt = jaxckpt.Checkpoint(a=1)
  first = ckpt.save(tmp_path / "c")
  found = []
  for path in jaxckpt.checkpoints_iterator(tmp_path, timeout=0.5):
    found.append(path)
    if len(found) == 1:
      ckpt.save(tmp_path / "c")
  assert found == [first, str(tmp_path / "c-2")]


def _mesh_sharding(*spec):
  return jax.NamedSharding(jax.make_mesh((4,), ("d",)), jax.P(*spec))


def test_sharding_callback_places_arrays_on_save_and_restore(tmp_path):
  calls = []

  def callback(name, shape, dtype):
    calls.append((name, shape, np.dtype(dtype).name))
    return _mesh_sharding("d") if name == "w" else None

  options = jaxckpt.CheckpointOptions(experimental_sharding_callback=callback)
  ckpt = jaxckpt.Checkpoint(w=jnp.arange(8.0), b=jnp.ones(2))
  path = ckpt.save(tmp_path / "c", options=options)
  assert ("w", (8,), "float32") in calls
  assert ckpt.w.sharding.is_fully_replicated  # The tracked value itself is not changed.
  dst = jaxckpt.Checkpoint(w=jnp.zeros(8), b=jnp.zeros(2))
  dst.restore(path, options=options).assert_consumed()
  assert dst.w.sharding == _mesh_sharding("d") and dst.w.tolist() == list(range(8))
  assert dst.b.tolist() == [1.0, 1.0]


def test_sharding_callback_must_return_a_sharding(tmp_path):
  options = jaxckpt.CheckpointOptions(experimental_sharding_callback=lambda *a: "d")
  with pytest.raises(jaxckpt.InvalidOptionsError, match="for 'w'"):
    jaxckpt.Checkpoint(w=jnp.ones(2)).save(tmp_path / "c", options=options)


def test_skip_slot_variables_leaves_optimizer_state(tmp_path):
  src = jaxckpt.Checkpoint(params={"w": jnp.ones(2)}, opt_state={"mu": jnp.ones(2)})
  path = src.save(tmp_path / "c")
  dst = jaxckpt.Checkpoint(params={"w": jnp.zeros(2)}, opt_state={"mu": jnp.zeros(2)})
  options = jaxckpt.CheckpointOptions(experimental_skip_slot_variables=True)
  dst.restore(path, options=options).assert_consumed()
  assert dst.params["w"].tolist() == [1.0, 1.0] and dst.opt_state["mu"].tolist() == [0.0, 0.0]


def test_train_namespace_mirrors_tf_train():
  import jaxckpt.compat.v1.train
  import jaxckpt.train

  for name in jaxckpt.train.__all__:
    assert getattr(jaxckpt.train, name).__doc__, name
  assert jaxckpt.train.Checkpoint is jaxckpt.Checkpoint
  assert jaxckpt.train.CheckpointManager is jaxckpt.CheckpointManager
  assert jaxckpt.compat.v1.train.CheckpointOptions is jaxckpt.CheckpointOptions
  assert {
    "Checkpoint",
    "CheckpointOptions",
    "CheckpointManager",
    "latest_checkpoint",
    "list_variables",
    "load_checkpoint",
    "checkpoints_iterator",
    "get_checkpoint_state",
  } <= set(jaxckpt.train.__all__)


# 11: the working directory


def test_manager_and_latest_checkpoint_in_the_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = jaxckpt.Checkpoint(a=1)
  assert ckpt.save("ckpt") == "ckpt-1"
  assert jaxckpt.latest_checkpoint("") == "ckpt-1"
  manager = jaxckpt.CheckpointManager(ckpt, "", max_to_keep=2)
  assert [manager.save() for _ in range(3)] == ["ckpt-2", "ckpt-3", "ckpt-4"]
  assert manager.checkpoints == ["ckpt-3", "ckpt-4"]
  assert jaxckpt.CheckpointManager(ckpt, "", max_to_keep=2).latest_checkpoint == "ckpt-4"
  assert 'model_checkpoint_path: "ckpt-4"' in (tmp_path / "checkpoint").read_text()


# 12: keep_checkpoint_every_n_hours counts from a second before the manager started


def test_first_checkpoint_can_be_kept_forever(tmp_path):
  manager = jaxckpt.CheckpointManager(
    jaxckpt.Checkpoint(a=1), tmp_path, max_to_keep=1, keep_checkpoint_every_n_hours=0.5 / 3600
  )
  manager.save()
  manager.save()
  assert _names(manager.checkpoints) == ["ckpt-2"]
  assert _on_disk(tmp_path) == ["ckpt-1", "ckpt-2"]


# 13: saves that keep writing the same arrays


def test_stale_saves_warn_once(tmp_path, caplog):
  params = {"w": jnp.ones(3)}
  ckpt = jaxckpt.Checkpoint(params=params, step=0)
  with caplog.at_level(logging.WARNING, logger="jaxckpt"):
    for step in range(1, 4):
      params = {"w": params["w"] + 1}  # Never re-assigned to ckpt.params.
      ckpt.step = step
      ckpt.save(tmp_path / "c")
  warnings = [r.getMessage() for r in caplog.records if "very object" in r.getMessage()]
  assert len(warnings) == 1 and "ckpt.net = params" in warnings[0] and "'step'" in warnings[0]


def test_saves_that_reassign_do_not_warn(tmp_path, caplog):
  params = {"w": jnp.ones(3)}
  ckpt = jaxckpt.Checkpoint(params=params, step=0)
  with caplog.at_level(logging.WARNING, logger="jaxckpt"):
    for step in range(1, 4):
      ckpt.params = {"w": ckpt.params["w"] + 1}
      ckpt.step = step
      ckpt.save(tmp_path / "c")
    ckpt.save(tmp_path / "c")  # Nothing changed at all: a repeat save, not a stale one.
  assert not [r for r in caplog.records if "very object" in r.getMessage()]


def test_reassigning_one_array_of_many_does_not_warn_and_keeping_all_does(tmp_path, caplog):
  # 100 arrays: most are compared by id, a sample by weak reference.
  layers = {f"l{i:03d}": jnp.full((4,), float(i)) for i in range(100)}
  ckpt = jaxckpt.Checkpoint(layers=dict(layers), step=0)
  with caplog.at_level(logging.WARNING, logger="jaxckpt"):
    ckpt.save(tmp_path / "c")
    for step, name in [(1, "l001"), (2, "l099"), (3, "l050")]:  # l001: not in the sample.
      ckpt.layers = {**ckpt.layers, name: ckpt.layers[name] + 1}
      ckpt.step = step
      ckpt.save(tmp_path / "c")
    assert not [r for r in caplog.records if "very object" in r.getMessage()]
    ckpt.step = 4  # Now nothing re-assigned while the step moved.
    ckpt.save(tmp_path / "c")
  assert len([r for r in caplog.records if "very object" in r.getMessage()]) == 1


# 14: a step_counter that cannot change


@pytest.mark.parametrize("make", [lambda c: c.step, lambda c: 3, lambda c: np.int64(3)])
def test_step_counter_value_is_refused(tmp_path, make):
  ckpt = jaxckpt.Checkpoint(step=jnp.array(0))
  with pytest.raises(jaxckpt.InvalidOptionsError, match="step_counter='step'"):
    jaxckpt.CheckpointManager(
      ckpt, tmp_path, max_to_keep=2, step_counter=make(ckpt), checkpoint_interval=10
    )


def test_step_counter_by_item_name_is_read_fresh(tmp_path):
  ckpt = jaxckpt.Checkpoint(step=jnp.array(0))
  manager = jaxckpt.CheckpointManager(
    ckpt, tmp_path, max_to_keep=None, step_counter="step", checkpoint_interval=10
  )
  saved = []
  for step in range(0, 31, 5):
    ckpt.step = jnp.array(step)
    if manager.save() is not None:
      saved.append(step)
  assert saved == [0, 10, 20, 30]
