"""Opt-in save on preemption: SIGTERM → wait for in-flight saves → save → exit."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any
from typing import cast

from jaxckpt import _locks
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
  checkpoint_number: Any = None,
) -> Callable[[], None]:
  """On SIGTERM, finish in-flight saves, save synchronously, then exit.

  Cloud schedulers send SIGTERM some seconds before killing a preemptible
  machine. The handler (on the main thread, between Python bytecodes) waits for
  pending async saves, saves what the checkpoint tracks *now* with
  ``options``' write callbacks (synchronously, whatever ``enable_async`` says),
  logs the path and exits with ``exit_code`` (``SystemExit``, so ``finally``
  blocks and atexit hooks run). Must be called from the main thread.

  If the signal lands inside a jaxckpt call on the main thread (a sync save,
  ``manager.checkpoints``), the save waits until that call returns: it never
  re-enters half-done work or takes a lock the interrupted code holds. Signals
  arriving while the handler saves are ignored.

  Args:
    target: a `CheckpointManager` (saves through it: numbering, sweep, state
      file) or a `Checkpoint` (then ``file_prefix`` is required; uses `save`).
    file_prefix: the prefix for ``Checkpoint.save``.
    options: options for the final save (callbacks, io_device...).
    signals: the signals to handle.
    exit_code: the process exit status after the save.
    checkpoint_number: managers only: the final checkpoint's number, as
      ``CheckpointManager.save(checkpoint_number=...)`` takes it; an int-like
      value or a zero-argument callable read at the signal (e.g. the training
      loop's step). None numbers it like any other save.

  Returns:
    A function that restores the previous handlers.

  Raises:
    InvalidOptionsError: ``target`` is neither a `CheckpointManager` nor a
      `Checkpoint`, ``file_prefix`` is missing for a `Checkpoint`, or
      ``checkpoint_number`` is given for a `Checkpoint`.

  Examples:
    >>> import jaxckpt, signal, tempfile
    >>> step = 0
    >>> manager = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(step=0), tempfile.mkdtemp(), 3)
    >>> uninstall = jaxckpt.install_preemption_handler(manager, checkpoint_number=lambda: step)
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
  if checkpoint_number is not None and not isinstance(target, CheckpointManager):
    raise InvalidOptionsError("checkpoint_number needs a CheckpointManager target.")
  final = (options or CheckpointOptions()).copy()
  final.enable_async = False
  saving = threading.Event()

  def save_and_exit(name: str) -> None:
    try:
      target.sync()
    except Exception as e:  # An earlier save failed; the final save still matters.
      logger.error("An earlier async save failed: %s", e)
    if isinstance(target, CheckpointManager):
      path = target.save(checkpoint_number, check_interval=False, options=final)
    else:
      path = target.save(cast(str, file_prefix), options=final)  # Checked above.
    logger.warning("Saved %s after %s; exiting with status %d.", path, name, exit_code)
    sys.exit(exit_code)

  def handler(signum, frame):
    name = signal.Signals(signum).name
    if saving.is_set():
      logger.warning("%s received while saving for an earlier signal: ignored.", name)
      return
    saving.set()
    if _locks.held():
      logger.warning("%s received inside a jaxckpt call: saving once it returns.", name)
      _locks.defer(lambda: save_and_exit(name))
      return
    logger.warning("%s received: waiting for in-flight saves, then saving.", name)
    save_and_exit(name)

  previous = {s: signal.signal(s, handler) for s in signals}

  def uninstall() -> None:
    for s, old in previous.items():
      signal.signal(s, old)

  return uninstall
