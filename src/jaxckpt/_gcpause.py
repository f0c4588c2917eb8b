"""Python's cyclic garbage collector, paused while a save builds big temporary structures.

Encoding the manifest of thousands of leaves builds tens of thousands of dicts
and lists at once, all freed by reference counting a moment later. With the
collector running they trigger dozens of young collections while alive, are
promoted, and set off a full collection, which traverses every object of the
process (about 70 ms in a small one), almost every save. Paused, they are freed
by reference counting and never seen by the collector.

The pause is process-wide, so it is kept to CPU-bound sections that never wait
for I/O or for other threads, and pauses overlapping on several threads keep
the collector paused until the last one ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_resume = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
  """Pauses the cyclic collector for the ``with`` block (see the module docstring).

  Example:
    >>> import gc
    >>> with paused():
    ...   gc.isenabled()
    False
  """
  global _depth, _resume
  with _lock:
    if _depth == 0:
      _resume = gc.isenabled()
      gc.disable()
    _depth += 1
  try:
    yield
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0 and _resume:
        gc.enable()
