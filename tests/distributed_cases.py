"""Code run inside each process launched by `distributed.launch` (see test_distributed.py)."""

from __future__ import annotations

import os
import time

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import _knobs

SHAPE = (256, 64)  # Shards of 16 KiB: stored out of line by OCDBT, not inlined.


def reference(step: int = 1) -> np.ndarray:
  value = (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) - 40.5) * step
  value[0, 0] = -0.0  # Must survive every transfer bit-exactly.
  return value


def sharded(value: np.ndarray, spec=None, mesh_shape=None) -> jax.Array:
  mesh_shape = mesh_shape or (jax.device_count(),)
  names = ("x", "y")[: len(mesh_shape)]
  mesh = jax.make_mesh(mesh_shape, names)
  return jax.make_array_from_callback(
    value.shape, NamedSharding(mesh, spec or P("x")), lambda idx: value[idx]
  )


def full(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
  a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _list(directory: str) -> list[str]:
  if directory.startswith("s3://"):
    from jaxckpt import _store

    return sorted(n for n in _store.KV.names(directory) if n != ".jaxckpt-writer")
  return sorted(os.listdir(directory))


def _state(step: int, spec=None, mesh_shape=None):
  return {"w": sharded(reference(step), spec, mesh_shape), "b": np.arange(3, dtype=np.int32) * step}


def save_and_restore(
  directory: str, enable_async: bool = True, saves: int = 3, keep_ops: int | None = None
):
  """Every process saves globally sharded arrays through a manager."""
  if keep_ops is not None:
    _knobs.COORDINATION_KEEP_OPS = keep_ops
  calls = []
  opts = jaxckpt.CheckpointOptions(
    enable_async=enable_async, experimental_write_callbacks=[calls.append], timeout_s=60
  )
  ckpt = jaxckpt.Checkpoint(params=_state(0), step=0)
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=2)
  paths, seconds = [], []
  for step in range(1, saves + 1):
    ckpt.params = _state(step)
    ckpt.step = step
    start = time.perf_counter()
    paths.append(manager.save(options=opts))
    seconds.append(time.perf_counter() - start)
  committed = [p.future.result(timeout=60) for p in paths]
  ckpt.params = _state(0)
  ckpt.step = 0
  ckpt.restore(manager.latest_checkpoint).assert_consumed()
  from jax._src.distributed import global_state

  ops = {k.split("/")[1] for k, _ in global_state.client.key_value_dir_get("jaxckpt/")}
  return {
    "paths": [str(p) for p in paths],
    "committed": committed,
    "callbacks": calls,
    "coordination_ops": sorted(int(op) for op in ops),
    "latest": manager.latest_checkpoint,
    "checkpoints": manager.checkpoints,
    "w_ok": bits_equal(full(ckpt.params["w"]), reference(saves)),
    "b": ckpt.params["b"].tolist(),
    "step": int(ckpt.step),
    "save_counter": ckpt.save_counter,
    "listing": _list(directory),
    "blocked_s": seconds,
  }


def restore_resharded(path: str, mesh_shape: list[int], spec: list, dtype: str = "float32"):
  """Restores a checkpoint onto another mesh / partition spec / dtype."""
  target = reference(0).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
  ckpt = jaxckpt.Checkpoint(
    params={"w": sharded(target, P(*spec), tuple(mesh_shape)), "b": np.zeros(3, np.int32)}, step=0
  )
  ckpt.restore(path).assert_consumed()
  w = ckpt.params["w"]
  expected = reference(3).astype(w.dtype)
  return {
    "w_ok": bits_equal(full(w), expected),
    "dtype": str(w.dtype),
    "spec": str(w.sharding.spec),
    "devices": len(w.sharding.device_set),
    "b": ckpt.params["b"].tolist(),
    "step": int(ckpt.step),
  }


def _listing(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    out += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + filenames]
  return sorted(out)


def io_device_save_restore(
  directory: str, io_task: int = 0, enable_async: bool = True, pack: bool = False
):
  """TF's host-local /tmp case: a relative path in each process's own working
  directory, all I/O through task ``io_task``; the others must write nothing.
  With ``pack``, the I/O task packs the small arrays (_packed.py)."""
  del directory  # Each process runs in its own cwd (its "host-local disk").
  calls = []
  opts = jaxckpt.CheckpointOptions(
    experimental_io_device=f"/job:worker/task:{io_task}",
    enable_async=enable_async,
    experimental_write_callbacks=[calls.append],
    timeout_s=60,
    pack_small_arrays=True if pack else None,
  )
  ckpt = jaxckpt.Checkpoint(params=_state(3), step=7)
  first = ckpt.save("ckpts/ckpt", options=opts)
  ckpt.params = _state(5)
  second = ckpt.save("ckpts/ckpt", options=opts)
  second.future.result(timeout=60)
  latest = jaxckpt.latest_checkpoint("ckpts")  # None except on the I/O process.
  ckpt.params = _state(0)
  ckpt.step = 0
  ckpt.restore(latest, options=opts).assert_consumed()
  w_after_latest = bits_equal(full(ckpt.params["w"]), reference(5))
  ckpt.restore(str(first), options=opts).assert_consumed()
  return {
    "callbacks": calls,
    "latest": latest,
    "files": _listing("."),
    "w_latest_ok": w_after_latest,
    "w_first_ok": bits_equal(full(ckpt.params["w"]), reference(3)),
    "w_spec": str(ckpt.params["w"].sharding.spec),
    "b": ckpt.params["b"].tolist(),
    "save_counter": ckpt.save_counter,
  }


def io_device_missing(directory: str, io_task: int = 1):
  """A bad path on the I/O process fails the restore on every process, no hang."""
  del directory
  opts = jaxckpt.CheckpointOptions(experimental_io_device=f"/task:{io_task}", timeout_s=30)
  ckpt = jaxckpt.Checkpoint(params=_state(0))
  try:
    ckpt.restore("nowhere/ckpt-1", options=opts)
  except jaxckpt.CheckpointNotFoundError as e:
    return {"error": type(e).__name__, "message": str(e)}
  return {"error": None}


def die_during_save(directory: str, victim: int = 1, when: str = "before"):
  """Saves once (committed), then ``victim`` dies: ``before`` joining the second
  save, right ``after`` its save() returned, or while ``writing`` (inside the
  Orbax/TensorStore write, after every process joined the save)."""
  opts = jaxckpt.CheckpointOptions(enable_async=True, timeout_s=8)
  ckpt = jaxckpt.Checkpoint(params=_state(1))
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=3)
  manager.save(options=opts).future.result(timeout=60)
  ckpt.params = _state(2)
  if jax.process_index() == victim and when == "before":
    os._exit(17)
  if jax.process_index() == victim and when == "writing":
    from jaxckpt import _commit

    _commit.checksum = lambda *args: os._exit(17)  # Runs while TensorStore writes.
  start = time.perf_counter()
  path = manager.save(options=opts)
  if jax.process_index() == victim and when == "after":
    os._exit(17)
  try:
    path.future.result(timeout=120)
  except jaxckpt.SaveError as e:
    time.sleep(0.5)  # Let a (wrongly) still-running commit show up in the listing.
    return {
      "error": str(e),
      "cause": type(e.__cause__).__name__,
      "seconds": time.perf_counter() - start,
      "listing": sorted(os.listdir(directory)),
      "latest": manager.latest_checkpoint,
    }
  return {"error": None, "listing": sorted(os.listdir(directory))}


def resume_latest(directory: str):
  """After a restart of every process: resume from the last committed checkpoint."""
  ckpt = jaxckpt.Checkpoint(params=_state(0))
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=3)
  restored = manager.restore_or_initialize()
  return {
    "restored": restored,
    "w_ok": bits_equal(full(ckpt.params["w"]), reference(1)),
    "listing": sorted(os.listdir(directory)),
  }


def train_while_saving(directory: str, steps: int = 24, every: int = 2):
  """Steps whose cross-process all-reduces run on the main thread while async
  saves commit in the background (max_in_flight=2): nothing may deadlock."""
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  sharding = NamedSharding(mesh, P("x"))

  @jax.jit
  def step(w):
    return w * 0.5 + jax.numpy.mean(w)  # The mean is an all-reduce over all processes.

  w = sharded(reference(1))
  ckpt = jaxckpt.Checkpoint(w=w, step=0)
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=3)
  opts = jaxckpt.CheckpointOptions(enable_async=True, max_in_flight=2, timeout_s=60)
  expected = {}
  for i in range(1, steps + 1):
    w = step(w)
    if i % every == 0:
      ckpt.w, ckpt.step = w, i
      manager.save(checkpoint_number=i, options=opts)
      expected[i] = full(w)  # Another collective, between saves.
  manager.sync()
  ckpt.w = jax.device_put(jax.numpy.zeros(SHAPE), sharding)
  ckpt.restore(manager.latest_checkpoint).assert_consumed()
  return {
    "latest": manager.latest_checkpoint,
    "step": int(ckpt.step),
    "ok": bits_equal(full(ckpt.w), expected[steps]),
    "kept": [os.path.basename(p) for p in manager.checkpoints],
  }


def donate_after_async_save(directory: str, saves: int = 4):
  """Async saves followed at once by steps that donate (free) the saved arrays:
  every checkpoint must hold the values from before its donating step."""
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  sharding = NamedSharding(mesh, P("x"))
  step = jax.jit(lambda w: w * 2.0 + 1.0, donate_argnums=0, out_shardings=sharding)
  w = sharded(reference(1))
  ckpt = jaxckpt.Checkpoint(w=w)
  opts = jaxckpt.CheckpointOptions(enable_async=True, max_in_flight=2, timeout_s=60)
  expected, paths = [], []
  for i in range(saves):
    ckpt.w = w
    expected.append(full(w))
    paths.append(ckpt.write(os.path.join(directory, f"w-{i}"), options=opts))
    w = step(w)  # Donates the array the save just snapshotted.
  ckpt.sync()
  ok = []
  for path, want in zip(paths, expected, strict=True):
    ckpt.w = jax.device_put(np.zeros(SHAPE, np.float32), sharding)
    ckpt.read(str(path)).assert_consumed()
    ok.append(bits_equal(full(ckpt.w), want))
  return {"ok": ok}


def callback_fails_once(directory: str, saves: int = 4):
  """A write callback fails on process 1 only, once; the loop catches errors and
  goes on. Processes must stay in step: every committed checkpoint holds one
  step's data, and later saves succeed again."""
  failed = []

  def flaky(path):
    if jax.process_index() == 1 and not failed:
      failed.append(path)
      raise RuntimeError("callback failed on process 1 only")

  opts = jaxckpt.CheckpointOptions(
    enable_async=True, experimental_write_callbacks=[flaky], timeout_s=8
  )
  ckpt = jaxckpt.Checkpoint(w=sharded(reference(1)))
  outcomes = []
  for step in range(1, saves + 1):
    ckpt.w = sharded(reference(step))
    try:
      path = ckpt.save(os.path.join(directory, "ckpt"), options=opts)
      path.future.result(timeout=60)
      outcomes.append(["ok", os.path.basename(path)])
    except jaxckpt.JaxckptError as e:
      outcomes.append(["error", type(e).__name__])
  sync_error = None
  try:
    ckpt.sync()  # Raises the error no save raised.
  except jaxckpt.JaxckptError as e:
    sync_error = type(e).__name__
  contents = {}
  for name in sorted(os.listdir(directory)):
    if name.startswith("ckpt-"):
      ckpt.w = sharded(np.zeros(SHAPE, np.float32))
      ckpt.read(os.path.join(directory, name)).assert_consumed()
      got = full(ckpt.w)
      contents[name] = [s for s in range(1, saves + 1) if bits_equal(got, reference(s))]
  return {
    "outcomes": outcomes,
    "contents": contents,
    "counter": ckpt.save_counter,
    "sync_error": sync_error,
  }


def disagreeing_calls(directory: str):
  """Process 1 restores (then saves to) another path than process 0: every process
  must refuse at once, naming both paths, instead of mixing checkpoints."""
  ckpt = jaxckpt.Checkpoint(params=_state(1))
  opts = jaxckpt.CheckpointOptions(timeout_s=20)
  first = ckpt.save(os.path.join(directory, "ckpt"), options=opts)
  ckpt.params = _state(2)
  second = ckpt.save(os.path.join(directory, "ckpt"), options=opts)
  mine = first if jax.process_index() == 1 else second
  out = {}
  start = time.perf_counter()
  try:
    ckpt.restore(mine, options=opts)
    out["restore_error"] = None
  except jaxckpt.JaxckptError as e:
    out["restore_error"] = f"{type(e).__name__}: {e}"
  out["restore_seconds"] = time.perf_counter() - start
  start = time.perf_counter()
  try:
    ckpt.write(os.path.join(directory, f"w{jax.process_index()}"), options=opts)
    out["write_error"] = None
  except jaxckpt.JaxckptError as e:
    out["write_error"] = f"{type(e).__name__}: {e}"
  out["write_seconds"] = time.perf_counter() - start
  out["listing"] = sorted(os.listdir(directory))
  return out


def restore_tf_checkpoint(path: str):
  """Every process reads a TensorFlow checkpoint onto one global mesh."""
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  ckpt = jaxckpt.Checkpoint(
    a=jax.ShapeDtypeStruct((2, 3), np.float32, sharding=NamedSharding(mesh, P())),
    b=jax.ShapeDtypeStruct((40,), np.int32, sharding=NamedSharding(mesh, P("x"))),
  )
  ckpt.read(path).assert_consumed()
  return {
    "a": full(ckpt.a).tolist(),
    "b": full(ckpt.b).tolist(),
    "devices": len(ckpt.b.sharding.device_set),
    "local_shards": len(ckpt.b.addressable_shards),
  }


def restore_tf_one_process_differs(path: str):
  """Process 1 tracks `b` in another shape: every process refuses, none restores."""
  shape = (40,) if jax.process_index() == 0 else (41,)
  ckpt = jaxckpt.Checkpoint(b=np.zeros(shape, np.int32))
  try:
    ckpt.read(path)
  except jaxckpt.JaxckptError as e:
    return {"error": type(e).__name__, "restored": bool(ckpt.b.any())}
  return {"error": None, "restored": bool(ckpt.b.any())}
