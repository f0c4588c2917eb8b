"""Reading checkpoints without a model: TF's list_variables / load_checkpoint."""

from __future__ import annotations

import os

import numpy as np

from jaxckpt import _knobs
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

  Example:
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
    self._manifest = read_manifest(path)

  @property
  def manifest(self) -> Manifest:
    """jaxckpt's metadata of this checkpoint (leaf names, shapes, dtypes, CRCs)."""
    return self._manifest

  @property
  def save_counter(self) -> int:
    return self._manifest.save_counter

  def _counter(self) -> dict[str, int]:
    return {COUNTER: self._manifest.save_counter} if self._manifest.counter_saved else {}

  def get_variable_to_shape_map(self) -> dict[str, list[int]]:
    shapes = {n: list(i.shape) for n, i in self._manifest.leaves.items()}
    return shapes | {name: [] for name in self._counter()}

  def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
    dtypes = {n: stored_dtype(self._manifest, n) for n in self._manifest.leaves}
    return dtypes | {name: np.dtype(np.int64) for name in self._counter()}

  def has_tensor(self, name: str) -> bool:
    return name in self._manifest.leaves or name in self._counter()

  def get_tensor(self, name: str) -> np.ndarray:
    if name in self._counter() and name not in self._manifest.leaves:
      return np.asarray(self._counter()[name], np.int64)
    info = self._manifest.leaves.get(name)
    if info is None:
      raise VariableNotFoundError(
        f"{name!r} is not in checkpoint {self.path!r}; it has {sorted(self._manifest.leaves)[:10]}."
      )
    template = Leaf(name, np.zeros(info.shape, stored_dtype(self._manifest, name)))
    return read_leaves(self.path, self._manifest, [template])[name]


def load_checkpoint(dir_or_path) -> CheckpointReader | TFCheckpointReader:
  """Returns a `CheckpointReader` for a checkpoint, or a directory's latest one.

  A TensorFlow checkpoint (a prefix with its ``.index`` file, or a directory
  with TF's ``checkpoint`` state file) gives a `TFCheckpointReader`, with TF's
  names and values; TensorFlow need not be installed.
  """
  tf_prefix = find_tf_checkpoint(dir_or_path)
  if tf_prefix is not None:
    return TFCheckpointReader(tf_prefix)
  return CheckpointReader(_resolve(dir_or_path))


def list_variables(dir_or_path) -> list[tuple[str, list[int]]]:
  """Returns ``[(name, shape), ...]`` sorted by name, like ``tf.train.list_variables``."""
  return sorted(load_checkpoint(dir_or_path).get_variable_to_shape_map().items())
