"""The Orbax layout's fast reader: uncompressed arrays read straight from OCDBT data files.

TensorStore reads each chunk into a buffer of its own, then copies it into a
16-byte-aligned output array, which JAX copies once more (it aliases only
64-byte-aligned host memory). Here each chunk is ``os.preadv``'d straight into
a 64-byte-aligned numpy array from several threads (``preadv`` releases the
GIL); TensorStore still says where every chunk lives (``ts.ocdbt.dump``, whose
output format is read in _compat.py).

Only what is understood exactly takes this path: zarr v2 metadata without
compressor or filters, C order, the expected shape and dtype, a B-tree of
height 0, and every chunk present with its full size. Anything else is left out
of the result and read by Orbax, which raises the precise error if the data is
bad. Each array's CRC-32 is computed as soon as its last piece is in; one that
does not match the manifest is read again by Orbax, so a misread here can never
pass for a corrupt checkpoint, and real corruption still fails its CRC.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import logging
import math
import os
import stat
import sys
import threading
from typing import Any

import numpy as np

from jaxckpt import _compat
from jaxckpt._errors import _FastReadUnsupported
from jaxckpt._gcpause import paused
from jaxckpt._integrity import checksum

logger = logging.getLogger("jaxckpt")

_PIECE_BYTES = 32 << 20  # Large chunks are read in pieces, so few arrays still use all threads.
_THREADS = 8  # I/O-bound: more reads in flight than cores.
# Chunks stored back to back in a data file are read by one preadv into all of
# their arrays, up to this many buffers (Linux's IOV_MAX) or _PIECE_BYTES: one
# system call and one thread-pool job instead of one per small array.
_IOV_MAX = 1024


@functools.lru_cache(maxsize=256)  # dtype.name is computed in Python: per array.
def _zarr_dtype(dtype: np.dtype) -> str:
  return "bfloat16" if dtype.name == "bfloat16" else dtype.str


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
  """An uninitialized C-ordered array whose data starts on an ``align``-byte boundary."""
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start : start + nbytes].view(dtype).reshape(shape)


def _small_value(entry: bytes | tuple[str, int, int]) -> bytes:
  if isinstance(entry, bytes):
    return entry
  path, offset, length = entry
  if length > 1 << 20:
    raise _FastReadUnsupported(f"metadata of {length} bytes")
  with open(path, "rb") as f:
    data = os.pread(f.fileno(), length, offset)
  if len(data) != length:
    raise _FastReadUnsupported("metadata beyond the end of its file")
  return data


def _plan(
  name: str,
  shape: tuple[int, ...],
  dtype: np.dtype,
  entries: dict[bytes, bytes | tuple[str, int, int]],
  out: np.ndarray,
) -> list[tuple]:
  """Reads that fill ``out`` with array ``name``: (dest, source, region, chunks).

  ``source`` is ``(path, offset)`` or the chunk's inline bytes; ``dest`` the run
  of ``out``'s bytes it fills, or None when the chunk must be read whole and its
  valid ``region`` copied out."""
  key = name.replace("/", ".")  # Orbax joins tree keys with '.'; jaxckpt's names have none.
  meta_entry = entries.get(f"{key}/.zarray".encode())
  if meta_entry is None:
    raise _FastReadUnsupported("no zarr v2 metadata")
  chunks, sep = _chunking(_small_value(meta_entry), shape, _zarr_dtype(dtype))
  chunk_bytes = math.prod(chunks) * dtype.itemsize
  # A chunk whole in every dimension but the first is one contiguous run of
  # ``out`` (its valid rows are a prefix of the stored, full-size chunk).
  contiguous = all(c >= s for c, s in zip(chunks[1:], shape[1:], strict=True))
  flat = out.reshape(-1).view(np.uint8)
  row_bytes = math.prod(shape[1:]) * dtype.itemsize
  reads: list[tuple[Any, Any, Any, Any]] = []
  one = chunks == shape  # One chunk (most small arrays): no grid to walk.
  grid = (
    [(0,) * len(shape)]
    if one
    else itertools.product(*(range(-(-s // c)) for s, c in zip(shape, chunks, strict=True)))
  )
  for index in grid:
    entry = entries.get(f"{key}/{sep.join(map(str, index)) or '0'}".encode())
    if entry is None:  # E.g. equal to the fill value, or stored where this code does not read.
      raise _FastReadUnsupported(f"chunk {index} missing")
    region = tuple(
      slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape, strict=True)
    )
    if not shape:
      dest = flat
    elif contiguous:
      start = region[0].start * row_bytes
      dest = flat[start : region[0].stop * row_bytes]
    else:  # Read the full stored chunk, then copy its valid part.
      dest = None
    if isinstance(entry, bytes):
      if len(entry) != chunk_bytes:
        raise _FastReadUnsupported(f"inline chunk of {len(entry)} bytes")
      reads.append((dest, entry, region, chunks))
      continue
    path, offset, length = entry
    if length != chunk_bytes:
      raise _FastReadUnsupported(f"chunk of {length} bytes, expected {chunk_bytes}")
    reads.append((dest, (path, offset), region, chunks))
  return reads


@functools.lru_cache(maxsize=1024)  # Thousands of arrays share a few .zarray files.
def _chunking(data: bytes, shape: tuple[int, ...], zarr_dtype: str) -> tuple[tuple[int, ...], str]:
  """(chunk shape, dimension separator) of a ``.zarray`` this reader handles exactly."""
  meta = json.loads(data)
  if not isinstance(meta, dict):
    raise _FastReadUnsupported(f"metadata {meta!r}")
  if (
    meta.get("zarr_format") != 2
    or meta.get("compressor") is not None
    or meta.get("filters") is not None
    or meta.get("order") != "C"
    or meta.get("dtype") != zarr_dtype
    or tuple(meta.get("shape", ())) != shape
    or len(meta.get("chunks", ())) != len(shape)
    or 0 in shape
  ):
    raise _FastReadUnsupported(f"metadata {meta}")
  return tuple(meta["chunks"]), meta.get("dimension_separator", ".")


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
  preadv_into(fd, [view], offset)


def open_regular(path: str) -> int:
  """A read-only descriptor of ``path``, a regular file.

  Opened without blocking: a FIFO planted in the checkpoint would otherwise
  hang the read.

  Raises:
    _FastReadUnsupported: ``path`` is not a regular file.
    OSError: it cannot be opened.
  """
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise _FastReadUnsupported(f"{path} is not a regular file")
  return fd


def preadv_into(fd: int, views: list[memoryview], offset: int) -> None:
  """Fills ``views`` from ``offset`` on, in order (short reads continued).

  Raises:
    _FastReadUnsupported: the file ends first.
    OSError: a read fails.
  """
  while views:
    n = os.preadv(fd, views[:_IOV_MAX], offset)
    if n <= 0:
      raise _FastReadUnsupported(f"unexpected end of data file at offset {offset}")
    offset += n
    while views and n >= len(views[0]):
      n -= len(views[0])
      views = views[1:]
    if n:
      views = [views[0][n:], *views[1:]]


def _merge(reads: list[tuple]) -> list[list[tuple]]:
  """Groups reads of (name, dest, (path, offset), ...) whose bytes follow each
  other in one file into runs for one `_preadv_into` each."""
  runs: list[list[tuple]] = []
  end, size = None, 0
  for read in sorted(reads, key=lambda r: r[2]):
    path, offset = read[2]
    if runs and end == (path, offset) and len(runs[-1]) < _IOV_MAX and size < _PIECE_BYTES:
      runs[-1].append(read)
      size += len(read[1])
    else:
      runs.append([read])
      size = len(read[1])
    end = (path, offset + len(read[1]))
  return runs


class _Reading:
  """The reads of one `read` call, run on a thread pool; each array's CRC-32 is
  computed by the thread that completes it."""

  def __init__(self, out: dict[str, np.ndarray], checksums: bool):
    self.out, self.checksums = out, checksums
    self.fds: dict[str, int] = {}
    self.failed: set[str] = set()
    self.crcs: dict[str, int] = {}
    self.pending: dict[str, int] = {}
    self._lock = threading.Lock()

  def jobs(self, plans: dict[str, list[tuple]]) -> list[list[tuple]]:
    """Runs of reads, one job each: large chunks split into pieces (so few
    arrays use all threads), small ones stored back to back merged."""
    jobs = []
    for name, reads in plans.items():
      for dest, source, region, chunks in reads:
        if not isinstance(source, bytes) and source[0] not in self.fds:
          try:
            self.fds[source[0]] = open_regular(source[0])
          except (OSError, _FastReadUnsupported):
            self.failed.add(name)
            continue
        if dest is not None and not isinstance(source, bytes) and len(dest) > _PIECE_BYTES:
          path, offset = source
          for start in range(0, len(dest), _PIECE_BYTES):
            piece = dest[start : start + _PIECE_BYTES]
            jobs.append((name, piece, (path, offset + start), region, chunks))
        else:
          jobs.append((name, dest, source, region, chunks))
    for job in jobs:
      self.pending[job[0]] = self.pending.get(job[0], 0) + 1
    direct = [j for j in jobs if j[1] is not None and not isinstance(j[2], bytes)]
    others = [[j] for j in jobs if j[1] is None or isinstance(j[2], bytes)]
    return _merge(direct) + others

  def fill(self, name: str, dest, source, region, chunks) -> None:
    array = self.out[name]
    data: bytes | np.ndarray
    if isinstance(source, bytes):
      data = source
    else:
      path, offset = source
      if dest is not None:
        _pread_into(self.fds[path], memoryview(dest), offset)
        return
      data = aligned_empty((math.prod(chunks) * array.dtype.itemsize,), np.dtype(np.uint8))
      _pread_into(self.fds[path], data.data, offset)
    if dest is not None:
      dest[:] = np.frombuffer(data, np.uint8, count=len(dest))
    else:
      chunk = np.frombuffer(data, array.dtype, count=math.prod(chunks)).reshape(chunks)
      array[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]

  def run(self, run: list[tuple]) -> None:
    names = [read[0] for read in run]
    try:
      if len(run) == 1:
        if names[0] in self.failed:
          return
        self.fill(*run[0])
      else:
        path, offset = run[0][2]
        preadv_into(self.fds[path], [memoryview(read[1]) for read in run], offset)
    except Exception as e:  # Short file, unreadable: Orbax reads it (and says what is wrong).
      logger.debug("Fast read of %s failed: %s", names, e)
      self.failed.update(names)
      return
    done = []
    with self._lock:
      for name in names:
        self.pending[name] -= 1
        if self.pending[name] == 0:
          done.append(name)
    if self.checksums:
      for name in done:
        if name not in self.failed:
          self.crcs[name] = checksum(self.out[name])

  def close(self) -> None:
    for fd in self.fds.values():
      os.close(fd)


def read(
  state_dir: str, wanted: list[tuple[str, tuple[int, ...], np.dtype]], *, checksums: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Reads what it can of ``wanted`` (name, shape, stored dtype).

  Returns ``({name: array}, {name: CRC-32 of its bytes})`` (no CRCs without
  ``checksums``); each CRC is computed while other arrays are still being read.
  Arrays left out (see the module docstring) are for Orbax to read.
  """
  if sys.byteorder != "little" or not wanted:
    return {}, {}
  with paused():  # A dict per key, from one read of the B-tree.
    entries = _compat.ocdbt_chunk_entries(state_dir)
  if entries is None:  # Not an OCDBT layout this code knows: Orbax reads everything.
    return {}, {}
  out, plans = {}, {}
  with paused():  # Objects per array: see _gcpause.py.
    for name, shape, dtype in wanted:
      array = aligned_empty(tuple(shape), np.dtype(dtype))
      try:
        plans[name] = _plan(name, tuple(shape), np.dtype(dtype), entries, array)
      except (_FastReadUnsupported, OSError, ValueError, KeyError, TypeError) as e:
        logger.debug("Array %s of %s is read by Orbax: %s", name, state_dir, e)
        continue
      out[name] = array
  reading = _Reading(out, checksums)
  try:
    with paused():
      jobs = reading.jobs(plans)
      # Chunks stored inline in the B-tree (up to 1 KiB) are copied here: a
      # thread-pool job each cost more than the copy.
      files = []
      for job in jobs:
        if isinstance(job[0][2], bytes):  # (Such a run has one read.)
          reading.run(job)
        else:
          files.append(job)
    with concurrent.futures.ThreadPoolExecutor(min(_THREADS, max(1, len(files)))) as pool:
      for future in [pool.submit(reading.run, job) for job in files]:
        future.result()
  finally:
    reading.close()
  arrays = {name: array for name, array in out.items() if name not in reading.failed}
  return arrays, {name: crc for name, crc in reading.crcs.items() if name in arrays}
