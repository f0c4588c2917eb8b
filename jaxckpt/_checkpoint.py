"""`Checkpoint`: TF's ``tf.train.Checkpoint`` for JAX pytrees, on Orbax."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxckpt import _fastwrite
from jaxckpt import _kvstore
from jaxckpt._background import Saver
from jaxckpt._durable import check_target
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._errors import InvalidPathError
from jaxckpt._errors import TreeError
from jaxckpt._future import CommitFuture
from jaxckpt._future import SavePath
from jaxckpt._incremental import History
from jaxckpt._incremental import reuse_by_identity
from jaxckpt._incremental import weak
from jaxckpt._io_device import resolve_io_device
from jaxckpt._load_status import InitializationOnlyStatus
from jaxckpt._load_status import LoadStatus
from jaxckpt._manifest import read_manifest
from jaxckpt._multihost import begin
from jaxckpt._multihost import process_count
from jaxckpt._options import CheckpointOptions
from jaxckpt._restore import Reader
from jaxckpt._restore import read_leaves
from jaxckpt._routed import gather
from jaxckpt._routed import restore_through
from jaxckpt._snapshot import take_snapshot
from jaxckpt._state_file import CheckpointState
from jaxckpt._state_file import write_state
from jaxckpt._tree import flatten_items
from jaxckpt._write import SaveJob

logger = logging.getLogger("jaxckpt")


def _check_options(options) -> CheckpointOptions:
  if options is None:
    return CheckpointOptions()
  if not isinstance(options, CheckpointOptions):
    raise InvalidOptionsError(
        f"options must be a jaxckpt.CheckpointOptions or None, got "
        f"{type(options).__name__}.")
  return options


def _gather_snapshot(leaves, io_process: int) -> dict[str, object]:
  """The snapshot of a save whose I/O runs on process ``io_process`` (see _routed.py)."""
  arrays = [leaf for leaf in leaves if isinstance(leaf.value, jax.Array)]
  gathered = gather([leaf.value for leaf in arrays])  # A collective: every process.
  if jax.process_index() != io_process:
    return {}
  snapshot, _ = take_snapshot(
      [leaf for leaf in leaves if not isinstance(leaf.value, jax.Array)],
      copy=True, io_device=None)
  snapshot.update((leaf.name, value) for leaf, value in zip(arrays, gathered, strict=True))
  # All numpy: written on this process (_compat.registry_writing_on).
  return {name: np.asarray(value) for name, value in snapshot.items()}


class Checkpoint:
  """Groups pytrees of arrays to save and restore together, like ``tf.train.Checkpoint``.

  Items are pytrees of ``jax.Array``, numpy arrays and Python scalars, passed as
  keyword arguments or assigned as attributes later. Restoring replaces each
  item with a tree of the same structure holding the checkpoint's values (JAX
  arrays are immutable), in the dtype and sharding of the current values.

  Example:
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
    for name, value in items.items():
      setattr(self, name, value)

  # -- tracked items -------------------------------------------------------

  def __getattr__(self, name: str) -> Any:
    items = self.__dict__.get("_items", {})
    if name in items:
      return items[name]
    raise AttributeError(
        f"Checkpoint tracks no item {name!r}; it tracks {sorted(items)}.")

  def __setattr__(self, name: str, value: Any) -> None:
    if name.startswith("_"):
      object.__setattr__(self, name, value)
      return
    if hasattr(type(self), name):
      raise TreeError(
          f"Cannot track an item named {name!r}: it is a Checkpoint "
          "attribute. Choose another name.")
    if "/" in name or "." in name:
      raise TreeError(f"Item name {name!r} must not contain '/' or '.'.")
    self._items[name] = value

  def __delattr__(self, name: str) -> None:
    if name in self._items:
      del self._items[name]
    else:
      object.__delattr__(self, name)

  def __dir__(self):
    return sorted(set(super().__dir__()) | set(self._items))

  def __repr__(self) -> str:
    return f"Checkpoint({', '.join(self._items)}; save_counter={self._save_counter})"

  @property
  def save_counter(self) -> int:
    """Number of `save` calls so far (restored by `restore`); `write` leaves it."""
    return self._save_counter

  # -- saving --------------------------------------------------------------

  def save(self, file_prefix: str | os.PathLike,
           options: CheckpointOptions | None = None) -> SavePath:
    """Saves to ``f"{file_prefix}-{save_counter + 1}"`` and updates the state file.

    Increments `save_counter`. With ``options.enable_async`` it returns once the
    snapshot is taken; the write, commit, write callbacks and state-file update
    run in the background (at most one save in flight).

    Returns:
      The checkpoint path, a ``str`` whose ``.future`` is its `CommitFuture`.

    Raises:
      SaveError: this sync save failed, or an earlier async save failed.
      TreeError, UnknownDeviceError, InvalidOptionsError: bad input; nothing
        is written and the counter is unchanged.
    """
    prefix = os.fspath(file_prefix)
    state_dir = (_kvstore.dirname(prefix) if _kvstore.is_url(prefix)
                 else os.path.abspath(os.path.dirname(prefix) or "."))
    def record(path: str, owner: bool) -> None:
      if owner:
        write_state(state_dir, CheckpointState(path, [path]))
    return self._save(lambda n: f"{prefix}-{n}", _check_options(options), kind="save",
                      on_commit=record)

  def write(self, file_prefix: str | os.PathLike,
            options: CheckpointOptions | None = None) -> SavePath:
    """Writes exactly ``file_prefix``: no counter change, no state file.

    Overwrites an existing checkpoint there only once the new one is complete.
    """
    path = os.fspath(file_prefix)
    return self._save(lambda n: path, _check_options(options), kind="write",
                      on_commit=None)

  def _save(self, path_for: Callable[[int], str], options: CheckpointOptions, *, kind: str,
            on_commit: Callable[[str, bool], None] | None) -> SavePath:
    """The one save path behind save(), write() and CheckpointManager.save().

    ``path_for(counter)`` names the checkpoint; ``kind == "save"`` increments
    the counter; ``on_commit(path, owner)`` runs after the write callbacks.
    """
    start = time.perf_counter()
    io_device = resolve_io_device(options.experimental_io_device)
    routed = io_device is not None and process_count() > 1  # One process does the I/O.
    # Numbered first, before anything that could fail on one process only (an
    # earlier async error, a bad path): every process's n-th save call is then
    # the same operation, and a process that drops out makes the others fail
    # that save at a barrier instead of pairing their later saves with its
    # next one (which would commit shards from different steps).
    coordination = begin("save", options.timeout_s,
                         io_process=io_device.process_index if routed else None)
    counter = self._save_counter + (kind == "save")
    if coordination is not None:  # For the same reason the number is used up now.
      object.__setattr__(self, "_save_counter", counter)
    flat = [leaf for item in flatten_items(self._items) for leaf in item.leaves]
    abstract = [leaf.name for leaf in flat if leaf.abstract]
    if abstract:
      raise TreeError(
          f"Cannot save abstract values (jax.ShapeDtypeStruct) at {abstract[:5]}: they "
          "are restore targets. Restore or initialize them first.")
    if options.incremental and coordination is not None:
      raise InvalidOptionsError(
          "incremental=True is single-process only: with several JAX processes every "
          "process would have to make the same reuse decisions. Use incremental=False.")
    path = path_for(counter)
    url = _kvstore.is_url(path)
    if url and options.incremental:
      raise InvalidOptionsError(
          "incremental=True needs a local path; memory://, s3:// and gs:// checkpoints are "
          "always written in full. Use incremental=False.")
    if url and coordination is not None and path.startswith("memory://"):
      raise InvalidOptionsError(
          "memory:// is private to each process; with several JAX processes save to a "
          "shared filesystem path, s3:// or gs://.")
    nbytes = sum(leaf.nbytes for leaf in flat)
    # Backpressure; also raises an earlier async save's error, as TF does, but
    # not with several processes: an error raised on one process only would drop
    # this save there and fail it on the others, and the next one the other way
    # round. There the error stays for sync()/restore() (and is in its future).
    raise_errors = coordination is None
    if options.enable_async:
      self._saver.reserve(nbytes, max_in_flight=options.max_in_flight,
                          budget=options.memory_budget_bytes, raise_errors=raise_errors)
    else:
      self._saver.wait(raise_errors=raise_errors)
    if not url:
      check_target(path)
    reused = {}
    if options.incremental:
      if os.path.lexists(path):
        raise InvalidPathError(
            f"Incremental saves never overwrite: {path!r} exists, and newer "
            "checkpoints may read data from it. Choose a new path.")
      reused = reuse_by_identity(flat, self._history)
    to_copy = [leaf for leaf in flat if leaf.name not in reused]
    if coordination is not None:
      coordination = dataclasses.replace(coordination, what=f"save of {path!r}")
    staged = []
    if routed:
      # The gather is an XLA collective, which has no timeout: enter it only
      # once every process is known to be here.
      coordination.barrier("gather")
      snapshot = _gather_snapshot(to_copy, io_device.process_index)
    else:
      # Small arrays are packed into shared staging buffers only for the fast
      # writer (see _staging.py); it writes local, single-process saves.
      pack = not url and _fastwrite.takes(compression=options.compression,
                                          single_process=coordination is None,
                                          incremental=options.incremental)
      snapshot, staged = take_snapshot(to_copy, copy=options.enable_async,
                                       io_device=io_device, pool=self._saver.staging,
                                       pack=pack)
    object.__setattr__(self, "_save_counter", counter)
    future = CommitFuture(path)
    job = SaveJob(final=path, snapshot=snapshot, leaves=flat, save_counter=counter, kind=kind,
                  callbacks=list(options.experimental_write_callbacks or ()),
                  on_commit=on_commit, future=future, target=path if url else os.path.abspath(path),
                  nbytes=nbytes, compression=options.compression,
                  chunk_byte_size=options.chunk_byte_size,
                  history=self._history if options.incremental else None, reused=reused,
                  refs={leaf.name: weak(leaf.value) for leaf in flat} if options.incremental
                  else {}, coordination=coordination, staged=staged)
    if options.enable_async:
      logger.info("Saving %s in the background: %d arrays, %.1f MiB%s; save() blocked %.1f ms.",
                  path, len(flat), nbytes / 2**20,
                  f" ({len(reused)} reused)" if reused else "",
                  1e3 * (time.perf_counter() - start))
    self._saver.submit(job, background=options.enable_async)
    return SavePath(path, future)

  def sync(self) -> None:
    """Waits for the pending async save; raises if it (or an earlier one) failed."""
    self._saver.wait()

  # -- restoring -----------------------------------------------------------

  def restore(self, save_path: str | os.PathLike | None,
              options: CheckpointOptions | None = None) -> LoadStatus:
    """Restores tracked items and `save_counter` from a checkpoint.

    Waits for a pending async save first. ``save_path=None`` (e.g. from
    `latest_checkpoint` on a fresh directory) restores nothing and returns a
    status whose assertions fail, as in TF.

    Raises:
      CheckpointNotFoundError: nothing at ``save_path`` (a FileNotFoundError).
      ShapeMismatchError: a tracked value's shape differs (a ValueError);
        nothing is restored.
    """
    return self._restore(save_path, _check_options(options), restore_counter=True)

  def read(self, save_path: str | os.PathLike,
           options: CheckpointOptions | None = None) -> LoadStatus:
    """Like `restore`, for checkpoints made by `write`: leaves `save_counter` alone."""
    return self._restore(save_path, _check_options(options), restore_counter=False)

  def _restore(self, save_path, options: CheckpointOptions, *,
               restore_counter: bool) -> LoadStatus:
    io_device = resolve_io_device(options.experimental_io_device)
    routed = io_device is not None and process_count() > 1  # Only its process reads files.
    # Numbered before anything that may fail on one process only (see _save).
    coordination = begin("restore", options.timeout_s,
                         io_process=io_device.process_index if routed else None)
    self._saver.wait()
    items = flatten_items(self._items)
    flat = [leaf for item in items for leaf in item.leaves]
    tracked = {leaf.name for leaf in flat}
    if routed:
      path, manifest, restored = restore_through(
          coordination, save_path, flat, verify_checksums=options.verify_checksums)
      if path is None:
        return InitializationOnlyStatus(tracked)
    else:
      if save_path is None:
        return InitializationOnlyStatus(tracked)
      path = os.fspath(save_path)
      manifest = read_manifest(path)
      reader = Reader() if coordination is None else Reader(
          processes=frozenset(range(process_count())), key_prefix=f"jaxckpt{coordination.op}")
      restored = read_leaves(path, manifest, flat, io_device,
                             verify_checksums=options.verify_checksums, reader=reader)
    for item in items:
      if any(leaf.name in restored for leaf in item.leaves):
        self._items[item.name] = item.rebuild(restored)
    if restore_counter:
      object.__setattr__(self, "_save_counter", manifest.save_counter)
    return LoadStatus(path, tracked, set(manifest.leaves))
