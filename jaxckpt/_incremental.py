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
import json
import os
import weakref
from typing import Any

from jaxckpt._durable import remove_checkpoint
from jaxckpt._integrity import host_bytes
from jaxckpt._manifest import manifest_file

RETIRED_SUFFIX = ".retired"


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
    if (w is not None and w.ref is not None and w.ref() is leaf.value
        and os.path.isdir(w.holder)):
      out[leaf.name] = w
  return out


def holders_of(checkpoint: str) -> set[str]:
  """Absolute paths of the other checkpoints whose data ``checkpoint`` uses."""
  for name in (manifest_file(checkpoint), manifest_file(checkpoint) + RETIRED_SUFFIX):
    try:
      with open(name) as f:
        leaves = json.load(f)["leaves"]
      break
    except (OSError, ValueError, KeyError):
      continue
  else:
    return set()
  return {os.path.normpath(os.path.join(checkpoint, info["source"]))
          for info in leaves.values() if info.get("source")}


def retire_or_remove(doomed: list[str], directory: str) -> None:
  """Deletes swept checkpoints, keeping (retired) those newer ones still read from."""
  entries = [os.path.join(directory, n) for n in os.listdir(directory)]
  doomed_abs = {os.path.abspath(p) for p in doomed}
  live = [p for p in entries if os.path.isfile(manifest_file(p))
          and os.path.abspath(p) not in doomed_abs]
  referenced = set()
  for path in live:
    referenced |= {os.path.abspath(h) for h in holders_of(path)}
  for path in doomed:
    if os.path.abspath(path) in referenced:
      os.rename(manifest_file(path), manifest_file(path) + RETIRED_SUFFIX)
    else:
      remove_checkpoint(path)
  for path in entries:  # Retired earlier and no longer needed.
    if (os.path.isfile(manifest_file(path) + RETIRED_SUFFIX)
        and os.path.abspath(path) not in referenced):
      remove_checkpoint(path)
