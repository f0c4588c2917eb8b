"""Checkpoints on TensorStore key-value stores: memory:// and s3:// (a real moto
S3 server on 127.0.0.1, started by conftest.py), with the manifest-last commit protocol."""

import json
import os
import time
import uuid

import distributed_cases as cases
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import _knobs
from jaxckpt import _store


@pytest.fixture(params=["memory", "s3"])
def root(request):
  if request.param == "memory":
    return f"memory://{uuid.uuid4().hex}/run"
  _, bucket = request.getfixturevalue("s3")
  return f"s3://{bucket}/run"


def _state(scale=1.0):
  mesh = jax.make_mesh((4,), ("x",))
  w = jax.device_put(jnp.arange(64.0).reshape(16, 4) * scale - 7.5, NamedSharding(mesh, P("x")))
  return {
    "w": w,
    "h": jnp.full((3,), scale, dtype=jnp.bfloat16),
    "b": np.arange(5, dtype=np.int64),
    "lr": 0.5 * scale,
  }


def _keys(root):  # Without the writing manager's id (see KvStore.lock_writer).
  return sorted(n for n in _store.KV.names(root) if n != ".jaxckpt-writer")


@pytest.mark.parametrize("enable_async", [False, True])
def test_save_and_restore_round_trip(root, enable_async):
  calls = []
  ckpt = jaxckpt.Checkpoint(params=_state(), step=3)
  opts = jaxckpt.CheckpointOptions(
    enable_async=enable_async, experimental_write_callbacks=[calls.append]
  )
  first = ckpt.save(f"{root}/ckpt", options=opts)
  ckpt.params = _state(2.0)
  second = ckpt.save(f"{root}/ckpt", options=opts)
  assert second.future.result(timeout=60) == f"{root}/ckpt-2"
  assert calls == [f"{root}/ckpt-1", f"{root}/ckpt-2"]
  assert jaxckpt.latest_checkpoint(root) == f"{root}/ckpt-2"
  assert _keys(root) == ["checkpoint", "ckpt-1", "ckpt-2"]

  ckpt.params = _state(0.0)
  ckpt.params["b"] = np.zeros(5, np.int64)
  ckpt.step = 0
  ckpt.restore(str(first)).assert_consumed()
  expected = _state()
  np.testing.assert_array_equal(np.asarray(ckpt.params["w"]), np.asarray(expected["w"]))
  assert ckpt.params["w"].sharding == expected["w"].sharding  # Resharded onto the target.
  assert ckpt.params["h"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ckpt.params["h"]), np.ones(3, ml_dtypes.bfloat16))
  assert ckpt.params["b"].dtype == np.int64 and ckpt.params["b"].tolist() == [0, 1, 2, 3, 4]
  assert ckpt.params["lr"] == 0.5 and ckpt.step == 3 and ckpt.save_counter == 1

  reader = jaxckpt.load_checkpoint(root)  # The newest, via the state file.
  np.testing.assert_array_equal(reader.get_tensor("params/w"), np.asarray(_state(2.0)["w"]))
  assert dict(jaxckpt.list_variables(f"{root}/ckpt-1"))["params/w"] == [16, 4]


def test_s3_objects_follow_the_documented_layout(s3):
  client, bucket = s3
  ckpt = jaxckpt.Checkpoint(params=_state())
  ckpt.save(f"s3://{bucket}/run/ckpt")
  keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
  assert "run/checkpoint" in keys and "run/ckpt-1/jaxckpt/metadata" in keys
  manifest = json.loads(
    client.get_object(Bucket=bucket, Key="run/ckpt-1/jaxckpt/metadata")["Body"].read()
  )
  data = manifest["data"]
  # One zarr v3 array per leaf under the data prefix, one chunk per device shard.
  w_chunks = [k for k in keys if k.startswith(f"run/ckpt-1/{data}/params/w/c/")]
  assert len(w_chunks) == 4
  assert f"run/ckpt-1/{data}/params/w/zarr.json" in keys
  assert manifest["leaves"]["params/w"]["crc32"] is not None


def test_write_overwrites_only_after_the_new_data_is_complete(root):
  ckpt = jaxckpt.Checkpoint(params=_state())
  ckpt.write(f"{root}/w")
  old = [n for n in _store.KV.names(f"{root}/w") if n.startswith("data-")]
  ckpt.params = _state(3.0)
  ckpt.write(f"{root}/w")
  new = [n for n in _store.KV.names(f"{root}/w") if n.startswith("data-")]
  assert len(old) == len(new) == 1 and old != new  # Old data deleted after the commit.
  ckpt.params = _state(0.0)
  ckpt.read(f"{root}/w").assert_consumed()
  np.testing.assert_array_equal(np.asarray(ckpt.params["w"]), np.asarray(_state(3.0)["w"]))


def test_failure_before_the_manifest_leaves_no_checkpoint_and_is_collected(root, monkeypatch):
  ckpt = jaxckpt.Checkpoint(params=_state())
  manager = jaxckpt.CheckpointManager(ckpt, root, max_to_keep=3)
  manager.save()

  real = _store.KV.replace_file

  def crash_on_commit(url, data):
    if url.endswith("jaxckpt/metadata"):
      raise OSError("simulated crash between the data and the commit")
    real(url, data)

  monkeypatch.setattr(_store.KV, "replace_file", crash_on_commit)
  ckpt.params = _state(5.0)
  with pytest.raises(jaxckpt.SaveError, match="was not committed"):
    manager.save()
  monkeypatch.setattr(_store.KV, "replace_file", real)

  # The failed save deleted the arrays it had written; ckpt-2 does not exist.
  assert not _store.KV.names(f"{root}/ckpt-2")
  assert jaxckpt.latest_checkpoint(root) == f"{root}/ckpt-1"
  with pytest.raises(jaxckpt.CheckpointNotFoundError):
    ckpt.restore(f"{root}/ckpt-2")
  reopened = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(params=_state(0.0)), root, max_to_keep=3)
  assert reopened.restore_or_initialize() == f"{root}/ckpt-1"
  np.testing.assert_array_equal(
    np.asarray(reopened.checkpoint.params["w"]), np.asarray(_state()["w"])
  )


def test_crashed_saves_data_is_swept_only_once_no_save_can_be_writing_it(root, monkeypatch):
  # Data no manifest names: a crashed save's, or that of a save still writing in
  # another process (which must survive, or it would commit a manifest naming
  # deleted data). Only its age tells them apart.
  ckpt = jaxckpt.Checkpoint(params=_state())
  path = jaxckpt.CheckpointManager(ckpt, root, max_to_keep=3).save()
  now = time.time()
  young = f"data-{int(now - 60):x}-{'a' * 12}"
  old = f"data-{int(now - _knobs.KV_LEFTOVER_AGE_S - 60):x}-{'b' * 12}"
  unnamed = "data-0123456789ab"  # Written before data names had a time.
  for name in (young, old, unnamed):
    _store.KV.replace_file(f"{path}/{name}/params.w/zarr.json", b"{}")
  reopened = jaxckpt.CheckpointManager(jaxckpt.Checkpoint(params=_state(0.0)), root, max_to_keep=3)
  data = {n for n in _store.KV.names(path) if n.startswith("data-")}
  assert young in data and not {old, unnamed} & data
  assert reopened.restore_or_initialize() == path  # The live data is untouched.
  np.testing.assert_array_equal(
    np.asarray(reopened.checkpoint.params["w"]), np.asarray(_state()["w"])
  )
  monkeypatch.setattr(_knobs, "KV_LEFTOVER_AGE_S", 30.0)
  jaxckpt.CheckpointManager(jaxckpt.Checkpoint(params=_state(0.0)), root, max_to_keep=3)
  assert young not in _store.KV.names(path)


def test_manager_sweeps_and_recovers_on_a_store(root):
  ckpt = jaxckpt.Checkpoint(params=_state(), step=0)
  manager = jaxckpt.CheckpointManager(ckpt, root, max_to_keep=2)
  opts = jaxckpt.CheckpointOptions(enable_async=True)
  for step in range(1, 5):
    ckpt.step = step
    manager.save(options=opts)
  manager.sync()
  assert manager.checkpoints == [f"{root}/ckpt-3", f"{root}/ckpt-4"]
  assert _keys(root) == ["checkpoint", "ckpt-3", "ckpt-4"]  # 1 and 2 fully deleted.
  again = jaxckpt.CheckpointManager(
    jaxckpt.Checkpoint(params=_state(0.0), step=0), root, max_to_keep=2
  )
  assert again.checkpoints == manager.checkpoints
  assert again.restore_or_initialize() == f"{root}/ckpt-4"
  assert again.checkpoint.step == 4


def test_corrupt_object_is_detected_and_named(s3):
  client, bucket = s3
  ckpt = jaxckpt.Checkpoint(params=_state())
  path = ckpt.save(f"s3://{bucket}/run/ckpt")
  data = json.loads(
    client.get_object(Bucket=bucket, Key="run/ckpt-1/jaxckpt/metadata")["Body"].read()
  )["data"]
  key = f"run/ckpt-1/{data}/params/w/c/1/0"
  body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
  body[3] ^= 0xFF
  client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
  with pytest.raises(jaxckpt.CorruptCheckpointError, match="params/w"):
    ckpt.restore(path)


def test_bad_store_input_gives_clear_errors(s3, root):
  ckpt = jaxckpt.Checkpoint(params=_state())
  with pytest.raises(jaxckpt.CheckpointNotFoundError, match="No checkpoint found"):
    ckpt.restore(f"{root}/nothing-here")
  with pytest.raises(jaxckpt.InvalidOptionsError, match="incremental=True needs a local path"):
    ckpt.save(f"{root}/ckpt", jaxckpt.CheckpointOptions(incremental=True))
  with pytest.raises(jaxckpt.SaveError, match="NoSuchBucket|not found|NOT_FOUND"):
    ckpt.save("s3://no-such-bucket-here/run/ckpt")
  assert jaxckpt.latest_checkpoint(root) is None


def test_memory_store_is_shared_within_the_process():
  root = f"memory://{uuid.uuid4().hex}"
  jaxckpt.Checkpoint(x=jnp.arange(3)).save(f"{root}/ckpt")
  other = jaxckpt.Checkpoint(x=jnp.zeros(3, jnp.int32))
  other.restore(jaxckpt.latest_checkpoint(root)).assert_consumed()
  assert other.x.tolist() == [0, 1, 2]
  assert os.path.exists("memory:") is False  # Nothing leaked onto the local disk.


def test_two_processes_save_their_shards_to_s3_and_restore(s3, s3_endpoint, tmp_path):
  import distributed  # The multi-process launcher (tests/distributed.py).

  client, bucket = s3
  root = f"s3://{bucket}/mp"
  env = {
    k: os.environ[k]
    for k in (
      "AWS_ACCESS_KEY_ID",
      "AWS_SECRET_ACCESS_KEY",
      "AWS_REGION",
      "AWS_EC2_METADATA_DISABLED",
      "AWS_ENDPOINT_URL",
    )
  }
  results = distributed.launch(
    "distributed_cases", "save_and_restore", 2, devices=2, kwargs={"directory": root}, env=env
  )
  expected = [f"{root}/ckpt-{i}" for i in (1, 2, 3)]
  for r in results:
    assert r["committed"] == expected and r["callbacks"] == expected
    assert r["w_ok"] and r["b"] == [0, 3, 6] and r["step"] == 3
    assert r["listing"] == ["checkpoint", "ckpt-2", "ckpt-3"]
  # Each process wrote its own 2 of the 4 shards of params/w; one manifest.
  manifest = json.loads(
    client.get_object(Bucket=bucket, Key="mp/ckpt-3/jaxckpt/metadata")["Body"].read()
  )
  keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="mp/ckpt-3/")["Contents"]]
  assert len([k for k in keys if f"/{manifest['data']}/params/w/c/" in k]) == 4
  assert len(manifest["leaves"]["params/w"]["shard_crc32"]) == 4  # From both processes.
  # Restorable here too: 1 process x 4 devices.
  got = cases.restore_resharded(f"{root}/ckpt-3", [4], ["x"])
  assert got["w_ok"] and got["b"] == [0, 3, 6]
