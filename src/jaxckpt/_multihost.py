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
import hashlib
import itertools
import json
import logging
import threading
from typing import Any

import jax

from jaxckpt import _compat
from jaxckpt import _knobs
from jaxckpt._errors import CoordinationError

logger = logging.getLogger("jaxckpt")

PRIMARY = 0
_FAILED = "__failed__"  # An `agree` value saying the process failed before agreeing.
_SHOWN = 3  # Differing tree entries named in a disagreement.

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
    """Sets this operation's key ``name`` for the other processes to `receive`.

    Raises:
      CoordinationError: the coordination service refused or is gone.
    """
    try:
      _client().key_value_set(self._key(name), value)
    except Exception as e:  # JaxRuntimeError: the service is gone, or the key exists.
      raise CoordinationError(
        f"The {self.what} could not reach the coordination service to report '{name}' "
        f"({type(e).__name__}: {e}); another process may have died."
      ) from e

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

  def agree(
    self, name: str, value: str | dict[str, Any], *, trees: dict[str, list] | None = None
  ) -> None:
    """Checks that every process reached this operation with the same ``value``
    (the path, or the fields of its plan that change what is written or read);
    all raise if one differs or reported a failure (`abandon`).

    ``trees`` are compared by digest; only when digests differ are the lists
    themselves exchanged, to name the entries that differ.

    Raises:
      CoordinationError: a process failed before agreeing, or the processes
        disagree (naming the processes, the field and each value), or one did
        not report within ``timeout_s``.
    """
    me = jax.process_index()
    fields = dict(value) if isinstance(value, dict) else {"value": value}
    for field, entries in (trees or {}).items():
      fields[field] = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    mine = json.dumps(fields, sort_keys=True)
    self.publish(f"agree/{name}/{me}", mine)
    late = self._gave_up(name)
    if late is not None:
      raise CoordinationError(
        f"The {self.what} came too late: process {late} gave up waiting for it after "
        f"{self.timeout_s:g} s (this process skipped or was slow on an earlier call). "
        "Nothing was written or read; the next call pairs with the others' next call."
      )
    said = {me: json.loads(mine)}
    try:
      for process in range(process_count()):
        if process != me:
          said[process] = json.loads(self.receive(f"agree/{name}/{process}", sender=process))
    except CoordinationError:
      try:  # A process that comes later fails at once instead of pairing with our next call.
        _client().key_value_set(self._key(f"agree/{name}/gave-up/{me}"), "1")
      except Exception:
        pass
      raise
    failed = {p: v[_FAILED] for p, v in sorted(said.items()) if _FAILED in v}
    if failed:
      raise CoordinationError(
        f"The {self.what} was abandoned: "
        + "; ".join(f"process {p} failed first ({why})" for p, why in failed.items())
        + ". Nothing was written or read by this operation on any process; the next "
        "identical call works once the cause is fixed."
      )
    self._exchange_differing_trees(name, said, trees or {})
    differ = _differences(said)
    if differ:
      raise CoordinationError(
        f"The processes disagree on the {self.what}: "
        + "; ".join(differ)
        + ". Every process must make the same save/restore calls, in the same order, "
        "with the same paths, options and tree; nothing was read or written."
      )

  def _exchange_differing_trees(
    self, name: str, said: dict[int, dict[str, Any]], trees: dict[str, list]
  ) -> None:
    """Replaces differing tree digests in ``said`` by the trees themselves (every
    process sees the same digests, so all exchange, or none)."""
    me = jax.process_index()
    for field, entries in trees.items():
      if len({v.get(field) for v in said.values()}) > 1:
        self.publish(f"agree/{name}/{field}/{me}", json.dumps(entries))
        for process in said:
          said[process][field] = (
            entries
            if process == me
            else json.loads(self.receive(f"agree/{name}/{field}/{process}", sender=process))
          )

  def _gave_up(self, name: str) -> int | None:
    """A process that stopped waiting for this agreement, if any."""
    try:
      entries = _client().key_value_dir_get(self._key(f"agree/{name}/gave-up/"))
    except Exception:  # Nothing there.
      return None
    return int(entries[0][0].rsplit("/", 1)[-1]) if entries else None

  def abandon(self, name: str, error: BaseException) -> None:
    """Tells the other processes, waiting in ``agree(name, ...)``, that this one
    failed before it got there, so that they raise at once instead of timing out
    (and the next operation's numbering stays the same everywhere)."""
    try:
      _client().key_value_set(
        self._key(f"agree/{name}/{jax.process_index()}"),
        json.dumps({_FAILED: f"{type(error).__name__}: {error}"}),
      )
    except Exception as e:  # Already published, or the service is gone: they time out.
      logger.debug("Could not report the failure of the %s: %s", self.what, e)

  def failure_elsewhere(self, name: str) -> str | None:
    """Another process's failure reported to ``agree(name, ...)`` so far, without waiting."""
    me = jax.process_index()
    for process in range(process_count()):
      if process == me:
        continue
      try:
        said = _client().key_value_try_get(self._key(f"agree/{name}/{process}"))
      except Exception:  # Not reported (yet).
        continue
      if said and _FAILED in json.loads(said):
        return f"process {process} failed ({json.loads(said)[_FAILED]})"
    return None

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


def _differences(said: dict[int, dict[str, Any]]) -> list[str]:
  """Each field whose value differs between processes, with every process's value."""
  out = []
  for field in sorted({f for values in said.values() for f in values}):
    values = {p: v.get(field) for p, v in sorted(said.items())}
    if len({json.dumps(v, sort_keys=True) for v in values.values()}) == 1:
      continue
    if all(isinstance(v, list) for v in values.values()):  # A tree: name its entries.
      entries = {p: [json.dumps(e) for e in v] for p, v in values.items() if isinstance(v, list)}
      reference, first = next(iter(entries.items()))
      known = set(first)
      for p, mine in entries.items():
        have = set(mine)
        extra = [e for e in mine if e not in known][:_SHOWN]
        missing = [e for e in first if e not in have][:_SHOWN]
        if extra or missing:
          out.append(
            f"{field}: process {p} has {', '.join(extra) or 'nothing more'} where "
            f"process {reference} has {', '.join(missing) or 'nothing more'}"
          )
      continue
    out.append(f"{field}: " + ", ".join(f"process {p}: {v!r}" for p, v in values.items()))
  return out


def timed_out(error: BaseException) -> bool:
  """Whether ``error`` (or what it wraps) is a coordination-service deadline."""
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if "DEADLINE_EXCEEDED" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False
