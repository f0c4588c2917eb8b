"""One save after its snapshot: layout write → manifest → commit → callbacks → state file.

`run_save` is the same for sync and async saves; only the thread differs. It
executes the `SavePlan` (_plan.py) and decides nothing: the layout writes the
snapshot into the store's staging location, CRC-32s are computed meanwhile,
the store commits (the manifest is the commit marker), then the write
callbacks and ``on_commit`` (state file, manager sweep) run in order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any
from typing import cast

import jax
import numpy as np

from jaxckpt import _compat
from jaxckpt._errors import SaveError
from jaxckpt._errors import WriteCallbackError
from jaxckpt._future import CommitFuture
from jaxckpt._incremental import History
from jaxckpt._incremental import Written
from jaxckpt._incremental import content_digest
from jaxckpt._integrity import checksum
from jaxckpt._integrity import shard_checksums
from jaxckpt._manifest import Manifest
from jaxckpt._manifest import data_of
from jaxckpt._manifest import encode
from jaxckpt._multihost import Coordination
from jaxckpt._multihost import CoordinationError
from jaxckpt._multihost import sweep_keys
from jaxckpt._options import call_write_callback
from jaxckpt._plan import SavePlan
from jaxckpt._tree import Leaf

logger = logging.getLogger("jaxckpt")


@dataclasses.dataclass
class SaveJob:
  """A planned save and the data it owns once the caller has moved on."""

  plan: SavePlan
  future: CommitFuture
  leaves: list[Leaf] | None  # For the manifest; holds the caller's arrays until built.
  snapshot: dict[str, Any] | None  # name -> value; dropped once written and checksummed.
  # Snapshot entries that are numpy views of these jax.Arrays (see _snapshot.py):
  # written as the arrays they view.
  described: dict[str, Any] = dataclasses.field(default_factory=dict)
  # The snapshot's staging buffers (see _staging.py), returned to the pool after a
  # successful save; the save must hold nothing else that reads them by then.
  staged: list = dataclasses.field(default_factory=list)
  # Incremental saves: the Checkpoint's history, leaves reused by identity (not
  # in the snapshot) and weakrefs to the saved arrays for the next save.
  history: History | None = None
  reused: dict[str, Written] = dataclasses.field(default_factory=dict)
  refs: dict[str, Any] = dataclasses.field(default_factory=dict)
  manifest: Manifest | None = None
  started: float = dataclasses.field(default_factory=time.perf_counter)


PLAN_AGREEMENT = "plan"  # The agreement a save makes first; see `agree_on_plan`.


def run_save(job: SaveJob) -> str:
  """Writes, commits, runs callbacks, updates the state file; returns the path.

  With several processes every process records the commit (``on_commit``: its
  manager's list; the primary also writes the state file and sweeps) before it
  runs the write callbacks, so a callback failing on one process cannot leave
  its `latest_checkpoint` behind the others'; the others' saves finish only
  after the primary's record. With one process the callbacks run first, as in TF.
  """
  plan, coord = job.plan, job.plan.coordination
  try:
    _write_and_commit(job)
    if job.history is not None and job.manifest is not None:
      _record_history(job, job.history, job.manifest)
    try:
      if plan.on_commit is not None and coord is not None:
        # Recorded first: the checkpoint is committed for every process, and a
        # callback failing on one of them must not leave its manager behind.
        _on_commit(plan, coord.is_primary)
      _run_callbacks(plan, recorded=coord is not None)
      if plan.on_commit is not None and coord is None:
        _on_commit(plan, True)
    finally:
      if coord is not None and coord.is_primary:  # Committed, whatever the callbacks did.
        coord.publish("committed", "ok")
  finally:
    if coord is not None:
      sweep_keys(coord.op)
  logger.info(
    "Committed checkpoint %s (%.1f MiB) in %.3f s.",
    plan.path,
    plan.nbytes / 2**20,
    time.perf_counter() - job.started,
  )
  return plan.path


def _run_callbacks(plan: SavePlan, *, recorded: bool) -> None:
  for i, callback in enumerate(plan.callbacks):
    try:
      call_write_callback(callback, plan.path)
    except BaseException as e:
      state = (
        "it is recorded as the latest checkpoint (with several processes the record "
        "comes first, on every process)"
        if recorded
        else "the state file was not updated"
      )
      raise WriteCallbackError(
        f"Checkpoint {plan.path!r} was committed, but write callback #{i} "
        f"{callback!r} raised {type(e).__name__}: {e}. Later callbacks did not "
        f"run and {state}."
      ) from e


def _on_commit(plan: SavePlan, owner: bool) -> None:
  if plan.on_commit is None:
    return
  try:
    plan.on_commit(plan.path, owner)
  except OSError as e:  # ENOSPC, a read-only remount: name what is committed.
    raise SaveError(
      f"Checkpoint {plan.path!r} was committed, but updating the state file next to it "
      f"failed ({type(e).__name__}: {e}); latest_checkpoint does not name it yet. A "
      "CheckpointManager opened on the directory adopts it."
    ) from e


def _write_and_commit(job: SaveJob) -> None:
  coord = job.plan.coordination
  if coord is None:
    _write_and_commit_bounded(job)
    return
  with _compat.orbax_barrier_timeout(coord.timeout_s):
    _write_and_commit_bounded(job)


def agree_on_plan(plan: SavePlan, leaves: list) -> None:
  """All processes check that they make the same save: processes whose calls are
  out of step, or whose options or trees differ, would commit shards of
  different saves, or a checkpoint no one can read.

  Raises:
    CoordinationError: naming the processes, the field and the values.
  """
  coord = plan.coordination
  if coord is None:
    return
  fields = {
    "kind": plan.kind,
    # Routed: only the I/O process resolves the path (the others' cwd may differ).
    "path": plan.path if plan.routed else plan.target,
    "compression": plan.compression,
    "chunk_byte_size": plan.chunk_byte_size,
    "incremental": plan.incremental,
    "experimental_io_device": None
    if plan.io_device is None
    else f"process {plan.io_device.process_index}",
  }
  tree = [[leaf.name, list(leaf.shape), np.dtype(leaf.dtype).name] for leaf in leaves]
  coord.agree(PLAN_AGREEMENT, fields, trees={"tree": tree})


def _write_and_commit_bounded(job: SaveJob) -> None:
  plan, coord = job.plan, job.plan.coordination
  if coord is not None and not plan.routed:  # Routed saves agreed before their gather.
    try:
      agree_on_plan(plan, job.leaves or [])
    except BaseException as e:
      _fail(job, e, None)
  if coord is not None and not coord.writes:  # Another process does the I/O.
    try:
      _await_commit(coord)
    except BaseException as e:
      raise SaveError(f"Saving checkpoint {plan.path!r} failed: {e}") from e
    return
  primary = coord is None or coord.is_primary
  store, target = plan.store, plan.target
  staging: str | None = None
  held = None
  try:
    staging = (
      store.new_staging(target)
      if coord is None
      else coord.share("staging", lambda: store.new_staging(target))
    )
    if coord is not None and coord.writers is None:
      # Everyone is here: from now on Orbax's barriers run, whose blocking part
      # uses Orbax's fixed 300 s timeout instead of ours.
      coord.barrier("start")
    # write() over a URL checkpoint: its old data prefix goes once the new one is in.
    # (A rename replaces a local checkpoint whole: nothing to read there.)
    previous = data_of(target) if primary and not store.renames else None
    if primary:  # Other processes' CheckpointManagers must not sweep it meanwhile.
      held = store.hold(staging)
    marker = _write(job, store.data_dir(staging, target), staging)
    if coord is not None and coord.writers is None:
      coord.barrier("written")
    if coord is None or coord.is_primary:
      store.commit(staging, target, cast(tuple, marker))  # Published by run_save.
    else:
      _await_commit(coord)
  except BaseException as e:
    _fail(job, e, staging if primary else None)
  finally:
    if held is not None and staging is not None:  # After the commit or the cleanup.
      store.release(staging, held)
  if previous is not None and previous != staging:
    store.drop_data(target, previous)  # The data of the checkpoint write() replaced.


def _write(job: SaveJob, data_dir: str, staging: str) -> tuple[str, bytes] | None:
  """The layout writes the snapshot while its CRC-32s are computed; builds the
  manifest meanwhile and, on the committing process, encodes it: returns the
  commit marker (None on the others)."""
  plan, leaves = job.plan, job.leaves or []
  digests: dict[str, str | None] = {}
  if job.history is not None:  # Must hash before deciding what to write.
    _reuse_by_content(job, job.history, digests)
  pending = plan.layout.write(job, data_dir)
  # Overlaps the TensorStore writes: reads the snapshot, which is ours alone.
  # The fast writer computes some from the bytes it writes.
  known = getattr(pending, "checksums", None) or {}
  checksums, shard_sums = _take_checksums(job, plan.coordination, known)
  for name, w in job.reused.items():
    checksums[name], digests[name] = w.crc32, w.sha1
  manifest = job.manifest = Manifest.build(
    leaves,
    save_counter=plan.save_counter,
    kind=plan.kind,
    checksums=checksums,
    sources={n: os.path.relpath(w.holder, plan.target) for n, w in job.reused.items()},
    digests=digests,
    shard_checksums=shard_sums,
    data=None if plan.store.renames else staging,
    counter_saved=plan.counter_saved,
    packed=getattr(pending, "packed", ()),
  )
  job.leaves = None  # Holds the caller's arrays; not needed any more.
  coord = plan.coordination
  # The process that commits encodes it, while the last writes finish.
  marker = encode(manifest) if coord is None or coord.is_primary else None
  pending.wait()
  return marker


def _fail(job: SaveJob, error: BaseException, staging: str | None) -> None:
  plan, coord = job.plan, job.plan.coordination
  if staging is not None:
    try:
      plan.store.abort(staging, plan.target)
    except Exception as cleanup:
      logger.warning(
        "Could not delete the data of failed save %s (%s); it is never "
        "read, and a later CheckpointManager deletes it.",
        plan.path,
        cleanup,
      )
  _publish_failure(coord, error)
  hint = ""
  if coord is not None:
    hint = (
      f" With {jax.process_count()} processes, one that died or stalled makes the "
      f"others give up after CheckpointOptions.timeout_s={coord.timeout_s:g} s."
    )
  raise SaveError(
    f"Saving checkpoint {plan.path!r} failed ({type(error).__name__}: {error}). "
    f"Earlier checkpoints are untouched and this one was not committed.{hint}"
  ) from error


def _take_checksums(
  job: SaveJob, coord: Coordination | None, known: dict[str, int]
) -> tuple[dict[str, int | None], dict[str, dict[str, int]]]:
  """CRC-32 of each snapshot value (None for arrays no process holds whole;
  ``known`` ones taken as they are) and the per-shard CRCs of those; then frees
  the snapshot."""
  snapshot = job.snapshot or {}
  checksums: dict[str, int | None] = {
    name: known[name] if name in known else checksum(value) for name, value in snapshot.items()
  }
  shard_sums = _shard_checksums(snapshot, checksums, coord)
  job.snapshot, job.described = None, {}
  return checksums, shard_sums


def _publish_failure(coord: Coordination | None, error: BaseException) -> None:
  """Tells the other processes now, rather than at their timeout (primary only)."""
  if coord is not None and coord.is_primary:
    try:
      coord.publish("committed", f"{type(error).__name__}: {error}")
    except Exception:  # The coordination service itself is gone.
      pass


def _shard_checksums(
  snapshot: dict[str, Any], checksums: dict[str, int | None], coord: Coordination | None
) -> dict[str, dict[str, int]]:
  """Per-shard CRC-32s of the arrays no process holds whole, from every process
  (complete on the primary; see _integrity.py)."""
  local = {
    name: shard_checksums(value)
    for name, value in snapshot.items()
    if checksums.get(name) is None
    and isinstance(value, jax.Array)
    and not value.is_fully_addressable
  }
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


def _await_commit(coord: Coordination) -> None:
  outcome = coord.receive("committed")
  if outcome != "ok":
    raise CoordinationError(f"process {coord.primary} failed to commit: {outcome}")


def _reuse_by_content(job: SaveJob, history: History, digests: dict[str, str | None]) -> None:
  """Drops snapshot leaves whose bytes equal what the last commit wrote."""
  snapshot = job.snapshot or {}
  for name in list(snapshot):
    value = snapshot[name]
    digests[name] = content_digest(value)
    w = history.last.get(name)
    if (
      w is not None
      and digests[name] is not None
      and w.sha1 == digests[name]
      and tuple(getattr(value, "shape", ())) == w.shape
      and os.path.isdir(w.holder)
    ):
      job.reused[name] = w
      del snapshot[name]


def _record_history(job: SaveJob, history: History, manifest: Manifest) -> None:
  last = {}
  for name, info in manifest.leaves.items():
    if name in job.reused:
      last[name] = dataclasses.replace(job.reused[name], ref=job.refs.get(name))
    elif name not in manifest.packed:  # Packed data is read only from its own checkpoint.
      last[name] = Written(
        holder=job.plan.target,
        shape=tuple(info.shape),
        dtype=info.dtype,
        crc32=manifest.checksums.get(name),
        sha1=manifest.digests.get(name),
        ref=job.refs.get(name),
      )
  history.last = last
