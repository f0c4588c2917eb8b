"""Where checkpoints live: local POSIX paths, or TensorStore key-value-store URLs.

One `Store` per kind of path (`store_for`), so nothing else asks whether a path
is a URL. A store joins and lists paths, reads and atomically replaces small
files (the state file, manifests), sweeps what interrupted saves left, and runs
the commit protocol a checkpoint becomes visible by:

* `LocalStore`: a save writes into a hidden sibling staging directory; the
  commit writes the manifest into it, fsyncs every file and directory under it
  (TensorStore fsyncs its data; Orbax's metadata files and the directories are
  not), renames it to its final name and fsyncs the parent. A checkpoint is
  visible only once all of its bytes are durable.
* `KvStore` (``memory://``, ``s3://``, ``gs://``): object stores have no atomic
  rename. Arrays go under a fresh prefix ``<ckpt>/data-<time>-<random>/``; the
  commit is one PUT of the manifest, which names that prefix. A checkpoint
  exists iff its manifest does; a crashed save's data is invisible, and swept.
  ``s3://`` takes its endpoint from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``
  (TensorStore ignores those), region from ``AWS_REGION``/``AWS_DEFAULT_REGION``
  and credentials from the environment (or TensorStore's default chain).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import tensorstore as ts

from jaxckpt import _knobs
from jaxckpt._errors import ConcurrentWriterError
from jaxckpt._errors import InvalidPathError
from jaxckpt._errors import PathExistsError

try:
  import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; in-flight saves are not marked.
  fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("jaxckpt")

SCHEMES = ("memory://", "s3://", "gs://")


class Store(abc.ABC):
  """Operations on one kind of path; implementations are stateless singletons.

  Paths are strings in the store's own spelling (a local path or a URL).

  Attributes:
    renames: checkpoints commit by an atomic directory rename (the Orbax PyTree
      layout needs it); else by writing the manifest last.
    incremental: leaves may be read from other checkpoints (``source``).
  """

  renames = False
  incremental = False

  def shared(self, path: str) -> bool:
    """Whether every process sees the same contents at ``path`` (not ``memory://``)."""
    return True

  @abc.abstractmethod
  def absolute(self, path: str) -> str:
    """``path`` fixed against the working directory (local) or normalized (URLs)."""

  @abc.abstractmethod
  def join(self, base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended."""

  @abc.abstractmethod
  def dirname(self, path: str) -> str:
    """The directory holding ``path``."""

  @abc.abstractmethod
  def basename(self, path: str) -> str:
    """The last component of ``path``."""

  def resolve(self, directory: str, path: str) -> str:
    """``path`` (as a state file names it) relative to ``directory``."""
    return self.join(directory, path)

  def parent_of(self, path: str, directory: str) -> bool:
    """Whether ``path`` lies directly in ``directory``."""
    return self.dirname(self.absolute(path)) == self.absolute(directory)

  def within(self, path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies below it."""
    root = self.absolute(directory).rstrip("/") + "/"
    return (self.absolute(path).rstrip("/") + "/").startswith(root)

  @abc.abstractmethod
  def names(self, directory: str) -> list[str]:
    """Sorted names directly in ``directory`` (empty if there is none)."""

  @abc.abstractmethod
  def exists(self, path: str) -> bool:
    """Whether anything is stored at (or under) ``path``."""

  @abc.abstractmethod
  def read_bytes(self, path: str) -> bytes | None:
    """The file's bytes, or None if it does not exist."""

  def is_file(self, path: str) -> bool:
    """Whether a file is stored at ``path``."""
    return self.read_bytes(path) is not None

  @abc.abstractmethod
  def replace_file(self, path: str, data: bytes) -> None:
    """Atomically replaces ``path`` with ``data`` (durable once it returns)."""

  def size(self, path: str) -> int | None:
    """Bytes stored under ``path``, or None where the store cannot tell."""
    return None

  def check_target(self, path: str) -> None:  # noqa: B027 - Nothing to check by default.
    """Raises `InvalidPathError` now if ``path`` can never become a checkpoint."""

  # -- the commit protocol ----------------------------------------------------

  @abc.abstractmethod
  def new_staging(self, target: str) -> str:
    """A fresh name for a save's data before it is committed at ``target``."""

  @abc.abstractmethod
  def data_dir(self, staging: str, target: str) -> str:
    """Where the layout writes a save's arrays."""

  def hold(self, staging: str) -> Any:
    """Marks ``staging`` as in flight (see `LocalStore.hold`); for `release`."""
    return None

  def release(self, staging: str, held: Any) -> None:  # noqa: B027 - Nothing held.
    """Ends `hold`."""

  @abc.abstractmethod
  def commit(self, staging: str, target: str, marker: tuple[str, bytes]) -> None:
    """Makes the save visible at ``target``: writes ``marker`` (key, bytes) last."""

  @abc.abstractmethod
  def abort(self, staging: str, target: str) -> None:
    """Best-effort removal of a failed save's data."""

  def drop_data(self, target: str, data: str) -> None:  # noqa: B027 - Renames replace it.
    """Deletes the data prefix ``data`` an overwritten checkpoint used."""

  def retire(self, path: str, key: str, suffix: str) -> None:  # noqa: B027 - Not incremental.
    """Renames ``path/key`` to ``path/key+suffix`` (see _incremental.py)."""

  @abc.abstractmethod
  def remove_checkpoint(self, path: str) -> None:
    """Deletes a committed checkpoint so that it is never half there."""

  def lock_writer(self, directory: str) -> None:  # noqa: B027 - No locks on key-value stores.
    """Marks this process as ``directory``'s one writing manager (see `_lock_writer`)."""

  @abc.abstractmethod
  def remove_leftovers(self, directory: str, live_data: Callable[[str], str | None]) -> list[str]:
    """Deletes what interrupted saves left in ``directory``; returns the names.

    ``live_data(checkpoint)`` names the data prefix a checkpoint's manifest uses.
    """

  @abc.abstractmethod
  def incomplete(self, directory: str) -> list[str]:
    """Names of interrupted saves' leftovers in ``directory`` (for ``jaxckpt ls``)."""


def is_url(path: Any) -> bool:
  return isinstance(path, str) and path.startswith(SCHEMES)


def store_for(path: str | os.PathLike) -> Store:
  """The store holding ``path``."""
  return KV if is_url(path) else LOCAL


def fspath(path: str | os.PathLike) -> str:
  """``path`` as a string, URLs without trailing slashes (``memory://`` stays)."""
  path = os.fspath(path)
  return KV.normalize(path) if is_url(path) else path


# -- local files ----------------------------------------------------------------------

_LOCK_SUFFIX = ".lock"
_LOCKING = ".jaxckpt-locking"  # hold()'s name for a lock file not yet locked.
# The state file's temporary (prefix, suffix): a kill before its rename leaves it.
_STATE_TMP = (f".{_knobs.STATE_FILE_NAME}.", ".tmp")
_TEMPORARY_STALE_S = 60.0  # Age at which a lock's or a file's temporary is swept.
# A staging directory, its lock, Orbax's tmp dirs next to it, and the old
# checkpoint `commit` moves aside while it renames the new one in.
_STAGING_BASE = re.compile(r"^(\..*\.jaxckpt-)(?:tmp|old)(-[0-9a-f]{12})")
LEFTOVER_MARKERS = (".jaxckpt-tmp-", ".jaxckpt-old-", ".jaxckpt-del-")


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


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON, creating parent directories (fsynced by the commit)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(json.dumps(obj))  # json.dump encodes in Python, chunk by chunk: much slower.


def _sibling(path: str, marker: str) -> str:
  parent, base = os.path.split(path)
  return os.path.join(parent, f".{base}.jaxckpt-{marker}-{uuid.uuid4().hex[:12]}")


def _stale(path: str) -> bool:
  with contextlib.suppress(OSError):
    return time.time() - os.lstat(path).st_mtime > _TEMPORARY_STALE_S
  return False


class LocalStore(Store):
  """POSIX paths; commits by rename (see the module docstring)."""

  renames = True
  incremental = True

  def absolute(self, path: str) -> str:
    return os.path.abspath(path)

  def join(self, base: str, *parts: str) -> str:
    return os.path.join(base, *parts)

  def dirname(self, path: str) -> str:
    return os.path.dirname(path) or "."

  def basename(self, path: str) -> str:
    return os.path.basename(path)

  def names(self, directory: str) -> list[str]:
    try:
      return sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
      return []

  def exists(self, path: str) -> bool:
    return os.path.exists(path)

  def is_file(self, path: str) -> bool:
    return os.path.isfile(path)

  def read_bytes(self, path: str) -> bytes | None:
    try:
      with open(path, "rb") as f:
        return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
      return None

  def replace_file(self, path: str, data: bytes) -> None:
    directory = self.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.basename(path)}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
    fsync_dir(directory)

  def size(self, path: str) -> int | None:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)

  def check_target(self, path: str) -> None:
    # A few stats, so it runs on the caller's thread: a bad path fails the call
    # itself instead of the background write.
    if os.path.lexists(path) and not os.path.isdir(path):
      raise InvalidPathError(
        f"Cannot save to {path!r}: it exists and is not a directory. Remove it or "
        "choose another path."
      )
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
      ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
      raise InvalidPathError(f"Cannot save to {path!r}: {ancestor!r} is a file, not a directory.")

  def new_staging(self, target: str) -> str:
    return _sibling(target, "tmp")

  def data_dir(self, staging: str, target: str) -> str:
    return staging

  def hold(self, staging: str) -> int | None:
    """Holds an exclusive ``flock`` on ``{staging}.lock`` until `release`.

    A `CheckpointManager` in another process (an evaluator following the
    training directory, a restarted job) sweeps interrupted saves' leftovers,
    and an in-flight save's staging data looks exactly like them; sweeps skip
    anything whose lock is held. The kernel drops the lock when the process
    dies. The lock file gets its name only once it is locked: it is made
    unnamed (``O_TMPFILE``), locked, then linked into place, so a kill at any
    moment leaves nothing or a released lock. Without ``O_TMPFILE`` it is made
    under another name and renamed; a kill in between leaves a
    ``.jaxckpt-locking`` file, swept a minute later. (flock is per host: across
    hosts on NFS it may not be honoured.)
    """
    os.makedirs(os.path.dirname(staging), exist_ok=True)
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
        # With a dir_fd os.link calls linkat(AT_SYMLINK_FOLLOW), which follows
        # /proc/self/fd/N; without one CPython 3.11 calls link(), which does not.
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

  def release(self, staging: str, held: Any) -> None:
    if held is None:
      return
    with contextlib.suppress(OSError):  # Else swept once the lock is released.
      os.unlink(staging + _LOCK_SUFFIX)
    os.close(held)

  def commit(self, staging: str, target: str, marker: tuple[str, bytes]) -> None:
    """Writes ``marker``, makes ``staging`` durable and renames it to ``target``.

    An existing ``target`` (TF's ``write`` overwrites) is moved aside first and
    deleted only once the new one is in place, so a failure never leaves neither.
    """
    key, data = marker
    os.makedirs(staging, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.join(staging, key)), exist_ok=True)
    with open(os.path.join(staging, key), "wb") as f:
      f.write(data)
    fsync_tree(staging)
    old = None
    if os.path.lexists(target):
      if not os.path.isdir(target) or os.path.islink(target):
        raise PathExistsError(
          f"Cannot save to {target!r}: a file that is not a checkpoint directory is "
          "in the way. Remove it or choose another path."
        )
      old = staging.replace(".jaxckpt-tmp-", ".jaxckpt-old-")
      os.rename(target, old)
    try:
      os.rename(staging, target)
    except BaseException:
      if old is not None:
        os.rename(old, target)
      raise
    fsync_dir(self.dirname(target))
    if old is not None:
      remove_tree(old)

  def abort(
    self, staging: str, target: str, *, settle_s: float = 0.1, limit_s: float = 2.0
  ) -> None:
    """Removes ``staging`` (and Orbax's tmp dirs next to it) until nothing has
    reappeared for ``settle_s``, for at most ``limit_s``.

    A failed TensorStore commit reports its first error while other data files
    are still being written, and TensorStore creates missing parent
    directories, so a staging directory removed at once can come back. Anything
    left is never listed and is removed by the next CheckpointManager.
    """
    deadline = time.monotonic() + limit_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
      if _remove_staging_once(staging):
        quiet_since = time.monotonic()
      elif time.monotonic() - quiet_since >= settle_s:
        return
      time.sleep(0.02)

  def lock_writer(self, directory: str) -> None:
    _lock_writer(directory)

  def remove_checkpoint(self, path: str) -> None:
    # Renamed aside first, so a half-deleted directory is never taken for a checkpoint.
    if not os.path.isdir(path) or os.path.islink(path):
      return
    doomed = _sibling(path, "del")
    os.rename(path, doomed)
    fsync_dir(self.dirname(path))
    remove_tree(doomed)

  def retire(self, path: str, key: str, suffix: str) -> None:
    """Renames ``path/key`` to ``path/key+suffix`` (see _incremental.py)."""
    os.rename(os.path.join(path, key), os.path.join(path, key + suffix))

  def remove_leftovers(self, directory: str, live_data: Callable[[str], str | None]) -> list[str]:
    # Hidden entries never listed or restored; saves still in flight in any
    # process on this host are skipped (see `hold`).
    removed = []
    for name in self.names(directory):
      path = os.path.join(directory, name)
      if name.endswith(_LOCKING) or (
        name.startswith(_STATE_TMP[0]) and name.endswith(_STATE_TMP[1])
      ):
        if _stale(path):
          with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(name)
        continue
      if (
        name.startswith(".")
        and any(m in name for m in LEFTOVER_MARKERS)
        and not _in_flight(directory, name)
      ):
        if os.path.isdir(path) and not os.path.islink(path):
          remove_tree(path)
        else:
          with contextlib.suppress(OSError):
            os.unlink(path)
        removed.append(name)
    return removed

  def incomplete(self, directory: str) -> list[str]:
    return [
      n
      for n in self.names(directory)  # (Not the lock files of saves.)
      if n.startswith(".")
      and any(m in n for m in LEFTOVER_MARKERS)
      and not n.endswith(_LOCK_SUFFIX)
    ]


def remove_tree(path: str) -> None:
  """``rmtree``; what cannot be deleted (permissions, a busy mount) is logged, not
  raised: it is hidden, never listed, and the next manager tries again."""
  errors: list[str] = []

  def record(_function, failed, error) -> None:
    errors.append(f"{failed}: {error if isinstance(error, BaseException) else error[1]}")

  if sys.version_info >= (3, 12):
    shutil.rmtree(path, onexc=record)
  else:
    shutil.rmtree(path, onerror=record)
  if errors and os.path.lexists(path):
    logger.warning(
      "Could not delete %s (%d errors, first: %s); delete it by hand.", path, len(errors), errors[0]
    )


_writer_locks: dict[str, int] = {}  # realpath -> fd, one per directory per process.


def _lock_writer(directory: str) -> None:
  """Takes this process's exclusive ``flock`` on ``directory`` itself (no file is
  added to it), kept until the process exits; managers within one process share
  it. The kernel releases it when the process dies, so a restarted job saves at once.

  Raises:
    ConcurrentWriterError: another live process holds it.
  """
  key = os.path.realpath(directory)
  if fcntl is None or key in _writer_locks:
    return
  try:
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
  except OSError:  # Unreadable: the save itself says what is wrong.
    return
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise ConcurrentWriterError(
      f"Another process is saving checkpoints into {directory!r} through its own "
      "CheckpointManager (it holds the directory's flock); two writers would overwrite "
      "each other's checkpoints and state file. Stop the other process or give this "
      "one its own directory."
    ) from None
  except OSError as e:  # A filesystem without flock: two writers go undetected there.
    os.close(fd)
    logger.debug("No writer lock on %s: %s", directory, e)
    return
  except BaseException:
    os.close(fd)
    raise
  _writer_locks[key] = fd


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


def _in_flight(directory: str, name: str) -> bool:
  """Whether leftover-looking ``name`` belongs to a save that still holds its lock."""
  match = _STAGING_BASE.match(name)
  if match is None or fcntl is None:
    return False
  try:
    fd = os.open(
      os.path.join(directory, f"{match.group(1)}tmp{match.group(2)}{_LOCK_SUFFIX}"), os.O_RDONLY
    )
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


# -- key-value stores -----------------------------------------------------------------

_DATA_NAME = re.compile(r"^data-[0-9a-f]+(-[0-9a-f]{12})?$")


_WRITER_KEY = ".jaxckpt-writer"  # A key-value-store directory's newest writing process.
_WRITER_ID = uuid.uuid4().hex
_kv_writers: set[str] = set()  # Directories this process has claimed.


def _range(prefix: str) -> ts.KvStore.KeyRange:
  prefix = prefix.rstrip("/") + "/"
  return ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")  # "0" sorts right after "/".


def _age_s(data_name: str) -> float:
  """Seconds since `new_staging` made ``data_name`` (inf for names without a time)."""
  parts = data_name.split("-")
  try:
    return time.time() - int(parts[1], 16) if len(parts) == 3 else float("inf")
  except ValueError:
    return float("inf")


@functools.lru_cache(maxsize=64)
def _open_root(spec_json: str) -> ts.KvStore:
  return ts.KvStore.open(json.loads(spec_json), context=KvStore.context).result()


class KvStore(Store):
  """TensorStore kvstores; commits by writing the manifest (see the module docstring)."""

  # One context for the process: memory:// contents live in it (two contexts see
  # two different stores), and it shares connection pools for s3/gcs.
  context = ts.Context()

  def normalize(self, url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.rstrip('/')}"

  def absolute(self, path: str) -> str:
    return self.normalize(path)

  def join(self, base: str, *parts: str) -> str:
    scheme, rest = base.split("://", 1)
    if scheme != "memory" and not rest.strip("/"):
      raise InvalidPathError(f"{base!r} names no bucket: use {scheme}://BUCKET/path.")
    names = [p.strip("/") for p in (rest, *parts) if p.strip("/")]
    return f"{scheme}://" + "/".join(names)

  def dirname(self, path: str) -> str:
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.rstrip('/').rpartition('/')[0]}"

  def basename(self, path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]

  def shared(self, path: str) -> bool:
    return not path.startswith("memory://")

  def resolve(self, directory: str, path: str) -> str:
    return path if is_url(path) else self.join(directory, path)

  def spec(self, url: str) -> tuple[dict[str, Any], str]:
    """(root kvstore spec, key) for a URL."""
    scheme, rest = url.split("://", 1)
    if scheme == "memory":
      return {"driver": "memory"}, rest.strip("/")
    bucket, _, key = rest.partition("/")
    if not bucket:
      raise InvalidPathError(f"{url!r} names no bucket: use {scheme}://BUCKET/path.")
    if scheme == "gs":
      return {"driver": "gcs", "bucket": bucket}, key.strip("/")
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
      spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
      spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # Else TensorStore's default chain.
      spec["aws_credentials"] = {"type": "environment"}
    return spec, key.strip("/")

  def _root(self, url: str) -> tuple[ts.KvStore, str]:
    spec, key = self.spec(url)
    return _open_root(json.dumps(spec, sort_keys=True)), key

  def names(self, directory: str) -> list[str]:
    kv, key = self._root(directory)
    start = len(key.rstrip("/")) + 1 if key else 0
    names = set()
    for k in kv.list(_range(key) if key else ts.KvStore.KeyRange()).result():
      names.add(k.decode()[start:].split("/", 1)[0])
    return sorted(names)

  def exists(self, path: str) -> bool:
    return bool(self.names(path))

  def read_bytes(self, path: str) -> bytes | None:
    kv, key = self._root(path)
    result = kv.read(key).result()
    return bytes(result.value) if result.state == "value" else None

  def replace_file(self, path: str, data: bytes) -> None:
    kv, key = self._root(path)
    kv.write(key, data).result()  # One PUT: atomic on object stores.

  def delete_prefix(self, url: str) -> None:
    """Deletes every object under ``url/``."""
    kv, key = self._root(url)
    kv.delete_range(_range(key)).result()

  def new_staging(self, target: str) -> str:
    # The time tells `remove_leftovers` whether a save may still be writing it.
    return f"data-{int(time.time()):x}-{uuid.uuid4().hex[:12]}"

  def data_dir(self, staging: str, target: str) -> str:
    return self.join(target, staging)

  def commit(self, staging: str, target: str, marker: tuple[str, bytes]) -> None:
    self.replace_file(self.join(target, marker[0]), marker[1])

  def abort(self, staging: str, target: str) -> None:
    # Invisible without a manifest; a crashed process's data is swept later.
    self.delete_prefix(self.data_dir(staging, target))

  def is_data_name(self, name: Any) -> bool:
    """Whether ``name`` is a data prefix `new_staging` could have made."""
    return isinstance(name, str) and _DATA_NAME.match(name) is not None

  def drop_data(self, target: str, data: str) -> None:
    if self.is_data_name(data):  # Only a data prefix directly in this checkpoint.
      self.delete_prefix(self.join(target, data))

  def remove_checkpoint(self, path: str) -> None:
    # The manifest first, so the checkpoint stops existing before its data goes.
    kv, key = self._root(self.join(path, _knobs.MANIFEST_ITEM, "metadata"))
    kv.write(key, None).result()
    self.delete_prefix(path)

  def remove_leftovers(self, directory: str, live_data: Callable[[str], str | None]) -> list[str]:
    # An object store has no locks to tell a crashed save's data from that of a
    # save still writing in another process, so prefixes younger than
    # KV_LEFTOVER_AGE_S are left for a later sweep (a failed save deletes its own).
    removed = []
    for name in self.names(directory):
      if name == _knobs.STATE_FILE_NAME:
        continue
      checkpoint = self.join(directory, name)
      data = {e for e in self.names(checkpoint) if _DATA_NAME.match(e)}
      if not data:
        continue
      for prefix in sorted(data - {live_data(checkpoint)}):
        if _age_s(prefix) >= _knobs.KV_LEFTOVER_AGE_S:
          self.delete_prefix(self.join(checkpoint, prefix))
          removed.append(f"{name}/{prefix}")
    return removed

  def lock_writer(self, directory: str) -> None:
    """No locks on object stores: the newest writer records its id next to the state
    file, and an older writer still saving there stops at its next save."""
    key, url = self.join(directory, _WRITER_KEY), self.absolute(directory)
    current = self.read_bytes(key)
    if url not in _kv_writers:
      self.replace_file(key, _WRITER_ID.encode())
      _kv_writers.add(url)
    elif current is not None and current != _WRITER_ID.encode():
      raise ConcurrentWriterError(
        f"Another process started saving checkpoints into {directory!r} (its id "
        f"{current[:40]!r} is in {_WRITER_KEY} there); this one stops instead of "
        "overwriting its checkpoints and state file."
      )

  def incomplete(self, directory: str) -> list[str]:
    return [
      n
      for n in self.names(directory)
      if self.read_bytes(self.join(directory, n, _knobs.MANIFEST_ITEM, "metadata")) is None
      and any(_DATA_NAME.match(c) for c in self.names(self.join(directory, n)))
    ]


LOCAL = LocalStore()
KV = KvStore()
