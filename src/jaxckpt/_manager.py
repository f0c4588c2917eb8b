"""`CheckpointManager`: TF's ``tf.train.CheckpointManager`` on jaxckpt saves."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxckpt import _tiers
from jaxckpt._background import wait_for_saves_into
from jaxckpt._checkpoint import Checkpoint
from jaxckpt._checkpoint import _check_options
from jaxckpt._checkpoint import save_checkpoint
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._errors import JaxckptError
from jaxckpt._future import SavePath
from jaxckpt._incremental import retire_or_remove
from jaxckpt._io_device import resolve_io_device
from jaxckpt._locks import TrackedRLock
from jaxckpt._manifest import data_of
from jaxckpt._manifest import is_committed
from jaxckpt._manifest import read_manifest
from jaxckpt._multihost import begin
from jaxckpt._multihost import is_primary
from jaxckpt._options import CheckpointOptions
from jaxckpt._plan import SaveRequest
from jaxckpt._state_file import CheckpointState
from jaxckpt._state_file import read_state
from jaxckpt._state_file import relative_to
from jaxckpt._state_file import write_state
from jaxckpt._store import fspath
from jaxckpt._store import store_for

logger = logging.getLogger("jaxckpt")


def _number_or_none(name: str, value, *, low: float, inclusive: bool = False) -> None:
  """TF compares these with numbers only: floats and bools pass, as there."""
  ok = value is None or (
    isinstance(value, (int, float, np.integer, np.floating))
    and (value >= low if inclusive else value > low)
  )
  if not ok:
    bound = f">= {low:g}" if inclusive else f"> {low:g}"
    raise InvalidOptionsError(f"{name} must be None or a number {bound}, got {value!r}.")


def _checkpoint_number(value) -> int:
  """``checkpoint_number`` as TF takes it: an integer, or a 0-d integer array."""
  value = value() if callable(value) else value
  array = np.asarray(value)
  if array.shape != () or array.dtype.kind not in "iub":
    raise InvalidOptionsError(
      f"checkpoint_number must be an integer (or a 0-d integer array), got {value!r}."
    )
  return int(array)


def _check_step_counter(checkpoint: Checkpoint, step_counter) -> None:
  """A jax.Array or Python number is a value: read at every save it never changes."""
  if callable(step_counter) or not isinstance(step_counter, (jax.Array, int, float, np.generic)):
    return
  items = [n for n, v in checkpoint._items.items() if v is step_counter]
  name = items[0] if items else "step"
  raise InvalidOptionsError(
    f"step_counter={step_counter!r} is a value ({type(step_counter).__name__}) that never "
    "changes: JAX arrays are immutable, so the manager would read the same step at every "
    "save and save once. Pass something it can read fresh: the name of a Checkpoint item "
    f"(step_counter={name!r}) or a callable (step_counter=lambda: ckpt.{name})."
  )


class CheckpointManager:
  """Keeps the newest ``max_to_keep`` checkpoints of a `Checkpoint` in a directory.

  Same constructor, methods and semantics as ``tf.train.CheckpointManager``:
  numbered saves (``checkpoint_number`` or the save counter), deletion beyond
  ``max_to_keep`` (``None`` keeps all), one kept every
  ``keep_checkpoint_every_n_hours``, save intervals by ``step_counter``, and
  state recovered from the directory's ``checkpoint`` file. With async options
  the sweep and state-file update run after the commit, on the background
  thread. ``step_counter`` is read at each save: a zero-argument callable
  returning the step, the name of one of the Checkpoint's items (``"step"``)
  or a mutable int-like object; a ``jax.Array`` or Python number (a value that
  can never change) is refused. ``last_checkpoint_step`` seeds the interval
  check, as in TF.

  A local tier (keyword-only ``local_directory``, ``local_interval``,
  ``local_max_to_keep``) adds frequent per-process saves to a host-local
  directory such as ``/dev/shm/run``: every ``local_interval`` steps each
  process writes the shards it holds plus a replica of its ring neighbour's
  (moved by a JAX collective), keeping ``local_max_to_keep`` steps. Saves are
  then numbered by step (``checkpoint_number``, else ``step_counter``), and
  `restore_or_initialize` restores the newest step that is complete in some
  tier, preferring the local one; ``restored_tier`` says which was used.

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
    last_checkpoint_step: int | None = None,
    *,
    local_directory: str | os.PathLike | None = None,
    local_interval: int = 1,
    local_max_to_keep: int = 2,
  ):
    if not isinstance(checkpoint, Checkpoint):
      raise InvalidOptionsError(
        f"checkpoint must be a jaxckpt.Checkpoint, got {type(checkpoint).__name__}."
      )
    _number_or_none("max_to_keep", max_to_keep, low=0)
    # 0 is off, as in TF; TF's negative values would keep every checkpoint forever.
    _number_or_none(
      "keep_checkpoint_every_n_hours", keep_checkpoint_every_n_hours, low=0, inclusive=True
    )
    _number_or_none("checkpoint_interval", checkpoint_interval, low=0, inclusive=True)
    if checkpoint_interval is not None and step_counter is None:
      raise InvalidOptionsError("step_counter must be given when checkpoint_interval is.")
    if checkpoint_interval is not None:
      _check_step_counter(checkpoint, step_counter)
    self._checkpoint = checkpoint
    self._directory = fspath(directory)
    self._store = store_for(self._directory)
    _check_name(self._store, self._directory, checkpoint_name)
    if os.path.exists(self._directory) and not os.path.isdir(self._directory):
      raise InvalidOptionsError(f"directory {self._directory!r} exists and is not a directory.")
    self._max_to_keep = max_to_keep
    self._keep_every_n_hours = keep_checkpoint_every_n_hours or None
    self._prefix = self._store.join(self._directory, checkpoint_name)
    self._step_counter = step_counter
    self._checkpoint_interval = checkpoint_interval
    self._init_fn = init_fn
    self._last_checkpoint_step: int | None = last_checkpoint_step
    self._local = _tiers.local_tier(local_directory, local_interval, local_max_to_keep)
    self.restored_tier: str | None = None  # "local" or "persistent" after restore_or_initialize.
    # Guards the recorded state (also used by the save thread). A preemption
    # handler defers its save while the main thread holds it (see _locks.py).
    self._lock = TrackedRLock()
    self._save_lock = TrackedRLock()  # One interval decision and save at a time.
    self._recover()

  def _recover(self) -> None:
    """Reads the directory's state file; drops leftovers of interrupted saves."""
    now = time.time()
    wait_for_saves_into(self._directory)  # Their staging data looks like leftovers.
    self._swept_leftovers = False
    if is_primary():
      self._sweep_leftovers()
    state = read_state(self._directory)
    self._maybe_delete: collections.OrderedDict[str, float] = collections.OrderedDict()
    self._latest: str | None = None
    # TF sets the clock back a second, so a manager re-created at once still
    # counts keep_checkpoint_every_n_hours from before its first checkpoint.
    self._last_preserved = now - 1.0
    if state is None:
      return
    # As TF: the latest is kept even if deleted (restoring it then fails loudly
    # instead of silently starting over), and a state file without timestamps
    # (written by Checkpoint.save) makes nothing managed, so nothing is swept.
    self._latest = self._user_path(state.model_checkpoint_path)
    self._last_preserved = min(state.last_preserved_timestamp or 0.0, now)
    timestamps = state.all_model_checkpoint_timestamps or [self._last_preserved] * len(
      state.all_model_checkpoint_paths
    )
    for path, stamp in zip(state.all_model_checkpoint_paths, timestamps, strict=False):
      if min(stamp, now) > self._last_preserved and self._owns(path) and is_committed(path):
        self._maybe_delete[self._user_path(path)] = min(stamp, now)
    self._adopt_lost(state)
    self._finish_sweep(state.sweeping)

  def _finish_sweep(self, sweeping: list[str]) -> None:
    """Deletes what the last manager's sweep named but may not have finished (a
    kill right after its state-file write): only its own, unlisted checkpoints."""
    listed = {self._store.absolute(p) for p in [*self._maybe_delete, self._latest or ""]}
    doomed = [
      self._user_path(p)
      for p in sweeping
      if self._number(p) is not None
      and self._store.absolute(p) not in listed
      and is_committed(p)  # (A retired one goes with the next sweep.)
    ]
    if doomed and is_primary():
      retire_or_remove(doomed, self._directory)
      logger.info("Finished an interrupted sweep: %s.", ", ".join(doomed))

  def _number(self, path: str | None) -> int | None:
    """N of ``<checkpoint_name>-N`` in this manager's directory, else None."""
    if not path or not self._owns(path):
      return None
    name, base = self._store.basename(path), self._store.basename(self._prefix)
    suffix = name[len(base) + 1 :]
    return int(suffix) if name.startswith(base + "-") and suffix.isdigit() else None

  def _adopt_lost(self, state: CheckpointState) -> None:
    """Adopts committed ``<checkpoint_name>-N`` checkpoints the state file does not
    name and that were created after everything it names (a save whose state-file
    update failed, or a kill just before it), so they are listed, restorable and
    eventually swept; the state file is rewritten to name them. Older unlisted
    ones may be kept on purpose (keep_checkpoint_every_n_hours) and stay alone."""
    listed = {
      self._store.absolute(p)
      for p in [*state.all_model_checkpoint_paths, state.model_checkpoint_path]
    }
    stamps = list(state.all_model_checkpoint_timestamps)
    if is_committed(state.model_checkpoint_path):
      with contextlib.suppress(JaxckptError):
        stamps.append(read_manifest(state.model_checkpoint_path).created)
    if not stamps:
      return
    found = []
    for name in self._store.names(self._directory):
      path = self._store.join(self._directory, name)
      if (
        self._number(path) is None or self._store.absolute(path) in listed or not is_committed(path)
      ):
        continue
      try:
        manifest = read_manifest(path)
      except JaxckptError:  # Damaged: never adopted, never swept.
        continue
      if manifest.kind == "save" and manifest.created > max(stamps):  # Not a user's write().
        found.append((manifest.created, path))
    for created, path in sorted(found):
      self._maybe_delete[path] = created
      self._latest = path
    if not found:
      return
    doomed = self._sweep()  # The sweep the interrupted saves did not get to.
    if is_primary():
      logger.warning(
        "Adopted checkpoints the state file did not list: %s.", [p for _, p in sorted(found)]
      )
      self._record_state(sorted(found)[-1][1], sweeping=doomed)
      if doomed:  # After the state file stops naming them, as in a save's sweep.
        retire_or_remove(doomed, self._directory)

  def _sweep_leftovers(self) -> None:
    """Deletes what interrupted saves left (by the process that writes the files:
    process 0, or the first save's ``experimental_io_device`` task)."""
    self._swept_leftovers = True
    removed = self._store.remove_leftovers(self._directory, data_of)
    if removed:
      logger.info("Deleted what interrupted saves left in %s: %s.", self._directory, removed)

  def _owns(self, path: str) -> bool:
    """Whether ``path`` is one of this manager's own (deletable) checkpoints: a
    state file naming anything outside its directory never makes it delete that."""
    store = self._store
    return (
      store_for(path) is store
      and store.within(path, self._directory)
      and store.absolute(path) != store.absolute(self._directory)
    )

  def _user_path(self, path: str) -> str:
    """State-file paths come back joined to the directory; keep the user's spelling."""
    if self._owns(path):
      return self._store.join(self._directory, relative_to(self._store, self._directory, path))
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
      ...                                     step_counter=lambda: 0, checkpoint_interval=100)
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
      if self._local is None:
        return self._save(checkpoint_number, check_interval, options)
      step = None if self._step_counter is None else self._read_step()
      number = _tiers.numbered(checkpoint_number, step)
      path = self._save(number, check_interval, options)
      if self._local.due(int(np.asarray(number))):
        self._local.save(self._checkpoint, int(np.asarray(number)), options.timeout_s)
      return path

  def _save(
    self, checkpoint_number, check_interval: bool, options: CheckpointOptions
  ) -> SavePath | None:
    if self._checkpoint_interval is not None:
      step = self._read_step()
      if self._last_checkpoint_step is not None:
        if step == self._last_checkpoint_step:
          return None
        if check_interval and step < self._last_checkpoint_step + self._checkpoint_interval:
          return None
      self._last_checkpoint_step = step
    if checkpoint_number is not None:
      checkpoint_number = _checkpoint_number(checkpoint_number)
    prefix = self._prefix
    if is_primary():  # A second writing process gets an error, not each other's checkpoints.
      self._store.lock_writer(self._directory)

    def path_for(counter: int) -> str:
      return f"{prefix}-{counter if checkpoint_number is None else checkpoint_number}"

    return save_checkpoint(
      self._checkpoint, SaveRequest(path_for, "save", self._record_and_sweep), options
    )

  def _read_step(self) -> int:
    counter = self._step_counter
    if isinstance(counter, str):
      value = getattr(self._checkpoint, counter)
    else:
      value = counter() if callable(counter) else counter
    return int(np.asarray(value))

  def _record_and_sweep(self, path: str, owner: bool = True) -> None:
    with self._lock:
      self._maybe_delete.pop(path, None)
      self._maybe_delete[path] = time.time()
      self._latest = path
      before = dict(self._maybe_delete)
      doomed = self._sweep()
      if not owner:  # Every process tracks the list; one owns the files.
        return
      try:
        self._record_state(path, sweeping=doomed)
      except BaseException:  # The old state file still names them: swept next time.
        kept = collections.OrderedDict((p, before[p]) for p in doomed)
        kept.update(self._maybe_delete)
        self._maybe_delete = kept
        raise
      if not self._swept_leftovers:  # The I/O task's storage may be its own.
        self._sweep_leftovers()
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

  def _record_state(self, latest: str, sweeping: list[str] | None = None) -> None:
    write_state(
      self._directory,
      CheckpointState(
        model_checkpoint_path=latest,
        all_model_checkpoint_paths=list(self._maybe_delete),
        all_model_checkpoint_timestamps=list(self._maybe_delete.values()),
        last_preserved_timestamp=self._last_preserved,
        sweeping=sweeping or [],
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
    if self._local is not None:
      self._local.wait()

  def restore_or_initialize(self, options: CheckpointOptions | None = None) -> str | None:
    """Restores the latest checkpoint (returning its path), else calls ``init_fn``.

    Waits for pending saves first (TF forgets to). With several processes, the
    latest checkpoint is the one process 0's manager knows (the
    ``experimental_io_device`` task's, if ``options`` name one), so that every
    process takes the same branch.

    Args:
      options: passed to `Checkpoint.restore` (e.g. ``experimental_io_device``).

    Returns:
      The restored checkpoint's path, or None when there was none.

    Raises:
      As `Checkpoint.restore`; CoordinationError if the processes cannot agree.

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
    options = _check_options(options)
    self.sync()
    latest = self._agreed_latest(options)
    if self._local is not None:
      latest, self.restored_tier = _tiers.restore_newest(
        self._local, self._checkpoint, latest, options.timeout_s
      )
      if latest is None and self._init_fn is not None:
        self._init_fn()
      return latest
    if latest is not None:
      self.restored_tier = "persistent"
      self._checkpoint.restore(latest, options=options)
      if self._checkpoint_interval is not None:  # As TF: save() at this step is skipped.
        self._last_checkpoint_step = self._read_step()
      return latest
    if self._init_fn is not None:
      self._init_fn()
    return None

  def _agreed_latest(self, options: CheckpointOptions) -> str | None:
    coord = begin(
      "choice of the checkpoint to restore",
      options.timeout_s,
      io_device=resolve_io_device(options.experimental_io_device),
    )
    if coord is None:
      return self.latest_checkpoint
    return json.loads(coord.share("latest", lambda: json.dumps(self.latest_checkpoint)))


def _check_name(store, directory: str, name: str) -> None:
  """TF joins ``checkpoint_name`` to the directory: ``""`` and ``"sub/ckpt"`` work; a
  name that leads out of the directory (absolute, ``..``) is refused, as the manager
  deletes what it names."""
  if (
    not isinstance(name, str)
    or ".." in name.split("/")
    or not store.within(store.join(directory, name), directory)
  ):
    raise InvalidOptionsError(
      f"checkpoint_name must name a place inside {directory!r}, got {name!r}."
    )
