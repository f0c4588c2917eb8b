"""Python's cyclic garbage collector, paused while jaxckpt creates an object per leaf.

A save or restore of thousands of leaves creates tens of thousands of small
objects at once (leaves, views, manifest entries), most freed by reference
counting a moment later. With the collector running they trigger dozens of
young collections while alive, are promoted, and set off a full collection,
which traverses every object of the process (about 70 ms in a small one),
almost every save. Paused, the short-lived ones are never seen by the collector.

The pause is process-wide, so it is kept to sections bound by CPU (at most a
read of a few kilobytes of metadata), never around waits for data or for other
threads; pauses overlapping on several threads keep the collector paused until
the last one ends. Sections: a save's flatten, plan and snapshot, the manifest's
encoding and parsing, a restore's flatten, checks, read planning, placement and
rebuild.
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
