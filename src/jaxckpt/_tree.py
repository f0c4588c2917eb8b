"""Tracked items → flat, named leaves (and back).

Every leaf gets a TF-like name: the item name and its pytree key path joined by
``/`` (``"model/layers/0/kernel"``). Names are what the manifest records, what
`list_variables` shows and what restore matches on, so saving and restoring
only need the two structures to agree on names, not on Python types.

Items are plain pytrees or Flax NNX objects (``nnx.Module``, ``nnx.Optimizer``):
those are read through ``nnx.state`` and restored in place with ``nnx.update``,
like TF restoring variables. Typed PRNG keys are stored as their key data and
re-wrapped on restore. ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` /
``nnx.eval_shape`` models) are restore targets that need no initialization.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxckpt._errors import TreeError

SCALAR_TYPES = (bool, int, float)


def is_numeric_dtype(dtype) -> bool:
  """Numpy's numeric dtypes and bfloat16 (ml_dtypes' others have kind "V")."""
  dtype = np.dtype(dtype)
  return dtype.kind in "biufc" or dtype.name == "bfloat16"


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One named leaf of a tracked item; ``value`` is what gets saved."""

  name: str
  value: Any
  key_impl: str | None = None  # Set for typed PRNG keys (value is their key data).

  @property
  def abstract(self) -> bool:
    return isinstance(self.value, jax.ShapeDtypeStruct)

  @property
  def shape(self) -> tuple[int, ...]:
    shape = getattr(self.value, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(self.value))

  @property
  def dtype(self) -> np.dtype:
    if isinstance(self.value, SCALAR_TYPES):
      return np.asarray(self.value).dtype
    return np.dtype(self.value.dtype)

  @property
  def kind(self) -> str:
    if self.key_impl is not None:
      return f"prng_key:{self.key_impl}"
    if isinstance(self.value, (jax.Array, jax.ShapeDtypeStruct)):
      return "jax"
    if isinstance(self.value, (np.ndarray, np.generic)):
      return "numpy"
    return type(self.value).__name__  # bool / int / float

  @functools.cached_property  # Read by save() twice (budget, snapshot); once computed.
  def nbytes(self) -> int:
    if isinstance(self.value, jax.Array):
      return array_nbytes(self.value)
    nbytes = getattr(self.value, "nbytes", None)
    if nbytes is not None:
      return int(nbytes)
    return math.prod(self.shape) * self.dtype.itemsize


def array_nbytes(value: jax.Array) -> int:
  """``value.nbytes`` without JAX's ``np.size`` call: on save()'s blocking path."""
  return math.prod(value.shape) * value.dtype.itemsize


def _nnx():
  return sys.modules.get("flax.nnx")  # Never import Flax ourselves.


def is_nnx_object(obj: Any) -> bool:
  nnx = _nnx()
  return nnx is not None and isinstance(obj, nnx.Pytree)


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


@functools.cache
def _is_key_dtype(dtype) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _abstract_key_data(value: jax.ShapeDtypeStruct) -> tuple[jax.ShapeDtypeStruct, str]:
  """The shape of an abstract PRNG key's data, and its impl's name.

  ``jax.random.key_impl`` takes only concrete keys; traced, it sees the abstract one.
  """
  impls = []

  def key_data(key):
    impls.append(str(jax.random.key_impl(key)))
    return jax.random.key_data(key)

  return jax.eval_shape(key_data, value), impls[0]


def _to_leaf(name: str, value: Any) -> Leaf:
  # On save()'s blocking path: keep per-leaf work to a few attribute reads.
  if isinstance(value, jax.Array):
    if value.is_deleted():
      raise TreeError(
        f"Leaf '{name}' is a deleted jax.Array (was it donated to a jitted step?). "
        "Save the step's outputs, not its donated inputs."
      )
    if _is_key_dtype(value.dtype):
      return Leaf(name, jax.random.key_data(value), str(jax.random.key_impl(value)))
    return Leaf(name, value)
  if isinstance(value, jax.ShapeDtypeStruct):
    if _is_key_dtype(value.dtype):
      data, impl = _abstract_key_data(value)
      return Leaf(
        name,
        jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(value, "sharding", None)),
        impl,
      )
    return Leaf(name, value)
  if isinstance(value, (np.ndarray, np.generic)):
    if not is_numeric_dtype(value.dtype):
      raise TreeError(
        f"Leaf '{name}' is a numpy array of dtype {value.dtype}; expected a numeric dtype."
      )
    return Leaf(name, value)
  if isinstance(value, SCALAR_TYPES):
    return Leaf(name, value)
  raise TreeError(
    f"Leaf '{name}' is a {type(value).__module__}.{type(value).__qualname__}; "
    "expected a jax.Array, a numpy array or a Python bool/int/float. Remove it "
    "from the tracked item or register its type as a pytree node."
  )


@dataclasses.dataclass
class Item:
  """One tracked item, flattened; `rebuild` puts restored values back."""

  name: str
  obj: Any
  leaves: list[Leaf]
  originals: list[Any]
  treedef: Any
  nnx: bool

  def rebuild(self, restored: Mapping[str, Any]) -> Any:
    """Returns the item with restored values (NNX objects: updated in place)."""
    values = []
    for leaf, original in zip(self.leaves, self.originals, strict=True):
      if leaf.name not in restored:
        values.append(original)
      elif leaf.key_impl is not None:
        values.append(jax.random.wrap_key_data(restored[leaf.name], impl=leaf.key_impl))
      else:
        values.append(restored[leaf.name])
    tree = jax.tree_util.tree_unflatten(self.treedef, values)
    if self.nnx:
      _nnx().update(self.obj, tree)
      return self.obj
    return tree


_NAMES: dict[tuple[str, Any], list[str]] = {}  # (item name, treedef) -> leaf names


def _leaf_names(item_name: str, tree: Any, nnx_object: bool) -> list[str]:
  """Names for the leaves of ``tree``, from its key paths (validated)."""
  names, seen = [], set()
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = list(path)
    if nnx_object and keys and _key_name(keys[-1]) == "value":
      keys.pop()  # nnx.Variable's payload: name the variable, not its attribute.
    parts = [item_name]
    for key in keys:
      part = _key_name(key)
      if not part or "/" in part or "." in part:
        raise TreeError(
          f"Key {part!r} under '{'/'.join(parts)}' cannot name a checkpoint "
          "entry: keys must be non-empty and contain no '/' or '.'. Rename it."
        )
      parts.append(part)
    name = "/".join(parts)
    if name in seen:
      raise TreeError(
        f"Two leaves of item '{item_name}' map to the same name '{name}' "
        "(e.g. dict keys 0 and '0'); make the keys distinct."
      )
    seen.add(name)
    names.append(name)
  return names


def flatten_item(item_name: str, item: Any) -> Item:
  """Flattens one tracked item into named leaves.

  Names depend only on the tree structure, so they are computed once per
  (item, treedef) and cached: building key paths per leaf would be on save()'s
  blocking path.

  Raises:
    TreeError: a leaf has an unsupported type, or a key would make an
      ambiguous name (contains '/' or '.', or collides with another key).
  """
  nnx_object = is_nnx_object(item)
  tree = _nnx().state(item) if nnx_object else item
  values, treedef = jax.tree_util.tree_flatten(tree)
  key = (item_name, treedef)
  names = _NAMES.get(key)
  if names is None:
    names = _leaf_names(item_name, tree, nnx_object)
    if len(_NAMES) > 256:
      _NAMES.clear()
    _NAMES[key] = names
  leaves = [_to_leaf(name, value) for name, value in zip(names, values, strict=True)]
  return Item(item_name, item, leaves, values, treedef, nnx_object)


def flatten_items(items: Mapping[str, Any]) -> list[Item]:
  """Flattens all tracked items."""
  return [flatten_item(name, item) for name, item in items.items()]


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
