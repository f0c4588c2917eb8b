"""Multi-process saves and restores: real JAX processes on 127.0.0.1 (gloo).

Each test launches fresh interpreters with `distributed.launch`; the code they
run is in distributed_cases.py. Processes × devices covered: 2×2 (save,
restore, io_device, failures), 4×1 (save/restore), 1×1 and 1×4 (restore of a
2×2 checkpoint), 2×2 with another mesh and dtype.
"""

import os

import distributed
import distributed_cases as cases
import jax
import numpy as np
import pytest

import jaxckpt

pytestmark = pytest.mark.timeout(240)


def _save_failed_or_jax_aborted(result):
  """A process that outlived another's death: either its save failed with the
  clear error first, or JAX's coordination service aborted it; both are fine."""
  if result["returncode"] == 0:
    assert "was not committed" in result["error"]
  else:
    assert "Terminating process because the JAX distributed service" in result["stderr"]


def _nothing_committed_and_restart_resumes(directory):
  assert "ckpt-2" not in os.listdir(directory)
  resumed = distributed.launch(
    "distributed_cases", "resume_latest", 2, devices=2, kwargs={"directory": str(directory)}
  )
  assert [r["restored"] for r in resumed] == [str(directory / "ckpt-1")] * 2
  assert all(r["w_ok"] for r in resumed)
  assert sorted(os.listdir(directory)) == ["checkpoint", "ckpt-1"]  # Staging leftovers removed.


@pytest.fixture(scope="module")
def saved_2x2(tmp_path_factory):
  """Three async saves by 2 processes × 2 devices through a CheckpointManager,
  keeping the coordination keys of only the last operation."""
  directory = str(tmp_path_factory.mktemp("mp"))
  results = distributed.launch(
    "distributed_cases",
    "save_and_restore",
    2,
    devices=2,
    kwargs={"directory": directory, "keep_ops": 1},
  )
  return directory, results


def test_two_processes_save_commit_once_and_run_callbacks_everywhere(saved_2x2):
  directory, results = saved_2x2
  expected = [os.path.join(directory, f"ckpt-{i}") for i in (1, 2, 3)]
  for pid, r in enumerate(results):
    assert r["paths"] == expected, pid
    assert r["committed"] == expected, pid  # Futures resolve to the path on every process.
    assert r["callbacks"] == expected, pid  # Callbacks ran once per save on each process.
    assert r["checkpoints"] == expected[1:] and r["latest"] == expected[-1]
    assert r["w_ok"] and r["b"] == [0, 3, 6] and r["step"] == 3 and r["save_counter"] == 3
  # Saves were operations 1-3 (the restore 4): those of saves 1 and 2 were deleted.
  ops = results[0]["coordination_ops"]
  assert 3 in ops and set(ops) <= {3, 4}, ops
  # max_to_keep=2 swept ckpt-1 once; one state file; no staging left behind.
  assert sorted(os.listdir(directory)) == ["checkpoint", "ckpt-2", "ckpt-3"]
  assert jaxckpt.latest_checkpoint(directory) == expected[-1]
  # Both processes' shards are in the (plain Orbax) checkpoint.
  assert {
    n for n in os.listdir(os.path.join(expected[-1], "state")) if n.startswith("ocdbt.process_")
  } == {"ocdbt.process_0", "ocdbt.process_1"}


def test_restore_2x2_checkpoint_on_one_process_with_4_devices_and_new_mesh(saved_2x2):
  directory, _ = saved_2x2
  path = os.path.join(directory, "ckpt-3")
  assert jax.device_count() == 4  # This (pytest) process: 1 process × 4 devices.
  got = cases.restore_resharded(path, [4], ["x"])
  assert got == {
    "w_ok": True,
    "dtype": "float32",
    "spec": "P('x',)",
    "devices": 4,
    "b": [0, 3, 6],
    "step": 3,
  }
  got = cases.restore_resharded(path, [2, 2], ["y", "x"], dtype="bfloat16")
  assert got["w_ok"] and got["dtype"] == "bfloat16" and got["devices"] == 4
  assert got["spec"] == "P('y', 'x')"


def test_restore_2x2_checkpoint_on_one_process_with_one_device(saved_2x2):
  directory, _ = saved_2x2
  [got] = distributed.launch(
    "distributed_cases",
    "restore_resharded",
    1,
    devices=1,
    kwargs={"path": os.path.join(directory, "ckpt-3"), "mesh_shape": [1], "spec": ["x"]},
  )
  assert got["w_ok"] and got["devices"] == 1 and got["b"] == [0, 3, 6]


def test_restore_2x2_checkpoint_on_two_processes_other_mesh_and_bf16(saved_2x2):
  directory, _ = saved_2x2
  results = distributed.launch(
    "distributed_cases",
    "restore_resharded",
    2,
    devices=2,
    kwargs={
      "path": os.path.join(directory, "ckpt-3"),
      "mesh_shape": [2, 2],
      "spec": [None, "x"],
      "dtype": "bfloat16",
    },
  )
  for r in results:
    assert r == {
      "w_ok": True,
      "dtype": "bfloat16",
      "spec": "P(None, 'x')",
      "devices": 4,
      "b": [0, 3, 6],
      "step": 3,
    }


def test_packed_one_process_checkpoint_restores_onto_two_processes(tmp_path):
  # Each process reads the packed arrays itself and places its shards.
  ckpt = jaxckpt.Checkpoint(
    params={"w": jax.device_put(cases.reference(3), jax.devices()[1]), "b": np.arange(3) * 3},
    step=3,
  )
  path = ckpt.save(
    str(tmp_path / "packed"), options=jaxckpt.CheckpointOptions(pack_small_arrays=True)
  )
  assert jaxckpt.load_checkpoint(path).manifest.packed == {"params/w", "params/b"}
  results = distributed.launch(
    "distributed_cases",
    "restore_resharded",
    2,
    devices=2,
    kwargs={"path": path, "mesh_shape": [2, 2], "spec": ["x", None], "dtype": "bfloat16"},
  )
  for r in results:
    assert r["w_ok"] and r["devices"] == 4 and r["spec"] == "P('x', None)", r
    assert r["b"] == [0, 3, 6] and r["step"] == 3


def test_four_processes_save_and_restore(tmp_path):
  results = distributed.launch(
    "distributed_cases",
    "save_and_restore",
    4,
    devices=1,
    kwargs={"directory": str(tmp_path), "saves": 2},
  )
  expected = [str(tmp_path / "ckpt-1"), str(tmp_path / "ckpt-2")]
  for r in results:
    assert r["committed"] == expected and r["callbacks"] == expected and r["w_ok"]
  assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1", "ckpt-2"]
  assert (
    len([n for n in os.listdir(tmp_path / "ckpt-2" / "state") if n.startswith("ocdbt.process_")])
    == 4
  )


@pytest.mark.parametrize("io_task, pack", [(1, False), (0, False), (0, True)])
def test_io_device_routes_all_files_through_one_task(tmp_path, io_task, pack):
  # Each process runs in its own directory with a relative checkpoint path:
  # host-local disks, as in TF's experimental_io_device="/job:worker/task:K" case.
  cwds = [tmp_path / f"host{i}" for i in range(2)]
  for c in cwds:
    c.mkdir()
  results = distributed.launch(
    "distributed_cases",
    "io_device_save_restore",
    2,
    devices=2,
    cwds=[str(c) for c in cwds],
    kwargs={"directory": "", "io_task": io_task, "enable_async": io_task == 1, "pack": pack},
  )
  for pid, r in enumerate(results):
    assert r["callbacks"] == ["ckpts/ckpt-1", "ckpts/ckpt-2"], pid
    assert r["w_latest_ok"] and r["w_first_ok"] and r["w_spec"] == "P('x',)", pid
    assert r["b"] == [0, 3, 6] and r["save_counter"] == 1
    if pid == io_task:
      assert r["latest"] == "ckpts/ckpt-2"
      assert {
        "ckpts/checkpoint",
        "ckpts/ckpt-1/jaxckpt/metadata",
        "ckpts/ckpt-2/jaxckpt/metadata",
      } <= set(r["files"])
      assert ("ckpts/ckpt-2/state/checkpoint" in r["files"]) is pack
    else:
      assert r["latest"] is None and r["files"] == []  # Wrote nothing at all.
  reader = jaxckpt.load_checkpoint(str(cwds[io_task] / "ckpts" / "ckpt-2"))
  np.testing.assert_array_equal(reader.get_tensor("params/w"), cases.reference(5))


def test_io_device_restore_error_reaches_every_process(tmp_path):
  procs, outdir = distributed.start(
    "distributed_cases",
    "io_device_missing",
    2,
    devices=2,
    kwargs={"directory": str(tmp_path), "io_task": 1},
  )
  results = distributed.collect(procs, outdir)
  assert [r["error"] for r in results] == ["CheckpointNotFoundError"] * 2
  assert "on process 1, the experimental_io_device" in results[0]["message"]


@pytest.mark.parametrize("when", ["before", "writing"])
def test_process_dying_mid_save_fails_the_save_elsewhere_and_restart_resumes(tmp_path, when):
  # jax_enable_recoverability: JAX lets the survivor run on (by default it aborts it).
  procs, outdir = distributed.start(
    "distributed_cases",
    "die_during_save",
    2,
    devices=2,
    hard_exit=True,
    recoverable=True,
    kwargs={"directory": str(tmp_path), "when": when},
  )
  survivor, victim = distributed.collect(procs, outdir, timeout=150, expect_fail={0, 1})
  assert survivor["returncode"] == 0
  assert victim["returncode"] == 17
  assert "was not committed" in survivor["error"] and "timeout_s=8" in survivor["error"]
  if when == "before":  # Given up at jaxckpt's own barrier; "writing" may fail inside Orbax.
    assert survivor["cause"] == "CoordinationError"
  assert survivor["seconds"] < 60  # Bounded by timeout_s, not a hang (the launcher's 150 s).
  assert survivor["listing"] == ["checkpoint", "ckpt-1"]
  assert survivor["latest"] == str(tmp_path / "ckpt-1")
  _nothing_committed_and_restart_resumes(tmp_path)


def test_process_dying_under_default_jax_never_commits_and_restart_resumes(tmp_path):
  # JAX's default is fail-stop: once the coordination service notices the dead
  # process it aborts the others. Whether that happens before the survivor's
  # save times out is a race, so both outcomes are accepted; what must hold
  # either way is that nothing half-written is committed.
  procs, outdir = distributed.start(
    "distributed_cases",
    "die_during_save",
    2,
    devices=2,
    hard_exit=True,
    kwargs={"directory": str(tmp_path), "when": "writing"},
  )
  survivor, victim = distributed.collect(procs, outdir, timeout=150, expect_fail={0, 1})
  assert victim["returncode"] == 17
  _save_failed_or_jax_aborted(survivor)
  _nothing_committed_and_restart_resumes(tmp_path)


def test_training_collectives_and_background_saves_do_not_deadlock(tmp_path):
  results = distributed.launch(
    "distributed_cases", "train_while_saving", 2, devices=2, kwargs={"directory": str(tmp_path)}
  )
  for r in results:
    assert r == {
      "latest": str(tmp_path / "ckpt-24"),
      "step": 24,
      "ok": True,
      "kept": ["ckpt-20", "ckpt-22", "ckpt-24"],
    }


def test_primary_dying_mid_save_takes_the_job_down_and_restart_resumes(tmp_path):
  # Process 0 hosts JAX's coordination service: when it dies, JAX aborts the
  # others even in recoverable mode. Nothing may be committed, nothing hangs.
  procs, outdir = distributed.start(
    "distributed_cases",
    "die_during_save",
    2,
    devices=2,
    hard_exit=True,
    recoverable=True,
    kwargs={"directory": str(tmp_path), "victim": 0, "when": "writing"},
  )
  victim, other = distributed.collect(procs, outdir, timeout=150, expect_fail={0, 1})
  assert victim["returncode"] == 17
  _save_failed_or_jax_aborted(other)
  _nothing_committed_and_restart_resumes(tmp_path)


def test_async_saves_are_donation_safe_across_processes(tmp_path):
  results = distributed.launch(
    "distributed_cases",
    "donate_after_async_save",
    2,
    devices=2,
    kwargs={"directory": str(tmp_path)},
  )
  assert [r["ok"] for r in results] == [[True] * 4] * 2


def test_per_shard_crcs_are_recorded_and_catch_corruption(saved_2x2, tmp_path, capsys):
  import json
  import shutil

  from jaxckpt._cli import main

  directory, _ = saved_2x2
  path = str(tmp_path / "copy")
  shutil.copytree(os.path.join(directory, "ckpt-3"), path)
  with open(os.path.join(path, "jaxckpt", "metadata")) as f:
    leaf = json.load(f)["leaves"]["params/w"]
  assert leaf["crc32"] is None  # No process held params/w whole...
  assert sorted(leaf["shard_crc32"]) == ["0:64,0:64", "128:192,0:64", "192:256,0:64", "64:128,0:64"]
  reader = jaxckpt.load_checkpoint(path)  # ...so each of its 4 shards has one, from 2 processes.
  np.testing.assert_array_equal(reader.get_tensor("params/w"), cases.reference(3))
  assert main(["inspect", path, "--json"]) == 0
  rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["arrays"]}
  assert rows["params/w"]["shard_crc32"] == leaf["shard_crc32"]
  assert main(["verify", path, "--json"]) == 0
  capsys.readouterr()
  # Flip one byte of array data written by process 1.
  data_dir = os.path.join(path, "state", "ocdbt.process_1", "d")
  victim = max((os.path.join(data_dir, n) for n in os.listdir(data_dir)), key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="params/w"):
    jaxckpt.load_checkpoint(path).get_tensor("params/w")
  assert main(["verify", path, "--json"]) == 1


def test_an_error_on_one_process_never_mixes_steps_in_later_checkpoints(tmp_path):
  results = distributed.launch(
    "distributed_cases",
    "callback_fails_once",
    2,
    devices=2,
    kwargs={"directory": str(tmp_path)},
    timeout=180,
  )
  p0, p1 = results
  # The callback's error fails save 1's future on process 1 only; it is not raised
  # again by the next save there (that would drop that save on one process).
  assert p0["outcomes"] == [["ok", f"ckpt-{i}"] for i in range(1, 5)]
  assert p1["outcomes"] == [["error", "WriteCallbackError"]] + [
    ["ok", f"ckpt-{i}"] for i in range(2, 5)
  ]
  assert p1["sync_error"] == "WriteCallbackError" and p0["sync_error"] is None
  for r in results:  # Every committed checkpoint holds exactly one step's data.
    assert r["contents"] == {f"ckpt-{i}": [i] for i in range(1, 5)}
    assert r["counter"] == 4


def test_processes_that_disagree_on_the_path_all_refuse_quickly(tmp_path):
  results = distributed.launch(
    "distributed_cases", "disagreeing_calls", 2, devices=2, kwargs={"directory": str(tmp_path)}
  )
  for r in results:
    assert "disagree" in r["restore_error"], r
    assert "ckpt-1" in r["restore_error"] and "ckpt-2" in r["restore_error"]
    assert r["restore_seconds"] < 15  # Not the 20 s timeout, nor Orbax's 300 s.
    assert "disagree" in r["write_error"] and "w0" in r["write_error"], r
    assert r["write_seconds"] < 15
  assert results[0]["listing"] == ["checkpoint", "ckpt-1", "ckpt-2"]  # Nothing was written.
