import json
import os
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _integrity


def _save(tmp_path, **kwargs):
  w = np.arange(4096, dtype=np.float32) * 1.5  # Distinctive bytes, easy to find.
  ckpt = jaxckpt.Checkpoint(model={"w": jnp.asarray(w), "b": jnp.ones(16)})
  return ckpt.write(tmp_path / "c", options=jaxckpt.CheckpointOptions(**kwargs)), w


def _file_holding(path, data: bytes) -> tuple[Path, int]:
  for f in Path(path, "state").rglob("*"):
    if f.is_file():
      offset = f.read_bytes().find(data)
      if offset >= 0:
        return f, offset
  raise AssertionError("array bytes not found on disk")


def test_checksums_are_recorded_per_array(tmp_path):
  path, w = _save(tmp_path)
  manifest = json.loads(Path(path, "jaxckpt", "metadata").read_text())
  import zlib

  assert manifest["leaves"]["model/w"]["crc32"] == zlib.crc32(w.tobytes())


def test_flipped_byte_is_reported_with_checkpoint_and_tree_path(tmp_path):
  path, w = _save(tmp_path)
  f, offset = _file_holding(path, w[1000:1016].tobytes())
  data = bytearray(f.read_bytes())
  data[offset + 5] ^= 0x40
  f.write_bytes(bytes(data))
  target = jaxckpt.Checkpoint(model={"w": jnp.zeros(4096), "b": jnp.zeros(16)})
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=rf"{path}.*'model/w'.*CRC-32"):
    target.restore(path)
  assert float(target.model["w"].sum()) == 0.0  # Never returned as data.
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="'model/w'"):
    jaxckpt.load_checkpoint(path).get_tensor("model/w")
  # With verification off, the flipped data comes back (what Orbax alone would do).
  target.restore(path, options=jaxckpt.CheckpointOptions(verify_checksums=False))
  assert not np.array_equal(np.asarray(target.model["w"]), w)


@pytest.mark.parametrize("compression", [False, True])
def test_truncated_data_file_is_reported_with_tree_path(tmp_path, compression):
  path, w = _save(tmp_path, compression=compression)
  # The largest data file holds model/w's chunk (16 KiB of the 16.06 KiB).
  f = max(
    (p for p in Path(path, "state").rglob("*") if p.is_file() and "/d/" in str(p)),
    key=lambda p: p.stat().st_size,
  )
  os.truncate(f, f.stat().st_size // 2)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match=rf"{path}.*'model/w'"):
    jaxckpt.Checkpoint(model={"w": jnp.zeros(4096)}).restore(path).expect_partial()


def test_dtype_kind_changes_are_refused(tmp_path):
  path = jaxckpt.Checkpoint(x=jnp.arange(4.0)).write(tmp_path / "c")
  target = jaxckpt.Checkpoint(x=jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"'x'.*float32.*int32.*float to int"):
    target.restore(path)
  ints = jaxckpt.Checkpoint(x=jnp.arange(4)).write(tmp_path / "i")
  upcast = jaxckpt.Checkpoint(x=jnp.zeros(4, jnp.float32))
  upcast.restore(ints)  # int → float is allowed.
  assert upcast.x.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_checksum_is_zlibs_crc32():
  # Manifests written with zlib.crc32 (before ISA-L was used) must still verify.
  rng = np.random.default_rng(0)
  for value in [
    rng.standard_normal((257, 33)).astype(np.float32),
    jnp.arange(1 << 20, dtype=jnp.bfloat16),
    np.int64(7),
    2.5,
  ]:
    expected = zlib.crc32(np.ascontiguousarray(np.asarray(value)).tobytes())
    assert _integrity.checksum(value) == expected
