"""Peer replicas of the local tier: bytes moved between processes by a JAX collective.

Each process's local shards (one byte string, see `_shards.py`) travel to its
ring neighbour with ``jax.lax.ppermute`` inside ``jax.shard_map``, over a mesh
of one device per process: the accelerator interconnect on TPU/GPU, gloo on
CPU. Only the byte counts go through a small all-gather; no data goes through
the coordination service. Like any collective, every process must call
`exchange` in the same order, on the caller's thread (never on a save thread).
"""

from __future__ import annotations

import functools
import mmap

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_ALIGN = 4096  # Widths rounded up, so a state whose size changes a little reuses the program.


def ring_peer(process: int, count: int) -> int:
  """The process whose local shards ``process`` keeps a replica of."""
  return (process + 1) % count


def _one_device_per_process() -> list[jax.Device]:
  first: dict[int, jax.Device] = {}
  for device in sorted(jax.devices(), key=lambda d: d.id):
    first.setdefault(device.process_index, device)
  return [first[p] for p in sorted(first)]


@functools.cache
def _permute(devices: tuple[jax.Device, ...], shift: int):
  mesh = Mesh(np.array(devices), ("p",))
  count = len(devices)
  # Process j's row goes to process (j - shift) % n: each receives from j + shift.
  pairs = [(j, (j - shift) % count) for j in range(count)]
  body = functools.partial(jax.lax.ppermute, axis_name="p", perm=pairs)
  mapped = jax.shard_map(body, mesh=mesh, in_specs=P("p"), out_specs=P("p"))
  return NamedSharding(mesh, P("p")), jax.jit(mapped)


def exchange(data: bytes | np.ndarray | mmap.mmap, shift: int = 1) -> bytes:
  """Sends ``data`` to process ``me - shift`` and returns what ``me + shift`` sent.

  ``shift=1`` moves every process's bytes to the process that keeps its
  replica (`ring_peer`); ``shift=-1`` sends replicas back to their owners. A
  collective: every process must call it with the same ``shift``.

  Args:
    data: this process's bytes (any length, possibly empty).
    shift: ring distance of the sender, +1 or -1.

  Returns:
    The bytes of process ``(me + shift) % process_count()``.

  Examples:
    >>> exchange(b"abc")  # One process: its own bytes come back.
    b'abc'
  """
  count = jax.process_count()
  if count == 1:
    return bytes(data)
  me = jax.process_index()
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64)))
  lengths = lengths.reshape(-1)
  width = max(_ALIGN, -(-int(lengths.max()) // _ALIGN) * _ALIGN)
  devices = tuple(_one_device_per_process())
  sharding, permute = _permute(devices, shift)
  row = np.zeros((1, width), np.uint8)
  row[0, : len(data)] = np.frombuffer(data, np.uint8)
  local = jax.device_put(row, devices[me])
  rows = jax.make_array_from_single_device_arrays((count, width), sharding, [local])
  received = np.asarray(permute(rows).addressable_shards[0].data)[0]
  return received[: int(lengths[(me + shift) % count])].tobytes()
