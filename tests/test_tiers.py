"""The manager's local tier: per-process saves, ring replicas, restore from the best tier.

In-process tests cover one process (no peers) and the selection rule; the
multi-process ones run real ``jax.distributed`` processes on 127.0.0.1 (code in
tier_cases.py), SIGKILL one, wipe local directories and restart them all.
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import distributed
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt._tiers import Holdings
from jaxckpt._tiers import newest_complete

pytestmark = pytest.mark.timeout(240)


def _state(step: int):
  mesh = jax.make_mesh((4,), ("x",))
  w = jax.device_put(jnp.arange(64.0).reshape(16, 4) * step, NamedSharding(mesh, P("x")))
  return {"w": w, "r": jnp.full(3, step, jnp.int32), "n": np.float32(step), "step": step}


def _manager(tmp_path, ckpt, **kwargs):
  return jaxckpt.CheckpointManager(
    ckpt,
    tmp_path / "persistent",
    max_to_keep=2,
    step_counter=lambda: ckpt.step,
    local_directory=tmp_path / "local",
    **kwargs,
  )


def _bits(tree) -> list[bytes]:
  return [np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(tree)]


def test_one_process_restores_newer_local_step_bit_exact_else_persistent(tmp_path):
  ckpt = jaxckpt.Checkpoint(s=_state(0), step=0)
  manager = _manager(tmp_path, ckpt, checkpoint_interval=3, local_max_to_keep=2)
  for step in range(1, 6):
    ckpt.s, ckpt.step = _state(step), step
    manager.save(options=jaxckpt.CheckpointOptions(enable_async=True))
  manager.sync()
  assert sorted(os.listdir(tmp_path / "persistent")) == ["checkpoint", "ckpt-1", "ckpt-4"]
  local = tmp_path / "local" / "process-0"
  assert sorted(os.listdir(local)) == ["step-4", "step-5"]  # local_max_to_keep=2.

  fresh = jaxckpt.Checkpoint(s=_state(0), step=0)
  restored = _manager(tmp_path, fresh, checkpoint_interval=3)
  assert restored.restore_or_initialize() == str(local / "step-5")
  assert restored.restored_tier == "local"
  assert _bits(fresh.s) == _bits(_state(5)) and fresh.step == 5 and fresh.save_counter == 2
  assert fresh.s["w"].sharding == _state(0)["w"].sharding and type(fresh.s["n"]) is np.float32
  # Restored arrays may sit on the mapped file: deleting it and donating them is safe.
  shutil.rmtree(local / "step-5")
  doubled = jax.jit(lambda w: w * 2, donate_argnums=0)(fresh.s["w"])
  assert np.array_equal(np.asarray(doubled), np.asarray(_state(10)["w"]))

  shutil.rmtree(local)
  fresh = jaxckpt.Checkpoint(s=_state(0), step=0)
  restored = _manager(tmp_path, fresh, checkpoint_interval=3)
  assert restored.restore_or_initialize() == str(tmp_path / "persistent" / "ckpt-4")
  assert restored.restored_tier == "persistent" and _bits(fresh.s) == _bits(_state(4))


def test_local_step_older_than_persistent_or_resharded_is_not_used(tmp_path):
  ckpt = jaxckpt.Checkpoint(s=_state(1), step=1)
  manager = _manager(tmp_path, ckpt, local_interval=2)
  manager.save()  # Both tiers: step 1.
  ckpt.s, ckpt.step = _state(2), 2
  manager.save()  # Persistent only: step 2 is before the next local one (interval 2).
  manager.sync()
  assert sorted(os.listdir(tmp_path / "local" / "process-0")) == ["step-1"]
  fresh = jaxckpt.Checkpoint(s=_state(0), step=0)
  again = _manager(tmp_path, fresh)
  assert again.restore_or_initialize().endswith("ckpt-2") and again.restored_tier == "persistent"
  assert os.listdir(tmp_path / "local" / "process-0") == ["step-1"]  # Older: kept.

  ckpt.s, ckpt.step = _state(3), 3
  manager.save()
  other = _state(0)
  other["w"] = jax.device_put(other["w"], NamedSharding(jax.make_mesh((2,), ("x",)), P("x")))
  fresh = jaxckpt.Checkpoint(s=other, step=0)
  again = _manager(tmp_path, fresh)
  assert again.restore_or_initialize().endswith("ckpt-3") and again.restored_tier == "persistent"
  assert _bits(fresh.s) == _bits(_state(3))


def test_corrupt_local_step_falls_back_to_persistent(tmp_path):
  ckpt = jaxckpt.Checkpoint(s=_state(1), step=1)
  manager = _manager(tmp_path, ckpt)
  manager.save()
  ckpt.s, ckpt.step = _state(2), 2
  manager.save(check_interval=False)
  manager.sync()
  own = tmp_path / "local" / "process-0" / "step-2" / "own.bin"
  data = bytearray(own.read_bytes())
  data[-1] ^= 1  # One flipped bit in the last array's data.
  own.write_bytes(bytes(data))
  fresh = jaxckpt.Checkpoint(s=_state(0), step=0)
  again = _manager(tmp_path, fresh)
  assert again.restore_or_initialize().endswith("ckpt-2") and again.restored_tier == "persistent"
  assert _bits(fresh.s) == _bits(_state(2))


def test_local_save_owns_its_snapshot_when_the_next_step_donates(tmp_path):
  ckpt = jaxckpt.Checkpoint(s=_state(3), step=3)
  manager = _manager(tmp_path, ckpt)
  manager.save()
  ckpt.s = {**ckpt.s, "w": jax.jit(lambda w: w * 0, donate_argnums=0)(ckpt.s["w"])}
  manager.sync()
  fresh = jaxckpt.Checkpoint(s=_state(0), step=0)
  again = _manager(tmp_path, fresh)
  assert again.restore_or_initialize().endswith("step-3") and _bits(fresh.s) == _bits(_state(3))
  ckpt.s = {**ckpt.s, "w": jax.ShapeDtypeStruct((16, 4), jnp.float32)}
  ckpt.step = 4
  with pytest.raises(jaxckpt.TreeError, match="ShapeDtypeStruct"):
    manager._local.save(ckpt, 4, 10)


def test_newest_complete_needs_every_process_at_itself_or_its_keeper():
  def h(own, peer=()):
    return Holdings(frozenset(own), frozenset(peer))

  # Process i's replica lives at process i - 1.
  assert newest_complete([h({4, 5}, {4, 5}), h({4}, {4}), h({4, 5}, {4, 5})]) == 5
  assert newest_complete([h({4, 5}, {4}), h({4}, {4, 5}), h({4, 5}, {4, 5})]) == 4
  assert newest_complete([h({5}, {5}), h(set(), set()), h(set(), {5})]) is None
  assert newest_complete([h({3, 7})]) == 7  # One process: no peers.
  assert newest_complete([h(set())]) is None


def test_local_tier_arguments(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=1)
  for kwargs, match in [
    ({"local_interval": 0}, "local_interval must be a positive int"),
    ({"local_max_to_keep": True}, "local_max_to_keep must be a positive int"),
  ]:
    with pytest.raises(jaxckpt.InvalidOptionsError, match=match):
      jaxckpt.CheckpointManager(ckpt, tmp_path, 1, local_directory=tmp_path / "l", **kwargs)
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path / "p", 1, local_directory=tmp_path / "l")
  with pytest.raises(jaxckpt.InvalidOptionsError, match="needs a step number"):
    manager.save()
  assert manager.save(checkpoint_number=7).endswith("ckpt-7")
  manager.sync()  # The local write runs in the background.
  assert os.listdir(tmp_path / "l" / "process-0") == ["step-7"]


@pytest.mark.slow
def test_one_process_killed_in_a_local_commit_resumes_from_the_step_before(tmp_path):
  """SIGKILL inside the local save of step 3: that save is never chosen, its
  staging directory is swept, and step 2 comes back from the local tier."""
  kwargs = {"directory": str(tmp_path / "p"), "local": str(tmp_path / "l")}
  procs, out = distributed.start(
    "tier_cases",
    "train",
    1,
    devices=2,
    hard_exit=True,
    kwargs={
      **kwargs,
      "steps": 3,
      "persistent_every": 20,
      "victim": 0,
      "kill_at": 3,
      "in_commit": True,
    },
  )
  (killed,) = distributed.collect(procs, out, timeout=120, expect_fail={0})
  assert killed["returncode"] == -9
  names = os.listdir(tmp_path / "l" / "process-0")
  assert "step-2" in names and "step-3" not in names
  assert any(".jaxckpt-tmp-" in n for n in names)  # The interrupted save's staging.
  (r,) = distributed.launch(
    "tier_cases", "resume", 1, devices=2, kwargs={**kwargs, "persistent_every": 20}
  )
  assert r["tier"] == "local" and r["step"] == 2 and r["w_ok"] and r["b"] == [0, 2, 4]
  assert r["local"] == ["step-1", "step-2"]  # Leftovers swept.


def _train(n, directory, local, **kwargs):
  procs, out = distributed.start(
    "tier_cases",
    "train",
    n,
    devices=4 // n,
    hard_exit=True,
    recoverable=True,
    kwargs={"directory": str(directory), "local": str(local), **kwargs},
  )
  return distributed.collect(procs, out, timeout=200, expect_fail=set(range(n)))


def _resume(n, directory, local, **kwargs):
  return distributed.launch(
    "tier_cases",
    "resume",
    n,
    devices=4 // n,
    timeout=200,
    kwargs={"directory": str(directory), "local": str(local), "persistent_every": 20, **kwargs},
  )


@pytest.mark.slow
def test_two_processes_victim_killed_in_local_commit_recovers_its_shards_from_its_peer(tmp_path):
  results = _train(
    2,
    tmp_path / "p",
    tmp_path / "l",
    steps=6,
    persistent_every=20,
    victim=1,
    kill_at=5,
    in_commit=True,
  )
  assert results[1]["returncode"] == -9
  assert results[0]["failed_at"] == 6  # The survivor's next save found its peer gone.
  assert "step-5" not in os.listdir(tmp_path / "l" / "process-1")  # Interrupted: not committed.
  resumed = _resume(2, tmp_path / "p", tmp_path / "l")
  for r in resumed:
    assert (r["tier"], r["step"], r["w_ok"], r["b"]) == ("local", 5, True, [0, 5, 10])
  # Staging swept; step 5 came from process 0 and is kept again; training goes on.
  assert resumed[1]["local"] == ["step-4", "step-5"]
  assert [r["after"] for r in resumed] == [[5, 6], [5, 6]]


@pytest.mark.slow
def test_four_processes_lose_at_most_one_step_to_a_killed_and_wiped_process(tmp_path):
  """Local tier every step, persistent every 20: process 1 is SIGKILLed in step
  24 and its local directory wiped; all restart from step 23 (bit-exact, via
  process 0's replica). With its neighbour 2 wiped too, step 23 is complete
  nowhere: all restore the persistent step 21."""
  directory, local = tmp_path / "p", tmp_path / "l"
  results = _train(4, directory, local, steps=24, persistent_every=20, victim=1, kill_at=24)
  assert results[1]["returncode"] == -9
  assert [results[i].get("failed_at") for i in (0, 2, 3)] == [24] * 3, [
    {k: (v[-3000:] if isinstance(v, str) else v) for k, v in results[i].items()} for i in (0, 2, 3)
  ]
  shutil.rmtree(local / "process-1")
  resumed = _resume(4, directory, local, then_save=False)
  assert [(r["tier"], r["step"], r["w_ok"]) for r in resumed] == [("local", 23, True)] * 4
  assert resumed[1]["local"] == ["step-23"]  # Its shards, from process 0, kept again.
  shutil.rmtree(local / "process-1")
  shutil.rmtree(local / "process-2")
  resumed = _resume(4, directory, local, then_save=False)
  assert [(r["tier"], r["step"], r["w_ok"]) for r in resumed] == [("persistent", 21, True)] * 4
  assert resumed[0]["restored"] == str(directory / "ckpt-21")
  assert resumed[0]["local"] == []  # Local steps newer than the restored one are deleted.


@pytest.mark.slow
def test_tiers_benchmark_runs_tiny(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
    "tiers_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "tiers.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "tiers.json"
  argv = ["--size-mib", "1", "--leaves", "2", "--repeats", "1", "--horizon", "40"]
  results = module.main(
    [*argv, "--dir", str(tmp_path), "--local-dir", str(tmp_path), "--json", str(out)]
  )
  assert set(results["configs"]) == {"1x4", "2x2"}
  for name, r in results["configs"].items():
    assert all(
      len(r[f"{t}_{k}"]) == 1 for t in ("local", "persistent") for k in ("commit_s", "restore_s")
    )
    assert len(r["local_restore_via_peer_s"]) == (1 if name == "2x2" else 0)
  lost = {
    (row["persistent_every"], row["local_every"], row["failure"]): row
    for row in results["steps_lost"]
  }
  assert lost[(20, None, "any")]["max"] == 19 and lost[(20, 1, "one process")]["max"] == 0
  assert json.loads(out.read_text()) == results and "restore time" in capsys.readouterr().out
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tiers.json"]  # Scratch dirs removed.
