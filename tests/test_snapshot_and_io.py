"""Issue 3 behaviour: donation-safe snapshots, backpressure, storage knobs, durable commits."""

import logging
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxckpt
from jaxckpt import _store

TIMEOUT = 120


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_every_async_save_in_a_donating_loop_is_bit_exact(tmp_path):
  step = jax.jit(lambda s: {"w": jnp.sin(s["w"]) * 1.5 + 0.1, "n": s["n"] + 1}, donate_argnums=0)
  state = {"w": jax.random.normal(jax.random.key(1), (256, 256)), "n": jnp.array(0)}
  ckpt = jaxckpt.Checkpoint(state=state)
  opts = jaxckpt.CheckpointOptions(enable_async=True, max_in_flight=2)
  expected = {}
  for _ in range(6):
    ckpt.state = state
    expected[ckpt.save(tmp_path / "m", options=opts)] = np.asarray(state["w"]).copy()
    state = step(state)  # Donates the buffers the save just snapshotted.
    state = step(state)
  ckpt.sync()
  for path, w in expected.items():
    np.testing.assert_array_equal(jaxckpt.load_checkpoint(path).get_tensor("state/w"), w)


def test_max_in_flight_allows_overlap_then_waits(tmp_path):
  release = threading.Event()
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(1024))
  opts = jaxckpt.CheckpointOptions(
    enable_async=True, max_in_flight=2, experimental_write_callbacks=[lambda: release.wait(TIMEOUT)]
  )
  first = ckpt.save(tmp_path / "m", options=opts)
  second = ckpt.save(tmp_path / "m", options=opts)  # Room for two: returns at once.
  assert not first.future.done() and not second.future.done()
  third = []
  t = threading.Thread(target=lambda: third.append(ckpt.save(tmp_path / "m", options=opts)))
  t.start()
  t.join(timeout=1.0)
  assert t.is_alive() and third == []
  release.set()
  t.join(timeout=TIMEOUT)
  ckpt.sync()
  assert [first.future.result(), second.future.result(), third[0].future.result()] == [
    str(tmp_path / f"m-{i}") for i in (1, 2, 3)
  ]
  assert jaxckpt.latest_checkpoint(tmp_path) == str(tmp_path / "m-3")


def test_memory_budget_is_respected_and_waits_are_logged(tmp_path, caplog):
  x = jnp.ones(256 * 1024)  # 1 MiB
  ckpt = jaxckpt.Checkpoint(x=x)
  gate = threading.Event()
  opts = jaxckpt.CheckpointOptions(
    enable_async=True,
    max_in_flight=8,
    memory_budget_bytes=int(2.5 * x.nbytes),
    experimental_write_callbacks=[lambda: gate.wait(0.3)],
  )
  with caplog.at_level(logging.INFO, logger="jaxckpt"):
    for _ in range(6):
      ckpt.save(tmp_path / "m", options=opts)
    ckpt.sync()
  assert ckpt._saver._peak_inflight_bytes == 2 * x.nbytes  # Never 3 snapshots at once.
  assert any("Waited" in r.message and "memory budget" in r.message for r in caplog.records)
  assert jaxckpt.latest_checkpoint(tmp_path) == str(tmp_path / "m-6")


def test_snapshot_memory_is_reused_across_50_saves(tmp_path):
  state = {f"w{i}": jnp.full((512, 512), float(i)) for i in range(8)}  # 8 MiB
  nbytes = sum(v.nbytes for v in state.values())
  ckpt = jaxckpt.Checkpoint(state=state)
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
  opts = jaxckpt.CheckpointOptions(enable_async=True)
  for _ in range(10):  # Warm up allocators and Orbax's caches.
    manager.save(options=opts)
  manager.sync()
  before = _rss_bytes()
  for _ in range(50):
    manager.save(options=opts)
  manager.sync()
  growth = _rss_bytes() - before
  # Each save snapshots 8 MiB; a leak would add 400 MiB over 50 saves.
  assert growth < 8 * nbytes, f"RSS grew by {growth / 2**20:.1f} MiB over 50 saves"


def test_compression_is_off_by_default_and_selectable(tmp_path):
  zeros = {"z": jnp.zeros((1024, 1024))}  # 4 MiB, highly compressible.

  def size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)

  plain = jaxckpt.Checkpoint(**zeros).write(tmp_path / "plain")
  packed = jaxckpt.Checkpoint(**zeros).write(
    tmp_path / "packed", options=jaxckpt.CheckpointOptions(compression=True)
  )
  assert size(plain) > 4 * 2**20 > 100 * size(packed)
  assert jaxckpt.load_checkpoint(packed).get_tensor("z").sum() == 0


def test_chunk_byte_size_subdivides_chunks(tmp_path):
  x = {"x": jnp.arange(1024 * 256, dtype=jnp.float32).reshape(1024, 256)}  # 1 MiB
  path = jaxckpt.Checkpoint(**x).write(
    tmp_path / "c", options=jaxckpt.CheckpointOptions(chunk_byte_size=64 * 1024)
  )
  meta = ocp.PyTreeCheckpointer().metadata(f"{path}/state").item_metadata.tree["x"]
  assert np.prod(meta.storage.chunk_shape) * 4 <= 64 * 1024
  np.testing.assert_array_equal(jaxckpt.load_checkpoint(path).get_tensor("x"), x["x"])


def test_data_and_directories_are_fsynced_before_the_commit_rename(tmp_path, monkeypatch):
  events = []
  real_fsync, real_rename = os.fsync, os.rename

  def fsync(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    real_fsync(fd)

  def rename(src, dst):
    events.append(("rename", os.fspath(src), os.fspath(dst)))
    real_rename(src, dst)

  monkeypatch.setattr(_store.os, "fsync", fsync)
  monkeypatch.setattr(_store.os, "rename", rename)
  final = str(tmp_path / "c")
  jaxckpt.Checkpoint(x=jnp.ones(8), y=np.zeros(3)).write(final)
  commit_at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final)
  staging = events[commit_at][1]
  synced_before = {e[1] for e in events[:commit_at] if e[0] == "fsync"}
  written = set()
  for d, _, files in os.walk(final):
    written.add(d.replace(final, staging, 1))
    written.update(os.path.join(d, f).replace(final, staging, 1) for f in files)
  assert written and written <= synced_before  # Every file and directory durable first.
  assert ("fsync", str(tmp_path)) in events[commit_at + 1 :]  # Then the rename itself.


def test_snapshot_fast_path_copies_like_device_put(monkeypatch):
  from jaxckpt import _compat
  from jaxckpt import _snapshot
  from jaxckpt._tree import Leaf

  sharded = jax.device_put(
    jnp.arange(16.0), jax.NamedSharding(jax.make_mesh((4,), ("d",)), jax.P("d"))
  )
  leaves = [Leaf("a", sharded), Leaf("b", jnp.ones((3, 3), jnp.bfloat16))]

  def no_fallback(*args, **kwargs):
    raise AssertionError("fell back to shard_args or jax.device_put: the fast path broke")

  monkeypatch.setattr(jax, "device_put", no_fallback)
  monkeypatch.setattr(_compat, "copy_arrays", no_fallback)
  snap, _ = _snapshot.take_snapshot(leaves, copy=True, io_device=None)
  for leaf in leaves:
    copy = snap[leaf.name]
    assert copy is not leaf.value and copy.dtype == leaf.value.dtype
    assert copy.sharding == _snapshot._host_sharding(leaf.value.sharding)
    # On CPU the device memory is host memory: copied there, not into pinned_host.
    assert copy.sharding.memory_kind == leaf.value.sharding.memory_kind
    assert copy.addressable_shards[0].data.unsafe_buffer_pointer() != (
      leaf.value.addressable_shards[0].data.unsafe_buffer_pointer()
    )
    np.testing.assert_array_equal(np.asarray(copy), np.asarray(leaf.value))


def test_small_cpu_arrays_are_snapshotted_as_views_that_outlive_donation_and_delete(tmp_path):
  from jaxckpt import _snapshot

  step = jax.jit(lambda w: w * 2.0 + 1.0, donate_argnums=0)
  w, b = jnp.arange(4096.0), jnp.full((64,), 3.0, jnp.bfloat16)
  big = jnp.ones((1 << 18) // 4 + 1)
  expected = {"w": np.asarray(w).copy(), "b": np.asarray(b).copy()}
  views: dict = {}
  snap, _ = _snapshot.take_snapshot(
    [jaxckpt._tree.Leaf("w", w), jaxckpt._tree.Leaf("b", b), jaxckpt._tree.Leaf("big", big)],
    copy=True,
    io_device=None,
    views=views,
    view_max_bytes=1 << 18,
  )
  assert isinstance(snap.pop("big"), jax.Array)  # Over view_max_bytes: copied.
  assert views == {"w": w, "b": b} and all(isinstance(v, np.ndarray) for v in snap.values())
  view = snap["w"]
  assert not view.flags.writeable
  assert view.ctypes.data == w.addressable_shards[0].data.unsafe_buffer_pointer()  # No copy.
  w2 = step(w)  # XLA does not donate a buffer a view references: w survives.
  assert not w.is_deleted()
  b.delete()  # The view keeps the buffer alive.
  jnp.ones(1 << 16).block_until_ready()
  np.testing.assert_array_equal(view, expected["w"])
  np.testing.assert_array_equal(snap["b"], expected["b"])
  del snap, view
  step(w2).block_until_ready()  # Without the view, donation works again.
  assert w2.is_deleted()


def test_an_async_save_of_views_is_bit_exact_when_the_arrays_are_deleted_meanwhile(
  tmp_path, caplog
):
  caplog.set_level(logging.WARNING, logger="jaxckpt")
  state = {f"x{i}": jnp.arange(256.0) + i for i in range(64)}
  expected = {name: np.asarray(v).copy() for name, v in state.items()}
  ckpt = jaxckpt.Checkpoint(state=state)
  path = ckpt.write(tmp_path / "c", options=jaxckpt.CheckpointOptions(enable_async=True))
  for value in state.values():
    value.delete()
  ckpt.sync()
  reader = jaxckpt.load_checkpoint(path)
  for name, value in expected.items():
    np.testing.assert_array_equal(reader.get_tensor(f"state/{name}"), value)
  restored = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))["state"]
  assert isinstance(restored["x3"], jax.Array)  # Orbax's metadata still says jax.Array.
  np.testing.assert_array_equal(np.asarray(restored["x3"]), expected["x3"])
  assert not [r for r in caplog.records if r.name == "jaxckpt"]  # No fast path lost.
