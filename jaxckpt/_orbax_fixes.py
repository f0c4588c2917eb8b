"""Where Orbax 0.12 does not do what jaxckpt needs, and the smallest fix.

Orbax's ``NumpyHandler`` writes numpy arrays only on process 0: its
``_background_serialize`` hard-codes ``if multihost.process_index() == 0``,
whatever ``primary_host`` says, and its ``ArrayHandler`` refuses arrays that
live on one process when there are several ("Cannot serialize host local
jax.Array"). So a save whose I/O runs on another process (TF's
``experimental_io_device="/task:1"``) would silently write no data. The handler
below is Orbax's method with the writer made a parameter; it is used only for
those saves, through a per-handler type registry (the global one is untouched).
"""

from __future__ import annotations

import asyncio

import numpy as np
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
