"""The cyclic GC pause around per-leaf sections: nested, across threads, never left off."""

import gc
import logging
import threading

import jax.numpy as jnp
import numpy as np

import jaxckpt
from jaxckpt._gcpause import paused


def test_overlapping_pauses_on_two_threads_resume_once_the_last_ends():
  assert gc.isenabled()
  inside, release = threading.Event(), threading.Event()

  def other():
    with paused():
      inside.set()
      release.wait(10)

  thread = threading.Thread(target=other)
  with paused():
    thread.start()
    inside.wait(10)
    with paused():  # Nested on this thread too.
      assert not gc.isenabled()
  assert not gc.isenabled()  # The other thread's pause still holds.
  release.set()
  thread.join(10)
  assert gc.isenabled()


def test_a_failing_section_resumes_and_a_disabled_collector_stays_disabled():
  try:
    with paused():
      raise ValueError("boom")
  except ValueError:
    pass
  assert gc.isenabled()
  gc.disable()
  try:
    with paused():
      pass
    assert not gc.isenabled()  # The caller's choice is kept.
  finally:
    gc.enable()


def test_saves_and_restores_of_many_leaves_leave_the_collector_on_and_count_few_collections(
  tmp_path, caplog
):
  caplog.set_level(logging.WARNING, logger="jaxckpt")
  state = {f"l{i:04d}": jnp.full((64,), float(i)) for i in range(2000)}
  ckpt = jaxckpt.Checkpoint(state=state)
  opts = jaxckpt.CheckpointOptions(enable_async=True)
  ckpt.write(tmp_path / "warm", options=opts)
  ckpt.sync()
  collections = []

  def count(phase, info):
    if phase == "start":
      collections.append(info["generation"])

  gc.callbacks.append(count)
  try:
    path = ckpt.write(tmp_path / "c", options=opts)
    ckpt.sync()
    saved = len(collections)
    restored = jaxckpt.Checkpoint(state={k: jnp.zeros_like(v) for k, v in state.items()})
    restored.read(path).assert_consumed()
  finally:
    gc.callbacks.remove(count)
  assert gc.isenabled()
  # Without the pauses a save of these 2000 leaves set off 13 collections; a restore, with a
  # thread-pool job per chunk stored inline in the B-tree, about 90 (now 2 and 11).
  assert saved <= 6 and len(collections) - saved <= 20, collections
  np.testing.assert_array_equal(np.asarray(restored.state["l1234"]), np.full((64,), 1234.0))
