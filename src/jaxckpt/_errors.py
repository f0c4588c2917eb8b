"""The one exception hierarchy of jaxckpt.

Every error jaxckpt raises derives from :class:`JaxckptError` and from the
builtin a caller would naturally catch (``FileNotFoundError``, ``ValueError``,
``AssertionError`` ...), so ``except FileNotFoundError`` keeps working for code
migrated from ``tf.train.Checkpoint``.
"""

from __future__ import annotations


class JaxckptError(Exception):
  """Base class of every error raised by jaxckpt."""


class InvalidOptionsError(JaxckptError, TypeError, ValueError):
  """A `CheckpointOptions` field has a bad value (wrong type or signature)."""


class InvalidCallbackError(InvalidOptionsError, AssertionError):
  """A write callback takes more than the save path (TF asserts this, hence AssertionError)."""


class InvalidPathError(JaxckptError, ValueError):
  """A path cannot hold a checkpoint (a parent is a regular file, a URL names no bucket)."""


class PathExistsError(InvalidPathError, FileExistsError):
  """A save's path holds something other than a checkpoint directory at commit time.

  Found after the write, so it is the ``__cause__`` of that save's `SaveError`.
  """


class UnknownDeviceError(JaxckptError, ValueError):
  """``experimental_io_device`` names no device this process can use."""


class TreeError(JaxckptError, ValueError):
  """A tracked pytree holds something jaxckpt cannot save or restore into."""


class ShapeMismatchError(JaxckptError, ValueError):
  """A checkpointed array and the tracked value at the same path differ in shape."""


class DtypeMismatchError(TreeError):
  """A checkpointed value and the tracked value at the same path differ in dtype
  (beyond the casts restore makes: within a kind, int to float) or in kind (a
  string where an array is tracked)."""


class VariableNotFoundError(JaxckptError, KeyError):
  """`CheckpointReader.get_tensor` was asked for a name not in the checkpoint."""


class UnknownItemError(JaxckptError, AttributeError):
  """A `Checkpoint` attribute names no tracked item.

  An AttributeError, so ``hasattr`` and ``getattr(ckpt, name, default)`` work.
  """


class CheckpointNotFoundError(JaxckptError, FileNotFoundError):
  """The path given to restore/read/load_checkpoint holds no committed checkpoint."""


class NotACheckpointError(JaxckptError, ValueError):
  """The path exists but is not a (complete) jaxckpt checkpoint."""


class CorruptCheckpointError(JaxckptError, ValueError):
  """Array data failed its checksum or could not be decoded; names the array."""


class UnsupportedTensorError(JaxckptError, TypeError):
  """A TF checkpoint holds a tensor jaxckpt cannot represent (a variant, resource
  or quantized dtype), or was written big-endian."""


class SaveError(JaxckptError, RuntimeError):
  """A save or write failed; for async saves, raised at the next call."""


class WriteCallbackError(SaveError):
  """A write callback raised; the checkpoint itself is committed."""


class CoordinationError(JaxckptError, RuntimeError):
  """Another JAX process did not report in time, or reported a failure.

  Inside a save's write it is the ``__cause__`` of the `SaveError`; restores,
  and a save with ``experimental_io_device`` before its all-gather, raise it
  directly.
  """


class LoadStatusError(JaxckptError, AssertionError):
  """A load-status assertion (``assert_consumed`` ...) failed."""


# -- internal: never raised out of jaxckpt's API ---------------------------------


class _ArrayReadError(JaxckptError):
  """Reading array ``name`` from a key-value store failed (see _zarr3.py).

  `read_leaves` turns it into a `CorruptCheckpointError` naming the checkpoint.
  """

  def __init__(self, name: str, error: BaseException):
    super().__init__(f"array '{name}' failed to load ({type(error).__name__}: {error})")
    self.name = name


class _TableDamage(JaxckptError):
  """A TF checkpoint's index table is damaged (see _tfbundle.py); `read_table`
  turns it into a `CorruptCheckpointError` naming the file."""


class _ClosedPipe(JaxckptError, BrokenPipeError):
  """The CLI's reader (``head``, a pager) went away; `jaxckpt._cli.main` exits 141."""


class _FastReadUnsupported(JaxckptError):
  """This array is not for the fast read path (see _fastread.py); Orbax reads it."""


class _LocalTierMismatch(JaxckptError):
  """The local tier's shards do not fit the tracked values (see _shards.py); the
  manager restores from the persistent tier instead."""
