"""Incremental checkpoints: leaves unchanged since the last commit are not written again.

With ``CheckpointOptions(incremental=True)`` a leaf is reused when it is the same
array object as in this `Checkpoint`'s last committed save (decided on the
caller's thread, so it is not even copied) or has the same content (SHA-1 of its
bytes, on the save thread). The new manifest then names the checkpoint whose
``state/`` holds the bytes (``"source": "../ckpt-3"``); chains collapse, so every
leaf has exactly one holder. Deleting checkpoints through `CheckpointManager`
never breaks newer ones: a swept checkpoint that still holds data for a live one
is *retired* (hidden, no longer restorable or listed) and deleted once nothing
refers to it. Incremental saves never overwrite an existing path, since that
could pull data out from under other checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import weakref
from typing import Any

from jaxckpt._integrity import host_bytes
from jaxckpt._manifest import MANIFEST_KEY
from jaxckpt._manifest import RETIRED_SUFFIX
from jaxckpt._manifest import is_committed
from jaxckpt._manifest import manifest_file
from jaxckpt._manifest import sources_of
from jaxckpt._store import store_for


@dataclasses.dataclass(frozen=True)
class Written:
  """Where one leaf's bytes live after a committed save."""

  holder: str  # Absolute path of the checkpoint whose state/ holds the bytes.
  shape: tuple[int, ...]
  dtype: str
  crc32: int | None
  sha1: str | None
  ref: Any = None  # weakref to the array that was saved (identity reuse), or None.


class History:
  """What this Checkpoint's last committed save wrote, per leaf name."""

  def __init__(self):
    self.last: dict[str, Written] = {}


def weak(value: Any):
  try:
    return weakref.ref(value)
  except TypeError:  # Python scalars: reused by content only.
    return None


def content_digest(value: Any) -> str | None:
  data = host_bytes(value)
  return None if data is None else hashlib.sha1(data).hexdigest()


def reuse_by_identity(leaves, history: History) -> dict[str, Written]:
  out = {}
  for leaf in leaves:
    w = history.last.get(leaf.name)
    if w is not None and w.ref is not None and w.ref() is leaf.value and os.path.isdir(w.holder):
      out[leaf.name] = w
  return out


def holders_of(checkpoint: str) -> set[str]:
  """Absolute paths of the other checkpoints whose data ``checkpoint`` uses."""
  return {os.path.abspath(os.path.join(checkpoint, source)) for source in sources_of(checkpoint)}


def retire_or_remove(doomed: list[str], directory: str) -> None:
  """Deletes swept checkpoints, keeping (retired) those newer ones still read from."""
  store = store_for(directory)
  entries = [store.join(directory, n) for n in store.names(directory)]
  doomed_abs = {store.absolute(p) for p in doomed}
  referenced = set()
  if store.incremental:
    for path in entries:
      if store.absolute(path) not in doomed_abs and is_committed(path):
        referenced |= holders_of(path)
  for path in doomed:
    if store.absolute(path) in referenced:
      store.retire(path, MANIFEST_KEY, RETIRED_SUFFIX)
    else:
      store.remove_checkpoint(path)
  for path in entries:  # Retired earlier and no longer needed.
    if (
      store.incremental
      and store.read_bytes(manifest_file(path) + RETIRED_SUFFIX) is not None
      and store.absolute(path) not in referenced
    ):
      store.remove_checkpoint(path)
