"""Where Orbax 0.12 does not do what jaxckpt needs, and the smallest fix.

Orbax's ``NumpyHandler`` writes numpy arrays only on process 0: its
``_background_serialize`` hard-codes ``if multihost.process_index() == 0``,
whatever ``primary_host`` says, and its ``ArrayHandler`` refuses arrays that
live on one process when there are several ("Cannot serialize host local
jax.Array"). So a save whose I/O runs on another process (TF's
``experimental_io_device="/task:1"``) would silently write no data. The handler
below is Orbax's method with the writer made a parameter; it is used only for
those saves, through a per-handler type registry (the global one is untouched).

Orbax also logs TensorStore's raw I/O byte counts around every array batch it
writes or reads, through ``tensorstore_utils.get_tensorstore_raw_bytes``, which
calls ``ts.experimental_collect_matching_metrics``. In tensorstore 0.1.86 that
call leaks the Python objects it returns (measured: 24.6 KB of RSS per call once
file-kvstore metrics exist, 4.3 KB of it traced Python objects; 2+ calls per
save), which was the ~40-100 KB per save RSS drift of benchmarks/soak.py.
`stop_metrics_leak` swaps in the same sum computed from the Prometheus-format
metrics, which does not leak (3 bytes per call).
"""

from __future__ import annotations

import asyncio

import numpy as np
import tensorstore as ts
from orbax.checkpoint._src import asyncio_utils
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry
from orbax.checkpoint._src.serialization import type_handlers
from orbax.checkpoint._src.serialization import types


class NumpyOnProcessHandler(type_handlers.NumpyHandler):
  """Orbax's ``NumpyHandler``, writing on process ``writer`` instead of 0."""

  def __init__(self, writer: int):
    super().__init__()
    self._writer = writer

  async def _background_serialize(self, values, infos, args=None):
    # Copied from orbax-checkpoint 0.12 type_handlers.NumpyHandler; only the
    # `process_index() == ...` line differs.
    write_coros = []
    for value, info, arg in zip(values, infos, args, strict=True):
      await info.await_path_creation()
      array_write_spec = ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=value.shape,
          dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(
              use_ocdbt=info.is_ocdbt_checkpoint,
              override_ocdbt_process_id=self._override_ocdbt_process_id),
          metadata_key=self._metadata_key)
      if multihost.process_index() == self._writer:
        write_coros.append(self._open_and_write(value, array_write_spec.json, info.ts_context))
    await asyncio_utils.cancellable(
        asyncio.gather(*write_coros),
        message="[process=%s] Numpy handler gather was cancelled.",
        process_index=multihost.process_index())


def registry_writing_on(process: int) -> types.TypeHandlerRegistry:
  """A type registry for saves of numpy values written by ``process``."""
  return type_handler_registry.create_type_handler_registry(
      (np.ndarray, NumpyOnProcessHandler(process)))


def _raw_bytes(direction: types.IoDirection = types.IoDirection.WRITE) -> int:
  """``ts_utils.get_tensorstore_raw_bytes`` without the leaking metrics call."""
  suffix = "_bytes_written" if direction == types.IoDirection.WRITE else "_bytes_read"
  total = 0
  for line in ts.experimental_collect_prometheus_format_metrics("/tensorstore/kvstore/"):
    name, _, value = line.rpartition(" ")
    if not line.startswith("#") and name.split("{", 1)[0].endswith(suffix):
      try:
        total += int(float(value))
      except ValueError:
        pass
  return total


def stop_metrics_leak() -> None:
  """Makes Orbax count TensorStore's raw bytes without leaking (see the module doc).

  Process-wide: Orbax calls the function through its module, from any handler.
  """
  if ts_utils.get_tensorstore_raw_bytes is not _raw_bytes:
    ts_utils.get_tensorstore_raw_bytes = _raw_bytes
