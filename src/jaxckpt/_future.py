"""Commit futures and the path strings that carry them."""

from __future__ import annotations

import concurrent.futures


class CommitFuture(concurrent.futures.Future):
  """Resolves to the committed checkpoint path once the save is complete.

  "Complete" means: data durable, directory renamed to its final path, write
  callbacks run, state file updated. A failure anywhere (including a raising
  callback) fails the future with a `SaveError`. It is a real
  ``concurrent.futures.Future``: ``result(timeout)``, ``done()``,
  ``exception()``, ``add_done_callback`` and ``concurrent.futures.wait`` work.

  Args:
    path: the path being saved.

  Attributes:
    path: the path being saved (known before the save completes).

  Examples:
    >>> import jaxckpt, tempfile, concurrent.futures
    >>> ckpt = jaxckpt.Checkpoint(step=1)
    >>> opts = jaxckpt.CheckpointOptions(enable_async=True)
    >>> future = ckpt.save(tempfile.mkdtemp() + "/ckpt", options=opts).future
    >>> isinstance(future, concurrent.futures.Future)
    True
    >>> future.result(timeout=60) == future.path
    True
  """

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def __repr__(self) -> str:
    state = (
      "cancelled"
      if self.cancelled()
      else "finished"
      if self.done()
      else "running"
      if self.running()
      else "pending"
    )
    return f"<CommitFuture {self.path!r} {state}>"


class SavePath(str):
  """The ``str`` path TF's ``save``/``write`` return, with its commit future.

  A plain ``str`` everywhere a path is expected; pickles and copies as one.
  Made by jaxckpt's saves (``SavePath(path, future)``), not by users.

  Attributes:
    future: the `CommitFuture` that resolves once the save is committed.

  Examples:
    >>> import jaxckpt, jax.numpy as jnp, tempfile
    >>> ckpt = jaxckpt.Checkpoint(w=jnp.ones(3))
    >>> opts = jaxckpt.CheckpointOptions(enable_async=True)
    >>> path = ckpt.save(tempfile.mkdtemp() + "/ckpt", options=opts)
    >>> path.future.result(timeout=60) == path
    True
  """

  future: CommitFuture

  def __new__(cls, path: str, future: CommitFuture) -> SavePath:
    self = super().__new__(cls, path)
    self.future = future
    return self

  def __reduce__(self):  # Pickles (and copies) as a plain string.
    return (str, (str(self),))
