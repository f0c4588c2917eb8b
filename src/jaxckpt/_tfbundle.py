"""TensorFlow's tensor bundles (``prefix.index`` + ``prefix.data-NNNNN-of-NNNNN``), without TF.

The format, from TensorFlow's ``core/util/tensor_bundle`` and ``core/lib/io/table*``:

- ``.index`` is a LevelDB-style table (uncompressed blocks, each followed by a
  type byte and a masked CRC-32C; a 48-byte footer ending in LevelDB's magic)
  mapping tensor names to protobuf messages: under the empty key a
  ``BundleHeaderProto`` (shard count, endianness), under every other key a
  ``BundleEntryProto`` (dtype, shape, data shard, offset, size, masked CRC-32C
  of the bytes, and for partitioned tensors the slices).
- Data shards hold each tensor's raw little-endian bytes at its offset. String
  tensors are varint64 lengths, a masked CRC-32C of the lengths, then the bytes.
- A partitioned tensor's slices are entries of their own, under keys that TF
  encodes with its ``OrderedCode`` (`slice_key`); the table has no other use
  for keys starting with a zero byte, so those are never listed as tensors.

Every damaged or truncated file raises `CorruptCheckpointError` naming the file
(index damage) or the tensor (data damage).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import stat
import struct

import google_crc32c
import ml_dtypes
import numpy as np
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message
from google.protobuf import message_factory

from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import UnsupportedTensorError
from jaxckpt._errors import _TableDamage

INDEX_SUFFIX = ".index"
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # Two varint block handles padded to 40 bytes, then the magic.
_TRAILER_SIZE = 5  # Block type byte + masked CRC-32C.
_MASK_DELTA = 0xA282EAD8

DT_STRING, DT_VARIANT = 7, 21
# TF's DataType enum → numpy; strings are object arrays of bytes, as TF's reader returns them.
_DTYPES: dict[int, np.dtype] = {
  1: np.dtype(np.float32),
  2: np.dtype(np.float64),
  3: np.dtype(np.int32),
  4: np.dtype(np.uint8),
  5: np.dtype(np.int16),
  6: np.dtype(np.int8),
  8: np.dtype(np.complex64),
  9: np.dtype(np.int64),
  10: np.dtype(np.bool_),
  14: np.dtype(ml_dtypes.bfloat16),
  17: np.dtype(np.uint16),
  18: np.dtype(np.complex128),
  19: np.dtype(np.float16),
  22: np.dtype(np.uint32),
  23: np.dtype(np.uint64),
}
_TF_NAMES = {DT_STRING: "string", DT_VARIANT: "variant", 20: "resource", 11: "qint8", 12: "quint8"}
_TF_NAMES.update({13: "qint32", 15: "qint16", 16: "quint16"})  # The others: numpy's names.


def tf_dtype_name(dtype: int) -> str:
  """TF's name for a DataType enum value (``tf.dtypes.DType.name``)."""
  known = _TF_NAMES.get(dtype) or (_DTYPES[dtype].name if dtype in _DTYPES else None)
  return known or f"DataType({dtype})"


def numpy_dtype(dtype: int) -> np.dtype:
  """The numpy dtype jaxckpt reads a TF dtype as (object for strings and the unreadable)."""
  return _DTYPES.get(dtype, np.dtype(object))


# -- protobuf messages, built at run time (TF's .proto files are not shipped in a package) --

_FIELD = descriptor_pb2.FieldDescriptorProto
_MESSAGES: dict[str, list[tuple[str, int, int, str | None, bool, int | None]]] = {
  # name: [(field, number, type, message type or None, repeated, oneof index or None)]
  "Dim": [("size", 1, _FIELD.TYPE_INT64, None, False, None)],
  "TensorShapeProto": [
    ("dim", 2, _FIELD.TYPE_MESSAGE, "Dim", True, None),
    ("unknown_rank", 3, _FIELD.TYPE_BOOL, None, False, None),
  ],
  "Extent": [
    ("start", 1, _FIELD.TYPE_INT64, None, False, None),
    ("length", 2, _FIELD.TYPE_INT64, None, False, 0),
  ],
  "TensorSliceProto": [("extent", 1, _FIELD.TYPE_MESSAGE, "Extent", True, None)],
  "BundleHeaderProto": [
    ("num_shards", 1, _FIELD.TYPE_INT32, None, False, None),
    ("endianness", 2, _FIELD.TYPE_INT32, None, False, None),  # An enum: LITTLE = 0, BIG = 1.
  ],
  "BundleEntryProto": [
    ("dtype", 1, _FIELD.TYPE_INT32, None, False, None),  # The DataType enum.
    ("shape", 2, _FIELD.TYPE_MESSAGE, "TensorShapeProto", False, None),
    ("shard_id", 3, _FIELD.TYPE_INT32, None, False, None),
    ("offset", 4, _FIELD.TYPE_INT64, None, False, None),
    ("size", 5, _FIELD.TYPE_INT64, None, False, None),
    ("crc32c", 6, _FIELD.TYPE_FIXED32, None, False, None),
    ("slices", 7, _FIELD.TYPE_MESSAGE, "TensorSliceProto", True, None),
  ],
}
_PACKAGE = "jaxckpt.tf"


@functools.cache
def proto(name: str) -> type[message.Message]:
  """The message class ``name`` (TF's wire format; only the fields jaxckpt reads)."""
  file = descriptor_pb2.FileDescriptorProto(
    name="jaxckpt/tf_checkpoint.proto", package=_PACKAGE, syntax="proto3"
  )
  for message_name, fields in _MESSAGES.items():
    described = file.message_type.add(name=message_name)
    for field, number, kind, type_name, repeated, oneof in fields:
      f = described.field.add(name=field, number=number, type=kind)
      f.label = _FIELD.LABEL_REPEATED if repeated else _FIELD.LABEL_OPTIONAL
      if type_name:
        f.type_name = f".{_PACKAGE}.{type_name}"
      if oneof is not None:
        if not described.oneof_decl:
          described.oneof_decl.add(name=f"has_{field}")
        f.oneof_index = oneof
  pool = descriptor_pool.DescriptorPool()  # Private: never clashes with TF's own, if loaded.
  pool.Add(file)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


# -- the table (LevelDB's format; no maintained Python reader of single table files exists) --


def _crc_mask(crc: int) -> int:
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
  """TF's ``crc32c::Unmask``: stored checksums are rotated and offset."""
  rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
  return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _varint(data: bytes, pos: int, limit: int) -> tuple[int, int]:
  """A LevelDB/protobuf varint at ``pos``; (value, next position). _TableDamage if cut off."""
  value = shift = 0
  while True:
    if pos >= limit or shift > 63:
      raise _TableDamage("a varint runs past its block")
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos += 1
    if byte < 0x80:
      return value, pos
    shift += 7


def _block(data: bytes, offset: int, size: int) -> bytes:
  if offset < 0 or size < 0 or offset + size + _TRAILER_SIZE > len(data):
    raise _TableDamage(f"a block at {offset} (+{size} bytes) lies past the end of the file")
  contents = data[offset : offset + size + 1]
  (stored,) = struct.unpack_from("<I", data, offset + size + 1)
  if google_crc32c.value(contents) != unmask(stored):
    raise _TableDamage(f"the block at byte {offset} fails its CRC-32C")
  if contents[-1] != 0:  # TF writes bundles uncompressed (tensor_bundle.cc).
    raise _TableDamage(f"the block at byte {offset} is compressed (type {contents[-1]})")
  return contents[:-1]


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
  if len(block) < 4:
    raise _TableDamage("a block is shorter than its restart count")
  (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
  limit = len(block) - 4 - 4 * restarts
  if limit < 0:
    raise _TableDamage("a block's restart array is longer than the block")
  entries, key, pos = [], b"", 0
  while pos < limit:
    shared, pos = _varint(block, pos, limit)
    unshared, pos = _varint(block, pos, limit)
    value_size, pos = _varint(block, pos, limit)
    if shared > len(key) or pos + unshared + value_size > limit:
      raise _TableDamage("an entry runs past its block")
    key = key[:shared] + block[pos : pos + unshared]
    pos += unshared
    entries.append((key, block[pos : pos + value_size]))
    pos += value_size
  return entries


def read_table(path: str) -> list[tuple[bytes, bytes]]:
  """All (key, value) pairs of a table file, in key order.

  Raises:
    CorruptCheckpointError: the file is truncated, fails a block CRC or is no table.
  """
  try:
    data = read_file(path)
  except OSError as e:
    raise CorruptCheckpointError(f"TF checkpoint index {path!r} cannot be read ({e}).")
  try:
    if len(data) < _FOOTER_SIZE:
      raise _TableDamage(f"{len(data)} bytes, shorter than a table footer ({_FOOTER_SIZE})")
    footer = len(data) - _FOOTER_SIZE
    if struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
      raise _TableDamage("no table magic number at its end (truncated, or not an index file)")
    _, pos = _varint(data, footer, footer + 40)  # The metaindex block: TF's is empty.
    _, pos = _varint(data, pos, footer + 40)
    index_offset, pos = _varint(data, pos, footer + 40)
    index_size, _ = _varint(data, pos, footer + 40)
    entries = []
    for _, handle in _block_entries(_block(data, index_offset, index_size)):
      offset, pos = _varint(handle, 0, len(handle))
      size, _ = _varint(handle, pos, len(handle))
      entries.extend(_block_entries(_block(data, offset, size)))
  except _TableDamage as e:
    raise CorruptCheckpointError(f"TF checkpoint index {path!r} is damaged: {e}.")
  return entries


def read_file(path: str, offset: int = 0, size: int | None = None) -> bytes:
  """``size`` bytes at ``offset`` (all, if None) of a regular file; short if it is shorter.

  Opened without blocking and checked to be a regular file: a FIFO planted in a
  checkpoint must not hang a read.

  Raises:
    OSError: the file is missing or unreadable; CorruptCheckpointError: not a regular file.
  """
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise CorruptCheckpointError(f"{path!r} is not a regular file.")
    available = max(0, info.st_size - offset)  # Never allocate what a bad entry claims.
    return os.pread(fd, available if size is None else min(size, available), offset)
  finally:
    os.close(fd)


# -- entries and data ---------------------------------------------------------------


def _num_increasing(value: int) -> bytes:
  raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
  return bytes([len(raw)]) + raw


def _signed_num_increasing(value: int) -> bytes:
  bits = (~value if value < 0 else value).bit_length()
  if bits < 7:
    return bytes([(0x80 ^ value) & 0xFF])
  length = (bits + 7) // 7  # n bytes hold [-2^(7n-1), 2^(7n-1)).
  header = (0xFFFF << (16 - length)) & 0xFFFF  # `length` leading one bits.
  encoded = bytearray(value.to_bytes(10, "big", signed=True)[-length:])
  encoded[0] ^= header >> 8
  encoded[1] ^= header & 0xFF
  return bytes(encoded)


def slice_key(name: str, extents: tuple[tuple[int, int], ...]) -> bytes:
  """TF's ``EncodeTensorNameSlice``: the table key of one slice of tensor ``name``."""
  escaped = name.encode().replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff")
  key = bytearray(b"\x00" + escaped + b"\x00\x01" + _num_increasing(len(extents)))
  for start, length in extents:
    key += _signed_num_increasing(start) + _signed_num_increasing(length)
  return bytes(key)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of a bundle; ``slices`` (start, length; -1: the whole dim) if partitioned."""

  key: str
  dtype: int
  shape: tuple[int, ...]
  shard_id: int
  offset: int
  size: int
  crc32c: int  # Masked, as stored.
  slices: tuple[tuple[tuple[int, int], ...], ...]

  @property
  def dtype_name(self) -> str:
    return tf_dtype_name(self.dtype)


def _parse_entry(index: str, key: str, value: bytes) -> Entry:
  entry = proto("BundleEntryProto")()
  try:
    entry.ParseFromString(value)
  except message.DecodeError as e:
    raise CorruptCheckpointError(f"TF checkpoint index {index!r}: entry {key!r} is damaged ({e}).")
  shape = tuple(d.size for d in entry.shape.dim)
  if entry.shape.unknown_rank or any(d < 0 for d in shape) or entry.size < 0 or entry.offset < 0:
    raise CorruptCheckpointError(
      f"TF checkpoint index {index!r}: entry {key!r} has an invalid shape {shape} or extent."
    )
  slices = tuple(
    tuple((e.start, e.length if e.HasField("length") else -1) for e in s.extent)
    for s in entry.slices
  )
  return Entry(
    key, entry.dtype, shape, entry.shard_id, entry.offset, entry.size, entry.crc32c, slices
  )


class Bundle:
  """A tensor bundle: its entries, read once from ``prefix.index``, and their values.

  Raises (constructor):
    CorruptCheckpointError: the index is damaged or its header unusable.
    UnsupportedTensorError: the bundle is big-endian.
  """

  def __init__(self, prefix: str):
    self.prefix = prefix
    self.index = prefix + INDEX_SUFFIX
    pairs = read_table(self.index)
    if not pairs or pairs[0][0] != b"":
      raise CorruptCheckpointError(f"TF checkpoint index {self.index!r} has no header entry.")
    header = proto("BundleHeaderProto")()
    try:
      header.ParseFromString(pairs[0][1])
    except message.DecodeError as e:
      raise CorruptCheckpointError(f"TF checkpoint index {self.index!r}: bad header ({e}).")
    if header.num_shards < 1:
      raise CorruptCheckpointError(
        f"TF checkpoint index {self.index!r}: num_shards is {header.num_shards}, expected >= 1."
      )
    if header.endianness != 0:
      raise UnsupportedTensorError(
        f"TF checkpoint {prefix!r} was written on a big-endian machine; only "
        "little-endian checkpoints are supported."
      )
    self.num_shards = header.num_shards
    self._raw = {key: value for key, value in pairs[1:]}
    self.entries: dict[str, Entry] = {}
    for key, value in pairs[1:]:
      if key.startswith(b"\x00"):
        continue  # A slice of a partitioned tensor (slice_key), read through its tensor.
      try:
        name = key.decode()
      except UnicodeDecodeError:
        raise CorruptCheckpointError(f"TF checkpoint index {self.index!r}: key {key!r} is no name.")
      self.entries[name] = _parse_entry(self.index, name, value)

  def data_file(self, shard_id: int) -> str:
    return f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}"

  def read(self, name: str, copy: bool = True) -> np.ndarray:
    """The value of tensor ``name``, checked against its CRC-32C(s).

    ``copy=False`` may return a read-only array over the bytes read (one copy
    fewer, for values that are copied onto devices anyway).

    Raises:
      KeyError: no such tensor. CorruptCheckpointError: its data is missing,
        truncated or fails its checksum (the message names the tensor).
      UnsupportedTensorError: a dtype jaxckpt cannot represent (variant, resource, quantized).
    """
    entry = self.entries[name]
    if entry.slices:
      return self._assemble(entry)
    value = self._read_entry(name, entry)
    return value.copy() if copy and not value.flags.writeable else value

  def _read_entry(self, name: str, entry: Entry) -> np.ndarray:
    if entry.dtype != DT_STRING and entry.dtype not in _DTYPES:
      raise UnsupportedTensorError(
        f"Tensor {name!r} of TF checkpoint {self.prefix!r} has dtype {entry.dtype_name}, "
        "which jaxckpt cannot read (TF's own reader returns none either for variants)."
      )
    if not 0 <= entry.shard_id < self.num_shards:
      raise _damaged(
        self.prefix, name, f"shard {entry.shard_id} of {self.num_shards} does not exist"
      )
    count = math.prod(entry.shape)
    if entry.dtype != DT_STRING and entry.size != count * _DTYPES[entry.dtype].itemsize:
      raise _damaged(self.prefix, name, f"{entry.size} bytes stored for shape {entry.shape}")
    if entry.dtype == DT_STRING and entry.size < count + 4:  # A length byte each, and the CRC.
      raise _damaged(self.prefix, name, f"{entry.size} bytes cannot hold {count} strings")
    path = self.data_file(entry.shard_id)
    try:
      data = read_file(path, entry.offset, entry.size)
    except OSError as e:
      raise _damaged(self.prefix, name, f"its data file {path!r} cannot be read ({e})")
    if len(data) != entry.size:
      raise _damaged(self.prefix, name, f"{path!r} ends {entry.size - len(data)} bytes short")
    if entry.dtype == DT_STRING:
      return self._strings(name, entry, data, count)
    if google_crc32c.value(data) != unmask(entry.crc32c):
      raise _damaged(self.prefix, name, f"its {entry.size} bytes in {path!r} fail their CRC-32C")
    # Read-only, over `data`: google_crc32c checks only immutable bytes, so no buffer is reused.
    return np.frombuffer(data, _DTYPES[entry.dtype]).reshape(entry.shape)

  def _strings(self, name: str, entry: Entry, data: bytes, count: int) -> np.ndarray:
    # [varint64 lengths][masked CRC-32C of the lengths as uint32 (uint64 if larger)][bytes];
    # the entry's CRC covers the lengths (as integers), the length CRC and the bytes.
    lengths, pos, crc = [], 0, 0
    try:
      for _ in range(count):
        length, pos = _varint(data, pos, len(data))
        lengths.append(length)
        crc = google_crc32c.extend(crc, struct.pack("<I" if length <= 0xFFFFFFFF else "<Q", length))
    except _TableDamage:
      raise _damaged(self.prefix, name, "its string lengths run past its data")
    if pos + 4 + sum(lengths) != len(data):
      raise _damaged(self.prefix, name, "its string lengths do not add up to its stored size")
    (length_crc,) = struct.unpack_from("<I", data, pos)
    if unmask(length_crc) != crc:
      raise _damaged(self.prefix, name, "its string lengths fail their CRC-32C")
    crc = google_crc32c.extend(crc, data[pos : pos + 4])
    pos += 4
    out = np.empty(count, dtype=object)
    for i, length in enumerate(lengths):
      out[i] = data[pos : pos + length]
      pos += length
    crc = google_crc32c.extend(crc, data[pos - sum(lengths) : pos])
    if crc != unmask(entry.crc32c):
      raise _damaged(self.prefix, name, "its strings fail their CRC-32C")
    return out.reshape(entry.shape)

  def _assemble(self, entry: Entry) -> np.ndarray:
    """A partitioned tensor from its slices (TF's ``GetSliceValue`` for the full slice).

    The slices are read first: the whole tensor is allocated only once the data
    on disk can fill it, whatever shape a damaged index claims.
    """
    parts = []
    for extents in entry.slices:
      index = _slice_index(self.prefix, entry, extents)
      raw = self._raw.get(slice_key(entry.key, extents))
      if raw is None:
        raise _damaged(self.prefix, entry.key, f"its slice {_spec(extents)} is not in the index")
      part = _parse_entry(self.index, entry.key, raw)
      want = tuple(len(range(*s.indices(n))) for s, n in zip(index, entry.shape, strict=True))
      if part.shape != want or part.dtype != entry.dtype:
        raise _damaged(self.prefix, entry.key, f"slice {_spec(extents)} holds shape {part.shape}")
      parts.append((index, self._read_entry(f"{entry.key}[{_spec(extents)}]", part)))
    if sum(value.size for _, value in parts) < math.prod(entry.shape):
      raise _damaged(self.prefix, entry.key, "its slices do not cover the whole tensor")
    out = np.empty(entry.shape, numpy_dtype(entry.dtype))
    covered = np.zeros(entry.shape, dtype=bool)
    for index, value in parts:
      out[index] = value
      covered[index] = True
    if not covered.all():
      raise _damaged(self.prefix, entry.key, "its slices do not cover the whole tensor")
    return out


def _slice_index(prefix: str, entry: Entry, extents: tuple[tuple[int, int], ...]) -> tuple:
  """The numpy index of one slice, checked to lie inside the tensor."""
  if len(extents) != len(entry.shape):
    raise _damaged(prefix, entry.key, f"slice {_spec(extents)} does not match shape {entry.shape}")
  index = []
  for (start, length), dim in zip(extents, entry.shape, strict=True):
    if length == -1 and start == 0:
      index.append(slice(None))
    elif start >= 0 and length >= 0 and start + length <= dim:
      index.append(slice(start, start + length))
    else:
      raise _damaged(prefix, entry.key, f"slice {_spec(extents)} lies outside {entry.shape}")
  return tuple(index)


def _damaged(prefix: str, name: str, what: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(f"Tensor {name!r} of TF checkpoint {prefix!r}: {what}.")


def _spec(extents: tuple[tuple[int, int], ...]) -> str:
  """TF's slice notation: ``0,3:-`` (start,length per dim; ``-`` the whole dim)."""
  return ":".join("-" if length == -1 else f"{start},{length}" for start, length in extents)
