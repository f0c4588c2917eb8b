import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

import jaxckpt
from jaxckpt._io_device import resolve_io_device


@pytest.mark.parametrize(
  "spec, index",
  [
    ("/job:localhost", 0),
    ("/job:worker/task:0", 0),
    ("/task:0", 0),
    ("/job:localhost/replica:0/task:0/device:CPU:0", 0),
    ("cpu:0", 0),
    ("CPU:2", 2),
    ("/cpu:3", 3),
    ("/device:CPU:1", 1),
    ("/job:localhost/device:CPU:*", 0),
  ],
)
def test_tf_device_strings_resolve_to_local_cpu_devices(spec, index):
  assert resolve_io_device(spec) == jax.local_devices(backend="cpu")[index]


def test_none_and_jax_device():
  assert resolve_io_device(None) is None
  device = jax.devices()[2]
  assert resolve_io_device(device) is device


@pytest.mark.parametrize(
  "spec, why",
  [
    ("gpu:0", "no GPU:0 device"),
    ("cpu:9", "no CPU:9 device"),
    ("/job:worker/task:3", "names task 3"),
    ("/job:localhost/replica:1", "replica 1"),
    ("not a device", "not a device string"),
    (3, "got int"),
  ],
)
def test_unknown_devices_list_what_is_available(spec, why):
  with pytest.raises(ValueError, match=why) as info:
    resolve_io_device(spec)
  assert "/job:localhost/task:0/device:CPU:3" in str(info.value)


def test_unknown_device_fails_save_before_touching_disk(tmp_path):
  ckpt = jaxckpt.Checkpoint(x=jnp.ones(2))
  with pytest.raises(jaxckpt.UnknownDeviceError):
    ckpt.save(tmp_path / "m", options=jaxckpt.CheckpointOptions("tpu:0"))
  assert ckpt.save_counter == 0 and list(tmp_path.iterdir()) == []


def test_io_device_changes_where_io_happens_not_what_is_saved(tmp_path):
  sharded = jax.device_put(
    jnp.arange(16.0), jax.NamedSharding(jax.make_mesh((4,), ("d",)), jax.P("d"))
  )
  direct = jaxckpt.Checkpoint(x=sharded).save(tmp_path / "direct")
  routed = jaxckpt.Checkpoint(x=sharded).save(
    tmp_path / "routed", options=jaxckpt.CheckpointOptions("/device:CPU:1")
  )
  # Routed: the whole array went through CPU:1 before Orbax wrote it.
  meta = ocp.PyTreeCheckpointer().metadata(f"{routed}/state").item_metadata.tree["x"]
  assert meta.sharding.device_str == "cpu:1"
  meta = ocp.PyTreeCheckpointer().metadata(f"{direct}/state").item_metadata.tree["x"]
  assert meta.sharding.partition_spec == ("d",)
  values = [jaxckpt.load_checkpoint(p).get_tensor("x").tolist() for p in (direct, routed)]
  assert values[0] == values[1] == list(range(16))
