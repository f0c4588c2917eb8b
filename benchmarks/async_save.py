"""How long an async save blocks the training loop: jaxckpt vs Orbax.

For a state of ``--size-mib`` MiB split over ``--leaves`` float32 ``jax.Array``
leaves, measures per save:

* blocked: time spent inside the ``save`` call, from the moment the arrays are
  ready (after ``jax.block_until_ready``), i.e. the time the accelerator would
  sit idle waiting for the host;
* commit: time from the ``save`` call until the checkpoint is complete
  (``path.future.result()`` for jaxckpt, ``wait_until_finished()`` for Orbax).

Modes:

* ``jaxckpt-async``: ``Checkpoint.save`` with ``CheckpointOptions(enable_async=True)``.
* ``orbax-async``: ``ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())``.
* ``jaxckpt-sync`` / ``orbax-sync``: the synchronous versions, for reference
  (blocked = commit).
* ``*-step-running``: the async modes again, but ``save`` is called right after
  dispatching a ~1 s jitted step (``--step-seconds``) that produces the state,
  without waiting for it. jaxckpt snapshots with an on-device copy that does not
  wait for the step; Orbax copies to the host inside ``save`` and so waits.

Note: jaxckpt's commit includes fsyncing the checkpoint (Orbax 0.12.8 does not
fsync), so its commit times include that extra durability work.

Modes are interleaved (rotated each repeat), each save goes to a fresh directory
under ``--dir`` that is deleted right after the measurement. One unmeasured
warm-up save per engine comes first (two for jaxckpt: see the warm-up loop).
Prints a table and writes JSON.

Usage:
  python benchmarks/async_save.py [--size-mib 512] [--leaves 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _results
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import jaxckpt

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "async_save.json"
ORBAX_ASYNC = "orbax-async"
RUNNING = "-step-running"
MODES = (
  "jaxckpt-async",
  ORBAX_ASYNC,
  "jaxckpt-async" + RUNNING,
  ORBAX_ASYNC + RUNNING,
  "jaxckpt-sync",
  "orbax-sync",
)


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--size-mib", type=float, default=512.0, help="total state size in MiB (default: 512)"
  )
  parser.add_argument(
    "--leaves",
    type=int,
    default=16,
    help="number of float32 leaves the state is split over (default: 16)",
  )
  parser.add_argument("--repeats", type=int, default=3, help="measurements per mode (default: 3)")
  parser.add_argument(
    "--dir", default=None, help="where to write checkpoints (default: a temp dir)"
  )
  parser.add_argument(
    "--json",
    default=str(DEFAULT_JSON),
    help=f"where to write the results (default: {DEFAULT_JSON})",
  )
  parser.add_argument(
    "--step-seconds",
    type=float,
    default=1.0,
    help="duration of the producing step in *-step-running modes",
  )
  args = parser.parse_args(argv)
  if args.size_mib <= 0 or args.leaves < 1 or args.repeats < 1 or args.step_seconds <= 0:
    parser.error("--size-mib, --leaves, --repeats and --step-seconds must be positive")
  return args


def make_state(size_mib: float, leaves: int) -> dict[str, jax.Array]:
  """Random float32 leaves totalling about ``size_mib`` MiB (random: no free compression)."""
  per_leaf = max(1, int(size_mib * 2**20) // 4 // leaves)
  keys = jax.random.split(jax.random.key(0), leaves)
  state = {
    f"leaf{i:03d}": jax.random.normal(k, (per_leaf,), jnp.float32) for i, k in enumerate(keys)
  }
  return jax.block_until_ready(state)


@jax.jit
def _step(state, x, iters):
  """A slow step: ``iters`` chained matmuls, then a tiny update of every leaf."""
  y = jax.lax.fori_loop(0, iters, lambda _, y: jnp.tanh(y @ x), x)
  delta = jnp.mean(y) * 1e-3
  return jax.tree.map(lambda s: s + delta, state)


def calibrate_step(state, seconds: float) -> tuple[jax.Array, int, float]:
  """Picks the matmul count making `_step` take about ``seconds``.

  Returns:
    The matmul operand, the iteration count and the measured step time in s.
  """
  x = jax.random.normal(jax.random.key(1), (512, 512), jnp.float32) / 32

  def timed(iters: int, runs: int = 2) -> float:  # Best of `runs`: the host may be busy.
    times = []
    for _ in range(runs):
      start = time.perf_counter()
      jax.block_until_ready(_step(state, x, iters))
      times.append(time.perf_counter() - start)
    return min(times)

  timed(1, runs=1)  # Compiles.
  lo, hi = 10, 200
  t_lo, t_hi = timed(lo), timed(hi)
  per_iter = max((t_hi - t_lo) / (hi - lo), 1e-6)
  fixed = min(max(t_lo - lo * per_iter, 0.0), 0.9 * seconds)
  iters = max(1, round((seconds - fixed) / per_iter))
  took = timed(iters)
  for _ in range(3):  # Refine the linear model's guess.
    if abs(took - seconds) < 0.1 * seconds:
      break
    iters = max(1, round(iters * (seconds - fixed) / max(took - fixed, 1e-3)))
    took = timed(iters)
  return x, iters, took


class Bench:
  """The engines and state shared by all measurements."""

  def __init__(self, state, x, iters, root: str):
    self.state, self.x, self.iters, self.root = state, x, iters, root
    self.ckpt = jaxckpt.Checkpoint(state=state)
    self.async_opts = jaxckpt.CheckpointOptions(enable_async=True)
    self.orbax_async = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
    self.orbax_sync = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

  def close(self) -> None:
    self.orbax_async.close()
    self.orbax_sync.close()

  def measure(self, mode: str) -> tuple[float, float]:
    """One save in a fresh directory; returns (blocked s, commit s)."""
    workdir = tempfile.mkdtemp(prefix=f"{mode}-", dir=self.root)
    try:
      return self._measure(mode, workdir)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)

  def _measure(self, mode: str, workdir: str) -> tuple[float, float]:
    jax.block_until_ready(self.state)
    # In *-step-running modes the step is dispatched and still running at save time.
    tree = _step(self.state, self.x, self.iters) if mode.endswith(RUNNING) else self.state
    engine = mode.removesuffix(RUNNING)
    if engine.startswith("jaxckpt"):
      self.ckpt.state = tree
      opts = self.async_opts if engine == "jaxckpt-async" else None
      start = time.perf_counter()
      path = self.ckpt.save(os.path.join(workdir, "ckpt"), options=opts)
      blocked = time.perf_counter() - start
      path.future.result()
      commit = time.perf_counter() - start
      self.ckpt.sync()
      self.ckpt.state = self.state
    else:
      checkpointer = self.orbax_async if engine == ORBAX_ASYNC else self.orbax_sync
      start = time.perf_counter()
      checkpointer.save(os.path.join(workdir, "ckpt"), args=ocp.args.PyTreeSave(tree))
      blocked = time.perf_counter() - start
      if engine == ORBAX_ASYNC:
        checkpointer.wait_until_finished()
      commit = time.perf_counter() - start
    del tree
    return blocked, commit


def _summarize(blocked: list[float], commit: list[float]) -> dict:
  return {
    "blocked_ms": [b * 1e3 for b in blocked],
    "commit_s": commit,
    "p50_blocked_ms": statistics.median(blocked) * 1e3,
    "min_blocked_ms": min(blocked) * 1e3,
    "max_blocked_ms": max(blocked) * 1e3,
    "p50_commit_s": statistics.median(commit),
  }


def _baseline(mode: str) -> str:
  """The Orbax async mode a mode's blocked time is compared with."""
  return ORBAX_ASYNC + RUNNING if mode.endswith(RUNNING) else ORBAX_ASYNC


def format_table(results: dict) -> str:
  """The results as a fixed-width text table."""
  header = (
    f"{'mode':<28} {'blocked p50 ms':>14} {'min ms':>9} {'max ms':>9} "
    f"{'commit p50 s':>12} {'vs orbax-async':>14}"
  )
  lines = [header, "-" * len(header)]
  for mode, r in results["modes"].items():
    lines.append(
      f"{mode:<28} {r['p50_blocked_ms']:>14.1f} {r['min_blocked_ms']:>9.1f} "
      f"{r['max_blocked_ms']:>9.1f} {r['p50_commit_s']:>12.3f} "
      f"{r['blocked_vs_orbax_async']:>13.3f}x"
    )
  lines.append(
    "vs orbax-async: p50 blocked / p50 blocked of orbax-async "
    "(of orbax-async-step-running for *-step-running modes)."
  )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints the table, writes JSON; returns the results."""
  args = _parse_args(argv)
  own_root = args.dir is None
  root = tempfile.mkdtemp(prefix="jaxckpt-bench-") if own_root else args.dir
  os.makedirs(root, exist_ok=True)
  state = make_state(args.size_mib, args.leaves)
  nbytes = sum(leaf.nbytes for leaf in state.values())
  print(
    f"state: {nbytes / 2**20:.1f} MiB in {len(state)} float32 leaves; "
    f"{args.repeats} repeat(s); checkpoints under {root}"
  )
  x, iters, step_s = calibrate_step(state, args.step_seconds)
  print(f"producing step: {iters} matmuls, {step_s:.2f} s")
  bench = Bench(state, x, iters, root)
  try:
    # Warm-up, unmeasured. jaxckpt twice: its second save compiles the copy into
    # the first save's staging buffers (~20 ms, once per process and state layout).
    for mode in ("jaxckpt-async", "jaxckpt-async", ORBAX_ASYNC, "orbax-sync"):
      bench.measure(mode)
    blocked = {m: [] for m in MODES}
    commit = {m: [] for m in MODES}
    for rep in range(args.repeats):
      k = rep % len(MODES)
      for mode in MODES[k:] + MODES[:k]:
        b, c = bench.measure(mode)
        blocked[mode].append(b)
        commit[mode].append(c)
  finally:
    bench.close()
    if own_root:
      shutil.rmtree(root, ignore_errors=True)

  modes = {m: _summarize(blocked[m], commit[m]) for m in MODES}
  for m, r in modes.items():
    r["blocked_vs_orbax_async"] = r["p50_blocked_ms"] / modes[_baseline(m)]["p50_blocked_ms"]
  results = {
    "config": {
      "size_mib": args.size_mib,
      "state_bytes": nbytes,
      "leaves": args.leaves,
      "repeats": args.repeats,
      "step_seconds": args.step_seconds,
      "step_iters": iters,
      "measured_step_s": step_s,
    },
    "env": _results.environment(),
    "modes": modes,
  }
  print(format_table(results))
  return _results.write(results, args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
