"""Save and restore time with 2 JAX processes vs 1, on the same global state.

The state (``--size-mib`` MiB of float32 in ``--leaves`` arrays) is sharded
along its first axis over all devices. Configurations, each run as fresh JAX
processes on 127.0.0.1 (gloo) through the test suite's launcher:

* ``1x4``: 1 process with 4 CPU devices;
* ``2x2``: 2 processes with 2 devices each (each writes its half);
* ``2x2-io-task0``: 2 processes, ``experimental_io_device="/task:0"`` (process 0
  gathers everything and does all the I/O).

Per configuration and repeat: a sync save (until committed and fsynced), the
time an async save blocks the caller, and a restore onto the same sharding.
Prints p50 over ``--repeats`` and writes JSON. The processes share this
machine's 2 cores and one disk, so "2 processes" here measures coordination
overhead, not the speed-up of two real hosts with their own disks.

Usage:
  python benchmarks/multiprocess.py [--size-mib 256] [--leaves 8] [--repeats 3]
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "multiprocess.json"
CONFIGS = {"1x4": (1, 4, None), "2x2": (2, 2, None), "2x2-io-task0": (2, 2, "/task:0")}


def run_in_process(
  directory: str, size_mib: int, leaves: int, repeats: int, io_device: str | None
) -> dict:
  """Runs inside each launched process (every process calls the same saves)."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxckpt

  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  sharding = NamedSharding(mesh, P("x"))
  rows = 1024
  cols = max(1, size_mib * 2**20 // 4 // leaves // rows)
  state = {
    f"w{i}": jax.jit(
      lambda i=i: jax.random.normal(jax.random.key(i), (rows, cols)), out_shardings=sharding
    )()
    for i in range(leaves)
  }
  jax.block_until_ready(state)
  ckpt = jaxckpt.Checkpoint(state=state)
  sync = jaxckpt.CheckpointOptions(experimental_io_device=io_device, timeout_s=600)
  async_ = jaxckpt.CheckpointOptions(
    experimental_io_device=io_device, enable_async=True, timeout_s=600
  )
  out = {"save_s": [], "blocked_ms": [], "restore_s": []}
  ckpt.write(os.path.join(directory, "warmup"), options=sync)
  for r in range(repeats):
    start = time.perf_counter()
    ckpt.write(os.path.join(directory, f"sync-{r}"), options=sync)
    out["save_s"].append(time.perf_counter() - start)
    start = time.perf_counter()
    path = ckpt.write(os.path.join(directory, f"async-{r}"), options=async_)
    out["blocked_ms"].append(1e3 * (time.perf_counter() - start))
    path.future.result()
    start = time.perf_counter()
    ckpt.read(os.path.join(directory, f"sync-{r}"), options=sync)
    jax.block_until_ready(ckpt.state)
    out["restore_s"].append(time.perf_counter() - start)
  out["bytes"] = sum(int(np.prod(v.shape)) * 4 for v in state.values())
  return out


def _p50(values):
  return statistics.median(values)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size-mib", type=int, default=256)
  parser.add_argument("--leaves", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir).")
  parser.add_argument("--json", default=str(DEFAULT_JSON))
  args = parser.parse_args(argv)
  sys.path.insert(0, str(ROOT / "tests"))
  import distributed  # The test suite's N-process launcher.

  results = {
    "size_mib": args.size_mib,
    "leaves": args.leaves,
    "repeats": args.repeats,
    "configs": {},
  }
  for name in args.configs.split(","):
    processes, devices, io_device = CONFIGS[name]
    scratch = tempfile.mkdtemp(prefix=f"jaxckpt-mp-{name}-", dir=args.dir)
    try:
      per_process = distributed.launch(
        "benchmarks.multiprocess",
        "run_in_process",
        processes,
        devices=devices,
        timeout=1800,
        kwargs={
          "directory": scratch,
          "size_mib": args.size_mib,
          "leaves": args.leaves,
          "repeats": args.repeats,
          "io_device": io_device,
        },
      )
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    # A save or restore is done when the slowest process is done.
    slowest = {
      k: [max(p[k][i] for p in per_process) for i in range(args.repeats)]
      for k in ("save_s", "blocked_ms", "restore_s")
    }
    results["configs"][name] = {**slowest, "bytes": per_process[0]["bytes"]}
  print(table(results))
  import _results  # Here: the launched processes import this module as benchmarks.multiprocess.

  results["env"] = _results.environment()
  return _results.write(results, args.json)


def table(results: dict) -> str:
  base = results["configs"].get("1x4")
  lines = [
    f"{results['size_mib']} MiB in {results['leaves']} arrays, p50 of "
    f"{results['repeats']} (slowest process)",
    f"{'processes x devices':<22}{'sync save s':>12}{'vs 1x4':>8}{'async blocked ms':>18}"
    f"{'restore s':>11}{'vs 1x4':>8}",
  ]
  for name, r in results["configs"].items():
    save, restore = _p50(r["save_s"]), _p50(r["restore_s"])
    ratio_save = f"{save / _p50(base['save_s']):.2f}x" if base else "-"
    ratio_restore = f"{restore / _p50(base['restore_s']):.2f}x" if base else "-"
    lines.append(
      f"{name:<22}{save:>12.3f}{ratio_save:>8}{_p50(r['blocked_ms']):>18.1f}"
      f"{restore:>11.3f}{ratio_restore:>8}"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  main()
