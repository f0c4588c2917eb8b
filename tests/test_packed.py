"""Small arrays packed into Orbax's aggregate file (_packed.py): jaxckpt and Orbax read them."""

import json
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint import msgpack_utils

import jaxckpt
from jaxckpt import _knobs
from jaxckpt import _manifest
from jaxckpt import _packed
from jaxckpt._cli import main

PACK = jaxckpt.CheckpointOptions(pack_small_arrays=True)


def _state():
  return {
    "layers": [
      {"w": jnp.arange(12.0).reshape(3, 4) + i, "b": jnp.arange(4, dtype=jnp.int32) - i}
      for i in range(3)
    ],
    "half": jnp.linspace(0, 1, 7).astype(jnp.bfloat16),
    "host": np.arange(10, dtype=np.int16),
    "zero_d": jnp.float32(2.5),
    "flags": np.array([True, False, True]),
    "big": jnp.arange((_packed.MAX_BYTES // 4) + 1, dtype=jnp.float32),  # One over: not packed.
    "step": 7,  # Python scalars keep Orbax's scalar type: not packed.
    "name": "run-1",  # In the manifest.
  }


def _zeros(state):
  return jax.tree.map(
    lambda x: (jnp if isinstance(x, jax.Array) else np).zeros_like(x) if hasattr(x, "dtype") else x,
    state,
  )


def _bits(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _saved(tmp_path, options=PACK):
  state = _state()
  path = jaxckpt.Checkpoint(model=state).write(str(tmp_path / "ckpt"), options=options)
  return state, path


def test_packed_save_restores_bit_exactly_without_orbax(tmp_path, no_orbax_reads):
  state, path = _saved(tmp_path)
  manifest = _manifest.read_manifest(path)
  assert manifest.version == 3
  assert manifest.packed == {
    *(f"model/layers/{i}/{k}" for i in range(3) for k in "wb"),
    "model/half",
    "model/host",
    "model/zero_d",
    "model/flags",
  }
  assert os.path.isfile(os.path.join(path, "state", "checkpoint"))
  ckpt = jaxckpt.Checkpoint(model=_zeros(state))
  ckpt.read(path).assert_consumed()
  got = ckpt.model
  for i in range(3):
    for k in "wb":
      assert _bits(got["layers"][i][k], state["layers"][i][k])
      assert isinstance(got["layers"][i][k], jax.Array)
  for k in ("half", "host", "zero_d", "flags", "big"):
    assert _bits(got[k], state[k]), k
  assert isinstance(got["host"], np.ndarray) and got["step"] == 7 and got["name"] == "run-1"


def test_orbax_reads_the_packed_file_itself(tmp_path):
  state, path = _saved(tmp_path)
  state_dir = os.path.join(path, _knobs.STATE_ITEM)
  # Orbax's own msgpack reader:
  aggregate = msgpack_utils.msgpack_restore(Path(state_dir, "checkpoint").read_bytes())
  assert _bits(aggregate["model"]["half"], state["half"])
  assert aggregate["model"]["half"].dtype == ml_dtypes.bfloat16
  assert set(aggregate["model"]) == {"layers", "half", "host", "zero_d", "flags"}

  restored = ocp.PyTreeCheckpointer().restore(state_dir)["model"]
  assert _bits(restored["layers"]["2"]["w"], state["layers"][2]["w"])
  assert _bits(restored["big"], state["big"]) and int(restored["step"]) == 7

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {
    "model": {
      "layers": {
        str(i): {
          k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in layer.items()
        }
        for i, layer in enumerate(state["layers"])
      },
      **{
        k: jax.ShapeDtypeStruct(np.shape(state[k]), state[k].dtype, sharding=device)
        for k in ("half", "host", "zero_d", "flags", "big")
      },
      "step": 0,
    }
  }
  standard = ocp.StandardCheckpointer().restore(state_dir, abstract)["model"]
  assert isinstance(standard["layers"]["0"]["b"], jax.Array)
  assert _bits(standard["layers"]["0"]["b"], state["layers"][0]["b"])
  assert _bits(standard["half"], state["half"])


def test_orbax_reads_the_rest_beside_the_packed_file(tmp_path):
  # With an I/O device Orbax reads the arrays that are not packed; the packed
  # file must not send it down its legacy path, which has no partial restore.
  state, path = _saved(tmp_path)
  ckpt = jaxckpt.Checkpoint(model=_zeros(state))
  options = jaxckpt.CheckpointOptions(experimental_io_device="/job:localhost")
  ckpt.read(path, options=options).assert_consumed()
  assert _bits(ckpt.model["big"], state["big"])
  assert _bits(ckpt.model["layers"][1]["w"], state["layers"][1]["w"])


def test_one_array_is_read_from_the_middle_of_the_file(tmp_path, no_orbax_reads):
  state, path = _saved(tmp_path)
  reader = jaxckpt.load_checkpoint(path)
  assert _bits(reader.get_tensor("model/layers/1/b"), state["layers"][1]["b"])
  assert _bits(reader.get_tensor("model/half"), state["half"])


def test_target_less_and_partial_orbax_restores_are_orbax_s_limits(tmp_path):
  # Documented in the README and CheckpointOptions: Orbax's metadata has no
  # shapes for aggregated arrays, so it cannot build the restore arguments.
  state, path = _saved(tmp_path)
  state_dir = os.path.join(path, "state")
  with pytest.raises(ValueError, match="Unsupported value_metadata"):
    ocp.StandardCheckpointer().restore(state_dir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  big = {"model": {"big": jax.ShapeDtypeStruct(state["big"].shape, jnp.float32, sharding=device)}}
  args = ocp.args.PyTreeRestore(
    item=big,
    restore_args={"model": {"big": ocp.ArrayRestoreArgs(sharding=device)}},
    partial_restore=True,
  )
  with pytest.raises(ValueError, match="pytree structure"):  # Nor its partial restore.
    ocp.PyTreeCheckpointer().restore(state_dir, args=args)


@pytest.mark.parametrize(
  "options, packs",
  [
    (jaxckpt.CheckpointOptions(), False),  # Fewer than MIN_ARRAYS small arrays.
    (jaxckpt.CheckpointOptions(pack_small_arrays=False), False),
    (jaxckpt.CheckpointOptions(pack_small_arrays=True, compression=True), False),
    (jaxckpt.CheckpointOptions(pack_small_arrays=True, chunk_byte_size=1 << 12), False),
    (jaxckpt.CheckpointOptions(pack_small_arrays=True, incremental=True), False),
  ],
)
def test_when_arrays_are_packed(tmp_path, options, packs):
  state, path = _saved(tmp_path, options)
  assert bool(_manifest.read_manifest(path).packed) is packs
  assert os.path.exists(os.path.join(path, "state", "checkpoint")) is packs
  ckpt = jaxckpt.Checkpoint(model=_zeros(state))
  ckpt.read(path).assert_consumed()
  assert _bits(ckpt.model["layers"][2]["b"], state["layers"][2]["b"])


def test_the_default_packs_from_min_arrays_small_arrays_on(tmp_path, monkeypatch):
  monkeypatch.setattr(_packed, "MIN_ARRAYS", 4)
  few = {f"a{i}": jnp.full((8,), i) for i in range(3)}
  path = jaxckpt.Checkpoint(s=few).write(str(tmp_path / "few"))
  assert not _manifest.read_manifest(path).packed
  many = {**few, "a3": jnp.zeros((8,)), "big": jnp.zeros((_packed.MAX_BYTES // 4 + 1,))}
  path = jaxckpt.Checkpoint(s=many).write(str(tmp_path / "many"))
  assert _manifest.read_manifest(path).packed == {f"s/a{i}" for i in range(4)}
  assert _manifest.read_manifest(path).version == 3
  assert _manifest.read_manifest(jaxckpt.Checkpoint(s=few).write(str(tmp_path / "v2"))).version == 2


def test_the_option_is_checked():
  with pytest.raises(jaxckpt.JaxckptError, match="pack_small_arrays must be a bool or None"):
    jaxckpt.CheckpointOptions(pack_small_arrays="yes")
  assert "pack_small_arrays=True" in repr(PACK)


def _packed_file(path):
  return os.path.join(path, "state", "checkpoint")


def _restore_error(path, state):
  ckpt = jaxckpt.Checkpoint(model=_zeros(state))
  with pytest.raises(jaxckpt.CorruptCheckpointError) as error:
    ckpt.read(path)
  return str(error.value)


def test_a_truncated_or_missing_file_is_corrupt(tmp_path):
  state, path = _saved(tmp_path)
  file = _packed_file(path)
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) - 1)
  assert "packed arrays take" in _restore_error(path, state) and "checkpoint" in file
  os.remove(file)
  assert "cannot be opened" in _restore_error(path, state)


def test_a_changed_header_byte_names_the_array(tmp_path):
  state, path = _saved(tmp_path)
  file = _packed_file(path)
  data = bytearray(Path(file).read_bytes())
  at = data.find(b"bfloat16")  # model/half's dtype name.
  data[at] ^= 0x20
  Path(file).write_bytes(bytes(data))
  message = _restore_error(path, state)
  assert "'model/half'" in message and "header" in message


def test_a_changed_data_byte_fails_its_crc(tmp_path):
  state, path = _saved(tmp_path)
  file = _packed_file(path)
  data = bytearray(Path(file).read_bytes())
  needle = np.asarray(state["layers"][2]["w"]).tobytes()
  data[data.find(needle) + 5] ^= 0xFF
  Path(file).write_bytes(bytes(data))
  assert "model/layers/2/w" in _restore_error(path, state)
  assert main(["verify", path]) == 1


def test_a_fifo_in_place_of_the_file_is_refused_not_waited_on(tmp_path):
  state, path = _saved(tmp_path)
  os.remove(_packed_file(path))
  os.mkfifo(_packed_file(path))
  assert "not a regular file" in _restore_error(path, state)


def _resealed(path, edit):
  file = os.path.join(path, _manifest.MANIFEST_KEY)
  body = json.loads(Path(file).read_bytes())
  edit(body)
  Path(file).write_bytes(_manifest.seal(body))


@pytest.mark.parametrize(
  "edit",
  [
    lambda body: body["leaves"]["model/half"].update(packed="yes"),
    lambda body: body["leaves"]["model/half"].update(source="../other"),
  ],
)
def test_a_manifest_s_packed_field_is_checked(tmp_path, edit):
  state, path = _saved(tmp_path)
  _resealed(path, edit)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="packed"):
    jaxckpt.load_checkpoint(path)


def test_a_manifest_naming_clashing_packed_arrays_is_corrupt(tmp_path):
  state, path = _saved(tmp_path)

  def clash(body):  # "model/half" as a leaf and as the parent of another packed leaf.
    body["leaves"]["model/half/x"] = {**body["leaves"]["model/host"]}

  _resealed(path, clash)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="model/half"):
    jaxckpt.load_checkpoint(path).get_tensor("model/host")


def test_incremental_saves_after_a_packed_one_do_not_refer_to_its_file(tmp_path):
  state = _state()
  ckpt = jaxckpt.Checkpoint(model=state)
  manager = jaxckpt.CheckpointManager(ckpt, str(tmp_path), max_to_keep=1)
  first = manager.save(options=PACK)
  packed = _manifest.read_manifest(first).packed
  assert packed
  second = manager.save(options=jaxckpt.CheckpointOptions(incremental=True))
  assert _manifest.read_manifest(second).sources.keys().isdisjoint(packed)
  ckpt.model["big"] = ckpt.model["big"] + 1  # Written again; the rest reused from `second`.
  third = manager.save(options=jaxckpt.CheckpointOptions(incremental=True))
  state["big"] = ckpt.model["big"]
  sources = _manifest.read_manifest(third).sources
  assert packed <= sources.keys() and set(sources.values()) == {"../ckpt-2"}
  assert not os.path.exists(first)  # Nothing refers to it: swept.
  restored = jaxckpt.Checkpoint(model=_zeros(state))
  restored.read(third).assert_existing_objects_matched()
  assert _bits(restored.model["layers"][0]["w"], state["layers"][0]["w"])


def test_inspect_says_which_arrays_are_packed(tmp_path, capsys):
  _, path = _saved(tmp_path)
  assert main(["inspect", "--json", path]) == 0
  rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["arrays"]}
  assert rows["model/half"]["sharding"] == "packed (state/checkpoint)"
  assert rows["model/big"]["sharding"].startswith("single device")
  assert main(["verify", path]) == 0


def test_a_failed_packed_write_fails_the_save_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  state = _state()
  ckpt = jaxckpt.Checkpoint(model=state)
  first = ckpt.save(str(tmp_path / "ckpt"), options=PACK)

  def full(path, pieces):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(_packed, "_write_file", full)
  with pytest.raises(jaxckpt.SaveError, match="No space left"):
    ckpt.save(str(tmp_path / "ckpt"), options=PACK)
  assert jaxckpt.latest_checkpoint(str(tmp_path)) == first
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1"]
  restored = jaxckpt.Checkpoint(model=_zeros(state))
  restored.read(first).assert_existing_objects_matched()
  assert _bits(restored.model["half"], state["half"])


def test_a_huge_shape_in_a_resealed_manifest_is_refused_before_allocating(tmp_path):
  state, path = _saved(tmp_path)
  _resealed(path, lambda body: body["leaves"]["model/host"].update(shape=[1 << 40]))
  reader = jaxckpt.load_checkpoint(path)
  for name in ("model/host", "model/half"):  # The array itself, or another in the file.
    with pytest.raises(jaxckpt.CorruptCheckpointError, match="too big to pack"):
      reader.get_tensor(name)
  _resealed(path, lambda body: body["leaves"]["model/host"].update(shape=[1 << 20]))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="packed arrays take"):
    jaxckpt.load_checkpoint(path).get_tensor("model/half")


def test_a_state_of_packed_arrays_only_has_no_ocdbt_database_and_orbax_reads_it(tmp_path):
  state = {"a": jnp.arange(4.0), "b": np.ones(3, np.int8)}
  path = jaxckpt.Checkpoint(m=state).write(str(tmp_path / "c"), options=PACK)
  assert sorted(os.listdir(os.path.join(path, "state"))) == ["_METADATA", "checkpoint"]
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(path, "state"))["m"]
  assert _bits(restored["a"], state["a"]) and _bits(restored["b"], state["b"])
  reader = jaxckpt.load_checkpoint(path)
  assert _bits(reader.get_tensor("m/a"), state["a"])


def test_no_writer_thread_outlives_its_save(tmp_path):
  # The writer is joined before the commit: a thread still exiting after the
  # save would make thread counts (and interpreter exit) racy.
  state = _state()
  ckpt = jaxckpt.Checkpoint(model=state)
  ckpt.write(str(tmp_path / "sync"), options=PACK)
  ckpt.write(
    str(tmp_path / "async"),
    options=jaxckpt.CheckpointOptions(enable_async=True, pack_small_arrays=True),
  ).future.result()
  assert [t for t in threading.enumerate() if t.name == "jaxckpt-packed"] == []
