"""One save, start to finish: snapshot → Orbax/TensorStore write → commit → callbacks → state file.

`run_save` is the same for sync and async saves; only the thread differs. The
arrays are written by `_fastwrite` (TensorStore, Orbax's layout) when it can,
else by Orbax's `AsyncCheckpointer` (compression, incremental, several processes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxckpt import _compat
from jaxckpt import _fastwrite
from jaxckpt import _knobs
from jaxckpt import _kvstore
from jaxckpt._durable import commit
from jaxckpt._durable import hold_staging
from jaxckpt._durable import release_staging
from jaxckpt._durable import remove_staging
from jaxckpt._durable import staging_path
from jaxckpt._durable import write_json
from jaxckpt._errors import SaveError
from jaxckpt._errors import WriteCallbackError
from jaxckpt._future import CommitFuture
from jaxckpt._incremental import History
from jaxckpt._incremental import Written
from jaxckpt._incremental import content_digest
from jaxckpt._integrity import checksum
from jaxckpt._integrity import shard_checksums
from jaxckpt._manifest import Manifest
from jaxckpt._manifest import is_committed
from jaxckpt._manifest import manifest_file
from jaxckpt._manifest import read_manifest
from jaxckpt._multihost import Coordination
from jaxckpt._multihost import CoordinationError
from jaxckpt._multihost import sweep_keys
from jaxckpt._options import call_write_callback
from jaxckpt._staging import unpack
from jaxckpt._tree import Leaf
from jaxckpt._tree import nest

logger = logging.getLogger("jaxckpt")


@dataclasses.dataclass
class SaveJob:
  """Everything a save needs after the caller has moved on."""
  final: str  # As the caller wrote it (returned, passed to callbacks).
  snapshot: dict[str, Any] | None  # name -> value; dropped after Orbax took it and CRCs ran
  leaves: list[Leaf]  # For the manifest, built on the worker (off the caller's path).
  save_counter: int
  kind: str  # "save" or "write"
  callbacks: list[Callable[..., Any]]
  # Runs last, after the callbacks, as on_commit(path, owner): save() records
  # the path in the state file; CheckpointManager also sweeps old checkpoints.
  # ``owner`` is False on processes that must not touch files (multi-process).
  on_commit: Callable[[str, bool], None] | None
  future: CommitFuture
  target: str = ""  # Absolute form of `final`, fixed at save time (cwd may change).
  nbytes: int = 0  # Snapshot bytes held until the job finishes (memory budget).
  compression: bool = False
  chunk_byte_size: int | None = None
  # Incremental saves: the Checkpoint's history, leaves reused by identity (not
  # in the snapshot) and weakrefs to the saved arrays for the next save.
  history: History | None = None
  reused: dict[str, Written] = dataclasses.field(default_factory=dict)
  refs: dict[str, Any] = dataclasses.field(default_factory=dict)
  manifest: Manifest | None = None  # Set by the worker.
  # Several JAX processes: this save's number and timeout (see _multihost.py).
  coordination: Coordination | None = None
  # The snapshot's staging buffers (see _staging.py), returned to the pool after a
  # successful save; the save must hold nothing else that reads them by then.
  staged: list = dataclasses.field(default_factory=list)
  started: float = dataclasses.field(default_factory=time.perf_counter)


def new_checkpointer(*, compression: bool = False,
                     coordination: Coordination | None = None) -> ocp.AsyncCheckpointer:
  """The Orbax engine: a Composite whose ``state`` item is a PyTree of the arrays.

  With several processes, one engine per save: its barriers go through the
  coordination service (``active_processes`` set; Orbax's default barrier is an
  XLA collective, which from this background thread could interleave with the
  training step's collectives and deadlock), under this save's own key prefix
  (Orbax reuses barrier names across saves) and with the save's timeout.
  """
  if coordination is None:
    return ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler(**{
        _knobs.STATE_ITEM: ocp.PyTreeCheckpointHandler(use_compression=compression)}))
  mp = coordination.orbax_options()  # Also for the handlers: they pick who writes metadata.
  extra = {}
  if coordination.writers is not None:  # One process writes whole numpy arrays.
    extra["type_handler_registry"] = _compat.registry_writing_on(coordination.primary)
  handler = ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(multiprocessing_options=mp),
      **{_knobs.STATE_ITEM: ocp.PyTreeCheckpointHandler(
          use_compression=compression, multiprocessing_options=mp, **extra)})
  return ocp.AsyncCheckpointer(
      handler, multiprocessing_options=mp,
      async_options=ocp.AsyncOptions(timeout_secs=max(1, int(coordination.timeout_s))))


def _write_manifest(staging: str, manifest: Manifest) -> None:
  # Written by jaxckpt, after Orbax finished, so the CRCs it holds can be
  # computed while TensorStore writes (per 512 MiB: 0.04 s with ISA-L, 0.15 s with zlib).
  write_json(manifest_file(staging), manifest.to_json())


def _commit_to_kvstore(job: SaveJob) -> None:
  """A save to a ``memory://``/``s3://``/``gs://`` URL; see _kvstore.py.

  With several processes: the primary names the data prefix and creates the
  arrays, every process writes its own shards, and once all have (barrier) the
  primary writes the manifest, i.e. commits.
  """
  target, coord = job.target, job.coordination
  primary = coord is None or coord.is_primary
  shared = coord is not None and coord.writers is None  # Several processes write.
  previous = url = None
  try:
    data = _name_for_all(coord, target, "data", _kvstore.new_data_name)
    url = _kvstore.join(target, data)
    if primary:
      previous = read_manifest(target) if is_committed(target) else None
      stores = _kvstore.create_arrays(url, job.snapshot, compression=job.compression)
    if shared:
      coord.barrier("created")
      if not primary:
        stores = _kvstore.open_arrays(url, job.snapshot)
    _kvstore.write_arrays(stores, job.snapshot, host_values=primary)
    checksums, shard_sums = _take_checksums(job, coord)
    job.manifest = Manifest.build(job.leaves, save_counter=job.save_counter, kind=job.kind,
                                  checksums=checksums, data=data, shard_checksums=shard_sums)
    job.leaves = None
    if shared:
      coord.barrier("written")
    if primary:
      # The commit: one PUT of the manifest, after every array write returned.
      # ("committed" is published by run_save once the state file is written.)
      _kvstore.write_bytes(manifest_file(target), json.dumps(job.manifest.to_json()).encode())
    else:
      _await_commit(coord)
  except BaseException as e:
    _publish_failure(coord, e)
    if primary and url is not None:
      try:  # Invisible without a manifest; a crashed process's is swept later.
        _kvstore.delete_prefix(url)
      except Exception as cleanup:
        logger.warning("Could not delete the data of failed save %s (%s); it is never "
                       "read, and a later CheckpointManager deletes it.", job.final, cleanup)
    raise SaveError(
        f"Saving checkpoint {job.final!r} failed ({type(e).__name__}: {e}). Earlier "
        "checkpoints are untouched and this one was not committed.") from e
  if previous is not None and previous.data and previous.data != data:
    _kvstore.delete_prefix(_kvstore.join(target, previous.data))  # Overwritten by write().


def _write_and_commit(job: SaveJob, engine: Callable[[], ocp.AsyncCheckpointer]) -> None:
  """``engine()`` gives the Orbax checkpointer, built only if Orbax writes this save."""
  target = job.target or os.path.abspath(job.final)
  coord = job.coordination
  if coord is not None and not coord.writes:  # Another process does the I/O.
    try:
      _await_commit(coord)
    except BaseException as e:
      raise SaveError(f"Saving checkpoint {job.final!r} failed: {e}") from e
    return
  if _kvstore.is_url(target):
    _commit_to_kvstore(job)
    return
  primary = coord is None or coord.is_primary
  staging = lock = None
  try:
    # Absolute: Orbax's OCDBT refuses relative paths. Every process must write
    # into the same staging directory: the primary names it.
    staging = _name_for_all(coord, target, "staging", lambda: staging_path(target))
    if coord is not None and coord.writers is None:
      # Everyone is here: from now on Orbax's barriers run, whose blocking part
      # uses Orbax's fixed 300 s timeout instead of ours.
      coord.barrier("start")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if primary:  # Other processes' CheckpointManagers must not sweep it meanwhile.
      lock = hold_staging(staging)
    digests: dict[str, str | None] = {}
    if job.history is not None:  # Must hash before deciding what to write.
      _reuse_by_content(job, digests)
    fast = checkpointer = None
    if job.snapshot and _fastwrite.eligible(
        job.snapshot, compression=job.compression, single_process=coord is None,
        incremental=job.history is not None):
      fast = _fastwrite.start(os.path.join(staging, _knobs.STATE_ITEM), job.snapshot,
                              chunk_byte_size=job.chunk_byte_size)
    elif job.snapshot:  # Orbax refuses an empty PyTree; a Checkpoint may track nothing.
      # Packed arrays were meant for the fast writer; a leaf it cannot take
      # (e.g. float8, empty) sends this save to Orbax, which wants jax.Arrays.
      job.snapshot = unpack(job.snapshot)
      tree = nest(job.snapshot)
      save_args = None
      if job.chunk_byte_size is not None:
        save_args = jax.tree.map(
            lambda _: ocp.SaveArgs(chunk_byte_size=job.chunk_byte_size), tree)
      # Returns once Orbax has the data on the host (device→host copies done);
      # TensorStore writes continue on Orbax's thread.
      checkpointer = engine()
      checkpointer.save(staging, args=ocp.args.Composite(**{
          _knobs.STATE_ITEM: ocp.args.PyTreeSave(tree, save_args=save_args)}))
    elif primary:
      os.makedirs(staging)
    # Overlaps the TensorStore writes: reads the snapshot, which is ours alone.
    checksums, shard_sums = _take_checksums(job, coord)
    for name, w in job.reused.items():
      checksums[name], digests[name] = w.crc32, w.sha1
    job.manifest = Manifest.build(
        job.leaves, save_counter=job.save_counter, kind=job.kind, checksums=checksums,
        sources={n: os.path.relpath(w.holder, target) for n, w in job.reused.items()},
        digests=digests, shard_checksums=shard_sums)
    job.leaves = None  # Holds the caller's arrays; not needed any more.
    if fast is not None:
      fast.wait()
    elif checkpointer is not None:
      checkpointer.wait_until_finished()  # With several processes: all shards written.
    if primary:
      _write_manifest(staging, job.manifest)
      commit(staging, target)  # run_save publishes "committed" after the state file.
    else:
      _await_commit(coord)
  except BaseException as e:
    if primary and staging is not None:
      remove_staging(staging)
    _publish_failure(coord, e)
    hint = ""
    if coord is not None:
      hint = (f" With {jax.process_count()} processes, one that died or stalled makes the "
              f"others give up after CheckpointOptions.timeout_s={coord.timeout_s:g} s.")
    raise SaveError(
        f"Saving checkpoint {job.final!r} failed ({type(e).__name__}: {e}). "
        f"Earlier checkpoints are untouched and this one was not committed.{hint}") from e
  finally:
    if lock is not None:  # After the commit, or after a failed save's cleanup.
      release_staging(staging, lock)


def _take_checksums(job: SaveJob, coord: Coordination | None
                    ) -> tuple[dict[str, int | None], dict[str, dict[str, int]]]:
  """CRC-32 of each snapshot value (None for arrays no process holds whole) and
  the per-shard CRCs of those; then frees the snapshot."""
  checksums = {name: checksum(value) for name, value in job.snapshot.items()}
  shard_sums = _shard_checksums(job.snapshot, checksums, coord)
  job.snapshot = None
  return checksums, shard_sums


def _publish_failure(coord: Coordination | None, error: BaseException) -> None:
  """Tells the other processes now, rather than at their timeout (primary only)."""
  if coord is not None and coord.is_primary:
    try:
      coord.publish("committed", f"{type(error).__name__}: {error}")
    except Exception:  # The coordination service itself is gone.
      pass


def _shard_checksums(snapshot: dict[str, Any], checksums: dict[str, int | None],
                     coord: Coordination | None) -> dict[str, dict[str, int]]:
  """Per-shard CRC-32s of the arrays no process holds whole, from every process
  (complete on the primary; see _integrity.py)."""
  local = {name: shard_checksums(value) for name, value in snapshot.items()
           if checksums.get(name) is None and isinstance(value, jax.Array)
           and not value.is_fully_addressable}
  if coord is None or coord.writers is not None:
    return local
  if not coord.is_primary:
    coord.publish(f"crc/{jax.process_index()}", json.dumps(local))
    return local
  for process in range(jax.process_count()):
    if process != coord.primary:
      for name, sums in json.loads(coord.receive(f"crc/{process}", sender=process)).items():
        local.setdefault(name, {}).update(sums)
  return local


def _name_for_all(coord: Coordination | None, target: str, key: str, make) -> str:
  """``make()`` on the primary (a staging directory or data prefix name), the same
  name on every process, after checking every process saves to ``target``."""
  if coord is None:
    return make()
  shared, name = json.loads(coord.share(key, lambda: json.dumps([target, make()])))
  if shared != target:
    raise CoordinationError(
        f"Process {coord.primary} saves this operation to {shared!r}, this process to "
        f"{target!r}: the processes' save calls are out of step (every process must make "
        "the same save/write calls, in the same order, with the same paths).")
  return name


def _await_commit(coord: Coordination) -> None:
  outcome = coord.receive("committed")
  if outcome != "ok":
    raise CoordinationError(f"process {coord.primary} failed to commit: {outcome}")


def _reuse_by_content(job: SaveJob, digests: dict[str, str | None]) -> None:
  """Drops snapshot leaves whose bytes equal what the last commit wrote."""
  for name in list(job.snapshot):
    digests[name] = content_digest(job.snapshot[name])
    w = job.history.last.get(name)
    value = job.snapshot[name]
    if (w is not None and digests[name] is not None and w.sha1 == digests[name]
        and tuple(getattr(value, "shape", ())) == w.shape and os.path.isdir(w.holder)):
      job.reused[name] = w
      del job.snapshot[name]


def _record_history(job: SaveJob, target: str) -> None:
  last = {}
  for name, info in job.manifest.leaves.items():
    if name in job.reused:
      last[name] = dataclasses.replace(job.reused[name], ref=job.refs.get(name))
    else:
      last[name] = Written(holder=target, shape=tuple(info.shape), dtype=info.dtype,
                           crc32=job.manifest.checksums.get(name),
                           sha1=job.manifest.digests.get(name), ref=job.refs.get(name))
  job.history.last = last


def run_save(job: SaveJob, engine: Callable[[], ocp.AsyncCheckpointer] | None) -> str:
  """Writes, commits, runs callbacks, updates the state file; returns the path.

  ``engine()`` gives the caller's Orbax checkpointer (None with several
  processes, where each save builds its own); it is not called when TensorStore
  writes the save directly (`_fastwrite`).

  With several processes every process runs the write callbacks once the
  checkpoint is committed; only the primary runs ``on_commit`` (state file,
  manager sweep), and the others' saves finish only after it did, so
  `latest_checkpoint` agrees on every process once ``save`` returns.
  """
  try:
    return _run_save(job, engine)
  finally:
    if job.coordination is not None:
      sweep_keys(job.coordination.op)


def _run_save(job: SaveJob, engine: Callable[[], ocp.AsyncCheckpointer] | None) -> str:
  coord = job.coordination
  if coord is not None and coord.writes and not _kvstore.is_url(job.target):
    checkpointer = new_checkpointer(compression=job.compression, coordination=coord)
    try:
      with _compat.stop_metrics_leak():  # Up to Orbax's wait_until_finished.
        _write_and_commit(job, lambda: checkpointer)
    except BaseException:
      try:  # Its own (later) error, e.g. a barrier timeout, must not mask this one.
        checkpointer.close()
      except Exception as e:
        logger.debug("Closing Orbax after a failed save: %s", e)
      raise
    checkpointer.close()
  else:
    with _compat.stop_metrics_leak():
      _write_and_commit(job, engine)
  try:
    if job.history is not None:
      _record_history(job, job.target)
    for i, callback in enumerate(job.callbacks):
      try:
        call_write_callback(callback, job.final)
      except BaseException as e:
        raise WriteCallbackError(
            f"Checkpoint {job.final!r} was committed, but write callback #{i} "
            f"{callback!r} raised {type(e).__name__}: {e}. Later callbacks did not "
            "run and the state file was not updated.") from e
    if job.on_commit is not None:
      job.on_commit(job.final, coord is None or coord.is_primary)
  finally:
    if coord is not None and coord.is_primary:  # Committed, whatever the callbacks did.
      coord.publish("committed", "ok")
  logger.info("Committed checkpoint %s (%.1f MiB) in %.3f s.", job.final,
              job.nbytes / 2**20, time.perf_counter() - job.started)
  return job.final
