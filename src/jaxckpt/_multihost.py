"""Multi-process saves under ``jax.distributed``: who does what, and how processes agree.

Every process calls ``save``/``restore`` with the same arguments in the same
order (as with any JAX collective). Each process writes only its own shards
(Orbax/TensorStore); process 0, the *primary*, writes jaxckpt's manifest, makes
the checkpoint durable, renames it into place, writes the state file and
deletes old checkpoints. The others learn the outcome from the primary.

Saves run on a background thread while the training step may run collectives
on the main thread, so nothing here (nor in the Orbax calls jaxckpt makes) uses
XLA collectives: all agreement goes through the ``jax.distributed``
coordination service's key-value store and barriers, each with a timeout. A
process that dies mid-save makes the others fail that save within
``CheckpointOptions(timeout_s=...)`` instead of hanging.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading

import jax

from jaxckpt import _compat
from jaxckpt import _knobs
from jaxckpt._errors import CoordinationError

logger = logging.getLogger("jaxckpt")

PRIMARY = 0

# Per-process sequence of multi-process operations. Every process performs the
# same saves and restores in the same order, so the n-th one has the same
# number everywhere and names its keys in the coordination service.
_sequence = itertools.count(1)
_sequence_lock = threading.Lock()
_swept_through = 0  # Operations whose keys are deleted (on process 0).


def process_count() -> int:
  return jax.process_count()


def is_primary() -> bool:
  return jax.process_index() == PRIMARY


def _client():
  client = _compat.distributed_client()
  if client is None:
    raise CoordinationError(
      f"jax.process_count() is {jax.process_count()} but jax.distributed is not "
      "initialized; call jax.distributed.initialize() before saving."
    )
  return client


@dataclasses.dataclass(frozen=True)
class Coordination:
  """One multi-process operation: its number, timeout and key-value helpers.

  ``primary`` finalizes (writes metadata, commits, records); ``writers`` are
  the processes that touch files at all: every process normally, only the
  ``experimental_io_device`` task when one is named.
  """

  op: int
  timeout_s: float
  what: str  # For error messages, e.g. "save of '/ckpt/ckpt-3'".
  primary: int = PRIMARY
  writers: frozenset[int] | None = None  # None: all processes.

  @property
  def is_primary(self) -> bool:
    return jax.process_index() == self.primary

  @property
  def writes(self) -> bool:
    return self.writers is None or jax.process_index() in self.writers

  def orbax_options(self):
    """Orbax MultiprocessingOptions matching this operation (see `new_checkpointer`)."""
    import orbax.checkpoint as ocp

    return ocp.options.MultiprocessingOptions(
      primary_host=self.primary,
      active_processes=set(self.writers or range(process_count())),
      barrier_sync_key_prefix=f"jaxckpt{self.op}",
    )

  def _key(self, name: str) -> str:
    return f"jaxckpt/{self.op}/{name}"

  @property
  def _timeout_ms(self) -> int:
    return max(1, int(self.timeout_s * 1000))

  def publish(self, name: str, value: str) -> None:
    _client().key_value_set(self._key(name), value)

  def receive(self, name: str, sender: int | None = None) -> str:
    """Waits for ``publish(name, ...)`` by ``sender`` (default: the primary)."""
    sender = self.primary if sender is None else sender
    try:
      return _client().blocking_key_value_get(self._key(name), self._timeout_ms)
    except Exception as e:  # JaxRuntimeError(DEADLINE_EXCEEDED) and the like.
      raise CoordinationError(
        f"The {self.what} gave up after {self.timeout_s:g} s: process {sender} did "
        f"not report '{name}' (it may have died or be stuck). No checkpoint was "
        f"committed by this save. Underlying error: {type(e).__name__}: {e}"
      ) from e

  def share(self, name: str, make) -> str:
    """``make()`` on the primary, the same string on every process."""
    if self.is_primary:
      value = make()
      self.publish(name, value)
      return value
    return self.receive(name)

  def agree(self, name: str, value: str) -> None:
    """Checks that every process reached this operation with the same ``value``
    (e.g. the path it saves to or restores from); all raise if one differs.

    Raises:
      CoordinationError: the processes disagree (naming who said what), or one
        did not report within ``timeout_s``.
    """
    me = jax.process_index()
    _client().key_value_set(self._key(f"agree/{name}/{me}"), value)
    said = {me: value}
    for process in range(process_count()):
      if process != me:
        said[process] = self.receive(f"agree/{name}/{process}", sender=process)
    if len(set(said.values())) > 1:
      raise CoordinationError(
        f"The processes disagree on the {self.what}: "
        + "; ".join(f"process {p}: {v}" for p, v in sorted(said.items()))
        + ". Every process must make the same save/restore calls, in the same order, "
        "with the same paths; nothing was read or written."
      )

  def barrier(self, name: str) -> None:
    try:
      _client().wait_at_barrier(self._key(name), self._timeout_ms)
    except Exception as e:
      try:  # The primary may have failed and said why.
        reason = _client().key_value_try_get(self._key("committed"))
      except Exception:
        reason = None
      if reason and reason != "ok":
        raise CoordinationError(
          f"The {self.what} failed on process {self.primary}: {reason}"
        ) from e
      raise CoordinationError(
        f"The {self.what} gave up after {self.timeout_s:g} s waiting for all "
        f"{process_count()} processes at '{name}' (one may have died or be "
        f"stuck). Underlying error: {type(e).__name__}: {e}"
      ) from e


def begin(
  what: str, timeout_s: float, *, io_device: jax.Device | None = None
) -> Coordination | None:
  """Numbers the next multi-process operation; None with a single process.

  Call on the caller's thread, in program order. ``io_device``'s process is the
  only one that touches files (TF's ``experimental_io_device``).
  """
  if process_count() == 1:
    return None
  with _sequence_lock:
    op = next(_sequence)
  io_process = None if io_device is None else io_device.process_index
  if io_process is None:
    return Coordination(op=op, timeout_s=timeout_s, what=what)
  return Coordination(
    op=op, timeout_s=timeout_s, what=what, primary=io_process, writers=frozenset([io_process])
  )


def sweep_keys(op: int) -> None:
  """Deletes the coordination-service keys of operations ``<= op - KEEP``.

  Without this every save left its keys (staging name, CRCs, outcome) in the
  service for the life of the job. Those old operations are finished on every
  process: a process cannot fall further behind process 0 than the saves it
  may have in flight (``max_in_flight`` per Checkpoint), since process 0's
  saves wait for it at their first barrier. Runs on process 0, after a save.
  """
  global _swept_through
  if jax.process_index() != PRIMARY:
    return
  upto = op - _knobs.COORDINATION_KEEP_OPS
  with _sequence_lock:
    first, _swept_through = _swept_through + 1, max(_swept_through, upto)
  for old in range(first, upto + 1):
    try:
      _client().key_value_delete(f"jaxckpt/{old}")  # The key and all under "jaxckpt/{old}/".
    except Exception as e:  # Housekeeping only.
      logger.debug("Could not delete coordination keys of operation %d: %s", old, e)
