"""`checkpoints_iterator`: TF's ``tf.train.checkpoints_iterator``, for evaluation loops."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from collections.abc import Iterator

from jaxckpt import _knobs
from jaxckpt._state_file import latest_checkpoint
from jaxckpt._store import fspath

logger = logging.getLogger("jaxckpt")


def _wait_for_new(directory: str, last: str | None, timeout: float | None) -> str | None:
  """The directory's latest checkpoint once it differs from ``last``; None on timeout."""
  stop = None if timeout is None else time.time() + timeout
  while True:
    path = latest_checkpoint(directory)
    if path is not None and path != last:
      return path
    if stop is not None and time.time() + _knobs.POLL_INTERVAL_S > stop:
      return None
    time.sleep(_knobs.POLL_INTERVAL_S)


def checkpoints_iterator(
  checkpoint_dir: str | os.PathLike,
  min_interval_secs: float = 0,
  timeout: float | None = None,
  timeout_fn: Callable[[], bool] | None = None,
) -> Iterator[str]:
  """Yields each new latest checkpoint of a directory as it appears, like TF's.

  Polls the directory's state file. After ``timeout`` seconds without a new
  checkpoint it stops, or, with ``timeout_fn``, calls it and stops if it
  returns True (else keeps waiting). As in TF, ``timeout_fn`` is also asked
  after each yielded checkpoint, and at least ``min_interval_secs`` pass
  between two yields. Checkpoints saved while the caller works on one are
  skipped: only the latest is yielded.

  Args:
    checkpoint_dir: the directory the checkpoints are saved in.
    min_interval_secs: the least time between two yields.
    timeout: the most seconds to wait for the next checkpoint; None waits forever.
    timeout_fn: called after a timeout (and after each yield); True stops.

  Returns:
    An iterator of checkpoint paths, as `latest_checkpoint` returns them.

  Raises:
    NotACheckpointError: the directory's state file is damaged.

  Examples:
    >>> import jaxckpt, jax.numpy as jnp, tempfile
    >>> d = tempfile.mkdtemp()
    >>> path = jaxckpt.Checkpoint(w=jnp.ones(2)).save(d + "/ckpt")
    >>> list(jaxckpt.train.checkpoints_iterator(d, timeout=0)) == [path]
    True
  """
  directory = fspath(checkpoint_dir)
  path = None
  while True:
    new = _wait_for_new(directory, path, timeout)
    if new is not None:
      start = time.time()
      path = new
      yield path
      remaining = start + min_interval_secs - time.time()
      if remaining > 0:
        time.sleep(remaining)
    elif timeout_fn is None:
      logger.info("Timed out waiting for a checkpoint in %s.", directory)
      return
    if timeout_fn is not None and timeout_fn():
      logger.info("No new checkpoints will come to %s (timeout_fn returned True).", directory)
      return
