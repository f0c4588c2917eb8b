"""Code run inside each process launched by `distributed.start` for test_tiers.py."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
from distributed_cases import bits_equal
from distributed_cases import full
from distributed_cases import reference
from distributed_cases import sharded

import jaxckpt


def _manager(directory: str, local: str, persistent_every: int):
  ckpt = jaxckpt.Checkpoint(w=sharded(reference(0)), b=np.zeros(3, np.int32), step=0)
  manager = jaxckpt.CheckpointManager(
    ckpt,
    directory,
    max_to_keep=2,
    step_counter=lambda: ckpt.step,
    checkpoint_interval=persistent_every,
    local_directory=local,
  )
  return ckpt, manager


def _kill_self() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def train(
  directory: str,
  local: str,
  steps: int,
  persistent_every: int,
  victim: int = -1,
  kill_at: int = 0,
  in_commit: bool = False,
):
  """Saves every step (local tier every step); process ``victim`` is SIGKILLed
  at step ``kill_at``: before its save, or ``in_commit`` of its local save
  (after the replica exchange, before the manifest is written)."""
  ckpt, manager = _manager(directory, local, persistent_every)
  opts = jaxckpt.CheckpointOptions(enable_async=True, timeout_s=5)
  me = jax.process_index()
  for step in range(1, steps + 1):
    if me == victim and step == kill_at:
      if not in_commit:
        _kill_self()
      manager._local.wait()  # Step kill_at - 1 is committed; kill_at's commit kills.
      manager._local._store.commit = lambda *args: _kill_self()
    ckpt.w, ckpt.b, ckpt.step = sharded(reference(step)), np.arange(3, dtype=np.int32) * step, step
    try:
      path = manager.save(options=opts)
      if path is not None:  # Persistent saves committed, so the test knows which exist.
        path.future.result(timeout=120)
    except jaxckpt.JaxckptError as e:  # A survivor: the victim is gone.
      return {"failed_at": step, "error": type(e).__name__}
  manager.sync()
  return {"failed_at": None}


def resume(directory: str, local: str, persistent_every: int, then_save: bool = True):
  """After a restart: restore_or_initialize from the best tier, then one more step."""
  ckpt, manager = _manager(directory, local, persistent_every)
  restored = manager.restore_or_initialize()
  manager.sync()  # Shards received from a peer are written back in the background.
  step = int(ckpt.step)
  out = {
    "restored": restored,
    "tier": manager.restored_tier,
    "step": step,
    "w_ok": bits_equal(full(ckpt.w), reference(step)),
    "b": ckpt.b.tolist(),
    "local": sorted(os.listdir(manager._local.directory)),
  }
  if then_save:
    ckpt.w, ckpt.step = sharded(reference(step + 1)), step + 1
    manager.save(options=jaxckpt.CheckpointOptions(timeout_s=10))
    manager.sync()
    out["after"] = manager._local.steps()
  return out
