"""Snapshot: the values a save will write, decoupled from the caller's buffers.

An async save must not read the caller's arrays after ``save`` returns: the next
training step may donate (free) or overwrite them. So the snapshot makes the
save own its data, without waiting for anything:

* ``jax.Array`` leaves: one batched copy to the same sharding, in the
  ``pinned_host`` memory kind on GPU/TPU (``jax.device_put(..., may_alias=False)``,
  or the batched C++ copy underneath it, see _compat.py). It enqueues the device→host
  copies and returns: it waits neither for the step that produces the arrays
  nor for the copies, and the runtime orders a later donation after the copies'
  reads. On GPU/TPU this is the DMA into host RAM that Orbax does synchronously
  inside ``save``; on CPU it is a memcpy. Arrays spread over several processes
  are copied shard by shard (`_copy_global`). On CPU, async saves of a
  `Checkpoint` copy arrays of 32 MiB and more into staging buffers instead
  (see _staging.py), which ``keep_staging_bytes`` may keep for the next save.
  Nothing on this path compiles.
* Small CPU arrays (up to 256 KiB) that are ready, when jaxckpt's own writer
  writes them (``views``): no copy, a read-only numpy view of the array's
  buffer (the writer takes shape, dtype and sharding from the array). XLA:CPU
  does not donate a buffer that a view still references (the step allocates
  new memory instead), and the view keeps the buffer alive even if the array
  is deleted, so the bytes cannot change until the save drops the view. A copy
  of each of thousands of small arrays was most of save()'s blocked time and
  of the save's CPU time (benchmarks/leaves.py). Larger arrays are copied: a
  donating step that cannot reuse a viewed buffer allocates another, which
  doubled a training loop's peak memory (benchmarks/tpu_idle.py) for no gain.
* numpy leaves are mutable host memory: copied now (the only blocking copy).
* Python scalars are immutable: kept as they are.

With an ``io_device`` every array goes to that device's host memory instead
(TF's meaning: I/O goes through that device). Sync saves skip the copy unless an
``io_device`` asks for one: the caller is blocked until the write is done.
"""

from __future__ import annotations

import functools
from typing import cast

import jax
import numpy as np

from jaxckpt import _compat
from jaxckpt import _staging
from jaxckpt._staging import StagingPool
from jaxckpt._tree import Leaf

_HOST = "pinned_host"


def _copy_global(values: list[jax.Array], targets: list[jax.sharding.Sharding]) -> list[jax.Array]:
  """Copies of arrays this process holds only part of (multi-process).

  JAX returns such an array itself instead of a copy (``_array_shard_arg``: "not
  fully addressable" + same sharding → the input), so a step donating it after
  save() would free the snapshot ("Array has been deleted"). Copy its local
  shards instead and reassemble them into a global array.
  """
  pieces: list[jax.Array] = []
  piece_targets: list[jax.sharding.Sharding] = []
  counts: list[int] = []
  for value, target in zip(values, targets, strict=True):
    shards = value.addressable_shards
    counts.append(len(shards))
    for shard in shards:
      pieces.append(shard.data)
      piece_targets.append(
        jax.sharding.SingleDeviceSharding(shard.device, memory_kind=target.memory_kind)
      )
  copies = iter(_compat.copy_in_place(pieces, piece_targets))
  return [
    jax.make_array_from_single_device_arrays(
      value.shape, target, [next(copies) for _ in range(count)]
    )
    for value, target, count in zip(values, targets, counts, strict=True)
  ]


def _snapshot_arrays(
  values: list[jax.Array], targets: list[jax.sharding.Sharding]
) -> list[jax.Array]:
  if jax.process_count() == 1:  # All fully addressable; skip the per-array check.
    return _compat.copy_in_place(values, targets)
  local = [i for i, v in enumerate(values) if v.is_fully_addressable]
  if len(local) == len(values):
    return _compat.copy_in_place(values, targets)
  out: list[jax.Array | None] = [None] * len(values)
  for i, copy in zip(
    local,
    _compat.copy_in_place([values[i] for i in local], [targets[i] for i in local]),
    strict=True,
  ):
    out[i] = copy
  remote = [i for i in range(len(values)) if out[i] is None]
  for i, copy in zip(
    remote, _copy_global([values[i] for i in remote], [targets[i] for i in remote]), strict=True
  ):
    out[i] = copy
  return cast(list[jax.Array], out)


@functools.cache
def _has_host_memory(device: jax.Device) -> bool:
  try:
    return any(m.kind == _HOST for m in device.addressable_memories())
  except Exception:  # Backends without memory kinds.
    return False


@functools.lru_cache(maxsize=1024)  # Shardings are hashable; a model has few distinct ones.
def _host_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  devices = sharding.device_set
  # On CPU the device memory is host memory, and a copy into it is issued without
  # waiting, where XLA:CPU copies into pinned_host on the calling thread.
  on_cpu = all(d.platform == "cpu" for d in devices)  # type: ignore[attr-defined]
  if on_cpu or not all(_has_host_memory(d) for d in devices):
    return sharding
  return sharding.with_memory_kind(_HOST)


def _one_cpu_device(sharding: jax.sharding.Sharding) -> bool:
  if type(sharding) is jax.sharding.SingleDeviceSharding:  # Most arrays: no hashing.
    return next(iter(sharding.device_set)).platform == "cpu"  # type: ignore[attr-defined]
  return _one_cpu_device_cached(sharding)


@functools.lru_cache(maxsize=1024)
def _one_cpu_device_cached(sharding: jax.sharding.Sharding) -> bool:
  devices = sharding.device_set
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"  # type: ignore[attr-defined]


def _take_views(
  leaves: list[Leaf], out: dict[str, object], views: dict[str, jax.Array], max_bytes: int
) -> list[Leaf]:
  """Puts a view in ``out`` (and its array in ``views``) for each leaf of at most
  ``max_bytes`` that can have one (see the module docstring); returns the
  others. No object per view but the view (no GC pressure)."""
  rest = []
  for leaf in leaves:
    value = leaf.value
    if leaf.nbytes <= max_bytes and _one_cpu_device(value.sharding) and value.is_ready():
      # A view of a one-device CPU array's buffer (JAX caches only copies).
      out[leaf.name] = np.asarray(value)
      views[leaf.name] = value
    else:
      rest.append(leaf)
  return rest


def take_snapshot(
  leaves: list[Leaf],
  *,
  copy: bool,
  io_device: jax.Device | None,
  pool: StagingPool | None = None,
  keep_bytes: int = 0,
  views: dict[str, jax.Array] | None = None,
  view_max_bytes: int = 0,
) -> tuple[dict[str, object], list]:
  """Returns ``{name: value}`` safe to write after the caller moves on, and the
  staging sets to give back to ``pool`` once the save is done (may be empty;
  ``keep_bytes``: see `StagingPool.copy`). Given ``views`` (and ``copy``), ready
  one-device CPU arrays of at most ``view_max_bytes`` (and under the staging
  size) are read-only numpy views instead of copies, and ``views`` maps their
  names to the arrays they view: for writers that describe them by those
  arrays (`_fastwrite`)."""
  out: dict[str, object] = {}
  staged: list = []
  jax_leaves = []
  for leaf in leaves:
    if isinstance(leaf.value, jax.Array):
      jax_leaves.append(leaf)
    elif isinstance(leaf.value, (np.ndarray, np.generic)):
      out[leaf.name] = np.array(leaf.value, copy=True) if copy else leaf.value
    else:
      out[leaf.name] = leaf.value
  if views is not None and view_max_bytes and copy and io_device is None:
    staged_from = _staging.MIN_BYTES if pool is None else pool.min_bytes
    jax_leaves = _take_views(jax_leaves, out, views, min(view_max_bytes, staged_from - 1))
  jax_names = [leaf.name for leaf in jax_leaves]
  jax_values = [leaf.value for leaf in jax_leaves]
  if jax_values and (copy or io_device is not None):
    if io_device is not None:
      targets = [_host_sharding(jax.sharding.SingleDeviceSharding(io_device))] * len(jax_values)
      jax_values = _compat.copy_arrays(jax_values, targets)
    else:
      copies: list = [None] * len(jax_values)
      if pool is not None:
        nbytes = [leaf.nbytes for leaf in jax_leaves]
        copies, staged = pool.copy(jax_values, nbytes, keep_bytes=keep_bytes)
      rest = [i for i, c in enumerate(copies) if c is None]
      if rest:
        others = [jax_values[i] for i in rest]
        for i, c in zip(
          rest, _snapshot_arrays(others, [_host_sharding(x.sharding) for x in others]), strict=True
        ):
          copies[i] = c
      jax_values = copies
  out.update(zip(jax_names, jax_values, strict=True))
  return out, staged
