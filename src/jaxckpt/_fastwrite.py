"""The Orbax PyTree layout's fast writer: the files Orbax writes, written with TensorStore.

Orbax spends CPU time in Python around each TensorStore write (specs, metrics,
per-array asyncio tasks, sharding and metadata files), a per-array cost that
dominates saves of many small arrays (benchmarks/throughput.py measures it).

What is written is what Orbax writes for the same tree, so
``ocp.StandardCheckpointer().restore(f"{path}/state")`` and jaxckpt's readers
cannot tell the difference: zarr v2 arrays without compressor in one OCDBT
database, Orbax's chunk grid (from Orbax's own functions, see _compat.py), and
Orbax's ``_METADATA``, ``_sharding``, ``array_metadatas`` and
``_CHECKPOINT_METADATA`` files. tests/test_fastwrite.py compares them with
Orbax's own output.

Only for the common case, as the save plan decides (`writes_all`): one writing
process, no compression, no incremental save, and leaves that are jax.Arrays,
numpy arrays or Python bool/int/float of plain dtypes. Everything else goes
through Orbax.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from jaxckpt import _compat
from jaxckpt._staging import Packed
from jaxckpt._store import write_json
from jaxckpt._tree import Leaf
from jaxckpt._tree import array_nbytes
from jaxckpt._tree import is_numeric_dtype

_OCDBT_CONFIG = {
  "max_inline_value_bytes": 1024,
  "max_decoded_node_bytes": 100_000_000,
  "compression": {"id": "zstd"},
}  # Orbax's, for its B-tree nodes.
# OCDBT packs chunk data into data files of about this size. TensorStore's
# default is one file: one writev of the whole state, then one fsync, so the
# disk idles while the page cache fills and the CPU idles during the fsync.
# Smaller files are written and fsynced concurrently.
TARGET_DATA_FILE_SIZE = 16 << 20
# Arrays are written in transactions of about this many bytes, each one OCDBT
# commit, committed as soon as its arrays are opened: the disk starts on the
# first batch while Python still opens the rest (benchmarks/throughput.py).
COMMIT_BYTES = 16 << 20
_CONTEXT = {
  "file_io_concurrency": {"limit": 128},
  "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
}
# The handler name Orbax records in _CHECKPOINT_METADATA, from its public class.
_HANDLER = f"{ocp.PyTreeCheckpointHandler.__module__}.{ocp.PyTreeCheckpointHandler.__qualname__}"


@functools.lru_cache(maxsize=256)
def _plain(dtype) -> bool:
  # Other ml_dtypes (float8, int4, ...) are left to Orbax. Cached: ~20 µs per
  # array uncached (jax.dtypes.issubdtype), 5 ms of a 256-array save.
  return not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and is_numeric_dtype(dtype)


def _kind(value: Any) -> str | None:
  if isinstance(value, Packed):  # A jax.Array's snapshot (see _staging.py).
    return "jax.Array"
  if isinstance(value, jax.Array):
    return None if 0 in value.shape or not _plain(value.dtype) else "jax.Array"
  if isinstance(value, np.ndarray) and is_numeric_dtype(value.dtype) and 0 not in value.shape:
    return "np.ndarray"
  if type(value) in (bool, int, float):
    return "scalar"
  return None


def writes_all(leaves: list[Leaf]) -> bool:
  """Whether `start` can write every leaf exactly as Orbax would.

  For saves with one writing process: its own arrays, or (TF's
  ``experimental_io_device``) whole host copies of everyone's.
  """
  return bool(leaves) and all(_kind(leaf.value) is not None for leaf in leaves)


_WRITE_SHAPES: dict[tuple[Any, ...], tuple[int, ...]] = {}


def _write_shape(value: jax.Array | Packed) -> tuple[int, ...]:
  """Orbax's chunk grid: the shard shape, split among replicas where Orbax's
  replica-parallel saving would split it (its own function decides).

  Cached by (shape, dtype, sharding), all it depends on in one process: Orbax's
  function costs ~0.12 ms per array (30 ms of a 256-array save).
  """
  if isinstance(value, Packed):  # One device, one replica: the whole array.
    return tuple(value.shape)
  key = (value.shape, value.dtype, value.sharding)
  shape = _WRITE_SHAPES.get(key)
  if shape is None:
    if len(_WRITE_SHAPES) > 4096:
      _WRITE_SHAPES.clear()
    shape = _WRITE_SHAPES[key] = _compat.orbax_write_shape(value)
  return shape


@functools.lru_cache(maxsize=1024)
def _serialized_sharding(sharding: jax.sharding.Sharding) -> str | None:
  """Orbax's ``_sharding`` file entry; cached (~25 µs per array otherwise).

  The types Orbax's own ``from_jax_sharding`` converts, through their public
  classes; Orbax records none for other sharding types either.
  """
  if isinstance(sharding, jax.sharding.NamedSharding):
    serialized = ocp.metadata.NamedShardingMetadata.from_jax_sharding(sharding)
  elif isinstance(sharding, jax.sharding.SingleDeviceSharding):
    serialized = ocp.metadata.SingleDeviceShardingMetadata.from_jax_sharding(sharding)
  else:
    return None
  return serialized.to_serialized_string()


@dataclasses.dataclass
class Pending:
  """Writes in flight; `wait` finishes them and writes Orbax's metadata files."""

  state_dir: str
  futures: list[Any]
  commits: list[Any]  # The transactions' commit futures.
  tree_metadata: dict[str, Any]
  shardings: dict[str, str]
  array_metadatas: list[dict[str, Any]]
  started_ns: int

  def wait(self) -> None:
    # The metadata files first, while the data is still being written.
    write_json(
      os.path.join(self.state_dir, "_METADATA"),
      {
        "tree_metadata": self.tree_metadata,
        "use_ocdbt": True,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
      },
    )
    if self.shardings:
      write_json(os.path.join(self.state_dir, "_sharding"), self.shardings)
    if self.array_metadatas:
      write_json(
        os.path.join(self.state_dir, "array_metadatas", "process_0"),
        {"array_metadatas": self.array_metadatas},
      )
    for future in self.futures + self.commits:
      future.result()
    self.futures = self.commits = []
    write_json(
      os.path.join(os.path.dirname(self.state_dir), "_CHECKPOINT_METADATA"),
      {
        "item_handlers": {os.path.basename(self.state_dir): _HANDLER},
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": self.started_ns,
        "commit_timestamp_nsecs": time.time_ns(),
        "custom_metadata": {},
      },
    )


def _open_database(state_dir: str, context: ts.Context) -> ts.KvStore:
  # Opened once: ts.open with this object instead of its JSON spec halves the
  # Python cost of each array's open.
  return ts.KvStore.open(
    {
      "driver": "ocdbt",
      "base": f"file://{os.path.abspath(state_dir)}/",
      "config": _OCDBT_CONFIG,
      "target_data_file_size": TARGET_DATA_FILE_SIZE,
    },
    context=context,
  ).result()


@dataclasses.dataclass
class _Metadata:
  """Orbax's metadata files of one item, filled array by array."""

  tree: dict[str, Any] = dataclasses.field(default_factory=dict)
  shardings: dict[str, str] = dataclasses.field(default_factory=dict)
  arrays: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _array(
  key: str, value: Any, meta: dict[str, Any], metadata: _Metadata, chunk_byte_size: int | None
) -> tuple[np.dtype, tuple, tuple, list, int]:
  """(dtype, shape, chunks, pieces, nbytes) of one value; records its metadata."""
  if meta["value_type"] != "jax.Array":
    array = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d.)
    return array.dtype, array.shape, array.shape, [((), array)], array.nbytes
  write_shape = _write_shape(value)
  chunks = write_shape
  if chunk_byte_size is not None:
    chunks = _compat.choose_chunk_shape(value.shape, write_shape, value.dtype, chunk_byte_size)
  meta["write_shape"] = list(write_shape)
  serialized = _serialized_sharding(value.sharding)
  if serialized is not None:
    metadata.shardings[base64.b64encode(key.encode()).decode()] = serialized
  metadata.arrays.append(
    {
      "array_metadata": {
        "param_name": key,
        "write_shape": list(write_shape),
        "chunk_shape": list(chunks),
        "ext_metadata": None,
      }
    }
  )
  if len(value.sharding.device_set) == 1:  # Whole: skips building Shard objects.
    pieces = [((), value)]
  else:
    pieces = [(s.index, s.data) for s in value.addressable_shards if s.replica_id == 0]
  return np.dtype(value.dtype), tuple(value.shape), tuple(chunks), pieces, array_nbytes(value)


def start(
  state_dir: str, snapshot: dict[str, Any], *, chunk_byte_size: int | None = None
) -> Pending:
  """Starts writing ``snapshot`` ({"a/b": value}) as the Orbax item at ``state_dir``."""
  started_ns = time.time_ns()
  os.makedirs(state_dir)
  context = ts.Context(_CONTEXT)  # One context: one OCDBT writer for all arrays.
  kvstore = _open_database(state_dir, context)
  batch = _Batch()
  futures: list[Any] = []
  commits: list[Any] = []
  metadata = _Metadata()
  for name, value in snapshot.items():
    parts = name.split("/")
    key = ".".join(parts)
    meta: dict[str, Any] = {"value_type": _kind(value), "skip_deserialize": False}
    dtype, shape, chunks, pieces, nbytes = _array(key, value, meta, metadata, chunk_byte_size)
    metadata.tree[str(tuple(parts))] = {
      "key_metadata": [{"key": p, "key_type": 2} for p in parts],
      "value_metadata": meta,
    }
    spec = {
      "driver": "zarr",
      "dtype": dtype.name,
      "metadata": {
        "shape": list(shape),
        "chunks": list(chunks),
        "compressor": None,
        "dimension_separator": ".",
      },
    }
    opening = ts.open(
      spec, kvstore=kvstore / f"{key}/", create=True, context=context, transaction=batch.txn
    )
    batch.add(opening, pieces, nbytes)
    if batch.nbytes >= COMMIT_BYTES:
      batch.commit(futures, commits)
      batch = _Batch()
  if batch.opens:
    batch.commit(futures, commits)
  return Pending(
    state_dir, futures, commits, metadata.tree, metadata.shardings, metadata.arrays, started_ns
  )


class _Batch:
  """Arrays written in one TensorStore transaction: one OCDBT commit."""

  def __init__(self):
    self.txn = ts.Transaction()
    self.opens: list[tuple[Any, list]] = []
    self.nbytes = 0

  def add(self, opening, pieces, nbytes: int) -> None:
    self.opens.append((opening, pieces))
    self.nbytes += nbytes

  def commit(self, futures: list, commits: list) -> None:
    for opening, pieces in self.opens:
      store = opening.result()
      for index, data in pieces:
        target = store[index] if index else store
        # No copy into TensorStore's chunk cache (as Orbax): the snapshot is this
        # save's own, and a sync save's caller waits until the write is done.
        futures.append(target.write(np.asarray(data), can_reference_source_data_indefinitely=True))
    # Writes the data files and the B-tree in the background.
    commits.append(self.txn.commit_async())
