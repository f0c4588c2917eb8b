"""Reentrant locks a signal handler can see: each thread counts the jaxckpt locks it holds.

A preemption handler runs on the main thread between two bytecodes of whatever
it interrupted. If that is jaxckpt code holding a `Checkpoint`'s or manager's
lock (a sync save, ``manager.checkpoints``), saving from the handler would
re-enter it half-way, and waiting for a background save that needs the lock
would deadlock. Instead the handler `defer`\\ s its save: the main thread runs it
as soon as it releases its last jaxckpt lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_held = threading.local()
_deferred: list[Callable[[], None]] = []  # At most one: the preemption handler's.


def held() -> bool:
  """Whether the current thread holds any jaxckpt lock."""
  return getattr(_held, "depth", 0) > 0


def defer(action: Callable[[], None]) -> None:
  """Runs ``action`` on the main thread once it holds no jaxckpt lock."""
  _deferred[:] = [action]


class TrackedRLock:
  """A ``threading.RLock`` that counts, per thread, the jaxckpt locks held."""

  def __init__(self) -> None:
    self._lock = threading.RLock()

  def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
    # Counted before taking it: a signal in between defers, never re-enters.
    _held.depth = getattr(_held, "depth", 0) + 1
    if not self._lock.acquire(blocking, timeout):
      _held.depth -= 1
      return False
    return True

  def release(self) -> None:
    self._lock.release()
    _held.depth -= 1
    if _held.depth == 0 and _deferred and threading.current_thread() is threading.main_thread():
      action = _deferred.pop()
      action()

  def __enter__(self) -> bool:
    return self.acquire()

  def __exit__(self, *exc_info: object) -> None:
    self.release()
