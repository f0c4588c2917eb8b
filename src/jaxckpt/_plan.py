"""Save and restore plans: every decision about an operation, made once.

A plan is built on the caller's thread from the tracked leaves, the options and
the path, before anything is copied or written: where the checkpoint goes (the
`Store`), how its arrays are laid out (the `Layout`), who writes them (the fast
TensorStore writer or Orbax), how many bytes of staging buffers the snapshot
may keep for the next save, whether leaves may be reused (incremental), whether one process does
all file I/O (``experimental_io_device`` under ``jax.distributed``) and how the
processes coordinate. Later stages execute the plan and never decide again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax

from jaxckpt import _fastwrite
from jaxckpt import _packed
from jaxckpt import _staging
from jaxckpt._errors import InvalidOptionsError
from jaxckpt._errors import TreeError
from jaxckpt._layout import Layout
from jaxckpt._layout import layout_for_store
from jaxckpt._multihost import Coordination
from jaxckpt._options import CheckpointOptions
from jaxckpt._store import Store
from jaxckpt._store import fspath
from jaxckpt._store import store_for
from jaxckpt._tree import Leaf

FAST = "fast"  # jaxckpt's TensorStore writer (see _fastwrite.py).
ORBAX = "orbax"  # Orbax's AsyncCheckpointer.


@dataclasses.dataclass(frozen=True)
class SaveRequest:
  """What a caller asks for: ``path_for(save_counter)`` names the checkpoint;
  ``kind == "save"`` increments the counter; ``on_commit(path, owner)`` runs
  after the write callbacks (``owner`` is False on processes that must not
  touch files)."""

  path_for: Callable[[int], str]
  kind: str  # "save" or "write"
  on_commit: Callable[[str, bool], None] | None = None


@dataclasses.dataclass(frozen=True)
class SavePlan:
  """One save, decided: the later stages only execute it."""

  path: str  # As the caller wrote it (returned, passed to callbacks).
  target: str  # Its absolute form, fixed now (the cwd may change).
  kind: str
  save_counter: int
  store: Store
  layout: Layout
  writer: str  # FAST or ORBAX (the Orbax PyTree layout); FAST for zarr3.
  keep_staging_bytes: int  # Staging buffers kept for the next save (_staging.py).
  background: bool
  io_device: jax.Device | None
  routed: bool  # One process gathers everything and does all file I/O (_routed.py).
  coordination: Coordination | None
  incremental: bool
  compression: bool
  chunk_byte_size: int | None
  callbacks: tuple[Callable[..., Any], ...]
  on_commit: Callable[[str, bool], None] | None
  nbytes: int
  counter_saved: bool = True  # Whether the manifest records save_counter (see _manifest.py).
  # CPU arrays up to this size may be snapshotted as numpy views (see
  # _snapshot.py), which the fast writer describes by the arrays they view: the
  # ones it stores as single OCDBT keys, for which a copy each cost more than
  # their bytes. Larger ones keep their copy: a view keeps the next donating
  # step from reusing the buffer, which raised a training loop's peak memory.
  view_max_bytes: int = 0
  # Small arrays go into one file (_packed.py): the fast writer's, for states
  # of many such arrays or as CheckpointOptions.pack_small_arrays says.
  pack: bool = False


def _check_leaves(leaves: list[Leaf]) -> None:
  abstract = [leaf.name for leaf in leaves if leaf.abstract]
  if abstract:
    raise TreeError(
      f"Cannot save abstract values (jax.ShapeDtypeStruct) at {abstract[:5]}: they "
      "are restore targets. Restore or initialize them first."
    )


def _check_global(leaves: list[Leaf]) -> None:
  """Orbax writes jax.Arrays only as global arrays when several processes write."""
  local = [
    leaf.name
    for leaf in leaves
    if isinstance(leaf.value, jax.Array) and leaf.value.is_fully_addressable
  ]
  if local:
    raise TreeError(
      f"Cannot save {local[:5]} with {jax.process_count()} processes: each is a "
      "jax.Array on this process's devices only, and Orbax writes only global arrays "
      "when several processes write. Make it global (jax.device_put onto a "
      "NamedSharding over jax.devices()), or track np.asarray(value) to save this "
      "process's value."
    )


def _check_store(
  store: Store, path: str, options: CheckpointOptions, coordination: Coordination | None
) -> None:
  if options.incremental and coordination is not None:
    raise InvalidOptionsError(
      "incremental=True is single-process only: with several JAX processes every "
      "process would have to make the same reuse decisions. Use incremental=False."
    )
  if options.incremental and not store.incremental:
    raise InvalidOptionsError(
      "incremental=True needs a local path; memory://, s3:// and gs:// checkpoints are "
      "always written in full. Use incremental=False."
    )
  if coordination is not None and not store.shared(path):
    raise InvalidOptionsError(
      "memory:// is private to each process; with several JAX processes save to a "
      "shared filesystem path, s3:// or gs://."
    )


def plan_save(
  request: SaveRequest,
  options: CheckpointOptions,
  leaves: list[Leaf],
  *,
  save_counter: int,
  io_device: jax.Device | None,
  coordination: Coordination | None,
  counter_saved: bool = True,
) -> SavePlan:
  """Decides everything about one save (see the module docstring).

  Raises:
    TreeError: a leaf cannot be saved (e.g. an abstract restore target).
    InvalidOptionsError: the options do not fit the path or the processes.
  """
  _check_leaves(leaves)
  path = os.fspath(request.path_for(save_counter))
  store = store_for(path)
  _check_store(store, path, options, coordination)
  routed = coordination is not None and coordination.writers is not None
  layout = layout_for_store(store)
  if coordination is not None and not routed and layout.has_fast_writer:
    _check_global(leaves)
  data = [leaf for leaf in leaves if leaf.has_data]  # What the layout writes.
  single_writer = coordination is None or routed
  fast = (
    layout.has_fast_writer
    and single_writer
    and not options.compression
    and not options.incremental
    and _fastwrite.writes_all(data)
  )
  pack = fast and options.chunk_byte_size is None and _packs(options, data)
  return SavePlan(
    path=path,
    target=store.absolute(path),
    kind=request.kind,
    save_counter=save_counter,
    store=store,
    layout=layout,
    writer=FAST if fast or not layout.has_fast_writer else ORBAX,
    keep_staging_bytes=_or(options.keep_staging_bytes, _staging.default_keep_bytes),
    background=options.enable_async,
    io_device=io_device,
    routed=routed,
    coordination=coordination,
    incremental=options.incremental,
    compression=options.compression,
    chunk_byte_size=options.chunk_byte_size,
    callbacks=tuple(options.experimental_write_callbacks or ()),
    on_commit=request.on_commit,
    nbytes=sum(leaf.nbytes for leaf in leaves),
    counter_saved=counter_saved,
    view_max_bytes=_fastwrite.DIRECT_BYTES if fast and not routed else 0,
    pack=pack,
  )


def _or(value: int | None, default: Callable[[], int]) -> int:
  return default() if value is None else value


def _packs(options: CheckpointOptions, data: list[Leaf]) -> bool:
  if options.pack_small_arrays is not None:
    return options.pack_small_arrays
  small = 0
  for leaf in data:
    small += leaf.nbytes <= _packed.MAX_BYTES
  return small >= _packed.MIN_ARRAYS


@dataclasses.dataclass(frozen=True)
class RestorePlan:
  """One restore, decided."""

  path: str | None  # None: restore nothing (TF's behaviour for latest_checkpoint None).
  io_device: jax.Device | None
  routed: bool
  coordination: Coordination | None
  verify_checksums: bool
  restore_counter: bool


def plan_restore(
  save_path: str | os.PathLike | None,
  options: CheckpointOptions,
  *,
  io_device: jax.Device | None,
  coordination: Coordination | None,
  restore_counter: bool,
) -> RestorePlan:
  """Decides one restore: which path, who reads, what is checked."""
  return RestorePlan(
    path=None if save_path is None else fspath(save_path),
    io_device=io_device,
    routed=coordination is not None and coordination.writers is not None,
    coordination=coordination,
    verify_checksums=options.verify_checksums,
    restore_counter=restore_counter,
  )
