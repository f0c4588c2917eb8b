"""Durability and atomic visibility on POSIX filesystems.

TensorStore fsyncs the array data and OCDBT manifests it writes, but Orbax's own
metadata files (``_METADATA``, ``_CHECKPOINT_METADATA``, the JSON item) and the
directories are not fsynced, and neither is the parent after Orbax's rename
(checked with strace: 22 fsyncs for a 256 MiB save, none of those). jaxckpt
fsyncs everything under the staging directory (cheap: the data is already
durable), renames it to its final name and fsyncs the parent, so a checkpoint
is visible only once all of its bytes are durable.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid

from jaxckpt import _knobs
from jaxckpt._errors import InvalidPathError
from jaxckpt._errors import PathExistsError

try:
  import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; in-flight saves are not marked.
  fcntl = None


def check_target(final: str) -> None:
  """Raises `InvalidPathError` now if ``final`` can never become a checkpoint.

  Cheap (a few stats) so it can run on the caller's thread: a bad path fails the
  call itself instead of the background write.
  """
  if os.path.lexists(final) and not os.path.isdir(final):
    raise InvalidPathError(
        f"Cannot save to {final!r}: it exists and is not a directory. Remove it or "
        "choose another path.")
  ancestor = os.path.dirname(os.path.abspath(final))
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise InvalidPathError(
        f"Cannot save to {final!r}: {ancestor!r} is a file, not a directory.")


def fsync_dir(path: str) -> None:
  fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_tree(root: str) -> None:
  """fsyncs every file and directory under ``root`` (directories last)."""
  for dirpath, _, filenames in os.walk(root, topdown=False):
    for name in filenames:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fsync_dir(dirpath)


def staging_path(final: str) -> str:
  """A hidden sibling of ``final`` to write into before the commit rename."""
  parent, base = os.path.split(final)
  return os.path.join(parent, f".{base}.jaxckpt-tmp-{uuid.uuid4().hex[:12]}")


def hold_staging(staging: str) -> int | None:
  """Marks ``staging`` as in flight until `release_staging`; returns the lock's fd.

  A `CheckpointManager` made in another process (an evaluator following the
  training directory, a restarted job) sweeps interrupted saves' leftovers,
  and an in-flight save's staging data looks exactly like them: deleting it
  made that save commit an unreadable checkpoint. So the save holds an
  exclusive ``flock`` on ``{staging}.lock`` and `remove_leftovers` skips
  anything whose lock is held. The kernel drops the lock when the process
  dies, and its leftovers are then swept. The lock file gets its name only once
  it is locked, so it is never seen unlocked while its save lives: it is made
  unnamed (``O_TMPFILE``), locked, then linked into place, and a kill at any
  moment leaves nothing or a released lock. Where ``O_TMPFILE`` is missing it
  is made under another name and renamed; a kill in between leaves that
  ``.jaxckpt-locking`` file, which `remove_leftovers` deletes a minute later.
  (flock is per host: across hosts on NFS it may not be honoured.)
  """
  if fcntl is None:
    return None
  lock = staging + _LOCK_SUFFIX
  parent = os.path.dirname(staging) or "."
  try:
    fd = os.open(parent, os.O_TMPFILE | os.O_RDWR, 0o644)
  except (AttributeError, OSError):  # Not Linux, or a filesystem without it.
    pass
  else:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      # A dir_fd makes os.link call linkat(AT_SYMLINK_FOLLOW), which links the
      # file behind /proc/self/fd/N; without one CPython 3.11 calls link(),
      # which does not follow it (EXDEV).
      parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
      try:
        os.link(f"/proc/self/fd/{fd}", os.path.basename(lock), dst_dir_fd=parent_fd)
      finally:
        os.close(parent_fd)
      return fd
    except OSError:
      os.close(fd)
  tmp = os.path.join(parent, f".{uuid.uuid4().hex[:12]}{_LOCKING}")
  fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(tmp, lock)
  except BaseException:
    os.close(fd)
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  return fd


def release_staging(staging: str, fd: int) -> None:
  """Ends `hold_staging` (after the commit, or after a failed save's cleanup)."""
  with contextlib.suppress(OSError):  # Else swept once the lock is released.
    os.unlink(staging + _LOCK_SUFFIX)
  os.close(fd)


_LOCK_SUFFIX = ".lock"
_LOCKING = ".jaxckpt-locking"  # hold_staging's name for a lock file not yet locked.
# write_state's temporary file (prefix, suffix): a kill before its rename leaves it.
STATE_TMP = (f".{_knobs.STATE_FILE_NAME}.", ".tmp")
_TEMPORARY_STALE_S = 60.0  # Age at which a lock's or the state file's temporary is swept.
# A staging directory, its lock, Orbax's tmp dirs next to it, and the old
# checkpoint `commit` moves aside while it renames the new one in.
_STAGING_BASE = re.compile(r"^(\..*\.jaxckpt-)(?:tmp|old)(-[0-9a-f]{12})")


def _in_flight(directory: str, name: str) -> bool:
  """Whether leftover-looking ``name`` belongs to a save that still holds its lock."""
  match = _STAGING_BASE.match(name)
  if match is None or fcntl is None:
    return False
  try:
    fd = os.open(os.path.join(directory, f"{match.group(1)}tmp{match.group(2)}{_LOCK_SUFFIX}"),
                 os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def commit(staging: str, final: str) -> None:
  """Makes ``staging`` durable and visible as ``final``.

  If ``final`` already exists (TF's ``write`` overwrites), the old directory is
  moved aside first and deleted only after the new one is in place, so a
  failure never leaves neither.
  """
  fsync_tree(staging)
  parent = os.path.dirname(final) or "."
  old = None
  if os.path.lexists(final):
    if not os.path.isdir(final) or os.path.islink(final):
      raise PathExistsError(
          f"Cannot save to {final!r}: a file that is not a checkpoint directory is "
          "in the way. Remove it or choose another path.")
    old = staging.replace(".jaxckpt-tmp-", ".jaxckpt-old-")
    os.rename(final, old)
  try:
    os.rename(staging, final)
  except BaseException:
    if old is not None:
      os.rename(old, final)
    raise
  fsync_dir(parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as JSON, creating parent directories (fsynced by `commit`)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(json.dumps(obj))  # json.dump would encode in Python: ~10x slower.


def _remove_staging_once(staging: str) -> bool:
  """Removes ``staging`` and Orbax's tmp dirs next to it; True if any were there."""
  parent, base = os.path.split(staging)
  try:
    names = os.listdir(parent or ".")
  except OSError:
    return False
  found = False
  for name in names:
    if name == base or (name.startswith(base + ".") and name != base + _LOCK_SUFFIX):
      found = True
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  return found


def remove_staging(staging: str, *, settle_s: float = 0.1, limit_s: float = 2.0) -> None:
  """Best-effort removal of a failed save's staging data (incl. Orbax's tmp dirs).

  A failed TensorStore commit reports its first error while its other data
  files are still being written, and TensorStore creates missing parent
  directories, so a staging directory removed at once came back 50 ms later
  (seen with a file-size limit). So this removes until nothing has reappeared
  for ``settle_s``, for at most ``limit_s``; anything left is never listed and
  is removed by the next CheckpointManager on the directory.
  """
  deadline = time.monotonic() + limit_s
  quiet_since = time.monotonic()
  while time.monotonic() < deadline:
    if _remove_staging_once(staging):
      quiet_since = time.monotonic()
    elif time.monotonic() - quiet_since >= settle_s:
      return
    time.sleep(0.02)


def remove_checkpoint(path: str) -> None:
  """Deletes a committed checkpoint: first renamed aside, so a half-deleted
  directory is never mistaken for a checkpoint."""
  if not os.path.isdir(path):
    return
  doomed = staging_path(path).replace(".jaxckpt-tmp-", ".jaxckpt-del-")
  os.rename(path, doomed)
  fsync_dir(os.path.dirname(path) or ".")
  shutil.rmtree(doomed, ignore_errors=True)


LEFTOVER_MARKERS = (".jaxckpt-tmp-", ".jaxckpt-old-", ".jaxckpt-del-")


def remove_leftovers(directory: str) -> list[str]:
  """Removes what interrupted saves/deletes left in ``directory``; returns the names.

  Such entries are hidden (leading '.') and never listed or restored; this only
  reclaims their space. Saves still in flight in any process on this host are
  skipped (see `hold_staging`).
  """
  removed = []
  for name in os.listdir(directory):
    if name.endswith(_LOCKING) or (name.startswith(STATE_TMP[0]) and name.endswith(STATE_TMP[1])):
      with contextlib.suppress(OSError):
        if time.time() - os.lstat(os.path.join(directory, name)).st_mtime > _TEMPORARY_STALE_S:
          os.unlink(os.path.join(directory, name))
          removed.append(name)
      continue
    if (name.startswith(".") and any(m in name for m in LEFTOVER_MARKERS)
        and not _in_flight(directory, name)):
      path = os.path.join(directory, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.unlink(path)
      removed.append(name)
  return removed
