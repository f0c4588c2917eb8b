"""Staging buffers: host memory an async save's snapshot is copied into, on
the CPU backend; kept for the next save of the same arrays only as far as
``CheckpointOptions.keep_staging_bytes`` allows (by default an eighth of the
machine's physical memory).

On CPU the snapshot is a memcpy, and what it costs is fresh memory: glibc
``mmap``s every block over 32 MiB and unmaps it when freed, so each save's
copies page-fault their whole size in again, on XLA's threads, while the
training step wants the cores. Kept buffers avoid that, at the price of holding
them between saves. A first copy is JAX's batched copy to the same sharding
(issued, not waited for; nothing to compile). A copy into kept buffers is a
jitted copy that takes them donated, compiled when the buffers are kept (on the
save thread, before the save's future resolves), so no save compiles on its
blocking path. Two XLA details make the donated copy work, and each alone
defeats it:

* ``keep_unused=True``: the copy never reads the donated buffers, and without
  it JAX drops unused arguments, donation included.
* a 4096-element ballast reduction: XLA:CPU runs a computation estimated under
  1000 flops inline on the calling thread (``cheap_computation_`` in its PjRt
  client), and a copy counts 0 flops; without it the copy would block ``save``.

Donation safety is XLA's: the copy is enqueued after the step that produces the
arrays, and a later step that donates them is ordered after the copy's reads. A
buffer still referenced elsewhere when it is donated again is not donated: XLA
allocates new memory, so reuse can only be lost, never corrupt data.

Arrays under `MIN_BYTES` keep `_snapshot`'s batched copy: glibc serves them
from its heap, so fresh memory costs them little. GPU/TPU keep `_snapshot`'s
copy into pinned host memory: that is a DMA. benchmarks/leaves.py measures
both policies (``jaxckpt`` and ``jaxckpt-keep``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxckpt import _compat
from jaxckpt._tree import array_nbytes

# Over XLA:CPU's 1000-flop "cheap" threshold (see above), at 16 KiB per device.
_BALLAST_ELEMENTS = 4096

# Smaller arrays keep `_snapshot`'s batched copy (see above).
MIN_BYTES = 32 << 20


def default_keep_bytes() -> int:
  """``CheckpointOptions.keep_staging_bytes=None``: an eighth of physical memory."""
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
  except (ValueError, OSError, AttributeError):  # Not POSIX: as if 8 GiB.
    return 1 << 30


def _copies(staging: list[jax.Array], values: list[jax.Array], ballast: jax.Array):
  """Copies of ``values`` (into the donated ``staging``, same shapes)."""
  return [jnp.copy(v) for v in values], jnp.sum(ballast * ballast)


_copy_into = jax.jit(_copies, donate_argnums=0, keep_unused=True)

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


@dataclasses.dataclass(frozen=True)
class _Group:
  """Arrays one jitted copy takes: jit wants a single device assignment."""

  indices: tuple[int, ...]
  key: tuple  # Shapes, dtypes and layouts: which idle buffers fit.
  ballast: jax.Array


def _plan(values: list[jax.Array]) -> tuple[_Group, ...]:
  by_devices: dict[tuple[jax.Device, ...], list[int]] = {}
  for i, v in enumerate(values):
    devices = _compat.device_assignment(v.sharding) if _stageable(v) else None
    if devices is not None:
      by_devices.setdefault(devices, []).append(i)
  return tuple(
    _Group(
      tuple(copied),
      (devices,)
      + tuple(
        (values[i].shape, values[i].dtype, _layout(values[i].sharding, values[i].ndim))
        for i in copied
      ),
      _ballast(devices),
    )
    for devices, copied in by_devices.items()
  )


class StagingPool:
  """Per-`Checkpoint` staging buffers for async snapshots on CPU.

  `copy` copies arrays into an idle set of buffers of the same shapes, dtypes
  and layouts (donated to the copy) or, without one, into new memory;
  `give_back` returns a set once its save has committed, and keeps it only
  within the ``keep_bytes`` given to `copy` (the save's
  ``CheckpointOptions.keep_staging_bytes``): at most ``max_idle`` sets (least
  recently returned dropped first), none longer than ``idle_s`` without use
  (`drop_stale`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxckpt._staging import StagingPool
    >>> pool = StagingPool(min_bytes=0)  # Default: arrays of 32 MiB and more.
    >>> first, sets = pool.copy([jnp.ones(4)], keep_bytes=1 << 20)
    >>> pool.give_back(sets)
    >>> second, _ = pool.copy([jnp.zeros(4)])  # Written into first's buffers.
    >>> second[0].tolist(), first[0].is_deleted()
    ([0.0, 0.0, 0.0, 0.0], True)
  """

  def __init__(self, *, max_idle: int = 2, idle_s: float = 600.0, min_bytes: int | None = None):
    self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    self._max_idle = max_idle
    self._idle_s = idle_s
    self._lock = threading.Lock()
    # key -> (buffers, time returned); ordered oldest first.
    self._idle: collections.OrderedDict[tuple, tuple[list[jax.Array], float]] = (
      collections.OrderedDict()
    )
    # Plans by (shape, dtype, sharding) of the values: on save()'s blocking path
    # a lookup costs a fraction of the checks and grouping.
    self._plans: dict[tuple, tuple[_Group, ...]] = {}
    # The donated copy per group key, compiled by `give_back` (off save()'s path).
    self._compiled: dict[tuple, Any] = {}
    self.reused = 0  # Copies that went into staging buffers (for tests, benchmarks).

  def copy(
    self, values: list[jax.Array], nbytes: list[int] | None = None, *, keep_bytes: int = 0
  ) -> tuple[list[jax.Array | None], list[tuple]]:
    """Copies of ``values`` (of ``nbytes`` each, if the caller knows), issued, not
    waited for, and the sets of buffers they are in, for `give_back` (none with
    ``keep_bytes=0``: nothing will be kept). None for values it does not take
    (not on CPU, not fully addressable, PRNG keys, under ``min_bytes``): copy
    those another way."""
    out: list[jax.Array | None] = [None] * len(values)
    if nbytes is None:
      nbytes = [array_nbytes(v) for v in values]
    taken = [i for i, n in enumerate(nbytes) if n >= self.min_bytes]  # Most arrays are small.
    if not taken:
      return out, []
    values = [values[i] for i in taken]
    signature = tuple((v.shape, v.dtype, v.sharding) for v in values)
    plan = self._plans.get(signature)
    if plan is None:
      if len(self._plans) > 64:
        self._plans.clear()
      plan = self._plans[signature] = _plan(values)
    sets = []
    for group in plan:
      arrays = [values[i] for i in group.indices]
      with self._lock:
        entry = self._idle.pop(group.key, None)
        compiled = self._compiled.get(group.key)
      copies = None
      if entry is not None and compiled is not None:
        try:
          copies, _ = compiled(entry[0], arrays, group.ballast)
          self.reused += 1
        except (TypeError, ValueError):  # Shardings it refuses (before running): not reused.
          with self._lock:
            self._compiled.pop(group.key, None)
      if copies is None:  # JAX's batched copy: nothing to compile.
        copies = _compat.copy_in_place(arrays, [a.sharding for a in arrays])
      for i, c in zip(group.indices, copies, strict=True):
        out[taken[i]] = c
      if keep_bytes > 0:
        sets.append((group, copies, keep_bytes))
    return out, sets

  def give_back(self, sets: list[tuple]) -> None:
    """Takes back the sets `copy` returned, once their save has finished;
    nothing may read those copies afterwards. Keeps them (newest first) within
    their ``keep_bytes`` and compiles their donated copy; frees the rest."""
    now = time.monotonic()
    for group, buffers, keep_bytes in sets:
      if any(c.is_deleted() for c in buffers):
        continue
      size = sum(c.nbytes for c in buffers)
      if size > keep_bytes:
        continue
      with self._lock:
        self._idle.pop(group.key, None)
        self._idle[group.key] = (buffers, now)
        while len(self._idle) > self._max_idle or self._held() > keep_bytes:
          self._idle.popitem(last=False)
        known = group.key in self._compiled
      if not known:
        avals = [jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=c.sharding) for c in buffers]
        compiled = _copy_into.lower(avals, avals, group.ballast).compile()
        with self._lock:
          if len(self._compiled) > 64:
            self._compiled.clear()
          self._compiled[group.key] = compiled

  def drop_stale(self) -> float | None:
    """Frees sets idle for ``idle_s``; returns seconds until the next would be, or None."""
    now = time.monotonic()
    with self._lock:
      for key in [k for k, (_, t) in self._idle.items() if now - t >= self._idle_s]:
        del self._idle[key]
      if not self._idle:
        return None
      return min(self._idle_s - (now - t) for _, t in self._idle.values())

  def _held(self) -> int:
    return sum(c.nbytes for buffers, _ in self._idle.values() for c in buffers)

  @property
  def idle_bytes(self) -> int:
    with self._lock:
      return self._held()
