"""TensorFlow checkpoints as jaxckpt sources: finding them, their names, restoring from them.

A TF checkpoint is a prefix ``p`` with a ``p.index`` file (see _tfbundle.py), or
a directory whose TF ``checkpoint`` state file names one (relative to it). Its
keys become the names jaxckpt restores into, the leaf names of _tree.py::

    net/l1/kernel/.ATTRIBUTES/VARIABLE_VALUE                          → net/l1/kernel
    net/l1/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE → optimizer/m/net/l1/kernel
    emb                      (a TF1 ``Saver`` checkpoint)             → emb

``save_counter`` restores `Checkpoint.save_counter`; the object graph and
values that are not variables (a dataset iterator's state) keep their TF keys
and are reported as unused by the load status.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxckpt import _knobs
from jaxckpt._errors import CheckpointNotFoundError
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import DtypeMismatchError
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._errors import NotACheckpointError
from jaxckpt._errors import ShapeMismatchError
from jaxckpt._errors import VariableNotFoundError
from jaxckpt._multihost import Coordination
from jaxckpt._restore import _ALLOWED
from jaxckpt._restore import _group
from jaxckpt._restore import as_tracked_type
from jaxckpt._store import fspath
from jaxckpt._store import is_url
from jaxckpt._tfbundle import DT_STRING
from jaxckpt._tfbundle import INDEX_SUFFIX
from jaxckpt._tfbundle import Bundle
from jaxckpt._tfbundle import Entry
from jaxckpt._tfbundle import numpy_dtype
from jaxckpt._tfbundle import read_file
from jaxckpt._tree import Leaf
from jaxckpt._tree import escape_key

NameMap = Callable[[str], "str | None"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
SAVE_COUNTER_KEY = "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_SLOT = "/.OPTIMIZER_SLOT/"
_STATE_LINE = re.compile(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*(".*")\s*$')


# -- finding checkpoints ------------------------------------------------------------


def _state_paths(directory: str) -> tuple[str | None, list[str]]:
  """(model_checkpoint_path, all_model_checkpoint_paths) of a TF state file, as written."""
  try:
    text = read_file(os.path.join(directory, _knobs.STATE_FILE_NAME)).decode(errors="replace")
  except (OSError, CorruptCheckpointError):  # No state file, or not a regular file.
    return None, []
  latest, every = None, []
  for line in text.splitlines():
    m = _STATE_LINE.match(line)
    if not m:
      continue
    try:
      value = json.loads(m.group(2))  # TF's text-proto escapes are JSON's for these paths.
    except ValueError:
      continue
    if m.group(1) == "model_checkpoint_path":
      latest = value
    else:
      every.append(value)
  return latest, every


def _inside(directory: str, named: str) -> str | None:
  """``named`` (from the directory's state file) joined to ``directory``, if it stays inside."""
  path = os.path.join(directory, named)
  root = os.path.realpath(directory)
  return path if os.path.realpath(path).startswith(root + os.sep) else None


def _has_tf_files(directory: str) -> bool:
  return any(name.endswith(INDEX_SUFFIX) for name in os.listdir(directory))


def find_tf_checkpoint(dir_or_prefix: Any) -> str | None:
  """The TF checkpoint prefix that ``dir_or_prefix`` names, or None if it names none.

  Raises:
    NotACheckpointError: a directory of TF checkpoints whose state file names a
      checkpoint outside the directory (never followed).
    CheckpointNotFoundError: such a state file names a checkpoint that is gone.
  """
  if dir_or_prefix is None or is_url(dir_or_prefix):
    return None
  path = fspath(dir_or_prefix)
  if os.path.isfile(path + INDEX_SUFFIX):
    return path
  if not os.path.isdir(path):
    return None
  latest, _ = _state_paths(path)
  if latest is None or not _has_tf_files(path):
    return None
  prefix = _inside(path, latest)
  if prefix is None:
    raise NotACheckpointError(
      f"The state file in {path!r} names {latest!r}, outside that directory; jaxckpt reads "
      "only checkpoints inside it. Pass the checkpoint's own path instead."
    )
  if not os.path.isfile(prefix + INDEX_SUFFIX):
    if os.path.isdir(prefix):  # A jaxckpt checkpoint's directory, in a mixed directory.
      return None
    raise CheckpointNotFoundError(
      f"The state file in {path!r} names TF checkpoint {latest!r}, which has no "
      f"{INDEX_SUFFIX} file."
    )
  return prefix


def tf_checkpoints_in(directory: str) -> tuple[list[str], str | None, set[str]]:
  """(TF checkpoint prefixes in ``directory``, the latest, those its state file lists)."""
  prefixes = sorted(
    os.path.join(directory, name[: -len(INDEX_SUFFIX)])
    for name in os.listdir(directory)
    if name.endswith(INDEX_SUFFIX) and not name.startswith(".")
  )
  latest, every = _state_paths(directory)
  inside = {p for p in (_inside(directory, n) for n in every) if p is not None}
  latest_path = None if latest is None else _inside(directory, latest)
  return prefixes, latest_path, inside


# -- names --------------------------------------------------------------------------


def _unescape(part: str) -> str:
  """TF's ``escape_local_name`` reversed: ``..`` is ``.``, ``.S`` is ``/``."""
  return re.sub(r"\.(.)", lambda m: {".": ".", "S": "/"}.get(m.group(1), m.group(0)), part)


def _path(escaped: str) -> str:
  """A TF object path as a leaf name: TF's escapes undone, jaxckpt's applied (_tree.py)."""
  return "/".join(escape_key(_unescape(part)) for part in escaped.split("/"))


def tracked_name(key: str) -> str | None:
  """The leaf name a TF key restores into; None for the object graph and non-variables."""
  if key == OBJECT_GRAPH_KEY:
    return None
  if not key.endswith(_VALUE_SUFFIX):
    return None if "/." in key or key.startswith(".") else key  # TF1 Saver keys are names.
  base = key[: -len(_VALUE_SUFFIX)]
  if _SLOT in base:  # {variable}/.OPTIMIZER_SLOT/{optimizer}/{slot} → {optimizer}/{slot}/{variable}
    variable, slot = base.split(_SLOT, 1)
    return f"{_path(slot)}/{_path(variable)}"
  return _path(base)


class TFCheckpointReader:
  """Reads a TensorFlow checkpoint's tensors as numpy arrays, without TensorFlow.

  What `jaxckpt.load_checkpoint` returns for a TF checkpoint: the names, shapes
  and values are those of ``tf.train.load_checkpoint``; dtypes are numpy's
  (``ml_dtypes.bfloat16`` for bfloat16, ``object`` for strings, which are
  arrays of ``bytes``, and for variants, which cannot be read).

  Example:
    The checkpoint of TF's "Training checkpoints" guide (a jaxckpt test fixture):

    >>> import jaxckpt
    >>> reader = jaxckpt.load_checkpoint("tests/fixtures/tf/guide")
    >>> reader.path, reader.save_counter
    ('tests/fixtures/tf/guide/ckpt-3', 3)
    >>> reader.get_tensor("net/l1/kernel/.ATTRIBUTES/VARIABLE_VALUE").shape
    (1, 5)
    >>> slot = "net/l1/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"
    >>> reader.tracked_names()[slot]
    'optimizer/m/net/l1/kernel'
  """

  def __init__(self, prefix: str):
    self.path = prefix
    self.bundle = Bundle(prefix)

  @property
  def save_counter(self) -> int:
    """The checkpoint's ``save_counter``; 0 if it has none (``write``, ``save_weights``)."""
    if SAVE_COUNTER_KEY not in self.bundle.entries:
      return 0
    return int(self.get_tensor(SAVE_COUNTER_KEY))

  def get_variable_to_shape_map(self) -> dict[str, list[int]]:
    return {k: list(e.shape) for k, e in self.bundle.entries.items()}

  def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
    return {k: numpy_dtype(e.dtype) for k, e in self.bundle.entries.items()}

  def has_tensor(self, name: str) -> bool:
    return name in self.bundle.entries

  def entry(self, name: str) -> Entry:
    """The index entry of tensor ``name`` (TF dtype, shape, shard, slices)."""
    entry = self.bundle.entries.get(name)
    if entry is None:
      known = sorted(self.bundle.entries)[:10]
      raise VariableNotFoundError(
        f"{name!r} is not in TF checkpoint {self.path!r}; it has {known}."
      )
    return entry

  def get_tensor(self, name: str, copy: bool = True) -> np.ndarray:
    """The value of tensor ``name``, checked against its CRC-32C.

    Args:
      name: a TF key.
      copy: False may return a read-only array (one copy fewer).

    Raises:
      VariableNotFoundError: no such tensor. CorruptCheckpointError: its data
        is damaged. UnsupportedTensorError: a variant or other unreadable dtype.
    """
    self.entry(name)
    return self.bundle.read(name, copy=copy)

  def tracked_names(self, name_map: NameMap | None = None) -> dict[str, str]:
    """``{TF key: name}`` for every key `Checkpoint.restore` can restore.

    Args:
      name_map: as `Checkpoint.restore`'s: called with each default name,
        returns the name to restore into, or None to leave the value out.
    """
    names: dict[str, str] = {}
    for key in self.bundle.entries:
      name = tracked_name(key)
      if name is None or key == SAVE_COUNTER_KEY:
        continue
      if name_map is not None:
        name = name_map(name)
      if name is not None:
        names[key] = name
    return names


# -- restoring ----------------------------------------------------------------------


def _check(path: str, reader: TFCheckpointReader, key: str, leaf: Leaf) -> None:
  entry = reader.entry(key)
  if leaf.is_value or entry.dtype == DT_STRING or numpy_dtype(entry.dtype) == np.dtype(object):
    raise DtypeMismatchError(
      f"Cannot restore '{leaf.name}' from TF checkpoint {path!r}: {key} is a "
      f"{entry.dtype_name} tensor but the tracked value is a {leaf.kind}; only numeric "
      "tensors restore into arrays (read strings with load_checkpoint(...).get_tensor)."
    )
  if entry.shape != leaf.shape:
    raise ShapeMismatchError(
      f"Cannot restore '{leaf.name}' from TF checkpoint {path!r} ({key}): it has shape "
      f"{entry.shape} but the tracked value has shape {leaf.shape}. Nothing was restored."
    )
  saved, tracked = _group(numpy_dtype(entry.dtype)), _group(leaf.dtype)
  if saved != tracked and (saved, tracked) not in _ALLOWED:
    raise DtypeMismatchError(
      f"Cannot restore '{leaf.name}' from TF checkpoint {path!r}: it has dtype "
      f"{entry.dtype_name} but the tracked value has dtype {leaf.dtype.name}; casting "
      f"{saved} to {tracked} would change values. Nothing was restored."
    )


def _wanted(
  prefix: str, reader: TFCheckpointReader, leaves: list[Leaf], name_map, skip_slots: bool
) -> tuple[dict[str, str], list[Leaf]]:
  """({name: TF key} the checkpoint holds, the tracked leaves among them), all checked."""
  keys: dict[str, str] = {}
  for key, name in reader.tracked_names(name_map).items():
    if skip_slots and _SLOT in key:
      continue  # CheckpointOptions.experimental_skip_slot_variables, as in TF.
    if name in keys:
      raise InvalidOptionsError(
        f"Both {keys[name]!r} and {key!r} of TF checkpoint {prefix!r} would restore into "
        f"{name!r}; give each its own name with name_map (or None to leave one out)."
      )
    keys[name] = key
  wanted = [leaf for leaf in leaves if leaf.name in keys]
  for leaf in wanted:
    _check(prefix, reader, keys[leaf.name], leaf)
  return keys, wanted


def restore_tf(
  prefix: str,
  leaves: list[Leaf],
  name_map: NameMap | None,
  coordination: Coordination | None = None,
  *,
  skip_slots: bool = False,
) -> tuple[dict[str, Any], set[str], int | None]:
  """Reads the tracked leaves a TF checkpoint holds.

  With several processes each reads the files itself; they agree on the
  checkpoint and the tracked arrays first and on the outcome last, as for
  jaxckpt's own checkpoints, so a failure on one fails the restore on all.

  Returns:
    ({leaf name: value in the tracked value's type, dtype and sharding}, the
    names the checkpoint holds (for the load status), its save_counter or None).

  Raises:
    ShapeMismatchError, DtypeMismatchError: a tracked value cannot take the saved one
      (checked for all before anything is read).
    InvalidOptionsError: two TF keys would restore into one name.
    CorruptCheckpointError: damaged files (the message names the tensor).
    CoordinationError: another process failed, or the processes disagree.
  """
  try:
    reader = TFCheckpointReader(prefix)
    keys, wanted = _wanted(prefix, reader, leaves, name_map, skip_slots)
  except Exception as e:
    if coordination is not None:
      coordination.abandon("restore", e)
    raise
  if coordination is not None:
    index = hashlib.sha256(read_file(reader.bundle.index)).hexdigest()[:12]
    tracked = [[l.name, list(l.shape), l.dtype.name] for l in wanted]
    coordination.agree(
      "restore", {"path": prefix, "checkpoint": f"TF index {index}"}, trees={"tracked": tracked}
    )
  try:
    values = {}
    for leaf in wanted:  # Values bound for devices are copied there: no host copy first.
      on_device = isinstance(leaf.value, (jax.Array, jax.ShapeDtypeStruct))
      value = reader.get_tensor(keys[leaf.name], copy=not on_device)
      values[leaf.name] = as_tracked_type(leaf, value)
  except Exception as e:
    if coordination is not None:
      coordination.abandon("read", e)
    raise
  if coordination is not None:
    coordination.agree("read", "ok")
  mapped = set(keys.values()) | {SAVE_COUNTER_KEY, OBJECT_GRAPH_KEY}
  names = set(keys) | {k for k in reader.bundle.entries if k not in mapped}
  counter = reader.save_counter if SAVE_COUNTER_KEY in reader.bundle.entries else None
  return values, names, counter
