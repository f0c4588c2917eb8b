"""Restore: checkpoint leaves → values shaped like the currently tracked ones.

Only leaves present both in the checkpoint and in the tracked items are read
(Orbax partial restore). Each is read in its stored dtype, checked against its
CRC-32, then cast to the tracked value's dtype and placed in its sharding (so a
new mesh reshards) and Python type. Shapes and dtype kinds are checked for every
leaf before anything is read, so a mismatch changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxckpt import _compat
from jaxckpt import _fastread
from jaxckpt import _knobs
from jaxckpt import _kvstore
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import JaxckptError
from jaxckpt._errors import ShapeMismatchError
from jaxckpt._errors import TreeError
from jaxckpt._integrity import verify_all
from jaxckpt._integrity import verify_shards
from jaxckpt._manifest import Manifest
from jaxckpt._tree import Leaf
from jaxckpt._tree import nest


def stored_dtype(manifest: Manifest, name: str) -> np.dtype:
  return np.dtype(jax.numpy.dtype(manifest.leaves[name].dtype))


def _group(dtype: np.dtype) -> str:
  if jax.numpy.issubdtype(dtype, jax.numpy.bool_):
    return "bool"
  if jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
    return "complex"
  if jax.numpy.issubdtype(dtype, jax.numpy.floating):
    return "float"
  return "int"


# Casts restore may make: within a kind, and integer → float. Anything else
# (float → int, → bool, complex → real) would silently change values.
_ALLOWED = {("int", "float"), ("bool", "int"), ("bool", "float")}


def check_compatible(path: str, manifest: Manifest, leaves: list[Leaf]) -> None:
  for leaf in leaves:
    info = manifest.leaves.get(leaf.name)
    if info is None:
      continue
    if tuple(info.shape) != leaf.shape:
      raise ShapeMismatchError(
          f"Cannot restore '{leaf.name}' from {path!r}: the checkpoint has shape "
          f"{tuple(info.shape)} but the tracked value has shape {leaf.shape}. "
          "Nothing was restored. Build the model with the checkpoint's shapes, or "
          "stop tracking this value.")
    saved, tracked = _group(stored_dtype(manifest, leaf.name)), _group(leaf.dtype)
    if saved != tracked and (saved, tracked) not in _ALLOWED:
      raise TreeError(
          f"Cannot restore '{leaf.name}' from {path!r}: the checkpoint has dtype "
          f"{info.dtype} but the tracked value has dtype {leaf.dtype.name}; casting "
          f"{saved} to {tracked} would change values. Nothing was restored.")


def _target_sharding(leaf: Leaf) -> jax.sharding.Sharding:
  sharding = getattr(leaf.value, "sharding", None)  # None on unsharded abstract leaves.
  return sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _global_target(leaf: Leaf) -> jax.sharding.Sharding | None:
  """The sharding of a tracked value that spans several processes, else None."""
  sharding = getattr(leaf.value, "sharding", None)
  if (isinstance(leaf.value, (jax.Array, jax.ShapeDtypeStruct)) and sharding is not None
      and not sharding.is_fully_addressable):
    return sharding
  return None


def _uncommitted(leaf: Leaf) -> bool:
  # An array JAX placed by default (not device_put to a device) is "uncommitted";
  # handing back a committed one would make every jitted step recompile once.
  return isinstance(leaf.value, jax.Array) and not leaf.value.committed


# Uncommitted arrays at least this big are read as device arrays and then
# uncommitted without a copy; smaller ones as numpy, then copied. Measured with
# benchmarks/throughput.py (cold reads): the device-array path restored 8 MiB+
# leaves 1.2-1.5x faster, but 256 KiB-2 MiB leaves (256 of them) 0.7x as fast
# (Orbax's per-array cost for jax.Array restores is higher than for numpy).
_DEVICE_READ_MIN_BYTES = 4 << 20


def _restore_args(leaf: Leaf, dtype: np.dtype, io_device: jax.Device | None):
  # Not with several processes either: each has its own default device.
  numpy_read = _uncommitted(leaf) and (
      jax.process_count() > 1 or leaf.nbytes < _DEVICE_READ_MIN_BYTES)
  if isinstance(leaf.value, (jax.Array, jax.ShapeDtypeStruct)) and not numpy_read:
    sharding = (jax.sharding.SingleDeviceSharding(io_device) if io_device is not None
                else _target_sharding(leaf))
    return ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, global_shape=leaf.shape)
  return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)


def as_tracked_type(leaf: Leaf, value: Any) -> Any:
  tracked = leaf.value
  if _uncommitted(leaf):  # Stays uncommitted, on the default device.
    if not isinstance(value, jax.Array):
      return jax.device_put(np.asarray(value, dtype=leaf.dtype))
    if value.dtype != leaf.dtype:
      value = value.astype(leaf.dtype)
    if value.sharding != tracked.sharding:
      value = jax.device_put(value, tracked.sharding)
    return _compat.uncommitted(value)  # No copy (see there).
  if isinstance(tracked, (jax.Array, jax.ShapeDtypeStruct)):
    if value.dtype != leaf.dtype:
      value = value.astype(leaf.dtype)
    target = _target_sharding(leaf)
    return value if getattr(value, "sharding", None) == target else jax.device_put(value, target)
  value = np.asarray(value, dtype=leaf.dtype)
  if isinstance(tracked, np.ndarray):
    return value
  if isinstance(tracked, np.generic):
    return leaf.dtype.type(value)
  return type(tracked)(value.item())


def _orbax_read(path: str, manifest: Manifest, leaves: list[Leaf],
                io_device: jax.Device | None, reader: Reader) -> dict[str, Any]:
  item = nest({l.name: jax.ShapeDtypeStruct(l.shape, stored_dtype(manifest, l.name))
               for l in leaves})
  if reader.host_only:
    restore_args = nest({l.name: ocp.RestoreArgs(restore_type=np.ndarray,
                                                  dtype=stored_dtype(manifest, l.name))
                         for l in leaves})
  else:
    restore_args = nest({l.name: _restore_args(l, stored_dtype(manifest, l.name), io_device)
                         for l in leaves})
  if reader.processes is None:
    checkpointer = ocp.PyTreeCheckpointer()
  else:  # Orbax's default barrier is an XLA collective; see _multihost.py.
    mp = ocp.options.MultiprocessingOptions(
        primary_host=reader.primary, active_processes=set(reader.processes),
        barrier_sync_key_prefix=reader.key_prefix)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp),
                                    multiprocessing_options=mp)
  with _compat.stop_metrics_leak(), checkpointer:
    restored = checkpointer.restore(
        os.path.abspath(os.path.join(path, _knobs.STATE_ITEM)),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                    partial_restore=True))
  out = {}
  for leaf in leaves:
    node = restored
    for part in leaf.name.split("/"):
      node = node[part]
    out[leaf.name] = node
  return out


@dataclasses.dataclass(frozen=True)
class Reader:
  """Who reads: all processes (default), or one process reading whole arrays to
  host memory for the others (``host_only``; see _routed.py)."""
  processes: frozenset[int] | None = None  # None: Orbax's defaults (one process).
  primary: int = 0
  host_only: bool = False
  key_prefix: str | None = None  # Unique per operation: Orbax reuses barrier names.


def read_leaves(path: str, manifest: Manifest, leaves: list[Leaf],
                io_device: jax.Device | None = None, *,
                verify_checksums: bool = True, reader: Reader = Reader()) -> dict[str, Any]:
  """Reads the leaves of ``leaves`` present in the checkpoint; returns {name: value}.

  With ``reader.host_only`` the values are whole numpy arrays in the stored dtype.

  Raises:
    ShapeMismatchError, TreeError: a tracked value cannot take the saved one.
    CorruptCheckpointError: an array's data is unreadable or fails its CRC; the
      message names the checkpoint and the array.
  """
  check_compatible(path, manifest, leaves)
  wanted = [l for l in leaves if l.name in manifest.leaves]
  if not wanted:
    return {}
  raw = {}
  by_holder: dict[str, list[Leaf]] = {}
  for leaf in wanted:
    source = manifest.sources.get(leaf.name)
    holder = os.path.normpath(os.path.join(path, source)) if source else path
    by_holder.setdefault(holder, []).append(leaf)
  placed = {}
  verified: set[str] = set()
  if manifest.data is not None:  # A key-value-store checkpoint (see _kvstore.py).
    by_holder = {}
    url = _kvstore.join(path, manifest.data)
    # Arrays no single process will hold whole, without a CRC to check: each
    # process reads just its shards. The rest are read whole (and CRC-checked).
    partial = [] if reader.host_only else [
        l for l in wanted if _global_target(l) is not None
        and (manifest.checksums.get(l.name) is None or not verify_checksums)]
    try:
      placed = {l.name: _kvstore.read_sharded(url, l.name, l.shape, _global_target(l), l.dtype)
                for l in partial}
      raw = _kvstore.read_arrays(url, [l.name for l in wanted if l.name not in placed])
    except _kvstore.ArrayReadError as e:
      raise CorruptCheckpointError(f"Checkpoint {path!r} is unreadable: {e}.") from e
    wanted = [l for l in wanted if l.name not in placed]
  for holder, group in by_holder.items():
    if holder != path and not os.path.isdir(os.path.join(holder, _knobs.STATE_ITEM)):
      raise CorruptCheckpointError(
          f"Checkpoint {path!r} is incremental and reads '{group[0].name}' (and "
          f"{len(group) - 1} more) from {holder!r}, which no longer exists. Delete "
          "checkpoints through CheckpointManager, which keeps such data.")
    values, matched = _read_group(holder, manifest, group, io_device, reader,
                                  verify_checksums)
    raw.update(values)
    verified |= matched
  if verify_checksums:
    verify_all(path, [(leaf.name, raw[leaf.name], stored_dtype(manifest, leaf.name),
                       manifest.checksums.get(leaf.name)) for leaf in wanted
                      if leaf.name not in verified])
    for name, value in [*((l.name, raw[l.name]) for l in wanted), *placed.items()]:
      sums = manifest.shard_checksums.get(name)
      if sums and value.dtype == stored_dtype(manifest, name):
        verify_shards(path, name, value, sums)
  if reader.host_only:
    return raw
  return {**placed, **{leaf.name: as_tracked_type(leaf, raw[leaf.name]) for leaf in wanted}}


def _read_group(path: str, manifest: Manifest, wanted: list[Leaf],
                io_device: jax.Device | None, reader: Reader,
                verify_checksums: bool) -> tuple[dict[str, Any], set[str]]:
  """Reads ``wanted`` from the checkpoint at ``path`` (its own, or an incremental
  holder's); returns the values and the names whose CRC-32 already matched."""
  fast, verified = {}, set()
  if io_device is None and reader == Reader():  # One process, default devices.
    fast, crcs = _fastread.read(os.path.join(path, _knobs.STATE_ITEM),
                                [(l.name, l.shape, stored_dtype(manifest, l.name))
                                 for l in wanted], checksums=verify_checksums)
    for name, crc in crcs.items():
      expected = manifest.checksums.get(name)
      if expected == crc:
        verified.add(name)
      elif expected is not None:
        # Orbax reads it again, so a fast-path misread cannot pass for a
        # corrupt checkpoint; truly corrupt data then fails its CRC there.
        del fast[name]
  wanted = [l for l in wanted if l.name not in fast]
  if wanted:
    fast.update(_orbax_read_named(path, manifest, wanted, io_device, reader))
  return fast, verified


def _orbax_read_named(path: str, manifest: Manifest, wanted: list[Leaf],
                      io_device: jax.Device | None, reader: Reader) -> dict[str, Any]:
  try:
    return _orbax_read(path, manifest, wanted, io_device, reader)
  except JaxckptError:
    raise
  except Exception as batch_error:
    # Name the broken array: TensorStore's error names a chunk key at best.
    for leaf in wanted:
      try:
        _orbax_read(path, manifest, [leaf], io_device, reader)
      except Exception as e:
        raise CorruptCheckpointError(
            f"Checkpoint {path!r} is unreadable: array '{leaf.name}' failed to load "
            f"({type(e).__name__}: {e}).") from e
    raise CorruptCheckpointError(
        f"Checkpoint {path!r} could not be read ({type(batch_error).__name__}: "
        f"{batch_error}).") from batch_error
