import gc
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxckpt


def _mesh_sharding(shape, names, spec):
  return jax.NamedSharding(jax.make_mesh(shape, names), jax.P(*spec))


def test_missing_prefix_is_file_not_found_with_suffix_hint(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  ckpt.save(tmp_path / "m")
  ckpt.save(tmp_path / "m")
  with pytest.raises(FileNotFoundError, match=r"No checkpoint found at '.*/m'.*'-N'.*m-2'"):
    ckpt.restore(tmp_path / "m")


def test_directory_instead_of_checkpoint_hints_latest_checkpoint(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  ckpt.save(tmp_path / "m")
  with pytest.raises(jaxckpt.CheckpointNotFoundError, match="latest_checkpoint"):
    ckpt.restore(tmp_path)


def test_nonexistent_path_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    jaxckpt.Checkpoint(x=1).restore(tmp_path / "nowhere")


def test_non_checkpoint_directory_is_rejected(tmp_path):
  (tmp_path / "junk").mkdir()
  with pytest.raises(jaxckpt.NotACheckpointError, match="not a committed jaxckpt checkpoint"):
    jaxckpt.Checkpoint(x=1).restore(tmp_path / "junk")


def test_newer_format_version_is_refused(tmp_path):
  path = jaxckpt.Checkpoint(x=1).save(tmp_path / "m")
  manifest = Path(path, "jaxckpt", "metadata")
  data = json.loads(manifest.read_text())
  data["version"] = 99
  manifest.write_text(json.dumps(data))
  with pytest.raises(jaxckpt.NotACheckpointError, match="version 99.*Upgrade jaxckpt"):
    jaxckpt.Checkpoint(x=1).restore(path)


def test_shape_mismatch_names_path_and_both_shapes_and_changes_nothing(tmp_path):
  path = jaxckpt.Checkpoint(a=jnp.ones(2), model={"w": jnp.ones((3, 4))}).save(tmp_path / "m")
  dst = jaxckpt.Checkpoint(a=jnp.zeros(2), model={"w": jnp.zeros((4, 3))})
  with pytest.raises(ValueError, match=r"'model/w'.*\(3, 4\).*\(4, 3\)"):
    dst.restore(path)
  assert dst.a.tolist() == [0.0, 0.0]  # Checked before anything was restored.
  assert dst.save_counter == 0


def test_tracked_but_absent_fails_consumed_and_existing_matched(tmp_path):
  path = jaxckpt.Checkpoint(a=jnp.ones(2)).save(tmp_path / "m")
  status = jaxckpt.Checkpoint(a=jnp.zeros(2), b=jnp.zeros(2)).restore(path)
  with pytest.raises(AssertionError, match="'b'"):
    status.assert_consumed()
  with pytest.raises(jaxckpt.LoadStatusError, match="'b'"):
    status.assert_existing_objects_matched()
  assert status.assert_nontrivial_match() is status


def test_in_checkpoint_but_untracked_fails_only_consumed(tmp_path):
  path = jaxckpt.Checkpoint(a=jnp.ones(2), b=jnp.ones(2)).save(tmp_path / "m")
  dst = jaxckpt.Checkpoint(a=jnp.zeros(2))
  status = dst.restore(path)
  with pytest.raises(AssertionError, match="'b'.*not tracked"):
    status.assert_consumed()
  assert status.assert_existing_objects_matched() is status
  assert status.assert_nontrivial_match().expect_partial() is status
  assert dst.a.tolist() == [1.0, 1.0]


def test_nothing_matched_fails_nontrivial(tmp_path):
  # Written by a Checkpoint that never saved: no save_counter, which would match (as in TF).
  path = jaxckpt.Checkpoint(a=jnp.ones(2)).write(tmp_path / "m")
  status = jaxckpt.Checkpoint(b=jnp.zeros(2)).restore(path)
  with pytest.raises(AssertionError, match="Nothing tracked matched"):
    status.assert_nontrivial_match()
  status.expect_partial()


def test_restore_none_restores_nothing_and_assertions_say_so():
  ckpt = jaxckpt.Checkpoint(a=jnp.zeros(2))
  status = ckpt.restore(None)
  for check in (
    status.assert_consumed,
    status.assert_existing_objects_matched,
    status.assert_nontrivial_match,
  ):
    with pytest.raises(AssertionError, match="save_path=None"):
      check()
  assert status.expect_partial() is status


def test_unused_values_warn_unless_expect_partial(tmp_path, caplog):
  path = jaxckpt.Checkpoint(a=jnp.ones(2), b=jnp.ones(2)).save(tmp_path / "m")
  with caplog.at_level(logging.WARNING, logger="jaxckpt"):
    jaxckpt.Checkpoint(a=jnp.zeros(2)).restore(path).expect_partial()
    gc.collect()
    assert not [r for r in caplog.records if "never restored" in r.message]
    jaxckpt.Checkpoint(a=jnp.zeros(2)).restore(path)
    gc.collect()
    assert [r for r in caplog.records if "never restored" in r.message and "'b'" in r.message]


@pytest.mark.parametrize("target", ["single", "4-way", "2x2"])
def test_restore_reshards_onto_the_tracked_sharding(tmp_path, target):
  saved = jax.device_put(jnp.arange(32.0).reshape(4, 8), _mesh_sharding((2,), ("x",), ("x",)))
  path = jaxckpt.Checkpoint(w=saved).save(tmp_path / "m")
  sharding = {
    "single": jax.sharding.SingleDeviceSharding(jax.devices()[3]),
    "4-way": _mesh_sharding((4,), ("x",), (None, "x")),
    "2x2": _mesh_sharding((2, 2), ("a", "b"), ("a", "b")),
  }[target]
  dst = jaxckpt.Checkpoint(w=jax.device_put(jnp.zeros((4, 8), jnp.bfloat16), sharding))
  dst.restore(path).assert_consumed()
  assert dst.w.sharding == sharding
  assert dst.w.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(dst.w, np.float32), np.arange(32.0).reshape(4, 8))


def test_checkpoint_is_restorable_by_plain_orbax(tmp_path):
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": np.ones(3, np.float32), "step": 7}
  path = jaxckpt.Checkpoint(model=tree).save(tmp_path / "m")
  # The documented one-liner:
  restored = ocp.StandardCheckpointer().restore(f"{path}/state")
  np.testing.assert_array_equal(restored["model"]["w"], tree["w"])
  np.testing.assert_array_equal(restored["model"]["b"], tree["b"])
  assert restored["model"]["step"] == 7


def test_list_variables_and_reader(tmp_path):
  tree = {
    "w": jnp.ones((2, 3)),
    "b": np.zeros(3, np.float64),
    "layers": [jnp.ones(2, jnp.bfloat16)],
  }
  ckpt = jaxckpt.Checkpoint(model=tree, step=3)
  path = ckpt.save(tmp_path / "m")
  expected = [
    ("model/b", [3]),
    ("model/layers/0", [2]),
    ("model/w", [2, 3]),
    ("save_counter", []),
    ("step", []),
  ]
  assert jaxckpt.list_variables(tmp_path) == expected
  assert jaxckpt.list_variables(path) == expected
  reader = jaxckpt.load_checkpoint(tmp_path)
  assert reader.save_counter == 1
  assert reader.get_variable_to_shape_map()["model/w"] == [2, 3]
  dtypes = reader.get_variable_to_dtype_map()
  assert dtypes["model/b"] == np.float64 and dtypes["model/layers/0"] == jnp.bfloat16
  assert reader.has_tensor("step") and not reader.has_tensor("nope")
  assert reader.get_tensor("step") == 3
  np.testing.assert_array_equal(reader.get_tensor("model/w"), np.ones((2, 3)))
  with pytest.raises(KeyError, match="'nope' is not in checkpoint"):
    reader.get_tensor("nope")


def test_load_checkpoint_on_empty_directory_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="state file"):
    jaxckpt.load_checkpoint(tmp_path)


def test_structure_mismatch_is_explained_with_tree_paths(tmp_path):
  path = jaxckpt.Checkpoint(model={"layers": [jnp.ones(2), jnp.ones(2)], "w": jnp.ones(3)}).save(
    tmp_path / "m"
  )
  status = jaxckpt.Checkpoint(model={"layers": jnp.zeros(2), "w": {"k": jnp.zeros(3)}}).restore(
    path
  )
  with pytest.raises(AssertionError) as info:
    status.assert_existing_objects_matched()
  message = str(info.value)
  assert "at 'model/layers' the checkpoint has a subtree ('model/layers/0', " in message
  assert "at 'model/w' the checkpoint has a single value but a subtree (incl. 'model/w/k')" in (
    message
  )
  status.expect_partial()


def test_restore_keeps_uncommitted_arrays_uncommitted_so_jit_does_not_recompile(tmp_path):
  x = jnp.zeros(3)
  ckpt = jaxckpt.Checkpoint(x=x, y=jax.device_put(jnp.ones(2), jax.devices()[1]))
  ckpt.restore(ckpt.save(tmp_path / "ckpt"))
  assert not ckpt.x.committed and ckpt.y.committed
  assert ckpt.y.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[1])
  f = jax.jit(lambda a: a + 1)
  f(x)
  f(ckpt.x)
  assert f._cache_size() == 1


def test_uncommit_shares_the_buffer_instead_of_copying():
  from jaxckpt import _compat

  x = jax.device_put(jnp.arange(1024.0), jax.devices()[0])
  y = _compat.uncommitted(x)
  assert x.committed and not y.committed
  assert y.unsafe_buffer_pointer() == x.unsafe_buffer_pointer()  # The fast path, not a copy.
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
