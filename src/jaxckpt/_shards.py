"""One process's shards of a state as one self-describing byte string (the local tier's unit).

``encode`` packs, for every leaf, the distinct shards this process holds (a
replicated array once) with each shard's index into the global array, plus
numpy values and Python scalars whole; ``values_for`` rebuilds the leaves from
it onto the tracked values' shardings. The same bytes are written to the local
directory and sent to the peer (`_replica.exchange`), so a peer's copy restores
exactly like the process's own.

Layout: 8-byte little-endian header length, the JSON header (padded with
spaces), the data.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import TreeError
from jaxckpt._errors import _LocalTierMismatch
from jaxckpt._restore import as_tracked_type
from jaxckpt._tree import Leaf

FORMAT = 1
_LENGTH = struct.Struct("<Q")
# Every shard starts 64-byte aligned in the file: JAX on CPU then uses a mapped
# file's memory for the restored array instead of copying it.
_ALIGN = 64


def _dtype(name: str) -> np.dtype:
  return np.dtype(getattr(ml_dtypes, name, name))


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[list[int]]:
  return [list(s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)]


def _host_parts(leaf: Leaf) -> tuple[dict[str, Any], list[tuple[list[list[int]], np.ndarray]]]:
  value = leaf.value
  if isinstance(value, jax.Array):
    parts, seen = [], set()
    for shard in value.addressable_shards:
      bounds = _bounds(shard.index, value.shape)
      key = json.dumps(bounds)
      if key not in seen:
        seen.add(key)
        parts.append((bounds, shard.data))
    for _, data in parts:
      data.copy_to_host_async()  # All transfers in flight before the first wait.
    return {"kind": "jax"}, [(b, np.asarray(d)) for b, d in parts]
  array = np.asarray(value)
  return {"kind": leaf.kind}, [([[0, n] for n in array.shape], array)]


def check_concrete(leaves: list[Leaf]) -> None:
  """Raises TreeError if a leaf is a ``jax.ShapeDtypeStruct``: nothing to save."""
  for leaf in leaves:
    if leaf.abstract:
      raise TreeError(
        f"Leaf '{leaf.name}' is a jax.ShapeDtypeStruct (a restore target); a save needs values."
      )


def encode(leaves: list[Leaf], meta: dict[str, Any]) -> np.ndarray:
  """This process's shards of ``leaves`` (concrete values), with ``meta`` in the header.

  The data is copied once, into one buffer that is both written and sent.
  """
  entries: dict[str, Any] = {}
  arrays: list[np.ndarray] = []
  offset = 0
  check_concrete(leaves)
  for leaf in leaves:
    info, parts = _host_parts(leaf)
    shards = []
    for bounds, array in parts:
      offset += -offset % _ALIGN
      shards.append({"index": bounds, "offset": offset, "nbytes": array.nbytes})
      arrays.append(array)
      offset += array.nbytes
    entries[leaf.name] = {
      **info,
      "dtype": leaf.dtype.name,
      "shape": list(leaf.shape),
      "shards": shards,
    }
  header = json.dumps({"format": FORMAT, **meta, "leaves": entries}).encode()
  header += b" " * (-(_LENGTH.size + len(header)) % _ALIGN)
  start = _LENGTH.size + len(header)
  out = np.empty(start + offset, np.uint8)  # Not zeroed: every byte is written below.
  out[: _LENGTH.size] = np.frombuffer(_LENGTH.pack(len(header)), np.uint8)
  out[_LENGTH.size : start] = np.frombuffer(header, np.uint8)
  end = start
  for array, shard in zip(arrays, (s for e in entries.values() for s in e["shards"]), strict=True):
    at = start + shard["offset"]
    out[end:at] = 0  # Alignment padding.
    out[at : at + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    end = at + array.nbytes
  return out


@dataclasses.dataclass(frozen=True)
class Shards:
  """A decoded byte string: its header and a view of its data."""

  header: dict[str, Any]
  data: memoryview

  def array(self, name: str, bounds: list[list[int]]) -> np.ndarray | None:
    entry = self.header["leaves"][name]
    for shard in entry["shards"]:
      if shard["index"] == bounds:
        shape = [stop - start for start, stop in bounds]
        raw = self.data[shard["offset"] : shard["offset"] + shard["nbytes"]]
        return np.frombuffer(raw, _dtype(entry["dtype"])).reshape(shape)
    return None


def decode(data: bytes | np.ndarray | mmap.mmap, where: str) -> Shards:
  """Raises CorruptCheckpointError if ``data`` is not an `encode` result."""
  view = np.frombuffer(data, np.uint8).data  # A flat byte view of any buffer.
  header: Any = None
  try:
    (length,) = _LENGTH.unpack_from(view)
    header = json.loads(bytes(view[_LENGTH.size : _LENGTH.size + length]))
  except (struct.error, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError too.
    raise CorruptCheckpointError(f"Local-tier shards {where!r} are unreadable: {e}.") from e
  if (
    not isinstance(header, dict)
    or header.get("format") != FORMAT
    or not isinstance(header.get("leaves"), dict)
  ):
    raise CorruptCheckpointError(f"Local-tier shards {where!r} have no format-{FORMAT} header.")
  return Shards(header, view[_LENGTH.size + length :])


def _restore_leaf(shards: Shards, leaf: Leaf) -> Any:
  entry = shards.header["leaves"].get(leaf.name)
  if entry is None or tuple(entry["shape"]) != leaf.shape or entry["dtype"] != leaf.dtype.name:
    raise _LocalTierMismatch(f"'{leaf.name}' differs from the local tier's (shape or dtype)")
  target = leaf.value
  sharding = getattr(target, "sharding", None)
  if isinstance(target, (jax.Array, jax.ShapeDtypeStruct)) and sharding is not None:
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
      part = shards.array(leaf.name, _bounds(index, leaf.shape))
      if part is None:
        raise _LocalTierMismatch(f"'{leaf.name}' is sharded differently than when saved")
      arrays.append(jax.device_put(part, device))
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, arrays)
  whole = shards.array(leaf.name, [[0, n] for n in leaf.shape])
  if whole is None:
    raise _LocalTierMismatch(f"'{leaf.name}' was saved sharded; it is tracked unsharded")
  return whole.copy()  # A view of the read-only file bytes; numpy values are the user's to modify.


def values_for(shards: Shards, leaves: list[Leaf]) -> dict[str, Any]:
  """The restored value of every leaf in ``leaves``, on its tracked sharding.

  Raises:
    _LocalTierMismatch: a leaf is missing, has another shape/dtype, or its
      sharding asks for shards this process did not save (the caller falls
      back to the persistent tier).
  """
  return {leaf.name: as_tracked_type(leaf, _restore_leaf(shards, leaf)) for leaf in leaves}
