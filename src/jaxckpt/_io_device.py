"""Resolves TF-style ``experimental_io_device`` values to a ``jax.Device``.

TF device strings map onto JAX's runtime like this:

* ``/job:NAME`` — any job name (JAX has one job: all processes started by
  ``jax.distributed.initialize``). ``/task:K`` (and ``/replica:R``, which must
  be 0) names the process with ``jax.process_index() == K``; without it, this
  process. With several processes, naming a task routes all file I/O through
  that process (see _routed.py).
* ``/device:TYPE:N``, ``TYPE:N``, ``/TYPE:N`` — device N of backend TYPE
  (``CPU``, ``GPU``, ``TPU``) among that process's devices.
* No device part (``"/job:localhost"``) — the host CPU of that task, which is
  what TF places save ops on.

``None`` means no routing: each device's shards go straight to storage.
"""

from __future__ import annotations

import re

import jax

from jaxckpt._errors import UnknownDeviceError

_SPEC = re.compile(
  r"^(?:/job:(?P<job>[A-Za-z0-9_\-]+))?"
  r"(?:/replica:(?P<replica>\d+))?"
  r"(?:/task:(?P<task>\d+))?"
  r"(?:/?(?:device:)?(?P<type>[A-Za-z]+):(?P<index>\d+|\*))?$"
)


def _available() -> str:
  devices = []
  for backend in ("cpu", jax.default_backend()):
    try:
      devices += [d for d in jax.devices(backend=backend) if d not in devices]
    except RuntimeError:
      pass
  per_task: dict[tuple[int, str], int] = {}
  names = []
  for d in devices:  # TF numbers devices per task and type; so do we.
    key = (d.process_index, d.platform)
    i = per_task[key] = per_task.get(key, -1) + 1
    names.append(f"/job:localhost/task:{d.process_index}/device:{d.platform.upper()}:{i}")
  return ", ".join(names) + " (or a jax.Device, or None)"


def resolve_io_device(spec) -> jax.Device | None:
  """Returns the device whose host does the I/O, or None for direct I/O.

  Raises:
    UnknownDeviceError: ``spec`` names no device of this process; the message
      lists the available ones.
  """
  if spec is None:
    return None
  if isinstance(spec, jax.Device):
    return spec
  if not isinstance(spec, str):
    raise UnknownDeviceError(
      f"experimental_io_device must be None, a TF device string or a jax.Device, "
      f"got {type(spec).__name__} {spec!r}. Available: {_available()}."
    )
  text = spec.strip()
  m = _SPEC.match(text)
  if not text or m is None:
    raise UnknownDeviceError(
      f"experimental_io_device {spec!r} is not a device string like "
      f"'/job:localhost', '/job:worker/task:0/device:CPU:0' or 'cpu:0'. "
      f"Available: {_available()}."
    )
  if m["replica"] not in (None, "0"):
    raise UnknownDeviceError(
      f"experimental_io_device {spec!r}: replica {m['replica']} does not exist; "
      f"JAX has one replica per job. Available: {_available()}."
    )
  task = jax.process_index() if m["task"] is None else int(m["task"])
  if task >= jax.process_count():
    raise UnknownDeviceError(
      f"experimental_io_device {spec!r} names task {task}, but there are "
      f"{jax.process_count()} JAX processes (tasks 0..{jax.process_count() - 1}). "
      f"Available: {_available()}."
    )
  backend = (m["type"] or "cpu").lower()
  index = 0 if m["index"] in (None, "*") else int(m["index"])
  try:
    devices = [d for d in jax.devices(backend=backend) if d.process_index == task]
  except RuntimeError:
    devices = []
  # TF numbers devices per task; JAX ids are global, so index into the task's.
  if index >= len(devices):
    raise UnknownDeviceError(
      f"experimental_io_device {spec!r}: no {backend.upper()}:{index} device in "
      f"task {task}. Available: {_available()}."
    )
  return devices[index]
