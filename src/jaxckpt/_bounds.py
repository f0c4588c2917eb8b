"""Bounded reads: an array's stored chunk grid is checked against the manifest before
TensorStore decodes anything.

TensorStore decodes a zarr v2 chunk into a buffer of the chunk size its
``.zarray`` names, stopping there (a zstd chunk that inflates further fails),
so a chunk can never allocate more than its declared size. What bounds that
size is the ``.zarray`` itself: one whose ``chunks`` exceed the array's shape
would let a 32 KiB chunk inflate to gigabytes. jaxckpt and Orbax write chunks
no larger than the array, so anything else is refused as corrupt, as is a
``shape`` other than the manifest's.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tensorstore as ts

from jaxckpt import _knobs
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._manifest import Manifest


def _zarr_metadata(path: str, keys: list[str]) -> dict[str, bytes | None]:
  """Each ``{key}/.zarray`` in the checkpoint's OCDBT database (None where absent);
  {} where ``state`` is not an OCDBT database (Orbax then reads, or says why not)."""
  state = os.path.abspath(os.path.join(path, _knobs.STATE_ITEM))
  try:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
    reads = {k: kv.read(f"{k}/.zarray") for k in keys}
    return {k: r.result().value if r.result().state == "value" else None for k, r in reads.items()}
  except Exception:  # Not OCDBT (or unreadable): nothing to bound here.
    return {}


def check_chunks(path: str, manifest: Manifest, names: list[str]) -> None:
  """Raises `CorruptCheckpointError` if an array's stored ``shape`` is not the
  manifest's or its ``chunks`` exceed it.

  Args:
    path: the checkpoint (or incremental holder) whose ``state`` holds the arrays.
    manifest: the manifest that lists them (their shapes).
    names: the leaves about to be read through Orbax.
  """
  keys = {name.replace("/", "."): name for name in names}  # Orbax joins keys with '.'.
  for key, raw in _zarr_metadata(path, list(keys)).items():
    if raw is None:
      continue
    name = keys[key]
    shape = list(manifest.leaves[name].shape)
    try:
      meta: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise _bad(path, name, f"its .zarray is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("zarr_format") != 2:
      continue  # Not zarr v2: TensorStore validates what it cannot decode.
    chunks = meta.get("chunks")
    if meta.get("shape") != shape:
      raise _bad(path, name, f"its stored shape {meta.get('shape')!r:.80} is not {shape}")
    if (
      not isinstance(chunks, list)
      or len(chunks) != len(shape)
      or not all(
        isinstance(c, int) and 0 < c <= max(s, 1) for c, s in zip(chunks, shape, strict=True)
      )
    ):
      raise _bad(path, name, f"its chunks {chunks!r:.80} exceed its shape {shape}")


def check_opened(store: Any, shape: tuple[int, ...]) -> None:
  """The same bound for an opened zarr v3 TensorStore (key-value-store checkpoints):
  its shape must be ``shape`` and its read and write chunks no larger."""
  if tuple(store.shape) != tuple(shape):
    raise CorruptCheckpointError(f"stored shape {tuple(store.shape)}, expected {tuple(shape)}")
  layout = store.chunk_layout
  for kind, chunk in (("read", layout.read_chunk.shape), ("write", layout.write_chunk.shape)):
    if chunk is not None and not all(0 < c <= max(s, 1) for c, s in zip(chunk, shape, strict=True)):
      raise CorruptCheckpointError(
        f"its {kind} chunks {tuple(chunk)} exceed its shape {tuple(shape)}; nothing was decoded"
      )


def _bad(path: str, name: str, what: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(
    f"Checkpoint {path!r} is corrupt: array '{name}': {what}; nothing was decoded. "
    "Restore an earlier checkpoint."
  )
