"""The one exception hierarchy of jaxckpt.

Every error jaxckpt raises derives from :class:`JaxckptError` and from the
builtin a caller would naturally catch (``FileNotFoundError``, ``ValueError``,
``AssertionError`` ...), so ``except FileNotFoundError`` keeps working for code
migrated from ``tf.train.Checkpoint``.
"""

from __future__ import annotations


class JaxckptError(Exception):
  """Base class of every error raised by jaxckpt.

  Examples:
    >>> import jaxckpt
    >>> try:
    ...   jaxckpt.load_checkpoint("/nonexistent/ckpt-1")
    ... except jaxckpt.JaxckptError as e:
    ...   print(type(e).__name__)
    CheckpointNotFoundError
  """


class InvalidOptionsError(JaxckptError, TypeError, ValueError):
  """A `CheckpointOptions` field has a bad value (wrong type or signature).

  Examples:
    >>> import jaxckpt
    >>> try:
    ...   jaxckpt.CheckpointOptions(max_in_flight=0)
    ... except jaxckpt.InvalidOptionsError as e:
    ...   print(e)
    max_in_flight must be a positive int, got 0.
  """


class InvalidCallbackError(InvalidOptionsError, AssertionError):
  """A write callback takes more than the save path (TF asserts this, hence AssertionError).

  Examples:
    >>> import jaxckpt
    >>> try:
    ...   jaxckpt.CheckpointOptions(experimental_write_callbacks=[lambda a, b: None])
    ... except AssertionError:
    ...   print("refused")
    refused
  """


class InvalidPathError(JaxckptError, ValueError):
  """A path cannot hold a checkpoint (a parent is a regular file, a URL names no bucket).

  Examples:
    >>> import jaxckpt
    >>> issubclass(jaxckpt.InvalidPathError, ValueError)
    True
  """


class PathExistsError(InvalidPathError, FileExistsError):
  """A save's path holds something other than a checkpoint directory at commit time.

  Found after the write, so it is the ``__cause__`` of that save's `SaveError`.

  Examples:
    >>> import jaxckpt
    >>> issubclass(jaxckpt.PathExistsError, FileExistsError)
    True
  """


class UnknownDeviceError(JaxckptError, ValueError):
  """``experimental_io_device`` names no device this process can use.

  Examples:
    >>> import jaxckpt, tempfile
    >>> opts = jaxckpt.CheckpointOptions(experimental_io_device="/device:TPU:99")
    >>> try:
    ...   jaxckpt.Checkpoint(step=0).save(tempfile.mkdtemp() + "/ckpt", options=opts)
    ... except jaxckpt.UnknownDeviceError:
    ...   print("no such device")
    no such device
  """


class TreeError(JaxckptError, ValueError):
  """A tracked pytree holds something jaxckpt cannot save or restore into.

  Examples:
    >>> import jaxckpt
    >>> try:
    ...   jaxckpt.Checkpoint(**{"a/b": 1})
    ... except jaxckpt.TreeError as e:
    ...   print(e)
    Item name 'a/b' must not contain '/' or '.'.
  """


class ShapeMismatchError(JaxckptError, ValueError):
  """A checkpointed array and the tracked value at the same path differ in shape.

  Examples:
    >>> import jaxckpt, numpy as np, tempfile
    >>> path = jaxckpt.Checkpoint(w=np.zeros(2)).save(tempfile.mkdtemp() + "/ckpt")
    >>> try:
    ...   jaxckpt.Checkpoint(w=np.zeros(3)).restore(path)
    ... except jaxckpt.ShapeMismatchError:
    ...   print("shape differs")
    shape differs
  """


class DtypeMismatchError(TreeError):
  """A checkpointed value and the tracked value at the same path differ in dtype
  (beyond the casts restore makes: within a kind, int to float) or in kind (a
  string where an array is tracked).

  Examples:
    >>> import jaxckpt, numpy as np, tempfile
    >>> path = jaxckpt.Checkpoint(w=np.ones(2)).save(tempfile.mkdtemp() + "/ckpt")
    >>> try:
    ...   jaxckpt.Checkpoint(w=np.zeros(2, np.int32)).restore(path)
    ... except jaxckpt.DtypeMismatchError:
    ...   print("float to int would change values")
    float to int would change values
  """


class VariableNotFoundError(JaxckptError, KeyError):
  """`CheckpointReader.get_tensor` was asked for a name not in the checkpoint.

  Examples:
    >>> import jaxckpt, tempfile
    >>> path = jaxckpt.Checkpoint(step=0).save(tempfile.mkdtemp() + "/ckpt")
    >>> try:
    ...   jaxckpt.load_checkpoint(path).get_tensor("params/w")
    ... except KeyError:
    ...   print("not there")
    not there
  """


class UnknownItemError(JaxckptError, AttributeError):
  """A `Checkpoint` attribute names no tracked item.

  An AttributeError, so ``hasattr`` and ``getattr(ckpt, name, default)`` work.

  Examples:
    >>> import jaxckpt
    >>> hasattr(jaxckpt.Checkpoint(step=0), "params")
    False
  """


class CheckpointNotFoundError(JaxckptError, FileNotFoundError):
  """The path given to restore/read/load_checkpoint holds no committed checkpoint.

  Examples:
    >>> import jaxckpt
    >>> try:
    ...   jaxckpt.Checkpoint(step=0).restore("/nonexistent/ckpt-1")
    ... except FileNotFoundError:
    ...   print("not found")
    not found
  """


class CheckpointDeletedError(CheckpointNotFoundError):
  """The checkpoint was deleted while it was being read (e.g. swept by a manager
  with a small ``max_to_keep`` in another process or thread).

  Nothing is wrong with the data: reading the directory's latest checkpoint
  again usually succeeds.

  Examples:
    >>> import jaxckpt
    >>> issubclass(jaxckpt.CheckpointDeletedError, FileNotFoundError)
    True
  """


class NotACheckpointError(JaxckptError, ValueError):
  """The path exists but is not a (complete) jaxckpt checkpoint.

  Examples:
    >>> import jaxckpt, tempfile
    >>> try:
    ...   jaxckpt.Checkpoint(step=0).restore(tempfile.mkdtemp())  # An empty directory.
    ... except jaxckpt.NotACheckpointError:
    ...   print("not a checkpoint")
    not a checkpoint
  """


class CorruptCheckpointError(JaxckptError, ValueError):
  """Array data failed its checksum or could not be decoded (names the array), or
  the manifest failed its own checksum or has a field of the wrong type (names
  the field).

  Examples:
    >>> import jaxckpt
    >>> issubclass(jaxckpt.CorruptCheckpointError, ValueError)
    True
  """


class UnsupportedTensorError(JaxckptError, TypeError):
  """A TF checkpoint holds a tensor jaxckpt cannot represent (a variant, resource
  or quantized dtype), or was written big-endian.

  Examples:
    >>> import jaxckpt
    >>> issubclass(jaxckpt.UnsupportedTensorError, TypeError)
    True
  """


class SaveError(JaxckptError, RuntimeError):
  """A save or write failed; for async saves, raised at the next call.

  Examples:
    >>> import jaxckpt, tempfile
    >>> def fail(path):
    ...   raise OSError("disk full")
    >>> opts = jaxckpt.CheckpointOptions(experimental_write_callbacks=[fail])
    >>> try:
    ...   jaxckpt.Checkpoint(step=0).save(tempfile.mkdtemp() + "/ckpt", options=opts)
    ... except jaxckpt.SaveError as e:
    ...   print(type(e).__name__)
    WriteCallbackError
  """


class ConcurrentWriterError(SaveError):
  """Another process is saving into the same directory through its own
  `CheckpointManager`; this one stops instead of overwriting its checkpoints.

  Examples:
    >>> import jaxckpt
    >>> issubclass(jaxckpt.ConcurrentWriterError, jaxckpt.SaveError)
    True
  """


class WriteCallbackError(SaveError):
  """A write callback raised; the checkpoint itself is committed.

  Examples:
    >>> import jaxckpt
    >>> issubclass(jaxckpt.WriteCallbackError, jaxckpt.SaveError)
    True
  """


class CoordinationError(JaxckptError, RuntimeError):
  """Another JAX process did not report in time, or reported a failure.

  Inside a save's write it is the ``__cause__`` of the `SaveError`; restores,
  and a save with ``experimental_io_device`` before its all-gather, raise it
  directly.

  Examples:
    >>> import jaxckpt
    >>> issubclass(jaxckpt.CoordinationError, RuntimeError)
    True
  """


class LoadStatusError(JaxckptError, AssertionError):
  """A load-status assertion (``assert_consumed`` ...) failed.

  Examples:
    >>> import jaxckpt
    >>> try:
    ...   jaxckpt.LoadStatus("ckpt-1", {"a"}, set()).assert_consumed()
    ... except AssertionError:
    ...   print("missing a")
    missing a
  """


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
