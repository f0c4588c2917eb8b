"""The local tier of a `CheckpointManager`: frequent per-process saves with peer replicas.

Every ``local_interval`` steps each process writes the shards it holds
(`_shards.encode`) to its own directory, ``{local_directory}/process-{i}``
(a RAM disk such as ``/dev/shm`` or a local SSD), together with a replica of
process ``(i + 1) % n``'s shards, which it receives by a JAX collective
(`_replica.exchange`, on the caller's thread, so its bytes are made there
too; a single process only takes an async save's snapshot and makes the bytes
later). The write runs on a background thread and commits through the store's
protocol: a hidden staging directory,
``manifest.json`` written last, one rename; a save killed half-way leaves only
a hidden directory, never chosen and swept by the next manager.

Restore: the processes share which steps each holds (own shards and replica),
pick the newest step whose every process's shards are somewhere, and restore it
if it is at least as new as the persistent tier's latest; a process whose
directory came back empty receives its shards from the process that keeps its
replica. Local steps newer than what was restored belong to an abandoned run
and are deleted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import mmap
import os
import time
from typing import Any

import jax
import numpy as np

from jaxckpt import _knobs
from jaxckpt import _replica
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._errors import JaxckptError
from jaxckpt._errors import SaveError
from jaxckpt._errors import _LocalTierMismatch
from jaxckpt._integrity import checksum
from jaxckpt._multihost import Coordination
from jaxckpt._multihost import begin
from jaxckpt._shards import Shards
from jaxckpt._shards import check_concrete
from jaxckpt._shards import decode
from jaxckpt._shards import encode
from jaxckpt._shards import values_for
from jaxckpt._snapshot import take_snapshot
from jaxckpt._store import LocalStore
from jaxckpt._store import is_url
from jaxckpt._tree import flatten_items

logger = logging.getLogger("jaxckpt")

MANIFEST = "manifest.json"  # Written last: its presence commits a local step.
OWN = "own.bin"
PEER = "peer.bin"
_STEP = "step-"


@dataclasses.dataclass(frozen=True)
class Holdings:
  """The committed local steps of one process: its own shards and its peer's replica."""

  own: frozenset[int]
  peer: frozenset[int]

  def to_json(self) -> str:
    return json.dumps({"own": sorted(self.own), "peer": sorted(self.peer)})

  @classmethod
  def from_json(cls, text: str) -> Holdings:
    data = json.loads(text)
    return cls(frozenset(data["own"]), frozenset(data["peer"]))


def _crc32s(data: bytes | np.ndarray | mmap.mmap) -> list[int]:
  """CRC-32s of ``data``'s blocks, on all cores (the CRC releases the GIL)."""
  flat = np.frombuffer(data, np.uint8)
  blocks = [
    flat[i : i + _knobs.LOCAL_CRC_BLOCK] for i in range(0, flat.size, _knobs.LOCAL_CRC_BLOCK)
  ]
  if len(blocks) <= 1:
    return [checksum(flat)]
  with concurrent.futures.ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1)) as pool:
    return list(pool.map(checksum, blocks))


def newest_complete(holdings: list[Holdings]) -> int | None:
  """The newest step every process's shards are present for: at the process
  itself or at the one keeping its replica (process ``i - 1``)."""
  count = len(holdings)
  steps = set().union(*(h.own for h in holdings))
  complete = [
    s
    for s in steps
    if all(s in holdings[i].own or (count > 1 and s in holdings[i - 1].peer) for i in range(count))
  ]
  return max(complete, default=None)


def _gather(coordination: Coordination | None, name: str, value: str) -> list[str]:
  """Every process's ``value``, by process index (small metadata, not shards)."""
  if coordination is None:
    return [value]
  me = jax.process_index()
  coordination.publish(f"{name}/{me}", value)
  return [
    value if p == me else coordination.receive(f"{name}/{p}", sender=p)
    for p in range(jax.process_count())
  ]


class LocalTier:
  """A manager's local tier (see the module docstring)."""

  def __init__(self, directory: str, interval: int, max_to_keep: int):
    self.directory = os.path.join(os.path.abspath(directory), f"process-{jax.process_index()}")
    self.interval = interval
    self.max_to_keep = max_to_keep
    self._store = LocalStore()
    self._last_step: int | None = None
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxckpt-local")
    self._pending: concurrent.futures.Future | None = None
    self._error: BaseException | None = None
    self.last_save_s: dict[str, float] = {}  # Where the last save() blocked (benchmarks).
    os.makedirs(self.directory, exist_ok=True)
    removed = self._store.remove_leftovers(self.directory, lambda path: None)
    if removed:
      logger.info("Deleted what interrupted local saves left in %s: %s.", self.directory, removed)

  def path(self, step: int) -> str:
    return os.path.join(self.directory, f"{_STEP}{step}")

  # -- saving ----------------------------------------------------------------

  def due(self, step: int) -> bool:
    last = self._last_step
    return last is None or step >= last + self.interval or step < last

  def save(self, checkpoint: Any, step: int, timeout_s: float) -> None:
    """Snapshots this process's shards, swaps replicas, writes in the background.

    A collective when several processes run: every process must call it for
    the same steps. Raises the previous local save's error, if it failed.
    """
    start = time.perf_counter()
    # Numbered first, then any earlier failure: raised on one process only, it
    # would drop this save there and leave the others waiting (see _checkpoint._save).
    coordination = begin(f"local save of step {step}", timeout_s)
    self.wait(raise_errors=coordination is None)
    with checkpoint._lock:  # Items are replaced by restores on other threads.
      leaves = [leaf for item in flatten_items(checkpoint._items) for leaf in item.leaves]
      meta = {
        "step": step,
        "process": jax.process_index(),
        "count": jax.process_count(),
        "save_counter": checkpoint.save_counter,
      }
    check_concrete(leaves)
    self._last_step = step
    if coordination is None:  # No peer: the bytes are made in the background.
      snapshot, _ = take_snapshot(leaves, copy=True, io_device=None)
      copies = [dataclasses.replace(leaf, value=snapshot[leaf.name]) for leaf in leaves]
      self.last_save_s = {"snapshot": time.perf_counter() - start, "exchange": 0.0}
      self._pending = self._pool.submit(lambda: self._write(step, encode(copies, meta), None))
      return
    own = encode(leaves, meta)  # The exchange sends these bytes, on this thread.
    encoded = time.perf_counter()
    coordination.barrier("exchange")  # A collective has no timeout: all are here first.
    peer = _replica.exchange(own, 1)
    self.last_save_s = {"snapshot": encoded - start, "exchange": time.perf_counter() - encoded}
    self._pending = self._pool.submit(self._write, step, own, peer)

  def _write(self, step: int, own: bytes | np.ndarray, peer: bytes | None) -> None:
    target = self.path(step)
    staging = self._store.new_staging(target)
    held = self._store.hold(staging)
    try:
      os.makedirs(staging)
      files: dict[str, bytes | np.ndarray] = {OWN: own}
      if peer is not None:
        files[PEER] = peer
      for name, data in files.items():
        with open(os.path.join(staging, name), "wb") as f:
          f.write(np.frombuffer(data, np.uint8).data)
      marker = {
        "step": step,
        "process": jax.process_index(),
        "count": jax.process_count(),
        "crc32": {name: _crc32s(data) for name, data in files.items()},
        "created": time.time(),
      }
      self._store.commit(staging, target, (MANIFEST, json.dumps(marker).encode()))
    except BaseException:
      self._store.abort(staging, target)
      raise
    finally:
      self._store.release(staging, held)
    for old in self.steps()[: -self.max_to_keep]:
      self._store.remove_checkpoint(self.path(old))

  def wait(self, raise_errors: bool = True) -> None:
    """Waits for the pending local write; raises `SaveError` if one failed."""
    pending, self._pending = self._pending, None
    if pending is not None:
      try:
        pending.result()
      except Exception as e:
        logger.error("A local-tier save to %s failed: %s", self.directory, e)
        self._error = self._error or e
    if not raise_errors:
      return
    error, self._error = self._error, None
    if error is not None:
      raise SaveError(f"A local-tier save to {self.directory!r} failed: {error}") from error

  # -- what is here ----------------------------------------------------------

  def _marker(self, step: int) -> dict[str, Any] | None:
    try:
      with open(os.path.join(self.path(step), MANIFEST), "rb") as f:
        marker = json.loads(f.read())
    except (OSError, ValueError):
      return None
    if not isinstance(marker, dict) or marker.get("count") != jax.process_count():
      return None  # Another job's, or another process layout's: never restored.
    if marker.get("process") != jax.process_index() or marker.get("step") != step:
      return None
    return marker

  def steps(self) -> list[int]:
    """Committed local steps, oldest first."""
    found = []
    for name in self._store.names(self.directory):
      number = name[len(_STEP) :]
      if name.startswith(_STEP) and number.isdigit() and self._marker(int(number)) is not None:
        found.append(int(number))
    return sorted(found)

  def holdings(self) -> Holdings:
    own, peer = set(), set()
    for step in self.steps():
      marker = self._marker(step) or {}
      own |= {step} if OWN in marker.get("crc32", {}) else set()
      peer |= {step} if PEER in marker.get("crc32", {}) else set()
    return Holdings(frozenset(own), frozenset(peer))

  def read(self, step: int, name: str) -> bytes | mmap.mmap:
    """The committed file ``name`` of ``step``, checked against its CRC-32s.

    Mapped, not copied: committed files are never written again (a new save
    renames a new directory into place). The mapping is private
    (copy-on-write), so arrays that JAX builds on it may be donated.
    """
    where = os.path.join(self.path(step), name)
    marker = self._marker(step) or {}
    with open(where, "rb") as f:
      data = (
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(f.fileno()).st_size else b""
      )
    if _crc32s(data) != marker.get("crc32", {}).get(name):
      raise CorruptCheckpointError(f"Local-tier file {where!r} does not match its CRC-32.")
    return data

  def drop_newer(self, step: int | None) -> None:
    """Deletes local steps newer than ``step`` (the one restored)."""
    for old in self.steps():
      if step is None or old > step:
        self._store.remove_checkpoint(self.path(old))

  def close(self) -> None:
    self._pool.shutdown(wait=True)

  # -- restoring -------------------------------------------------------------

  def choose(self, timeout_s: float) -> tuple[Coordination | None, list[Holdings], int | None]:
    """Agrees with the other processes on the newest complete local step."""
    coordination = begin("local-tier restore", timeout_s)
    said = _gather(coordination, "holdings", self.holdings().to_json())
    holdings = [Holdings.from_json(text) for text in said]
    return coordination, holdings, newest_complete(holdings)

  def _read_or_none(self, step: int, name: str) -> bytes | mmap.mmap | None:
    try:
      return self.read(step, name)
    except (OSError, CorruptCheckpointError) as e:
      logger.warning("Local-tier file %s of step %d unusable: %s", name, step, e)
      return None

  def fetch(self, coordination: Coordination | None, holdings: list[Holdings], step: int) -> Shards:
    """This process's shards of ``step``: its own, or its replica from its keeper.

    Every process reaches the exchange (whatever it found locally), so one
    unreadable file never leaves the others waiting in a collective.
    """
    count = jax.process_count()
    me = jax.process_index()
    missing = [i for i, h in enumerate(holdings) if step not in h.own]
    mine = self._read_or_none(step, OWN) if step in holdings[me].own else None
    if missing and coordination is not None:
      coordination.barrier("return replicas")
      owner = _replica.ring_peer(me, count)
      sending = self._read_or_none(step, PEER) if owner in missing else None
      received = _replica.exchange(sending or b"", -1)
      if mine is None and received:
        mine = received
        keeper = (me - 1) % count
        logger.info("Received this process's shards of step %d from process %d.", step, keeper)
        # Kept again locally (in the background), so the step survives another loss.
        self._pending = self._pool.submit(self._write, step, received, None)
    if mine is None:
      raise _LocalTierMismatch(f"no readable shards of step {step} on process {me}")
    return decode(mine, self.path(step))

  def restore(self, checkpoint: Any, timeout_s: float, persistent: int | None) -> int | None:
    """Restores the newest complete local step if it is at least ``persistent``.

    Returns the step restored, or None (then nothing changed and the caller
    reads the persistent tier). Every process returns the same.
    """
    coordination, holdings, step = self.choose(timeout_s)
    if step is None or (persistent is not None and step < persistent):
      return None
    items = flatten_items(checkpoint._items)
    leaves = [leaf for item in items for leaf in item.leaves]
    try:
      shards = self.fetch(coordination, holdings, step)
      values = values_for(shards, leaves)
      problem = ""
    except (JaxckptError, OSError) as e:
      values, problem = {}, f"{type(e).__name__}: {e}"
    problems = [p for p in _gather(coordination, "fit", problem) if p]
    if problems:
      logger.warning(
        "Local step %d not restored (%s); reading the persistent tier.", step, problems
      )
      return None
    with checkpoint._lock:
      for item in items:
        checkpoint._items[item.name] = item.rebuild(values)
      object.__setattr__(checkpoint, "_save_counter", int(shards.header["save_counter"]))
    self._last_step = step
    return step


def step_of(path: str | None) -> int | None:
  """The number of a persistent checkpoint ``{prefix}-{N}`` (None if it has none)."""
  number = None if path is None else os.path.basename(path).rpartition("-")[2]
  return int(number) if number and number.isdigit() else None


def numbered(checkpoint_number: Any, step: int | None) -> int:
  """The step a tiered save is numbered by: ``checkpoint_number``, else the step counter.

  Raises:
    InvalidOptionsError: neither is given.
  """
  if checkpoint_number is not None:
    return checkpoint_number
  if step is None:
    raise InvalidOptionsError(
      "With a local tier (local_directory=...) every save needs a step number: pass "
      "save(checkpoint_number=step) or give the CheckpointManager a step_counter."
    )
  return step


def restore_newest(
  tier: LocalTier, checkpoint: Any, latest: str | None, timeout_s: float
) -> tuple[str | None, str | None]:
  """Restores the newer of the local tier's newest complete step and ``latest``.

  Returns:
    (path restored, "local" or "persistent"), or (None, None) if neither tier
    has a checkpoint.
  """
  persistent = step_of(latest)
  step = tier.restore(checkpoint, timeout_s, persistent)
  if step is not None:
    tier.drop_newer(step)
    logger.info("Restored step %d from the local tier (%s).", step, tier.path(step))
    return tier.path(step), "local"
  if latest is None:
    tier.drop_newer(None)
    return None, None
  checkpoint.restore(latest)
  tier.drop_newer(persistent)
  logger.info("Restored %s from the persistent tier (no newer complete local step).", latest)
  return latest, "persistent"


def local_tier(directory: Any, interval: Any, max_to_keep: Any) -> LocalTier | None:
  """The manager's local tier, None if ``directory`` is None.

  Raises:
    InvalidOptionsError: ``interval`` or ``max_to_keep`` is not a positive int.
  """
  for name, value in (("local_interval", interval), ("local_max_to_keep", max_to_keep)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise InvalidOptionsError(f"{name} must be a positive int, got {value!r}.")
  if directory is None:
    return None
  if is_url(directory):
    raise InvalidOptionsError(
      f"local_directory must be a local path (e.g. /dev/shm/run), got {directory!r}."
    )
  return LocalTier(os.fspath(directory), interval, max_to_keep)
