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

  A manager only deletes checkpoints directly in its own ``directory``. Opening
  one removes what interrupted saves left there, except the staging data of
  saves still in flight.

  Args:
    checkpoint: the `Checkpoint` to save and restore.
    directory: where the checkpoints and the state file live (local or a
      ``memory://``, ``s3://``, ``gs://`` URL).
    max_to_keep: how many recent checkpoints to keep; None keeps all.
    keep_checkpoint_every_n_hours: also keep one checkpoint per this many
      hours, outside ``max_to_keep``.
    checkpoint_name: the prefix of the numbered checkpoints.
    step_counter: the current step (or a callable returning it), for
      ``checkpoint_interval``.
    checkpoint_interval: save at most once per this many steps.
    init_fn: called by `restore_or_initialize` when there is no checkpoint.

  Raises:
    InvalidOptionsError: a parameter has a bad type or value, or
      ``checkpoint_interval`` is given without ``step_counter``.

  Examples:
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
    """The directory given to the constructor.

    Examples:
      >>> import jaxckpt, tempfile
      >>> d = tempfile.mkdtemp()
      >>> jaxckpt.CheckpointManager(jaxckpt.Checkpoint(), d, max_to_keep=1).directory == d
      True
    """
    return self._directory

  @property
  def checkpoint(self) -> Checkpoint:
    """The managed `Checkpoint`.

    Examples:
      >>> import jaxckpt, tempfile
      >>> ckpt = jaxckpt.Checkpoint()
      >>> jaxckpt.CheckpointManager(ckpt, tempfile.mkdtemp(), 1).checkpoint is ckpt
      True
    """
    return self._checkpoint

  @property
  def checkpoint_interval(self) -> int | None:
    """Minimum steps between saves, or None.

    Examples:
      >>> import jaxckpt, tempfile
      >>> manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(), tempfile.mkdtemp(), 1,
      ...                                     step_counter=0, checkpoint_interval=100)
      >>> manager.checkpoint_interval
      100
    """
    return self._checkpoint_interval

  @property
  def checkpoints(self) -> list[str]:
    """Managed checkpoints, oldest first (those kept forever are not listed).

    Examples:
      >>> import jaxckpt, tempfile, os
      >>> manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(), tempfile.mkdtemp(), 2)
      >>> for _ in range(3):
      ...   _ = manager.save()
      >>> [os.path.basename(p) for p in manager.checkpoints]
      ['ckpt-2', 'ckpt-3']
    """
    with self._lock:
      return list(self._maybe_delete)

  @property
  def latest_checkpoint(self) -> str | None:
    """The newest checkpoint's path (once its save has committed), or None.

    Examples:
      >>> import jaxckpt, tempfile
      >>> manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(), tempfile.mkdtemp(), 1)
      >>> print(manager.latest_checkpoint)
      None
      >>> path = manager.save()
      >>> manager.latest_checkpoint == path
      True
    """
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

    Args:
      checkpoint_number: the number for the path (an int or a scalar array);
        None uses the checkpoint's save counter.
      check_interval: False saves regardless of ``checkpoint_interval``.
      options: a `CheckpointOptions`, or None for the defaults.

    Returns:
      The checkpoint path (a `SavePath`), or None when
      ``checkpoint_interval`` says it is not yet time.

    Raises:
      SaveError: as `Checkpoint.save`; also TreeError, UnknownDeviceError,
        InvalidOptionsError, InvalidPathError and CoordinationError.

    Examples:
      >>> import jaxckpt, tempfile, os
      >>> manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(), tempfile.mkdtemp(), 3)
      >>> os.path.basename(manager.save(checkpoint_number=1000))
      'ckpt-1000'
    """
    options = _check_options(options)
    with self._save_lock:
      return self._save(checkpoint_number, check_interval, options)

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
    """Waits for the pending async save (and its sweep).

    Raises:
      SaveError: a pending (or an earlier, unreported) async save failed.

    Examples:
      >>> import jaxckpt, tempfile
      >>> manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(), tempfile.mkdtemp(), 1)
      >>> path = manager.save(options=jaxckpt.CheckpointOptions(enable_async=True))
      >>> manager.sync()
      >>> manager.latest_checkpoint == path
      True
    """
    self._checkpoint.sync()

  def restore_or_initialize(self) -> str | None:
    """Restores the latest checkpoint (returning its path), else calls ``init_fn``.

    Waits for pending saves first (TF forgets to).

    Returns:
      The restored checkpoint's path, or None if there was none.

    Raises:
      SaveError: a pending async save failed.
      CorruptCheckpointError: as `Checkpoint.restore`; also
        ShapeMismatchError and NotACheckpointError.

    Examples:
      >>> import jaxckpt, tempfile
      >>> d = tempfile.mkdtemp()
      >>> manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(step=5), d, 1,
      ...                                     init_fn=lambda: print("fresh start"))
      >>> manager.restore_or_initialize()
      fresh start
      >>> _ = manager.save()
      >>> restarted = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(step=0), d, 1)
      >>> restarted.restore_or_initialize() == manager.latest_checkpoint
      True
      >>> restarted.checkpoint.step
      5
    """
    self.sync()
    latest = self.latest_checkpoint
    if latest is not None:
      self._checkpoint.restore(latest)
      return latest
    if self._init_fn is not None:
      self._init_fn()
    return None
