"""`Checkpoint`: TF's ``tf.train.Checkpoint`` for JAX pytrees, on Orbax."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxckpt._background import Saver
from jaxckpt._background import wait_for_saves_into
from jaxckpt._commit import PLAN_AGREEMENT
from jaxckpt._commit import SaveJob
from jaxckpt._commit import agree_on_plan
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._errors import InvalidPathError
from jaxckpt._errors import TreeError
from jaxckpt._errors import UnknownItemError
from jaxckpt._future import CommitFuture
from jaxckpt._future import SavePath
from jaxckpt._gcpause import paused
from jaxckpt._incremental import History
from jaxckpt._incremental import reuse_by_identity
from jaxckpt._incremental import weak
from jaxckpt._io_device import resolve_io_device
from jaxckpt._load_status import InitializationOnlyStatus
from jaxckpt._load_status import LoadStatus
from jaxckpt._locks import TrackedRLock
from jaxckpt._multihost import begin
from jaxckpt._options import CheckpointOptions
from jaxckpt._plan import FAST
from jaxckpt._plan import SavePlan
from jaxckpt._plan import SaveRequest
from jaxckpt._plan import plan_restore
from jaxckpt._plan import plan_save
from jaxckpt._reshard import is_slot
from jaxckpt._reshard import reshard_for_restore
from jaxckpt._reshard import reshard_for_save
from jaxckpt._restore import read_leaves
from jaxckpt._restore import restore_leaves
from jaxckpt._routed import gather
from jaxckpt._snapshot import take_snapshot
from jaxckpt._stale import StaleSaves
from jaxckpt._state_file import CheckpointState
from jaxckpt._state_file import write_state
from jaxckpt._store import fspath
from jaxckpt._store import store_for
from jaxckpt._tfcheckpoint import find_tf_checkpoint
from jaxckpt._tfcheckpoint import restore_tf
from jaxckpt._tree import flatten_items

logger = logging.getLogger("jaxckpt")


def _check_options(options) -> CheckpointOptions:
  if options is None:
    return CheckpointOptions()
  if not isinstance(options, CheckpointOptions):
    raise InvalidOptionsError(
      f"options must be a jaxckpt.CheckpointOptions or None, got {type(options).__name__}."
    )
  return options


def _gather_snapshot(leaves, io_process: int) -> dict[str, object]:
  """The snapshot of a save whose I/O runs on process ``io_process`` (see _routed.py)."""
  arrays = [leaf for leaf in leaves if isinstance(leaf.value, jax.Array)]
  gathered = gather([leaf.value for leaf in arrays])  # A collective: every process.
  if jax.process_index() != io_process:
    return {}
  snapshot, _ = take_snapshot(
    [leaf for leaf in leaves if not isinstance(leaf.value, jax.Array)], copy=True, io_device=None
  )
  snapshot.update((leaf.name, value) for leaf, value in zip(arrays, gathered, strict=True))
  return snapshot


class Checkpoint:
  """Groups pytrees of arrays to save and restore together, like ``tf.train.Checkpoint``.

  Items are pytrees of ``jax.Array``, numpy arrays and Python scalars (and
  Flax NNX modules and optimizers), passed as keyword arguments or assigned as
  attributes later. Restoring replaces each item with a tree of the same
  structure holding the checkpoint's values (JAX arrays are immutable), in the
  dtype and sharding of the current values. As
  in TF, an item assigned after a restore under a name the checkpoint holds but
  nothing tracked then is restored on assignment (deferred restoration).
  Leaves may also be ``str``, ``bytes``, numpy string arrays, ``complex`` and
  ints of any size (restored exactly, with their saved Python types), or
  objects with ``get_state()``/``set_state()`` and numpy ``Generator``s
  (restored in place). An item that is a `Checkpoint` saves its items under
  its name (``model/net/w``), as in TF.

  Because JAX arrays are values, not variables, re-assign items after each
  update (``ckpt.params = params``) before saving; a save whose every array is
  the very object of the previous save while other values moved logs a warning.

  Args:
    **items: the items to track, by name. Names must not contain ``/`` or
      ``.`` and must not shadow a method (``save``, ``restore``, ...).

  Raises:
    TreeError: an item name is not allowed.

  Examples:
    >>> import jaxckpt, jax.numpy as jnp, tempfile
    >>> prefix = tempfile.mkdtemp() + "/ckpt"
    >>> ckpt = jaxckpt.Checkpoint(params={"w": jnp.ones(3)}, step=0)
    >>> ckpt.save(prefix)
    '...ckpt-1'
    >>> ckpt.params = {"w": jnp.zeros(3)}
    >>> status = ckpt.restore(prefix + "-1").assert_consumed()
    >>> ckpt.params["w"].tolist()
    [1.0, 1.0, 1.0]
  """

  def __init__(self, **items: Any):
    object.__setattr__(self, "_items", {})
    object.__setattr__(self, "_save_counter", 0)
    object.__setattr__(self, "_saver", Saver())
    object.__setattr__(self, "_history", History())
    # TF creates save_counter on the first save/restore (or read of the
    # attribute); until then a write() stores no counter.
    object.__setattr__(self, "_counter_exists", False)
    object.__setattr__(self, "_deferred_counter", None)  # From a read() before that.
    object.__setattr__(self, "_deferred", {})  # item name -> _Deferred, see restore().
    object.__setattr__(self, "_stale", StaleSaves())
    # Serialises save/write/restore calls from several threads (reentrant: a
    # write callback on the calling thread may save again; see _locks.py).
    object.__setattr__(self, "_lock", TrackedRLock())
    for name, value in items.items():
      setattr(self, name, value)

  # -- tracked items -------------------------------------------------------

  def __getattr__(self, name: str) -> Any:
    items = self.__dict__.get("_items", {})
    if name in items:
      return items[name]
    raise UnknownItemError(f"Checkpoint tracks no item {name!r}; it tracks {sorted(items)}.")

  def __setattr__(self, name: str, value: Any) -> None:
    if name.startswith("_"):
      object.__setattr__(self, name, value)
      return
    if hasattr(type(self), name):
      raise TreeError(
        f"Cannot track an item named {name!r}: it is a Checkpoint attribute. Choose another name."
      )
    if "/" in name or "." in name:
      raise TreeError(f"Item name {name!r} must not contain '/' or '.'.")
    if name in self._items or name not in self._deferred:
      self._items[name] = value  # No lock: a write callback may assign during a save.
      return
    with self._lock:
      deferred = self._deferred.pop(name, None)
      if deferred is not None:
        value = deferred.restore(name, value)
      self._items[name] = value

  def __delattr__(self, name: str) -> None:
    if name in self._items:
      del self._items[name]
    elif name.startswith("_"):
      object.__delattr__(self, name)
    else:  # Public names are items (see __setattr__); the same error as __getattr__'s.
      raise UnknownItemError(
        f"Checkpoint tracks no item {name!r}; it tracks {sorted(self._items)}."
      )

  def _tracked(self) -> dict[str, Any]:
    """Its items: what a Checkpoint tracking this one saves under its name (_tree.py)."""
    return self._items

  def __dir__(self):
    return sorted(set(super().__dir__()) | set(self._items))

  def __repr__(self) -> str:
    return f"Checkpoint({', '.join(self._items)}; save_counter={self._save_counter})"

  @property
  def save_counter(self) -> int:
    """Number of `save` calls so far (restored by `restore`); `write` leaves it.

    Examples:
      >>> import jaxckpt, tempfile
      >>> ckpt = jaxckpt.Checkpoint(step=0)
      >>> _ = ckpt.save(tempfile.mkdtemp() + "/ckpt")
      >>> ckpt.save_counter
      1
    """
    self._create_counter()
    return self._save_counter

  def _create_counter(self) -> None:
    if not self._counter_exists:
      object.__setattr__(self, "_counter_exists", True)
      if self._deferred_counter is not None:
        object.__setattr__(self, "_save_counter", self._deferred_counter)
        object.__setattr__(self, "_deferred_counter", None)

  # -- saving --------------------------------------------------------------

  def save(
    self, file_prefix: str | os.PathLike, options: CheckpointOptions | None = None
  ) -> SavePath:
    """Saves to ``f"{file_prefix}-{save_counter + 1}"`` and updates the state file.

    Increments `save_counter`. With ``options.enable_async`` it returns once the
    snapshot is taken; the write, commit, write callbacks and state-file update
    run in the background (at most one save in flight).

    Args:
      file_prefix: the checkpoint path without its ``-N`` suffix: a local path
        or a ``memory://``, ``s3://`` or ``gs://`` URL.
      options: a `CheckpointOptions`, or None for the defaults.

    Returns:
      The checkpoint path, a ``str`` whose ``.future`` is its `CommitFuture`.

    Raises:
      SaveError: this sync save failed, or an earlier async save failed.
      TreeError: a tracked value cannot be saved; nothing is written and the
        counter is unchanged.
      UnknownDeviceError: ``options.experimental_io_device`` names no device.
      InvalidOptionsError: ``options`` is not a `CheckpointOptions`.
      InvalidPathError: ``file_prefix`` can never hold a checkpoint.
      CoordinationError: with several processes, they name different paths.

    Examples:
      >>> import jaxckpt, tempfile
      >>> ckpt = jaxckpt.Checkpoint(step=7)
      >>> path = ckpt.save(tempfile.mkdtemp() + "/ckpt")
      >>> path.endswith("ckpt-1"), path.future.done()
      (True, True)
    """
    prefix = fspath(file_prefix)
    store = store_for(prefix)
    state_dir = store.absolute(store.dirname(prefix))

    def record(path: str, owner: bool) -> None:
      if owner:
        write_state(state_dir, CheckpointState(path, [path]))

    return save_checkpoint(self, SaveRequest(lambda n: f"{prefix}-{n}", "save", record), options)

  def write(
    self, file_prefix: str | os.PathLike, options: CheckpointOptions | None = None
  ) -> SavePath:
    """Writes exactly ``file_prefix``: no counter change, no state file.

    Overwrites an existing checkpoint there only once the new one is complete.

    Args:
      file_prefix: the checkpoint path (local, or a kvstore URL).
      options: a `CheckpointOptions`, or None for the defaults.

    Returns:
      The checkpoint path, a ``str`` whose ``.future`` is its `CommitFuture`.

    Raises:
      SaveError: as `save`; also TreeError, UnknownDeviceError,
        InvalidOptionsError, InvalidPathError and CoordinationError.

    Examples:
      >>> import jaxckpt, tempfile
      >>> ckpt = jaxckpt.Checkpoint(step=7)
      >>> path = ckpt.write(tempfile.mkdtemp() + "/exported")
      >>> path.endswith("exported"), ckpt.save_counter
      (True, 0)
    """
    path = fspath(file_prefix)
    return save_checkpoint(self, SaveRequest(lambda n: path, "write"), options)

  def sync(self) -> None:
    """Waits for the pending async saves of this `Checkpoint`.

    Raises:
      SaveError: a pending (or an earlier, unreported) async save failed.

    Examples:
      >>> import jaxckpt, tempfile
      >>> ckpt = jaxckpt.Checkpoint(step=1)
      >>> opts = jaxckpt.CheckpointOptions(enable_async=True)
      >>> path = ckpt.save(tempfile.mkdtemp() + "/ckpt", options=opts)
      >>> ckpt.sync()
      >>> path.future.done()
      True
    """
    self._saver.wait()

  # -- restoring -----------------------------------------------------------

  def restore(
    self,
    save_path: str | os.PathLike | None,
    options: CheckpointOptions | None = None,
    *,
    name_map: Callable[[str], str | None] | None = None,
  ) -> LoadStatus:
    """Restores tracked items and `save_counter` from a checkpoint.

    Waits for a pending async save first. ``save_path=None`` (e.g. from
    `latest_checkpoint` on a fresh directory) restores nothing and returns a
    status whose assertions fail, as in TF. Each item is replaced by a tree of
    the same structure, in the dtype and sharding of its current values;
    checkpoint values nothing tracks are not read.

    ``save_path`` may also be a TensorFlow checkpoint (``ckpt-3`` with its
    ``ckpt-3.index``, or a directory with TF's ``checkpoint`` state file):
    TF's ``net/l1/kernel/.ATTRIBUTES/VARIABLE_VALUE`` restores the leaf
    ``net/l1/kernel``, the slot ``net/l1/kernel/.OPTIMIZER_SLOT/optimizer/m/...``
    restores ``optimizer/m/net/l1/kernel``, and ``save_counter`` the counter
    (``jaxckpt.load_checkpoint(path).tracked_names()`` lists them all).

    An async save of ``save_path`` still in flight in this process (by any
    Checkpoint) is waited for.

    Args:
      save_path: a checkpoint path (local or a kvstore URL), or None.
      options: a `CheckpointOptions` (``experimental_io_device``,
        ``verify_checksums``, ``timeout_s``), or None for the defaults.
      name_map: TF checkpoints only: called with each default name, returns
        the tracked leaf name to restore that value into, or None to leave it
        out (it is then reported as unused). For a Keras 2 model's
        ``save_weights`` in a tracked item ``model`` with a ``layers`` list::

          name_map=lambda n: "model/" + n.replace("layer_with_weights-", "layers/")

        restores ``layer_with_weights-1/kernel`` into ``model/layers/1/kernel``.

    Returns:
      A `LoadStatus` saying what matched.

    Raises:
      CheckpointNotFoundError: nothing at ``save_path`` (a FileNotFoundError).
      ShapeMismatchError: tracked values' shapes differ (a ValueError; the
        message lists every mismatch); nothing is restored.
      DtypeMismatchError: tracked values' dtypes cannot take the saved ones
        without changing values (float to int, complex to real), or a kind
        differs (a string where an array is tracked); a TreeError and a
        ValueError. Nothing is restored.
      NotACheckpointError, CorruptCheckpointError: the checkpoint is damaged
        (a TF checkpoint's error names the file or tensor).
      SaveError: a pending async save failed.

    Examples:
      >>> import jaxckpt, jax.numpy as jnp, tempfile
      >>> d = tempfile.mkdtemp()
      >>> ckpt = jaxckpt.Checkpoint(w=jnp.ones(2))
      >>> _ = ckpt.save(d + "/ckpt")
      >>> ckpt.w = jnp.zeros(2)
      >>> ckpt.restore(jaxckpt.latest_checkpoint(d))
      LoadStatus('...ckpt-1', matched=1, missing=0, unused=0)
      >>> ckpt.w.tolist()
      [1.0, 1.0]

      A JAX port of TF's "Training checkpoints" guide, restoring the guide's
      checkpoint (one of jaxckpt's test fixtures)::

      >>> import jaxckpt, jax.numpy as jnp
      >>> net = {"l1": {"kernel": jnp.zeros((1, 5)), "bias": jnp.zeros(5)}}
      >>> ckpt = jaxckpt.Checkpoint(step=jnp.array(0, jnp.int32), net=net)
      >>> status = ckpt.restore("tests/fixtures/tf/guide")
      >>> status.assert_existing_objects_matched().expect_partial()
      LoadStatus('tests/fixtures/tf/guide/ckpt-3', matched=3, missing=0, unused=10)
      >>> int(ckpt.step), ckpt.save_counter
      (4, 3)
    """
    with self._lock:
      return self._restore(
        save_path, _check_options(options), restore_counter=True, name_map=name_map
      )

  def read(
    self,
    save_path: str | os.PathLike,
    options: CheckpointOptions | None = None,
    *,
    name_map: Callable[[str], str | None] | None = None,
  ) -> LoadStatus:
    """Like `restore`, for checkpoints made by `write`.

    As in TF, `save_counter` is restored only if it exists already (this
    Checkpoint saved or restored before); otherwise a stored counter is kept
    for its first save, and the status reports it unused.

    Args:
      save_path: a checkpoint path (local or a kvstore URL).
      options: a `CheckpointOptions`, or None for the defaults.
      name_map: as `restore`'s (TF checkpoints only).

    Returns:
      A `LoadStatus` saying what matched.

    Raises:
      CheckpointNotFoundError: as `restore`; also NotACheckpointError,
        ShapeMismatchError, DtypeMismatchError, CorruptCheckpointError and SaveError.

    Examples:
      >>> import jaxckpt, tempfile
      >>> ckpt = jaxckpt.Checkpoint(step=3)
      >>> path = ckpt.write(tempfile.mkdtemp() + "/exported")
      >>> ckpt.step = 0
      >>> _ = ckpt.read(path).assert_consumed()
      >>> ckpt.step, ckpt.save_counter
      (3, 0)
    """
    with self._lock:
      return self._restore(
        save_path, _check_options(options), restore_counter=False, name_map=name_map
      )

  def _restore(
    self, save_path, options: CheckpointOptions, *, restore_counter: bool, name_map=None
  ) -> LoadStatus:
    io_device = resolve_io_device(options.experimental_io_device)
    # Numbered before anything that may fail on one process only (see save_checkpoint).
    coordination = begin("restore", options.timeout_s, io_device=io_device)
    plan = plan_restore(
      save_path,
      options,
      io_device=io_device,
      coordination=coordination,
      restore_counter=restore_counter,
    )
    self._saver.wait()
    if plan.path is not None:  # Another Checkpoint of this process may be writing it.
      wait_for_saves_into(plan.path)
    with paused():  # An object per leaf: see _gcpause.py.
      items = flatten_items(self._items)
      flat = [leaf for item in items for leaf in item.leaves]
    if options.experimental_skip_slot_variables:
      flat = [leaf for leaf in flat if not is_slot(leaf.name)]
    flat = reshard_for_restore(flat, options.experimental_sharding_callback)
    tf_prefix = find_tf_checkpoint(plan.path)
    if tf_prefix is not None:  # A TensorFlow checkpoint (_tfcheckpoint.py).
      return self._restore_tf(tf_prefix, plan, items, flat, name_map, options)
    if name_map is not None:
      raise InvalidOptionsError(
        f"name_map applies to TensorFlow checkpoints; {plan.path!r} is not one."
      )
    path, manifest, restored = restore_leaves(plan, flat)
    if path is None or manifest is None:
      if restore_counter:  # TF's restore(None) creates the counter too.
        self._create_counter()
      return InitializationOnlyStatus({leaf.name for leaf in flat})
    with paused():
      for item in items:
        if item.owner is not None and any(leaf.name in restored for leaf in item.leaves):
          item.owner[item.attr] = item.rebuild(restored)
    counter_tracked = restore_counter or self._counter_exists
    if restore_counter:
      self._create_counter()
    if manifest.counter_saved:
      target = "_save_counter" if counter_tracked else "_deferred_counter"
      object.__setattr__(self, target, manifest.save_counter)
    stored = set(manifest.names)
    if options.experimental_skip_slot_variables:
      stored = {name for name in stored if not is_slot(name)}
    status = LoadStatus(
      path, {leaf.name for leaf in flat}, stored, counter=(counter_tracked, manifest.counter_saved)
    )
    self._defer(status, manifest, plan)
    return status

  def _defer(self, status: LoadStatus, manifest, plan) -> None:
    """Keeps what nothing tracks for items assigned later (not with several processes)."""
    later = {name.split("/")[0] for name in status.unused} - set(self._items)
    if plan.coordination is not None:
      later = set()
    deferred = _Deferred(status.path, manifest, weakref.ref(status), plan.verify_checksums)
    object.__setattr__(self, "_deferred", dict.fromkeys(later, deferred))

  def _restore_tf(self, prefix: str, plan, items, flat, name_map, options) -> LoadStatus:
    """`_restore` from a TensorFlow checkpoint (no deferred restoration)."""
    restored, names, counter = restore_tf(
      prefix,
      flat,
      name_map,
      plan.coordination,
      skip_slots=options.experimental_skip_slot_variables,
    )
    for item in items:
      if any(leaf.name in restored for leaf in item.leaves):
        self._items[item.name] = item.rebuild(restored)
    counter_tracked = plan.restore_counter or self._counter_exists
    if plan.restore_counter:
      self._create_counter()
    if counter is not None:
      target = "_save_counter" if counter_tracked else "_deferred_counter"
      object.__setattr__(self, target, counter)
    object.__setattr__(self, "_deferred", {})
    tracked = {leaf.name for leaf in flat}
    return LoadStatus(prefix, tracked, names, counter=(counter_tracked, counter is not None))


@dataclasses.dataclass(frozen=True)
class _Deferred:
  """A restore's values for an item not tracked yet (TF's deferred restoration)."""

  path: str
  manifest: Any
  status: Any  # weakref to the LoadStatus, updated when the item is restored.
  verify_checksums: bool

  def restore(self, name: str, value: Any) -> Any:
    item = flatten_items({name: value})[0]
    restored = read_leaves(
      self.path, self.manifest, item.leaves, verify_checksums=self.verify_checksums
    )
    status = self.status()
    if status is not None:
      status._restored_later(set(restored))
    return item.rebuild(restored) if restored else value


def save_checkpoint(
  checkpoint: Checkpoint, request: SaveRequest, options: CheckpointOptions | None
) -> SavePath:
  """The one save path behind `Checkpoint.save`, `Checkpoint.write` and
  `CheckpointManager.save`: plan, snapshot, then commit inline or in the background.

  Raises:
    As `Checkpoint.save`.
  """
  with checkpoint._lock:  # Each call gets its own number and path.
    return _save(checkpoint, request, options)


def _save(
  checkpoint: Checkpoint, request: SaveRequest, options: CheckpointOptions | None
) -> SavePath:
  start = time.perf_counter()
  options = _check_options(options)
  io_device = resolve_io_device(options.experimental_io_device)
  # Numbered first, before anything that could fail on one process only (an
  # earlier async error, a bad path): every process's n-th save call is then
  # the same operation, and a process that drops out makes the others fail
  # that save at a barrier instead of pairing their later saves with its next
  # one (which would commit shards from different steps).
  coordination = begin("save", options.timeout_s, io_device=io_device)
  if request.kind == "save":
    checkpoint._create_counter()
  counter = checkpoint._save_counter + (request.kind == "save")
  if coordination is not None:  # For the same reason the number is used up now.
    object.__setattr__(checkpoint, "_save_counter", counter)
  try:
    with paused():  # An object per leaf, most of them dead once the save is: see _gcpause.py.
      tracked = [leaf for item in flatten_items(checkpoint._items) for leaf in item.leaves]
      flat = reshard_for_save(tracked, options.experimental_sharding_callback)
      plan = plan_save(
        request,
        options,
        flat,
        save_counter=counter,
        io_device=io_device,
        coordination=coordination,
        counter_saved=checkpoint._counter_exists,
      )
    job = _snapshot(checkpoint, plan, flat, options)
  except BaseException as e:
    if coordination is not None:  # The others must not wait for this process.
      coordination.abandon(PLAN_AGREEMENT, e)
    raise
  object.__setattr__(checkpoint, "_save_counter", counter)
  checkpoint._stale.check(tracked, plan.path)
  if plan.background:
    logger.info(
      "Saving %s in the background: %d arrays, %.1f MiB%s; save() blocked %.1f ms.",
      plan.path,
      len(flat),
      plan.nbytes / 2**20,
      f" ({len(job.reused)} reused)" if job.reused else "",
      1e3 * (time.perf_counter() - start),
    )
  checkpoint._saver.submit(job, background=plan.background)
  return SavePath(plan.path, job.future)


def _snapshot(checkpoint: Checkpoint, plan: SavePlan, flat: list, options) -> SaveJob:
  """Waits for room (raising an earlier async error), checks the path, takes the snapshot."""
  saver = checkpoint._saver
  # Backpressure; also raises an earlier async save's error, as TF does, but not
  # with several processes: an error raised on one process only would drop this
  # save there and fail it on the others. There it stays for sync()/restore().
  raise_errors = plan.coordination is None
  if plan.background:
    saver.reserve(
      plan.nbytes,
      max_in_flight=options.max_in_flight,
      budget=options.memory_budget_bytes,
      raise_errors=raise_errors,
    )
  else:
    saver.wait(raise_errors=raise_errors)
  plan.store.check_target(plan.path)
  history, reused = checkpoint._history if plan.incremental else None, {}
  if plan.incremental:
    if plan.store.exists(plan.path):
      raise InvalidPathError(
        f"Incremental saves never overwrite: {plan.path!r} exists, and newer "
        "checkpoints may read data from it. Choose a new path."
      )
    reused = reuse_by_identity(flat, checkpoint._history)
  # Values go into the manifest; zero-size arrays have no bytes (the manifest rebuilds them).
  to_copy = [leaf for leaf in flat if leaf.has_data and leaf.name not in reused]
  staged: list = []
  described: dict[str, jax.Array] = {}
  coord, io_device = plan.coordination, plan.io_device
  if plan.routed and coord is not None and io_device is not None:
    # The gather is an XLA collective, which has no timeout: enter it only once
    # every process is known to be here, with the same plan.
    agree_on_plan(plan, flat)
    snapshot = _gather_snapshot(to_copy, io_device.process_index)
    if plan.writer != FAST:  # Orbax writes them: numpy only (see _layout.new_checkpointer).
      snapshot = {name: np.asarray(value) for name, value in snapshot.items()}
  else:
    with paused():
      snapshot, staged = take_snapshot(
        to_copy,
        copy=plan.background,
        io_device=plan.io_device,
        pool=saver.staging,
        keep_bytes=plan.keep_staging_bytes,
        views=described,
        view_max_bytes=plan.view_max_bytes,
      )
  coordination = plan.coordination
  if coordination is not None:
    plan = dataclasses.replace(
      plan, coordination=dataclasses.replace(coordination, what=f"save of {plan.path!r}")
    )
  return SaveJob(
    plan=plan,
    future=CommitFuture(plan.path),
    leaves=flat,
    snapshot=snapshot,
    described=described,
    staged=staged,
    history=history,
    reused=reused,
    refs={leaf.name: weak(leaf.value) for leaf in flat} if plan.incremental else {},
  )
