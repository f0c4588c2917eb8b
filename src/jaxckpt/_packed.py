"""Small arrays packed into one file: Orbax's aggregate file ``state/checkpoint``.

Orbax's PyTree handler reads the leaves that ``_METADATA`` marks
``skip_deserialize`` from a msgpack file named ``checkpoint`` beside them
(``PyTreeCheckpointHandler._read_aggregate_file``). For a state of thousands of
small arrays the fast writer puts them there: one sequential write of the
arrays' own buffers instead of two OCDBT keys, a ``.zarray`` and three metadata
entries per array, which was most of the per-leaf cost of such a save.

The file is what Orbax's ``msgpack_utils.msgpack_serialize`` writes: a map per
tree node, each array an extension value of type 1 holding (shape, dtype name,
C-order bytes). Its layout is fixed by the arrays' key paths, shapes and dtypes
(sorted by key path), so the reader recomputes every header and offset from the
manifest, reads the arrays straight into their buffers, and compares each
header byte for byte: a file that differs is corrupt, and is never parsed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import stat
import struct
import threading
from typing import Any

import msgpack
import numpy as np

from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import _FastReadUnsupported
from jaxckpt._fastread import aligned_empty
from jaxckpt._fastread import preadv_into
from jaxckpt._gcpause import paused
from jaxckpt._integrity import checksum

FILE = "checkpoint"  # Orbax's aggregate file name (pytree_checkpoint_handler._CHECKPOINT_FILE).
MAX_BYTES = 256 << 10  # Arrays up to this size are packed.
# With at least this many such arrays (default policy, see `SavePlan.pack`):
# fewer are cheap enough as OCDBT keys, and keep StandardCheckpointer's
# target-less restore working (benchmarks/leaves.py --pack).
MIN_ARRAYS = 512
_NDARRAY = 1  # Orbax's msgpack extension type for numpy arrays.
_IOV_MAX = 1024  # Buffers per preadv (Linux's IOV_MAX).
_WRITE_BYTES = 1 << 20
_FLUSH_BYTES = 8 << 20
_RUN_BYTES = 16 << 20  # Bytes per read job: several jobs keep the disk and both cores busy.
_THREADS = 8
_PACKER = threading.local()  # msgpack.Packer is not thread-safe.


def packable(dtype: np.dtype) -> bool:
  """Whether Orbax's reader restores ``dtype`` from its name (msgpack_utils'
  ``_dtype_from_name``: numpy's own dtypes, and bfloat16) in native order."""
  if not dtype.isnative:
    return False
  if dtype.name == "bfloat16":
    return True
  try:
    return np.dtype(dtype.name) == dtype and dtype.kind in "biufc"
  except TypeError:
    return False


def _packer() -> msgpack.Packer:
  packer = getattr(_PACKER, "packer", None)
  if packer is None:
    packer = _PACKER.packer = msgpack.Packer(use_bin_type=True)
  return packer


@functools.lru_cache(maxsize=4096)
def _array_header(shape: tuple[int, ...], dtype_name: str) -> bytes:
  """An array's bytes up to its data: the extension header and (shape, dtype, bin header)."""
  packer = _packer()
  nbytes = math.prod(shape) * np.dtype(_dtype(dtype_name)).itemsize
  # msgpack's Packer takes extension and bin data only as bytes (a copy of
  # every array), so their ext 32 and bin 32 headers are written here.
  inner = (
    packer.pack_array_header(3)
    + packer.pack(list(shape))
    + packer.pack(dtype_name)
    + b"\xc6"
    + struct.pack(">I", nbytes)
  )
  return b"\xc9" + struct.pack(">I", len(inner) + nbytes) + bytes([_NDARRAY]) + inner


def _dtype(name: str) -> Any:
  if name == "bfloat16":
    import ml_dtypes  # (jax's dependency; numpy does not know the name.)

    return ml_dtypes.bfloat16
  return name


@functools.lru_cache(maxsize=256)
def dtype_name(dtype: np.dtype) -> str:
  return dtype.name  # (Computed in Python by numpy: ~5 µs, per array.)


@functools.lru_cache(maxsize=4)  # A model saves (and restores) the same arrays every time.
def layout(
  arrays: tuple[tuple[str, tuple[int, ...], str], ...],
) -> tuple[tuple[str, ...], tuple[bytes, ...], int]:
  """The file for ``arrays`` ((name, shape, dtype name)): the names in file
  order, the bytes before each one's data, and the file's size (each array's
  data is its C-order bytes).

  Raises:
    CorruptCheckpointError: two names clash (one is a prefix node of the other).
  """
  keyed = sorted((name.split("/"), name, tuple(shape), dtype) for name, shape, dtype in arrays)
  tree: dict[str, Any] = {}
  for parts, name, shape, dtype in keyed:
    node = tree
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise CorruptCheckpointError(f"packed arrays '{name}' and its parent both named")
    if parts[-1] in node:
      raise CorruptCheckpointError(f"packed array '{name}' named twice or as a tree node")
    node[parts[-1]] = (name, shape, dtype)
  names: list[str] = []
  headers: list[bytes] = []
  pending = bytearray()
  size = 0
  packer = _packer()

  def emit(node: dict[str, Any]) -> None:
    nonlocal pending, size
    pending += packer.pack_map_header(len(node))
    for key, value in node.items():
      pending += packer.pack(key)
      if isinstance(value, dict):
        emit(value)
        continue
      name, shape, dtype = value
      pending += _array_header(shape, dtype)
      names.append(name)
      headers.append(bytes(pending))
      size += len(pending) + math.prod(shape) * np.dtype(_dtype(dtype)).itemsize
      pending = bytearray()

  emit(tree)
  return tuple(names), tuple(headers), size


def _byte_view(array: np.ndarray) -> np.ndarray:
  return array.reshape(-1).view(np.uint8)  # (bfloat16 has no buffer format.)


def _write_file(path: str, pieces: list[tuple[bytes, np.ndarray]]) -> None:
  """Writes each (header, array bytes) in turn, copied into one buffer and
  written a buffer at a time: a writev of the headers and arrays took three
  times as long (two unaligned iovecs per array; benchmarks/leaves.py)."""
  out = _Out(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
  buffer = np.empty(_WRITE_BYTES, np.uint8)
  fill = 0
  try:
    for header, data in pieces:
      if fill + len(header) + len(data) > _WRITE_BYTES:
        out.write(buffer[:fill])
        fill = 0
      buffer[fill : fill + len(header)] = np.frombuffer(header, np.uint8)
      fill += len(header)
      if len(data) > _WRITE_BYTES - fill:  # (Only if MAX_BYTES grew past _WRITE_BYTES.)
        out.write(buffer[:fill])
        out.write(data)
        fill = 0
        continue
      buffer[fill : fill + len(data)] = data
      fill += len(data)
    out.write(buffer[:fill])
    os.fsync(out.fd)  # Here, while the rest is written; the commit's fsync is then cheap.
  finally:
    os.close(out.fd)


class _Out:
  """A file written front to back whose writeback starts every `_FLUSH_BYTES`."""

  def __init__(self, fd: int):
    self.fd, self.written, self.flushed = fd, 0, 0

  def write(self, data: np.ndarray) -> None:
    view = memoryview(data)
    while view:
      n = os.write(self.fd, view)
      view = view[n:]
      self.written += n
    if self.written - self.flushed >= _FLUSH_BYTES and hasattr(os, "posix_fadvise"):
      # Starts writing these pages to disk now (Linux), not at the fsync: the
      # disk works while the rest is copied, and the fsync waits for the tail.
      os.posix_fadvise(self.fd, self.flushed, self.written - self.flushed, os.POSIX_FADV_DONTNEED)
      self.flushed = self.written


def start(state_dir: str, arrays: dict[str, np.ndarray]) -> concurrent.futures.Future:
  """Starts writing ``arrays`` ({name: C-contiguous array}) as ``state_dir/checkpoint``
  on a thread of its own; returns its future."""
  names, headers, _ = layout(
    tuple((n, tuple(a.shape), dtype_name(a.dtype)) for n, a in arrays.items())
  )
  pieces = [(h, _byte_view(arrays[n])) for n, h in zip(names, headers, strict=True)]
  future: concurrent.futures.Future = concurrent.futures.Future()

  def run() -> None:
    try:
      _write_file(os.path.join(state_dir, FILE), pieces)
    except BaseException as e:
      future.set_exception(e)
    else:
      future.set_result(None)

  threading.Thread(target=run, name="jaxckpt-packed", daemon=True).start()
  return future


def _open(path: str) -> int:
  # Regular files only, opened without blocking: a FIFO planted in the
  # checkpoint would otherwise hang the read.
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except OSError as e:
    raise CorruptCheckpointError(f"{path} holds packed arrays and cannot be opened ({e}).") from e
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise CorruptCheckpointError(f"{path} holds packed arrays and is not a regular file.")
  return fd


@dataclasses.dataclass
class _Run:
  """Arrays stored back to back, read by one preadv: each header into a
  buffer of its own (to be compared), each array's data into the array."""

  offset: int
  names: list[str] = dataclasses.field(default_factory=list)
  headers: list[bytes] = dataclasses.field(default_factory=list)
  seen: list[bytearray] = dataclasses.field(default_factory=list)
  buffers: list[memoryview] = dataclasses.field(default_factory=list)
  nbytes: int = 0


def _runs(names: tuple, headers: tuple, sizes: dict[str, int], out: dict) -> list[_Run]:
  runs: list[_Run] = []
  offset, run = 0, None
  for name, header in zip(names, headers, strict=True):
    array = out.get(name)
    if array is None:
      run = None  # Not wanted: the next wanted array starts a new run.
    else:
      if run is None or len(run.buffers) + 2 > _IOV_MAX or run.nbytes >= _RUN_BYTES:
        run = _Run(offset)
        runs.append(run)
      seen = bytearray(len(header))
      run.names.append(name)
      run.headers.append(header)
      run.seen.append(seen)
      run.buffers += (memoryview(seen), memoryview(_byte_view(array)))
      run.nbytes += len(header) + sizes[name]
    offset += len(header) + sizes[name]
  return runs


def _fill(fd: int, run: _Run, path: str, out: dict, checksums: bool) -> dict[str, int]:
  try:
    preadv_into(fd, run.buffers, run.offset)
  except (OSError, _FastReadUnsupported) as e:
    raise CorruptCheckpointError(f"{path} is unreadable at offset {run.offset} ({e}).") from e
  offset = run.offset
  for name, header, seen in zip(run.names, run.headers, run.seen, strict=True):
    if seen != header:
      raise CorruptCheckpointError(
        f"{path} is damaged: the packed array '{name}' should start at byte {offset} "
        "with the header its manifest entry implies, and does not."
      )
    offset += len(header) + out[name].nbytes
  return {name: checksum(out[name]) for name in run.names} if checksums else {}


def read(
  state_dir: str,
  packed: list[tuple[str, tuple[int, ...], str]],
  wanted: list[str],
  *,
  checksums: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Reads ``wanted`` from the packed file holding ``packed`` (name, shape, dtype name).

  Returns ``({name: array}, {name: CRC-32 of its bytes})`` (no CRCs without
  ``checksums``).

  Raises:
    CorruptCheckpointError: the file is missing, not a regular file, of the
      wrong size, or a header differs from the one the manifest implies.
  """
  if not wanted:
    return {}, {}
  path = os.path.join(state_dir, FILE)
  names, headers, size = layout(tuple(packed))
  info = {name: (tuple(shape), dtype) for name, shape, dtype in packed}
  sizes = {n: math.prod(s) * np.dtype(_dtype(d)).itemsize for n, (s, d) in info.items()}
  with paused():  # An array and views per leaf: see _gcpause.py.
    out = {n: aligned_empty(info[n][0], np.dtype(_dtype(info[n][1]))) for n in wanted}
    runs = _runs(names, headers, sizes, out)
  fd = _open(path)
  try:
    actual = os.fstat(fd).st_size
    if actual != size:
      raise CorruptCheckpointError(
        f"{path} is damaged: its {len(names)} packed arrays take {size} bytes, the file "
        f"has {actual}."
      )
    crcs: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(min(_THREADS, len(runs))) as pool:
      for future in [pool.submit(_fill, fd, run, path, out, checksums) for run in runs]:
        crcs.update(future.result())
  finally:
    os.close(fd)
  return out, crcs
