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
import struct
import threading
from typing import Any
from typing import cast

import jax
import msgpack
import numpy as np

from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import _FastReadUnsupported
from jaxckpt._fastread import aligned_empty
from jaxckpt._fastread import open_regular
from jaxckpt._fastread import preadv_into
from jaxckpt._gcpause import paused
from jaxckpt._integrity import checksum
from jaxckpt._tree import dtype_name

FILE = "checkpoint"  # Orbax's aggregate file name (pytree_checkpoint_handler._CHECKPOINT_FILE).
MAX_BYTES = 256 << 10  # Arrays up to this size are packed.
# The default packs states of at least this many such arrays. Packing saves
# time at any count (from 32 arrays on), but smaller states keep what
# Orbax's target-less StandardCheckpointer().restore(path) needs: shapes in
# its metadata, which Orbax does not record for packed arrays.
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
def _array_header(shape: tuple[int, ...], dtype: str) -> bytes:
  """An array's bytes up to its data: the extension header and (shape, dtype, bin header)."""
  packer = _packer()
  nbytes = math.prod(shape) * _dtype(dtype).itemsize
  # msgpack's Packer takes extension and bin data only as bytes (a copy of
  # every array), so their ext 32 and bin 32 headers are written here.
  inner = (
    packer.pack_array_header(3)
    + packer.pack(list(shape))
    + packer.pack(dtype)
    + b"\xc6"
    + struct.pack(">I", nbytes)
  )
  return b"\xc9" + struct.pack(">I", len(inner) + nbytes) + bytes([_NDARRAY]) + inner


def _dtype(name: str) -> np.dtype:
  return np.dtype(jax.numpy.dtype(name))  # (numpy alone does not know bfloat16.)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The packed file of some arrays: in file order, each one's name, the bytes
  before its data (map and key headers, its own header), where those start,
  and its data's size (its C-order bytes)."""

  names: tuple[str, ...]
  headers: tuple[bytes, ...]
  offsets: tuple[int, ...]
  sizes: tuple[int, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]
  size: int  # The file's.
  index: dict[str, int]  # Position of each name.


_LAST: tuple[Any, Any] = (None, None)  # (arrays, Layout) of the last call.


def layout(arrays: tuple[tuple[str, tuple[int, ...], str], ...]) -> Layout:
  """The file for ``arrays`` ((name, shape, dtype name)).

  Raises:
    CorruptCheckpointError: two names clash (one is a prefix node of the other).
  """
  global _LAST
  last = _LAST  # One manifest's readers pass the same tuple: skips hashing it.
  if last[0] is not arrays:
    last = _LAST = (arrays, _new_layout(arrays))
  return last[1]


@functools.lru_cache(maxsize=4)  # A model saves (and restores) the same arrays every time.
def _new_layout(arrays: tuple[tuple[str, tuple[int, ...], str], ...]) -> Layout:
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
  out: dict[str, list] = {
    k: [] for k in ("names", "headers", "offsets", "sizes", "shapes", "dtypes")
  }
  pending = bytearray()
  offset = 0
  packer = _packer()

  def emit(node: dict[str, Any]) -> None:
    nonlocal pending, offset
    pending += packer.pack_map_header(len(node))
    for key, value in node.items():
      pending += packer.pack(key)
      if isinstance(value, dict):
        emit(value)
        continue
      name, shape, stored = value
      dtype = _dtype(stored)
      size = math.prod(shape) * dtype.itemsize
      if size >= 1 << 31:  # (The headers' 32-bit lengths; jaxckpt writes at most MAX_BYTES.)
        raise CorruptCheckpointError(f"packed array '{name}' of {size} bytes is too big to pack")
      pending += _array_header(shape, stored)
      for field, item in zip(out, (name, bytes(pending), offset, size, shape, dtype), strict=True):
        out[field].append(item)
      offset += len(pending) + size
      pending = bytearray()

  emit(tree)
  fields = {k: tuple(v) for k, v in out.items()}
  return Layout(**fields, size=offset, index={n: i for i, n in enumerate(out["names"])})


def _byte_view(array: np.ndarray) -> np.ndarray:
  return array.reshape(-1).view(np.uint8)  # (bfloat16 has no buffer format.)


def _buffer(array: np.ndarray) -> memoryview:
  return memoryview(cast(Any, array))  # (numpy's stubs do not declare the buffer protocol.)


def _write_file(path: str, pieces: list[tuple[bytes, np.ndarray]]) -> None:
  """Writes each (header, array bytes) in turn, copied into one buffer and
  written a buffer at a time: a writev of the headers and arrays took three
  times as long (two unaligned iovecs per array; benchmarks/leaves.py)."""
  out = _Out(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
  buffer = np.empty(_WRITE_BYTES, np.uint8)
  fill = 0
  try:
    for header, data in pieces:
      for chunk in (np.frombuffer(header, np.uint8), data):
        if fill + len(chunk) > _WRITE_BYTES:
          out.write(buffer[:fill])
          fill = 0
          if len(chunk) > _WRITE_BYTES:  # (A long key path: written as it is.)
            out.write(chunk)
            continue
        buffer[fill : fill + len(chunk)] = chunk
        fill += len(chunk)
    out.write(buffer[:fill])
    os.fsync(out.fd)  # Here, while the rest is written; the commit's fsync is then cheap.
  finally:
    os.close(out.fd)


class _Out:
  """A file written front to back whose writeback starts every `_FLUSH_BYTES`."""

  def __init__(self, fd: int):
    self.fd, self.written, self.flushed = fd, 0, 0

  def write(self, data: np.ndarray) -> None:
    view = _buffer(data)
    while view:
      n = os.write(self.fd, view)
      view = view[n:]
      self.written += n
    if self.written - self.flushed >= _FLUSH_BYTES and hasattr(os, "posix_fadvise"):
      # Starts writing these pages to disk now (Linux), not at the fsync: the
      # disk works while the rest is copied, and the fsync waits for the tail.
      os.posix_fadvise(self.fd, self.flushed, self.written - self.flushed, os.POSIX_FADV_DONTNEED)
      self.flushed = self.written


class _Writing(threading.Thread):
  """The file's write, on a thread of its own; `result` joins it (so no thread
  outlives its save) and raises its error."""

  def __init__(self, path: str, pieces: list[tuple[bytes, np.ndarray]]):
    super().__init__(name="jaxckpt-packed", daemon=True)
    self.path, self.pieces = path, pieces
    self.error: BaseException | None = None

  def run(self) -> None:
    try:
      _write_file(self.path, self.pieces)
    except BaseException as e:
      self.error = e
    finally:
      self.pieces = []

  def result(self) -> None:
    self.join()
    error = self.error  # The write's own error, as it was raised.
    if error is not None:
      raise error


def start(state_dir: str, arrays: dict[str, np.ndarray]) -> _Writing:
  """Starts writing ``arrays`` ({name: C-contiguous array}) as ``state_dir/checkpoint``
  on a thread of its own; returns it (``result()`` waits for the write)."""
  file = layout(tuple((n, tuple(a.shape), dtype_name(a.dtype)) for n, a in arrays.items()))
  pieces = [(h, _byte_view(arrays[n])) for n, h in zip(file.names, file.headers, strict=True)]
  writing = _Writing(os.path.join(state_dir, FILE), pieces)
  writing.start()
  return writing


def _open(path: str) -> int:
  try:
    return open_regular(path)
  except (OSError, _FastReadUnsupported) as e:
    raise CorruptCheckpointError(f"{path} holds packed arrays and cannot be opened ({e}).") from e


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


def _runs(file: Layout, out: dict[str, np.ndarray]) -> list[_Run]:
  """The reads that fill ``out``: one per run of its arrays stored back to back."""
  runs: list[_Run] = []
  run, end = None, -1
  for i in sorted(file.index[name] for name in out):
    name, header = file.names[i], file.headers[i]
    if run is None or i != end or len(run.buffers) + 2 > _IOV_MAX or run.nbytes >= _RUN_BYTES:
      run = _Run(file.offsets[i])
      runs.append(run)
    seen = bytearray(len(header))
    run.names.append(name)
    run.headers.append(header)
    run.seen.append(seen)
    run.buffers += (memoryview(seen), _buffer(_byte_view(out[name])))
    run.nbytes += len(header) + file.sizes[i]
    end = i + 1
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
  packed: tuple[tuple[str, tuple[int, ...], str], ...],
  wanted: list[str],
  *,
  checksums: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Reads ``wanted`` from the packed file of ``packed`` (name, shape, dtype name).

  Returns ``({name: array}, {name: CRC-32 of its bytes})`` (no CRCs without
  ``checksums``).

  Raises:
    CorruptCheckpointError: the file is missing, not a regular file, of the
      wrong size, or a header differs from the one the manifest implies.
  """
  if not wanted:
    return {}, {}
  path = os.path.join(state_dir, FILE)
  file = layout(packed)
  fd = _open(path)
  try:
    actual = os.fstat(fd).st_size
    if actual != file.size:  # Checked first: the file bounds what is allocated.
      raise CorruptCheckpointError(
        f"{path} is damaged: its {len(file.names)} packed arrays take {file.size} bytes, "
        f"the file has {actual}."
      )
    with paused():  # An array and views per leaf: see _gcpause.py.
      out = {}
      for name in wanted:
        i = file.index[name]
        out[name] = aligned_empty(file.shapes[i], file.dtypes[i])
      runs = _runs(file, out)
    if len(runs) == 1:  # E.g. one array (get_tensor): no thread.
      return out, _fill(fd, runs[0], path, out, checksums)
    crcs: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(min(_THREADS, len(runs))) as pool:
      for future in [pool.submit(_fill, fd, run, path, out, checksums) for run in runs]:
        crcs.update(future.result())
  finally:
    os.close(fd)
  return out, crcs
