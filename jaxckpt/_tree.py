"""Tracked items → flat, named leaves (and back).

Every leaf gets a TF-like name: the item name and its pytree key path joined by
``/`` (``"model/layers/0/kernel"``). Names are what the manifest records, what
`list_variables` shows and what restore matches on, so saving and restoring
only need the two structures to agree on names, not on Python types.

Flax NNX objects slot in here later: an item adapter turns them into leaves
and updates them in place on restore.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxckpt._errors import TreeError

SCALAR_TYPES = (bool, int, float)


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One named leaf of a tracked item."""
  name: str
  value: Any

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(np.shape(self.value))

  @property
  def dtype(self) -> np.dtype:
    if isinstance(self.value, SCALAR_TYPES):
      return np.asarray(self.value).dtype
    return np.dtype(self.value.dtype)

  @property
  def kind(self) -> str:
    if isinstance(self.value, jax.Array):
      return "jax"
    if isinstance(self.value, (np.ndarray, np.generic)):
      return "numpy"
    return type(self.value).__name__  # bool / int / float

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _check_leaf(name: str, value: Any) -> None:
  if isinstance(value, jax.Array):
    if value.is_deleted():
      raise TreeError(
          f"Leaf '{name}' is a deleted jax.Array (was it donated to a jitted step?). "
          "Save the step's outputs, not its donated inputs.")
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      raise TreeError(
          f"Leaf '{name}' is a typed PRNG key array; save jax.random.key_data(key) "
          "and rebuild it with jax.random.wrap_key_data after restore.")
    return
  if isinstance(value, (np.ndarray, np.generic)):
    if value.dtype.kind not in "biufc" and value.dtype.name != "bfloat16":
      raise TreeError(
          f"Leaf '{name}' is a numpy array of dtype {value.dtype}; expected a "
          "numeric dtype.")
    return
  if isinstance(value, SCALAR_TYPES):
    return
  raise TreeError(
      f"Leaf '{name}' is a {type(value).__module__}.{type(value).__qualname__}; "
      "expected a jax.Array, a numpy array or a Python bool/int/float. Remove it "
      "from the tracked item or register its type as a pytree node.")


def flatten_item(item_name: str, item: Any) -> tuple[list[Leaf], Any]:
  """Flattens one tracked item into named leaves and its treedef.

  Raises:
    TreeError: a leaf has an unsupported type, or a key would make an
      ambiguous name (contains '/' or '.', or collides with another key).
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(item)
  leaves = []
  for path, value in with_path:
    parts = [item_name]
    for key in path:
      part = _key_name(key)
      if not part or "/" in part or "." in part:
        raise TreeError(
            f"Key {part!r} under '{'/'.join(parts)}' cannot name a checkpoint "
            "entry: keys must be non-empty and contain no '/' or '.'. Rename it.")
      parts.append(part)
    name = "/".join(parts)
    _check_leaf(name, value)
    leaves.append(Leaf(name, value))
  return leaves, treedef


def flatten_items(
    items: Mapping[str, Any]) -> tuple[dict[str, list[Leaf]], dict[str, Any]]:
  """Flattens all tracked items; returns each item's leaves and treedef."""
  leaves, treedefs, seen = {}, {}, {}
  for item_name, item in items.items():
    item_leaves, treedefs[item_name] = flatten_item(item_name, item)
    for leaf in item_leaves:
      if leaf.name in seen:
        raise TreeError(
            f"Two leaves of item '{item_name}' map to the same name '{leaf.name}' "
            "(e.g. dict keys 0 and '0'); make the keys distinct.")
      seen[leaf.name] = True
    leaves[item_name] = item_leaves
  return leaves, treedefs


def nest(named: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b": x}`` → ``{"a": {"b": x}}``: the tree Orbax saves."""
  root: dict[str, Any] = {}
  for name, value in named.items():
    node = root
    *parents, last = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return root


def unnest(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Inverse of `nest`."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(unnest(value, name))
    else:
      out[name] = value
  return out
