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
Orbax's own output. When the plan packs, small arrays go instead into the
aggregate file Orbax reads them from (_packed.py).

Arrays stored as one chunk of at most `DIRECT_BYTES` skip TensorStore's zarr
driver: their ``.zarray`` and chunk are written as the two OCDBT keys the
driver would write (the same bytes: an uncompressed zarr v2 chunk is the
array's C-order bytes), in the batch's transaction. Opening a zarr array costs
~100 µs of Python and TensorStore per array; for thousands of small arrays that
was most of a save.

Only for the common case, as the save plan decides (`writes_all`): one writing
process, no compression, no incremental save, and leaves that are jax.Arrays,
numpy arrays or Python bool/int/float of plain dtypes. Everything else goes
through Orbax.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import time
from typing import Any
from typing import cast

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from jaxckpt import _compat
from jaxckpt import _packed
from jaxckpt._integrity import crc32
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
# One-chunk arrays up to this size are written as OCDBT keys (see above): up to
# here their two copies (into the key's value, and TensorStore's) cost less than
# the zarr driver's open; larger arrays keep the driver's zero-copy write (at
# 4 MiB the copies made 64-array saves slower, benchmarks/leaves.py).
DIRECT_BYTES = 256 << 10
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


def _write_shape(value: jax.Array) -> tuple[int, ...]:
  """Orbax's chunk grid: the shard shape, split among replicas where Orbax's
  replica-parallel saving would split it (its own function decides).

  Cached by (shape, dtype, sharding), all it depends on in one process: Orbax's
  function costs ~0.12 ms per array (30 ms of a 256-array save).
  """
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
  tree_metadata: list[str]  # JSON "key": value members (see `_Metadata`).
  shardings: list[str]  # JSON "key": value members.
  array_metadatas: list[str]  # JSON objects.
  started_ns: int
  # CRC-32s of the arrays written as OCDBT keys, from the bytes written: the
  # save's checksums need not convert those arrays again.
  checksums: dict[str, int] = dataclasses.field(default_factory=dict)
  packed: list[str] = dataclasses.field(default_factory=list)  # Names in _packed's file.

  def wait(self) -> None:
    # The metadata files first, while the data is still being written.
    _write_text(
      os.path.join(self.state_dir, "_METADATA"),
      '{"tree_metadata": {' + ", ".join(self.tree_metadata) + '}, "use_ocdbt": true, '
      '"use_zarr3": false, "store_array_data_equal_to_fill_value": true, '
      '"custom_metadata": null}',
    )
    if self.shardings:
      _write_text(os.path.join(self.state_dir, "_sharding"), "{" + ", ".join(self.shardings) + "}")
    if self.array_metadatas:
      _write_text(
        os.path.join(self.state_dir, "array_metadatas", "process_0"),
        '{"array_metadatas": [' + ", ".join(self.array_metadatas) + "]}",
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


def _write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:  # fsynced by the commit.
    f.write(text)


@dataclasses.dataclass
class _Metadata:
  """Orbax's metadata files of one item, filled array by array: the per-array
  parts of ``_METADATA`` and ``array_metadatas`` as JSON text, from fragments
  encoded once per signature (`_Spec`); encoding them as one object per array
  cost a tenth of a save of thousands of small arrays."""

  tree: list[str] = dataclasses.field(default_factory=list)
  shardings: list[str] = dataclasses.field(default_factory=list)
  arrays: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What an array's signature (kind, shape, dtype, sharding) decides: all of its
  metadata but its name, built once per signature (a model's thousands of
  leaves have a few dozen)."""

  meta: str  # Orbax's value_metadata, JSON.
  dtype: np.dtype
  shape: tuple[int, ...]
  chunks: tuple[int, ...]
  nbytes: int
  whole: bool  # One piece: the whole array (one device, or host data).
  array_metadata: str | None  # Orbax's array_metadata after param_name, JSON.
  sharding: str | None  # Orbax's _sharding entry.
  zarray: bytes | None  # Written as OCDBT keys with this .zarray (see the module docstring).
  chunk_key: str
  packable: bool  # May go into _packed's file (when the plan packs).
  packed_meta: str  # Orbax's value_metadata there, JSON.


_SPECS: dict[tuple, _Spec] = {}
_json_str = json.encoder.encode_basestring_ascii  # A str as JSON, in C (json.dumps: 3x slower).


def _lookup_spec(signature: tuple, value: Any) -> _Spec:
  """``value``'s `_Spec` (a jax.Array, or a C-ordered numpy array)."""
  spec = _SPECS.get(signature)
  if spec is None:
    if len(_SPECS) > 4096:
      _SPECS.clear()
    spec = _SPECS[signature] = _new_spec(value, signature[0], signature[4])
  return spec


def _new_spec(value: Any, kind: str, chunk_byte_size: int | None) -> _Spec:
  dtype, shape = np.dtype(value.dtype), tuple(value.shape)
  meta: dict[str, Any] = {"value_type": kind, "skip_deserialize": False}
  chunks, whole, array_metadata, serialized = shape, True, None, None
  if kind == "jax.Array":
    write_shape = _write_shape(value)
    chunks = write_shape
    if chunk_byte_size is not None:
      chunks = _compat.choose_chunk_shape(value.shape, write_shape, value.dtype, chunk_byte_size)
    chunks = tuple(chunks)
    meta["write_shape"] = list(write_shape)
    array_metadata = json.dumps(
      {"write_shape": list(write_shape), "chunk_shape": list(chunks), "ext_metadata": None}
    )[1:]
    serialized = _serialized_sharding(value.sharding)
    whole = len(value.sharding.device_set) == 1  # Skips building Shard objects.
  nbytes = array_nbytes(value) if kind == "jax.Array" else value.nbytes
  # (Native byte order: the zarr driver would store other orders as native.)
  direct = whole and chunks == shape and nbytes <= DIRECT_BYTES and dtype.isnative
  return _Spec(
    json.dumps(meta),
    dtype,
    shape,
    chunks,
    nbytes,
    whole,
    array_metadata,
    serialized,
    _zarray(dtype, shape) if direct else None,
    ".".join("0" * len(shape)) or "0",
    kind != "scalar" and whole and nbytes <= _packed.MAX_BYTES and _packed.packable(dtype),
    json.dumps({"value_type": kind, "skip_deserialize": True}),
  )


def _zarray(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
  """The ``.zarray`` TensorStore's zarr driver writes for a one-chunk array."""
  zarr_dtype = "bfloat16" if dtype.name == "bfloat16" else dtype.str
  return (
    f'{{"chunks":{list(shape)},"compressor":null,"dimension_separator":".",'
    f'"dtype":"{zarr_dtype}","fill_value":null,"filters":null,"order":"C",'
    f'"shape":{list(shape)},"zarr_format":2}}'
  ).encode()


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One leaf's part of the metadata files and its OCDBT keys, for one signature
  (kind, shape, dtype, sharding, chunking). Cached by leaf name: a model saves
  the same names with the same signatures every time, and formatting them was a
  fifth of the writer's time for thousands of small arrays."""

  signature: tuple
  spec: _Spec
  prefix: str  # The array's OCDBT key prefix ("a.b/").
  zarray_key: str  # Its ".zarray" key and its chunk's key (one-chunk arrays).
  chunk_key: str
  tree: str  # Its `_METADATA` tree_metadata member.
  packed_tree: str  # That member when the array is in _packed's file.
  sharding: str | None  # Its `_sharding` member.
  array: str | None  # Its array_metadatas entry.


_ENTRIES: dict[str, _Entry] = {}


def _entry(name: str, value: Any, kind: str, chunk_byte_size: int | None) -> _Entry:
  sharding = value.sharding if kind == "jax.Array" else None
  signature = (kind, value.shape, value.dtype, sharding, chunk_byte_size)
  entry = _ENTRIES.get(name)
  if entry is None or entry.signature != signature:
    if len(_ENTRIES) > 1 << 16:
      _ENTRIES.clear()
    entry = _ENTRIES[name] = _new_entry(name, signature, _lookup_spec(signature, value))
  return entry


def _new_entry(name: str, signature: tuple, spec: _Spec) -> _Entry:
  parts = name.split("/")
  key = ".".join(parts)
  keys = ", ".join(f'{{"key": {_json_str(p)}, "key_type": 2}}' for p in parts)
  member = f'{_json_str(str(tuple(parts)))}: {{"key_metadata": [{keys}], "value_metadata": '
  return _Entry(
    signature,
    spec,
    f"{key}/",
    f"{key}/.zarray",
    f"{key}/{spec.chunk_key}",
    f"{member}{spec.meta}}}",
    f"{member}{spec.packed_meta}}}",
    None
    if spec.sharding is None
    else f"{_json_str(base64.b64encode(key.encode()).decode())}: {_json_str(spec.sharding)}",
    None
    if spec.array_metadata is None
    else f'{{"array_metadata": {{"param_name": {_json_str(key)}, {spec.array_metadata}}}',
  )


def _pieces(value: Any, spec: _Spec) -> list[tuple[Any, Any]]:
  """(index, data) of what to write: the whole value, or this process's shards."""
  if spec.whole:
    return [((), value)]
  return [(s.index, s.data) for s in value.addressable_shards if s.replica_id == 0]


def _open_array(kvstore: ts.KvStore, spec: _Spec, context: ts.Context, txn: ts.Transaction):
  """Opens (creates) a zarr v2 array in ``txn`` through TensorStore's driver."""
  metadata = {
    "shape": list(spec.shape),
    "chunks": list(spec.chunks),
    "compressor": None,
    "dimension_separator": ".",
  }
  return ts.open(
    {"driver": "zarr", "dtype": spec.dtype.name, "metadata": metadata},
    kvstore=kvstore,
    create=True,
    context=context,
    transaction=txn,
  )


def start(
  state_dir: str,
  snapshot: dict[str, Any],
  *,
  chunk_byte_size: int | None = None,
  described: dict[str, jax.Array] | None = None,
  pack: bool = False,
) -> Pending:
  """Starts writing ``snapshot`` ({"a/b": value}) as the Orbax item at ``state_dir``;
  an entry named in ``described`` is a numpy view of that jax.Array, written as it.
  With ``pack``, the arrays `_packed` holds go into its file (see _packed.py)."""
  described = described or {}
  started_ns = time.time_ns()
  os.makedirs(state_dir)
  context = ts.Context(_CONTEXT)  # One context: one OCDBT writer for all arrays.
  kvstore = _open_database(state_dir, context)
  batch = _Batch(kvstore)
  futures: list[Any] = []
  commits: list[Any] = []
  metadata = _Metadata()
  tree, shardings, arrays = metadata.tree, metadata.shardings, metadata.arrays
  checksums: dict[str, int] = {}
  packed: dict[str, np.ndarray] = {}
  for name, data in snapshot.items():
    value, data, kind = _described(name, data, described)
    entry = _entry(name, value, kind, chunk_byte_size)
    spec = entry.spec
    if pack and spec.packable:
      tree.append(entry.packed_tree)
      packed[name] = np.asarray(data)
      continue
    tree.append(entry.tree)
    if entry.sharding is not None:
      shardings.append(entry.sharding)
    if entry.array is not None:
      arrays.append(entry.array)
    if spec.zarray is not None:
      checksums[name] = batch.put(entry, np.asarray(data))
    else:
      opening = _open_array(kvstore / entry.prefix, spec, context, batch.txn)
      batch.add(opening, _pieces(data, spec))
    if batch.nbytes >= COMMIT_BYTES:
      batch.commit(futures, commits)
      batch = _Batch(kvstore)
  if batch.nbytes or batch.opens:
    batch.commit(futures, commits)
  if packed:
    futures.append(_packed.start(state_dir, packed))
  return Pending(
    state_dir, futures, commits, tree, shardings, arrays, started_ns, checksums, sorted(packed)
  )


def _described(name: str, value: Any, described: dict[str, jax.Array]) -> tuple[Any, Any, str]:
  """(what describes the leaf, what is written, its kind) for one snapshot entry."""
  if name in described:  # A view: described by its array, written from the view.
    return described[name], value, "jax.Array"  # (writes_all: a plain one.)
  kind = cast(str, _kind(value))
  if kind != "jax.Array":
    value = np.asarray(value, order="C")  # (ascontiguousarray: 0-d would be 1-d.)
  return value, value, kind


class _Batch:
  """Arrays written in one TensorStore transaction: one OCDBT commit."""

  def __init__(self, kvstore: ts.KvStore):
    self.txn = ts.Transaction()
    self.kv = kvstore.with_transaction(self.txn)
    self.opens: list[tuple[Any, list]] = []
    self.nbytes = 0

  def put(self, entry: _Entry, array: np.ndarray) -> int:
    """Writes a one-chunk array as the keys the zarr driver writes; returns the
    CRC-32 of its bytes. The writes' futures resolve with the commit, whose own
    future reports any failure."""
    data = array.tobytes()
    self.kv.write(entry.zarray_key, cast(bytes, entry.spec.zarray))
    self.kv.write(entry.chunk_key, data)
    self.nbytes += entry.spec.nbytes
    return crc32(data)

  def add(self, opening, pieces: list[tuple[Any, Any]]) -> None:
    self.opens.append((opening, pieces))
    self.nbytes += sum(array_nbytes(data) for _, data in pieces)

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
