"""Reading TensorFlow's own checkpoints without TensorFlow.

The fixtures under tests/fixtures/tf/ were written by tensorflow-cpu (see
make_fixtures.py there), which also recorded what ``tf.train.load_checkpoint``
returned for every key (expected.json, expected.npz). TensorFlow is not
imported here, nor by jaxckpt.
"""

import base64
import json
import os
import pathlib
import shutil
import struct
import sys

import google_crc32c
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _cli
from jaxckpt import _tfbundle
from jaxckpt import _tfcheckpoint
from jaxckpt._tree import flatten_items

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "tf"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
ARRAYS = dict(np.load(FIXTURES / "expected.npz"))
CHECKPOINTS = sorted(EXPECTED["checkpoints"])
KERNEL = "net/l1/kernel/.ATTRIBUTES/VARIABLE_VALUE"


def _expected(checkpoint: str, key: str) -> np.ndarray:
  return ARRAYS[EXPECTED["checkpoints"][checkpoint][key]["npz"]]


def _copy(tmp_path, name: str) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


# -- reading: every value as TF read it ---------------------------------------------


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_every_value_matches_what_tensorflow_read(checkpoint):
  reader = jaxckpt.load_checkpoint(FIXTURES / checkpoint)
  recorded = EXPECTED["checkpoints"][checkpoint]
  assert sorted(reader.get_variable_to_shape_map().items()) == sorted(
    (k, v["shape"]) for k, v in recorded.items()
  )
  dtypes = reader.get_variable_to_dtype_map()
  for key, want in recorded.items():
    assert reader.entry(key).dtype_name == want["dtype"], key
    if "error" in want:  # A variant: TF could not convert it either.
      with pytest.raises(jaxckpt.UnsupportedTensorError, match="variant"):
        reader.get_tensor(key)
      continue
    value = reader.get_tensor(key)
    assert value.shape == tuple(want["shape"]), key
    if "strings" in want:
      assert dtypes[key] == np.dtype(object)
      assert [base64.b64encode(s).decode() for s in value.reshape(-1)] == want["strings"]
    else:
      assert value.dtype.name == want["dtype"] == dtypes[key].name, key
      assert value.tobytes() == _expected(checkpoint, key).tobytes(), key  # Bit-exact.
  assert "tensorflow" not in sys.modules


def test_bfloat16_and_half_precision_values():
  reader = jaxckpt.load_checkpoint(FIXTURES / "dtypes" / "dtypes")
  bf16 = reader.get_tensor("bf16/.ATTRIBUTES/VARIABLE_VALUE")
  assert bf16.dtype == ml_dtypes.bfloat16
  assert bf16.astype(np.float32).tolist()[:3] == [1.5, -2.0, 3.140625]
  assert reader.get_tensor("word/.ATTRIBUTES/VARIABLE_VALUE") == np.array(b"scalar", object)
  assert reader.get_tensor("u64/.ATTRIBUTES/VARIABLE_VALUE").tolist() == [2**64 - 1]


def test_partitioned_variables_are_reassembled():
  # TF1's partitioner (3 row slices, 2 column slices) and TF2's shard-size policy (10 slices
  # of `b` over 6 data files): the whole tensors, under their own names only.
  reader = jaxckpt.load_checkpoint(FIXTURES / "partitioned")
  assert jaxckpt.list_variables(FIXTURES / "partitioned") == [
    ("dense/bias", [4]),
    ("emb", [7, 3]),
    ("wide", [2, 5]),
  ]
  assert len(reader.entry("emb").slices) == 3 and len(reader.entry("wide").slices) == 2
  sharded = jaxckpt.load_checkpoint(FIXTURES / "sharded" / "two")
  assert sharded.bundle.num_shards == 6 and len(
    sharded.entry("b/.ATTRIBUTES/VARIABLE_VALUE").slices
  )
  assert sharded.get_tensor("b/.ATTRIBUTES/VARIABLE_VALUE").tolist() == list(range(40))


@pytest.mark.parametrize("directory", sorted(EXPECTED["latest"]))
def test_a_directory_resolves_through_tfs_state_file(directory):
  latest = EXPECTED["latest"][directory]
  if latest is None:  # Written by Checkpoint.write: no state file.
    with pytest.raises(jaxckpt.CheckpointNotFoundError):
      jaxckpt.load_checkpoint(FIXTURES / directory)
    return
  assert jaxckpt.load_checkpoint(FIXTURES / directory).path == str(FIXTURES / latest)


@pytest.mark.parametrize("named", ["../elsewhere/ckpt-3", "/tmp/ckpt-3", "sub/../../x/ckpt-3"])
def test_a_state_file_never_leads_outside_its_directory(tmp_path, named):
  directory = _copy(tmp_path, "guide")
  elsewhere = shutil.copytree(directory, tmp_path / "elsewhere")
  (directory / "checkpoint").write_text(f'model_checkpoint_path: "{named}"\n')
  with pytest.raises(jaxckpt.NotACheckpointError, match="outside that directory"):
    jaxckpt.load_checkpoint(directory)
  with pytest.raises(jaxckpt.NotACheckpointError, match="outside that directory"):
    jaxckpt.Checkpoint(step=0).restore(directory)
  assert jaxckpt.load_checkpoint(pathlib.Path(elsewhere) / "ckpt-3").save_counter == 3


def test_a_state_file_naming_a_deleted_checkpoint(tmp_path):
  directory = _copy(tmp_path, "guide")
  (directory / "ckpt-3.index").unlink()
  with pytest.raises(jaxckpt.CheckpointNotFoundError, match="ckpt-3"):
    jaxckpt.load_checkpoint(directory)
  assert jaxckpt.load_checkpoint(directory / "ckpt-2").save_counter == 2


# -- restoring onto JAX pytrees -----------------------------------------------------


def _guide_port():
  """The guide's Net (one Dense(5) layer on 1 input) as a JAX pytree."""
  net = {"l1": {"kernel": jnp.zeros((1, 5)), "bias": jnp.zeros(5)}}
  return jaxckpt.Checkpoint(step=jnp.array(0, jnp.int32), net=net)


def test_a_jax_port_of_the_guide_restores_net(tmp_path):
  ckpt = _guide_port()
  status = ckpt.restore(FIXTURES / "guide").assert_existing_objects_matched()
  assert status.matched == {"step", "net/l1/kernel", "net/l1/bias"}
  got = ckpt.net["l1"]["kernel"]
  assert isinstance(got, jax.Array) and got.dtype == jnp.float32
  assert np.asarray(got).tobytes() == _expected("guide/ckpt-3", KERNEL).tobytes()
  assert int(ckpt.step) == _expected("guide/ckpt-3", "step/.ATTRIBUTES/VARIABLE_VALUE")
  assert ckpt.save_counter == 3  # TF's save_counter; the next save is number 4.
  with pytest.raises(jaxckpt.LoadStatusError, match="ITERATOR_STATE.*optimizer/m/net/l1/bias"):
    status.assert_consumed()
  status.expect_partial()
  assert ckpt.save(tmp_path / "ckpt").endswith("ckpt-4")
  assert jaxckpt.load_checkpoint(tmp_path).get_tensor("net/l1/kernel").tobytes() == (
    np.asarray(got).tobytes()
  )


def test_optimizer_slots_are_reachable_by_name():
  like = {"l1": {"kernel": np.zeros((1, 5), np.float32), "bias": np.zeros(5, np.float32)}}
  ckpt = jaxckpt.Checkpoint(optimizer={"m": {"net": like}, "v": {"net": like}, "iter": 0})
  status = ckpt.restore(FIXTURES / "guide" / "ckpt-2").assert_existing_objects_matched()
  slot = "net/l1/kernel/.OPTIMIZER_SLOT/optimizer/v/.ATTRIBUTES/VARIABLE_VALUE"
  assert ckpt.optimizer["v"]["net"]["l1"]["kernel"].tobytes() == (
    _expected("guide/ckpt-2", slot).tobytes()
  )
  assert ckpt.optimizer["iter"] == _expected(
    "guide/ckpt-2", "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE"
  )
  assert isinstance(ckpt.optimizer["iter"], int)
  assert "net/l1/kernel" in status.unused
  reader = jaxckpt.load_checkpoint(FIXTURES / "guide")
  assert reader.tracked_names()[slot] == "optimizer/v/net/l1/kernel"


def test_keras_weights_restore_with_a_name_map():
  def to_layers(name):
    return "model/" + name.replace("layer_with_weights-", "layers/")

  model = {
    "layers": [
      {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
      {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
    ]
  }
  ckpt = jaxckpt.Checkpoint(model=model)
  ckpt.read(FIXTURES / "keras_weights", name_map=to_layers).assert_consumed()
  key = "layer_with_weights-1/kernel/.ATTRIBUTES/VARIABLE_VALUE"
  got = np.asarray(ckpt.model["layers"][1]["kernel"])
  assert got.tobytes() == _expected("keras_weights/weights", key).tobytes()
  # None leaves a value out: it is reported unused, and nothing else changes.
  ckpt = jaxckpt.Checkpoint(model=model)
  status = ckpt.read(FIXTURES / "keras_weights", name_map=lambda n: None)
  assert not status.matched and key in status.unused
  with pytest.raises(jaxckpt.InvalidOptionsError, match="would restore into 'model/x'"):
    ckpt.read(FIXTURES / "keras_weights", name_map=lambda n: "model/x")


def test_name_map_is_for_tf_checkpoints(tmp_path):
  path = jaxckpt.Checkpoint(x=jnp.ones(2)).write(tmp_path / "c")
  with pytest.raises(jaxckpt.InvalidOptionsError, match="TensorFlow checkpoints"):
    jaxckpt.Checkpoint(x=jnp.ones(2)).read(path, name_map=str)


def test_restore_onto_a_sharding_template():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", None))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  ckpt = jaxckpt.Checkpoint(
    emb=jax.ShapeDtypeStruct((7, 3), jnp.float32, sharding=replicated),
    wide=jax.device_put(jnp.zeros((2, 5)), rows),
    dense={"bias": np.zeros(4, np.float32)},
  )
  ckpt.read(FIXTURES / "partitioned").assert_consumed()  # No save_counter: read, as in TF.
  for name, sharding in (("emb", replicated), ("wide", rows)):
    got = getattr(ckpt, name)
    assert isinstance(got, jax.Array) and got.sharding == sharding
    assert np.asarray(got).tobytes() == _expected("partitioned/model.ckpt", name).tobytes()
  assert len(ckpt.wide.addressable_shards) == 4 and ckpt.wide.addressable_shards[0].data.shape == (
    1,
    5,
  )
  assert isinstance(ckpt.dense["bias"], np.ndarray)


def test_dtypes_restore_and_cast_like_jaxckpt_checkpoints():
  ckpt = jaxckpt.Checkpoint(
    bf16=jnp.zeros(4, jnp.bfloat16), f16=jnp.zeros((2, 3), jnp.float32), i8=np.zeros(3, np.int8)
  )
  ckpt.read(FIXTURES / "dtypes" / "dtypes").assert_existing_objects_matched()
  assert ckpt.bf16.dtype == jnp.bfloat16 and float(ckpt.bf16[0]) == 1.5
  assert ckpt.f16.dtype == jnp.float32  # float16 → the tracked float32
  assert ckpt.i8.tolist() == [-128, 0, 127]
  with pytest.raises(jaxckpt.TreeError, match="casting float to int"):
    jaxckpt.Checkpoint(f32=np.zeros(3, np.int32)).read(FIXTURES / "dtypes" / "dtypes")
  with pytest.raises(jaxckpt.TreeError, match="string tensor"):
    jaxckpt.Checkpoint(text=np.zeros(4, np.uint8)).read(FIXTURES / "dtypes" / "dtypes")


def test_a_shape_mismatch_restores_nothing():
  ckpt = _guide_port()
  ckpt.net["l1"]["bias"] = jnp.zeros(6)
  with pytest.raises(jaxckpt.ShapeMismatchError, match=r"net/l1/bias.*\(5,\).*\(6,\)"):
    ckpt.restore(FIXTURES / "guide")
  assert not ckpt.net["l1"]["kernel"].any() and int(ckpt.step) == 0 and ckpt.save_counter == 0


# -- damaged files ------------------------------------------------------------------


_RESTART = struct.pack("<II", 0, 1)  # A block's restart array: one restart point, at 0.


def _write_index(path, pairs):
  """A TF-style table (one data block, one index block, footer) holding ``pairs``."""
  block = bytearray()
  for key, value in pairs:
    block += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
  block += _RESTART
  data = bytearray()

  def add(contents):
    offset = len(data)
    raw = bytes(contents) + b"\x00"
    data.extend(raw + struct.pack("<I", _tfbundle._crc_mask(google_crc32c.value(raw))))
    return _varint(offset) + _varint(len(contents))

  handle = add(block)
  last = pairs[-1][0]
  index = add(_varint(0) + _varint(len(last)) + _varint(len(handle)) + last + handle + _RESTART)
  metaindex = add(_RESTART)
  footer = (metaindex + index).ljust(40, b"\x00") + struct.pack("<Q", _tfbundle._TABLE_MAGIC)
  pathlib.Path(path).write_bytes(bytes(data) + footer)


def _varint(value):
  out = bytearray()
  while value >= 0x80:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  return bytes(out + bytes([value]))


def _edit_entry(prefix, key, **fields):
  """Rewrites ``prefix.index`` with ``key``'s BundleEntryProto fields changed."""
  pairs = _tfbundle.read_table(f"{prefix}.index")
  edited = []
  for k, v in pairs:
    if k == key.encode():
      entry = _tfbundle.proto("BundleEntryProto").FromString(v)
      for name, value in fields.items():
        setattr(entry, name, value)
      v = entry.SerializeToString()
    edited.append((k, v))
  _write_index(f"{prefix}.index", edited)


def test_the_table_writer_of_these_tests_writes_what_tf_reads(tmp_path):
  directory = _copy(tmp_path, "guide")
  _write_index(directory / "ckpt-3.index", _tfbundle.read_table(directory / "ckpt-3.index"))
  assert jaxckpt.load_checkpoint(directory).get_tensor(KERNEL).tobytes() == (
    _expected("guide/ckpt-3", KERNEL).tobytes()
  )


@pytest.mark.parametrize("cut", [1, 20, 48, 400])
def test_a_truncated_index_names_the_file(tmp_path, cut):
  index = _copy(tmp_path, "guide") / "ckpt-3.index"
  index.write_bytes(index.read_bytes()[:-cut])
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"index .*ckpt-3\.index.* damaged"):
    jaxckpt.load_checkpoint(index.parent)


def test_a_flipped_byte_in_the_index_fails_its_block_crc(tmp_path):
  index = _copy(tmp_path, "guide") / "ckpt-3.index"
  data = bytearray(index.read_bytes())
  data[40] ^= 0x01
  index.write_bytes(bytes(data))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="fails its CRC-32C"):
    jaxckpt.list_variables(index.parent)


def test_a_flipped_byte_in_a_data_shard_names_the_tensor(tmp_path):
  directory = _copy(tmp_path, "guide")
  reader = jaxckpt.load_checkpoint(directory)
  data = directory / "ckpt-3.data-00000-of-00001"
  raw = bytearray(data.read_bytes())
  raw[reader.entry(KERNEL).offset + 2] ^= 0x10
  data.write_bytes(bytes(raw))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=f"Tensor '{KERNEL}'.*CRC-32C"):
    reader.get_tensor(KERNEL)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=KERNEL):
    _guide_port().restore(directory)
  assert reader.get_tensor("net/l1/bias/.ATTRIBUTES/VARIABLE_VALUE").shape == (5,)
  assert _cli.main(["inspect", str(directory), "--values", "--json"]) == 0  # Row errors only.


@pytest.mark.parametrize(
  "fields, match",
  [
    ({"crc32c": 12345}, "fail their CRC-32C"),
    ({"size": 8}, "8 bytes stored for shape"),
    ({"offset": 10**6}, "ends 20 bytes short"),
    ({"shard_id": 3}, "shard 3 of 1 does not exist"),
  ],
)
def test_a_damaged_entry_names_the_tensor(tmp_path, fields, match):
  directory = _copy(tmp_path, "guide")
  _edit_entry(directory / "ckpt-3", KERNEL, **fields)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=f"Tensor '{KERNEL}'.*{match}"):
    jaxckpt.load_checkpoint(directory).get_tensor(KERNEL)


def test_a_damaged_string_tensor_names_it(tmp_path):
  directory = _copy(tmp_path, "dtypes")
  key = "text/.ATTRIBUTES/VARIABLE_VALUE"
  entry = jaxckpt.load_checkpoint(directory / "dtypes").entry(key)
  data = directory / "dtypes.data-00000-of-00001"
  raw = bytearray(data.read_bytes())
  raw[entry.offset + entry.size - 1] ^= 0x01  # The last string byte.
  data.write_bytes(bytes(raw))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=f"'{key}'.*strings fail"):
    jaxckpt.load_checkpoint(directory / "dtypes").get_tensor(key)
  raw[entry.offset] = 0x7F  # The first length: past the data.
  data.write_bytes(bytes(raw))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=f"'{key}'.*do not add up"):
    jaxckpt.load_checkpoint(directory / "dtypes").get_tensor(key)


def test_a_missing_data_shard_names_the_tensor_and_file(tmp_path):
  directory = _copy(tmp_path, "sharded")
  os.unlink(directory / "two.data-00003-of-00006")
  reader = jaxckpt.load_checkpoint(directory / "two")
  assert reader.get_tensor("a/.ATTRIBUTES/VARIABLE_VALUE").shape == (2, 3)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"b/\.ATTRIBUTES.*00003-of-00006"):
    reader.get_tensor("b/.ATTRIBUTES/VARIABLE_VALUE")


def test_a_missing_slice_is_corrupt(tmp_path):
  directory = _copy(tmp_path, "partitioned")
  prefix = directory / "model.ckpt"
  pairs = _tfbundle.read_table(f"{prefix}.index")
  dropped = _tfbundle.slice_key("emb", ((3, 2), (0, 3)))
  assert dropped in dict(pairs)  # slice_key encodes TF's keys.
  _write_index(f"{prefix}.index", [(k, v) for k, v in pairs if k != dropped])
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"'emb'.*slice 3,2:0,3 is not in"):
    jaxckpt.load_checkpoint(prefix).get_tensor("emb")


def test_a_fifo_instead_of_a_data_file_does_not_hang(tmp_path):
  directory = _copy(tmp_path, "keras_weights")
  data = directory / "weights.data-00000-of-00001"
  data.unlink()
  os.mkfifo(data)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="not a regular file"):
    jaxckpt.load_checkpoint(directory).get_tensor(
      "layer_with_weights-0/bias/.ATTRIBUTES/VARIABLE_VALUE"
    )


def test_signed_slice_key_numbers_match_tfs_ordered_code():
  # From TF's ordered_code.cc: 0x424242 → f0424242, -0x800 → 3800; one byte for [-64, 64).
  assert _tfbundle._signed_num_increasing(0x424242) == bytes.fromhex("f0424242")
  assert _tfbundle._signed_num_increasing(-0x800) == bytes.fromhex("3800")
  assert _tfbundle._signed_num_increasing(-1) == b"\x7f"
  assert _tfbundle._signed_num_increasing(63) == b"\xbf"
  assert _tfbundle._signed_num_increasing(64) == b"\xc0\x40"
  assert _tfbundle._signed_num_increasing(2**62) == bytes.fromhex("ffc04000000000000000")


# -- the command line ---------------------------------------------------------------


def test_cli_inspect_and_ls_on_tf_checkpoints(capsys):
  assert _cli.main(["inspect", str(FIXTURES / "guide"), "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["format"] == "tensorflow" and result["save_counter"] == 3
  rows = {r["name"]: r for r in result["arrays"]}
  assert sorted(rows) == sorted(EXPECTED["checkpoints"]["guide/ckpt-3"])
  assert rows[KERNEL]["restores_into"] == "net/l1/kernel" and rows[KERNEL]["dtype"] == "float32"
  assert _cli.main(["ls", str(FIXTURES / "guide"), "--json"]) == 0
  listed = json.loads(capsys.readouterr().out)
  assert [(os.path.basename(r["path"]), r["latest"]) for r in listed["checkpoints"]] == [
    ("ckpt-2", False),
    ("ckpt-3", True),
  ]
  assert listed["latest"] == str(FIXTURES / "guide" / "ckpt-3")
  assert _cli.main(["inspect", str(FIXTURES / "partitioned")]) == 0
  assert "3 slices" in capsys.readouterr().out


def test_cli_inspect_of_a_damaged_index_exits_1(tmp_path, capsys):
  # Exit 1: corrupt (2 is for missing or unreadable), as for jaxckpt's own checkpoints.
  index = _copy(tmp_path, "guide") / "ckpt-3.index"
  index.write_bytes(index.read_bytes()[:100])
  assert _cli.main(["inspect", str(index.parent)]) == 1
  assert "ckpt-3.index" in capsys.readouterr().err
  assert _cli.main(["ls", str(index.parent), "--json"]) == 1
  rows = json.loads(capsys.readouterr().out)["checkpoints"]
  assert [bool(r.get("error")) for r in rows] == [False, True]


@pytest.mark.parametrize(
  "extents, match",
  [
    (((0, 7), (1, -1)), "lies outside"),  # Length -1 (the whole dim) starts at 0.
    (((5, 3), (0, 3)), "lies outside"),
    (((0, 2),), "does not match shape"),
  ],
)
def test_a_slice_outside_its_tensor_is_corrupt(tmp_path, extents, match):
  directory = _copy(tmp_path, "partitioned")
  prefix = directory / "model.ckpt"
  entry = _tfbundle.proto("BundleEntryProto")()
  entry.dtype, entry.shape.dim.add().size, entry.shape.dim.add().size = 1, 7, 3
  extent = entry.slices.add()
  for start, length in extents:
    e = extent.extent.add(start=start)
    if length != -1:
      e.length = length
  pairs = dict(_tfbundle.read_table(f"{prefix}.index"))
  pairs[b"emb"] = entry.SerializeToString()
  _write_index(f"{prefix}.index", sorted(pairs.items()))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=f"'emb'.*{match}"):
    jaxckpt.load_checkpoint(prefix).get_tensor("emb")


def test_a_huge_claimed_shape_is_corrupt_before_any_allocation(tmp_path):
  directory = _copy(tmp_path, "guide")
  _edit_entry(directory / "ckpt-3", KERNEL, size=2**62)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=f"'{KERNEL}'"):
    jaxckpt.load_checkpoint(directory).get_tensor(KERNEL)
  entry = _tfbundle.proto("BundleEntryProto")(dtype=1, size=2**42 * 4)
  entry.shape.dim.add().size = 2**42
  entry.slices.add().extent.add()
  pairs = dict(_tfbundle.read_table(directory / "ckpt-3.index"))
  pairs[KERNEL.encode()] = entry.SerializeToString()
  pairs[_tfbundle.slice_key(KERNEL, ((0, -1),))] = entry.SerializeToString()
  _write_index(directory / "ckpt-3.index", sorted(pairs.items()))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=f"'{KERNEL}"):
    jaxckpt.load_checkpoint(directory).get_tensor(KERNEL)


def test_a_directory_mixing_jaxckpt_and_tf_checkpoints(tmp_path):
  directory = _copy(tmp_path, "guide")
  saved = _guide_port().save(directory / "ckpt")  # jaxckpt's ckpt-1, now named by the state file.
  assert jaxckpt.load_checkpoint(directory).path == saved
  assert jaxckpt.load_checkpoint(directory / "ckpt-3").save_counter == 3


def test_cli_verify_checks_every_tf_tensor(tmp_path, capsys):
  directory = _copy(tmp_path, "guide")
  assert _cli.main(["verify", str(directory), "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert [os.path.basename(r["path"]) for r in result["checkpoints"]] == ["ckpt-2", "ckpt-3"]
  statuses = result["checkpoints"][1]["arrays"]
  assert statuses[KERNEL] == "ok" and statuses["iterator/.ATTRIBUTES/ITERATOR_STATE"].startswith(
    "not checked"
  )
  data = directory / "ckpt-3.data-00000-of-00001"
  raw = bytearray(data.read_bytes())
  raw[jaxckpt.load_checkpoint(directory).entry(KERNEL).offset] ^= 0x01
  data.write_bytes(bytes(raw))
  assert _cli.main(["verify", str(directory / "ckpt-3")]) == 1
  out = capsys.readouterr().out
  assert f"CORRUPT {directory / 'ckpt-3'}" in out and f"{KERNEL}: Tensor" in out
  assert "ITERATOR_STATE" not in out


def test_a_keras3_guide_checkpoint_restores_with_a_name_map():
  # Keras 3's Dense tracks its kernel as `_kernel`; its Adam keeps slots in `_variables`.
  ckpt = _guide_port()
  ckpt.restore(
    FIXTURES / "guide_keras3", name_map=lambda n: n.replace("/_kernel", "/kernel")
  ).assert_existing_objects_matched().expect_partial()
  key = "net/l1/_kernel/.ATTRIBUTES/VARIABLE_VALUE"
  assert np.asarray(ckpt.net["l1"]["kernel"]).tobytes() == (
    _expected("guide_keras3/ckpt-3", key).tobytes()
  )
  names = jaxckpt.load_checkpoint(FIXTURES / "guide_keras3").tracked_names().values()
  assert "optimizer/_variables/2" in names and ckpt.save_counter == 3


def test_latest_checkpoint_of_a_tf_directory_is_tfs_latest(tmp_path):
  # The guide's own restore line: ckpt.restore(manager.latest_checkpoint).
  assert jaxckpt.latest_checkpoint(FIXTURES / "guide") == str(FIXTURES / "guide" / "ckpt-3")
  assert jaxckpt.latest_checkpoint(FIXTURES / "guide" / "ckpt-3") is None  # A prefix, no directory.
  assert jaxckpt.latest_checkpoint(FIXTURES / "dtypes") is None  # No state file.
  ckpt = _guide_port()
  ckpt.restore(jaxckpt.latest_checkpoint(FIXTURES / "guide")).assert_existing_objects_matched()
  assert ckpt.save_counter == 3
  directory = _copy(tmp_path, "guide")
  (directory / "ckpt-3.index").unlink()
  assert jaxckpt.latest_checkpoint(directory) is None


def test_values_read_for_numpy_are_writable():
  reader = jaxckpt.load_checkpoint(FIXTURES / "guide")
  assert reader.get_tensor(KERNEL).flags.writeable
  assert not reader.get_tensor(KERNEL, copy=False).flags.writeable  # Over the bytes read.
  ckpt = jaxckpt.Checkpoint(net={"l1": {"kernel": np.zeros((1, 5), np.float32)}})
  ckpt.restore(FIXTURES / "guide").expect_partial()
  ckpt.net["l1"]["kernel"][0, 0] = 1.0  # A numpy leaf stays a writable numpy array.
  assert ckpt.net["l1"]["kernel"][0, 0] == 1.0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_restore_a_tf_checkpoint_onto_one_mesh_or_refuse_together():
  import distributed  # tests/distributed.py: real JAX processes on 127.0.0.1.

  results = distributed.launch(
    "distributed_cases",
    "restore_tf_checkpoint",
    2,
    devices=2,
    kwargs={"path": str(FIXTURES / "sharded" / "two")},
  )
  a = _expected("sharded/two", "a/.ATTRIBUTES/VARIABLE_VALUE").tolist()
  assert results == [{"a": a, "b": list(range(40)), "devices": 4, "local_shards": 2}] * 2
  results = distributed.launch(
    "distributed_cases",
    "restore_tf_one_process_differs",
    2,
    devices=1,
    kwargs={"path": str(FIXTURES / "sharded" / "two")},
  )
  assert results == [
    {"error": "CoordinationError", "restored": False},  # Told by process 1, at once.
    {"error": "ShapeMismatchError", "restored": False},
  ]


def test_skip_slot_variables_leaves_tf_slots_alone():
  like = {"l1": {"kernel": np.zeros((1, 5), np.float32), "bias": np.zeros(5, np.float32)}}
  ckpt = jaxckpt.Checkpoint(optimizer={"m": {"net": like}, "iter": 0})
  options = jaxckpt.CheckpointOptions(experimental_skip_slot_variables=True)
  status = ckpt.restore(FIXTURES / "guide", options=options)
  assert status.missing == {"optimizer/m/net/l1/kernel", "optimizer/m/net/l1/bias"}
  assert not ckpt.optimizer["m"]["net"]["l1"]["kernel"].any() and ckpt.optimizer["iter"] == 3
  assert "optimizer/v/net/l1/kernel" not in status.unused


def test_a_manager_on_a_tf_directory_resumes_from_tfs_latest(tmp_path):
  directory = _copy(tmp_path, "guide")
  ckpt = _guide_port()
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=1)
  assert manager.restore_or_initialize() == str(directory / "ckpt-3")
  assert int(ckpt.step) == 4 and ckpt.save_counter == 3
  manager.save()
  assert manager.save() == str(directory / "ckpt-5")
  assert manager.checkpoints == [str(directory / "ckpt-5")]
  assert {"ckpt-2.index", "ckpt-3.index", "ckpt-5"} <= set(os.listdir(directory))  # TF's kept.
  assert "ckpt-4" not in os.listdir(directory)


def test_tf_names_escape_like_jaxckpt_keys():
  # TF escapes '/' in a local name as '.S' and '.' as '..'; jaxckpt as %2F and %2E.
  assert _tfcheckpoint.tracked_name("m/a.Sb/..w/.ATTRIBUTES/VARIABLE_VALUE") == "m/a%2Fb/%2Ew"
  ckpt = jaxckpt.Checkpoint(m={"a/b": {".w": np.zeros(2)}})
  assert [leaf.name for item in flatten_items(ckpt._items) for leaf in item.leaves] == [
    "m/a%2Fb/%2Ew"
  ]
  with pytest.raises(jaxckpt.DtypeMismatchError, match="string tensor but the tracked value"):
    jaxckpt.Checkpoint(word=b"").read(FIXTURES / "dtypes" / "dtypes")
