"""Multi-process cases where processes disagree or one fails (run by tests/distributed.py).

Each returns, per process, what happened (errors as "Class: message", seconds
taken) for tests/test_agreement.py to check.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from distributed_cases import SHAPE
from distributed_cases import bits_equal
from distributed_cases import full
from distributed_cases import reference
from distributed_cases import sharded
from jax.experimental import multihost_utils

import jaxckpt


def _attempt(fn) -> dict:
  start = time.perf_counter()
  try:
    value = fn()
    error = None
  except jaxckpt.JaxckptError as e:
    value, error = None, f"{type(e).__name__}: {e}"
  return {"error": error, "seconds": time.perf_counter() - start, "value": value}


def _flip_middle_byte(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def _own_data_files(ckpt_path: str) -> list[str]:
  data = os.path.join(ckpt_path, "state", f"ocdbt.process_{jax.process_index()}", "d")
  return [os.path.join(data, n) for n in sorted(os.listdir(data))]


def _sync(name: str) -> None:
  multihost_utils.sync_global_devices(name)  # Test-only: between operations.


def restores_that_fail_on_one_process(directory: str, timeout_s: float):
  """Process 1 alone cannot restore (another shape; then damaged data; then it
  is late): every process must end with a clear error within about timeout_s."""
  opts = jaxckpt.CheckpointOptions(timeout_s=timeout_s)
  ckpt = jaxckpt.Checkpoint(w=sharded(reference(1)))
  plain = str(ckpt.save(os.path.join(directory, "ckpt"), options=opts))
  packed = jaxckpt.CheckpointOptions(timeout_s=timeout_s, compression=True)
  zipped = str(ckpt.save(os.path.join(directory, "ckpt"), options=packed))
  out = {}
  if jax.process_index() == 1:  # Tracks another shape: fails before reading.
    ckpt.w = sharded(np.zeros((SHAPE[0], SHAPE[1] * 2), np.float32))
  out["shape"] = _attempt(lambda: ckpt.restore(plain, options=opts))
  ckpt.w = sharded(np.zeros(SHAPE, np.float32))
  _sync("damage")
  if jax.process_index() == 1:  # Its own compressed shards: fails inside Orbax's read.
    for file in _own_data_files(zipped):
      _flip_middle_byte(file)
  _sync("damaged")
  out["damaged"] = _attempt(lambda: ckpt.restore(zipped, options=opts))
  # Process 1 skips a restore: process 0 gives up; process 1's late call then
  # fails at once, and the next restore of both pairs up again.
  client = jax._src.distributed.global_state.client  # Test-only synchronization.
  if jax.process_index() == 0:
    out["skipped"] = _attempt(lambda: ckpt.restore(plain, options=opts))
    client.key_value_set("test/gave-up", "1")
  else:
    client.blocking_key_value_get("test/gave-up", 120_000)
    out["late"] = _attempt(lambda: ckpt.restore(plain, options=opts))
  out["again"] = _attempt(lambda: ckpt.restore(plain, options=opts).assert_consumed())
  out["again_ok"] = bits_equal(full(ckpt.w), reference(1))
  return out


def saves_that_disagree(directory: str, timeout_s: float):
  """Process 1 alone turns on compression, saves one leaf as bfloat16, then names
  a path that cannot be written; nothing may be committed, and then three
  identical async saves must all work."""
  prefix = os.path.join(directory, "ckpt")
  me = jax.process_index()
  ckpt = jaxckpt.Checkpoint(w=sharded(reference(1)), b=np.ones(4, np.float32))
  out = {}
  opts = jaxckpt.CheckpointOptions(timeout_s=timeout_s, compression=me == 1)
  out["compression"] = _attempt(lambda: str(ckpt.save(prefix, options=opts)))
  opts = jaxckpt.CheckpointOptions(timeout_s=timeout_s)
  ckpt.b = np.ones(4, jnp.bfloat16 if me == 1 else np.float32)
  out["dtype"] = _attempt(lambda: str(ckpt.save(prefix, options=opts)))
  ckpt.b = np.ones(4, np.float32)
  blocker = os.path.join(directory, "a-file")
  if me == 0:
    with open(blocker, "w") as f:
      f.write("not a directory")
  _sync("blocker")
  target = os.path.join(blocker, "sub") if me == 1 else os.path.join(directory, "fine")
  out["bad_path"] = _attempt(lambda: str(ckpt.write(target, options=opts)))
  out["listing_after_failures"] = sorted(os.listdir(directory))
  async_opts = jaxckpt.CheckpointOptions(timeout_s=timeout_s, enable_async=True)
  paths = []
  for step in (2, 3, 4):
    ckpt.w = sharded(reference(step))
    paths.append(_attempt(lambda: str(ckpt.save(prefix, options=async_opts))))
  ckpt.sync()
  contents = {}
  for attempt in paths:
    if attempt["value"]:
      ckpt.w = sharded(np.zeros(SHAPE, np.float32))
      ckpt.restore(attempt["value"], options=opts).assert_consumed()
      contents[os.path.basename(attempt["value"])] = [
        s for s in (2, 3, 4) if bits_equal(full(ckpt.w), reference(s))
      ]
  out["later"] = [a["error"] for a in paths]
  out["contents"] = contents
  return out


def killed_after_start(directory: str, timeout_s: float):
  """Process 1 dies just after every process joined the save (inside Orbax's
  barriers from then on); the survivor must fail within about timeout_s."""
  from jaxckpt import _multihost

  opts = jaxckpt.CheckpointOptions(timeout_s=timeout_s)
  ckpt = jaxckpt.Checkpoint(w=sharded(reference(1)))
  ckpt.save(os.path.join(directory, "ckpt"), options=opts)
  if jax.process_index() == 1:
    barrier = _multihost.Coordination.barrier

    def die_after_start(self, name):
      barrier(self, name)
      if name == "start":
        os._exit(17)

    _multihost.Coordination.barrier = die_after_start
  out = _attempt(lambda: str(ckpt.save(os.path.join(directory, "ckpt"), options=opts)))
  out["listing"] = sorted(os.listdir(directory))
  return out


def io_device_keeps_nan_payloads(directory: str):
  """bf16 NaN payloads through ``experimental_io_device`` saves and restores."""
  bits = np.array([0x7FC1, 0x7F81, 0xFFC3, 0x3F80] * 4, np.uint16).reshape(4, 4)
  value = bits.view(jnp.bfloat16)
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  w = jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  opts = jaxckpt.CheckpointOptions(experimental_io_device="/job:worker/task:0", timeout_s=30)
  ckpt = jaxckpt.Checkpoint(w=w)
  path = str(ckpt.save(os.path.join(directory, "ckpt"), options=opts))
  ckpt.w = jax.device_put(jnp.zeros((4, 4), jnp.bfloat16), sharding)
  ckpt.restore(path, options=opts).assert_consumed()
  as_bits = jax.jit(lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16))(ckpt.w)
  restored = np.asarray(multihost_utils.process_allgather(as_bits, tiled=True))
  out = {"restored_bits": restored.tolist(), "saved_bits": bits.tolist()}
  if jax.process_index() == 0:
    on_disk = np.asarray(jaxckpt.load_checkpoint(path).get_tensor("w")).view(np.uint16)
    out["file_bits"] = on_disk.tolist()
  return out


def manager_callback_fails_on_one_process(directory: str):
  """A write callback fails on process 1 at the second save: every process's
  manager must still name the same latest checkpoint, which restores on all."""
  failed = []

  def flaky(path):
    if jax.process_index() == 1 and os.path.basename(path) == "ckpt-2":
      failed.append(path)
      raise RuntimeError("callback failed on process 1 only")

  opts = jaxckpt.CheckpointOptions(experimental_write_callbacks=[flaky], timeout_s=20)
  ckpt = jaxckpt.Checkpoint(w=sharded(reference(1)))
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=2)
  errors = []
  for step in (1, 2, 3):
    ckpt.w = sharded(reference(step))
    errors.append(_attempt(lambda: str(manager.save(options=opts)))["error"])
    if step == 2:
      latest_after_failure = manager.latest_checkpoint
  ckpt.w = sharded(np.zeros(SHAPE, np.float32))
  restored = manager.restore_or_initialize(options=opts)
  return {
    "errors": errors,
    "latest_after_failure": os.path.basename(latest_after_failure),
    "restored": os.path.basename(restored),
    "ok": bits_equal(full(ckpt.w), reference(3)),
    "kept": [os.path.basename(p) for p in manager.checkpoints],
  }


def io_device_manager_private_directories(io_task: int = 1):
  """Each process has its own directory (its cwd, the same relative name): only
  the I/O task's holds checkpoints; its leftovers are swept by its manager, and
  restore_or_initialize restores on every process (no init_fn anywhere)."""
  directory = "run"
  os.makedirs(directory, exist_ok=True)
  leftover = os.path.join(directory, ".ckpt-9.jaxckpt-tmp-0123456789ab")
  os.makedirs(leftover)
  opts = jaxckpt.CheckpointOptions(experimental_io_device=f"/job:worker/task:{io_task}")
  ckpt = jaxckpt.Checkpoint(w=sharded(reference(1)))
  initialized = []
  manager = jaxckpt.CheckpointManager(
    ckpt, directory, max_to_keep=2, init_fn=lambda: initialized.append(True)
  )
  manager.save(options=opts)
  swept = not os.path.exists(leftover)
  fresh = jaxckpt.CheckpointManager(
    ckpt, directory, max_to_keep=2, init_fn=lambda: initialized.append(True)
  )
  ckpt.w = sharded(np.zeros(SHAPE, np.float32))
  restored = fresh.restore_or_initialize(options=opts)
  return {
    "swept": swept,
    "listing": sorted(os.listdir(directory)),
    "restored": restored,
    "initialized": bool(initialized),
    "ok": bits_equal(full(ckpt.w), reference(1)),
  }
