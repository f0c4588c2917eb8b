"""Runs saves in the background, one in flight, and never loses an error.

Each `Checkpoint` owns one `Saver`. An async save runs `run_save` on a daemon
thread; the next save/write/sync/restore first waits for it and re-raises its
failure once. At interpreter exit pending saves are joined for at most
``_knobs.EXIT_TIMEOUT_S`` and anything unfinished or unreported is logged.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import threading
import time
import weakref

from jaxckpt import _knobs
from jaxckpt._write import SaveJob, new_checkpointer, run_save

logger = logging.getLogger("jaxckpt")

_LIVE: weakref.WeakSet[Saver] = weakref.WeakSet()


class Saver:
  """Serializes the saves of one `Checkpoint` and surfaces their errors."""

  def __init__(self):
    self._checkpointer = None
    self._pending: SaveJob | None = None
    self._unreported: BaseException | None = None
    self._lock = threading.Lock()
    _LIVE.add(self)

  def _engine(self):
    if self._checkpointer is None:
      self._checkpointer = new_checkpointer()
    return self._checkpointer

  def wait(self) -> None:
    """Waits for the in-flight save; raises its error if nobody has seen it yet."""
    job = self._pending
    if job is not None:
      concurrent.futures.wait([job.future])
      self._pending = None
    with self._lock:
      error, self._unreported = self._unreported, None
    if error is not None:
      raise error

  def submit(self, job: SaveJob, *, background: bool) -> None:
    """Runs ``job`` inline (raising on failure) or on a background thread."""
    self.wait()
    if not background:
      try:
        job.future.set_result(run_save(job, self._engine()))
      except BaseException as e:
        job.future.set_exception(e)
        raise
      return
    job.future.set_running_or_notify_cancel()
    self._pending = job
    threading.Thread(target=self._run, args=(job,), daemon=True,
                     name=f"jaxckpt-save:{job.final}").start()

  def _run(self, job: SaveJob) -> None:
    try:
      path = run_save(job, self._engine())
    except BaseException as e:
      with self._lock:
        self._unreported = e
      job.future.set_exception(e)
    else:
      job.future.set_result(path)

  def _join_at_exit(self, deadline: float) -> None:
    job = self._pending
    if job is not None and not job.future.done():
      logger.warning("Waiting for async save of %s to finish before exit.",
                     job.final)
      done, _ = concurrent.futures.wait(
          [job.future], timeout=max(0.0, deadline - time.monotonic()))
      if not done:
        logger.error(
            "Async save of %s did not finish within %.0f s of interpreter "
            "exit; it is NOT committed and latest_checkpoint still names the "
            "previous checkpoint.", job.final, _knobs.EXIT_TIMEOUT_S)
        return
    with self._lock:
      error, self._unreported = self._unreported, None
    if error is not None:
      logger.error("An async save failed and was never reported: %s", error)


def _join_pending_saves() -> None:
  deadline = time.monotonic() + _knobs.EXIT_TIMEOUT_S
  for saver in list(_LIVE):
    saver._join_at_exit(deadline)


# A plain atexit hook runs too late: by then concurrent.futures has refused new
# work ("cannot schedule new futures after interpreter shutdown") and Orbax's
# save, which uses thread pools, fails mid-write. The stdlib's own executors
# hook in earlier with threading._register_atexit; registered after them, this
# runs before them.
try:
  threading._register_atexit(_join_pending_saves)
except (AttributeError, RuntimeError):  # pragma: no cover - other Pythons.
  atexit.register(_join_pending_saves)
