"""Incremental checkpoints: unchanged leaves are referenced, not rewritten."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt._cli import _checkpoints_in

INC = jaxckpt.CheckpointOptions(incremental=True)


def _state_bytes(path):
  return sum(f.stat().st_size for f in Path(path, "state").rglob("*") if f.is_file())


def _sources(path):
  leaves = json.loads(Path(path, "jaxckpt", "metadata").read_text())["leaves"]
  return {n: i.get("source") for n, i in leaves.items()}


def _frozen_state():
  frozen = {f"f{i}": jax.random.normal(jax.random.key(i), (256, 256)) for i in range(9)}
  return frozen, {"head": jnp.zeros((256, 256))}


def test_same_objects_are_referenced_not_rewritten_and_restore_is_exact(tmp_path):
  frozen, head = _frozen_state()
  ckpt = jaxckpt.Checkpoint(frozen=frozen, head=head)
  first = ckpt.save(tmp_path / "c", options=INC)
  ckpt.head = {"head": jnp.ones((256, 256))}
  second = ckpt.save(tmp_path / "c", options=INC)
  assert _state_bytes(second) < 0.2 * _state_bytes(first)
  sources = _sources(second)
  assert sources["head/head"] is None and sources["frozen/f3"] == "../c-1"
  fresh = jaxckpt.Checkpoint(
    frozen=jax.tree.map(jnp.zeros_like, frozen), head={"head": jnp.zeros((256, 256))}
  )
  fresh.restore(second).assert_consumed()
  for k, v in frozen.items():
    np.testing.assert_array_equal(fresh.frozen[k], v)
  assert float(fresh.head["head"].sum()) == 256 * 256


def test_equal_content_in_new_arrays_is_reused_async(tmp_path):
  frozen, head = _frozen_state()
  ckpt = jaxckpt.Checkpoint(frozen=frozen, head=head)
  opts = jaxckpt.CheckpointOptions(enable_async=True, incremental=True)
  ckpt.save(tmp_path / "c", options=opts)
  ckpt.frozen = jax.tree.map(lambda x: x + 0.0, frozen)  # New arrays, same bytes.
  second = ckpt.save(tmp_path / "c", options=opts)
  ckpt.sync()
  assert all(s == "../c-1" for n, s in _sources(second).items() if n.startswith("frozen/"))


def test_chains_collapse_to_the_holder(tmp_path):
  frozen, head = _frozen_state()
  ckpt = jaxckpt.Checkpoint(frozen=frozen, head=head)
  for step in range(3):
    ckpt.head = {"head": jnp.full((256, 256), float(step))}
    last = ckpt.save(tmp_path / "c", options=INC)
  assert _sources(last)["frozen/f0"] == "../c-1"


def test_manager_sweep_never_breaks_newer_checkpoints(tmp_path):
  frozen, head = _frozen_state()
  ckpt = jaxckpt.Checkpoint(frozen=frozen, head=head)
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
  for step in range(5):
    ckpt.head = {"head": jnp.full((256, 256), float(step))}
    manager.save(options=INC)
  assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-4", "ckpt-5"]
  # ckpt-1 holds the frozen data: retired (hidden from listing), not deleted.
  assert jaxckpt.latest_checkpoint(tmp_path).endswith("ckpt-5")
  assert not (tmp_path / "ckpt-2").exists() and (tmp_path / "ckpt-1" / "state").is_dir()
  assert [Path(p).name for p in _checkpoints_in(str(tmp_path))] == ["ckpt-4", "ckpt-5"]
  with pytest.raises(jaxckpt.NotACheckpointError):
    jaxckpt.Checkpoint(head=head).restore(tmp_path / "ckpt-1")
  fresh = jaxckpt.Checkpoint(frozen=jax.tree.map(jnp.zeros_like, frozen), head=head)
  fresh.restore(manager.latest_checkpoint).assert_consumed()
  np.testing.assert_array_equal(fresh.frozen["f8"], frozen["f8"])
  # Once nothing refers to it any more (a full save), the retired one is deleted.
  ckpt.frozen = jax.tree.map(lambda x: x + 1.0, frozen)
  manager.save(options=INC)
  manager.save(options=INC)
  assert not (tmp_path / "ckpt-1").exists()


def test_incremental_never_overwrites(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(4))
  ckpt.write(tmp_path / "w", options=INC)
  with pytest.raises(jaxckpt.InvalidPathError, match="never overwrite"):
    ckpt.write(tmp_path / "w", options=INC)


def test_deleted_holder_is_a_clear_error(tmp_path):
  import shutil

  frozen, head = _frozen_state()
  ckpt = jaxckpt.Checkpoint(frozen=frozen, head=head)
  first = ckpt.save(tmp_path / "c", options=INC)
  second = ckpt.save(tmp_path / "c", options=INC)
  shutil.rmtree(first)
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="no longer exists"):
    jaxckpt.Checkpoint(frozen=frozen, head=head).restore(second)


def test_inspect_shows_reused_arrays(tmp_path, capsys):
  from jaxckpt._cli import main

  frozen, head = _frozen_state()
  ckpt = jaxckpt.Checkpoint(frozen=frozen, head=head)
  ckpt.save(tmp_path / "c", options=INC)
  ckpt.head = {"head": jnp.ones((256, 256))}
  second = ckpt.save(tmp_path / "c", options=INC)
  assert main(["inspect", second, "--json"]) == 0
  rows = {r["name"]: r["stored_in"] for r in json.loads(capsys.readouterr().out)["arrays"]}
  assert rows["frozen/f0"] == "../c-1" and rows["head/head"] is None


def test_incremental_requires_one_save_in_flight():
  with pytest.raises(jaxckpt.InvalidOptionsError, match="max_in_flight=1"):
    jaxckpt.CheckpointOptions(incremental=True, max_in_flight=2)
