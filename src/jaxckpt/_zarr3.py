"""zarr v3 arrays under a key-value-store prefix: the layout of URL checkpoints.

Orbax 0.12 cannot write ``memory://`` or ``s3://`` (its paths go through
``etils.epath``, and its TensorStore spec builder knows only local files and
``gs://``), so URL checkpoints are one zarr v3 array per leaf under the data
prefix the manifest names (``<ckpt>/data-.../<leaf name>/``), one chunk per
device shard, each shard written by TensorStore straight from its buffer.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import tensorstore as ts

from jaxckpt import _bounds
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import _ArrayReadError as ArrayReadError
from jaxckpt._store import KV


def _array_spec(url: str, name: str) -> dict:
  spec, key = KV.spec(url)
  return {"driver": "zarr3", "kvstore": {**spec, "path": f"{key}/{name}/"}}


def _chunks(value: Any) -> tuple[int, ...] | None:
  """One chunk per device shard: from the sharding, so every process (each
  writing its own shards into the same array) agrees and no two processes ever
  write the same chunk object."""
  if isinstance(value, jax.Array) and value.ndim:
    return tuple(max(1, d) for d in value.sharding.shard_shape(value.shape))
  return None


def _schema(value: Any, compression: bool) -> dict[str, Any]:
  codecs = [{"name": "bytes"}] + (
    [{"name": "zstd", "configuration": {"level": 1}}] if compression else []
  )
  dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
  schema: dict[str, Any] = {
    "dtype": dtype.name,
    "domain": {"shape": list(np.shape(value))},
    "codec": {"driver": "zarr3", "codecs": codecs},
  }
  chunks = _chunks(value)
  if chunks is not None:
    schema["chunk_layout"] = {"chunk": {"shape": list(chunks)}}
  return schema


def create_arrays(url: str, values: dict[str, Any], *, compression: bool) -> dict[str, Any]:
  """Creates (writes the metadata of) one zarr v3 array per value; returns the stores.

  With several processes only one creates; the others `open_arrays` after it.
  """
  # delete_existing: the prefix is fresh, so nothing is lost, and the metadata
  # write is unconditional. TensorStore's conditional create retried forever when
  # S3 answered 404 NoSuchBucket; the unconditional one fails at once.
  opening = {
    name: ts.open(
      {**_array_spec(url, name), "schema": _schema(value, compression)},
      create=True,
      delete_existing=True,
      context=KV.context,
    )
    for name, value in values.items()
  }
  return {name: future.result() for name, future in opening.items()}


def open_arrays(url: str, names) -> dict[str, Any]:
  opening = {name: ts.open(_array_spec(url, name), open=True, context=KV.context) for name in names}
  return {name: future.result() for name, future in opening.items()}


def write_arrays(stores: dict[str, Any], values: dict[str, Any], *, host_values: bool) -> None:
  """Writes this process's part of each value; waits for all.

  ``jax.Array``: its replica-0 shards on this process. Other values (numpy,
  scalars; the same on every process) only if ``host_values``.
  """
  pending = []
  for name, value in values.items():
    store = stores[name]
    if isinstance(value, jax.Array):
      for shard in value.addressable_shards:
        if shard.replica_id == 0:
          pending.append(store[shard.index].write(np.asarray(shard.data)))
    elif host_values:
      pending.append(store.write(np.asarray(value)))
  for future in pending:
    future.result()


def read_arrays(url: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Reads the arrays named in ``shapes`` (their manifest shapes) under ``url``, all
  reads in flight at once; a stored chunk grid beyond the shape is refused unread."""
  opened = {name: ts.open(_array_spec(url, name), open=True, context=KV.context) for name in shapes}
  reads: dict[str, Any] = {}
  for name, opening in opened.items():
    try:
      store = opening.result()
      _bounds.check_opened(store, shapes[name])
      reads[name] = store.read()
    except Exception as e:
      raise ArrayReadError(name, e) from e
  out: dict[str, np.ndarray] = {}
  for name, reading in reads.items():
    try:
      out[name] = reading.result()
    except Exception as e:
      raise ArrayReadError(name, e) from e
  return out


def read_sharded(url: str, name: str, shape, sharding, dtype) -> jax.Array:
  """Reads array ``name`` straight into ``sharding``: each process reads only the
  slices its devices hold (for arrays no process holds whole)."""
  try:
    store = ts.open(_array_spec(url, name), open=True, context=KV.context).result()
    if tuple(store.shape) != tuple(shape):
      raise CorruptCheckpointError(f"stored shape {tuple(store.shape)}, expected {tuple(shape)}")
    return jax.make_array_from_callback(
      tuple(shape), sharding, lambda index: np.asarray(store[index].read().result(), dtype=dtype)
    )
  except Exception as e:
    raise ArrayReadError(name, e) from e
