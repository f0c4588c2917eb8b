"""Staging buffers: host memory an async save's snapshot is copied into, reused
by the next save of the same arrays instead of freshly allocated (CPU backend).

On CPU the snapshot is a memcpy, and what it costs is fresh memory: glibc
``mmap``s every block over 32 MiB and unmaps it when freed, so each save's
copies would page-fault their whole size in again, on XLA's threads, while the
training step wants the cores. Here one jitted copy writes into the previous
save's donated buffers. Two XLA details make it work, and each alone defeats it:

* ``keep_unused=True``: the copy never reads the donated buffers, and without
  it JAX drops unused arguments, donation included.
* a 4096-element ballast reduction: XLA:CPU runs a computation estimated under
  1000 flops inline on the calling thread (``cheap_computation_`` in its PjRt
  client), and a copy counts 0 flops; without it the copy would block ``save``.

Donation safety is XLA's: the copy is enqueued after the step that produces the
arrays, and a later step that donates them is ordered after the copy's reads. A
buffer still referenced elsewhere when it is donated again is not donated: XLA
allocates new memory, so reuse can only be lost, never corrupt data.

Small arrays (under `MIN_BYTES`, one device, numeric; when the plan sends the
save to the fast writer) are *packed*: the same jitted call concatenates them,
per dtype, into one staging buffer, and each becomes a `Packed` slice of it,
since issuing a copy costs per output buffer, not per byte. Packed slices stay
numpy views; the fast writer records them as the jax.Arrays they were.
benchmarks/async_save.py and benchmarks/tpu_idle.py measure both.

GPU/TPU keep `_snapshot`'s copy into pinned host memory: that is a DMA.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxckpt import _compat
from jaxckpt._tree import array_nbytes
from jaxckpt._tree import is_numeric_dtype

# Over XLA:CPU's 1000-flop "cheap" threshold (see above), at 16 KiB per device.
_BALLAST_ELEMENTS = 4096

# Smaller arrays are packed (`copy(..., pack=True)`) or else keep `_snapshot`'s
# batched copy: glibc serves blocks under 32 MiB from its heap, which keeps much
# of that memory mapped, and per array the jitted copy's dispatch costs more.
MIN_BYTES = 32 << 20


def _copies(values: list[jax.Array], packs: list[list[jax.Array]], ballast: jax.Array):
  """Copies of ``values``, and each pack of small arrays concatenated, flat."""
  return (
    [jnp.copy(v) for v in values],
    [jnp.concatenate([v.ravel() for v in pack]) for pack in packs],
    jnp.sum(ballast * ballast),
  )


_copy_fresh = jax.jit(_copies)
_copy_into = jax.jit(
  lambda staging, values, packs, ballast: _copies(values, packs, ballast),
  donate_argnums=0,
  keep_unused=True,
)


class _Buffer:
  """A pack's staging buffer, read on the host once (by the save's writer)."""

  def __init__(self, array: jax.Array):
    self.array = array
    self._host: np.ndarray | None = None
    self._lock = threading.Lock()

  def host(self) -> np.ndarray:
    with self._lock:  # The writer and the checksums may ask at once.
      if self._host is None:
        self._host = np.asarray(self.array)  # Waits for the copy; no copy itself.
      return self._host


class Packed:
  """A small array's snapshot: a slice of the staging buffer it shares with the
  other small arrays of its dtype (see above).

  Reads as a numpy array (``np.asarray`` waits until the copy is done); keeps
  the saved array's ``shape``, ``dtype`` and ``sharding`` so that the writer
  records it as the jax.Array it was.
  """

  __slots__ = ("_buffer", "_start", "shape", "dtype", "sharding")
  is_fully_addressable = True

  def __init__(
    self,
    buffer: _Buffer,
    start: int,
    shape: tuple[int, ...],
    dtype: np.dtype,
    sharding: jax.sharding.Sharding,
  ):
    self._buffer, self._start = buffer, start
    self.shape, self.dtype, self.sharding = shape, dtype, sharding

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def __array__(self, dtype=None, copy=None):
    array = self._buffer.host()[self._start : self._start + self.size].reshape(self.shape)
    if dtype is not None and np.dtype(dtype) != array.dtype:
      return array.astype(dtype)
    return array.copy() if copy else array

  def __repr__(self) -> str:
    return f"Packed(shape={self.shape}, dtype={self.dtype})"


_BALLASTS: dict[tuple[jax.Device, ...], jax.Array] = {}


def _ballast(devices: tuple[jax.Device, ...]) -> jax.Array:
  """A small array replicated on ``devices`` (the group's devices, same order)."""
  ballast = _BALLASTS.get(devices)
  if ballast is None:
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    ballast = _BALLASTS[devices] = jax.device_put(
      np.ones(_BALLAST_ELEMENTS, np.float32),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )
  return ballast


@functools.lru_cache(maxsize=1024)
def _layout(sharding: jax.sharding.Sharding, ndim: int):
  """What XLA sees of a sharding: equal for equal layouts even where the
  shardings are not (a jitted step's outputs come back as ``P()``, ``P(None,)``
  or a ``SingleDeviceSharding`` for the same replicated array)."""
  layout = _compat.sharding_layout(sharding, ndim)
  return sharding if layout is None else (layout, sharding.memory_kind)  # None: exact match.


def _stageable(value: jax.Array) -> bool:
  """Fully addressable, on CPU, a plain dtype (not PRNG keys)."""
  return (
    value.is_fully_addressable
    and not jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended)
    and all(d.platform == "cpu" for d in value.sharding.device_set)  # type: ignore[attr-defined]
    and _compat.device_assignment(value.sharding) is not None
  )


def _packable(value: jax.Array) -> bool:
  """One device (a concatenation of sharded arrays would gather them), numeric
  (what the fast writer takes), not empty."""
  return (
    len(value.sharding.device_set) == 1 and is_numeric_dtype(value.dtype) and 0 not in value.shape
  )


@dataclasses.dataclass(frozen=True)
class _Group:
  """Arrays one jitted copy takes: jit wants a single device assignment."""

  indices: tuple[int, ...]  # Copied one by one.
  packs: tuple[tuple[int, ...], ...]  # Concatenated: one tuple per dtype.
  # Per pack, per array: (start in the buffer, shape, dtype, sharding).
  slices: tuple[tuple[tuple[int, tuple[int, ...], np.dtype, jax.sharding.Sharding], ...], ...]
  key: tuple  # Shapes, dtypes and layouts: which idle buffers fit.
  ballast: jax.Array


def _plan(values: list[jax.Array], small: list[bool]) -> tuple[_Group, ...]:
  """``small[i]``: pack ``values[i]`` if it can be."""
  by_devices: dict[tuple[jax.Device, ...], tuple[list[int], dict]] = {}
  for i, v in enumerate(values):
    devices = _compat.device_assignment(v.sharding) if _stageable(v) else None
    if devices is not None:
      copied, packs = by_devices.setdefault(devices, ([], {}))
      if small[i] and _packable(v):
        packs.setdefault(np.dtype(v.dtype), []).append(i)
      elif not small[i]:
        copied.append(i)
  groups = []
  for devices, (copied, packs) in by_devices.items():
    if not copied and not packs:
      continue
    key = (devices,) + tuple(
      (values[i].shape, values[i].dtype, _layout(values[i].sharding, values[i].ndim))
      for i in copied
    )
    key += tuple((tuple(values[i].shape for i in pack), dtype) for dtype, pack in packs.items())
    slices = []
    for pack in packs.values():
      starts = np.cumsum([0] + [math.prod(values[i].shape) for i in pack]).tolist()
      slices.append(
        tuple(
          (start, values[i].shape, np.dtype(values[i].dtype), values[i].sharding)
          for start, i in zip(starts, pack, strict=False)
        )
      )
    groups.append(
      _Group(
        tuple(copied),
        tuple(tuple(p) for p in packs.values()),
        tuple(slices),
        key,
        _ballast(devices),
      )
    )
  return tuple(groups)


class StagingPool:
  """Per-`Checkpoint` staging buffers for async snapshots on CPU.

  `copy` copies arrays into an idle set of buffers of the same shapes, dtypes
  and layouts (donated to the copy) or, without one, into new memory;
  `give_back` returns a set once its save has committed. At most ``max_idle``
  sets are kept (least recently returned dropped first), and none longer than
  ``idle_s`` without use (`drop_stale`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxckpt._staging import StagingPool
    >>> pool = StagingPool(min_bytes=0)  # Default: arrays of 32 MiB and more.
    >>> first, sets = pool.copy([jnp.ones(4)])
    >>> pool.give_back(sets)
    >>> second, _ = pool.copy([jnp.zeros(4)])  # Written into first's buffers.
    >>> second[0].tolist(), first[0].is_deleted()
    ([0.0, 0.0, 0.0, 0.0], True)
  """

  def __init__(self, *, max_idle: int = 2, idle_s: float = 600.0, min_bytes: int | None = None):
    self._min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    self._max_idle = max_idle
    self._idle_s = idle_s
    self._lock = threading.Lock()
    # key -> (buffers, time returned); ordered oldest first.
    self._idle: collections.OrderedDict[tuple, tuple[list[jax.Array], float]] = (
      collections.OrderedDict()
    )
    # Plans by (shape, dtype, sharding, small) of the values: on save()'s blocking
    # path a lookup costs a fraction of the checks and grouping.
    self._plans: dict[tuple, tuple[_Group, ...]] = {}
    self.reused = 0  # Copies that went into staging buffers (for tests, benchmarks).

  def copy(
    self, values: list[jax.Array], nbytes: list[int] | None = None, *, pack: bool = False
  ) -> tuple[list[jax.Array | Packed | None], list[tuple]]:
    """Copies of ``values`` (of ``nbytes`` each, if the caller knows), issued, not
    waited for, and the sets of buffers they are in, for `give_back`. None for
    values it does not take (not on CPU, not fully addressable, PRNG keys; and
    those under ``min_bytes``, unless ``pack``): copy those another way.

    With ``pack``, arrays under ``min_bytes`` on one device come back as `Packed`
    slices of shared buffers: only for the fast writer, which reads them."""
    out: list[jax.Array | Packed | None] = [None] * len(values)
    if nbytes is None:
      nbytes = [array_nbytes(v) for v in values]
    small = [n < self._min_bytes for n in nbytes]
    if pack:
      taken = list(range(len(values)))
    else:
      # Size first: most arrays of most states are small.
      taken = [i for i, s in enumerate(small) if not s]
      if not taken:
        return out, []
      values, small = [values[i] for i in taken], [small[i] for i in taken]
    signature = tuple((v.shape, v.dtype, v.sharding, s) for v, s in zip(values, small, strict=True))
    plan = self._plans.get(signature)
    if plan is None:
      if len(self._plans) > 64:
        self._plans.clear()
      plan = self._plans[signature] = _plan(values, small)
    sets = []
    for group in plan:
      arrays = [values[i] for i in group.indices]
      packs = [[values[i] for i in p] for p in group.packs]
      with self._lock:
        entry = self._idle.pop(group.key, None)
      if entry is not None:
        n = len(group.indices)
        copies, flats, _ = _copy_into((entry[0][:n], entry[0][n:]), arrays, packs, group.ballast)
        self.reused += 1
      else:
        copies, flats, _ = _copy_fresh(arrays, packs, group.ballast)
      for i, c in zip(group.indices, copies, strict=True):
        out[taken[i]] = c
      for indices, slices, flat in zip(group.packs, group.slices, flats, strict=True):
        buffer = _Buffer(flat)
        for i, (start, shape, dtype, sharding) in zip(indices, slices, strict=True):
          out[taken[i]] = Packed(buffer, start, shape, dtype, sharding)
      sets.append((group.key, copies + flats))
    return out, sets

  def give_back(self, sets: list[tuple]) -> None:
    """Takes back the sets `copy` returned, once their save has finished;
    nothing may read those copies afterwards."""
    now = time.monotonic()
    with self._lock:
      for key, group in sets:
        if any(c.is_deleted() for c in group):
          continue
        self._idle.pop(key, None)
        self._idle[key] = (group, now)
        while len(self._idle) > self._max_idle:
          self._idle.popitem(last=False)

  def drop_stale(self) -> float | None:
    """Frees sets idle for ``idle_s``; returns seconds until the next would be, or None."""
    now = time.monotonic()
    with self._lock:
      for key in [k for k, (_, t) in self._idle.items() if now - t >= self._idle_s]:
        del self._idle[key]
      if not self._idle:
        return None
      return min(self._idle_s - (now - t) for _, t in self._idle.values())

  @property
  def idle_bytes(self) -> int:
    with self._lock:
      return sum(c.nbytes for buffers, _ in self._idle.values() for c in buffers)
