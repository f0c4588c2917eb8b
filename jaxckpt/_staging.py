"""Staging buffers: host memory an async save's snapshot is copied into, reused
by the next save of the same arrays instead of freshly allocated (CPU backend).

On CPU the snapshot is a memcpy, and what it costs is fresh memory: glibc
``mmap``s every block over 32 MiB and unmaps it when freed, so each save's
copies page-fault their whole size in again, on XLA's threads, while the
training step wants the cores. Measured on this machine class (2-core CPU,
16 float32 arrays, inputs ready, copies' time to done):

* ``jax.device_put(..., may_alias=False)`` into new memory: 190-357 ms for
  512 MiB, 744-2066 ms for 2048 MiB; 1-28 ms to issue;
* one jitted copy into the previous save's donated buffers (this module):
  46-50 ms for 512 MiB, 185-199 ms for 2048 MiB; 0.24-0.3 ms to issue at both
  sizes.

Two XLA details make it work, and each alone defeats it:

* ``keep_unused=True``: the copy never reads the donated buffers, and without
  it JAX drops unused arguments, donation included (the outputs were new
  memory; that is why an earlier attempt concluded that XLA:CPU would not
  alias them).
* a 4096-element ballast reduction: XLA:CPU runs a computation whose
  estimated cost is under 1000 flops inline on the calling thread
  (``cheap_computation_`` in its PjRt client), and a copy counts 0 flops. Without
  the ballast the copy ran synchronously inside ``save``: 80-155 ms blocked for
  256 MiB.

Donation safety is XLA's: the copy is enqueued after the step that produces the
arrays (it does not wait for it), and a later step that donates them is ordered
after the copy's reads. A buffer still referenced elsewhere when it is donated
again (say, a numpy view) is not donated: XLA allocates new memory, so reuse can
only be lost, never corrupt data.

GPU/TPU keep `_snapshot`'s ``device_put`` into pinned host memory: that is a DMA,
and donating pinned host buffers into a device→host jit is untested here (no
accelerator on this machine).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxckpt._tree import array_nbytes

# Over XLA:CPU's 1000-flop "cheap" threshold (see above), at 16 KiB per device.
_BALLAST_ELEMENTS = 4096

# Smaller arrays keep `_snapshot`'s batched copy. glibc serves blocks under
# 32 MiB from its heap, which keeps much of that memory mapped, and per array the
# jitted copy's dispatch costs more than the batched copy (~10 vs ~6.5 µs). Measured
# on the tpu_idle.py state (197 arrays, all under 32 MiB), all staged vs none,
# 4 interleaved repeats: the snapshot's issue took 2-3.5 vs 1.3-1.4 ms, and
# blocked time (5.6 vs 5.6 ms p50) and loop overhead were alike. At 32 MiB per
# array (async_save.py, 512 MiB in 16) blocked time was 0.8 ms either way; at
# 128 MiB (2048 MiB in 16) 1.0 ms staged vs 7.2 ms.
MIN_BYTES = 32 << 20


def _copies(values: list[jax.Array], ballast: jax.Array):
  return [jnp.copy(v) for v in values], jnp.sum(ballast * ballast)


_copy_fresh = jax.jit(_copies)
_copy_into = jax.jit(lambda staging, values, ballast: _copies(values, ballast),
                     donate_argnums=0, keep_unused=True)

_BALLASTS: dict[tuple[jax.Device, ...], jax.Array] = {}


def _ballast(devices: tuple[jax.Device, ...]) -> jax.Array:
  """A small array replicated on ``devices`` (the group's devices, same order)."""
  ballast = _BALLASTS.get(devices)
  if ballast is None:
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    ballast = _BALLASTS[devices] = jax.device_put(
        np.ones(_BALLAST_ELEMENTS, np.float32),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return ballast


@functools.lru_cache(maxsize=1024)
def _layout(sharding: jax.sharding.Sharding, ndim: int):
  """What XLA sees of a sharding: equal for equal layouts even where the
  shardings are not (a jitted step's outputs come back as ``P()``, ``P(None,)``
  or a ``SingleDeviceSharding`` for the same replicated array)."""
  try:
    return sharding._to_xla_hlo_sharding(ndim), sharding.memory_kind
  except Exception:  # Another JAX version: exact shardings, less reuse.
    return sharding


def _device_assignment(sharding: jax.sharding.Sharding) -> tuple[jax.Device, ...] | None:
  try:
    return tuple(sharding._device_assignment)
  except Exception:  # A sharding type without it: not staged.
    return None


def _stageable(value: jax.Array) -> bool:
  """Fully addressable, on CPU, a plain dtype (not PRNG keys)."""
  return (value.is_fully_addressable
          and not jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended)
          and all(d.platform == "cpu" for d in value.sharding.device_set)
          and _device_assignment(value.sharding) is not None)


@dataclasses.dataclass(frozen=True)
class _Group:
  """Arrays one jitted copy takes: jit wants a single device assignment."""
  indices: tuple[int, ...]
  key: tuple  # Shapes, dtypes and layouts: which idle buffers fit.
  ballast: jax.Array


def _plan(values: list[jax.Array]) -> tuple[_Group, ...]:
  by_devices: dict[tuple[jax.Device, ...], list[int]] = {}
  for i, v in enumerate(values):
    if _stageable(v):
      by_devices.setdefault(_device_assignment(v.sharding), []).append(i)
  return tuple(
      _Group(tuple(idx), tuple((values[i].shape, values[i].dtype,
                                _layout(values[i].sharding, values[i].ndim)) for i in idx),
             _ballast(devices))
      for devices, idx in by_devices.items())


class StagingPool:
  """Per-`Checkpoint` staging buffers for async snapshots on CPU.

  `copy` copies arrays into an idle set of buffers of the same shapes, dtypes
  and layouts (donated to the copy) or, without one, into new memory;
  `give_back` returns a set once its save has committed. At most ``max_idle``
  sets are kept (least recently returned dropped first), and none longer than
  ``idle_s`` without use (`drop_stale`).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxckpt._staging import StagingPool
    >>> pool = StagingPool(min_bytes=0)  # Default: arrays of 32 MiB and more.
    >>> first, sets = pool.copy([jnp.ones(4)])
    >>> pool.give_back(sets)
    >>> second, _ = pool.copy([jnp.zeros(4)])  # Written into first's buffers.
    >>> second[0].tolist(), first[0].is_deleted()
    ([0.0, 0.0, 0.0, 0.0], True)
  """

  def __init__(self, *, max_idle: int = 2, idle_s: float = 600.0,
               min_bytes: int | None = None):
    self._min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    self._max_idle = max_idle
    self._idle_s = idle_s
    self._lock = threading.Lock()
    # key -> (buffers, time returned); ordered oldest first.
    self._idle: collections.OrderedDict[tuple, tuple[list[jax.Array], float]] = (
        collections.OrderedDict())
    # Plans by (shape, dtype, sharding) of the large values: on save()'s blocking
    # path the checks and grouping cost ~4 µs per array, a lookup ~1 µs.
    self._plans: dict[tuple, tuple[_Group, ...]] = {}
    self.reused = 0  # Copies that went into staging buffers (for tests, benchmarks).

  def copy(self, values: list[jax.Array], nbytes: list[int] | None = None
           ) -> tuple[list[jax.Array | None], list[tuple]]:
    """Copies of ``values`` (of ``nbytes`` each, if the caller knows), issued, not
    waited for, and the sets of buffers they are in, for `give_back`. None for
    values it does not take (under ``min_bytes``, not on CPU, not fully
    addressable, PRNG keys): copy those another way."""
    out: list[jax.Array | None] = [None] * len(values)
    if nbytes is None:
      nbytes = [array_nbytes(v) for v in values]
    # Size first: most arrays of most states are small, and a plan lookup over
    # all 197 arrays of tpu_idle.py's state cost 0.2 ms.
    large = [i for i, n in enumerate(nbytes) if n >= self._min_bytes]
    if not large:
      return out, []
    values = [values[i] for i in large]
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
      if entry is not None:
        copies, _ = _copy_into(entry[0], arrays, group.ballast)
        self.reused += 1
      else:
        copies, _ = _copy_fresh(arrays, group.ballast)
      for i, c in zip(group.indices, copies, strict=True):
        out[large[i]] = c
      sets.append((group.key, copies))
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
