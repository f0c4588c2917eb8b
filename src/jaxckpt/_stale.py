"""Warns once when saves keep writing the same arrays while other values move.

JAX arrays are immutable: ``params = update(params)`` makes a new array and
leaves ``ckpt.params`` pointing at the old one. A TF user (whose variables are
mutable) who updates ``ckpt.step`` but never re-assigns ``ckpt.params`` saves
the initial weights forever. The sign is a save whose every tracked array is
the very object of the previous save although a scalar (a step) changed.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import jax
import numpy as np

from jaxckpt._tree import Leaf

logger = logging.getLogger("jaxckpt")


def _is_array(value: Any) -> bool:
  # jax.Arrays only: a numpy array may have been updated in place.
  return isinstance(value, jax.Array) and value.ndim > 0


def _ref(value: Any) -> Any:
  try:
    return weakref.ref(value)
  except TypeError:  # Python and numpy scalars: compared by value.
    return None


def _same(ref: Any, old: Any, value: Any) -> bool:
  if ref is not None:
    return ref() is value
  try:
    return bool(np.all(old == value)) and type(old) is type(value)
  except Exception:  # noqa: BLE001 - Uncomparable: treated as changed.
    return False


# Arrays held by weak reference per save; the others are compared by id (see `check`).
_SAMPLED = 16


class StaleSaves:
  """One per `Checkpoint`: what its previous save held, and whether it warned."""

  def __init__(self):
    # (names, ids, {index: weak reference}) of the previous save's arrays.
    self._arrays: tuple[tuple[str, ...], tuple[int, ...], dict[int, Any]] | None = None
    self._scalars: dict[str, tuple[Any, Any]] = {}
    self._warned = False

  def check(self, leaves: list[Leaf], path: str) -> None:
    """Records this save's arrays and scalars; warns if every array is the object
    of the previous save while a scalar moved.

    Arrays are compared by id, and a sample of them by weak reference: an id is
    reused only once its array is freed, and every array replaced by one at the
    same address, in the same order, while the sampled ones stayed, is not what
    a training loop does. One weak reference per array was a GC-tracked object
    per leaf per save, kept until the next one (for thousands of leaves, a full
    collection of the process almost every save).
    """
    names, values, scalars = [], [], {}
    for leaf in leaves:
      if _is_array(leaf.value):
        names.append(leaf.name)
        values.append(leaf.value)
      elif np.ndim(leaf.value) == 0:
        scalars[leaf.name] = leaf.value
    previous, previous_scalars = self._arrays, self._scalars
    every = max(1, len(values) // _SAMPLED)
    current = (
      tuple(names),
      tuple(map(id, values)),
      {i: weakref.ref(values[i]) for i in range(0, len(values), every)},
    )
    self._arrays = current
    self._scalars = {}
    for name, value in scalars.items():
      ref = _ref(value)
      self._scalars[name] = (ref, value if ref is None else None)
    if self._warned or previous is None or not values or previous[:2] != current[:2]:
      return
    if not all(ref() is values[i] for i, ref in previous[2].items()):
      return
    moved = [
      name
      for name, value in scalars.items()
      if name in previous_scalars and not _same(*previous_scalars[name], value)
    ]
    if moved:
      self._warned = True
      logger.warning(
        "Saving %s: every tracked array is the very object saved last time, but %s "
        "changed. JAX arrays are immutable, so updating a local variable does not "
        "update the Checkpoint: re-assign the items after each update (e.g. "
        "ckpt.net = params; ckpt.opt_state = opt_state) before saving. "
        "This warning is logged once.",
        path,
        ", ".join(repr(n) for n in moved[:5]),
      )
