"""TF's load status: what a restore matched, with TF's assertion methods."""

from __future__ import annotations

import logging
import weakref
from typing import NoReturn

from jaxckpt._errors import LoadStatusError

logger = logging.getLogger("jaxckpt")


def _list(names) -> str:
  names = sorted(names)
  shown = ", ".join(repr(n) for n in names[:10])
  return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _warn_unused(path: str, box: list[frozenset[str]], silenced: list[bool]) -> None:
  unused = box[0]
  if unused and not silenced[0]:
    logger.warning(
      "Values in checkpoint %s were never restored (nothing tracks them): %s. "
      "Call expect_partial() on the load status to silence this.",
      path,
      _list(unused),
    )


def _structure_hints(missing: frozenset[str], unused: frozenset[str]) -> str:
  """Explains missing/unused pairs that are really one structure mismatch."""
  hints = []
  for name in sorted(missing):
    below = sorted(u for u in unused if u.startswith(name + "/"))
    if below:
      hints.append(
        f"at '{name}' the checkpoint has a subtree ({_list(below)}) but a single value is tracked"
      )
    above = [u for u in unused if name.startswith(u + "/")]
    if above:
      hints.append(
        f"at '{above[0]}' the checkpoint has a single value but a subtree "
        f"(incl. '{name}') is tracked"
      )
  hints = list(dict.fromkeys(hints))
  return (" Structure differs: " + "; ".join(hints) + ".") if hints else ""


class LoadStatus:
  """Returned by `Checkpoint.restore`/`read`; every method returns ``self``.

  The assertions also count ``save_counter`` as TF does: `restore` tracks it,
  `read` tracks it once it exists (after a save or restore), and a `write` by a
  Checkpoint that never saved stores none.

  If checkpoint values were not restored and neither `assert_consumed` nor
  `expect_partial` was called, a WARNING names them when the status is freed.

  Args:
    path: the checkpoint restored from.
    tracked: the names the `Checkpoint` tracks.
    in_checkpoint: the names the checkpoint holds.

  Attributes:
    path: the checkpoint restored from.
    matched: names restored (tracked and in the checkpoint).
    missing: tracked names absent from the checkpoint (left unchanged).
    unused: checkpoint names nothing tracks (not read). An item assigned to the
      Checkpoint later under an unused name is restored then (TF's deferred
      restoration) and moves to ``matched``.

  Examples:
    >>> import jaxckpt, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = jaxckpt.Checkpoint(a=1, b=2).save(d + "/ckpt")
    >>> status = jaxckpt.Checkpoint(a=0, c=0).restore(jaxckpt.latest_checkpoint(d))
    >>> sorted(status.matched), sorted(status.missing), sorted(status.unused)
    (['a'], ['c'], ['b'])
    >>> _ = status.expect_partial()
  """

  def __init__(
    self,
    path: str,
    tracked: set[str],
    in_checkpoint: set[str],
    counter: tuple[bool, bool] = (False, False),
  ):
    self.path = path
    self.matched = frozenset(tracked & in_checkpoint)
    self.missing = frozenset(tracked - in_checkpoint)
    self.unused = frozenset(in_checkpoint - tracked)
    counter_tracked, counter_saved = counter
    self._counter = {"save_counter"} if counter_tracked and counter_saved else set()
    self._counter_missing = {"save_counter"} if counter_tracked and not counter_saved else set()
    self._counter_unused = {"save_counter"} if counter_saved and not counter_tracked else set()
    self._silenced = [False]
    self._unused_box = [self.unused]  # The finalizer sees values restored later.
    weakref.finalize(self, _warn_unused, path, self._unused_box, self._silenced)

  def _restored_later(self, names: set[str]) -> None:
    """Names a deferred restoration (see `Checkpoint`) has just restored."""
    self.matched = self.matched | names
    self.unused = self.unused - names
    self._unused_box[0] = self.unused

  def assert_consumed(self) -> LoadStatus:
    """Checks that every checkpoint value was restored and every tracked value found.

    Returns:
      This status.

    Raises:
      LoadStatusError: a tracked value is missing from the checkpoint, or a
        checkpoint value is not tracked (an AssertionError).

    Examples:
      >>> import jaxckpt
      >>> jaxckpt.LoadStatus("ckpt-1", {"a"}, {"a"}).assert_consumed()
      LoadStatus('ckpt-1', matched=1, missing=0, unused=0)
    """
    self.assert_existing_objects_matched()
    if self.unused or self._counter_unused:
      raise LoadStatusError(
        f"Unresolved values in checkpoint {self.path!r}: "
        f"{_list(self.unused | self._counter_unused)} "
        "are in the checkpoint but not tracked. Track them, or use "
        "assert_existing_objects_matched() if that is intended."
      )
    self._silenced[0] = True
    return self

  def assert_existing_objects_matched(self) -> LoadStatus:
    """Checks that every tracked value was found (extra checkpoint values are fine).

    Returns:
      This status.

    Raises:
      LoadStatusError: a tracked value is missing from the checkpoint.

    Examples:
      >>> import jaxckpt
      >>> status = jaxckpt.LoadStatus("ckpt-1", {"a"}, {"a", "b"})
      >>> status.expect_partial().assert_existing_objects_matched()
      LoadStatus('ckpt-1', matched=1, missing=0, unused=1)
    """
    if self.missing or self._counter_missing:
      raise LoadStatusError(
        f"Tracked values not found in checkpoint {self.path!r}: "
        f"{_list(self.missing | self._counter_missing)}; they kept their current values."
        + _structure_hints(self.missing, self.unused)
      )
    return self

  def assert_nontrivial_match(self) -> LoadStatus:
    """Checks that at least one tracked value (``save_counter`` included, as in TF)
    was restored.

    Returns:
      This status.

    Raises:
      LoadStatusError: nothing tracked matched the checkpoint.

    Examples:
      >>> import jaxckpt
      >>> jaxckpt.LoadStatus("ckpt-1", {"a", "c"}, {"a"}).assert_nontrivial_match()
      LoadStatus('ckpt-1', matched=1, missing=1, unused=0)
    """
    if not self.matched and not self._counter:
      raise LoadStatusError(
        f"Nothing tracked matched checkpoint {self.path!r} (tracked: "
        f"{_list(self.missing) or 'nothing'}; in checkpoint: {_list(self.unused)})."
      )
    return self

  def expect_partial(self) -> LoadStatus:
    """Silences the warning about checkpoint values that were not restored.

    Returns:
      This status.

    Examples:
      >>> import jaxckpt
      >>> jaxckpt.LoadStatus("ckpt-1", {"a"}, {"a", "b"}).expect_partial().unused
      frozenset({'b'})
    """
    self._silenced[0] = True
    return self

  def __repr__(self) -> str:
    return (
      f"LoadStatus({self.path!r}, matched={len(self.matched)}, "
      f"missing={len(self.missing)}, unused={len(self.unused)})"
    )


class InitializationOnlyStatus(LoadStatus):
  """What ``restore(None)`` returns (e.g. ``restore(latest_checkpoint(d))`` on a
  fresh directory): nothing was restored; the assertions say so."""

  def __init__(self, tracked: set[str]):
    super().__init__("<no checkpoint>", tracked, set())

  def _fail(self) -> NoReturn:
    raise LoadStatusError("No checkpoint specified (save_path=None); nothing was restored.")

  def assert_consumed(self) -> LoadStatus:
    self._fail()

  def assert_existing_objects_matched(self) -> LoadStatus:
    self._fail()

  def assert_nontrivial_match(self) -> LoadStatus:
    self._fail()
