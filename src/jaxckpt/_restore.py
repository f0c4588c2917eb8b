"""Restore: checkpoint leaves → values shaped like the currently tracked ones.

Only leaves present both in the checkpoint and in the tracked items are read.
Each is read in its stored dtype, checked against its CRC-32, then cast to the
tracked value's dtype and placed in its sharding (so a new mesh reshards) and
Python type. Shapes and dtype kinds are checked for every
leaf before anything is read, so a mismatch changes nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np

from jaxckpt import _compat
from jaxckpt import _values
from jaxckpt._errors import CheckpointDeletedError
from jaxckpt._errors import CoordinationError
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import DtypeMismatchError
from jaxckpt._errors import ShapeMismatchError
from jaxckpt._gcpause import paused
from jaxckpt._integrity import verify_all
from jaxckpt._integrity import verify_shards
from jaxckpt._layout import ONE_PROCESS
from jaxckpt._layout import Reader
from jaxckpt._layout import is_uncommitted
from jaxckpt._layout import layout_of
from jaxckpt._layout import stored_dtype
from jaxckpt._layout import target_sharding
from jaxckpt._manifest import Manifest
from jaxckpt._manifest import digest
from jaxckpt._manifest import is_committed
from jaxckpt._manifest import read_manifest
from jaxckpt._multihost import Coordination
from jaxckpt._multihost import timed_out
from jaxckpt._plan import RestorePlan
from jaxckpt._tree import SCALAR_TYPES
from jaxckpt._tree import Leaf


@functools.lru_cache(maxsize=256)  # Per leaf of a restore; a model has few dtypes.
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


def _value_problem(manifest: Manifest, leaf: Leaf) -> str | None:
  """Why ``leaf`` cannot take the checkpoint's value or array of its name, or None."""
  saved = manifest.values.get(leaf.name)
  if saved is not None:
    if leaf.kind == saved.kind == _values.GENERATOR:
      ours, theirs = _values.decode(leaf.value), saved.value()
      if ours.get("bit_generator") != theirs.get("bit_generator"):
        return (
          f"the checkpoint has a {theirs.get('bit_generator')} Generator but the tracked "
          f"one uses {ours.get('bit_generator')}"
        )
      return None
    if leaf.is_value and leaf.kind == saved.kind:
      return None
    if saved.kind == _values.VALUE and isinstance(leaf.value, SCALAR_TYPES) and not leaf.is_value:
      return None  # A Python scalar takes the saved value (e.g. an int beyond int64).
    return f"the checkpoint has a {saved.kind} but the tracked value is a {leaf.kind}"
  if leaf.is_value and leaf.name in manifest.leaves:
    info = manifest.leaves[leaf.name]
    return (
      f"the checkpoint has a {info.dtype} array of shape {tuple(info.shape)} but the "
      f"tracked value is a {leaf.kind}"
    )
  return None


def _mismatches(manifest: Manifest, leaves: list[Leaf]) -> tuple[list[str], list[str]]:
  """Shape mismatches and dtype/kind mismatches, one line per tracked leaf."""
  shapes, dtypes = [], []
  for leaf in leaves:
    problem = _value_problem(manifest, leaf)
    if problem is not None:
      dtypes.append(f"'{leaf.name}': {problem}")
      continue
    info = manifest.leaves.get(leaf.name)
    if info is None or leaf.is_value:
      continue
    if tuple(info.shape) != leaf.shape:
      shapes.append(f"'{leaf.name}': checkpoint {tuple(info.shape)}, tracked {leaf.shape}")
      continue
    saved, tracked = _group(stored_dtype(manifest, leaf.name)), _group(leaf.dtype)
    if saved != tracked and (saved, tracked) not in _ALLOWED:
      dtypes.append(
        f"'{leaf.name}': checkpoint {info.dtype}, tracked {leaf.dtype.name} (casting "
        f"{saved} to {tracked} would change values)"
      )
  return shapes, dtypes


def check_compatible(path: str, manifest: Manifest, leaves: list[Leaf]) -> None:
  """Checks every tracked leaf against the checkpoint before anything is read.

  Raises:
    ShapeMismatchError: some arrays differ in shape (all are listed, and any
      dtype mismatches too).
    DtypeMismatchError: some arrays' dtypes cannot be cast without changing
      values, or a value's kind differs (e.g. a str where an array is tracked).
  """
  shapes, dtypes = _mismatches(manifest, leaves)
  if not shapes and not dtypes:
    return
  lines = "\n  ".join(shapes + dtypes)
  if shapes:
    raise ShapeMismatchError(
      f"Cannot restore from {path!r}: {len(shapes)} array(s) differ in shape "
      f"(path: checkpoint vs tracked)"
      + (f" and {len(dtypes)} in dtype" if dtypes else "")
      + f":\n  {lines}\nNothing was restored. Build the model with the checkpoint's "
      "shapes, or stop tracking these values."
    )
  raise DtypeMismatchError(
    f"Cannot restore from {path!r}: {len(dtypes)} value(s) differ in dtype or kind:\n"
    f"  {lines}\nNothing was restored. Track values of the checkpoint's dtypes "
    "(restore casts within a kind and from int to float only)."
  )


def as_tracked_type(leaf: Leaf, value: Any) -> Any:
  tracked = leaf.value
  if is_uncommitted(leaf):  # Stays uncommitted, on the default device.
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
    target = target_sharding(leaf)
    return value if getattr(value, "sharding", None) == target else jax.device_put(value, target)
  value = np.asarray(value, dtype=leaf.dtype)
  if isinstance(tracked, np.ndarray):
    return value
  if isinstance(tracked, np.generic):
    return leaf.dtype.type(value)
  return type(tracked)(value.item())


def read_leaves(
  path: str,
  manifest: Manifest,
  leaves: list[Leaf],
  io_device: jax.Device | None = None,
  *,
  verify_checksums: bool = True,
  reader: Reader = ONE_PROCESS,
) -> dict[str, Any]:
  """Reads the leaves of ``leaves`` present in the checkpoint; returns {name: value}.

  With ``reader.host_only`` the values are whole numpy arrays in the stored dtype.

  Values stored in the manifest come back as the saved Python values, zero-size
  arrays (which have no data files) rebuilt from their shape and dtype.

  Raises:
    ShapeMismatchError, DtypeMismatchError: a tracked value cannot take the saved one.
    CorruptCheckpointError: an array's data is unreadable or fails its CRC; the
      message names the checkpoint and the array.
    CheckpointDeletedError: the checkpoint was deleted while it was being read.
  """
  with paused():  # Objects per leaf: see _gcpause.py.
    check_compatible(path, manifest, leaves)
    wanted = stored_arrays(manifest, leaves)
  if not wanted:
    return {} if reader.host_only else without_data(manifest, leaves)
  try:
    read = layout_of(manifest).read(
      path, manifest, wanted, io_device=io_device, reader=reader, verify_checksums=verify_checksums
    )
  except CorruptCheckpointError as e:
    if is_committed(path):
      raise
    # Its data vanished because the checkpoint did: a sweep, not corruption.
    raise CheckpointDeletedError(
      f"Checkpoint {path!r} was deleted while it was being read (e.g. swept by a "
      "CheckpointManager with a small max_to_keep); nothing was restored. Reading the "
      "directory's latest checkpoint again makes sense."
    ) from e
  raw, placed = read.raw, read.placed
  wanted = [l for l in wanted if l.name not in placed]
  if verify_checksums:
    _verify(path, manifest, wanted, read)
  if reader.host_only:
    return raw
  with paused():
    out = {**without_data(manifest, leaves), **placed, **_placed_together(wanted, raw)}
    out.update(
      (leaf.name, as_tracked_type(leaf, raw[leaf.name])) for leaf in wanted if leaf.name in raw
    )
  return out


def _verify(path: str, manifest: Manifest, wanted: list[Leaf], read: Any) -> None:
  """Checks what ``read`` holds against the manifest's CRC-32s (whole arrays and shards)."""
  raw, placed = read.raw, read.placed
  verify_all(
    path,
    [
      (
        leaf.name,
        raw[leaf.name],
        stored_dtype(manifest, leaf.name),
        manifest.checksums.get(leaf.name),
      )
      for leaf in wanted
      if leaf.name not in read.verified
    ],
  )
  for name, value in [*((l.name, raw[l.name]) for l in wanted), *placed.items()]:
    sums = manifest.shard_checksums.get(name)
    if sums and value.dtype == stored_dtype(manifest, name):
      verify_shards(path, name, value, sums)


def stored_arrays(manifest: Manifest, leaves: list[Leaf]) -> list[Leaf]:
  """The tracked leaves whose bytes the checkpoint's layout holds."""
  return [
    l
    for l in leaves
    if l.name in manifest.leaves and not l.is_value and math.prod(manifest.leaves[l.name].shape) > 0
  ]


def without_data(manifest: Manifest, leaves: list[Leaf]) -> dict[str, Any]:
  """What the manifest alone restores: values, and zero-size arrays (no data files)."""
  out = {l.name: manifest.values[l.name].value() for l in leaves if l.name in manifest.values}
  for leaf in leaves:
    info = manifest.leaves.get(leaf.name)
    if info is not None and not leaf.is_value and math.prod(info.shape) == 0:
      out[leaf.name] = as_tracked_type(
        leaf, np.zeros(info.shape, stored_dtype(manifest, leaf.name))
      )
  return out


def _placed_together(wanted: list[Leaf], raw: dict[str, Any]) -> dict[str, Any]:
  """`as_tracked_type` in one batched ``jax.device_put`` for the numpy arrays
  that only need placing, as committed or uncommitted jax.Arrays (one call per
  array costs ~50 µs: most of a restore of thousands of small arrays). Takes
  them out of ``raw``."""
  committed, uncommitted = [], []
  for leaf in wanted:
    value = raw[leaf.name]
    if not isinstance(value, np.ndarray) or value.dtype != leaf.dtype:
      continue
    if is_uncommitted(leaf):
      uncommitted.append(leaf)
    elif isinstance(leaf.value, (jax.Array, jax.ShapeDtypeStruct)):
      committed.append(leaf)
  out: dict[str, Any] = {}
  for group, commit in ((uncommitted, False), (committed, True)):
    if group:
      arrays = _compat.put_host_arrays(
        [raw.pop(leaf.name) for leaf in group],
        [target_sharding(leaf) for leaf in group] if commit else None,
      )
      out.update((leaf.name, a) for leaf, a in zip(group, arrays, strict=True))
  return out


def restore_leaves(
  plan: RestorePlan, leaves: list[Leaf]
) -> tuple[str | None, Manifest | None, dict[str, Any]]:
  """Executes a restore plan: returns (path, manifest, {name: value}); (None, None,
  {}) for a plan that restores nothing.

  With several processes, each checks what it can alone (the manifest, shapes and
  dtypes) and then all agree on the path, the manifest and the leaves to read
  before any reads data: a mixed restore would assemble arrays from several
  steps, and a process that failed alone would leave the others in Orbax's
  barriers. A read that fails on one process fails on all.
  """
  coord = plan.coordination
  if plan.routed and coord is not None:
    from jaxckpt._routed import restore_through  # _routed builds on this module.

    return restore_through(coord, plan.path, leaves, verify_checksums=plan.verify_checksums)
  if coord is None:
    if plan.path is None:
      return None, None, {}
    manifest = read_manifest(plan.path)
    values = read_leaves(
      plan.path, manifest, leaves, plan.io_device, verify_checksums=plan.verify_checksums
    )
    return plan.path, manifest, values
  return _restore_together(plan, coord, leaves)


def _restore_together(
  plan: RestorePlan, coord: Coordination, leaves: list[Leaf]
) -> tuple[str | None, Manifest | None, dict[str, Any]]:
  manifest = None
  try:
    if plan.path is not None:
      manifest = read_manifest(plan.path)
      check_compatible(plan.path, manifest, leaves)
  except Exception as e:
    coord.abandon("restore", e)
    raise
  fields, trees = _restore_fields(plan.path, manifest, leaves)
  coord.agree("restore", fields, trees=trees)
  if plan.path is None or manifest is None:
    return None, None, {}
  reader = Reader(
    processes=frozenset(range(jax.process_count())),
    key_prefix=f"jaxckpt{coord.op}",
    timeout_s=coord.timeout_s,
  )
  try:
    values = read_leaves(
      plan.path,
      manifest,
      leaves,
      plan.io_device,
      verify_checksums=plan.verify_checksums,
      reader=reader,
    )
  except Exception as e:
    elsewhere = coord.failure_elsewhere("read")
    if elsewhere is not None:  # Orbax's barrier gave up on that process.
      raise CoordinationError(
        f"The restore of {plan.path!r} failed on another process: {elsewhere}."
      ) from e
    if timed_out(e):
      raise CoordinationError(
        f"The restore of {plan.path!r} gave up after {coord.timeout_s:g} s waiting for "
        "the other processes inside the read (one may have died or be stuck); the "
        f"checkpoint itself is not known to be damaged. ({type(e).__name__}: {e})"
      ) from e
    coord.abandon("read", e)
    raise
  coord.agree("read", "ok")
  return plan.path, manifest, values


def _restore_fields(
  path: str | None, manifest: Manifest | None, leaves: list[Leaf]
) -> tuple[dict[str, Any], dict[str, list]]:
  """What processes must agree on before a restore reads: fields, and trees."""
  fields: dict[str, Any] = {"path": path}
  trees: dict[str, list] = {}
  if manifest is not None:
    fields["checkpoint"] = f"saved at {manifest.created!r}, {digest(manifest)[:12]}"
    trees["tracked arrays"] = [
      [l.name, list(l.shape), l.dtype.name] for l in leaves if l.name in manifest.leaves
    ]
  return fields, trees
