"""TF's ``experimental_io_device`` across processes: one process does all file I/O.

With ``experimental_io_device="/job:worker/task:K"`` under ``jax.distributed``,
process K alone touches the filesystem (e.g. a ``/tmp`` only its host can see).

* Save: every process's shards reach process K through one JAX all-gather
  (``multihost_utils.process_allgather``, issued on the caller's thread in
  program order like any collective); process K writes a full, single-writer
  checkpoint and the others only wait for its commit. JAX has no one-to-one
  host transfer that works on every backend, so the others briefly hold the
  gathered arrays too and drop them at once.
* Restore: process K reads the manifest and the full arrays (checking their
  CRC-32s) and broadcasts them (``multihost_utils.broadcast_one_to_all``, bytes
  reinterpreted as uint32 so the sum-based broadcast cannot touch the values:
  ``-0.0 + 0.0`` would be ``+0.0``); each process then keeps the shards its
  target sharding assigns to it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxckpt import _errors
from jaxckpt._errors import JaxckptError
from jaxckpt._layout import Reader
from jaxckpt._layout import stored_dtype
from jaxckpt._manifest import Manifest
from jaxckpt._manifest import read_manifest
from jaxckpt._multihost import Coordination
from jaxckpt._restore import as_tracked_type
from jaxckpt._restore import check_compatible
from jaxckpt._restore import read_leaves
from jaxckpt._restore import stored_arrays
from jaxckpt._restore import without_data
from jaxckpt._tree import Leaf


def gather(values: list[jax.Array]) -> list[np.ndarray]:
  """Full host copies of ``values`` on every process (a collective: all must call).

  Floating-point arrays travel as same-width unsigned integers: the all-gather
  would canonicalise NaN payloads (bf16 ``0x7FC1`` → ``0x7FC0``).
  """
  local = [v.is_fully_addressable for v in values]
  # Fully addressable arrays are this process's own values (TF: its variables).
  shared = [_as_bits(v) for v, is_local in zip(values, local, strict=True) if not is_local]
  gathered = iter(multihost_utils.process_allgather(shared, tiled=True) if shared else [])
  return [
    np.array(v) if is_local else np.asarray(next(gathered)).view(v.dtype)
    for v, is_local in zip(values, local, strict=True)
  ]


_BITS = {2: jax.numpy.uint16, 4: jax.numpy.uint32, 8: jax.numpy.uint64, 1: jax.numpy.uint8}


def _as_bits(value: jax.Array) -> jax.Array:
  dtype = np.dtype(value.dtype)
  if dtype.kind not in "fV" or dtype.itemsize not in _BITS:  # ml_dtypes floats are kind "V".
    return value
  return _bitcast(value, _BITS[dtype.itemsize])


@functools.partial(jax.jit, static_argnums=1)
def _bitcast(value: jax.Array, to: Any) -> jax.Array:
  return jax.lax.bitcast_convert_type(value, to)


def _to_words(a: np.ndarray) -> np.ndarray:
  raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
  pad = (-raw.size) % 4
  if pad:
    raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
  return raw.view(np.uint32)  # uint32: summed exactly without jax_enable_x64.


def broadcast(
  arrays: list[np.ndarray] | None, specs: list[tuple[tuple[int, ...], np.dtype]], *, source: int
) -> list[np.ndarray]:
  """``arrays`` from process ``source`` on every process (a collective).

  Others pass ``None``; ``specs`` (shape, dtype) must be the same everywhere.
  """
  if jax.process_index() == source:
    words = [_to_words(a) for a in arrays or ()]
  else:
    words = [
      np.zeros((-(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 4),), np.uint32)
      for shape, dtype in specs
    ]
  out = multihost_utils.broadcast_one_to_all(words, is_source=jax.process_index() == source)
  result = []
  for w, (shape, dtype) in zip(out, specs, strict=True):
    dtype = np.dtype(dtype)
    raw = np.asarray(w, np.uint32).view(np.uint8)[: int(np.prod(shape)) * dtype.itemsize]
    result.append(raw.view(dtype).reshape(shape))
  return result


def _rebuild_error(data: dict, io_process: int) -> JaxckptError:
  """The I/O process's error, by class name; others (not jaxckpt's) as a JaxckptError."""
  name = data.get("error", "")
  cls = getattr(_errors, name, None)
  # Private classes are internal and never published (_ArrayReadError also takes
  # other arguments); should one arrive, it is rebuilt as a plain JaxckptError.
  if name.startswith("_") or not (isinstance(cls, type) and issubclass(cls, JaxckptError)):
    cls = JaxckptError
  return cls(f"(on process {io_process}, the experimental_io_device) {data['message']}")


def _on_io_process(coord: Coordination, name: str, work):
  """``work()`` → (local result, JSON-able payload) on the I/O process, which
  publishes the payload or its error; returns (result, payload) there and
  (None, payload) elsewhere, and raises its error on every process."""
  if coord.is_primary:
    try:
      result, payload = work()
    except Exception as e:
      coord.publish(name, json.dumps({"error": type(e).__name__, "message": str(e)}))
      raise
    coord.publish(name, json.dumps({"payload": payload}))
    return result, payload
  data = json.loads(coord.receive(name))
  if "error" in data:
    raise _rebuild_error(data, coord.primary)
  return None, data["payload"]


def _place(leaf: Leaf, value: np.ndarray):
  sharding = getattr(leaf.value, "sharding", None)
  if (
    isinstance(leaf.value, (jax.Array, jax.ShapeDtypeStruct))
    and sharding is not None
    and not sharding.is_fully_addressable
  ):
    value = value.astype(leaf.dtype, copy=False)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: value[index])
  return as_tracked_type(leaf, value)


def restore_through(
  coord: Coordination, save_path, leaves: list[Leaf], *, verify_checksums: bool
) -> tuple[str | None, Manifest | None, dict]:
  """Restore where only ``coord.primary`` (the I/O process) reads files; returns
  (path, manifest, values).

  Every process must call it; the I/O process's ``save_path`` is the one used
  (the others may not see the files at all). Returns ``(None, None, {})`` when
  that path is None.
  """
  io_process = coord.primary

  def read_manifest_there():
    path = save_path
    manifest = None if path is None else read_manifest(path)
    if path is not None and manifest is not None:
      check_compatible(path, manifest, leaves)
    return manifest, {"path": path, "manifest": manifest and manifest.to_json()}

  manifest, shared = _on_io_process(coord, "manifest", read_manifest_there)
  path = shared["path"]
  if manifest is None and path is not None:
    manifest = Manifest.from_json(shared["manifest"], path)
  if path is None:
    return None, None, {}
  wanted = stored_arrays(manifest, leaves)
  reader = Reader(
    processes=frozenset([io_process]),
    primary=io_process,
    host_only=True,
    key_prefix=f"jaxckpt{coord.op}",
  )
  raw, _ = _on_io_process(
    coord,
    "read",
    lambda: (
      read_leaves(path, manifest, wanted, verify_checksums=verify_checksums, reader=reader),
      None,
    ),
  )
  specs = [(tuple(manifest.leaves[l.name].shape), stored_dtype(manifest, l.name)) for l in wanted]
  arrays = broadcast(
    None if raw is None else [raw[l.name] for l in wanted], specs, source=io_process
  )
  placed = {l.name: _place(l, a) for l, a in zip(wanted, arrays, strict=True)}
  return path, manifest, {**without_data(manifest, leaves), **placed}
