"""Checkpoints on TensorStore key-value stores: ``memory://``, ``s3://``, ``gs://``.

Orbax 0.12 cannot write these (its paths go through ``etils.epath``, which has
no ``memory://`` and needs fsspec/s3fs for ``s3://``, and its TensorStore spec
builder knows only local files and ``gs://``: an ``s3://`` path becomes a local
``s3:/...`` directory). Object stores also have no atomic rename. So for URLs
jaxckpt writes through TensorStore itself, with a commit protocol that needs no
rename:

* every array goes to a zarr v3 array under a fresh prefix
  ``<ckpt>/data-<uuid>/<leaf name>/`` (one chunk per device shard, each shard
  written by TensorStore directly from its buffer);
* only when all writes succeeded is the manifest ``<ckpt>/jaxckpt/metadata``
  written: one object PUT, atomic on S3/GCS/memory. It names the data prefix.
  A checkpoint exists iff its manifest does; readers follow only the prefix it
  names, so a crashed save's data is invisible (and is deleted by the next
  `CheckpointManager` on that directory);
* overwriting (``write`` to an existing path) writes new data, replaces the
  manifest, then deletes the old data; deleting removes the manifest first.

The TF state file ``<dir>/checkpoint`` is one more object. ``s3://`` takes its
endpoint from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (TensorStore itself
ignores those), region from ``AWS_REGION``/``AWS_DEFAULT_REGION`` and
credentials from the environment (or TensorStore's default chain). ``gs://``
uses TensorStore's ``gcs`` driver, as Orbax does.
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from jaxckpt import _knobs
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import InvalidPathError
from jaxckpt._errors import _ArrayReadError as ArrayReadError

SCHEMES = ("memory://", "s3://", "gs://")

# One context for the process: memory:// contents live in it (two contexts see
# two different stores), and it shares connection pools for s3/gcs.
_CONTEXT = ts.Context()


def is_url(path: Any) -> bool:
  return isinstance(path, str) and path.startswith(SCHEMES)


def normalize(url: str) -> str:
  """``url`` without trailing slashes (``memory://`` itself stays as it is)."""
  scheme, rest = url.split("://", 1)
  return f"{scheme}://{rest.rstrip('/')}"


def join(url: str, *parts: str) -> str:
  scheme, rest = url.split("://", 1)
  if scheme != "memory" and not rest.strip("/"):
    raise InvalidPathError(f"{url!r} names no bucket: use {scheme}://BUCKET/path.")
  names = [p.strip("/") for p in (rest, *parts) if p.strip("/")]
  return f"{scheme}://" + "/".join(names)


def dirname(url: str) -> str:
  scheme, rest = url.split("://", 1)
  head = rest.rstrip("/").rpartition("/")[0]
  return f"{scheme}://{head}"


def basename(url: str) -> str:
  return url.rstrip("/").rpartition("/")[2]


def _split(url: str) -> tuple[dict, str]:
  """(root kvstore spec, key) for a URL."""
  scheme, rest = url.split("://", 1)
  if scheme == "memory":
    return {"driver": "memory"}, rest.strip("/")
  bucket, _, key = rest.partition("/")
  if not bucket:
    raise InvalidPathError(f"{url!r} names no bucket: use {scheme}://BUCKET/path.")
  if scheme == "gs":
    return {"driver": "gcs", "bucket": bucket}, key.strip("/")
  spec: dict[str, Any] = {"driver": "s3", "bucket": bucket}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  if endpoint:
    spec["endpoint"] = endpoint
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    spec["aws_region"] = region
  if os.environ.get("AWS_ACCESS_KEY_ID"):  # Else TensorStore's default chain.
    spec["aws_credentials"] = {"type": "environment"}
  return spec, key.strip("/")


@functools.lru_cache(maxsize=64)
def _open_root(spec_json: str) -> ts.KvStore:
  return ts.KvStore.open(json.loads(spec_json), context=_CONTEXT).result()


def _root(url: str) -> tuple[ts.KvStore, dict, str]:
  spec, key = _split(url)
  return _open_root(json.dumps(spec, sort_keys=True)), spec, key


def read_bytes(url: str) -> bytes | None:
  """The object's bytes, or None if it does not exist."""
  kv, _, key = _root(url)
  result = kv.read(key).result()
  return bytes(result.value) if result.state == "value" else None


def write_bytes(url: str, data: bytes) -> None:
  kv, _, key = _root(url)
  kv.write(key, data).result()


def _range(prefix: str) -> ts.KvStore.KeyRange:
  prefix = prefix.rstrip("/") + "/"
  return ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")  # "0" sorts right after "/".


def delete_prefix(url: str) -> None:
  """Deletes every object under ``url/``."""
  kv, _, key = _root(url)
  kv.delete_range(_range(key)).result()


def children(url: str) -> set[str]:
  """Names directly under ``url/`` (TensorStore lists every key below it)."""
  kv, _, key = _root(url)
  start = len(key.rstrip("/")) + 1 if key else 0
  names = set()
  for k in kv.list(_range(key) if key else ts.KvStore.KeyRange()).result():
    names.add(k.decode()[start:].split("/", 1)[0])
  return names


def exists_prefix(url: str) -> bool:
  return bool(children(url))


# -- arrays ---------------------------------------------------------------------


def new_data_name() -> str:
  """``data-<unix time, hex>-<random>``: the time tells `remove_leftovers` whether
  a save may still be writing it."""
  return f"data-{int(time.time()):x}-{uuid.uuid4().hex[:12]}"


def _age_s(data_name: str) -> float:
  """Seconds since `new_data_name` made ``data_name`` (inf for names without a time)."""
  parts = data_name.split("-")
  try:
    return time.time() - int(parts[1], 16) if len(parts) == 3 else float("inf")
  except ValueError:
    return float("inf")


def _array_spec(url: str, name: str) -> dict:
  _, spec, key = _root(url)
  return {"driver": "zarr3", "kvstore": {**spec, "path": f"{key}/{name}/"}}


def _chunks(value: Any) -> tuple[int, ...] | None:
  """One chunk per device shard: from the sharding, so every process (each
  writing its own shards into the same array) agrees and no two processes ever
  write the same chunk object."""
  if isinstance(value, jax.Array) and value.ndim:
    return tuple(max(1, d) for d in value.sharding.shard_shape(value.shape))
  return None


def _schema(value: Any, compression: bool) -> dict[str, Any]:
  codecs = [{"name": "bytes"}] + ([{"name": "zstd", "configuration": {"level": 1}}]
                                 if compression else [])
  dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
  schema: dict[str, Any] = {"dtype": dtype.name, "domain": {"shape": list(np.shape(value))},
                            "codec": {"driver": "zarr3", "codecs": codecs}}
  chunks = _chunks(value)
  if chunks is not None:
    schema["chunk_layout"] = {"chunk": {"shape": list(chunks)}}
  return schema


def create_arrays(url: str, values: dict[str, Any], *, compression: bool) -> dict[str, Any]:
  """Creates (writes the metadata of) one zarr v3 array per value; returns the stores.

  With several processes only one creates; the others `open_arrays` after it.
  """
  # delete_existing: the prefix is fresh, so nothing is lost, and the
  # metadata write is unconditional. TensorStore's conditional create
  # ("only if absent") retried forever when S3 answered 404 NoSuchBucket
  # (seen with moto); the unconditional one fails at once with that error.
  opening = {name: ts.open({**_array_spec(url, name), "schema": _schema(value, compression)},
                           create=True, delete_existing=True, context=_CONTEXT)
             for name, value in values.items()}
  return {name: future.result() for name, future in opening.items()}


def open_arrays(url: str, names) -> dict[str, Any]:
  opening = {name: ts.open(_array_spec(url, name), open=True, context=_CONTEXT)
             for name in names}
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


def read_arrays(url: str, names: list[str]) -> dict[str, np.ndarray]:
  """Reads the zarr v3 arrays ``names`` under ``url``, all reads in flight at once."""
  opened = {name: ts.open(_array_spec(url, name), open=True, context=_CONTEXT)
            for name in names}
  reads = {}
  for name, future in opened.items():
    try:
      reads[name] = future.result().read()
    except Exception as e:
      raise ArrayReadError(name, e) from e
  out = {}
  for name, future in reads.items():
    try:
      out[name] = future.result()
    except Exception as e:
      raise ArrayReadError(name, e) from e
  return out


# -- deleting -------------------------------------------------------------------

MANIFEST_KEY = "jaxckpt/metadata"  # = _manifest.manifest_file's layout.


def remove_checkpoint(url: str) -> None:
  """Deletes a checkpoint: its manifest first (so it stops existing), then the rest."""
  kv, _, key = _root(join(url, MANIFEST_KEY))
  kv.write(key, None).result()
  delete_prefix(url)


def remove_leftovers(directory: str) -> list[str]:
  """Deletes data prefixes no manifest names (interrupted or overwritten saves).

  An object store has no locks to tell a crashed save's data from that of a
  save still writing in another process (say the training job, seen by an
  evaluator's `CheckpointManager`), and deleting the latter would make that
  save commit a manifest naming deleted data. So prefixes younger than
  ``_knobs.KV_LEFTOVER_AGE_S`` are left for a later sweep. (A save that fails
  deletes its own data; only crashed processes leave any.) Returns what it
  deleted.
  """
  removed = []
  for name in sorted(children(directory)):
    entries = children(join(directory, name)) if name != "checkpoint" else set()
    data = {e for e in entries if e.startswith("data-")}
    if not data:
      continue
    manifest = read_bytes(join(directory, name, MANIFEST_KEY))
    live = json.loads(manifest).get("data") if manifest is not None else None
    for prefix in sorted(data - {live}):
      if _age_s(prefix) < _knobs.KV_LEFTOVER_AGE_S:
        continue
      delete_prefix(join(directory, name, prefix))
      removed.append(f"{name}/{prefix}")
  return removed


def read_sharded(url: str, name: str, shape, sharding, dtype) -> jax.Array:
  """Reads array ``name`` straight into ``sharding``: each process reads only the
  slices its devices hold (for arrays no process holds whole)."""
  try:
    store = ts.open(_array_spec(url, name), open=True, context=_CONTEXT).result()
    if tuple(store.shape) != tuple(shape):
      raise CorruptCheckpointError(f"stored shape {tuple(store.shape)}, expected {tuple(shape)}")
    return jax.make_array_from_callback(
        tuple(shape), sharding,
        lambda index: np.asarray(store[index].read().result(), dtype=dtype))
  except Exception as e:
    raise ArrayReadError(name, e) from e
