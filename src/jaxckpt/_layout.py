"""How a checkpoint's arrays are laid out: the Orbax PyTree layout, or zarr v3 on a kvstore.

A `Layout` writes a snapshot into a save's data directory (returning a pending
write), reads named leaves back, and describes what it stored. Two exist:

* `ORBAX_LAYOUT` (local paths): ``<ckpt>/state`` is a plain Orbax PyTree
  checkpoint, so ``ocp.StandardCheckpointer().restore(f"{path}/state")`` reads
  it. Written by jaxckpt's TensorStore writer (`_fastwrite`) when the plan says
  so, else by Orbax's ``AsyncCheckpointer`` (compression, incremental, several
  processes); read by `_fastread` where it can, else by Orbax.
* `ZARR3_LAYOUT` (``memory://``, ``s3://``, ``gs://``): one zarr v3 array per
  leaf under the data prefix the manifest names (`_zarr3`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxckpt import _bounds
from jaxckpt import _compat
from jaxckpt import _fastread
from jaxckpt import _fastwrite
from jaxckpt import _knobs
from jaxckpt import _packed
from jaxckpt import _zarr3
from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import JaxckptError
from jaxckpt._errors import _ArrayReadError as ArrayReadError
from jaxckpt._manifest import Manifest
from jaxckpt._multihost import timed_out
from jaxckpt._store import KV
from jaxckpt._store import Store
from jaxckpt._tree import Leaf
from jaxckpt._tree import nest


@dataclasses.dataclass(frozen=True)
class Reader:
  """Who reads: all processes (default), or one process reading whole arrays to
  host memory for the others (``host_only``; see _routed.py)."""

  processes: frozenset[int] | None = None  # None: Orbax's defaults (one process).
  primary: int = 0
  host_only: bool = False
  key_prefix: str | None = None  # Unique per operation: Orbax reuses barrier names.
  timeout_s: float | None = None  # Bounds Orbax's barriers (several processes).


ONE_PROCESS = Reader()


@dataclasses.dataclass
class Read:
  """What a layout read: ``raw`` values in the stored dtype, ``placed`` values
  already in their target sharding, and the names whose CRC-32 matched."""

  raw: dict[str, Any] = dataclasses.field(default_factory=dict)
  placed: dict[str, Any] = dataclasses.field(default_factory=dict)
  verified: set[str] = dataclasses.field(default_factory=set)


class _Done:
  def wait(self) -> None:
    pass


def stored_dtype(manifest: Manifest, name: str) -> np.dtype:
  return np.dtype(jax.numpy.dtype(manifest.leaves[name].dtype))


class Layout(abc.ABC):
  """Writes snapshots into, and reads leaves from, one on-disk layout."""

  has_fast_writer = False

  @abc.abstractmethod
  def write(self, job: Any, data_dir: str) -> Any:
    """Starts writing ``job.snapshot`` under ``data_dir``; returns an object whose
    ``wait()`` finishes the write (raising its error)."""

  @abc.abstractmethod
  def read(
    self,
    path: str,
    manifest: Manifest,
    wanted: list[Leaf],
    *,
    io_device: jax.Device | None,
    reader: Reader,
    verify_checksums: bool,
  ) -> Read:
    """Reads ``wanted`` (present in ``manifest``) from the checkpoint at ``path``."""

  def describe(self, path: str, manifest: Manifest) -> dict[str, str]:
    """Each array's sharding at save time, where the layout records it."""
    return {}


def new_checkpointer(*, compression: bool, coordination: Any = None) -> ocp.AsyncCheckpointer:
  """Orbax's engine: a Composite whose ``state`` item is a PyTree of the arrays.

  With several processes its barriers go through the coordination service
  (``active_processes`` set; Orbax's default barrier is an XLA collective, which
  from the save thread could interleave with the training step's collectives
  and deadlock), under the save's own key prefix and with its timeout.
  Directories are made synchronously (on jaxckpt's save thread anyway): with
  Orbax's asynchronous creation, a save that fails early (e.g. a zero-size
  array) leaves a non-daemon thread waiting for the directory signal until its
  timeout, which holds up interpreter exit.
  """
  mp = coordination.orbax_options() if coordination is not None else None
  timeout: dict[str, Any] = {}
  if coordination is not None:
    timeout["timeout_secs"] = max(1, int(coordination.timeout_s))
  async_options = ocp.AsyncOptions(create_directories_asynchronously=False, **timeout)
  extra: dict[str, Any] = {}
  if coordination is not None:  # Also for the handlers: they pick who writes metadata.
    extra["multiprocessing_options"] = mp
    if coordination.writers is not None:  # One process writes whole numpy arrays.
      extra["type_handler_registry"] = _compat.registry_writing_on(coordination.primary)
  composite = ocp.CompositeOptions(async_options=async_options)
  if mp is not None:
    composite = ocp.CompositeOptions(async_options=async_options, multiprocessing_options=mp)
  handler = ocp.CompositeCheckpointHandler(
    composite_options=composite,
    **{_knobs.STATE_ITEM: ocp.PyTreeCheckpointHandler(use_compression=compression, **extra)},
  )
  if mp is None:
    return ocp.AsyncCheckpointer(handler, async_options=async_options)
  return ocp.AsyncCheckpointer(handler, multiprocessing_options=mp, async_options=async_options)


class _OrbaxPending:
  """An Orbax save in flight; its engine is closed once it is finished."""

  def __init__(self, checkpointer: ocp.AsyncCheckpointer, scope: contextlib.ExitStack):
    self._checkpointer, self._scope = checkpointer, scope

  def wait(self) -> None:
    with self._scope:  # Orbax's background thread counts bytes until it finishes.
      try:
        self._checkpointer.wait_until_finished()  # With several processes: all shards.
      finally:
        try:  # Its own (later) error, e.g. a barrier timeout, must not mask the first.
          self._checkpointer.close()
        except Exception:
          pass


class OrbaxLayout(Layout):
  """``<ckpt>/state``: a plain Orbax PyTree checkpoint (see the module docstring)."""

  has_fast_writer = True

  def write(self, job: Any, data_dir: str) -> Any:
    plan, snapshot = job.plan, job.snapshot
    coord = plan.coordination
    if not snapshot:  # Orbax refuses an empty PyTree; a Checkpoint may track nothing.
      if coord is None or coord.is_primary:
        os.makedirs(data_dir, exist_ok=True)
      return _Done()
    if plan.writer == "fast":
      return _fastwrite.start(
        os.path.join(data_dir, _knobs.STATE_ITEM),
        snapshot,
        chunk_byte_size=plan.chunk_byte_size,
        described=job.described,
        pack=plan.pack,
      )
    tree = nest(snapshot)
    save_args = None
    if plan.chunk_byte_size is not None:
      save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=plan.chunk_byte_size), tree)
    scope = contextlib.ExitStack()
    scope.enter_context(_compat.stop_metrics_leak())
    pending = _OrbaxPending(
      new_checkpointer(compression=plan.compression, coordination=coord), scope
    )
    try:
      # Returns once Orbax has the data on the host; TensorStore writes continue.
      pending._checkpointer.save(
        data_dir,
        args=ocp.args.Composite(
          **{_knobs.STATE_ITEM: ocp.args.PyTreeSave(tree, save_args=save_args)}
        ),
      )
    except BaseException:
      pending.wait()
      raise
    return pending

  def read(
    self,
    path: str,
    manifest: Manifest,
    wanted: list[Leaf],
    *,
    io_device: jax.Device | None,
    reader: Reader,
    verify_checksums: bool,
  ) -> Read:
    out = _read_packed(path, manifest, [l for l in wanted if l.name in manifest.packed])
    wanted = [l for l in wanted if l.name not in manifest.packed]
    for holder, group in _by_holder(path, manifest, wanted).items():
      if holder != path and not os.path.isdir(os.path.join(holder, _knobs.STATE_ITEM)):
        raise CorruptCheckpointError(
          f"Checkpoint {path!r} is incremental and reads '{group[0].name}' (and "
          f"{len(group) - 1} more) from {holder!r}, which no longer exists. Delete "
          "checkpoints through CheckpointManager, which keeps such data."
        )
      values, matched = _read_group(holder, manifest, group, io_device, reader, verify_checksums)
      out.raw.update(values)
      out.verified |= matched
    return out

  def describe(self, path: str, manifest: Manifest) -> dict[str, str]:
    packed = dict.fromkeys(manifest.packed, f"packed ({_knobs.STATE_ITEM}/{_packed.FILE})")
    try:
      tree = (
        ocp.PyTreeCheckpointer()
        .metadata(os.path.join(os.path.abspath(path), _knobs.STATE_ITEM))
        .item_metadata.tree
      )
    except Exception:  # Sharding is informative only; an empty checkpoint has none.
      return packed
    out: dict[str, str] = {}

    def walk(node, prefix):
      if isinstance(node, dict):
        for k, v in node.items():
          walk(v, f"{prefix}/{k}" if prefix else k)
      else:
        out[prefix] = _describe_sharding(getattr(node, "sharding", None))

    walk(tree, "")
    return out | packed


def _read_packed(path: str, manifest: Manifest, wanted: list[Leaf]) -> Read:
  """The packed leaves (_packed.py): read by every process that wants them, as
  host arrays, whoever reads the rest."""
  out = Read()
  if not wanted:
    return out
  try:
    out.raw, crcs = _packed.read(
      os.path.join(path, _knobs.STATE_ITEM), manifest.packed_arrays, [l.name for l in wanted]
    )
  except CorruptCheckpointError as e:
    raise CorruptCheckpointError(f"Checkpoint {path!r} is unreadable: {e}") from e
  out.verified = {name for name, crc in crcs.items() if manifest.checksums.get(name) == crc}
  return out


def _describe_sharding(sharding) -> str:
  if sharding is None:
    return "host (numpy / scalar)"
  if getattr(sharding, "device_str", None):
    return f"single device {sharding.device_str}"
  spec = getattr(sharding, "partition_spec", None)
  if spec is not None:
    # Plain ints: Orbax's metadata holds numpy ints, whose repr is np.int64(2).
    mesh = {name: int(n) for name, n in zip(sharding.axis_names, sharding.shape, strict=False)}
    return f"mesh {mesh} spec {tuple(spec)}"
  return type(sharding).__name__


def _by_holder(path: str, manifest: Manifest, wanted: list[Leaf]) -> dict[str, list[Leaf]]:
  """Leaves by the checkpoint holding their bytes: ``path`` itself, or (incremental)
  a sibling checkpoint in the same directory; never anything else."""
  parent = os.path.dirname(os.path.abspath(path))
  groups: dict[str, list[Leaf]] = {}
  for leaf in wanted:
    source = manifest.sources.get(leaf.name)
    holder = os.path.normpath(os.path.join(path, source)) if source else path
    if source and (
      os.path.dirname(os.path.abspath(holder)) != parent
      or os.path.abspath(holder) == os.path.abspath(path)
    ):
      raise CorruptCheckpointError(
        f"Checkpoint {path!r} names {source!r} as the holder of '{leaf.name}'; only a "
        "sibling checkpoint in the same directory can hold its data."
      )
    groups.setdefault(holder, []).append(leaf)
  return groups


def target_sharding(leaf: Leaf) -> jax.sharding.Sharding:
  sharding = getattr(leaf.value, "sharding", None)  # None on unsharded abstract leaves.
  return sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])


def is_uncommitted(leaf: Leaf) -> bool:
  # An array JAX placed by default (not device_put to a device) is "uncommitted";
  # handing back a committed one would make every jitted step recompile once.
  return isinstance(leaf.value, jax.Array) and not leaf.value.committed


# Uncommitted arrays at least this big are read as device arrays and then
# uncommitted without a copy; smaller ones as numpy, then copied (Orbax's
# per-array cost for jax.Array restores is higher than for numpy).
_DEVICE_READ_MIN_BYTES = 4 << 20


def _restore_args(leaf: Leaf, dtype: np.dtype, io_device: jax.Device | None, reader: Reader):
  if reader.host_only:
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
  # Not with several processes either: each has its own default device.
  numpy_read = is_uncommitted(leaf) and (
    jax.process_count() > 1 or leaf.nbytes < _DEVICE_READ_MIN_BYTES
  )
  if isinstance(leaf.value, (jax.Array, jax.ShapeDtypeStruct)) and not numpy_read:
    sharding = (
      jax.sharding.SingleDeviceSharding(io_device)
      if io_device is not None
      else target_sharding(leaf)
    )
    return ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, global_shape=leaf.shape)
  return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)


_NO_AGGREGATE = "jaxckpt-reads-packed-arrays-itself"  # A file name no checkpoint holds.


def _orbax_read(
  path: str, manifest: Manifest, leaves: list[Leaf], io_device: jax.Device | None, reader: Reader
) -> dict[str, Any]:
  item = nest(
    {l.name: jax.ShapeDtypeStruct(l.shape, stored_dtype(manifest, l.name)) for l in leaves}
  )
  restore_args = nest(
    {l.name: _restore_args(l, stored_dtype(manifest, l.name), io_device, reader) for l in leaves}
  )
  # Packed leaves are read by _packed; a handler that saw their file would
  # take Orbax's legacy path, which has no partial restore.
  blind = {"aggregate_filename": _NO_AGGREGATE}
  if reader.processes is None:
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**blind))
  else:  # Orbax's default barrier is an XLA collective; see _multihost.py.
    mp = ocp.options.MultiprocessingOptions(
      primary_host=reader.primary,
      active_processes=set(reader.processes),
      barrier_sync_key_prefix=reader.key_prefix,
    )
    checkpointer = ocp.Checkpointer(
      ocp.PyTreeCheckpointHandler(multiprocessing_options=mp, **blind),
      multiprocessing_options=mp,
    )
  bounded = (
    _compat.orbax_barrier_timeout(reader.timeout_s)
    if reader.timeout_s is not None
    else contextlib.nullcontext()
  )
  with _compat.stop_metrics_leak(), bounded, checkpointer:
    restored = checkpointer.restore(
      os.path.abspath(os.path.join(path, _knobs.STATE_ITEM)),
      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
  out = {}
  for leaf in leaves:
    node = restored
    for part in leaf.name.split("/"):
      node = node[part]
    if isinstance(node, jax.ShapeDtypeStruct):  # Orbax's partial restore hands the template back.
      raise CorruptCheckpointError(
        f"Checkpoint {path!r} is corrupt: its manifest lists array '{leaf.name}', "
        "which its data does not hold."
      )
    out[leaf.name] = node
  return out


def _read_group(
  path: str,
  manifest: Manifest,
  wanted: list[Leaf],
  io_device: jax.Device | None,
  reader: Reader,
  verify_checksums: bool,
) -> tuple[dict[str, Any], set[str]]:
  """Reads ``wanted`` from the checkpoint at ``path`` (its own, or an incremental
  holder's); returns the values and the names whose CRC-32 already matched."""
  fast: dict[str, Any] = {}
  verified: set[str] = set()
  if io_device is None and reader == ONE_PROCESS:  # One process, default devices.
    fast, crcs = _fastread.read(
      os.path.join(path, _knobs.STATE_ITEM),
      [(l.name, l.shape, stored_dtype(manifest, l.name)) for l in wanted],
      checksums=verify_checksums,
    )
    for name, crc in crcs.items():
      expected = manifest.checksums.get(name)
      if expected == crc:
        verified.add(name)
      elif expected is not None:
        # Orbax reads it again, so a fast-path misread cannot pass for a
        # corrupt checkpoint; truly corrupt data then fails its CRC there.
        del fast[name]
  wanted = [l for l in wanted if l.name not in fast]
  if wanted:
    _bounds.check_chunks(path, manifest, [l.name for l in wanted])
    fast.update(_orbax_read_named(path, manifest, wanted, io_device, reader))
  return fast, verified


def _orbax_read_named(
  path: str, manifest: Manifest, wanted: list[Leaf], io_device: jax.Device | None, reader: Reader
) -> dict[str, Any]:
  try:
    return _orbax_read(path, manifest, wanted, io_device, reader)
  except JaxckptError:
    raise
  except Exception as batch_error:
    if reader.processes is not None:  # Each retry would wait at Orbax's barriers again.
      if timed_out(batch_error):
        raise
      raise CorruptCheckpointError(
        f"Checkpoint {path!r} could not be read on process {jax.process_index()}: one of "
        f"{', '.join(repr(l.name) for l in wanted[:5])}{' …' if len(wanted) > 5 else ''} "
        f"failed to load ({type(batch_error).__name__}: {batch_error})."
      ) from batch_error
    # Name the broken array: TensorStore's error names a chunk key at best.
    for leaf in wanted:
      try:
        _orbax_read(path, manifest, [leaf], io_device, reader)
      except Exception as e:
        raise CorruptCheckpointError(
          f"Checkpoint {path!r} is unreadable: array '{leaf.name}' failed to load "
          f"({type(e).__name__}: {e})."
        ) from e
    raise CorruptCheckpointError(
      f"Checkpoint {path!r} could not be read ({type(batch_error).__name__}: {batch_error})."
    ) from batch_error


def _global_target(leaf: Leaf) -> jax.sharding.Sharding | None:
  """The sharding of a tracked value that spans several processes, else None."""
  sharding = getattr(leaf.value, "sharding", None)
  if (
    isinstance(leaf.value, (jax.Array, jax.ShapeDtypeStruct))
    and sharding is not None
    and not sharding.is_fully_addressable
  ):
    return sharding
  return None


class Zarr3Layout(Layout):
  """zarr v3 arrays under the manifest's data prefix (see _zarr3.py)."""

  def write(self, job: Any, data_dir: str) -> Any:
    coord = job.plan.coordination
    primary = coord is None or coord.is_primary
    if primary:
      stores = _zarr3.create_arrays(data_dir, job.snapshot, compression=job.plan.compression)
    if coord is not None and coord.writers is None:  # Several processes write.
      coord.barrier("created")
      if not primary:
        stores = _zarr3.open_arrays(data_dir, job.snapshot)
    _zarr3.write_arrays(stores, job.snapshot, host_values=primary)
    return _Done()

  def read(
    self,
    path: str,
    manifest: Manifest,
    wanted: list[Leaf],
    *,
    io_device: jax.Device | None,
    reader: Reader,
    verify_checksums: bool,
  ) -> Read:
    data = manifest.data
    if data is None or not KV.is_data_name(data):
      raise CorruptCheckpointError(
        f"Checkpoint {path!r} names {data!r} as its data; only a data-* prefix "
        "inside the checkpoint can hold it."
      )
    url = KV.join(path, data)
    # Arrays no single process will hold whole, without a CRC to check: each
    # process reads just its shards. The rest are read whole (and CRC-checked).
    partial = (
      []
      if reader.host_only
      else [
        l
        for l in wanted
        if _global_target(l) is not None
        and (manifest.checksums.get(l.name) is None or not verify_checksums)
      ]
    )
    out = Read()
    try:
      out.placed = {
        l.name: _zarr3.read_sharded(url, l.name, l.shape, _global_target(l), l.dtype)
        for l in partial
      }
      out.raw = _zarr3.read_arrays(
        url,
        {l.name: manifest.leaves[l.name].shape for l in wanted if l.name not in out.placed},
      )
    except ArrayReadError as e:
      raise CorruptCheckpointError(f"Checkpoint {path!r} is unreadable: {e}.") from e
    return out


ORBAX_LAYOUT = OrbaxLayout()
ZARR3_LAYOUT = Zarr3Layout()


def layout_for_store(store: Store) -> Layout:
  """The layout new checkpoints get in ``store``: Orbax's needs an atomic rename."""
  return ORBAX_LAYOUT if store.renames else ZARR3_LAYOUT


def layout_of(manifest: Manifest) -> Layout:
  """The layout a committed checkpoint was written in."""
  return ORBAX_LAYOUT if manifest.data is None else ZARR3_LAYOUT
