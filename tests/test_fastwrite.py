"""The save fast path (_fastwrite.py) writes what Orbax writes, and Orbax still reads it."""

import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

import jaxckpt
from jaxckpt import _fastwrite
from jaxckpt import _staging
from jaxckpt._tree import Leaf
from jaxckpt._tree import nest


def _snapshot():
  mesh = jax.make_mesh((4,), ("x",))
  grid = jax.make_mesh((2, 2), ("a", "b"))
  return {
    "t/a": jnp.arange(8.0).reshape(4, 2),
    "t/sharded": jax.device_put(
      jnp.arange(64.0).reshape(16, 4), jax.NamedSharding(mesh, jax.P("x"))
    ),
    "t/replicated": jax.device_put(
      jnp.arange(8, dtype=jnp.int32), jax.NamedSharding(grid, jax.P("a"))
    ),
    "t/bf16": jnp.ones((5,), jnp.bfloat16),
    "t/numpy": np.arange(6, dtype=np.int64).reshape(2, 3),
    "t/int": 5,
    "t/float": 2.5,
    "t/bool": True,
  }


def _entries(state_dir):
  base = ts.KvStore.open(f"file://{state_dir}/").result()
  manifest = ts.ocdbt.dump(base).result()
  latest = max(manifest["versions"], key=lambda v: v["generation_number"])
  node = ts.ocdbt.dump(base, latest["root"]["location"]).result()
  config = dict(manifest["config"])
  config.pop("uuid")
  return {e["key"]: e.get("inline_value") for e in node["entries"]}, config


def _json(path):
  with open(path) as f:
    data = json.load(f)
  for key in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
    data.pop(key, None)
  if "array_metadatas" in data:
    data["array_metadatas"].sort(key=lambda m: m["array_metadata"]["param_name"])
  return data


def _packed(snapshot):
  """``snapshot`` as an async save hands it over: small one-device arrays packed."""
  names = [n for n, v in snapshot.items() if isinstance(v, jax.Array)]
  copies, _ = _staging.StagingPool().copy([snapshot[n] for n in names], pack=True)
  packed = dict(snapshot)
  packed.update((n, c) for n, c in zip(names, copies, strict=True) if c is not None)
  assert sum(isinstance(v, _staging.Packed) for v in packed.values()) == 2  # t/a, t/bf16
  return packed


def _writes_all(values: dict) -> bool:
  return _fastwrite.writes_all([Leaf(name, value) for name, value in values.items()])


@pytest.mark.parametrize(
  "chunk_byte_size, commit_bytes, packed",
  [(None, None, False), (64, None, False), (None, 1, False), (None, None, True)],
)
def test_writes_what_orbax_writes(tmp_path, monkeypatch, chunk_byte_size, commit_bytes, packed):
  if commit_bytes is not None:  # One OCDBT commit per array: the same final database.
    monkeypatch.setattr(_fastwrite, "COMMIT_BYTES", commit_bytes)
  snapshot = _snapshot()
  written = _packed(snapshot) if packed else snapshot
  assert _writes_all(written)
  _fastwrite.start(
    str(tmp_path / "fast" / "state"), written, chunk_byte_size=chunk_byte_size
  ).wait()
  save_args = (
    None
    if chunk_byte_size is None
    else jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_byte_size), nest(snapshot))
  )
  handler = ocp.CompositeCheckpointHandler(state=ocp.PyTreeCheckpointHandler(use_compression=False))
  with ocp.Checkpointer(handler) as orbax:
    orbax.save(
      tmp_path / "orbax",
      args=ocp.args.Composite(state=ocp.args.PyTreeSave(nest(snapshot), save_args=save_args)),
    )
  for name in (
    "_CHECKPOINT_METADATA",
    "state/_METADATA",
    "state/_sharding",
    "state/array_metadatas/process_0",
  ):
    assert _json(tmp_path / "fast" / name) == _json(tmp_path / "orbax" / name), name
  fast, fast_config = _entries(tmp_path / "fast" / "state")
  orbax, orbax_config = _entries(tmp_path / "orbax" / "state")
  assert fast_config == orbax_config
  assert sorted(fast) == sorted(orbax)
  for key in fast:
    if key.endswith(b"/.zarray"):
      assert json.loads(fast[key]) == json.loads(orbax[key]), key


@pytest.mark.parametrize("enable_async", [False, True])  # Async: small arrays packed.
def test_orbax_restores_it_without_a_target(tmp_path, enable_async):
  snapshot = _snapshot()
  path = jaxckpt.Checkpoint(**nest(snapshot)).save(
    tmp_path / "c", options=jaxckpt.CheckpointOptions(enable_async=enable_async)
  )
  path.future.result(timeout=60)
  assert not os.path.exists(os.path.join(path, "state", "ocdbt.process_0"))  # Fast path.
  restored = ocp.StandardCheckpointer().restore(f"{path}/state")["t"]
  for name, value in snapshot.items():
    got = restored[name.split("/")[1]]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(value))
    if isinstance(value, jax.Array):
      assert got.sharding == value.sharding
    else:
      assert type(got) is type(value) or isinstance(got, np.ndarray)


@pytest.mark.parametrize(
  "options, why",
  [
    (jaxckpt.CheckpointOptions(compression=True), "compression"),
    (jaxckpt.CheckpointOptions(incremental=True), "incremental"),
  ],
)
def test_other_saves_go_through_orbax(tmp_path, options, why):
  del why
  value = jnp.arange(16.0)
  path = jaxckpt.Checkpoint(w=value).save(tmp_path / "c", options)
  assert os.path.isdir(os.path.join(path, "state", "ocdbt.process_0"))  # Orbax's layout.
  target = jaxckpt.Checkpoint(w=jnp.zeros(16))
  target.restore(path).assert_consumed()
  np.testing.assert_array_equal(target.w, value)


def test_numpy_scalars_and_keys(tmp_path):
  tree = {"scalar": np.float32(1.5), "key": jax.random.key(7), "x": jnp.ones(3)}
  assert not _writes_all({"a": np.float32(1.5)})
  ckpt = jaxckpt.Checkpoint(t=tree)
  path = ckpt.save(tmp_path / "c")
  target = jaxckpt.Checkpoint(
    t={"scalar": np.float32(0), "key": jax.random.key(0), "x": jnp.zeros(3)}
  )
  target.restore(path).assert_consumed()
  assert target.t["scalar"] == np.float32(1.5)
  np.testing.assert_array_equal(
    jax.random.key_data(target.t["key"]), jax.random.key_data(tree["key"])
  )


def test_empty_arrays_and_other_dtypes_go_through_orbax(tmp_path):
  import ml_dtypes

  for value in (jnp.zeros((0, 3)), np.zeros((2, 0)), jnp.ones(4, ml_dtypes.float8_e4m3fn)):
    assert not _writes_all({"v": value})
  tree = {"f8": jnp.arange(4.0).astype(ml_dtypes.float8_e4m3fn), "x": jnp.arange(3.0)}
  for enable_async in (False, True):  # The plan sends the whole save to Orbax: none packed.
    path = jaxckpt.Checkpoint(t=tree).save(
      tmp_path / f"c{enable_async}", options=jaxckpt.CheckpointOptions(enable_async=enable_async)
    )
    path.future.result(timeout=60)
    assert os.path.isdir(os.path.join(path, "state", "ocdbt.process_0"))  # Orbax wrote it.
    target = jaxckpt.Checkpoint(t={"f8": jnp.zeros(4, ml_dtypes.float8_e4m3fn), "x": jnp.zeros(3)})
    target.restore(path).assert_consumed()
    np.testing.assert_array_equal(np.asarray(target.t["f8"], np.float32), np.arange(4.0))
    np.testing.assert_array_equal(target.t["x"], np.arange(3.0))
    restored = ocp.StandardCheckpointer().restore(f"{path}/state")["t"]
    assert isinstance(restored["x"], jax.Array)  # Recorded as the jax.Array it was.
  # Orbax refuses zero-size arrays: the manifest records them, state/ does not hold them.
  path = jaxckpt.Checkpoint(t={"empty": jnp.zeros((0, 3)), "x": jnp.ones(2)}).save(tmp_path / "e")
  assert set(ocp.StandardCheckpointer().restore(f"{path}/state")["t"]) == {"x"}


def test_a_save_orbax_refuses_early_leaves_no_thread_behind(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):  # As Orbax refuses a zero-size array, inside its save.
    raise ValueError("Cannot save this array")

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "serialize", refuse)
  with pytest.raises(jaxckpt.SaveError, match="Cannot save this array"):
    jaxckpt.Checkpoint(t={"x": jnp.ones(3)}).save(
      tmp_path / "e", options=jaxckpt.CheckpointOptions(compression=True)
    )
  # No non-daemon Orbax thread is left behind that would hold up exit.
  lingering = [t.name for t in threading.enumerate() if not t.daemon and t.name != "MainThread"]
  assert not lingering


def test_data_split_over_several_files_reads_back(tmp_path, monkeypatch, no_orbax_reads):
  # Data files of ~TARGET_DATA_FILE_SIZE (smaller here) are written and fsynced
  # concurrently; both readers (jaxckpt's fast path and Orbax) must find every chunk.
  # The arrays are also committed in batches (COMMIT_BYTES): here one per array.
  monkeypatch.setattr(_fastwrite, "TARGET_DATA_FILE_SIZE", 64 << 10)
  monkeypatch.setattr(_fastwrite, "COMMIT_BYTES", 1)
  rng = np.random.default_rng(0)
  state = {f"w{i}": jnp.asarray(rng.standard_normal((128, 256), np.float32)) for i in range(6)}
  path = jaxckpt.Checkpoint(state=state).save(tmp_path / "c")
  data_files = os.listdir(os.path.join(path, "state", "d"))
  assert len(data_files) >= 6, data_files  # 128 KiB per array, 64 KiB target.
  base = ts.KvStore.open(f"file://{path}/state/").result()
  versions = ts.ocdbt.dump(base).result()["versions"]
  assert len(versions) >= 3, versions  # One transaction would make 2.

  target = jaxckpt.Checkpoint(state={k: jnp.zeros_like(v) for k, v in state.items()})
  target.restore(path).assert_consumed()  # Fast path only (no_orbax_reads).
  by_orbax = ocp.StandardCheckpointer().restore(f"{path}/state")["state"]
  for name, value in state.items():
    np.testing.assert_array_equal(np.asarray(target.state[name]), np.asarray(value))
    np.testing.assert_array_equal(np.asarray(by_orbax[name]), np.asarray(value))
