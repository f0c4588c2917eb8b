"""Every use of private JAX, Orbax, TensorStore and CPython internals, each with a public fallback.

jaxckpt's fast paths lean on internals that no release promises to keep:
batched array copies and sharding layouts inside JAX, Orbax's chunk-grid and
numpy-writer logic, the format of ``ts.ocdbt.dump``'s output, an early atexit
hook of ``threading``. They all live here, so that a moved internal costs speed,
never ``import jaxckpt``:

* each internal is a `_Feature`, found once and by feature (import,
  ``hasattr``), never by version string; the private imports run inside the
  finders, on first use;
* when a feature is missing, or its call raises what an API change raises
  (``TypeError``, ``AttributeError``), the public fallback takes over for the
  rest of the process, after exactly one WARNING on logger ``"jaxckpt"`` that
  names what is lost. Any other error falls back for that call (same WARNING,
  once); the public path then raises the real error if there is one;
* `fast_paths` says which private paths are in use; tests/test_compat.py fails
  if one of them silently stops being taken on the pinned versions.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from jaxckpt._errors import CoordinationError
from jaxckpt._errors import SaveError
from jaxckpt._errors import _FastReadUnsupported

logger = logging.getLogger("jaxckpt")

_UNSET = object()
_API_CHANGED = (TypeError, AttributeError, ImportError)  # What a changed signature raises.


class _Feature:
  """One private fast path: what `find` returns (None: not there) and what its fallback loses."""

  def __init__(self, name: str, what: str, lost: str, find: Callable[[], Any]):
    self.name, self.what, self.lost, self.find = name, what, lost, find
    self._lock = threading.Lock()
    self.reset()

  def reset(self) -> None:
    self._found: Any = _UNSET
    self._why = "not found"
    self._broken = False
    self._warned = False

  def _lookup(self) -> Any:
    found = self._found
    if found is _UNSET:
      try:
        found = self.find()
      except Exception as e:  # A finder that breaks is a feature that is not there.
        self._why = f"{type(e).__name__}: {e}"
        found = None
      self._found = found
    return None if self._broken else found

  def available(self) -> bool:
    return self._lookup() is not None

  def get(self) -> Any:
    """The private object, or None (after the one WARNING) when the fallback is taken."""
    found = self._lookup()
    if found is None:
      self._warn(self._why)
    return found

  def failed(self, error: BaseException, *, api_changed: bool = False) -> None:
    """The private call raised: the caller takes the fallback, from now on if the
    API changed (``api_changed``, or an error that says so)."""
    why = f"{type(error).__name__}: {error}"
    if api_changed or isinstance(error, _API_CHANGED):
      self._broken, self._why = True, why
      self._warn(why)
    else:
      self._warn(f"{why}; tried again on later calls")

  def _warn(self, reason: str) -> None:
    with self._lock:
      if self._warned:
        return
      self._warned = True
    logger.warning("%s is unavailable (%s); %s.", self.what, reason, self.lost)


_FEATURES: dict[str, _Feature] = {}


def _feature(name: str, what: str, lost: str) -> Callable[[Callable[[], Any]], Callable]:
  """Registers the decorated finder as feature ``name`` (see `_Feature`)."""

  def register(find: Callable[[], Any]) -> Callable[[], Any]:
    _FEATURES[name] = _Feature(name, what, lost, find)
    return find

  return register


def fast_paths() -> dict[str, bool]:
  """Which private fast paths this process takes, by name (logs no WARNING)."""
  return {name: feature.available() for name, feature in _FEATURES.items()}


def clear_caches() -> None:
  """Forgets what was found, lost and warned about (for tests)."""
  for feature in _FEATURES.values():
    feature.reset()
  _addressable_devices.cache_clear()


# -- JAX: snapshots ---------------------------------------------------------


@_feature(
  "shard_args",
  "JAX's pxla.shard_args",
  "snapshots use jax.device_put instead (slower save(): more Python per array)",
)
def _find_shard_args():
  from jax._src.interpreters import pxla
  from jax._src.lib import xla_client as xc

  return pxla.shard_args, xc.ArrayCopySemantics.ALWAYS_COPY


@_feature(
  "batched_copy",
  "JAX's xla_client.batched_copy_array_to_devices_with_sharding",
  "async snapshots use JAX's shard_args or jax.device_put instead (slower save())",
)
def _find_batched_copy():
  from jax._src.lib import xla_client as xc

  if not hasattr(jax.sharding.Sharding, "_internal_device_list"):
    return None
  return xc.batched_copy_array_to_devices_with_sharding, xc.ArrayCopySemantics.ALWAYS_COPY


def _any_deleted(values: list[jax.Array]) -> bool:
  return any(v.is_deleted() for v in values)


def copy_arrays(values: list[jax.Array], targets: list[jax.sharding.Sharding]) -> list[jax.Array]:
  """New arrays with ``values``' data in ``targets``; issued, not waited for.

  JAX's batched ``shard_args`` (what ``jax.device_put`` ends in) skips
  ``device_put``'s per-array Python, which is on save()'s blocking path.
  """
  found = None if _any_deleted(values) else _FEATURES["shard_args"].get()
  if found is not None:
    shard_args, always_copy = found
    n = len(values)
    try:
      return list(shard_args(targets, [None] * n, [always_copy] * n, values))
    except Exception as e:
      _FEATURES["shard_args"].failed(e)
  return jax.device_put(values, targets, may_alias=False)  # Deleted arrays: JAX's own error.


@functools.lru_cache(maxsize=1024)
def _addressable_devices(sharding: jax.sharding.Sharding):
  return sharding._internal_device_list.addressable_device_list


def copy_in_place(values: list[jax.Array], targets: list[jax.sharding.Sharding]) -> list[jax.Array]:
  """`copy_arrays` for fully addressable arrays whose targets are their own
  shardings, maybe in another memory kind: straight to the batched C++ copy
  ``shard_args`` ends in, without its per-array Python checks (sharding
  comparisons and hashing), which dominate save()'s blocked time for states of
  many arrays."""
  found = None if _any_deleted(values) else _FEATURES["batched_copy"].get()
  if found is not None:
    batched_copy, always_copy = found
    try:
      return list(
        batched_copy(
          values, [_addressable_devices(t) for t in targets], targets, [always_copy] * len(values)
        )
      )
    except Exception as e:
      _FEATURES["batched_copy"].failed(e)
  return copy_arrays(values, targets)


@_feature(
  "host_put",
  "JAX's xla_client.batched_device_put",
  "restores place each small array through jax.device_put (~25 µs more per array)",
)
def _find_host_put():
  from jax._src import core
  from jax._src.lib import xla_client as xc

  put = getattr(xc, "batched_device_put", None)
  return None if put is None else (put, core.ShapedArray)


@functools.lru_cache(maxsize=256)
def _canonical(dtype: np.dtype) -> bool:
  return np.dtype(jax.dtypes.canonicalize_dtype(dtype)) == dtype  # int64 without x64: no.


def put_host_arrays(
  values: list[np.ndarray], shardings: list[jax.sharding.Sharding] | None
) -> list[jax.Array]:
  """``jax.device_put(values, shardings)`` for numpy arrays (``shardings=None``:
  ``jax.device_put(values)``, uncommitted on the default device).

  C-ordered arrays with one-device targets go straight to the C++ call
  ``jax.device_put`` ends in, without its ~25 µs of Python per array (most of a
  restore of thousands of small arrays); the others through jax.device_put.
  """
  committed = shardings is not None
  if shardings is None:  # Where jax.device_put(value) puts it: the default device.
    shardings = [jax.device_put(np.zeros((), np.int8)).sharding] * len(values)
  found = _FEATURES["host_put"].get()
  out: list[Any] = [None] * len(values)
  rest = []
  if found is not None:
    put, shaped = found
    try:
      for i, (value, sharding) in enumerate(zip(values, shardings, strict=True)):
        if (
          type(sharding) is jax.sharding.SingleDeviceSharding
          and _canonical(value.dtype)
          and value.flags.c_contiguous
        ):
          aval = shaped(value.shape, value.dtype)
          out[i] = put(aval, sharding, [value], [*sharding.device_set], committed)
        else:
          rest.append(i)
    except Exception as e:
      _FEATURES["host_put"].failed(e)
      rest = list(range(len(values)))
  else:
    rest = list(range(len(values)))
  if rest:
    if committed:
      placed = jax.device_put([values[i] for i in rest], [shardings[i] for i in rest])
    else:
      placed = jax.device_put([values[i] for i in rest])
    for i, array in zip(rest, placed, strict=True):
      out[i] = array
  return out


# -- JAX: shardings and arrays ------------------------------------------------


@_feature(
  "hlo_sharding",
  "JAX's Sharding._to_xla_hlo_sharding",
  "staging buffers are reused only for equal shardings (fewer reuses on CPU)",
)
def _find_hlo_sharding():
  return True if hasattr(jax.sharding.Sharding, "_to_xla_hlo_sharding") else None


def sharding_layout(sharding: jax.sharding.Sharding, ndim: int) -> Any:
  """What XLA sees of ``sharding`` for an ``ndim``-dimensional array (hashable;
  equal for equal layouts even where the shardings differ), or None."""
  if _FEATURES["hlo_sharding"].get() is None:
    return None
  try:
    return sharding._to_xla_hlo_sharding(ndim)
  except NotImplementedError:  # A sharding type without it.
    return None
  except Exception as e:
    _FEATURES["hlo_sharding"].failed(e)
    return None


@_feature(
  "device_assignment",
  "JAX's Sharding._device_assignment",
  "only NamedSharding and SingleDeviceSharding arrays get staging buffers",
)
def _find_device_assignment():
  return True if hasattr(jax.sharding.Sharding, "_device_assignment") else None


def device_assignment(sharding: jax.sharding.Sharding) -> tuple[jax.Device, ...] | None:
  """The devices of ``sharding`` in XLA's order, or None where that is unknown."""
  if _FEATURES["device_assignment"].get() is not None:
    try:
      return tuple(sharding._device_assignment)
    except NotImplementedError:  # A sharding type without it: the public cases below.
      pass
    except Exception as e:
      _FEATURES["device_assignment"].failed(e)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return tuple(sharding.mesh.devices.flat)
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return tuple(sharding.device_set)
  return None


@_feature(
  "uncommit",
  "JAX's jax._src.array.ArrayImpl constructor",
  "restored uncommitted arrays are copied once more (slower restore())",
)
def _find_uncommit():
  from jax._src.array import ArrayImpl

  return ArrayImpl if hasattr(ArrayImpl, "_arrays") else None


def uncommitted(value: jax.Array) -> jax.Array:
  """``value`` as an uncommitted array, sharing its buffers (no copy).

  JAX has no public way to drop the "committed" flag; the public fallback,
  ``device_put`` of a numpy copy, copies every byte once more (TensorStore's
  numpy output is 16-byte aligned, and JAX aliases only 64-byte-aligned host
  memory).
  """
  array_impl = _FEATURES["uncommit"].get()
  if array_impl is not None and isinstance(value, array_impl):
    try:
      return array_impl(value.aval, value.sharding, value._arrays, committed=False)
    except Exception as e:
      _FEATURES["uncommit"].failed(e)
  return jax.device_put(np.asarray(value))


@_feature(
  "distributed_client",
  "JAX's jax._src.distributed.global_state",
  "multi-process saves cannot reach the coordination service and fail",
)
def _find_distributed_client():
  from jax._src.distributed import global_state  # The only handle JAX offers.

  return global_state if hasattr(global_state, "client") else None


def distributed_client() -> Any:
  """The ``jax.distributed`` client, or None when ``jax.distributed`` is not initialized.

  Raises:
    CoordinationError: it is initialized but this JAX offers no handle on its client.
  """
  state = _FEATURES["distributed_client"].get()
  if state is not None:
    return state.client
  if not jax.distributed.is_initialized():
    return None
  raise CoordinationError(
    "jax.distributed is initialized but this JAX version offers no handle "
    "on its client (jax._src.distributed.global_state); jaxckpt's "
    "multi-process saves need it."
  )


# -- CPython ------------------------------------------------------------------


@_feature(
  "early_atexit",
  "CPython's threading._register_atexit",
  "async saves still pending at interpreter exit are joined by a plain atexit hook, "
  "which runs after concurrent.futures refuses new work: those saves may fail",
)
def _find_early_atexit():
  return getattr(threading, "_register_atexit", None)


def register_early_atexit(fn: Callable[[], None]) -> None:
  """Runs ``fn`` at interpreter exit while thread pools still take work.

  A plain atexit hook runs too late: by then concurrent.futures refuses new
  work ("cannot schedule new futures after interpreter shutdown"), and Orbax's
  save, which uses thread pools, fails mid-write. The stdlib's own executors
  hook in earlier with ``threading._register_atexit``; registered after them,
  ``fn`` runs before them.
  """
  register = _FEATURES["early_atexit"].get()
  if register is not None:
    try:
      register(fn)
      return
    except Exception as e:  # RuntimeError once shutdown has begun.
      _FEATURES["early_atexit"].failed(e)
  atexit.register(fn)


# -- Orbax: the fast writer's chunk grid ---------------------------------------


@_feature(
  "replica_slices",
  "Orbax's replica_slices.get_replica_slices",
  "the fast writer chunks arrays by their shard shape, which for replicated "
  "arrays may differ from Orbax's chunks",
)
def _find_replica_slices():
  from orbax.checkpoint._src.serialization import jax_array_handlers
  from orbax.checkpoint._src.serialization import replica_slices

  return replica_slices.get_replica_slices, jax_array_handlers._get_default_use_replica_parallel


def orbax_write_shape(value: jax.Array) -> tuple[int, ...]:
  """Orbax's chunk grid for ``value``: its shard shape, split among replicas where
  Orbax's replica-parallel saving would split it (Orbax's own function decides)."""
  if len(value.sharding.device_set) == 1:  # One shard, no replicas (may be deleted: a view).
    return tuple(value.shape)
  found = _FEATURES["replica_slices"].get()
  if found is not None:
    get_replica_slices, use_replica_parallel = found
    try:
      return tuple(
        get_replica_slices(
          value, replica_id=0, use_replica_parallel=use_replica_parallel()
        ).local_shape
      )
    except Exception as e:
      _FEATURES["replica_slices"].failed(e)
  return tuple(value.sharding.shard_shape(value.shape))  # Always a valid grid.


@_feature(
  "subchunking",
  "Orbax's subchunking.choose_chunk_shape",
  "the fast writer ignores CheckpointOptions.chunk_byte_size (one chunk per write shape)",
)
def _find_subchunking():
  from orbax.checkpoint._src.arrays import subchunking

  return subchunking.choose_chunk_shape


def choose_chunk_shape(
  global_shape: tuple[int, ...],
  write_shape: tuple[int, ...],
  dtype: np.dtype,
  target_byte_size: int,
) -> tuple[int, ...]:
  """Orbax's chunk shape for ``chunk_byte_size``: the largest that divides
  ``write_shape`` within ``target_byte_size`` bytes."""
  choose = _FEATURES["subchunking"].get()
  if choose is not None:
    try:
      return tuple(choose(global_shape, write_shape, dtype, target_byte_size))
    except Exception as e:
      _FEATURES["subchunking"].failed(e)
  return tuple(write_shape)


# -- Orbax: numpy arrays written by another process ----------------------------


@_feature(
  "numpy_on_process",
  "Orbax's NumpyHandler._background_serialize (to override)",
  "saves with experimental_io_device on a task other than 0 are not possible",
)
def _find_numpy_on_process():
  """Orbax's ``NumpyHandler`` writing on a chosen process instead of 0.

  Its ``_background_serialize`` hard-codes ``process_index() == 0`` whatever
  ``primary_host`` says, so a save whose I/O runs on another process (TF's
  ``experimental_io_device="/task:1"``) would silently write no data.
  """
  from orbax.checkpoint._src import asyncio_utils
  from orbax.checkpoint._src.serialization import ocdbt_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

  base = ocp.type_handlers.NumpyHandler
  stock = base()
  used = [
    (asyncio_utils, "cancellable"),
    (ocdbt_utils, "get_process_index_for_subdir"),
    (ts_utils, "build_array_write_spec"),
    (base, "_background_serialize"),
    (base, "_open_and_write"),
    (stock, "_override_ocdbt_process_id"),
    (stock, "_metadata_key"),
  ]
  if not all(hasattr(owner, name) for owner, name in used):
    return None
  process_index = ocp.multihost.process_index

  class NumpyOnProcessHandler(base):  # type: ignore[valid-type,misc]
    """Orbax's ``NumpyHandler``, writing on process ``writer`` instead of 0."""

    def __init__(self, writer: int):
      super().__init__()
      self._writer = writer

    async def _background_serialize(self, values, infos, args=None):
      # Copied from orbax-checkpoint 0.12 type_handlers.NumpyHandler; only the
      # `process_index() == ...` line differs.
      write_coros = []
      for value, info, arg in zip(values, infos, args, strict=True):
        await info.await_path_creation()
        array_write_spec = ts_utils.build_array_write_spec(
          info=info,
          arg=arg,
          global_shape=value.shape,
          local_shape=value.shape,
          dtype=value.dtype,
          use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(
            use_ocdbt=info.is_ocdbt_checkpoint,
            override_ocdbt_process_id=self._override_ocdbt_process_id,
          ),
          metadata_key=self._metadata_key,
        )
        if process_index() == self._writer:
          write_coros.append(self._open_and_write(value, array_write_spec.json, info.ts_context))
      await asyncio_utils.cancellable(
        asyncio.gather(*write_coros),
        message="[process=%s] Numpy handler gather was cancelled.",
        process_index=process_index(),
      )

  return NumpyOnProcessHandler


def registry_writing_on(process: int) -> Any:
  """A type registry (the global one is untouched) for saves of numpy values
  written by ``process``.

  Raises:
    SaveError: ``process`` is not 0 and this Orbax offers no way to write there.
  """
  handler_class = _FEATURES["numpy_on_process"].get()
  if handler_class is not None:
    handler = handler_class(process)
  elif process == 0:  # Orbax's own handler writes on process 0.
    handler = ocp.type_handlers.NumpyHandler()
  else:
    raise SaveError(
      f"Cannot write this save on process {process}: this Orbax version's NumpyHandler "
      "writes only on process 0 and jaxckpt cannot override it. Use "
      "experimental_io_device on task 0, or no experimental_io_device."
    )
  return ocp.type_handlers.create_type_handler_registry((np.ndarray, handler))


# -- Orbax: barriers bounded by jaxckpt's timeout ---------------------------------


@_feature(
  "barrier_timeout",
  "Orbax's multihost.sync_global_processes",
  "a process that fails inside an Orbax save or restore holds the others for Orbax's "
  "fixed 300 s barrier timeout instead of CheckpointOptions.timeout_s",
)
def _find_barrier_timeout():
  from orbax.checkpoint._src.multihost import multihost

  return multihost if callable(getattr(multihost, "sync_global_processes", None)) else None


_barrier_local = threading.local()  # This thread's jaxckpt operation's timeout, if any.
_barrier_lock = threading.Lock()


def _bounded_sync(original: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(original)
  def sync(name: str, *args: Any, timeout: int | None = None, **kwargs: Any) -> Any:
    ours = getattr(_barrier_local, "seconds", None)
    if ours is not None:
      timeout = ours if timeout is None else min(timeout, ours)
    return original(name, *args, timeout=timeout, **kwargs)

  sync._jaxckpt_bounded = True  # type: ignore[attr-defined]
  return sync


@contextlib.contextmanager
def orbax_barrier_timeout(seconds: float) -> Iterator[None]:
  """Orbax's own barriers, called on this thread, wait at most ``seconds``.

  Orbax's checkpointers wait at barriers with a fixed 300 s timeout (its
  ``coordination_timeout``), whatever the caller's; its module function is
  wrapped once to take the smaller of that and the timeout of the jaxckpt
  operation running on the calling thread. Other threads, and Orbax code run
  outside such an operation, keep Orbax's timeouts.
  """
  multihost = _FEATURES["barrier_timeout"].get()
  if multihost is None:
    yield
    return
  with _barrier_lock:
    if not getattr(multihost.sync_global_processes, "_jaxckpt_bounded", False):
      multihost.sync_global_processes = _bounded_sync(multihost.sync_global_processes)
  previous = getattr(_barrier_local, "seconds", None)
  _barrier_local.seconds = max(1, int(seconds))
  try:
    yield
  finally:
    _barrier_local.seconds = previous


# -- Orbax: TensorStore byte counts without the leak ---------------------------


@_feature(
  "metrics_fix",
  "Orbax's tensorstore_utils.get_tensorstore_raw_bytes (to divert)",
  "each save or restore through Orbax leaks what "
  "ts.experimental_collect_matching_metrics returns (a few KB of RSS per call, 2 calls "
  "per operation)",
)
def _find_metrics_fix():
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

  if not (
    callable(ts_utils.get_tensorstore_raw_bytes)
    and callable(ts.experimental_collect_prometheus_format_metrics)
  ):
    return None
  return ts_utils


def _raw_bytes(direction: Any = None) -> int:
  """Orbax's ``get_tensorstore_raw_bytes`` from the Prometheus-format metrics,
  which do not leak (``experimental_collect_matching_metrics`` does, in
  tensorstore 0.1.86). ``direction``: Orbax's ``IoDirection``; None is WRITE."""
  write = direction is None or getattr(direction, "name", None) == "WRITE"
  suffix = "_bytes_written" if write else "_bytes_read"
  total = 0
  for line in ts.experimental_collect_prometheus_format_metrics("/tensorstore/kvstore/"):
    name, _, value = line.rpartition(" ")
    if not line.startswith("#") and name.split("{", 1)[0].endswith(suffix):
      try:
        total += int(float(value))
      except ValueError:
        pass
  return total


_metrics_lock = threading.Lock()
_metrics_users = 0
_metrics_original: Any = None


@contextlib.contextmanager
def stop_metrics_leak() -> Iterator[None]:
  """While jaxckpt's own Orbax operations run, Orbax counts TensorStore's raw bytes
  with `_raw_bytes` instead of its leaking count.

  Orbax calls ``tensorstore_utils.get_tensorstore_raw_bytes`` through its module,
  around every array batch it writes or reads (2 calls per save or restore), on
  its own threads, so the module attribute is swapped while at least one such
  operation is open and put back when the last closes: Orbax code of the user's
  running after a jaxckpt save sees Orbax's own function (and during one, the
  same counts, computed without the leak). The context must span the whole
  operation, up to ``wait_until_finished`` of an async save.
  """
  global _metrics_users, _metrics_original
  ts_utils = _FEATURES["metrics_fix"].get()
  if ts_utils is None:
    yield
    return
  with _metrics_lock:
    if _metrics_users == 0:
      _metrics_original = ts_utils.get_tensorstore_raw_bytes
      ts_utils.get_tensorstore_raw_bytes = _raw_bytes
    _metrics_users += 1
  try:
    yield
  finally:
    with _metrics_lock:
      _metrics_users -= 1
      # Put back only what was swapped out, not a function someone set meanwhile.
      if _metrics_users == 0 and ts_utils.get_tensorstore_raw_bytes is _raw_bytes:
        ts_utils.get_tensorstore_raw_bytes = _metrics_original


# -- TensorStore: where each OCDBT value lives ---------------------------------


@_feature(
  "ocdbt_dump",
  "TensorStore's ts.ocdbt.dump, in the output format jaxckpt parses",
  "the fast read path is off and Orbax reads every array (slower restore())",
)
def _find_ocdbt_dump():
  return getattr(getattr(ts, "ocdbt", None), "dump", None)


def ocdbt_chunk_entries(state_dir: str) -> dict[bytes, bytes | tuple[str, int, int]] | None:
  """Key → value of the OCDBT database in ``state_dir``: its bytes when stored
  inline, else ``(data file path, offset, length)``.

  TensorStore's public ``ts.ocdbt.dump`` reads the manifest and B-tree; the
  layout of its output (``versions``, ``entries``, ``value:<dir>:<file>:<offset>:<length>``
  references) is what is private here. Values stored other than in a data file
  under ``state_dir`` are left out. None when the database cannot be listed: no
  ``dump`` or an output it does not know (one WARNING), or a database this code
  does not handle (not OCDBT, a B-tree of height above 0; debug log).
  """
  dump = _FEATURES["ocdbt_dump"].get()
  if dump is None:
    return None
  try:
    return _list_entries(dump, state_dir)
  except _FastReadUnsupported as e:
    logger.debug("Fast read of %s not possible: %s", state_dir, e)
  except (KeyError, TypeError, ValueError, AttributeError) as e:  # Another output format.
    _FEATURES["ocdbt_dump"].failed(e, api_changed=True)
  return None


def _dump(dump: Callable[..., Any], *args: Any) -> Any:
  try:
    return dump(*args).result()
  except Exception as e:  # Not an OCDBT database, or unreadable.
    raise _FastReadUnsupported(f"{type(e).__name__}: {e}") from e


def _list_entries(dump: Callable[..., Any], state_dir: str) -> dict:
  try:
    base = ts.KvStore.open({"driver": "file", "path": state_dir.rstrip("/") + "/"}).result()
  except Exception as e:
    raise _FastReadUnsupported(f"{type(e).__name__}: {e}") from e
  versions = _dump(dump, base).get("versions") or []
  if not versions:
    raise _FastReadUnsupported("no versions")
  latest = max(versions, key=lambda v: v["generation_number"])
  root = latest.get("root") or {}
  if latest.get("root_height", 0) != 0 or "location" not in root:
    raise _FastReadUnsupported(f"B-tree height {latest.get('root_height')}")
  entries = {}
  inside: dict[str, str] = {}
  for entry in _dump(dump, base, root["location"])["entries"]:
    if "inline_value" in entry:
      entries[entry["key"]] = entry["inline_value"]
    else:
      location = _location(entry["indirect_value"], state_dir, inside)
      if location is not None:
        entries[entry["key"]] = location
  return entries


def _location(
  ref: str, state_dir: str, inside: dict[str, str] | None = None
) -> tuple[str, int, int] | None:
  """``"value:ocdbt.process_0/:d/abc:0:64"`` → (file path, offset, length); None
  for other references and for paths leaving ``state_dir``."""
  kind, rest = ref.split(":", 1)
  if kind != "value":
    return None
  head, offset, length = rest.rsplit(":", 2)
  inside = {} if inside is None else inside  # Per listing: a database has few data files.
  path = inside.get(head)
  if path is None:  # Absolute, "..", symlinks out: never followed.
    prefix, relative = head.split(":", 1)
    full = os.path.join(state_dir, prefix, relative)
    root = os.path.realpath(state_dir)
    path = inside[head] = full if os.path.commonpath([root, os.path.realpath(full)]) == root else ""
  if not path:
    return None
  return path, int(offset), int(length)
