import os, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxckpt

def save_restore(directory):
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  s = NamedSharding(mesh, P("x"))
  x = jax.make_array_from_callback((16, 4), s, lambda idx: np.arange(64, dtype=np.float32).reshape(16, 4)[idx])
  ckpt = jaxckpt.Checkpoint(params={"w": x}, step=3)
  p = ckpt.save(os.path.join(directory, "ckpt"), jaxckpt.CheckpointOptions(enable_async=True))
  p.future.result(timeout=60)
  ckpt.params = {"w": jax.jit(lambda a: a * 0, out_shardings=s)(x)}
  ckpt.restore(p).assert_consumed()
  got = np.asarray(jax.experimental.multihost_utils.process_allgather(ckpt.params["w"], tiled=True))
  return {"path": str(p), "ok": bool((got == np.arange(64).reshape(16, 4)).all()), "pid": jax.process_index()}
