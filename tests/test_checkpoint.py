import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt


def _tree():
  return {
    "w": jnp.arange(12.0).reshape(3, 4),
    "b": np.arange(3, dtype=np.float32),
    "layers": [jnp.ones(2, jnp.bfloat16), 7],
  }


def _zeros_like(tree):
  return jax.tree.map(lambda x: type(x)(0) if isinstance(x, (int, float)) else x * 0, tree)


def test_seed_example_with_a_jax_value(tmp_path):
  # The example saves to "/tmp/ckpt"; tmp_path keeps /tmp itself clean.
  options = jaxckpt.CheckpointOptions(experimental_io_device="/job:localhost")
  path = jaxckpt.Checkpoint(step=jnp.array(0)).save(f"{tmp_path}/ckpt", options=options)
  assert path == f"{tmp_path}/ckpt-1"
  assert isinstance(path, str)
  assert jaxckpt.latest_checkpoint(str(tmp_path)) == f"{tmp_path}/ckpt-1"


def test_save_numbers_paths_and_writes_tf_state_file(tmp_path):
  ckpt = jaxckpt.Checkpoint(model=_tree())
  assert ckpt.save(tmp_path / "m") == str(tmp_path / "m-1")
  assert ckpt.save(tmp_path / "m") == str(tmp_path / "m-2")
  assert ckpt.save_counter == 2
  assert (tmp_path / "checkpoint").read_text() == (
    'model_checkpoint_path: "m-2"\nall_model_checkpoint_paths: "m-2"\n'
  )
  assert jaxckpt.latest_checkpoint(tmp_path) == str(tmp_path / "m-2")


def test_state_file_is_rewritten_atomically_without_leftovers(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  for _ in range(3):
    ckpt.save(tmp_path / "m")
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "m-1", "m-2", "m-3"]


def test_relative_prefix_gives_relative_path_and_state_in_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = jaxckpt.Checkpoint(x=jnp.ones(2)).save("rel")
  assert path == "rel-1"
  assert jaxckpt.latest_checkpoint(".") == "./rel-1"


def test_write_touches_neither_counter_nor_state_file(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  ckpt.save(tmp_path / "m")
  assert ckpt.write(tmp_path / "w") == str(tmp_path / "w")
  assert ckpt.save_counter == 1
  assert jaxckpt.latest_checkpoint(tmp_path) == str(tmp_path / "m-1")
  assert ckpt.save(tmp_path / "m") == str(tmp_path / "m-2")  # Counter continues.


def test_write_overwrites_an_existing_checkpoint(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  ckpt.write(tmp_path / "w")
  ckpt.x = jnp.full(2, 5.0)
  ckpt.write(tmp_path / "w")
  assert jaxckpt.load_checkpoint(tmp_path / "w").get_tensor("x").tolist() == [5.0, 5.0]
  assert sorted(os.listdir(tmp_path)) == ["w"]


def test_roundtrip_restores_values_types_and_counter(tmp_path):
  ckpt = jaxckpt.Checkpoint(model=_tree(), step=5, lr=0.5, flag=True, g=np.float32(2))
  ckpt.save(tmp_path / "m")
  path = ckpt.save(tmp_path / "m")
  fresh = jaxckpt.Checkpoint(
    model=_zeros_like(_tree()), step=0, lr=0.0, flag=False, g=np.float32(0)
  )
  fresh.restore(path).assert_consumed()
  assert fresh.save_counter == 2
  np.testing.assert_array_equal(fresh.model["w"], _tree()["w"])
  np.testing.assert_array_equal(fresh.model["b"], _tree()["b"])
  assert isinstance(fresh.model["w"], jax.Array) and isinstance(fresh.model["b"], np.ndarray)
  assert fresh.model["layers"][0].dtype == jnp.bfloat16
  assert fresh.model["layers"][1] == 7 and type(fresh.model["layers"][1]) is int
  assert (fresh.step, fresh.lr, fresh.flag) == (5, 0.5, True)
  assert type(fresh.g) is np.float32 and fresh.g == 2
  assert fresh.save(tmp_path / "m") == str(tmp_path / "m-3")


def test_read_keeps_the_counter_for_a_counter_created_later(tmp_path):
  # As TF: a fresh Checkpoint has no save_counter yet, so read() leaves the stored
  # one unused (assert_consumed fails) and applies it once the counter exists.
  src = jaxckpt.Checkpoint(x=jnp.ones(2))
  src.save(tmp_path / "m")
  src.write(tmp_path / "w")
  dst = jaxckpt.Checkpoint(x=jnp.zeros(2))
  status = dst.read(tmp_path / "w").assert_existing_objects_matched()
  with pytest.raises(jaxckpt.LoadStatusError, match="save_counter"):
    status.assert_consumed()
  assert dst.save_counter == 1
  assert dst.x.tolist() == [1.0, 1.0]


def test_restore_casts_to_tracked_dtype(tmp_path):
  path = jaxckpt.Checkpoint(x=jnp.arange(4.0)).save(tmp_path / "m")
  dst = jaxckpt.Checkpoint(x=jnp.zeros(4, jnp.bfloat16))
  dst.restore(path)
  assert dst.x.dtype == jnp.bfloat16
  assert dst.x.tolist() == [0, 1, 2, 3]


def test_attribute_read_assign_and_delete():
  ckpt = jaxckpt.Checkpoint(a=1)
  ckpt.b = jnp.ones(2)
  assert ckpt.a == 1 and ckpt.b.shape == (2,)
  del ckpt.a
  with pytest.raises(AttributeError, match=r"tracks no item 'a'.*\['b'\]"):
    _ = ckpt.a


@pytest.mark.parametrize("name", ["save", "restore", "save_counter", "sync"])
def test_reserved_item_names_are_rejected(name):
  with pytest.raises(jaxckpt.TreeError, match=repr(name)):
    jaxckpt.Checkpoint(**{name: 1})


def test_bad_leaf_names_its_path_and_writes_nothing(tmp_path):
  ckpt = jaxckpt.Checkpoint(model={"layers": [jnp.ones(2), object()]})
  with pytest.raises(jaxckpt.TreeError, match="'model/layers/1' is a builtins.object"):
    ckpt.save(tmp_path / "m")
  assert ckpt.save_counter == 0
  assert os.listdir(tmp_path) == []


def test_ambiguous_keys_are_rejected(tmp_path):
  # 'a.b' is stored as 'a%2Eb': a real key 'a%2Eb' beside it would name the same entry.
  ckpt = jaxckpt.Checkpoint(m={"a.b": 1, "a%2Eb": 2})
  with pytest.raises(
    jaxckpt.TreeError, match=r"same name 'm/a%2Eb': key paths \['a%2Eb'\] and \['a.b'\]"
  ):
    ckpt.save(tmp_path / "m")
  assert os.listdir(tmp_path) == []


def test_donated_array_is_a_clear_error(tmp_path):
  x = jnp.ones(3)
  jax.jit(lambda v: v + 1, donate_argnums=0)(x)
  with pytest.raises(jaxckpt.TreeError, match="'x' is a deleted jax.Array"):
    jaxckpt.Checkpoint(x=x).save(tmp_path / "m")


def test_options_must_be_checkpoint_options(tmp_path):
  with pytest.raises(jaxckpt.InvalidOptionsError, match="got dict"):
    jaxckpt.Checkpoint(x=1).save(tmp_path / "m", options={"enable_async": True})


def test_empty_checkpoint_roundtrips(tmp_path):
  path = jaxckpt.Checkpoint().save(tmp_path / "m")
  status = jaxckpt.Checkpoint().restore(path)
  assert status.matched == frozenset()
