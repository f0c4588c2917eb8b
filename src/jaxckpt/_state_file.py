"""TF's text state file ``checkpoint``: which checkpoint in a directory is latest.

Same format as TF's ``CheckpointState`` text proto, so TF tools read it::

    model_checkpoint_path: "ckpt-2"
    all_model_checkpoint_paths: "ckpt-2"

Paths inside the directory are stored relative to it. The file is rewritten
atomically (temp file, fsync, ``os.replace``, fsync of the directory).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from jaxckpt import _knobs
from jaxckpt._errors import CheckpointNotFoundError
from jaxckpt._manifest import is_committed
from jaxckpt._store import fspath
from jaxckpt._store import store_for


@dataclasses.dataclass
class CheckpointState:
  model_checkpoint_path: str
  all_model_checkpoint_paths: list[str]
  all_model_checkpoint_timestamps: list[float] = dataclasses.field(default_factory=list)
  last_preserved_timestamp: float | None = None
  # Checkpoints a manager deletes right after writing this file; written as
  # comments (TF's parser skips them) so a kill before the deletion is finished
  # by the next manager instead of leaving them on disk, unlisted, forever.
  sweeping: list[str] = dataclasses.field(default_factory=list)


_LINE = re.compile(r"^\s*(\w+)\s*:\s*(.+?)\s*$")
_SWEEPING = "# jaxckpt_sweeping: "


def _quote(text: str) -> str:
  # JSON string escaping is a subset of text-proto escaping for these paths.
  return json.dumps(text)


def _unquote(text: str) -> str:
  if text.startswith("'") and text.endswith("'"):
    text = '"' + text[1:-1].replace('"', '\\"') + '"'
  return json.loads(text)


def state_file_path(directory: str) -> str:
  return store_for(directory).join(directory or ".", _knobs.STATE_FILE_NAME)


def relative_to(store, directory: str, path: str) -> str:
  """``path`` relative to ``directory``, which holds it (``"ckpt-1"``, ``"sub/ckpt-1"``)."""
  root = store.absolute(directory or ".").rstrip("/")
  return store.absolute(path)[len(root) + 1 :]


def _relative(directory: str, path: str) -> str:
  store = store_for(directory)
  inside = store_for(path) is store and store.within(path, directory or ".")
  if inside and store.absolute(path) != store.absolute(directory or "."):
    return relative_to(store, directory, path)
  return path


def _absolute(directory: str, path: str) -> str:
  # Joined as TF joins them: latest_checkpoint("") gives "ckpt-1", not "./ckpt-1".
  return store_for(directory).resolve(directory, path) if directory else path


def format_state(directory: str, state: CheckpointState) -> str:
  lines = [f"model_checkpoint_path: {_quote(_relative(directory, state.model_checkpoint_path))}"]
  lines += [
    f"all_model_checkpoint_paths: {_quote(_relative(directory, p))}"
    for p in state.all_model_checkpoint_paths
  ]
  lines += [
    f"all_model_checkpoint_timestamps: {t!r}" for t in state.all_model_checkpoint_timestamps
  ]
  if state.last_preserved_timestamp is not None:
    lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
  lines += [f"{_SWEEPING}{_quote(_relative(directory, p))}" for p in state.sweeping]
  return "\n".join(lines) + "\n"


def write_state(directory: str, state: CheckpointState) -> None:
  """Atomically replaces ``<directory>/checkpoint``."""
  directory = directory or "."
  store_for(directory).replace_file(
    state_file_path(directory), format_state(directory, state).encode()
  )


def read_state(directory: str) -> CheckpointState | None:
  """Parses ``<directory>/checkpoint``; None if absent. Paths come back absolute-joined."""
  data = store_for(directory).read_bytes(state_file_path(directory))
  if data is None:
    return None
  state = CheckpointState("", [])
  for line in data.decode(errors="replace").splitlines():
    if line.startswith(_SWEEPING):
      try:
        state.sweeping.append(_absolute(directory, _unquote(line[len(_SWEEPING) :])))
      except (ValueError, TypeError):
        pass
      continue
    m = _LINE.match(line)
    if not m:
      continue
    key, value = m.groups()
    try:
      if key == "model_checkpoint_path":
        state.model_checkpoint_path = _absolute(directory, _unquote(value))
      elif key == "all_model_checkpoint_paths":
        state.all_model_checkpoint_paths.append(_absolute(directory, _unquote(value)))
      elif key == "all_model_checkpoint_timestamps":
        state.all_model_checkpoint_timestamps.append(float(value))
      elif key == "last_preserved_timestamp":
        state.last_preserved_timestamp = float(value)
    except (ValueError, TypeError):  # A damaged line: skipped, as TF's parser would fail.
      continue
  return state if state.model_checkpoint_path else None


def get_checkpoint_state(checkpoint_dir: str | os.PathLike) -> CheckpointState | None:
  """Returns the parsed ``checkpoint`` state file of a directory, or None if it has none.

  Like ``tf.train.get_checkpoint_state``: paths come back joined to the
  directory, and ``last_preserved_timestamp`` is 0.0 where the file has none
  (the proto default).

  Args:
    checkpoint_dir: the directory (local or a kvstore URL).

  Returns:
    A `CheckpointState` (``model_checkpoint_path``, ``all_model_checkpoint_paths``,
    ``all_model_checkpoint_timestamps``, ``last_preserved_timestamp``), or None.

  Raises:
    NotACheckpointError: the state file is damaged.

  Examples:
    >>> import jaxckpt, jax.numpy as jnp, tempfile
    >>> d = tempfile.mkdtemp()
    >>> path = jaxckpt.Checkpoint(step=jnp.array(0)).save(d + "/ckpt")
    >>> state = jaxckpt.train.get_checkpoint_state(d)
    >>> state.model_checkpoint_path == path, state.all_model_checkpoint_paths == [path]
    (True, True)
  """
  state = read_state(fspath(checkpoint_dir))
  if state is None:
    return None
  return dataclasses.replace(state, last_preserved_timestamp=state.last_preserved_timestamp or 0.0)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
  """Returns the path of the newest committed checkpoint in a directory, or None.

  Reads the ``checkpoint`` state file that `Checkpoint.save` maintains, like
  ``tf.train.latest_checkpoint``. A path the state file names but that is not a
  committed checkpoint (deleted, or an interrupted save) gives None. In a
  directory of TensorFlow checkpoints it is TF's latest (a prefix such as
  ``ckpt-3``), which `Checkpoint.restore` and `load_checkpoint` read.

  Args:
    checkpoint_dir: the directory (local or a kvstore URL).

  Returns:
    The newest checkpoint's path, or None if there is none (e.g. a fresh
    directory; `Checkpoint.restore` accepts None).

  Raises:
    InvalidPathError: ``checkpoint_dir`` is a URL that names no bucket.

  Examples:
    >>> import jaxckpt, jax.numpy as jnp, tempfile
    >>> d = tempfile.mkdtemp()
    >>> path = jaxckpt.Checkpoint(step=jnp.array(0)).save(d + "/ckpt")
    >>> jaxckpt.latest_checkpoint(d) == path
    True
  """
  directory = fspath(checkpoint_dir)
  state = read_state(directory)
  if state is None or not is_committed(state.model_checkpoint_path):
    return _latest_tf_checkpoint(directory)
  return state.model_checkpoint_path


def _latest_tf_checkpoint(directory: str) -> str | None:
  """The TF checkpoint a directory's state file names (a prefix), or None."""
  from jaxckpt._tfcheckpoint import find_tf_checkpoint  # Imported late: it builds on _restore.

  if not os.path.isdir(directory):  # Local directories only; a TF prefix is no directory.
    return None
  try:
    return find_tf_checkpoint(directory)
  except CheckpointNotFoundError:  # Named but gone: None, as tf.train.latest_checkpoint.
    return None
