"""`CheckpointOptions`: TF's options object, with TF's async-flag gotcha fixed."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

from jaxckpt._errors import InvalidCallbackError
from jaxckpt._errors import InvalidOptionsError

WriteCallback = Callable[..., Any]

_DEPRECATED_ALIAS = (
  "CheckpointOptions(experimental_enable_async_checkpoint=...) is deprecated; "
  "use enable_async=... instead."
)


def _takes_path(callback: WriteCallback) -> bool:
  """Whether ``callback`` is called as ``cb(save_path)`` (else ``cb()``)."""
  try:
    params = inspect.signature(callback).parameters.values()
  except (TypeError, ValueError):  # Builtins without a signature, e.g. print.
    return True
  positional = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.VAR_POSITIONAL,
  )
  return any(p.kind in positional for p in params)


def _check_callback(index: int, callback: Any) -> None:
  if not callable(callback):
    raise InvalidOptionsError(
      f"experimental_write_callbacks[{index}] must be callable, got "
      f"{type(callback).__name__} {callback!r}."
    )
  try:
    params = inspect.signature(callback).parameters.values()
  except (TypeError, ValueError):
    return
  required = [
    p.name
    for p in params
    if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    and p.default is inspect.Parameter.empty
  ]
  required_kw = [
    p.name
    for p in params
    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
  ]
  if len(required) > 1 or required_kw:
    raise InvalidCallbackError(
      f"experimental_write_callbacks[{index}] ({callback!r}) must take at most "
      f"one positional argument (the save path), got required parameters "
      f"{required + required_kw}. Give the others defaults or wrap it: "
      f"lambda path: {getattr(callback, '__name__', 'cb')}(path, ...)."
    )


def call_write_callback(callback: WriteCallback, save_path: str) -> None:
  """Calls a write callback the way TF does: ``cb(save_path)`` or ``cb()``."""
  if _takes_path(callback):
    callback(save_path)
  else:
    callback()


class CheckpointOptions:
  """Options for `Checkpoint.save`/`write`/`restore`/`read`, as in TF.

  The six positional parameters are TF's, in TF's order and with TF's meaning;
  the others are keyword-only. Unlike TF, assigning ``enable_async`` (or its
  alias) after construction keeps both in sync and takes effect.

  Args:
    experimental_io_device: the device whose host does the file I/O: None, a
      TF device string (``"/job:localhost"``, ``"cpu:0"``, ``"/task:1"``) or a
      ``jax.Device``. Changes where I/O happens, never what is saved.
    experimental_enable_async_checkpoint: deprecated alias of
      ``enable_async`` (passing it warns); the two are OR-merged.
    experimental_write_callbacks: callables run in order after each save or
      write is committed, as ``cb()`` or ``cb(save_path)``; for async saves on
      the background thread.
    enable_async: write in the background; ``save`` returns once the snapshot
      is enqueued.
    experimental_skip_slot_variables: on restore/read, leave optimizer state
      (TF's slot variables; here leaves with an ``opt_state`` component in
      their name) as it is; those values count as neither missing nor unused.
    experimental_sharding_callback: TF's says how a checkpoint is split into
      files; here a callable ``callback(name, shape, dtype)`` returning the
      ``jax.sharding.Sharding`` each ``jax.Array`` leaf is written in (its
      on-disk chunks follow it) and restored into, or None to keep the current
      one. TF's ``ShardingCallback`` objects are not accepted.
    compression: zstd-compress array chunks (off by default: random-looking
      float weights barely compress, and it costs save and restore time).
    chunk_byte_size: target TensorStore chunk size in bytes (default: one
      chunk per device shard).
    max_in_flight: async saves allowed in flight at once (default 1, like TF:
      the next save waits for the previous commit).
    memory_budget_bytes: cap on snapshot bytes held by in-flight saves; a save
      that would exceed it waits for earlier commits and logs the wait.
      Default: half the machine's physical memory.
    keep_staging_bytes: host memory an async save on CPU may keep for the
      next save. Its snapshot copies arrays of 32 MiB and more into staging
      buffers; after the commit the `Checkpoint` keeps them if they fit in this
      many bytes (at most two sets, none idle for more than 10 minutes), and the
      next save of the same shapes copies into them: no fresh memory to
      page-fault in, at the price of holding them between saves. ``0`` frees
      them at every commit. Default None: an eighth of the machine's physical
      memory. GPU/TPU snapshots are never kept; ready CPU arrays of up to
      256 KiB are not copied at all (the snapshot holds read-only views).
    verify_checksums: on restore/read, check each array against the CRC-32
      recorded at save time.
    incremental: do not write leaves unchanged since this Checkpoint's last
      committed save (same array object, or same bytes); the new checkpoint
      refers to the earlier one's data. Never overwrites an existing path.
    timeout_s: with several JAX processes, how long a save or restore waits
      for the others before failing with an error naming the missing process.
    pack_small_arrays: write the arrays of up to 256 KiB that one process
      holds whole into one file, ``state/checkpoint`` (Orbax's aggregate
      file), instead of one OCDBT entry each: one sequential write for a state
      of thousands of small arrays. Orbax still reads such a checkpoint with
      ``PyTreeCheckpointer().restore(path)`` or with a target, but not with
      ``StandardCheckpointer().restore(path)`` without one (Orbax has no
      shapes for aggregated arrays). Default None: pack when a state has at
      least 512 such arrays. Local paths only; never with ``compression``,
      ``incremental``, ``chunk_byte_size`` or several writing processes.

  Raises:
    InvalidOptionsError: a field has a bad type or value (a callback that is
      not callable or takes more than one required argument, a non-positive
      size, ``incremental`` with ``max_in_flight`` above 1).

  Examples:
    >>> import jaxckpt
    >>> opts = jaxckpt.CheckpointOptions(enable_async=True,
    ...                                  experimental_write_callbacks=[print])
    >>> opts.experimental_enable_async_checkpoint
    True
    >>> opts.enable_async = False
    >>> opts.experimental_enable_async_checkpoint
    False
  """

  __slots__ = (
    "experimental_io_device",
    "_async",
    "_callbacks",
    "experimental_skip_slot_variables",
    "experimental_sharding_callback",
    "compression",
    "chunk_byte_size",
    "max_in_flight",
    "memory_budget_bytes",
    "verify_checksums",
    "incremental",
    "timeout_s",
    "keep_staging_bytes",
    "pack_small_arrays",
  )

  def __init__(
    self,
    experimental_io_device: Any = None,
    experimental_enable_async_checkpoint: bool = False,
    experimental_write_callbacks: Iterable[WriteCallback] | None = None,
    enable_async: bool = False,
    experimental_skip_slot_variables: bool = False,
    experimental_sharding_callback: Callable[..., Any] | None = None,
    *,
    compression: bool = False,
    chunk_byte_size: int | None = None,
    max_in_flight: int = 1,
    memory_budget_bytes: int | None = None,
    verify_checksums: bool = True,
    incremental: bool = False,
    timeout_s: float = 300.0,
    keep_staging_bytes: int | None = None,
    pack_small_arrays: bool | None = None,
  ):
    if experimental_enable_async_checkpoint:
      warnings.warn(_DEPRECATED_ALIAS, DeprecationWarning, stacklevel=2)
    self.experimental_io_device = experimental_io_device
    self._async = False
    self.enable_async = bool(experimental_enable_async_checkpoint or enable_async)
    self.experimental_write_callbacks = experimental_write_callbacks
    _check_restore_extras(experimental_skip_slot_variables, experimental_sharding_callback)
    self.experimental_skip_slot_variables = experimental_skip_slot_variables
    self.experimental_sharding_callback = experimental_sharding_callback
    _check_bool("compression", compression)
    _check_positive("chunk_byte_size", chunk_byte_size, allow_none=True)
    _check_positive("max_in_flight", max_in_flight, allow_none=False)
    _check_positive("memory_budget_bytes", memory_budget_bytes, allow_none=True)
    self.compression = compression
    self.chunk_byte_size = chunk_byte_size
    self.max_in_flight = max_in_flight
    self.memory_budget_bytes = memory_budget_bytes
    _check_bool("verify_checksums", verify_checksums)
    self.verify_checksums = verify_checksums
    _check_bool("incremental", incremental)
    if incremental and max_in_flight != 1:
      # The next save must see the previous one committed (and its sweep done)
      # to know which earlier data is safe to refer to.
      raise InvalidOptionsError(
        f"incremental=True needs max_in_flight=1, got max_in_flight={max_in_flight}."
      )
    self.incremental = incremental
    if (
      isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (timeout_s > 0)
    ):
      raise InvalidOptionsError(f"timeout_s must be a positive number, got {timeout_s!r}.")
    self.timeout_s = float(timeout_s)
    if keep_staging_bytes is not None and (
      isinstance(keep_staging_bytes, bool)
      or not isinstance(keep_staging_bytes, int)
      or keep_staging_bytes < 0
    ):
      raise InvalidOptionsError(
        f"keep_staging_bytes must be an int >= 0 or None, got {keep_staging_bytes!r}."
      )
    self.keep_staging_bytes = keep_staging_bytes
    _check_bool("pack_small_arrays", pack_small_arrays, allow_none=True)
    self.pack_small_arrays = pack_small_arrays

  @property
  def enable_async(self) -> bool:
    """Whether saves write in the background; assignable, unlike in TF.

    Raises:
      InvalidOptionsError: on assigning something other than a bool.

    Examples:
      >>> import jaxckpt
      >>> opts = jaxckpt.CheckpointOptions()
      >>> opts.enable_async = True
      >>> opts.enable_async
      True
    """
    return self._async

  @enable_async.setter
  def enable_async(self, value: bool) -> None:
    if not isinstance(value, (bool, int)):
      raise InvalidOptionsError(
        f"enable_async must be a bool, got {type(value).__name__} {value!r}."
      )
    self._async = bool(value)

  @property
  def experimental_enable_async_checkpoint(self) -> bool:
    """Deprecated alias of `enable_async`; reads and writes the same flag.

    Assigning it warns (a DeprecationWarning) and sets `enable_async`.

    Examples:
      >>> import jaxckpt
      >>> jaxckpt.CheckpointOptions(enable_async=True).experimental_enable_async_checkpoint
      True
    """
    return self._async

  @experimental_enable_async_checkpoint.setter
  def experimental_enable_async_checkpoint(self, value: bool) -> None:
    warnings.warn(_DEPRECATED_ALIAS, DeprecationWarning, stacklevel=2)
    self.enable_async = value

  @property
  def experimental_write_callbacks(self) -> list[WriteCallback] | None:
    """The write callbacks (a list, copied from any iterable), or None.

    Raises:
      InvalidOptionsError: on assigning a single callable, or a list holding
        something that is not callable or takes more than one argument.

    Examples:
      >>> import jaxckpt
      >>> opts = jaxckpt.CheckpointOptions(experimental_write_callbacks=(print,))
      >>> opts.experimental_write_callbacks
      [<built-in function print>]
    """
    return self._callbacks

  @experimental_write_callbacks.setter
  def experimental_write_callbacks(self, callbacks) -> None:
    if callbacks is None:
      self._callbacks = None
      return
    if callable(callbacks) or isinstance(callbacks, (str, bytes)):
      raise InvalidOptionsError(
        "experimental_write_callbacks must be a list of callables, got a "
        f"single {type(callbacks).__name__}; wrap it: [{callbacks!r}]."
      )
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
      _check_callback(i, cb)
    self._callbacks = callbacks

  def __copy__(self) -> CheckpointOptions:
    new = object.__new__(CheckpointOptions)
    for name in self.__slots__:
      setattr(new, name, getattr(self, name))
    new._callbacks = None if self._callbacks is None else list(self._callbacks)
    return new

  def __deepcopy__(self, memo) -> CheckpointOptions:
    # Callbacks and devices are not data: copy the list, share its elements.
    return self.__copy__()

  def copy(self) -> CheckpointOptions:
    """Returns a copy with its own callback list (the callbacks are shared).

    Returns:
      A new `CheckpointOptions` equal to this one.

    Examples:
      >>> import jaxckpt
      >>> opts = jaxckpt.CheckpointOptions(enable_async=True)
      >>> other = opts.copy()
      >>> other == opts, other is opts
      (True, False)
    """
    return copy.copy(self)

  def _key(self):
    return tuple(
      tuple(v) if isinstance(v, list) else v
      for v in (getattr(self, name) for name in self.__slots__)
    )

  def __eq__(self, other) -> bool:
    if not isinstance(other, CheckpointOptions):
      return NotImplemented
    return self._key() == other._key()

  __hash__ = None  # type: ignore[assignment]  # Mutable.

  def __repr__(self) -> str:
    extra = "".join(
      f", {name}={getattr(self, name)!r}"
      for name, default in _KNOB_DEFAULTS.items()
      if getattr(self, name) != default
    )
    return (
      f"CheckpointOptions(experimental_io_device={self.experimental_io_device!r}, "
      f"enable_async={self._async}, "
      f"experimental_write_callbacks={self._callbacks!r}{extra})"
    )


_KNOB_DEFAULTS = {
  "experimental_skip_slot_variables": False,
  "experimental_sharding_callback": None,
  "compression": False,
  "chunk_byte_size": None,
  "max_in_flight": 1,
  "memory_budget_bytes": None,
  "verify_checksums": True,
  "incremental": False,
  "timeout_s": 300.0,
  "keep_staging_bytes": None,
  "pack_small_arrays": None,
}


def _check_bool(name: str, value: Any, *, allow_none: bool = False) -> None:
  if not (isinstance(value, bool) or (allow_none and value is None)):
    kinds = "a bool or None" if allow_none else "a bool"
    raise InvalidOptionsError(f"{name} must be {kinds}, got {value!r}.")


def _check_restore_extras(skip_slot_variables: Any, sharding_callback: Any) -> None:
  if not isinstance(skip_slot_variables, bool):
    raise InvalidOptionsError(
      f"experimental_skip_slot_variables must be a bool, got {skip_slot_variables!r}."
    )
  if sharding_callback is not None and not callable(sharding_callback):
    raise InvalidOptionsError(
      "experimental_sharding_callback must be None or a callable "
      "(name, shape, dtype) -> jax.sharding.Sharding | None, got "
      f"{type(sharding_callback).__name__}."
    )


def _check_positive(name: str, value: Any, *, allow_none: bool) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise InvalidOptionsError(
      f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}."
    )
