"""`CheckpointManager`: TF's ``tf.train.CheckpointManager`` on jaxckpt saves."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxckpt import _tiers
from jaxckpt._background import wait_for_saves_into
from jaxckpt._checkpoint import Checkpoint
from jaxckpt._checkpoint import _check_options
from jaxckpt._checkpoint import save_checkpoint
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._future import SavePath
from jaxckpt._incremental import retire_or_remove
from jaxckpt._manifest import data_of
from jaxckpt._manifest import is_committed
from jaxckpt._multihost import is_primary
from jaxckpt._options import CheckpointOptions
from jaxckpt._plan import SaveRequest
from jaxckpt._state_file import CheckpointState
from jaxckpt._state_file import read_state
from jaxckpt._state_file import write_state
from jaxckpt._store import fspath
from jaxckpt._store import store_for

logger = logging.getLogger("jaxckpt")


def _positive_or_none(name: str, value, *, number=(int,)) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, number) or value <= 0):
    raise InvalidOptionsError(f"{name} must be None or a positive number, got {value!r}.")


def _read_step(step_counter) -> int:
  value = step_counter() if callable(step_counter) else step_counter
  return int(np.asarray(value))


class CheckpointManager:
  """Keeps the newest ``max_to_keep`` checkpoints of a `Checkpoint` in a directory.

  Same constructor, methods and semantics as ``tf.train.CheckpointManager``:
  numbered saves (``checkpoint_number`` or the save counter), deletion beyond
  ``max_to_keep`` (``None`` keeps all), one kept every
  ``keep_checkpoint_every_n_hours``, save intervals by ``step_counter``, and
  state recovered from the directory's ``checkpoint`` file. With async options
  the sweep and state-file update run after the commit, on the background
  thread. ``step_counter`` may be an int-like value or a zero-argument callable
  returning one (JAX arrays are immutable, so a callable is usually right).

  A local tier (keyword-only ``local_directory``, ``local_interval``,
  ``local_max_to_keep``) adds frequent per-process saves to a host-local
  directory such as ``/dev/shm/run``: every ``local_interval`` steps each
  process writes the shards it holds plus a replica of its ring neighbour's
  (moved by a JAX collective), keeping ``local_max_to_keep`` steps. Saves are
  then numbered by step (``checkpoint_number``, else ``step_counter``), and
  `restore_or_initialize` restores the newest step that is complete in some
  tier, preferring the local one; ``restored_tier`` says which was used.

  Example:
    >>> import jaxckpt, jax.numpy as jnp, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> ckpt = jaxckpt.Checkpoint(w=jnp.ones(2))
    >>> manager = jaxckpt.CheckpointManager(ckpt, d, max_to_keep=2)
    >>> for _ in range(4):
    ...   _ = manager.save()
    >>> [os.path.basename(p) for p in manager.checkpoints]
    ['ckpt-3', 'ckpt-4']
  """

  def __init__(
    self,
    checkpoint: Checkpoint,
    directory: str | os.PathLike,
    max_to_keep: int | None,
    keep_checkpoint_every_n_hours: float | None = None,
    checkpoint_name: str = "ckpt",
    step_counter: Any = None,
    checkpoint_interval: int | None = None,
    init_fn: Callable[[], Any] | None = None,
    *,
    local_directory: str | os.PathLike | None = None,
    local_interval: int = 1,
    local_max_to_keep: int = 2,
  ):
    if not isinstance(checkpoint, Checkpoint):
      raise InvalidOptionsError(
        f"checkpoint must be a jaxckpt.Checkpoint, got {type(checkpoint).__name__}."
      )
    _positive_or_none("max_to_keep", max_to_keep)
    _positive_or_none(
      "keep_checkpoint_every_n_hours", keep_checkpoint_every_n_hours, number=(int, float)
    )
    _positive_or_none("checkpoint_interval", checkpoint_interval)
    if checkpoint_interval is not None and step_counter is None:
      raise InvalidOptionsError("step_counter must be given when checkpoint_interval is.")
    if not checkpoint_name or "/" in checkpoint_name:
      raise InvalidOptionsError(
        f"checkpoint_name must be a non-empty file name, got {checkpoint_name!r}."
      )
    self._checkpoint = checkpoint
    self._directory = fspath(directory)
    self._store = store_for(self._directory)
    if os.path.exists(self._directory) and not os.path.isdir(self._directory):
      raise InvalidOptionsError(f"directory {self._directory!r} exists and is not a directory.")
    self._max_to_keep = max_to_keep
    self._keep_every_n_hours = keep_checkpoint_every_n_hours
    self._prefix = self._store.join(self._directory, checkpoint_name)
    self._step_counter = step_counter
    self._checkpoint_interval = checkpoint_interval
    self._init_fn = init_fn
    self._last_checkpoint_step: int | None = None
    self._local = _tiers.local_tier(local_directory, local_interval, local_max_to_keep)
    self.restored_tier: str | None = None  # "local" or "persistent" after restore_or_initialize.
    # Guards the recorded state (also used by the save thread). Reentrant: a
    # SIGTERM handler's save may run while the main thread holds it.
    self._lock = threading.RLock()
    self._save_lock = threading.RLock()  # One interval decision and save at a time.
    self._recover()

  def _recover(self) -> None:
    """Reads the directory's state file; drops leftovers of interrupted saves."""
    now = time.time()
    wait_for_saves_into(self._directory)  # Their staging data looks like leftovers.
    if is_primary():
      removed = self._store.remove_leftovers(self._directory, data_of)
      if removed:
        logger.info("Deleted what interrupted saves left in %s: %s.", self._directory, removed)
    state = read_state(self._directory)
    self._maybe_delete: collections.OrderedDict[str, float] = collections.OrderedDict()
    self._latest: str | None = None
    self._last_preserved = now
    if state is None:
      return
    timestamps = state.all_model_checkpoint_timestamps
    if len(timestamps) != len(state.all_model_checkpoint_paths):
      timestamps = [now] * len(state.all_model_checkpoint_paths)
    for path, stamp in zip(state.all_model_checkpoint_paths, timestamps, strict=True):
      if self._owns(path) and is_committed(path):
        self._maybe_delete[self._user_path(path)] = stamp
    if state.last_preserved_timestamp is not None and state.last_preserved_timestamp <= now:
      self._last_preserved = state.last_preserved_timestamp
    if is_committed(state.model_checkpoint_path):
      self._latest = self._user_path(state.model_checkpoint_path)

  def _owns(self, path: str) -> bool:
    """Whether ``path`` is one of this manager's own (deletable) checkpoints: a
    state file naming anything outside its directory never makes it delete that."""
    return store_for(path) is self._store and self._store.parent_of(path, self._directory)

  def _user_path(self, path: str) -> str:
    """State-file paths come back joined to the directory; keep the user's spelling."""
    if self._owns(path):
      return self._store.join(self._directory, self._store.basename(path))
    return path

  # -- TF's read-only properties -------------------------------------------

  @property
  def directory(self) -> str:
    return self._directory

  @property
  def checkpoint(self) -> Checkpoint:
    return self._checkpoint

  @property
  def checkpoint_interval(self) -> int | None:
    return self._checkpoint_interval

  @property
  def checkpoints(self) -> list[str]:
    """Managed checkpoints, oldest first (those kept forever are not listed)."""
    with self._lock:
      return list(self._maybe_delete)

  @property
  def latest_checkpoint(self) -> str | None:
    with self._lock:
      return self._latest

  # -- saving ----------------------------------------------------------------

  def save(
    self,
    checkpoint_number: int | None = None,
    check_interval: bool = True,
    options: CheckpointOptions | None = None,
  ) -> SavePath | None:
    """Saves a numbered checkpoint; returns its path, or None if skipped by the interval.

    The sweep beyond ``max_to_keep`` and the state-file update run after the
    commit (on the background thread for async saves).
    """
    options = _check_options(options)
    with self._save_lock:
      if self._local is None:
        return self._save(checkpoint_number, check_interval, options)
      step = None if self._step_counter is None else _read_step(self._step_counter)
      number = _tiers.numbered(checkpoint_number, step)
      path = self._save(number, check_interval, options)
      if self._local.due(_read_step(number)):
        self._local.save(self._checkpoint, _read_step(number), options.timeout_s)
      return path

  def _save(
    self, checkpoint_number, check_interval: bool, options: CheckpointOptions
  ) -> SavePath | None:
    if self._checkpoint_interval is not None:
      step = _read_step(self._step_counter)
      if self._last_checkpoint_step is not None:
        if step == self._last_checkpoint_step:
          return None
        if check_interval and step < self._last_checkpoint_step + self._checkpoint_interval:
          return None
      self._last_checkpoint_step = step
    if checkpoint_number is not None:
      checkpoint_number = _read_step(checkpoint_number)
    prefix = self._prefix

    def path_for(counter: int) -> str:
      return f"{prefix}-{counter if checkpoint_number is None else checkpoint_number}"

    return save_checkpoint(
      self._checkpoint, SaveRequest(path_for, "save", self._record_and_sweep), options
    )

  def _record_and_sweep(self, path: str, owner: bool = True) -> None:
    with self._lock:
      self._maybe_delete.pop(path, None)
      self._maybe_delete[path] = time.time()
      self._latest = path
      doomed = self._sweep()
      if not owner:  # Every process tracks the list; one owns the files.
        return
      self._record_state(path)
    if doomed:  # After the state file stops naming them.
      retire_or_remove(doomed, self._directory)
      logger.info("Swept old checkpoints %s.", ", ".join(doomed))

  def _sweep(self) -> list[str]:
    doomed: list[str] = []
    if self._max_to_keep is None:
      return doomed
    while len(self._maybe_delete) > self._max_to_keep:
      path, stamp = self._maybe_delete.popitem(last=False)
      if (
        self._keep_every_n_hours is not None
        and stamp - self._keep_every_n_hours * 3600.0 >= self._last_preserved
      ):
        self._last_preserved = stamp
        continue  # Kept forever; no longer managed.
      doomed.append(path)
    return doomed

  def _record_state(self, latest: str) -> None:
    write_state(
      self._directory,
      CheckpointState(
        model_checkpoint_path=latest,
        all_model_checkpoint_paths=list(self._maybe_delete),
        all_model_checkpoint_timestamps=list(self._maybe_delete.values()),
        last_preserved_timestamp=self._last_preserved,
      ),
    )

  def sync(self) -> None:
    """Waits for the pending async save (and its sweep); raises if it failed."""
    self._checkpoint.sync()
    if self._local is not None:
      self._local.wait()

  def restore_or_initialize(self) -> str | None:
    """Restores the latest checkpoint (returning its path), else calls ``init_fn``.

    Waits for pending saves first (TF forgets to).
    """
    self.sync()
    latest = self.latest_checkpoint
    if self._local is not None:
      latest, self.restored_tier = _tiers.restore_newest(
        self._local, self._checkpoint, latest, CheckpointOptions().timeout_s
      )
      if latest is None and self._init_fn is not None:
        self._init_fn()
      return latest
    if latest is not None:
      self.restored_tier = "persistent"
      self._checkpoint.restore(latest)
      return latest
    if self._init_fn is not None:
      self._init_fn()
    return None
