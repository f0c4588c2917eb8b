"""jaxckpt demo: a Flax NNX training job survives a preemption, bit for bit.

Trains a small NNX MLP regressor (Linear-GELU-Dropout-Linear-GELU-Linear) with
``optax.adamw`` through ``nnx.Optimizer`` on synthetic data (fixed seeds; batch
``i`` depends only on ``i``). A `jaxckpt.CheckpointManager` (max_to_keep=3)
saves the model and the optimizer asynchronously every ``--save-every`` steps; a
write callback logs each committed checkpoint. Phase 1 is "preempted" at ~65% of
``--steps`` and every model/optimizer object is dropped. Phase 2 builds a fresh
model and optimizer from a *different* seed, restores the latest checkpoint in
place (``assert_consumed()``: weights, Adam moments, step and Dropout RNG state)
and finishes. A reference run trains without interruption or checkpoints; the
resumed run must match it bit for bit (final state and every loss after the
resume point). Exits 1 on mismatch. Also reports how long each save blocked
training once the step's outputs were ready, and the commit latency.

Usage:
  python demo.py [--steps 200] [--save-every 40] [--width 512] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.progress import BarColumn
from rich.progress import MofNCompleteColumn
from rich.progress import Progress
from rich.progress import TextColumn
from rich.progress import TimeElapsedColumn

import jaxckpt

IN_DIM, BATCH, LR, DROPOUT, SEED = 16, 256, 1e-3, 0.1, 0
TEACHER = jax.random.normal(jax.random.key(SEED + 1), (IN_DIM, 4)) / 4
# One transform for every optimizer: it is static in nnx.jit's cache key, so fresh optimizers
# reuse the compiled step instead of recompiling it.
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR))


class MLP(nnx.Module):
  """IN_DIM -> width -> width -> 1 with GELUs and Dropout (whose RNG is checkpointed state)."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(IN_DIM, width, rngs=rngs)
    self.drop = nnx.Dropout(DROPOUT, rngs=rngs)
    self.l2 = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.l2(self.drop(nnx.gelu(self.l1(x))))))


def make(width: int, seed: int) -> tuple[MLP, nnx.Optimizer]:
  """A model initialized from ``seed`` and its optimizer (step 0)."""
  model = MLP(width, nnx.Rngs(params=seed, dropout=seed + 1))
  return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer):
  """One step on batch ``optimizer.step``; updates both objects in place, returns the loss."""
  x = jax.random.normal(
    jax.random.fold_in(jax.random.key(SEED + 2), optimizer.step[...]), (BATCH, IN_DIM)
  )
  y = jnp.sum(jnp.sin(x @ TEACHER), axis=-1, keepdims=True)
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  return loss


def train(model, optimizer, stop, label, *, manager=None, opts=None, save_every=0, stats=None):
  """Trains until step ``stop``; returns {step: loss}. Saves every ``save_every`` steps.

  Steps are dispatched without waiting for each other; only a save waits for its
  step's outputs, and its blocked time is measured from then (idle time).
  """
  losses, path = {}, None
  start = int(optimizer.step[...])
  columns = TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn()
  with Progress(*columns, TimeElapsedColumn()) as progress:
    task = progress.add_task(label, total=stop, completed=start)
    for i in range(start + 1, stop + 1):
      losses[i] = train_step(model, optimizer)
      progress.advance(task)
      if manager is not None and i % save_every == 0:
        jax.block_until_ready(nnx.state((model, optimizer)))  # Idle time starts here.
        stats["waited"] += path is not None and not path.future.done()
        t = time.perf_counter()
        path = manager.save(checkpoint_number=i, options=opts)
        stats["blocked"].append(time.perf_counter() - t)
        path.future.add_done_callback(
          lambda _, t=t: stats["commit"].append(time.perf_counter() - t)
        )
  return {i: float(loss) for i, loss in losses.items()}


def host_leaves(tree) -> list[np.ndarray]:
  """Every array of ``tree`` on the host; typed PRNG keys as their raw key data."""
  return [
    np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
    for x in jax.tree.leaves(tree)
  ]


def main(argv=None) -> int:
  """Parses flags, runs the demo in ``--dir`` (or a temp dir); returns the exit code."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--save-every", type=int, default=40)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--dir", default=None, help="checkpoint dir (default: a temp dir)")
  args = parser.parse_args(argv)
  if args.steps < 2 or args.save_every < 1 or args.width < 1:
    parser.error("--steps must be >= 2; --save-every and --width must be positive")
  own_dir = args.dir is None
  ckpt_dir = tempfile.mkdtemp(prefix="jaxckpt-demo-") if own_dir else args.dir
  try:
    return run(args, ckpt_dir, preempt_at=max(1, int(args.steps * 0.65)))
  finally:
    if own_dir:
      shutil.rmtree(ckpt_dir, ignore_errors=True)


def run(args, ckpt_dir: str, preempt_at: int) -> int:
  """Phase 1, preemption, phase 2, reference run and the comparison; returns the exit code."""
  opts = jaxckpt.CheckpointOptions(
    enable_async=True, experimental_write_callbacks=[lambda path: print(f"  committed {path}")]
  )
  stats = {"blocked": [], "commit": [], "waited": 0}
  jax.block_until_ready(train_step(*make(args.width, SEED)))  # Compiles outside timed regions.
  print(
    f"NNX MLP {IN_DIM}-{args.width}-{args.width}-1 + Dropout, adamw, {args.steps} steps, "
    f"async save every {args.save_every}, preemption after step {preempt_at}; "
    f"checkpoints in {ckpt_dir}"
  )

  # Phase 1: train until the "preemption".
  t0 = time.perf_counter()
  model, optimizer = make(args.width, SEED)
  manager = jaxckpt.CheckpointManager(
    jaxckpt.Checkpoint(model=model, optimizer=optimizer), ckpt_dir, max_to_keep=3
  )
  losses = train(
    model,
    optimizer,
    preempt_at,
    "phase 1",
    manager=manager,
    opts=opts,
    save_every=args.save_every,
    stats=stats,
  )
  manager.sync()  # Keeps the demo deterministic: the in-flight save lands first.
  print(
    f"phase 1: preempted at step {preempt_at} (loss {losses[preempt_at]:.4f}); "
    "model, optimizer and manager dropped"
  )
  del model, optimizer, manager, losses

  # Phase 2: what a restarted job does: fresh objects (another seed), restore, continue.
  t1 = time.perf_counter()
  model, optimizer = make(args.width, SEED + 42)
  ckpt = jaxckpt.Checkpoint(model=model, optimizer=optimizer)
  manager = jaxckpt.CheckpointManager(ckpt, ckpt_dir, max_to_keep=3)  # Reads the state file.
  latest = jaxckpt.latest_checkpoint(ckpt_dir)
  if latest is None:
    print(f"FAIL: no checkpoint in {ckpt_dir} (is --save-every > {preempt_at}?)")
    return 1
  ckpt.restore(latest).assert_consumed()  # Every variable restored, every array used.
  assert ckpt.model is model and ckpt.optimizer is optimizer  # Updated in place.
  restored_at = int(optimizer.step[...])
  print(
    f"phase 2: restored {latest} into a fresh model in {time.perf_counter() - t1:.2f} s: "
    f"step {restored_at}, {preempt_at - restored_at} steps to redo"
  )
  losses = train(
    model,
    optimizer,
    args.steps,
    "phase 2",
    manager=manager,
    opts=opts,
    save_every=args.save_every,
    stats=stats,
  )
  manager.sync()
  t2 = time.perf_counter()
  kept = ", ".join(os.path.basename(p) for p in manager.checkpoints)
  print(
    f"phase 2: finished at step {args.steps} (loss {losses[args.steps]:.4f}); "
    f"kept {kept} (max_to_keep=3)"
  )

  # Reference: uninterrupted, no checkpoints.
  ref_model, ref_optimizer = make(args.width, SEED)
  ref_losses = train(ref_model, ref_optimizer, args.steps, "reference")
  t3 = time.perf_counter()

  same_state = all(
    np.array_equal(a, b)
    for a, b in zip(
      host_leaves(nnx.state((model, optimizer))),
      host_leaves(nnx.state((ref_model, ref_optimizer))),
      strict=True,
    )
  )
  same_losses = losses == {i: ref_losses[i] for i in losses}
  blocked = [b * 1e3 for b in stats["blocked"]]
  print(
    f"\nidle time per save (from step outputs ready): p50 {statistics.median(blocked):.2f} "
    f"ms, max {max(blocked):.2f} ms over {len(blocked)} saves; commit p50 "
    f"{statistics.median(stats['commit']) * 1e3:.0f} ms in the background; "
    f"{stats['waited']}/{len(blocked)} saves waited for the previous one (one in flight)"
  )
  total, ref_time = t2 - t0, t3 - t2
  print(
    f"time: preempted+resumed {total:.2f} s (phase 1 {t1 - t0:.2f} s, phase 2 "
    f"{t2 - t1:.2f} s); reference {ref_time:.2f} s; overhead {total - ref_time:+.2f} s "
    f"(saves, restore, redone steps)"
  )
  print(
    f"final params, Adam state, step and Dropout RNG: "
    f"{'bit-identical' if same_state else 'DIFFERENT'}; losses of steps "
    f"{restored_at + 1}-{args.steps}: {'identical' if same_losses else 'DIFFERENT'}"
  )
  ok = same_state and same_losses
  print(
    "PASS: resumed run is bit-identical to the uninterrupted run"
    if ok
    else "FAIL: resumed run differs from the uninterrupted run"
  )
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
