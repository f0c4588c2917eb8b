"""Per-array checksums: computed on the save worker, checked on every read.

TensorStore's zarr v2 chunks (Orbax's default format) carry no checksum, and
zarr v3's crc32c covers only the shard index, so a flipped bit in array data is
returned as data. jaxckpt records a CRC-32 of each leaf's stored bytes in the
manifest and checks it after reading, before any dtype cast. It is zlib's
CRC-32, computed with ISA-L (``isal``, several times faster) where it is
installed; both release the GIL.

Arrays spread over several JAX processes get one CRC-32 per stored shard
instead, keyed by the shard's slice (``"0:8,0:4"``): each process computes its
own, the primary collects them into the manifest. A read checks every restored
shard whose slice matches a saved one, and a whole-array read (``jaxckpt
verify``, one process) checks them all.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any
from typing import overload

import jax
import numpy as np

from jaxckpt._errors import CorruptCheckpointError

try:
  from isal.isal_zlib import crc32 as _crc32
except ImportError:  # A platform without isal wheels: the same CRC, slower.
  from zlib import crc32 as _crc32


def host_bytes(value: Any, dtype: np.dtype | None = None) -> memoryview | None:
  """The C-order bytes of a leaf, or None if this process cannot see all of it."""
  if isinstance(value, jax.Array):
    if not value.is_fully_addressable:
      return None  # Multi-process arrays: each process holds only its shards.
    value = np.asarray(value)
  array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
  return array.reshape(-1).view(np.uint8).data


@overload
def checksum(value: np.ndarray, dtype: np.dtype | None = None) -> int: ...
@overload
def checksum(value: Any, dtype: np.dtype | None = None) -> int | None: ...
def checksum(value: Any, dtype: np.dtype | None = None) -> int | None:
  """CRC-32 of `host_bytes`; None only for arrays this process cannot see all of."""
  data = host_bytes(value, dtype)
  return None if data is None else _crc32(data)


def verify_all(path: str, entries: list[tuple[str, Any, np.dtype, int | None]]) -> None:
  """`verify` for many arrays, on all cores: the CRC releases the GIL, and
  the restore has nothing else to do meanwhile."""
  workers = min(len(entries), os.cpu_count() or 1)
  if workers <= 1:
    for entry in entries:
      verify(path, *entry)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for future in [pool.submit(verify, path, *entry) for entry in entries]:
      future.result()


def verify(path: str, name: str, value: Any, dtype: np.dtype, expected: int | None) -> None:
  """Raises `CorruptCheckpointError` if ``value`` does not match its recorded CRC."""
  if expected is None:
    return
  got = checksum(value, dtype)
  if got is not None and got != expected:
    raise CorruptCheckpointError(
      f"Checkpoint {path!r} is corrupt: array '{name}' has CRC-32 {got:#010x}, "
      f"recorded {expected:#010x} at save time. Restore an earlier checkpoint; "
      "`jaxckpt verify` checks the others."
    )


def slice_key(index: tuple, shape: tuple[int, ...]) -> str:
  """``"0:8,0:4"`` for the shard ``index`` (a tuple of slices) of an array of ``shape``."""
  return ",".join(
    f"{s.start or 0}:{dim if s.stop is None else s.stop}"
    for s, dim in zip(index, shape, strict=True)
  )


def _parse_key(key: str) -> tuple[slice, ...]:
  if not key:
    return ()
  return tuple(slice(int(a), int(b)) for a, b in (part.split(":") for part in key.split(",")))


def shard_checksums(value: Any) -> dict[str, int]:
  """CRC-32 of each replica-0 shard this process holds of a multi-process array."""
  out = {}
  for shard in value.addressable_shards:
    if shard.replica_id == 0:
      out[slice_key(shard.index, value.shape)] = checksum(np.asarray(shard.data))
  return out


def verify_shards(path: str, name: str, value: Any, expected: dict[str, int]) -> int:
  """Checks ``value`` (in its stored dtype) against per-shard CRC-32s; returns how
  many shards were checked. A whole array checks every slice; a sharded one the
  local shards whose slice was saved as such."""
  checked = 0
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    pieces = [
      (slice_key(s.index, value.shape), s.data)
      for s in value.addressable_shards
      if s.replica_id == 0
    ]
  else:
    whole = np.asarray(value)
    pieces = [(key, whole[_parse_key(key)]) for key in expected]
  for key, data in pieces:
    if key not in expected:
      continue
    got = checksum(data)
    checked += 1
    if got != expected[key]:
      raise CorruptCheckpointError(
        f"Checkpoint {path!r} is corrupt: array '{name}', shard [{key}], has CRC-32 "
        f"{got:#010x}, recorded {expected[key]:#010x} at save time. Restore an earlier "
        "checkpoint; `jaxckpt verify` checks the others."
      )
  return checked
