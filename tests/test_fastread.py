"""The restore fast path (_fastread.py): bit-exact; Orbax reads whatever it leaves out."""

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _compat
from jaxckpt import _errors
from jaxckpt import _fastread
from jaxckpt import _layout


def _tree():
  rng = np.random.default_rng(0)
  return {
    "rows": jnp.asarray(rng.standard_normal((1000, 8), np.float32)),  # Row chunks, short last.
    "grid": jnp.asarray(rng.standard_normal((37, 300), np.float32)),  # Chunks in both dims.
    "bf16": jnp.asarray(rng.standard_normal((513,)), jnp.bfloat16),
    "mask": jnp.asarray(rng.random(17) > 0.5),
    "count": np.arange(12, dtype=np.int64).reshape(3, 4),
    "scalar": jnp.float32(-0.0),
    "step": 7,
    "rng": jax.random.key(3),
  }


def _zeros_like(tree):
  return jax.tree.map(
    lambda x: (
      jnp.zeros_like(x)
      if isinstance(x, jax.Array)
      else np.zeros_like(x)
      if isinstance(x, np.ndarray)
      else 0
    ),
    tree,
  )


def _same(a, b):
  if jnp.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key):
    a, b = jax.random.key_data(a), jax.random.key_data(b)
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_restore_reads_uncompressed_checkpoints_without_orbax(tmp_path, no_orbax_reads):
  tree = _tree()
  path = jaxckpt.Checkpoint(t=tree).save(
    tmp_path / "c", jaxckpt.CheckpointOptions(chunk_byte_size=4096)
  )
  target = jaxckpt.Checkpoint(t=_zeros_like(tree))
  target.restore(path).assert_consumed()
  for name in tree:
    assert _same(target.t[name], tree[name]), name
  assert target.t["step"] == 7 and type(target.t["step"]) is int
  assert np.signbit(np.asarray(target.t["scalar"]))  # -0.0 kept bit-exact.


def test_chunk_grids_both_layouts_are_exercised(tmp_path):
  tree = _tree()
  path = jaxckpt.Checkpoint(t=tree).save(
    tmp_path / "c", jaxckpt.CheckpointOptions(chunk_byte_size=4096)
  )
  entries = _compat.ocdbt_chunk_entries(os.path.join(path, "state"))
  chunks = {
    name: sum(
      1 for k in entries if k.startswith(f"t.{name}/".encode()) and not k.endswith(b".zarray")
    )
    for name in ("rows", "grid")
  }
  assert chunks["rows"] > 1 and chunks["grid"] > 1, chunks
  grid_chunks = json.loads(entries[b"t.grid/.zarray"])["chunks"]
  assert grid_chunks[1] < 300 and 300 % grid_chunks[1] == 0, grid_chunks  # Split along dim 1.


def test_arrays_are_64_byte_aligned_and_exact(tmp_path):
  tree = _tree()
  path = jaxckpt.Checkpoint(t=tree).save(
    tmp_path / "c", jaxckpt.CheckpointOptions(chunk_byte_size=4096)
  )
  wanted = [
    (f"t/{n}", np.shape(tree[n]), np.dtype(tree[n].dtype))
    for n in ("rows", "grid", "bf16", "mask", "count")
  ]
  out, crcs = _fastread.read(os.path.join(path, "state"), wanted)
  assert sorted(out) == sorted(crcs) == sorted(name for name, _, _ in wanted)
  manifest = jaxckpt.load_checkpoint(path).manifest
  for name, _, _ in wanted:
    assert out[name].ctypes.data % 64 == 0
    assert crcs[name] == zlib.crc32(out[name].tobytes()) == manifest.checksums[name]
    assert _same(out[name], tree[name.split("/")[1]])


def test_compressed_arrays_are_left_to_orbax(tmp_path):
  tree = {"w": jnp.arange(4096, dtype=jnp.float32)}
  path = jaxckpt.Checkpoint(t=tree).save(
    tmp_path / "c", jaxckpt.CheckpointOptions(compression=True)
  )
  state = os.path.join(path, "state")
  assert _fastread.read(state, [("t/w", (4096,), np.dtype(np.float32))]) == ({}, {})
  target = jaxckpt.Checkpoint(t={"w": jnp.zeros(4096, jnp.float32)})
  target.restore(path).assert_consumed()
  assert _same(target.t["w"], tree["w"])


def test_wrong_shape_or_dtype_is_not_read(tmp_path):
  path = jaxckpt.Checkpoint(t={"w": jnp.ones((8, 4))}).save(tmp_path / "c")
  state = os.path.join(path, "state")
  assert _fastread.read(state, [("t/w", (4, 8), np.dtype(np.float32))]) == ({}, {})
  assert _fastread.read(state, [("t/w", (8, 4), np.dtype(np.int32))]) == ({}, {})
  assert _fastread.read(state, [("t/nope", (8, 4), np.dtype(np.float32))]) == ({}, {})


def test_truncated_data_file_falls_back_and_names_the_array(tmp_path):
  big = jnp.arange(1 << 16, dtype=jnp.float32)
  path = jaxckpt.Checkpoint(t={"w": big}).save(tmp_path / "c")
  state = os.path.join(path, "state")
  data = [
    os.path.join(r, f)
    for r, _, fs in os.walk(state)
    for f in fs
    if os.sep + "d" + os.sep in os.path.join(r, f)
    and os.path.getsize(os.path.join(r, f)) >= big.nbytes
  ]
  assert len(data) == 1
  with open(data[0], "r+b") as f:
    f.truncate(big.nbytes // 2)
  assert _fastread.read(state, [("t/w", big.shape, np.dtype(np.float32))]) == ({}, {})
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="t/w"):
    jaxckpt.Checkpoint(t={"w": jnp.zeros_like(big)}).restore(path)


def test_sharded_targets_get_their_sharding(tmp_path):
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  sharding = jax.NamedSharding(mesh, jax.P("x"))
  value = jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(16, 4), sharding)
  path = jaxckpt.Checkpoint(v=value).save(tmp_path / "c")
  target = jaxckpt.Checkpoint(v=jax.device_put(jnp.zeros((16, 4), jnp.float32), sharding))
  target.restore(path).assert_consumed()
  assert target.v.sharding == sharding
  assert _same(target.v, value)


@pytest.mark.parametrize("shape, chunks", [((10, 17), (4, 7)), ((10, 6), (4, 6)), ((5,), (2,))])
def test_padded_edge_chunks(tmp_path, shape, chunks):
  # Orbax picks chunk shapes that divide the array; zarr v2 written by others
  # may pad the edge chunks, which are then stored full-size.
  import tensorstore as ts

  data = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  store = ts.open(
    {
      "driver": "zarr",
      "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/"},
      "path": "t.x",
      "metadata": {
        "shape": list(shape),
        "chunks": list(chunks),
        "dtype": "<f4",
        "compressor": None,
      },
    },
    create=True,
  ).result()
  store.write(data).result()
  out, _ = _fastread.read(str(tmp_path), [("t/x", shape, np.dtype(np.float32))])
  assert list(out) == ["t/x"]
  np.testing.assert_array_equal(out["t/x"], data)


def test_a_misread_is_read_again_by_orbax_not_reported_as_corruption(tmp_path, monkeypatch):
  value = jnp.arange(1 << 14, dtype=jnp.float32)
  path = jaxckpt.Checkpoint(t={"w": value}).save(tmp_path / "c")
  real = _fastread._pread_into

  def misread(fd, view, offset):
    real(fd, view, offset)
    view[0] ^= 0xFF  # As a bug in the fast path would.

  monkeypatch.setattr(_fastread, "_pread_into", misread)
  orbax_reads = []
  orbax_read = _layout._orbax_read
  monkeypatch.setattr(
    _layout, "_orbax_read", lambda *a, **k: orbax_reads.append(1) or orbax_read(*a, **k)
  )
  target = jaxckpt.Checkpoint(t={"w": jnp.zeros_like(value)})
  target.restore(path).assert_consumed()
  assert _same(target.t["w"], value) and orbax_reads == [1]


def test_without_checksums_no_crcs_are_computed(tmp_path):
  path = jaxckpt.Checkpoint(t={"w": jnp.ones(64)}).save(tmp_path / "c")
  out, crcs = _fastread.read(
    os.path.join(path, "state"), [("t/w", (64,), np.dtype(np.float32))], checksums=False
  )
  assert list(out) == ["t/w"] and crcs == {}


def test_data_files_that_are_not_regular_files_are_refused_without_blocking(tmp_path):
  fifo = tmp_path / "d"
  os.mkfifo(fifo)  # Opened blocking, a FIFO with no writer would hang the restore.
  with pytest.raises(_errors._FastReadUnsupported, match="not a regular file"):
    _fastread.open_regular(str(fifo))


def test_chunk_references_leaving_the_checkpoint_are_not_followed(tmp_path):
  (tmp_path / "outside").write_bytes(b"secret")
  state = tmp_path / "ckpt" / "state"
  state.mkdir(parents=True)
  (state / "link").symlink_to(tmp_path / "outside")
  for ref in (f"value:{tmp_path}:outside:0:6", "value:..:outside:0:6", "value:.:link:0:6"):
    assert _compat._location(ref, str(state)) is None, ref
  assert _compat._location("value:ocdbt.process_0/:d/abc:0:64", str(state)) == (
    str(state / "ocdbt.process_0" / "d/abc"),
    0,
    64,
  )
