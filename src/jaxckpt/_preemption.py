"""Opt-in save on preemption: SIGTERM → wait for in-flight saves → save → exit."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from collections.abc import Iterable
from typing import cast

from jaxckpt._checkpoint import Checkpoint
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._manager import CheckpointManager
from jaxckpt._options import CheckpointOptions

logger = logging.getLogger("jaxckpt")


def install_preemption_handler(
  target: CheckpointManager | Checkpoint,
  *,
  file_prefix: str | None = None,
  options: CheckpointOptions | None = None,
  signals: Iterable[int] = (signal.SIGTERM,),
  exit_code: int = 0,
) -> Callable[[], None]:
  """On SIGTERM, finish in-flight saves, save synchronously, then exit.

  Cloud schedulers send SIGTERM some seconds before killing a preemptible
  machine. The handler (on the main thread, between Python bytecodes) waits for
  pending async saves, saves what the checkpoint tracks *now* with
  ``options``' write callbacks (synchronously, whatever ``enable_async`` says),
  logs the path and exits with ``exit_code`` (``SystemExit``, so ``finally``
  blocks and atexit hooks run). Must be called from the main thread.

  Args:
    target: a `CheckpointManager` (saves through it: numbering, sweep, state
      file) or a `Checkpoint` (then ``file_prefix`` is required; uses `save`).
    file_prefix: the prefix for ``Checkpoint.save``.
    options: options for the final save (callbacks, io_device...).
    signals: the signals to handle.
    exit_code: the process exit status after the save.

  Returns:
    A function that restores the previous handlers.

  Raises:
    InvalidOptionsError: ``target`` is neither a `CheckpointManager` nor a
      `Checkpoint`, or ``file_prefix`` is missing for a `Checkpoint`.

  Examples:
    >>> import jaxckpt, signal, tempfile
    >>> manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(step=0), tempfile.mkdtemp(), 3)
    >>> uninstall = jaxckpt.install_preemption_handler(manager)
    >>> signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    True
    >>> uninstall()
  """
  if isinstance(target, Checkpoint) and file_prefix is None:
    raise InvalidOptionsError("file_prefix is required when target is a Checkpoint.")
  if not isinstance(target, (Checkpoint, CheckpointManager)):
    raise InvalidOptionsError(
      f"target must be a CheckpointManager or Checkpoint, got {type(target).__name__}."
    )
  final = (options or CheckpointOptions()).copy()
  final.enable_async = False

  def handler(signum, frame):
    name = signal.Signals(signum).name
    logger.warning("%s received: waiting for in-flight saves, then saving.", name)
    try:
      target.sync()
    except Exception as e:  # An earlier save failed; the final save still matters.
      logger.error("An earlier async save failed: %s", e)
    if isinstance(target, CheckpointManager):
      path = target.save(check_interval=False, options=final)
    else:
      path = target.save(cast(str, file_prefix), options=final)  # Checked above.
    logger.warning("Saved %s after %s; exiting with status %d.", path, name, exit_code)
    sys.exit(exit_code)

  previous = {s: signal.signal(s, handler) for s in signals}

  def uninstall() -> None:
    for s, old in previous.items():
      signal.signal(s, old)

  return uninstall
