"""Every error jaxckpt raises is exactly the documented `JaxckptError` subclass.

`test_public_raise_site` triggers each raise site reachable from the public API
and checks the exact class, `JaxckptError` and the builtin base users catch
(test_errors.py, test_options.py and friends check messages and behaviour with
``pytest.raises``, which accepts subclasses). `test_every_raise_is_a_jaxckpt_error`
reads jaxckpt's source so that a new ``raise ValueError(...)`` fails here.
"""

import argparse
import ast
import builtins
import collections
import hashlib
import importlib
import inspect
import json
import os
import pathlib
import shutil
import signal
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _cli
from jaxckpt import _commit
from jaxckpt import _errors
from jaxckpt import _layout
from jaxckpt import _manifest
from jaxckpt import _multihost
from jaxckpt import _routed
from jaxckpt import _store
from jaxckpt import _zarr3
from jaxckpt._errors import JaxckptError

PACKAGE = pathlib.Path(jaxckpt.__file__).parent
ERROR_CLASSES = frozenset(
  c
  for c in vars(_errors).values()
  if isinstance(c, type) and issubclass(c, JaxckptError) and c.__module__ == _errors.__name__
)
PUBLIC_CLASSES = sorted(
  (c for c in ERROR_CLASSES if not c.__name__.startswith("_")), key=lambda c: c.__name__
)
INC = jaxckpt.CheckpointOptions(incremental=True)


def _check(error: BaseException, cls: type, builtin_bases: tuple[type, ...]) -> None:
  assert type(error) is cls, f"{type(error).__name__} raised, expected {cls.__name__}: {error}"
  assert isinstance(error, JaxckptError)
  for base in builtin_bases:
    assert isinstance(error, base), f"{cls.__name__} is not a {base.__name__}"


# -- the raise sites reachable from the public API ---------------------------------

_SITES = []


def _site(cls: type, builtin_bases: tuple[type, ...], match: str):
  """Registers ``trigger(tmp_path, monkeypatch)``, whose last call must raise ``cls``."""

  def register(trigger):
    _SITES.append(pytest.param(trigger, cls, builtin_bases, match, id=trigger.__name__))
    return trigger

  return register


def _committed(tmp_path) -> str:
  return jaxckpt.Checkpoint(x=jnp.arange(3.0)).write(tmp_path / "c")


def _edit_manifest(path: str, edit) -> None:
  file = pathlib.Path(path, "jaxckpt", "metadata")
  data = json.loads(file.read_text())
  edit(data)
  file.write_bytes(_manifest.seal(data))  # Re-sealed: what is tested is the edit itself.


# Checkpoint (_checkpoint.py)


@_site(jaxckpt.InvalidOptionsError, (TypeError, ValueError), "options must be")
def save_with_options_that_are_not_options(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=1).save(tmp_path / "m", options={"enable_async": True})


@_site(jaxckpt.InvalidOptionsError, (TypeError, ValueError), "options must be")
def read_with_options_that_are_not_options(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=1).read(_committed(tmp_path), options=1)


@_site(jaxckpt.UnknownItemError, (AttributeError,), r"tracks no item 'nope'.*\['x'\]")
def get_an_untracked_item(tmp_path, monkeypatch):
  _ = jaxckpt.Checkpoint(x=1).nope


@_site(jaxckpt.UnknownItemError, (AttributeError,), r"tracks no item 'nope'.*\['x'\]")
def delete_an_untracked_item(tmp_path, monkeypatch):
  del jaxckpt.Checkpoint(x=1).nope


@_site(jaxckpt.TreeError, (ValueError,), "it is a Checkpoint attribute")
def track_an_item_named_like_a_method(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(save=1)


@_site(jaxckpt.TreeError, (ValueError,), "must not contain")
def track_an_item_name_with_a_dot(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(**{"a.b": 1})


@_site(jaxckpt.TreeError, (ValueError,), "abstract values")
def save_an_abstract_value(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=jax.ShapeDtypeStruct((2,), jnp.float32)).save(tmp_path / "m")


@_site(jaxckpt.InvalidOptionsError, (TypeError, ValueError), "needs a local path")
def incremental_save_to_a_url(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=jnp.ones(2)).save(f"memory://{uuid.uuid4().hex}/c", options=INC)


@_site(jaxckpt.InvalidPathError, (ValueError,), "never overwrite")
def incremental_write_over_a_checkpoint(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=jnp.ones(2)).write(_committed(tmp_path), options=INC)


# Save targets (_store.LocalStore.check_target)


@_site(jaxckpt.InvalidPathError, (ValueError,), "is a file, not a directory")
def save_under_a_file(tmp_path, monkeypatch):
  (tmp_path / "f").write_text("x")
  jaxckpt.Checkpoint(x=1).save(tmp_path / "f" / "sub" / "m")


@_site(jaxckpt.InvalidPathError, (ValueError,), "exists and is not a directory")
def write_onto_a_file(tmp_path, monkeypatch):
  (tmp_path / "f").write_text("x")
  jaxckpt.Checkpoint(x=1).write(tmp_path / "f")


# Trees (_tree.py)


@_site(jaxckpt.TreeError, (ValueError,), "deleted jax.Array")
def save_a_donated_array(tmp_path, monkeypatch):
  x = jnp.ones(3)
  jax.jit(lambda v: v + 1, donate_argnums=0)(x)
  jaxckpt.Checkpoint(x=x).save(tmp_path / "m")


@_site(jaxckpt.TreeError, (ValueError,), "expected a numeric, string or bytes dtype")
def save_a_void_array(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=np.zeros(2, dtype="V4")).save(tmp_path / "m")


@_site(jaxckpt.TreeError, (ValueError,), "numpy array of dtype object")
def save_an_object_array(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=np.array([None, 1], dtype=object)).save(tmp_path / "m")


@_site(jaxckpt.TreeError, (ValueError,), "holds a builtins.set, which has no exact encoding")
def save_a_state_that_has_no_encoding(tmp_path, monkeypatch):
  class Stateful:
    def get_state(self):
      return {"seen": {1, 2}}

    def set_state(self, state):
      pass

  jaxckpt.Checkpoint(it=Stateful()).save(tmp_path / "m")


@_site(jaxckpt.TreeError, (ValueError,), "is a builtins.object")
def save_an_object_leaf(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=[jnp.ones(2), object()]).save(tmp_path / "m")


@_site(jaxckpt.TreeError, (ValueError,), "An empty key under 'm'")
def save_an_empty_key(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(m={"": 1}).save(tmp_path / "m")


@_site(jaxckpt.TreeError, (ValueError,), "contains itself")
def save_a_checkpoint_that_tracks_itself(tmp_path, monkeypatch):
  ckpt = jaxckpt.Checkpoint(x=1)
  ckpt.me = ckpt
  ckpt.save(tmp_path / "m")


@_site(jaxckpt.TreeError, (ValueError,), "map to the same name 'm/0'")
def save_two_keys_with_one_name(tmp_path, monkeypatch):
  # An OrderedDict keeps its keys unsorted; a dict's 0 and "0" could not be sorted.
  jaxckpt.Checkpoint(m=collections.OrderedDict([(0, 1), ("0", 2)])).save(tmp_path / "m")


# Writing (_commit.py, _background.py)


@_site(jaxckpt.SaveError, (RuntimeError,), "simulated I/O error.*was not committed")
def sync_save_that_fails(tmp_path, monkeypatch):
  def failing_fsync(root):
    raise OSError(5, "simulated I/O error")

  monkeypatch.setattr(_store, "fsync_tree", failing_fsync)
  jaxckpt.Checkpoint(x=jnp.ones(2)).save(tmp_path / "m")


@_site(jaxckpt.SaveError, (RuntimeError,), "simulated I/O error.*was not committed")
def next_save_after_an_async_save_that_failed(tmp_path, monkeypatch):
  def failing_fsync(root):
    raise OSError(5, "simulated I/O error")

  monkeypatch.setattr(_store, "fsync_tree", failing_fsync)
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  failed = ckpt.save(tmp_path / "m", options=jaxckpt.CheckpointOptions(enable_async=True))
  failed.future.exception(timeout=120)
  monkeypatch.undo()
  ckpt.save(tmp_path / "m")  # Raises the earlier save's error (Saver._raise_errors).


@_site(jaxckpt.SaveError, (RuntimeError,), "store unreachable.*was not committed")
def save_to_a_store_that_fails(tmp_path, monkeypatch):
  def failing_write(*args, **kwargs):
    raise OSError("store unreachable")

  monkeypatch.setattr(_zarr3, "write_arrays", failing_write)
  jaxckpt.Checkpoint(x=jnp.ones(2)).save(f"memory://{uuid.uuid4().hex}/c")


@_site(jaxckpt.WriteCallbackError, (RuntimeError,), "callback #0")
def write_callback_that_raises(tmp_path, monkeypatch):
  def boom(path):
    raise RuntimeError("callback exploded")

  options = jaxckpt.CheckpointOptions(experimental_write_callbacks=[boom])
  jaxckpt.Checkpoint(x=jnp.ones(2)).save(tmp_path / "m", options=options)


# Reading checkpoints (_manifest.py, _reader.py)


@_site(jaxckpt.CheckpointNotFoundError, (FileNotFoundError,), "No checkpoint found")
def restore_a_missing_path(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=1).restore(tmp_path / "nowhere")


@_site(jaxckpt.CheckpointNotFoundError, (FileNotFoundError,), "latest_checkpoint")
def restore_a_directory_of_checkpoints(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=1).save(tmp_path / "m")
  jaxckpt.Checkpoint(x=1).restore(tmp_path)


@_site(jaxckpt.NotACheckpointError, (ValueError,), "not a committed jaxckpt checkpoint")
def restore_an_empty_directory(tmp_path, monkeypatch):
  (tmp_path / "junk").mkdir()
  jaxckpt.Checkpoint(x=1).restore(tmp_path / "junk")


@_site(jaxckpt.NotACheckpointError, (ValueError,), "not valid JSON")
def restore_a_manifest_that_is_not_json(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  pathlib.Path(path, "jaxckpt", "metadata").write_bytes(b"\xff{")
  jaxckpt.Checkpoint(x=1).restore(path)


@_site(jaxckpt.NotACheckpointError, (ValueError,), "is not a jaxckpt manifest")
def restore_a_foreign_manifest(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  _edit_manifest(path, lambda data: data.update(format="orbax"))
  jaxckpt.Checkpoint(x=1).restore(path)


@_site(jaxckpt.NotACheckpointError, (ValueError,), "version 99")
def restore_a_newer_format(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  _edit_manifest(path, lambda data: data.update(version=99))
  jaxckpt.Checkpoint(x=1).restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "field 'save_counter' should be present")
def restore_a_manifest_missing_a_field(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  _edit_manifest(path, lambda data: data.pop("save_counter"))
  jaxckpt.Checkpoint(x=1).restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "field 'leaves\\[\"x\"\\].dtype' should be")
def restore_a_manifest_with_a_field_of_the_wrong_type(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  _edit_manifest(path, lambda data: data["leaves"]["x"].update(dtype=4))
  jaxckpt.Checkpoint(x=1).restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "checksum does not match")
def restore_a_manifest_that_fails_its_checksum(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  file = pathlib.Path(path, "jaxckpt", "metadata")
  file.write_text(file.read_text().replace('"float32"', '"float16"'))
  jaxckpt.Checkpoint(x=1).restore(path)


@_site(jaxckpt.CheckpointDeletedError, (FileNotFoundError,), "deleted while it was being read")
def restore_a_checkpoint_swept_during_the_read(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  read = _layout._fastread.read

  def swept(*args, **kwargs):
    _store.LOCAL.remove_checkpoint(path)
    return read(*args, **kwargs)

  monkeypatch.setattr(_layout._fastread, "read", swept)
  jaxckpt.Checkpoint(x=jnp.zeros(3)).restore(path)


@_site(jaxckpt.ConcurrentWriterError, (RuntimeError,), "Another process started saving")
def save_into_a_store_directory_another_writer_took_over(tmp_path, monkeypatch):
  url = f"memory://{uuid.uuid4().hex}/run"
  manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=1), url, max_to_keep=2)
  manager.save()
  _store.KV.replace_file(f"{url}/.jaxckpt-writer", b"another process")
  manager.save()


@_site(jaxckpt.CheckpointNotFoundError, (FileNotFoundError,), "No checkpoint found")
def restore_a_missing_url(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=1).restore(f"memory://{uuid.uuid4().hex}/c")


@_site(jaxckpt.NotACheckpointError, (ValueError,), "interrupted save")
def restore_a_url_holding_no_manifest(tmp_path, monkeypatch):
  url = f"memory://{uuid.uuid4().hex}/c"
  _store.KV.replace_file(f"{url}/data-0/x", b"stray")
  jaxckpt.Checkpoint(x=1).restore(url)


@_site(jaxckpt.NotACheckpointError, (ValueError,), "not valid JSON")
def restore_a_url_whose_manifest_is_not_json(tmp_path, monkeypatch):
  url = f"memory://{uuid.uuid4().hex}/c"
  _store.KV.replace_file(f"{url}/jaxckpt/metadata", b"{")
  jaxckpt.Checkpoint(x=1).restore(url)


@_site(jaxckpt.CheckpointNotFoundError, (FileNotFoundError,), "neither a checkpoint nor")
def load_checkpoint_of_an_empty_directory(tmp_path, monkeypatch):
  jaxckpt.load_checkpoint(tmp_path)


@_site(jaxckpt.CheckpointNotFoundError, (FileNotFoundError,), "names no committed checkpoint")
def list_variables_where_the_state_file_names_a_deleted_checkpoint(tmp_path, monkeypatch):
  shutil.rmtree(jaxckpt.Checkpoint(x=1).save(tmp_path / "m"))
  jaxckpt.list_variables(tmp_path)


@_site(jaxckpt.CheckpointNotFoundError, (FileNotFoundError,), "No checkpoint found")
def checkpoint_reader_of_a_missing_path(tmp_path, monkeypatch):
  jaxckpt.CheckpointReader(str(tmp_path / "nowhere"))


@_site(jaxckpt.VariableNotFoundError, (KeyError,), "'nope' is not in checkpoint")
def get_tensor_of_an_unknown_name(tmp_path, monkeypatch):
  jaxckpt.load_checkpoint(_committed(tmp_path)).get_tensor("nope")


# Restoring values (_restore.py, _integrity.py)


@_site(jaxckpt.ShapeMismatchError, (ValueError,), r"'x': checkpoint \(3,\), tracked \(4,\)")
def restore_into_another_shape(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=jnp.zeros(4)).restore(_committed(tmp_path))


@_site(jaxckpt.DtypeMismatchError, (ValueError,), "casting float to int")
def restore_floats_into_ints(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=jnp.zeros(3, jnp.int32)).restore(_committed(tmp_path))


@_site(jaxckpt.DtypeMismatchError, (ValueError,), "'x': the checkpoint has a .* but the tracked")
def restore_an_array_into_a_string(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x="text").restore(_committed(tmp_path))


@_site(jaxckpt.DtypeMismatchError, (ValueError,), "has a PCG64 Generator but the tracked one")
def restore_a_generator_into_another_bit_generator(tmp_path, monkeypatch):
  path = jaxckpt.Checkpoint(rng=np.random.default_rng(0)).write(tmp_path / "c")
  jaxckpt.Checkpoint(rng=np.random.Generator(np.random.Philox(0))).restore(path)


@_site(
  jaxckpt.TreeError,
  (ValueError,),
  r"Restoring 'it': .*Refusing refused the checkpoint's state \(ValueError: not my",
)
def restore_a_state_the_object_refuses(tmp_path, monkeypatch):
  class Refusing:
    def get_state(self):
      return b"state"

    def set_state(self, state):
      raise ValueError("not my pipeline")

  path = jaxckpt.Checkpoint(it=Refusing()).write(tmp_path / "c")
  jaxckpt.Checkpoint(it=Refusing()).restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "damaged jaxckpt manifest")
def restore_a_damaged_value(tmp_path, monkeypatch):
  path = jaxckpt.Checkpoint(x="text").write(tmp_path / "c")
  _edit_manifest(path, lambda data: data["values"]["x"].update(value={"int": "zz"}))
  jaxckpt.Checkpoint(x="").restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "'x' has CRC-32")
def restore_data_that_fails_its_crc(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  _edit_manifest(path, lambda data: data["leaves"]["x"].update(crc32=1))
  jaxckpt.Checkpoint(x=jnp.zeros(3)).restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), r"'x', shard \[0:3\]")
def restore_data_that_fails_its_shard_crc(tmp_path, monkeypatch):
  path = _committed(tmp_path)
  _edit_manifest(path, lambda data: data["leaves"]["x"].update(shard_crc32={"0:3": 1}))
  jaxckpt.Checkpoint(x=jnp.zeros(3)).restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "no longer exists")
def restore_an_incremental_checkpoint_whose_holder_is_gone(tmp_path, monkeypatch):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(4))
  first = ckpt.save(tmp_path / "c", options=INC)
  second = ckpt.save(tmp_path / "c", options=INC)  # Reuses x from the first.
  shutil.rmtree(first)
  jaxckpt.Checkpoint(x=jnp.zeros(4)).restore(second)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "array 'w' failed to load")
def restore_a_truncated_compressed_array(tmp_path, monkeypatch):
  w = jnp.arange(4096, dtype=jnp.float32)
  path = jaxckpt.Checkpoint(w=w).write(
    tmp_path / "c", options=jaxckpt.CheckpointOptions(compression=True)
  )
  data = max(
    (p for p in pathlib.Path(path, "state").rglob("*") if p.is_file() and "/d/" in str(p)),
    key=lambda p: p.stat().st_size,
  )
  os.truncate(data, data.stat().st_size // 2)
  jaxckpt.Checkpoint(w=jnp.zeros(4096)).restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "could not be read")
def restore_where_only_the_batch_read_fails(tmp_path, monkeypatch):
  real = _layout._orbax_read

  def batch_fails(path, manifest, wanted, *args):
    if len(wanted) > 1:
      raise OSError("batch read failed")
    return real(path, manifest, wanted, *args)

  monkeypatch.setattr(_layout, "_orbax_read", batch_fails)
  options = jaxckpt.CheckpointOptions(compression=True)  # Not for the fast path: Orbax reads.
  path = jaxckpt.Checkpoint(a=jnp.ones(2), b=jnp.ones(2)).write(tmp_path / "c", options=options)
  jaxckpt.Checkpoint(a=jnp.zeros(2), b=jnp.zeros(2)).restore(path)


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), "array 'x' failed to load")
def restore_an_unreadable_array_from_a_store(tmp_path, monkeypatch):
  path = jaxckpt.Checkpoint(x=jnp.ones(3)).save(f"memory://{uuid.uuid4().hex}/c")
  data = json.loads(_store.KV.read_bytes(f"{path}/jaxckpt/metadata"))["data"]
  _store.KV.replace_file(f"{path}/{data}/x/zarr.json", b"garbage")
  jaxckpt.Checkpoint(x=jnp.zeros(3)).restore(path)


# Load status (_load_status.py)


@_site(jaxckpt.LoadStatusError, (AssertionError,), "not tracked")
def assert_consumed_with_an_unused_value(tmp_path, monkeypatch):
  path = jaxckpt.Checkpoint(a=1, b=2).save(tmp_path / "c")
  jaxckpt.Checkpoint(a=0).restore(path).assert_consumed()


@_site(jaxckpt.LoadStatusError, (AssertionError,), "Tracked values not found")
def assert_existing_objects_matched_with_a_missing_value(tmp_path, monkeypatch):
  path = jaxckpt.Checkpoint(a=1).write(tmp_path / "c")
  jaxckpt.Checkpoint(a=0, b=0).restore(path).assert_existing_objects_matched()


@_site(jaxckpt.LoadStatusError, (AssertionError,), "Nothing tracked matched")
def assert_nontrivial_match_with_nothing_matched(tmp_path, monkeypatch):
  path = jaxckpt.Checkpoint(a=1).write(tmp_path / "c")
  jaxckpt.Checkpoint(b=0).restore(path).expect_partial().assert_nontrivial_match()


@_site(jaxckpt.LoadStatusError, (AssertionError,), "No checkpoint specified")
def assert_consumed_after_restore_of_none(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(a=0).restore(None).assert_consumed()


# CheckpointManager (_manager.py; bucket-less URLs from _store.KvStore.join)


@_site(jaxckpt.InvalidOptionsError, (TypeError, ValueError), "must be a jaxckpt.Checkpoint")
def manager_of_something_else(tmp_path, monkeypatch):
  jaxckpt.CheckpointManager({"x": 1}, tmp_path, max_to_keep=1)


@_site(jaxckpt.InvalidOptionsError, (TypeError, ValueError), "exists and is not a directory")
def manager_of_a_file(tmp_path, monkeypatch):
  (tmp_path / "f").write_text("x")
  jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=1), tmp_path / "f", max_to_keep=1)


@_site(jaxckpt.InvalidPathError, (ValueError,), "'s3://' names no bucket")
def manager_of_a_url_without_a_bucket(tmp_path, monkeypatch):
  jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=1), "s3://", max_to_keep=1)


@_site(jaxckpt.InvalidPathError, (ValueError,), "'gs://' names no bucket")
def latest_checkpoint_of_a_url_without_a_bucket(tmp_path, monkeypatch):
  jaxckpt.latest_checkpoint("gs://")


# install_preemption_handler (_preemption.py)


@_site(jaxckpt.InvalidOptionsError, (TypeError, ValueError), "file_prefix is required")
def preemption_handler_for_a_checkpoint_without_prefix(tmp_path, monkeypatch):
  jaxckpt.install_preemption_handler(jaxckpt.Checkpoint(x=1), signals=(signal.SIGUSR1,))


@_site(jaxckpt.InvalidOptionsError, (TypeError, ValueError), "target must be")
def preemption_handler_for_something_else(tmp_path, monkeypatch):
  jaxckpt.install_preemption_handler(object(), signals=(signal.SIGUSR1,))


# TensorFlow checkpoints (_tfcheckpoint.py, _tfbundle.py)

_TF_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "tf"


@_site(jaxckpt.CorruptCheckpointError, (ValueError,), r"index .*ckpt-3\.index.* damaged")
def read_a_truncated_tf_index(tmp_path, monkeypatch):
  directory = shutil.copytree(_TF_FIXTURES / "guide", tmp_path / "guide")
  index = pathlib.Path(directory, "ckpt-3.index")
  index.write_bytes(index.read_bytes()[:-10])
  jaxckpt.load_checkpoint(directory)


@_site(jaxckpt.UnsupportedTensorError, (TypeError,), "has dtype variant")
def read_a_tf_variant(tmp_path, monkeypatch):
  reader = jaxckpt.load_checkpoint(_TF_FIXTURES / "guide")
  reader.get_tensor("iterator/.ATTRIBUTES/ITERATOR_STATE")


@_site(jaxckpt.NotACheckpointError, (ValueError,), "outside that directory")
def follow_a_tf_state_file_out_of_its_directory(tmp_path, monkeypatch):
  directory = shutil.copytree(_TF_FIXTURES / "guide", tmp_path / "guide")
  pathlib.Path(directory, "checkpoint").write_text('model_checkpoint_path: "../ckpt-3"\n')
  jaxckpt.Checkpoint(step=0).restore(directory)


@_site(jaxckpt.InvalidOptionsError, (TypeError, ValueError), "applies to TensorFlow")
def restore_a_jaxckpt_checkpoint_with_a_name_map(tmp_path, monkeypatch):
  jaxckpt.Checkpoint(x=jnp.arange(3.0)).restore(_committed(tmp_path), name_map=str)


@_site(jaxckpt.VariableNotFoundError, (KeyError,), "is not in TF checkpoint")
def get_a_tensor_a_tf_checkpoint_lacks(tmp_path, monkeypatch):
  jaxckpt.load_checkpoint(_TF_FIXTURES / "guide").get_tensor("nope")


@pytest.mark.parametrize("trigger, cls, builtin_bases, match", _SITES)
def test_public_raise_site(tmp_path, monkeypatch, trigger, cls, builtin_bases, match):
  with pytest.raises(JaxckptError, match=match) as info:
    trigger(tmp_path, monkeypatch)
  _check(info.value, cls, builtin_bases)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"compression": "yes"}, "compression must be a bool"),
    ({"chunk_byte_size": 0}, "chunk_byte_size must be a positive int"),
    ({"max_in_flight": 0}, "max_in_flight must be a positive int"),
    ({"memory_budget_bytes": -1}, "memory_budget_bytes must be a positive int"),
    ({"verify_checksums": 1}, "verify_checksums must be a bool"),
    ({"incremental": "no"}, "incremental must be a bool"),
    ({"incremental": True, "max_in_flight": 2}, "needs max_in_flight=1"),
    ({"timeout_s": 0}, "timeout_s must be a positive number"),
    ({"experimental_write_callbacks": print}, "list of callables"),
    ({"experimental_write_callbacks": [1]}, r"\[0\] must be callable"),
    ({"experimental_skip_slot_variables": 1}, "experimental_skip_slot_variables must be"),
    ({"experimental_sharding_callback": 3}, "experimental_sharding_callback must be"),
  ],
)
def test_checkpoint_options_raise_invalid_options_error(kwargs, match):
  with pytest.raises(JaxckptError, match=match) as info:
    jaxckpt.CheckpointOptions(**kwargs)
  _check(info.value, jaxckpt.InvalidOptionsError, (TypeError, ValueError))


@pytest.mark.parametrize("callback", [lambda a, b: None, lambda *, k: None])
def test_bad_write_callback_raises_invalid_callback_error(callback):
  with pytest.raises(JaxckptError, match="at most one positional") as info:
    jaxckpt.CheckpointOptions(experimental_write_callbacks=[callback])
  _check(info.value, jaxckpt.InvalidCallbackError, (TypeError, ValueError, AssertionError))


def test_enable_async_setter_raises_invalid_options_error():
  options = jaxckpt.CheckpointOptions()
  with pytest.raises(JaxckptError, match="enable_async must be a bool") as info:
    options.enable_async = "yes"
  _check(info.value, jaxckpt.InvalidOptionsError, (TypeError, ValueError))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"max_to_keep": 0}, "max_to_keep"),
    ({"max_to_keep": 1, "keep_checkpoint_every_n_hours": -1}, "keep_checkpoint_every_n_hours"),
    ({"max_to_keep": 1, "checkpoint_interval": 5}, "step_counter must be given"),
    ({"max_to_keep": 1, "checkpoint_name": "/elsewhere/b"}, "checkpoint_name"),
    ({"max_to_keep": 1, "checkpoint_interval": 5, "step_counter": 3}, "never changes"),
    ({"max_to_keep": 1, "local_interval": 0}, "local_interval"),
    ({"max_to_keep": 1, "local_directory": "memory://x"}, "local_directory must be a local path"),
  ],
)
def test_manager_arguments_raise_invalid_options_error(tmp_path, kwargs, match):
  with pytest.raises(JaxckptError, match=match) as info:
    jaxckpt.CheckpointManager(jaxckpt.Checkpoint(x=1), tmp_path, **kwargs)
  _check(info.value, jaxckpt.InvalidOptionsError, (TypeError, ValueError))


@pytest.mark.parametrize(
  "spec, match",
  [
    (123, "got int 123"),
    ("garbage!", "is not a device string"),
    ("/job:localhost/replica:1", "replica 1 does not exist"),
    ("/job:localhost/task:7", "names task 7"),
    ("/job:localhost/device:CPU:99", "no CPU:99 device"),
  ],
)
@pytest.mark.parametrize("call", ["save", "restore"])
def test_unknown_io_device_raises_unknown_device_error(tmp_path, spec, match, call):
  options = jaxckpt.CheckpointOptions(experimental_io_device=spec)
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  with pytest.raises(JaxckptError, match=match) as info:
    getattr(ckpt, call)(tmp_path / "m", options=options)
  _check(info.value, jaxckpt.UnknownDeviceError, (ValueError,))


def test_save_path_taken_at_commit_time_is_a_path_exists_error_cause(tmp_path):
  # A symlink to a directory passes check_target; commit() refuses to replace it.
  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real")
  with pytest.raises(JaxckptError, match="not a checkpoint directory is in the way") as info:
    jaxckpt.Checkpoint(x=jnp.ones(2)).write(tmp_path / "link")
  _check(info.value, jaxckpt.SaveError, (RuntimeError,))
  _check(info.value.__cause__, jaxckpt.PathExistsError, (FileExistsError, ValueError))
  assert isinstance(info.value.__cause__, jaxckpt.InvalidPathError)
  assert os.listdir(tmp_path / "real") == []


# -- several processes: CoordinationError (end to end in test_distributed.py) -------


class _FakeClient:
  """The parts of JAX's coordination-service client jaxckpt uses; nobody else reports."""

  def __init__(self, values=None):
    self.values = dict(values or {})

  def key_value_set(self, key, value):
    self.values[key] = value

  def blocking_key_value_get(self, key, timeout_ms):
    if key in self.values:
      return self.values[key]
    raise RuntimeError("DEADLINE_EXCEEDED: simulated")

  def key_value_try_get(self, key):
    if key in self.values:
      return self.values[key]
    raise RuntimeError("NOT_FOUND: simulated")

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]

  def wait_at_barrier(self, key, timeout_ms):
    raise RuntimeError("DEADLINE_EXCEEDED: simulated")


def _coordination(monkeypatch, values=None, primary=0):
  client = _FakeClient(values)
  monkeypatch.setattr(_multihost, "_client", lambda: client)
  return _multihost.Coordination(op=1, timeout_s=0.01, what="save of 'c'", primary=primary)


def _coordination_error(call, match) -> BaseException:
  """The CoordinationError ``call()`` raises (checked like every raise site)."""
  with pytest.raises(JaxckptError, match=match) as info:
    call()
  _check(info.value, jaxckpt.CoordinationError, (RuntimeError,))
  return info.value


def test_uninitialized_distributed_is_a_coordination_error(monkeypatch):
  from jax._src.distributed import global_state

  monkeypatch.setattr(global_state, "client", None)
  error = _coordination_error(_multihost._client, "jax.distributed is not initialized")
  assert "jax.distributed.initialize()" in str(error)


def test_coordination_timeouts_and_failures_are_coordination_errors(monkeypatch):
  coord = _coordination(monkeypatch)
  _coordination_error(lambda: coord.receive("staging"), "did not report 'staging'")
  _coordination_error(lambda: coord.barrier("start"), "waiting for all")
  coord.publish("committed", "OSError: disk full")
  _coordination_error(lambda: coord.barrier("start"), "failed on process 0: OSError")
  error = _coordination_error(lambda: _commit._await_commit(coord), "failed to commit: OSError")
  assert "disk full" in str(error)


def test_processes_saving_to_different_paths_is_a_coordination_error(monkeypatch):
  coord = _coordination(monkeypatch, {"jaxckpt/1/agree/target/1": json.dumps({"value": "/a"})})
  monkeypatch.setattr(_multihost, "process_count", lambda: 2)
  error = _coordination_error(lambda: coord.agree("target", "/b"), "disagree")
  assert "process 0: '/b'" in str(error) and "process 1: '/a'" in str(error)


def test_a_disagreement_names_the_field_and_the_differing_tree_entries(monkeypatch):
  theirs = [["w", [2], "float32"], ["b", [4], "bfloat16"]]
  mine = [["w", [2], "float32"], ["b", [4], "float32"]]
  digest = hashlib.sha256(json.dumps(theirs).encode()).hexdigest()[:16]
  coord = _coordination(
    monkeypatch,
    {
      "jaxckpt/1/agree/plan/1": json.dumps({"compression": True, "tree": digest}),
      "jaxckpt/1/agree/plan/tree/1": json.dumps(theirs),
    },
  )
  monkeypatch.setattr(_multihost, "process_count", lambda: 2)
  error = str(
    _coordination_error(
      lambda: coord.agree("plan", {"compression": False}, trees={"tree": mine}), "disagree"
    )
  )
  assert "compression: process 0: False, process 1: True" in error
  assert '["b", [4], "bfloat16"]' in error and '["b", [4], "float32"]' in error
  assert '["w"' not in error  # Entries that agree are not listed.


def test_a_process_that_failed_first_or_gave_up_makes_the_others_raise_at_once(monkeypatch):
  coord = _coordination(monkeypatch)
  monkeypatch.setattr(_multihost, "process_count", lambda: 2)
  client = _multihost._client()
  client.values["jaxckpt/1/agree/plan/1"] = json.dumps({"__failed__": "InvalidPathError: bad"})
  error = _coordination_error(lambda: coord.agree("plan", {"path": "/a"}), "abandoned")
  assert "process 1 failed first (InvalidPathError: bad)" in str(error)
  # Nobody answers: the wait times out and leaves a mark for late arrivals.
  _coordination_error(lambda: coord.agree("restore", {"path": "/a"}), "did not report")
  assert client.values["jaxckpt/1/agree/restore/gave-up/0"] == "1"
  error = _coordination_error(lambda: coord.agree("restore", {"path": "/a"}), "came too late")
  assert "process 0 gave up" in str(error)
  coord.abandon("read", ValueError("boom"))
  assert "ValueError: boom" in client.values["jaxckpt/1/agree/read/0"]


def test_coordination_error_keeps_its_old_import_path():
  assert _multihost.CoordinationError is _commit.CoordinationError is jaxckpt.CoordinationError


# -- the CLI (_cli.py): errors become exit code 2; its commands raise JaxckptError ---


@pytest.mark.parametrize(
  "command, make_target, match",
  [
    (_cli.cmd_ls, lambda tmp_path: f"memory://{uuid.uuid4().hex}", "Nothing is stored"),
    (_cli.cmd_ls, lambda tmp_path: str(tmp_path / "missing"), "is not a directory"),
    (_cli.cmd_verify, lambda tmp_path: str(tmp_path), "No committed checkpoints"),
  ],
  ids=["ls-empty-url", "ls-missing-directory", "verify-empty-directory"],
)
def test_cli_commands_raise_jaxckpt_error(tmp_path, capsys, command, make_target, match):
  target = make_target(tmp_path)
  args = argparse.Namespace(directory=target, path=target, json=True)
  with pytest.raises(JaxckptError, match=match) as info:
    command(args)
  _check(info.value, JaxckptError, ())
  name = "ls" if command is _cli.cmd_ls else "verify"
  assert _cli.main([name, target]) == 2
  assert match in capsys.readouterr().err


@pytest.mark.parametrize("url", ["s3://", "s3:///run"])
def test_cli_on_a_url_without_a_bucket_exits_2(url, capsys):
  # _store.KvStore.spec's InvalidPathError (a ValueError) is reported, not a traceback.
  assert _cli.main(["ls", url]) == 2
  assert "names no bucket" in capsys.readouterr().err


# -- the hierarchy -----------------------------------------------------------------


def test_every_public_error_class_is_exported():
  for cls in PUBLIC_CLASSES:
    assert getattr(jaxckpt, cls.__name__) is cls and cls.__name__ in jaxckpt.__all__


@pytest.mark.parametrize(
  "cls", [c for c in PUBLIC_CLASSES if c is not JaxckptError], ids=lambda c: c.__name__
)
def test_every_error_class_is_also_a_builtin_users_catch(cls):
  assert [
    b
    for b in cls.__mro__
    if b.__module__ == "builtins" and b not in (Exception, BaseException, object)
  ], cls


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda c: c.__name__)
def test_io_process_errors_are_rebuilt_as_their_class(cls):
  error = _routed._rebuild_error({"error": cls.__name__, "message": "boom"}, 1)
  assert type(error) is cls
  assert "(on process 1, the experimental_io_device) boom" in str(error)


@pytest.mark.parametrize(
  "name",
  ["_ArrayReadError", "_FastReadUnsupported", "ValueError", "PermissionError", "annotations", ""],
)
def test_other_io_process_errors_are_rebuilt_as_jaxckpt_error(name):
  error = _routed._rebuild_error({"error": name, "message": "boom"}, 1)
  assert type(error) is JaxckptError and "boom" in str(error)


# -- every raise in jaxckpt's source -------------------------------------------------

# (module, function, raised name) -> why that raise may bypass _errors.py. Each
# entry must still match a raise, so no stale entry outlives a fixed site.
ALLOWED: dict[tuple[str, str, str], str] = {}


def _bindings(function: ast.AST) -> dict[str, ast.AST | None]:
  """Names a function binds: to the node that binds them (None: an argument)."""
  out: dict[str, ast.AST | None] = {}
  args = getattr(function, "args", None)
  if args is not None:
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
      if arg is not None:
        out[arg.arg] = None
  for node in ast.walk(function):
    if isinstance(node, ast.ExceptHandler) and node.name:
      out[node.name] = node
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      for alias in node.names:
        out[(alias.asname or alias.name).split(".")[0]] = node
    elif isinstance(node, ast.Assign):
      for target in node.targets:
        for name in ast.walk(target):
          if isinstance(name, ast.Name):
            out[name.id] = node.value if isinstance(target, ast.Name) else node
    elif isinstance(node, (ast.For, ast.With, ast.NamedExpr, ast.AnnAssign, ast.AugAssign)):
      for name in ast.walk(getattr(node, "target", node)):
        if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store):
          out.setdefault(name.id, node)
  return out


def _imported(node: ast.ImportFrom | ast.Import, name: str, package: str):
  for alias in node.names:
    if (alias.asname or alias.name) == name:
      if isinstance(node, ast.Import):
        return importlib.import_module(alias.name)
      module = importlib.import_module("." * node.level + (node.module or ""), package)
      return getattr(module, alias.name)
  raise AssertionError(name)


def _raise_problems(source: str, namespace: dict, package: str = "jaxckpt") -> tuple[int, list]:
  """(number of raise statements, [(function, raised name, problem)]) for ``source``,
  whose module-level names are ``namespace``."""
  tree = ast.parse(source)
  problems, count = [], 0

  def resolve(expr, scopes):
    """The object ``expr`` names; "held" for a caught or stored exception."""
    if isinstance(expr, ast.Name):
      for scope in reversed(scopes):
        bound = _bindings(scope)
        if expr.id in bound:
          node = bound[expr.id]
          if isinstance(node, (ast.Import, ast.ImportFrom)):
            return _imported(node, expr.id, package)
          if isinstance(node, ast.Call):  # e = ValueError(...); raise e
            return resolve(node.func, scopes)
          return "held"  # except ... as e; first = errors[0]: raises what was caught.
      if expr.id in namespace:
        return namespace[expr.id]
      return getattr(builtins, expr.id, None)
    if isinstance(expr, ast.Attribute):
      base = resolve(expr.value, scopes)
      return None if base in (None, "held") else getattr(base, expr.attr, None)
    return None

  def visit(node, scopes):
    nonlocal count
    for child in ast.iter_child_nodes(node):
      inner = (
        scopes + [child]
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        else scopes
      )
      where = getattr(inner[-1], "name", "<lambda>") if inner else "<module>"
      if isinstance(child, ast.Assert):
        problems.append((where, "assert", "an assert statement raises AssertionError"))
      if isinstance(child, ast.Raise) and child.exc is not None:
        count += 1
        called = isinstance(child.exc, ast.Call)
        target = child.exc.func if called else child.exc
        label = ast.unparse(target)
        obj = resolve(target, inner)
        if obj == "held" and not called:
          pass
        elif isinstance(obj, type):
          if obj not in ERROR_CLASSES:
            problems.append((where, label, f"{obj.__qualname__} is not defined in _errors.py"))
        elif called and inspect.isfunction(obj):
          returned = inspect.get_annotations(obj, eval_str=True).get("return")
          if returned not in ERROR_CLASSES:
            problems.append((where, label, f"returns {returned!r}, not an _errors class"))
        else:
          problems.append((where, label, "cannot tell what this raises"))
      elif isinstance(child, ast.Raise):
        count += 1  # A bare re-raise.
      visit(child, inner)

  visit(tree, [])
  return count, problems


def test_every_raise_is_a_jaxckpt_error():
  unexplained, used, total = [], set(), 0
  for file in sorted(PACKAGE.glob("*.py")):
    module = importlib.import_module(
      f"jaxckpt.{file.stem}" if file.stem != "__init__" else "jaxckpt"
    )
    count, problems = _raise_problems(file.read_text(), vars(module))
    total += count
    for where, label, problem in problems:
      key = (file.stem, where, label)
      if key in ALLOWED:
        used.add(key)
      else:
        unexplained.append(f"{file.name}: {where}: raise {label}: {problem}")
  assert not unexplained, "\n".join(unexplained)
  assert used == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - used}"
  assert total > 90  # The walk found the raises (106 today).


_GOOD = """
import json
from jaxckpt._errors import TreeError
from jaxckpt import _errors

def make() -> TreeError:
  return TreeError("x")

def f(x):
  from jaxckpt._errors import InvalidPathError
  try:
    json.loads(x)
  except ValueError as e:
    if x:
      raise
    if not x:
      raise e
    raise TreeError("bad") from e
  errors = [TreeError("y")]
  first = errors[0]
  if x:
    raise first
  if not x:
    raise _errors.SaveError("z")
  if x is None:
    raise make()
  raise InvalidPathError("p")
"""


@pytest.mark.parametrize(
  "bad",
  [
    "raise ValueError('x')",
    "raise KeyError",
    "raise RuntimeError('x') from None",
    "raise json.JSONDecodeError('x', '', 0)",
    "raise bad_factory()",
    "raise unknown_name('x')",
    "e = OSError('x')\n  raise e",
    "assert x, 'x'",
  ],
)
def test_the_raise_check_flags_what_it_should(bad):
  def check(source):
    namespace = {}
    exec(compile(source, "<test>", "exec"), namespace)
    return _raise_problems(source, namespace)

  assert check(_GOOD) == (7, [])
  count, problems = check(
    _GOOD + "\ndef bad_factory() -> ValueError:\n  ...\n\ndef g(x):\n  " + bad + "\n"
  )
  assert [where for where, _, _ in problems] == ["g"]
