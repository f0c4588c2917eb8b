"""Processes that disagree or fail alone: clear errors on every process within about
``timeout_s``, nothing unreadable committed, and the next identical call works.

The cases run in real JAX processes on 127.0.0.1 (tests/agreement_cases.py).
"""

import os

import distributed
import numpy as np
import pytest

import jaxckpt

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

TIMEOUT_S = 6.0
BOUND_S = TIMEOUT_S + 10  # The bound: about timeout_s, never Orbax's 300 s.


def test_a_restore_failing_on_one_process_fails_on_all_within_the_timeout(tmp_path):
  p0, p1 = distributed.launch(
    "agreement_cases",
    "restores_that_fail_on_one_process",
    2,
    kwargs={"directory": str(tmp_path), "timeout_s": TIMEOUT_S},
    timeout=200,
  )
  # Another shape on process 1: it says so; process 0 names process 1's error.
  assert p1["shape"]["error"].startswith("ShapeMismatchError"), p1
  assert p0["shape"]["error"].startswith("CoordinationError"), p0
  assert "process 1 failed first (ShapeMismatchError" in p0["shape"]["error"]
  # Damaged data read by process 1 only: corrupt there, a coordination error on
  # process 0 (the checkpoint it read is not called corrupt).
  assert p1["damaged"]["error"].startswith("CorruptCheckpointError"), p1
  assert p0["damaged"]["error"].startswith("CoordinationError"), p0
  assert "process 1" in p0["damaged"]["error"]
  # Process 1 skipped a restore: process 0 gives up, process 1's late call fails at once.
  assert p0["skipped"]["error"].startswith("CoordinationError"), p0
  assert "came too late" in p1["late"]["error"], p1
  assert p1["late"]["seconds"] < TIMEOUT_S
  for r in (p0, p1):
    for attempt in ("shape", "damaged", "skipped", "late"):
      if attempt in r:
        assert r[attempt]["seconds"] < BOUND_S, (attempt, r[attempt])
    assert r["again"]["error"] is None and r["again_ok"], r  # In step again.


def test_saves_that_disagree_commit_nothing_and_later_saves_work(tmp_path):
  p0, p1 = distributed.launch(
    "agreement_cases",
    "saves_that_disagree",
    2,
    kwargs={"directory": str(tmp_path), "timeout_s": TIMEOUT_S},
    timeout=200,
  )
  for r in (p0, p1):
    compression, dtype = r["compression"]["error"], r["dtype"]["error"]
    assert "disagree" in compression and "compression: process 0: False, process 1: True" in (
      compression
    ), r
    assert "disagree" in dtype and '"b", [4], "bfloat16"' in dtype and "float32" in dtype, r
    assert r["compression"]["seconds"] < BOUND_S and r["dtype"]["seconds"] < BOUND_S
    assert r["later"] == [None, None, None], r
    # Three saves, each holding its own step: the failed ones used up numbers 1-2.
    assert r["contents"] == {"ckpt-3": [2], "ckpt-4": [3], "ckpt-5": [4]}, r
  assert p1["bad_path"]["error"].startswith("InvalidPathError"), p1
  assert "process 1 failed first (InvalidPathError" in p0["bad_path"]["error"], p0
  assert p0["bad_path"]["seconds"] < TIMEOUT_S  # Told, not timed out.
  assert p0["listing_after_failures"] == ["a-file"]  # Nothing was written.


def test_a_process_killed_inside_orbax_barriers_fails_the_save_within_the_timeout(tmp_path):
  procs, outdir = distributed.start(
    "agreement_cases",
    "killed_after_start",
    2,
    hard_exit=True,
    recoverable=True,
    kwargs={"directory": str(tmp_path), "timeout_s": TIMEOUT_S},
  )
  survivor, victim = distributed.collect(procs, outdir, timeout=150, expect_fail={0, 1})
  assert victim["returncode"] == 17
  assert survivor["returncode"] == 0, survivor
  assert survivor["error"].startswith("SaveError") and "was not committed" in survivor["error"]
  assert survivor["seconds"] < BOUND_S + TIMEOUT_S, survivor  # Two of Orbax's waits at most.
  assert survivor["listing"] == ["checkpoint", "ckpt-1"]  # Save 2 left nothing.


def test_io_device_saves_keep_bfloat16_nan_payloads(tmp_path):
  results = distributed.launch(
    "agreement_cases", "io_device_keeps_nan_payloads", 2, kwargs={"directory": str(tmp_path)}
  )
  for r in results:
    assert r["restored_bits"] == r["saved_bits"]
  assert results[0]["file_bits"] == results[0]["saved_bits"]
  assert 0x7FC1 in np.array(results[0]["file_bits"])


def test_a_callback_failing_on_one_process_leaves_every_manager_on_the_same_latest(tmp_path):
  p0, p1 = distributed.launch(
    "agreement_cases",
    "manager_callback_fails_on_one_process",
    2,
    kwargs={"directory": str(tmp_path)},
  )
  assert p0["errors"] == [None, None, None]
  assert p1["errors"][0] is None and p1["errors"][2] is None
  assert "WriteCallbackError" in p1["errors"][1] and "recorded as the latest" in p1["errors"][1]
  for r in (p0, p1):
    assert r["latest_after_failure"] == "ckpt-2" and r["restored"] == "ckpt-3" and r["ok"], r
    assert r["kept"] == ["ckpt-2", "ckpt-3"]
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-2", "ckpt-3"]


def test_io_device_manager_sweeps_the_io_tasks_leftovers_and_all_restore(tmp_path):
  cwds = [tmp_path / f"host{i}" for i in range(2)]
  for c in cwds:
    c.mkdir()
  p0, p1 = distributed.launch(
    "agreement_cases",
    "io_device_manager_private_directories",
    2,
    cwds=[str(c) for c in cwds],
    kwargs={"io_task": 1},
  )
  assert p1["swept"] and p1["listing"] == ["checkpoint", "ckpt-1"], p1
  for r in (p0, p1):
    assert r["restored"] == "run/ckpt-1" and not r["initialized"] and r["ok"], r
  reader = jaxckpt.load_checkpoint(str(cwds[1] / "run" / "ckpt-1"))
  assert reader.has_tensor("w")
