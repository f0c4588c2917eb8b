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
* `fast_paths` says which private paths are in use.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

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


@_feature("shard_args", "JAX's pxla.shard_args",
          "snapshots use jax.device_put instead (slower save(): ~25 us of Python per array)")
def _find_shard_args():
  from jax._src.interpreters import pxla
  from jax._src.lib import xla_client as xc
  return pxla.shard_args, xc.ArrayCopySemantics.ALWAYS_COPY


@_feature("batched_copy", "JAX's xla_client.batched_copy_array_to_devices_with_sharding",
          "async snapshots use JAX's shard_args or jax.device_put instead (slower save())")
def _find_batched_copy():
  from jax._src.lib import xla_client as xc
  if not hasattr(jax.sharding.Sharding, "_internal_device_list"):
    return None
  return xc.batched_copy_array_to_devices_with_sharding, xc.ArrayCopySemantics.ALWAYS_COPY


def _any_deleted(values: list[jax.Array]) -> bool:
  return any(v.is_deleted() for v in values)


def copy_arrays(values: list[jax.Array],
                targets: list[jax.sharding.Sharding]) -> list[jax.Array]:
  """New arrays with ``values``' data in ``targets``; issued, not waited for.

  JAX's batched ``shard_args`` (what ``jax.device_put`` ends in) skips ~25 us of
  Python per array: 1.4-1.7 instead of 4.6-6.1 ms for 200 arrays.
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


def copy_in_place(values: list[jax.Array],
                  targets: list[jax.sharding.Sharding]) -> list[jax.Array]:
  """`copy_arrays` for fully addressable arrays whose targets are their own
  shardings, maybe in another memory kind: straight to the batched C++ copy
  ``shard_args`` ends in, without its per-array Python checks (sharding
  comparisons and hashing: about half of the blocked time for the 197 arrays of
  benchmarks/tpu_idle.py)."""
  found = None if _any_deleted(values) else _FEATURES["batched_copy"].get()
  if found is not None:
    batched_copy, always_copy = found
    try:
      return list(batched_copy(values, [_addressable_devices(t) for t in targets], targets,
                               [always_copy] * len(values)))
    except Exception as e:
      _FEATURES["batched_copy"].failed(e)
  return copy_arrays(values, targets)


# -- JAX: shardings and arrays ------------------------------------------------


@_feature("hlo_sharding", "JAX's Sharding._to_xla_hlo_sharding",
          "staging buffers are reused only for equal shardings (fewer reuses on CPU)")
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


@_feature("device_assignment", "JAX's Sharding._device_assignment",
          "only NamedSharding and SingleDeviceSharding arrays get staging buffers")
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


@_feature("uncommit", "JAX's jax._src.array.ArrayImpl constructor",
          "restored uncommitted arrays are copied once more (slower restore())")
def _find_uncommit():
  from jax._src.array import ArrayImpl
  return ArrayImpl if hasattr(ArrayImpl, "_arrays") else None


def uncommitted(value: jax.Array) -> jax.Array:
  """``value`` as an uncommitted array, sharing its buffers (no copy).

  JAX has no public way to drop the "committed" flag; the public fallback,
  ``device_put`` of a numpy copy, cost 0.15 s per 512 MiB (TensorStore's numpy
  output is 16-byte aligned, and JAX aliases only 64-byte-aligned host memory).
  """
  array_impl = _FEATURES["uncommit"].get()
  if array_impl is not None and isinstance(value, array_impl):
    try:
      return array_impl(value.aval, value.sharding, value._arrays, committed=False)
    except Exception as e:
      _FEATURES["uncommit"].failed(e)
  return jax.device_put(np.asarray(value))


@_feature("distributed_client", "JAX's jax._src.distributed.global_state",
          "multi-process saves cannot reach the coordination service and fail")
def _find_distributed_client():
  from jax._src.distributed import global_state  # The only handle JAX offers.
  return global_state if hasattr(global_state, "client") else None


def distributed_client() -> Any:
  """The ``jax.distributed`` client, or None when ``jax.distributed`` is not initialized.

  Raises:
    RuntimeError: it is initialized but this JAX offers no handle on its client.
  """
  state = _FEATURES["distributed_client"].get()
  if state is not None:
    return state.client
  if not jax.distributed.is_initialized():
    return None
  raise RuntimeError("jax.distributed is initialized but this JAX version offers no handle "
                     "on its client (jax._src.distributed.global_state); jaxckpt's "
                     "multi-process saves need it.")


# -- CPython ------------------------------------------------------------------


@_feature("early_atexit", "CPython's threading._register_atexit",
          "async saves still pending at interpreter exit are joined by a plain atexit hook, "
          "which runs after concurrent.futures refuses new work: those saves may fail")
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
