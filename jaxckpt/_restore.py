"""Restore: checkpoint leaves → values shaped like the currently tracked ones.

Only leaves present both in the checkpoint and in the tracked items are read
(Orbax partial restore). Each takes the tracked value's dtype, sharding (so a new
mesh reshards) and Python type. Shapes are checked for every leaf before
anything is read, so a mismatch changes nothing.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxckpt import _knobs
from jaxckpt._errors import ShapeMismatchError
from jaxckpt._manifest import Manifest
from jaxckpt._tree import Leaf, nest


def _restore_args(leaf: Leaf, io_device: jax.Device | None):
  if isinstance(leaf.value, jax.Array):
    sharding = (jax.sharding.SingleDeviceSharding(io_device) if io_device is not None
                else leaf.value.sharding)
    return ocp.ArrayRestoreArgs(sharding=sharding, dtype=leaf.dtype,
                                global_shape=leaf.shape)
  return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)


def _as_tracked_type(leaf: Leaf, value: Any) -> Any:
  tracked = leaf.value
  if isinstance(tracked, jax.Array):
    return value if value.sharding == tracked.sharding else jax.device_put(
        value, tracked.sharding)
  value = np.asarray(value, dtype=leaf.dtype)
  if isinstance(tracked, np.ndarray):
    return value
  if isinstance(tracked, np.generic):
    return leaf.dtype.type(value)
  return type(tracked)(value.item())


def check_shapes(path: str, manifest: Manifest, leaves: list[Leaf]) -> None:
  for leaf in leaves:
    info = manifest.leaves.get(leaf.name)
    if info is not None and tuple(info.shape) != leaf.shape:
      raise ShapeMismatchError(
          f"Cannot restore '{leaf.name}' from {path!r}: the checkpoint has shape "
          f"{tuple(info.shape)} but the tracked value has shape {leaf.shape}. "
          "Nothing was restored. Build the model with the checkpoint's shapes, or "
          "stop tracking this value.")


def read_leaves(path: str, manifest: Manifest, leaves: list[Leaf],
                io_device: jax.Device | None = None) -> dict[str, Any]:
  """Reads the leaves of ``leaves`` present in the checkpoint; returns {name: value}."""
  check_shapes(path, manifest, leaves)
  wanted = [l for l in leaves if l.name in manifest.leaves]
  if not wanted:
    return {}
  item = nest({l.name: jax.ShapeDtypeStruct(l.shape, l.dtype) for l in wanted})
  restore_args = nest({l.name: _restore_args(l, io_device) for l in wanted})
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        os.path.abspath(os.path.join(path, _knobs.STATE_ITEM)),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                    partial_restore=True))
  out = {}
  for leaf in wanted:
    node = restored
    for part in leaf.name.split("/"):
      node = node[part]
    out[leaf.name] = _as_tracked_type(leaf, node)
  return out
