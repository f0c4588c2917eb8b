"""Per-array checksums: computed on the save worker, checked on every read.

TensorStore's zarr v2 chunks (Orbax's default format) carry no checksum, and
zarr v3's crc32c covers only the shard index, so a flipped bit in array data is
returned as data. jaxckpt records a CRC-32 of each leaf's stored bytes in the
manifest (zlib.crc32 runs at 3.5 GB/s here and releases the GIL) and checks it
after reading, before any dtype cast.
"""

from __future__ import annotations

import concurrent.futures
import os
import zlib
from typing import Any

import jax
import numpy as np

from jaxckpt._errors import CorruptCheckpointError


def host_bytes(value: Any, dtype: np.dtype | None = None) -> memoryview | None:
  """The C-order bytes of a leaf, or None if this process cannot see all of it."""
  if isinstance(value, jax.Array):
    if not value.is_fully_addressable:
      return None  # Multi-process arrays: each process holds only its shards.
    value = np.asarray(value)
  array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
  return memoryview(array.reshape(-1).view(np.uint8))


def checksum(value: Any, dtype: np.dtype | None = None) -> int | None:
  data = host_bytes(value, dtype)
  return None if data is None else zlib.crc32(data)


def verify_all(path: str, entries: list[tuple[str, Any, np.dtype, int | None]]) -> None:
  """`verify` for many arrays, on all cores: zlib.crc32 releases the GIL, and
  the restore has nothing else to do meanwhile (0.15 s per 512 MiB on one core)."""
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
        "`jaxckpt verify` checks the others.")
