"""jaxckpt demo: survive a preemption with async checkpoints, bit for bit.

Trains a small MLP regressor (pure JAX, hand-written SGD with momentum) on
synthetic data, saving asynchronously every ``--save-every`` steps. Phase 1 is
"preempted" at ~65% of ``--steps``; phase 2 starts from fresh zero state,
restores the latest checkpoint and finishes. A reference run trains without
interruption (and without checkpoints); the resumed run must end with
bit-identical parameters. Exits 1 on mismatch.

Usage:
  python demo.py [--steps 200] [--save-every 40] [--width 512] [--dir DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxckpt

IN_DIM, BATCH, LR, BETA, CLIP, SEED = 16, 256, 0.05, 0.9, 1.0, 0
TEACHER = jax.random.normal(jax.random.key(SEED + 1), (IN_DIM, 4)) / 4


def init_params(width: int, zeros: bool = False) -> dict[str, jax.Array]:
  """He-initialized MLP IN_DIM -> width -> width -> 1 (or all zeros)."""
  dims = (IN_DIM, width, width, 1)
  keys = jax.random.split(jax.random.key(SEED), len(dims) - 1)
  params = {}
  for i, (k, a, b) in enumerate(zip(keys, dims[:-1], dims[1:], strict=True)):
    w = jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a)
    params[f"w{i}"] = jnp.zeros_like(w) if zeros else w
    params[f"b{i}"] = jnp.zeros((b,))
  return params


def loss_fn(params, x, y):
  """Mean squared error of the GELU MLP."""
  h = x
  for i in range(len(params) // 2):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < len(params) // 2 - 1:
      h = jax.nn.gelu(h)
  return jnp.mean((h - y) ** 2)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def train_step(params, momentum, step):
  """One SGD+momentum step (global-norm clipped) on batch ``step`` (data depends only on it)."""
  key = jax.random.fold_in(jax.random.key(SEED + 2), step)
  x = jax.random.normal(key, (BATCH, IN_DIM))
  y = jnp.sum(jnp.sin(x @ TEACHER), axis=-1, keepdims=True)
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, CLIP / norm), grads)
  momentum = jax.tree.map(lambda m, g: BETA * m + g, momentum, grads)
  params = jax.tree.map(lambda p, m: p - LR * m, params, momentum)
  return params, momentum, step + 1, loss


def train(params, momentum, step, stop, *, ckpt=None, prefix=None, opts=None,
          save_every=0, stats=None):
  """Trains until step ``stop``, saving asynchronously every ``save_every`` steps.

  Steps are dispatched without waiting for each other; only a save waits for
  its step's outputs. Records each save's blocked and commit seconds in ``stats``
  and counts in ``stats["waited"]`` saves that found the previous one in flight.
  """
  loss, path = None, None
  for i in range(int(step) + 1, stop + 1):
    params, momentum, step, loss = train_step(params, momentum, step)
    if ckpt is not None and i % save_every == 0:
      jax.block_until_ready((params, momentum, step))  # Idle time starts here.
      stats["waited"] += path is not None and not path.future.done()
      start = time.perf_counter()
      ckpt.params, ckpt.momentum, ckpt.step = params, momentum, step
      path = ckpt.save(prefix, options=opts)
      stats["blocked"].append(time.perf_counter() - start)
      path.future.add_done_callback(
          lambda _, t=start: stats["commit"].append(time.perf_counter() - t))
  return params, momentum, step, loss


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
  preempt_at = max(1, int(args.steps * 0.65))
  own_dir = args.dir is None
  ckpt_dir = tempfile.mkdtemp(prefix="jaxckpt-demo-") if own_dir else args.dir
  try:
    return run(args, ckpt_dir, preempt_at)
  finally:
    if own_dir:
      shutil.rmtree(ckpt_dir, ignore_errors=True)


def run(args, ckpt_dir: str, preempt_at: int) -> int:
  """Phase 1, preemption, phase 2, reference run and the comparison; returns the exit code."""
  prefix = os.path.join(ckpt_dir, "ckpt")
  opts = jaxckpt.CheckpointOptions(
      enable_async=True,
      experimental_write_callbacks=[lambda path: print(f"  committed {path}")])
  zero_step = lambda: jnp.array(0, jnp.int32)  # noqa: E731
  zeros_like = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
  stats = {"blocked": [], "commit": [], "waited": 0}
  p0 = init_params(args.width)  # Compiles outside the timed regions.
  jax.block_until_ready(train_step(p0, zeros_like(p0), zero_step()))
  print(f"MLP {IN_DIM}-{args.width}-{args.width}-1, {args.steps} steps, async save every "
        f"{args.save_every}, preemption after step {preempt_at}; checkpoints in {ckpt_dir}")

  # Phase 1: train until the "preemption".
  t0 = time.perf_counter()
  params = init_params(args.width)
  ckpt = jaxckpt.Checkpoint(params=params, momentum=zeros_like(params), step=zero_step())
  params, momentum, step, loss = train(params, zeros_like(params), zero_step(), preempt_at,
                                       ckpt=ckpt, prefix=prefix, opts=opts,
                                       save_every=args.save_every, stats=stats)
  ckpt.sync()  # Keeps the demo deterministic: the in-flight save lands first.
  print(f"phase 1: preempted at step {int(step)} (loss {float(loss):.4f}); all state dropped")
  del ckpt, params, momentum, step, loss

  # Phase 2: what a restarted job does, from fresh zero-initialized state.
  t1 = time.perf_counter()
  latest = jaxckpt.latest_checkpoint(ckpt_dir)
  if latest is None:
    print(f"FAIL: no checkpoint in {ckpt_dir} (is --save-every > {preempt_at}?)")
    return 1
  params = init_params(args.width, zeros=True)
  ckpt = jaxckpt.Checkpoint(params=params, momentum=zeros_like(params), step=zero_step())
  ckpt.restore(latest).assert_consumed()
  restored_at = int(ckpt.step)
  print(f"phase 2: restored {latest} in {time.perf_counter() - t1:.2f} s: step "
        f"{restored_at}, {preempt_at - restored_at} steps to redo")
  params, momentum, step, loss = train(ckpt.params, ckpt.momentum, ckpt.step, args.steps,
                                       ckpt=ckpt, prefix=prefix, opts=opts,
                                       save_every=args.save_every, stats=stats)
  ckpt.sync()
  t2 = time.perf_counter()
  print(f"phase 2: finished at step {int(step)} (loss {float(loss):.4f})")

  # Reference: uninterrupted, no checkpoints.
  p0 = init_params(args.width)
  ref = jax.block_until_ready(train(p0, zeros_like(p0), zero_step(), args.steps))
  t3 = time.perf_counter()

  same = all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves((params, momentum, step)), jax.tree.leaves(ref[:3]), strict=True))
  blocked = [b * 1e3 for b in stats["blocked"]]
  print(f"\nidle time per save (from step outputs ready): p50 {statistics.median(blocked):.2f} "
        f"ms, max {max(blocked):.2f} ms over {len(blocked)} saves; commit p50 "
        f"{statistics.median(stats['commit']) * 1e3:.0f} ms in the background; "
        f"{stats['waited']}/{len(blocked)} saves waited for the previous one (one in flight)")
  total, ref_time = t2 - t0, t3 - t2
  print(f"time: preempted+resumed {total:.2f} s (phase 1 {t1 - t0:.2f} s, phase 2 "
        f"{t2 - t1:.2f} s); reference {ref_time:.2f} s; overhead {total - ref_time:+.2f} s "
        f"(saves, restore, redone steps)")
  print("PASS: resumed run is bit-identical to the uninterrupted run" if same else
        "FAIL: resumed run differs from the uninterrupted run")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
