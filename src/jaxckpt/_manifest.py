"""jaxckpt's own metadata inside each checkpoint (``<ckpt>/jaxckpt/metadata``).

The layout holds the arrays (``<ckpt>/state``, or a ``data-...`` prefix on a
key-value store); the manifest records what jaxckpt adds: format version,
``save_counter``, each leaf's name, shape, dtype, Python kind and CRC-32
(plus incremental sources), and the values that are not arrays (strings, big
ints, objects' states: see _values.py), exactly. Its presence at the final
path is the commit marker on every store (see _store.py). docs/format.md
specifies the schema; this is the only module that parses it.
Since format version 2 it carries a sha256 of its own canonical JSON, checked on
every read, so a changed byte is an error rather than a silently different leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any

import jax

from jaxckpt import _knobs
from jaxckpt import _values
from jaxckpt._errors import CheckpointNotFoundError
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import JaxckptError
from jaxckpt._errors import NotACheckpointError
from jaxckpt._gcpause import paused
from jaxckpt._store import fspath
from jaxckpt._store import store_for
from jaxckpt._tree import Leaf
from jaxckpt._tree import dtype_name


@dataclasses.dataclass(frozen=True)
class LeafInfo:
  shape: tuple[int, ...]
  dtype: str
  kind: str  # "jax", "numpy", "bool", "int" or "float"


@dataclasses.dataclass(frozen=True)
class ValueInfo:
  """A value stored in the manifest itself (see _values.py)."""

  kind: str  # _values.VALUE, STATE or GENERATOR
  data: Any  # Its tagged JSON.
  shape: tuple[int, ...] = ()

  def value(self) -> Any:
    return _values.decode(self.data)


_INFOS: dict[tuple, LeafInfo] = {}


def _leaf_info(leaf: Leaf) -> LeafInfo:
  """The leaf's `LeafInfo`; for plain jax.Arrays one shared object per shape and
  dtype (a model's thousands of leaves have a few dozen)."""
  value = leaf.value
  if leaf.key_impl is not None or leaf.value_kind is not None or not isinstance(value, jax.Array):
    return LeafInfo(leaf.shape, dtype_name(leaf.dtype), leaf.kind)
  key = (value.shape, value.dtype)
  info = _INFOS.get(key)
  if info is None:
    if len(_INFOS) > 4096:
      _INFOS.clear()
    info = _INFOS[key] = LeafInfo(tuple(value.shape), dtype_name(value.dtype), "jax")
  return info


def _timestamp(value: Any, where: str) -> float:
  created = float(value)
  if not 0 <= created < 1e11:  # NaN, inf and far-future times fail here, not in a caller.
    raise CorruptCheckpointError(
      f"{where} is a damaged jaxckpt manifest: created={value!r} is not a Unix time."
    )
  return created


@dataclasses.dataclass(frozen=True)
class Manifest:
  version: int
  save_counter: int
  kind: str  # "save" or "write"
  created: float
  leaves: dict[str, LeafInfo]
  # CRC-32 of each leaf's stored bytes; None where not computed (multi-process).
  checksums: dict[str, int | None] = dataclasses.field(default_factory=dict)
  # Incremental saves: leaf name -> path (relative to this checkpoint) of the
  # checkpoint holding its bytes; absent when this checkpoint holds them.
  sources: dict[str, str] = dataclasses.field(default_factory=dict)
  digests: dict[str, str | None] = dataclasses.field(default_factory=dict)
  # Where the arrays are: None for the Orbax item ``state`` (local paths), else
  # the zarr v3 data prefix of a key-value-store checkpoint (see _store.py).
  data: str | None = None
  # Arrays no process held whole: CRC-32 per stored shard, keyed by its slice.
  shard_checksums: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  # False for a `write` by a Checkpoint whose counter does not exist yet (TF
  # creates ``save_counter`` on first save/restore): no counter value is stored.
  counter_saved: bool = True
  values: dict[str, ValueInfo] = dataclasses.field(default_factory=dict)
  # The full original key path of each name that escapes a key's '/' or '.' (_tree.py).
  key_paths: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  # Leaves in the file of small arrays, ``state/checkpoint`` (_packed.py; version 3).
  packed: frozenset[str] = frozenset()

  @functools.cached_property
  def packed_arrays(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(name, shape, dtype) of each packed leaf, sorted: one object per manifest,
    which `_packed.layout` recognizes without hashing it."""
    return tuple(sorted((n, self.leaves[n].shape, self.leaves[n].dtype) for n in self.packed))

  @property
  def names(self) -> set[str]:
    """Every name in the checkpoint: arrays and values."""
    return set(self.leaves) | set(self.values)

  @classmethod
  def build(
    cls,
    leaves: list[Leaf],
    *,
    save_counter: int,
    kind: str,
    checksums: dict[str, int | None] | None = None,
    sources: dict[str, str] | None = None,
    digests: dict[str, str | None] | None = None,
    data: str | None = None,
    shard_checksums: dict[str, dict[str, int]] | None = None,
    counter_saved: bool = True,
    packed: Any = (),
  ) -> Manifest:
    packed = frozenset(packed)
    return cls(
      # Version 3 only where it is needed: earlier readers read the rest.
      version=_knobs.FORMAT_VERSION if packed else 2,
      packed=packed,
      save_counter=save_counter,
      kind=kind,
      created=time.time(),
      leaves={l.name: _leaf_info(l) for l in leaves if not l.is_value},
      values={l.name: ValueInfo(l.kind, l.value, l.shape) for l in leaves if l.is_value},
      key_paths={l.name: l.keys for l in leaves if l.keys is not None},
      checksums=checksums or {},
      sources=sources or {},
      digests=digests or {},
      data=data,
      shard_checksums=shard_checksums or {},
      counter_saved=counter_saved,
    )

  def to_json(self) -> dict[str, Any]:
    out = {
      "format": "jaxckpt",
      "version": self.version,
      "save_counter": self.save_counter,
      "kind": self.kind,
      "created": self.created,
      "leaves": {n: self._leaf_json(n, i) for n, i in self.leaves.items()},
    }
    if self.values:
      out["values"] = {
        n: {"kind": v.kind, "shape": list(v.shape), "value": v.data, **self._keys_json(n)}
        for n, v in self.values.items()
      }
    if self.data is not None:
      out["data"] = self.data
    if not self.counter_saved:
      out["save_counter_saved"] = False
    return out

  def _keys_json(self, name: str) -> dict[str, Any]:
    keys = self.key_paths.get(name)
    return {} if keys is None else {"key_path": list(keys)}

  def _leaf_json(self, name: str, info: LeafInfo) -> dict[str, Any]:
    out: dict[str, Any] = {
      "shape": list(info.shape),
      "dtype": info.dtype,
      "kind": info.kind,
      "crc32": self.checksums.get(name),
    }
    if name in self.sources:
      out["source"] = self.sources[name]
    if self.digests.get(name):
      out["sha1"] = self.digests[name]
    if self.shard_checksums.get(name):
      out["shard_crc32"] = self.shard_checksums[name]
    if name in self.packed:
      out["packed"] = True
    keys = self.key_paths.get(name)
    if keys is not None:
      out["key_path"] = list(keys)
    return out

  @classmethod
  def from_json(cls, data: dict[str, Any], where: str) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != "jaxckpt":
      raise NotACheckpointError(f"{where} is not a jaxckpt manifest.")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > _knobs.FORMAT_VERSION:
      raise NotACheckpointError(
        f"{where} has format version {version!r}; this jaxckpt reads versions "
        f"<= {_knobs.FORMAT_VERSION}. Upgrade jaxckpt to read it."
      )
    parsed = {n: _leaf(where, n, i) for n, i in _field(data, "leaves", dict, where).items()}
    values, key_paths = _values_and_key_paths(data, where)
    return cls(
      version=version,
      save_counter=_field(data, "save_counter", int, where),
      kind=_field(data, "kind", str, where),
      created=_timestamp(_field(data, "created", (int, float), where), where),
      leaves={n: p[0] for n, p in parsed.items()},
      checksums={n: p[1] for n, p in parsed.items()},
      sources={n: p[2] for n, p in parsed.items() if p[2]},
      digests={n: p[3] for n, p in parsed.items()},
      data=_field(data, "data", str, where, optional=True),
      counter_saved=data.get("save_counter_saved", True) is not False,
      shard_checksums={n: p[4] for n, p in parsed.items() if p[4]},
      values=values,
      key_paths=key_paths,
      packed=frozenset(n for n, p in parsed.items() if p[5]),
    )


def _values_and_key_paths(data: dict[str, Any], where: str) -> tuple[dict[str, ValueInfo], dict]:
  """The manifest's non-array values and each entry's tree key path."""
  values = _field(data, "values", dict, where, optional=True) or {}
  try:
    key_paths = {
      n: tuple(str(k) for k in i["key_path"])
      for n, i in [*data["leaves"].items(), *values.items()]
      if "key_path" in i
    }
    return _values_from_json(values), key_paths
  except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
    raise CorruptCheckpointError(
      f"{where} is a damaged jaxckpt manifest: its values or key paths are unreadable "
      f"({type(e).__name__}: {e}). Restore an earlier checkpoint."
    ) from e


def _damaged(where: str, field: str, expected: str, got: Any) -> CorruptCheckpointError:
  return CorruptCheckpointError(
    f"{where} is a damaged jaxckpt manifest: field '{field}' should be "
    f"{expected}, got {got!r:.80}. Restore an earlier checkpoint."
  )


def _field(data: Any, key: str, types, where: str, *, at: str = "", optional: bool = False) -> Any:
  """``data[key]`` checked against ``types``: a missing or mistyped field raises
  `CorruptCheckpointError` naming it (a bare KeyError would escape the CLI)."""
  field = f"{at}.{key}" if at else key
  if not isinstance(data, dict):
    raise _damaged(where, at, "an object", data)
  if key not in data or (optional and data[key] is None):
    if optional:
      return None
    raise _damaged(where, field, "present", "nothing")
  value = data[key]
  if isinstance(value, bool) or not isinstance(value, types):  # JSON true is no number.
    names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
    raise _damaged(where, field, f"of type {names}", value)
  return value


def _leaf(where: str, name: Any, info: Any) -> tuple:
  """One leaf's (LeafInfo, crc32, source, sha1, shard_crc32, packed), each field type-checked."""
  at = f'leaves["{name}"]'
  if not isinstance(name, str) or not name:
    raise _damaged(where, "leaves", "keyed by non-empty names", name)
  shape = _field(info, "shape", list, where, at=at)
  if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or (
    math.prod(shape) >= 1 << 60  # numpy refuses larger arrays with a bare ValueError.
  ):
    raise _damaged(where, f"{at}.shape", "a list of non-negative integers", shape)
  dtype = _field(info, "dtype", str, where, at=at)
  try:
    jax.numpy.dtype(dtype)
  except TypeError as e:
    raise _damaged(where, f"{at}.dtype", "a dtype name", dtype) from e
  crc = _field(info, "crc32", int, where, at=at, optional=True)
  if crc is not None and not 0 <= crc < 1 << 32:
    raise _damaged(where, f"{at}.crc32", "a CRC-32", crc)
  shards = _field(info, "shard_crc32", dict, where, at=at, optional=True) or {}
  for key in shards:
    _field(shards, key, int, where, at=f"{at}.shard_crc32")
  source = _field(info, "source", str, where, at=at, optional=True)
  packed = info.get("packed")  # (_field takes no bools.)
  if packed is not None and (packed is not True or source is not None):
    raise _damaged(where, f"{at}.packed", "true, and only without a source", packed)
  return (
    LeafInfo(tuple(shape), dtype, _field(info, "kind", str, where, at=at)),
    crc,
    source,
    _field(info, "sha1", str, where, at=at, optional=True),
    shards,
    packed is True,
  )


def _values_from_json(data: dict[str, Any]) -> dict[str, ValueInfo]:
  out = {}
  for name, entry in data.items():
    info = ValueInfo(str(entry["kind"]), entry["value"], tuple(entry.get("shape", ())))
    info.value()  # A damaged value fails here, as a damaged manifest.
    out[name] = info
  return out


MANIFEST_KEY = f"{_knobs.MANIFEST_ITEM}/metadata"  # Where Orbax's JSON handler would put it.
RETIRED_SUFFIX = ".retired"  # A swept incremental checkpoint still read from (_incremental.py).


def manifest_file(path: str) -> str:
  return store_for(path).join(path, MANIFEST_KEY)


def is_committed(path: str | os.PathLike | None) -> bool:
  if path is None:
    return False
  path = os.fspath(path)
  return store_for(path).is_file(manifest_file(path))


CHECKSUM_FIELD = "sha256"  # Of the canonical JSON of every other field (format version >= 2).


def _canonical(body: dict[str, Any]) -> str:
  # Sorted keys, no spaces: the digest survives a parse and re-encode.
  return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _body_digest(body: dict[str, Any]) -> str:
  return hashlib.sha256(_canonical(body).encode()).hexdigest()


def digest(manifest: Manifest) -> str:
  """The manifest's checksum, as `seal` writes it: its identity across processes."""
  with paused():  # A dict per leaf, freed at once (see _gcpause.py).
    return _body_digest(manifest.to_json())


def seal(body: dict[str, Any]) -> bytes:
  """The manifest file for the JSON ``body``: the body plus its own checksum.

  The file is the canonical JSON itself with the checksum appended: one
  encoding, not two (a manifest of thousands of leaves took a tenth of a save).
  """
  body = {k: v for k, v in body.items() if k != CHECKSUM_FIELD}
  canonical = _canonical(body)
  digest = hashlib.sha256(canonical.encode()).hexdigest()
  sep = "," if len(canonical) > 2 else ""  # ("{}": no member to follow.)
  return f'{canonical[:-1]}{sep}"{CHECKSUM_FIELD}":"{digest}"}}'.encode()


def encode(manifest: Manifest) -> tuple[str, bytes]:
  """The commit marker: (key inside the checkpoint, bytes)."""
  with paused():  # A dict per leaf, freed at once (see _gcpause.py).
    return MANIFEST_KEY, seal(manifest.to_json())


def _check_digest(parsed: dict[str, Any], where: str) -> None:
  """A flipped byte anywhere in the manifest (a leaf name, a dtype, a CRC's key)
  fails here, instead of restoring some leaves and silently skipping others.
  Version 1 manifests carry no checksum and are read as before."""
  version = parsed.get("version")
  digest = parsed.pop(CHECKSUM_FIELD, None)
  if not isinstance(version, int) or isinstance(version, bool):
    version = None  # from_json says what is wrong with it.
  if version is not None and (version > _knobs.FORMAT_VERSION or (version < 2 and digest is None)):
    return  # Newer: from_json asks for an upgrade. Older: written before checksums.
  if not isinstance(digest, str) or digest != _body_digest(parsed):
    raise CorruptCheckpointError(
      f"{where!r} is a damaged jaxckpt manifest: its {CHECKSUM_FIELD} checksum "
      f"{'is missing' if digest is None else 'does not match its contents'}. "
      "Restore an earlier checkpoint; `jaxckpt verify` checks the others."
    )


def _parse(data: bytes, where: str) -> Manifest:
  with paused():  # Objects per leaf: see _gcpause.py.
    return _parse_json(data, where)


def _parse_json(data: bytes, where: str) -> Manifest:
  try:
    parsed = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise NotACheckpointError(f"{where!r} is not valid JSON: {e}.") from e
  if not isinstance(parsed, dict) or parsed.get("format") != "jaxckpt":
    raise NotACheckpointError(f"{where!r} is not a jaxckpt manifest.")
  _check_digest(parsed, where)
  try:
    return Manifest.from_json(parsed, where)
  except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
    if isinstance(e, JaxckptError):
      raise
    raise CorruptCheckpointError(
      f"{where!r} is a damaged jaxckpt manifest ({type(e).__name__}: {e})."
    ) from e


def data_of(path: str) -> str | None:
  """The data prefix the committed manifest at ``path`` names (None if none)."""
  data = store_for(path).read_bytes(manifest_file(path))
  try:
    return None if data is None else _parse(data, path).data
  except JaxckptError:
    return None


def sources_of(path: str) -> set[str]:
  """The ``source`` paths (relative to ``path``) of a committed or retired manifest."""
  store = store_for(path)
  for name in (manifest_file(path), manifest_file(path) + RETIRED_SUFFIX):
    data = store.read_bytes(name)
    if data is not None:
      try:
        return set(_parse(data, name).sources.values())
      except (JaxckptError, KeyError, TypeError, ValueError):
        return set()
  return set()


def _not_found(path: str) -> CheckpointNotFoundError:
  store = store_for(path)
  hint = ""
  parent, base = store.dirname(path), store.basename(path)
  numbered = sorted(
    (n for n in store.names(parent) if n.startswith(base + "-") and n[len(base) + 1 :].isdigit()),
    key=lambda n: int(n[len(base) + 1 :]),
  )
  if numbered:
    hint = (
      f" save() appends '-N' to the prefix: did you mean "
      f"'{store.join(parent, numbered[-1])}'? "
      f"jaxckpt.latest_checkpoint({parent!r}) finds the newest."
    )
  if store.read_bytes(store.join(path, _knobs.STATE_FILE_NAME)) is not None:
    hint = (
      f" {path!r} is a directory of checkpoints; pass jaxckpt.latest_checkpoint({path!r}) instead."
    )
  return CheckpointNotFoundError(f"No checkpoint found at {path!r}.{hint}")


def read_manifest(path: str | os.PathLike) -> Manifest:
  """Reads the manifest of the committed checkpoint at ``path``.

  Raises:
    CheckpointNotFoundError: nothing is at ``path`` (hints the ``-N`` suffix).
    NotACheckpointError: something is there but it is not a committed jaxckpt
      checkpoint (or it is from a newer format).
  """
  path = fspath(path)
  store = store_for(path)
  file = manifest_file(path)
  data = store.read_bytes(file)
  if data is not None:
    return _parse(data, file)
  if (
    not store.exists(path) or store.read_bytes(store.join(path, _knobs.STATE_FILE_NAME)) is not None
  ):
    raise _not_found(path)
  raise NotACheckpointError(
    f"{path!r} exists but is not a committed jaxckpt checkpoint (no {MANIFEST_KEY} "
    "inside): an interrupted save, or not a jaxckpt checkpoint. If it is a plain "
    "Orbax checkpoint, restore it with orbax.checkpoint directly."
  )
