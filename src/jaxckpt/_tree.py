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
Leaves that are not numeric arrays (strings, bytes, big ints, complex, objects
with ``get_state``/``set_state``, numpy Generators) become *value* leaves, stored
in the manifest (see _values.py). A nested `Checkpoint` contributes its items
under its own name (``model/net/w``), as in TF.

Keys containing ``/`` or ``.`` are escaped in names (``%2F``, ``%2E``): ``/``
separates name parts and Orbax joins key paths with ``.``. The manifest keeps the
original keys of escaped names, so a restore without a template gets them back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Mapping
from collections.abc import MutableMapping
from typing import Any
from typing import cast

import jax
import numpy as np

from jaxckpt import _values
from jaxckpt._errors import TreeError

SCALAR_TYPES = (bool, int, float)
_ESCAPES = (("/", "%2F"), (".", "%2E"))


@functools.lru_cache(maxsize=256)
def dtype_name(dtype: Any) -> str:
  """``dtype.name``, cached: numpy computes it in Python (~10 µs), per leaf of a save."""
  return dtype.name


def is_numeric_dtype(dtype) -> bool:
  """Numpy's numeric dtypes and bfloat16 (ml_dtypes' others have kind "V")."""
  dtype = np.dtype(dtype)
  return dtype.kind in "biufc" or dtype.name == "bfloat16"


@dataclasses.dataclass(frozen=True, slots=True)  # Slots: one GC-tracked object per leaf.
class Leaf:
  """One named leaf of a tracked item; ``value`` is what gets saved."""

  name: str
  value: Any  # Value leaves: the value's tagged JSON (_values.encode), taken now.
  key_impl: str | None = None  # Set for typed PRNG keys (value is their key data).
  value_kind: str | None = None  # Set for value leaves: _values.VALUE / STATE / GENERATOR.
  value_shape: tuple[int, ...] = ()  # A value leaf's shape as list_variables shows it.
  # Where the name escapes a key: its full original path (item names, then keys).
  keys: tuple[str, ...] | None = None
  # Computed once (read by the plan and the snapshot): see `nbytes`, `has_data`.
  _nbytes: int | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
  _has_data: bool | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

  @property
  def abstract(self) -> bool:
    return isinstance(self.value, jax.ShapeDtypeStruct)

  @property
  def is_value(self) -> bool:
    """Stored in the manifest, not as an array (see _values.py)."""
    return self.value_kind is not None

  @property
  def has_data(self) -> bool:
    """Whether the layout stores bytes for it: arrays with at least one element
    (Orbax refuses zero-size arrays; the manifest's shape and dtype rebuild them)."""
    if self._has_data is None:
      object.__setattr__(self, "_has_data", self.value_kind is None and math.prod(self.shape) > 0)
    return cast(bool, self._has_data)

  @property
  def shape(self) -> tuple[int, ...]:
    if self.value_kind is not None:
      return self.value_shape
    shape = getattr(self.value, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(self.value))

  @property
  def dtype(self) -> np.dtype:
    if self.value_kind is not None:
      return np.dtype(object)
    if isinstance(self.value, SCALAR_TYPES):
      return np.asarray(self.value).dtype
    return np.dtype(self.value.dtype)

  @property
  def kind(self) -> str:
    if self.value_kind is not None:
      return self.value_kind
    if self.key_impl is not None:
      return f"prng_key:{self.key_impl}"
    if isinstance(self.value, (jax.Array, jax.ShapeDtypeStruct)):
      return "jax"
    if isinstance(self.value, (np.ndarray, np.generic)):
      return "numpy"
    return type(self.value).__name__  # bool / int / float

  @property
  def nbytes(self) -> int:
    # Read by save() twice (budget, snapshot): computed once. (Not a
    # cached_property: on Python 3.11 its lock costs more than the value.)
    if self._nbytes is None:
      object.__setattr__(self, "_nbytes", self._count_bytes())
    return cast(int, self._nbytes)

  def _count_bytes(self) -> int:
    if self.value_kind is not None:
      return 0  # Held by the manifest, not by the snapshot.
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
  if _values.is_plain_value(value):
    return Leaf(
      name, _values.encode(value, name), value_kind=_values.VALUE, value_shape=np.shape(value)
    )
  if isinstance(value, (np.ndarray, np.generic)):
    if not is_numeric_dtype(value.dtype):
      raise TreeError(
        f"Leaf '{name}' is a numpy array of dtype {value.dtype}; expected a numeric, "
        "string or bytes dtype."
      )
    return Leaf(name, value)
  if isinstance(value, SCALAR_TYPES):
    return Leaf(name, value)
  kind = _values.stateful_kind(value)
  if kind is not None:  # Its state now: the object may move on before the write.
    return Leaf(name, _values.encode(_values.get_state(value, kind), name), value_kind=kind)
  raise TreeError(
    f"Leaf '{name}' is a {type(value).__module__}.{type(value).__qualname__}; "
    "expected a jax.Array, a numpy array, a Python scalar, str or bytes, or an "
    "object with get_state()/set_state(). Remove it from the tracked item or "
    "register its type as a pytree node."
  )


@dataclasses.dataclass
class Item:
  """One tracked item, flattened; `rebuild` puts restored values back."""

  name: str  # Its name prefix: the item's name, below its nested Checkpoints' names.
  obj: Any
  leaves: list[Leaf]
  originals: list[Any]
  treedef: Any
  nnx: bool
  # The items dict it is tracked in (its Checkpoint's, maybe a nested one) and its key.
  owner: MutableMapping[str, Any] | None = None
  attr: str = ""

  def rebuild(self, restored: Mapping[str, Any]) -> Any:
    """Returns the item with restored values (NNX objects and stateful objects:
    updated in place)."""
    values = []
    for leaf, original in zip(self.leaves, self.originals, strict=True):
      if leaf.name not in restored:
        values.append(original)
      elif leaf.value_kind in (_values.STATE, _values.GENERATOR):
        _set_state(leaf, original, restored[leaf.name])
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


def _set_state(leaf: Leaf, obj: Any, state: Any) -> None:
  try:
    _values.set_state(obj, cast(str, leaf.value_kind), state)
  except Exception as e:  # The object's own check, e.g. a Grain state of another pipeline.
    raise TreeError(
      f"Restoring '{leaf.name}': {type(obj).__qualname__} refused the checkpoint's "
      f"state ({type(e).__name__}: {e}). Track the same kind of object that was saved."
    ) from e


# (item name, treedef) -> leaf names and, per leaf, its original key path if escaped.
_NAMES: dict[tuple[str, Any], tuple[list[str], list[tuple[str, ...] | None]]] = {}


def escape_key(part: str) -> str:
  """A key as one name part: ``/`` → ``%2F``, ``.`` → ``%2E`` (see the module docstring)."""
  for char, escaped in _ESCAPES:
    part = part.replace(char, escaped)
  return part


def _leaf_names(
  item_name: str, tree: Any, nnx_object: bool
) -> tuple[list[str], list[tuple[str, ...] | None]]:
  """Names for the leaves of ``tree``, from its key paths (validated), and the
  original key paths of the names that escape a key."""
  names: list[str] = []
  originals: list[tuple[str, ...] | None] = []
  seen: dict[str, tuple[str, ...]] = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = list(path)
    if nnx_object and keys and _key_name(keys[-1]) == "value":
      keys.pop()  # nnx.Variable's payload: name the variable, not its attribute.
    raw = tuple(_key_name(key) for key in keys)
    parts = [item_name]
    for part in raw:
      if not part:
        raise TreeError(
          f"An empty key under '{'/'.join(parts)}' cannot name a checkpoint entry. Rename it."
        )
      parts.append(escape_key(part))
    name = "/".join(parts)
    if name in seen:
      raise TreeError(
        f"Two leaves of item '{item_name}' map to the same name '{name}': key paths "
        f"{list(seen[name])} and {list(raw)} (keys 0 and '0' name alike, and a key's "
        "'/' and '.' are stored as '%2F' and '%2E'); make the keys distinct."
      )
    seen[name] = raw
    names.append(name)
    escaped = any(p != escape_key(p) for p in raw)
    originals.append((*item_name.split("/"), *raw) if escaped else None)
  return names, originals


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
  named = _NAMES.get(key)
  if named is None:
    named = _leaf_names(item_name, tree, nnx_object)
    if len(_NAMES) > 256:
      _NAMES.clear()
    _NAMES[key] = named
  names, escaped = named
  leaves = [_to_leaf(name, value) for name, value in zip(names, values, strict=True)]
  for i, keys in enumerate(escaped):
    if keys is not None:
      leaves[i] = dataclasses.replace(leaves[i], keys=keys)
  return Item(item_name, item, leaves, values, treedef, nnx_object)


def nested_items(obj: Any) -> MutableMapping[str, Any] | None:
  """The items of a nested `Checkpoint` (it defines ``_tracked``), else None."""
  tracked = getattr(type(obj), "_tracked", None)
  return tracked(obj) if callable(tracked) else None


def flatten_items(
  items: MutableMapping[str, Any], prefix: str = "", _path: tuple[int, ...] = ()
) -> list[Item]:
  """Flattens all tracked items; a nested `Checkpoint`'s items under its name.

  Raises:
    TreeError: as `flatten_item`, or a Checkpoint tracks itself (a cycle).
  """
  out = []
  for name, item in items.items():
    full = prefix + name
    inner = nested_items(item)
    if inner is None:
      flat = flatten_item(full, item)
      flat.owner, flat.attr = items, name
      out.append(flat)
    elif id(inner) in _path or inner is items:
      raise TreeError(f"Item '{full}' is a Checkpoint that contains itself; remove the cycle.")
    else:
      out.extend(flatten_items(inner, full + "/", (*_path, id(items))))
  return out


def nest(named: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b": x}`` → ``{"a": {"b": x}}``: the tree Orbax saves."""
  return nest_keys({tuple(name.split("/")): value for name, value in named.items()})


def nest_keys(named: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """``{("a", "b.c"): x}`` → ``{"a": {"b.c": x}}``: a tree from key paths."""
  root: dict[str, Any] = {}
  for keys, value in named.items():
    node = root
    *parents, last = keys
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return root
