"""Reading checkpoints without a model: TF's list_variables / load_checkpoint."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxckpt import _knobs
from jaxckpt._background import wait_for_saves_into
from jaxckpt._errors import CheckpointNotFoundError
from jaxckpt._errors import VariableNotFoundError
from jaxckpt._layout import stored_dtype
from jaxckpt._manifest import Manifest
from jaxckpt._manifest import is_committed
from jaxckpt._manifest import read_manifest
from jaxckpt._restore import read_leaves
from jaxckpt._state_file import latest_checkpoint
from jaxckpt._store import fspath
from jaxckpt._store import store_for
from jaxckpt._tfcheckpoint import TFCheckpointReader
from jaxckpt._tfcheckpoint import find_tf_checkpoint
from jaxckpt._tree import Leaf
from jaxckpt._tree import nest_keys


def _resolve(dir_or_path) -> str:
  """A checkpoint's path, or the latest checkpoint of a directory with a state file."""
  path = fspath(dir_or_path)
  if is_committed(path):
    return path
  store = store_for(path)
  latest = latest_checkpoint(path)
  if latest is not None:
    return latest
  if store.read_bytes(store.join(path, _knobs.STATE_FILE_NAME)) is not None:
    raise CheckpointNotFoundError(f"The state file in {path!r} names no committed checkpoint.")
  if os.path.isdir(path):
    raise CheckpointNotFoundError(
      f"{path!r} is neither a checkpoint nor a directory with a "
      f"'{_knobs.STATE_FILE_NAME}' state file."
    )
  return path  # read_manifest says what is wrong with it.


COUNTER = "save_counter"  # Listed like TF's (int64, shape []); never an item name.


class CheckpointReader:
  """Reads one checkpoint's variables as numpy arrays (TF's ``CheckpointReader``).

  As in TF, ``save_counter`` is listed too (int64, shape ``[]``) unless the
  checkpoint was written by a Checkpoint that never saved.


  Usually made by `load_checkpoint`. Variable names are the leaves' tree paths
  joined with ``/`` (``"model/w"``).

  Args:
    path: a committed checkpoint's path (local or a kvstore URL).

  Raises:
    CheckpointNotFoundError: nothing is at ``path``.
    NotACheckpointError: something is there, but not a committed checkpoint.

  Examples:
    >>> import jaxckpt, jax.numpy as jnp, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = jaxckpt.Checkpoint(model={"w": jnp.ones((2, 3))}).save(d + "/ckpt")
    >>> reader = jaxckpt.load_checkpoint(d)
    >>> reader.get_variable_to_shape_map()
    {'model/w': [2, 3], 'save_counter': []}
    >>> reader.get_tensor("model/w").sum()
    np.float32(6.0)
  """

  def __init__(self, path: str):
    self.path = path
    wait_for_saves_into(path)  # A save of this process may still be writing it.
    self._manifest = read_manifest(path)

  @property
  def manifest(self) -> Manifest:
    """jaxckpt's metadata of this checkpoint (leaf names, shapes, dtypes, CRCs).

    Examples:
      >>> import jaxckpt, tempfile
      >>> d = tempfile.mkdtemp()
      >>> _ = jaxckpt.Checkpoint(step=1).save(d + "/ckpt")
      >>> manifest = jaxckpt.load_checkpoint(d).manifest
      >>> manifest.version, manifest.kind, sorted(manifest.leaves)
      (2, 'save', ['step'])
    """
    return self._manifest

  @property
  def save_counter(self) -> int:
    """The `Checkpoint.save_counter` recorded in the checkpoint.

    Examples:
      >>> import jaxckpt, tempfile
      >>> d = tempfile.mkdtemp()
      >>> _ = jaxckpt.Checkpoint(step=1).save(d + "/ckpt")
      >>> jaxckpt.load_checkpoint(d).save_counter
      1
    """
    return self._manifest.save_counter

  def _counter(self) -> dict[str, int]:
    return {COUNTER: self._manifest.save_counter} if self._manifest.counter_saved else {}

  def get_variable_to_shape_map(self) -> dict[str, list[int]]:
    """Returns every variable's shape: arrays, values stored in the manifest
    (strings: ``[]``) and ``save_counter``.

    Returns:
      ``{name: shape}``, each shape a list of ints.

    Examples:
      >>> import jaxckpt, numpy as np, tempfile
      >>> d = tempfile.mkdtemp()
      >>> _ = jaxckpt.Checkpoint(w=np.zeros((2, 3)), step=4).save(d + "/ckpt")
      >>> jaxckpt.load_checkpoint(d).get_variable_to_shape_map()
      {'step': [], 'w': [2, 3], 'save_counter': []}
    """
    values = {n: list(v.shape) for n, v in self._manifest.values.items()}
    shapes = {**{n: list(i.shape) for n, i in self._manifest.leaves.items()}, **values}
    return shapes | {name: [] for name in self._counter()}

  def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
    """Returns every variable's stored dtype (``object`` for values that are not
    numpy arrays).

    Returns:
      ``{name: numpy dtype}``.

    Examples:
      >>> import jaxckpt, numpy as np, tempfile
      >>> d = tempfile.mkdtemp()
      >>> _ = jaxckpt.Checkpoint(w=np.zeros(2, np.float16)).save(d + "/ckpt")
      >>> jaxckpt.load_checkpoint(d).get_variable_to_dtype_map()
      {'w': dtype('float16'), 'save_counter': dtype('int64')}
    """
    values = {n: _value_dtype(v.value()) for n, v in self._manifest.values.items()}
    dtypes = {**{n: stored_dtype(self._manifest, n) for n in self._manifest.leaves}, **values}
    return dtypes | {name: np.dtype(np.int64) for name in self._counter()}

  def has_tensor(self, name: str) -> bool:
    """Returns whether the checkpoint has a variable called ``name``.

    Args:
      name: a variable name, e.g. ``"model/w"``.

    Returns:
      True if the checkpoint holds it.

    Examples:
      >>> import jaxckpt, tempfile
      >>> d = tempfile.mkdtemp()
      >>> _ = jaxckpt.Checkpoint(model={"w": 1.0}).save(d + "/ckpt")
      >>> reader = jaxckpt.load_checkpoint(d)
      >>> reader.has_tensor("model/w"), reader.has_tensor("model/b")
      (True, False)
    """
    return name in self._manifest.names or name in self._counter()

  def get_tensor(self, name: str) -> Any:
    """Reads one variable, checking its CRC-32.

    Args:
      name: a variable name, e.g. ``"model/w"``.

    Returns:
      The array (numpy, in its stored dtype) or value (its Python type).

    Raises:
      VariableNotFoundError: the checkpoint has no such variable (a KeyError).
      CorruptCheckpointError: its data fails the CRC-32 or cannot be decoded.

    Examples:
      >>> import jaxckpt, numpy as np, tempfile
      >>> d = tempfile.mkdtemp()
      >>> _ = jaxckpt.Checkpoint(model={"w": np.arange(3.0)}).save(d + "/ckpt")
      >>> jaxckpt.load_checkpoint(d).get_tensor("model/w")
      array([0., 1., 2.])
    """
    if name in self._counter() and name not in self._manifest.names:
      return np.asarray(self._counter()[name], np.int64)
    if name not in self._manifest.names:
      raise VariableNotFoundError(
        f"{name!r} is not in checkpoint {self.path!r}; it has {sorted(self._manifest.names)[:10]}."
      )
    return read_leaves(self.path, self._manifest, [self._template(name)])[name]

  def _template(self, name: str) -> Leaf:
    value = self._manifest.values.get(name)
    if value is not None:
      return Leaf(name, value.data, value_kind=value.kind, value_shape=value.shape)
    info = self._manifest.leaves[name]
    # Only its shape and dtype are used: a zero-byte view, so that a shape in
    # the manifest allocates nothing before the read checks it.
    return Leaf(name, np.broadcast_to(np.empty((), stored_dtype(self._manifest, name)), info.shape))

  def to_tree(self) -> dict[str, Any]:
    """The whole checkpoint as nested dicts and lists, without a template.

    Arrays come back as numpy arrays in their stored dtype (place them with
    ``jax.device_put`` and the shardings you want), values as their Python
    types, keys with ``/`` or ``.`` as they were. A dict whose keys are exactly
    ``0 .. n-1`` comes back as a list (the names cannot tell them apart).

    Returns:
      The tree: nested dicts and lists of numpy arrays and Python values.

    Raises:
      CorruptCheckpointError: an array fails its CRC-32 or cannot be decoded.

    Examples:
      >>> import jaxckpt, jax.numpy as jnp, tempfile
      >>> ckpt = jaxckpt.Checkpoint(model={"w": jnp.ones(2)}, step=3)
      >>> path = ckpt.write(tempfile.mkdtemp() + "/c")
      >>> jaxckpt.load_checkpoint(path).to_tree()
      {'model': {'w': array([1., 1.], dtype=float32)}, 'step': array(3)}
    """
    names = sorted(self._manifest.names)
    values = read_leaves(self.path, self._manifest, [self._template(n) for n in names])
    return _listify(nest_keys({self._key_path(n): values[n] for n in names}))

  def _key_path(self, name: str) -> tuple[str, ...]:
    return self._manifest.key_paths.get(name) or tuple(name.split("/"))


def _value_dtype(value: Any) -> np.dtype:
  return value.dtype if isinstance(value, (np.ndarray, np.generic)) else np.dtype(object)


def _listify(node: Any) -> Any:
  if not isinstance(node, dict):
    return node
  node = {k: _listify(v) for k, v in node.items()}
  if node and sorted(node) == sorted(str(i) for i in range(len(node))):
    return [node[str(i)] for i in range(len(node))]
  return node


def load_checkpoint(dir_or_path) -> CheckpointReader | TFCheckpointReader:
  """Returns a `CheckpointReader` for a checkpoint, or a directory's latest one.

  A TensorFlow checkpoint (a prefix with its ``.index`` file, or a directory
  with TF's ``checkpoint`` state file) gives a `TFCheckpointReader`, with TF's
  names and values; TensorFlow need not be installed.

  Args:
    dir_or_path: a checkpoint's path, or a directory whose state file names
      its latest checkpoint (local or a kvstore URL).

  Returns:
    A `CheckpointReader`, or a `TFCheckpointReader` for a TF checkpoint.

  Raises:
    CheckpointNotFoundError: no committed checkpoint is there.
    NotACheckpointError: something is there, but not a committed checkpoint
      (or a TF state file names a checkpoint outside its directory).
    CorruptCheckpointError: a TF checkpoint's index is damaged.

  Examples:
    >>> import jaxckpt, tempfile
    >>> d = tempfile.mkdtemp()
    >>> ckpt = jaxckpt.Checkpoint(step=1)
    >>> _ = ckpt.save(d + "/ckpt"); _ = ckpt.save(d + "/ckpt")
    >>> jaxckpt.load_checkpoint(d).path
    '...ckpt-2'
  """
  tf_prefix = find_tf_checkpoint(dir_or_path)
  if tf_prefix is not None:
    return TFCheckpointReader(tf_prefix)
  return CheckpointReader(_resolve(dir_or_path))


def list_variables(dir_or_path) -> list[tuple[str, list[int]]]:
  """Lists a checkpoint's variables, like ``tf.train.list_variables``.

  Args:
    dir_or_path: a checkpoint's path, or a directory (its latest checkpoint).

  Returns:
    ``[(name, shape), ...]`` sorted by name, each shape a list of ints.

  Raises:
    CheckpointNotFoundError: as `load_checkpoint`; also NotACheckpointError.

  Examples:
    >>> import jaxckpt, numpy as np, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = jaxckpt.Checkpoint(params={"b": np.zeros(2), "w": np.zeros((2, 2))}).save(d + "/c")
    >>> jaxckpt.list_variables(d)
    [('params/b', [2]), ('params/w', [2, 2]), ('save_counter', [])]
  """
  return sorted(load_checkpoint(dir_or_path).get_variable_to_shape_map().items())
