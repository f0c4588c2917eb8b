"""Runs saves in order on one background thread, within a memory budget, and
never loses an error.

Each `Checkpoint` owns one `Saver`. Jobs run FIFO on a worker thread, so commits,
callbacks and state-file updates happen in save order. Before a save takes its
snapshot it reserves room: at most ``max_in_flight`` saves and
``memory_budget_bytes`` of snapshot data may be held at once; otherwise it waits
for earlier commits (and logs how long). It also owns the `StagingPool` its
saves' snapshots are copied into; a successful save returns its buffers there,
and they are freed after ``_knobs.STAGING_IDLE_S`` without a save that reuses
them (the worker lingers until then). A failed job's error is raised once at
the next save/write/sync/restore. At interpreter exit queued saves are joined
for at most ``_knobs.EXIT_TIMEOUT_S``; anything unfinished or unreported is
logged.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref

from jaxckpt import _compat
from jaxckpt import _knobs
from jaxckpt._commit import SaveJob
from jaxckpt._commit import run_save
from jaxckpt._staging import StagingPool
from jaxckpt._store import store_for

logger = logging.getLogger("jaxckpt")

_LIVE: weakref.WeakSet[Saver] = weakref.WeakSet()


def default_memory_budget() -> int:
  """Half the machine's physical memory."""
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
  except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX.
    return 8 << 30


class Saver:
  """Serializes the saves of one `Checkpoint` and surfaces their errors."""

  def __init__(self):
    self._cond = threading.Condition()
    self._queue: collections.deque[SaveJob] = collections.deque()  # Head may be running.
    self._inflight_bytes = 0
    self._peak_inflight_bytes = 0  # For tests and benchmarks.
    self._errors: list[BaseException] = []
    self._worker_running = False
    self._worker_ident: int | None = None
    self._last_done = time.monotonic()
    self.staging = StagingPool(idle_s=_knobs.STAGING_IDLE_S)
    _LIVE.add(self)
    # A dropped Saver wakes its waiting worker, which then exits (see _worker).
    weakref.finalize(self, _wake, self._cond)

  def _raise_errors(self) -> None:
    with self._cond:
      errors, self._errors = self._errors, []
    if errors:
      first = errors[0]
      if len(errors) > 1:
        first.add_note(
          f"{len(errors) - 1} later async save(s) failed too: "
          + "; ".join(str(e) for e in errors[1:])
        )
      raise first

  def wait(self, *, raise_errors: bool = True) -> None:
    """Waits for every queued save; raises the first error nobody has seen yet."""
    with self._cond:
      while self._queue:
        self._cond.wait()
    if raise_errors:
      self._raise_errors()

  def reserve(
    self, nbytes: int, *, max_in_flight: int, budget: int | None, raise_errors: bool = True
  ) -> float:
    """Blocks until a save of ``nbytes`` fits; returns the seconds waited.

    Raises the error of an earlier failed save, if any.
    """
    budget = default_memory_budget() if budget is None else budget
    start = time.perf_counter()
    with self._cond:
      while self._queue and (
        len(self._queue) >= max_in_flight or self._inflight_bytes + nbytes > budget
      ):
        self._cond.wait()
    waited = time.perf_counter() - start
    if waited > 0.01:
      logger.info(
        "Waited %.3f s for earlier saves to commit (max_in_flight=%d, memory budget %.1f MiB).",
        waited,
        max_in_flight,
        budget / 2**20,
      )
    if nbytes > budget:
      logger.warning(
        "A %.1f MiB snapshot exceeds the memory budget of %.1f MiB; it runs alone.",
        nbytes / 2**20,
        budget / 2**20,
      )
    if raise_errors:
      self._raise_errors()
    return waited

  def submit(self, job: SaveJob, *, background: bool) -> None:
    """Runs ``job`` inline (raising on failure) or queues it for the worker.

    The caller has already called `wait` (sync) or `reserve` (async).
    """
    if not background:
      try:
        job.future.set_result(run_save(job))
      except BaseException as e:
        job.future.set_exception(e)
        raise
      return
    job.future.set_running_or_notify_cancel()
    with self._cond:
      self._queue.append(job)
      self._inflight_bytes += job.plan.nbytes
      self._peak_inflight_bytes = max(self._peak_inflight_bytes, self._inflight_bytes)
      self._cond.notify_all()
      if not self._worker_running:
        self._worker_running = True
        threading.Thread(
          target=_worker, args=(weakref.ref(self),), daemon=True, name="jaxckpt-save"
        ).start()

  def _run_queue(self) -> float | None:
    """Runs queued jobs until there are none; returns how long the worker should
    wait before calling again, or None when it should exit."""
    while True:
      with self._cond:
        if not self._queue:
          idle = time.monotonic() - self._last_done
          if idle < _knobs.WORKER_IDLE_S:
            return _knobs.WORKER_IDLE_S - idle
          stale_in = self.staging.drop_stale()
          if stale_in is None:
            self._worker_running = False
          return stale_in
        job = self._queue[0]
      try:
        path = run_save(job)
      except BaseException as e:
        with self._cond:
          self._errors.append(e)
        job.staged = []  # A failed save may still hold views of them: never reused.
        job.future.set_exception(e)
      else:
        # Before the future resolves: a caller woken by it may save again at once.
        job.snapshot, job.described = None, {}
        self.staging.give_back(job.staged)
        job.staged = []
        job.future.set_result(path)
      with self._cond:
        self._queue.popleft()
        self._inflight_bytes -= job.plan.nbytes
        self._last_done = time.monotonic()
        self._cond.notify_all()

  def wait_for_saves_into(self, directory: str) -> None:
    """Waits until no queued save targets ``directory`` (see the module function).

    On this Saver's own thread it returns at once: a write callback making a
    manager would otherwise wait on itself.
    """
    store = store_for(directory)
    with self._cond:
      while self._worker_ident != threading.get_ident() and any(
        job.plan.store is store and store.within(job.plan.target, directory) for job in self._queue
      ):
        self._cond.wait()

  def _join_at_exit(self, deadline: float) -> None:
    with self._cond:
      if self._queue:
        logger.warning(
          "Waiting for %d async save(s) to finish before exit: %s.",
          len(self._queue),
          ", ".join(j.plan.path for j in self._queue),
        )
      while self._queue and time.monotonic() < deadline:
        self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
      for job in self._queue:
        logger.error(
          "Async save of %s did not finish within %.0f s of interpreter exit; it "
          "is NOT committed and latest_checkpoint still names the previous "
          "checkpoint.",
          job.plan.path,
          _knobs.EXIT_TIMEOUT_S,
        )
      errors, self._errors = self._errors, []
    for error in errors:
      logger.error("An async save failed and was never reported: %s", error)


def wait_for_saves_into(directory: str) -> None:
  """Waits until no save of this process is writing into ``directory``.

  For sweeps of interrupted saves' leftovers (a new `CheckpointManager`), which
  would otherwise delete the staging data of a save still in flight. Errors are
  left for the saves' owners. Other processes' saves are not seen.
  """
  for saver in list(_LIVE):
    saver.wait_for_saves_into(directory)


def _wake(cond: threading.Condition) -> None:
  with cond:
    cond.notify_all()


def _worker(ref: weakref.ref[Saver]) -> None:
  """The save thread of one `Saver`: runs its jobs in order.

  Stays up between saves (starting a thread would be on save()'s blocking path),
  for WORKER_IDLE_S without work and then until the staging buffers are
  freed. While waiting it holds the Saver only weakly: a dropped Checkpoint frees
  its staging buffers at once and wakes the thread, which exits.
  """
  while True:
    saver = ref()
    if saver is None:
      return
    saver._worker_ident = threading.get_ident()
    cond, queue = saver._cond, saver._queue
    wait_s = saver._run_queue()
    del saver
    if wait_s is None:
      return
    with cond:
      if not queue:
        cond.wait(timeout=wait_s)


def _join_pending_saves() -> None:
  deadline = time.monotonic() + _knobs.EXIT_TIMEOUT_S
  for saver in list(_LIVE):
    saver._join_at_exit(deadline)


# Before concurrent.futures stops taking work, which Orbax's save needs (see there).
_compat.register_early_atexit(_join_pending_saves)
