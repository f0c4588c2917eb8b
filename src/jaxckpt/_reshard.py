"""TF's ``experimental_sharding_callback`` and ``experimental_skip_slot_variables``, for JAX.

TF's sharding callback decides how a checkpoint is split into files; the
nearest JAX meaning is the `jax.sharding.Sharding` each array has while it is
written (its on-disk chunks follow it) and once it is restored. The callback is
called as ``callback(name, shape, dtype)`` for every ``jax.Array`` leaf (and
abstract restore target) and returns a ``Sharding``, or None to keep the
current one. TF's slot variables are optimizer state; here a leaf is one when a
component of its name is ``opt_state`` (``nnx.Optimizer`` and the usual
``opt_state=`` item).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxckpt._errors import InvalidOptionsError
from jaxckpt._tree import Leaf

SLOT_COMPONENT = "opt_state"


def is_slot(name: str) -> bool:
  """Whether the leaf ``name`` is optimizer state (TF: a slot variable)."""
  return SLOT_COMPONENT in name.split("/")


def _sharding_for(callback: Callable[..., Any], leaf: Leaf) -> jax.sharding.Sharding | None:
  sharding = callback(leaf.name, leaf.shape, leaf.dtype)
  if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
    raise InvalidOptionsError(
      f"experimental_sharding_callback returned {type(sharding).__name__} {sharding!r} "
      f"for '{leaf.name}'; expected a jax.sharding.Sharding or None."
    )
  return sharding


def reshard_for_save(leaves: list[Leaf], callback: Callable[..., Any] | None) -> list[Leaf]:
  """Leaves whose ``jax.Array`` values are placed as ``callback`` says, for writing."""
  if callback is None:
    return leaves
  out = []
  for leaf in leaves:
    sharding = _sharding_for(callback, leaf) if isinstance(leaf.value, jax.Array) else None
    if sharding is not None and sharding != leaf.value.sharding:
      leaf = dataclasses.replace(leaf, value=jax.device_put(leaf.value, sharding))
    out.append(leaf)
  return out


def reshard_for_restore(leaves: list[Leaf], callback: Callable[..., Any] | None) -> list[Leaf]:
  """Restore targets: ``jax.Array`` leaves become abstract values in ``callback``'s sharding."""
  if callback is None:
    return leaves
  out = []
  for leaf in leaves:
    arrayish = isinstance(leaf.value, (jax.Array, jax.ShapeDtypeStruct))
    sharding = _sharding_for(callback, leaf) if arrayish else None
    if sharding is not None:
      target = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
      leaf = dataclasses.replace(leaf, value=target)
    out.append(leaf)
  return out
