"""Every single-byte change of a manifest is detected, or changes nothing restored."""

import contextlib
import io
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _manifest
from jaxckpt._cli import main

W = np.arange(6, dtype=np.float32)
N = np.array([-3, 4], np.int32)


def _cases(data: bytes) -> list[bytes]:
  """Each byte flipped once (its lowest bit: digits, letters and quotes stay
  printable, so most cases still parse), and a few truncations."""
  flipped = [data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :] for i in range(len(data))]
  return flipped + [data[:n] for n in (0, 1, len(data) // 2, len(data) - 1)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("fuzz")
  path = jaxckpt.Checkpoint(w=jnp.asarray(W), n=N).write(root / "original")
  assert _restore_or_raise(path)  # Unchanged, it restores.
  copy = root / "copy"
  shutil.copytree(path, copy)
  return pathlib.Path(path, "jaxckpt", "metadata").read_bytes(), copy


def _restore_or_raise(path) -> bool:
  """Restores both leaves: False on a JaxckptError, True if they came back bit-exact."""
  target = jaxckpt.Checkpoint(w=jnp.zeros(6), n=np.zeros(2, np.int32))
  try:  # write() keeps no save_counter; a leaf left unrestored fails the value checks.
    target.restore(path).expect_partial()
  except jaxckpt.JaxckptError:
    return False
  np.testing.assert_array_equal(np.asarray(target.w), W)
  assert np.asarray(target.w).dtype == np.float32 and target.n.dtype == np.int32
  np.testing.assert_array_equal(target.n, N)
  return True


def test_every_byte_flip_of_a_manifest_is_detected(saved):
  original, copy = saved
  manifest = copy / "jaxckpt" / "metadata"
  cases = _cases(original)
  for case in cases:
    manifest.write_bytes(case)
    _restore_or_raise(copy)  # A bare exception or a wrong value fails the test here.
    try:
      loaded = jaxckpt.load_checkpoint(copy).manifest
    except jaxckpt.JaxckptError:
      continue
    # Only a flip that means the same (a float's 17th digit) may load.
    assert loaded == _manifest.read_manifest(copy.parent / "original"), case
  assert len(cases) > 300


@pytest.mark.slow
def test_unsealed_manifest_flips_end_in_jaxckpt_errors(saved):
  # A version-1 manifest has no checksum: the field checks alone must turn every
  # flip into a JaxckptError or a successful read, never a bare exception.
  original, copy = saved
  body = json.loads(original)
  body.pop(_manifest.CHECKSUM_FIELD)
  body["version"] = 1
  manifest = copy / "jaxckpt" / "metadata"
  codes = set()
  for case in _cases(json.dumps(body).encode()):
    manifest.write_bytes(case)
    target = jaxckpt.Checkpoint(w=jnp.zeros(6), n=np.zeros(2, np.int32))
    with contextlib.suppress(jaxckpt.JaxckptError):
      target.restore(copy)
    with contextlib.suppress(jaxckpt.JaxckptError):
      reader = jaxckpt.load_checkpoint(copy)
      for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      codes.add(main(["verify", str(copy)]))
      codes.add(main(["inspect", "--values", "--json", str(copy)]))
      codes.add(main(["ls", str(copy.parent)]))
  assert codes <= {0, 1, 2} and {1, 2} & codes


def test_version_1_manifests_without_a_checksum_are_still_read(saved):
  original, copy = saved
  body = json.loads(original)
  body.pop(_manifest.CHECKSUM_FIELD)
  manifest = copy / "jaxckpt" / "metadata"
  manifest.write_text(json.dumps({**body, "version": 1}))  # What jaxckpt wrote before.
  assert _restore_or_raise(copy)
  assert jaxckpt.load_checkpoint(copy).manifest.version == 1
  manifest.write_text(json.dumps(body))  # Version 2 must carry one.
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="sha256 checksum is missing"):
    jaxckpt.load_checkpoint(copy)
