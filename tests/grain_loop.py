"""A Grain-fed Flax NNX training loop that checkpoints every step (used by test_grain.py).

The data order (a shuffled Grain ``DataLoader``), a numpy ``Generator`` that
draws per-step noise, the model and its optimizer are all in one `Checkpoint`,
saved asynchronously through a `CheckpointManager` after every step. Run as a
script (``python grain_loop.py DIR STEPS``) it resumes from DIR's latest
checkpoint and prints ``batch STEP DIGEST`` per step, ``committed STEP`` once a
save is complete (state file included) and ``params DIGEST`` at the end.
"""

from __future__ import annotations

import hashlib
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxckpt

RECORDS, BATCH = 48, 4


def data_loader() -> grain.DataLoader:
  data = (np.arange(RECORDS * 3, dtype=np.float32) / RECORDS).reshape(RECORDS, 3)
  sampler = grain.samplers.IndexSampler(num_records=RECORDS, shuffle=True, seed=3, num_epochs=50)
  return grain.DataLoader(
    data_source=data,
    sampler=sampler,
    operations=[grain.transforms.Batch(batch_size=BATCH)],
    worker_count=0,
  )


@nnx.jit
def train_step(model, optimizer, x, noise):
  def loss_fn(model):
    target = x.sum(axis=-1, keepdims=True) + noise
    return jnp.mean((model(x) - target) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def digest(*arrays) -> str:
  h = hashlib.sha1()
  for a in arrays:
    h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
  return h.hexdigest()[:16]


def params_digest(model) -> str:
  return digest(*jax.tree.leaves(nnx.state(model, nnx.Param)))


def run(directory: str, steps: int, report=print) -> str:
  """Trains until ``steps``, resuming from ``directory``; returns the params' digest."""
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  batches, rng = iter(data_loader()), np.random.default_rng(11)
  ckpt = jaxckpt.Checkpoint(model=model, optimizer=optimizer, data=batches, rng=rng, step=0)
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=2)
  manager.restore_or_initialize()
  opts = jaxckpt.CheckpointOptions(enable_async=True)
  while ckpt.step < steps:
    x, noise = next(batches), rng.normal(size=(BATCH, 1)).astype(np.float32)
    train_step(model, optimizer, x, noise)
    ckpt.step += 1
    report(f"batch {ckpt.step} {digest(x, noise)}")
    path = manager.save(options=opts)
    path.future.add_done_callback(lambda f, step=ckpt.step: report(f"committed {step}"))
  manager.sync()
  return params_digest(model)


if __name__ == "__main__":
  final = run(sys.argv[1], int(sys.argv[2]), report=lambda line: print(line, flush=True))
  print(f"params {final}", flush=True)
