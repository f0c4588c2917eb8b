"""Incremental checkpoints on a fine-tuning-like state: 90% of the bytes frozen.

Saves the state once in full, changes only the trainable 10% and saves again,
with and without ``incremental=True`` (same run, interleaved, repeated). Reports
bytes written and time of the second save relative to a full save.

Usage: python benchmarks/incremental.py [--size-mib 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _results
import jax

import jaxckpt


def _state_bytes(path: str) -> int:
  return sum(f.stat().st_size for f in Path(path, "state").rglob("*") if f.is_file())


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size-mib", type=float, default=256)
  parser.add_argument("--leaves", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default=None)
  parser.add_argument("--json", default=str(_results.RESULTS / "incremental.json"))
  args = parser.parse_args(argv)
  n = int(args.size_mib * 2**20 / 4 / args.leaves)
  frozen_count = int(round(args.leaves * 0.9))
  leaves = [jax.random.normal(jax.random.key(i), (n,)) for i in range(args.leaves)]
  jax.block_until_ready(leaves)
  root = args.dir or tempfile.mkdtemp(prefix="jaxckpt-incr-")
  rows = {"full": [], "incremental": []}
  for rep in range(args.repeats):
    for mode in ("full", "incremental") if rep % 2 == 0 else ("incremental", "full"):
      d = os.path.join(root, f"{mode}-{rep}")
      opts = jaxckpt.CheckpointOptions(incremental=(mode == "incremental"))
      ckpt = jaxckpt.Checkpoint(frozen=leaves[:frozen_count], trainable=leaves[frozen_count:])
      ckpt.save(f"{d}/c", options=opts)  # First save: everything.
      ckpt.trainable = [x + 1.0 for x in leaves[frozen_count:]]  # A fine-tuning step.
      jax.block_until_ready(ckpt.trainable)
      start = time.perf_counter()
      second = ckpt.save(f"{d}/c", options=opts)
      rows[mode].append({"seconds": time.perf_counter() - start, "bytes": _state_bytes(second)})
      shutil.rmtree(d)
  full_s = statistics.median(r["seconds"] for r in rows["full"])
  full_b = statistics.median(r["bytes"] for r in rows["full"])
  inc_s = statistics.median(r["seconds"] for r in rows["incremental"])
  inc_b = statistics.median(r["bytes"] for r in rows["incremental"])
  result = {
    "size_mib": args.size_mib,
    "leaves": args.leaves,
    "frozen_fraction": 0.9,
    "full_second_save_s": full_s,
    "incremental_second_save_s": inc_s,
    "full_bytes": full_b,
    "incremental_bytes": inc_b,
    "bytes_ratio": inc_b / full_b,
    "time_ratio": inc_s / full_s,
    "runs": rows,
  }
  print(
    f"{args.size_mib:.0f} MiB in {args.leaves} leaves, 90% frozen; sync saves, durable; "
    f"median of {args.repeats}"
  )
  print(f"{'second save':<14}{'seconds':>10}{'MiB written':>14}")
  print(f"{'full':<14}{full_s:>10.3f}{full_b / 2**20:>14.1f}")
  print(f"{'incremental':<14}{inc_s:>10.3f}{inc_b / 2**20:>14.1f}")
  print(f"incremental / full: bytes {result['bytes_ratio']:.3f}x, time {result['time_ratio']:.3f}x")
  shutil.rmtree(root, ignore_errors=True) if args.dir is None else None
  result["env"] = _results.environment()
  return _results.write(result, args.json)


if __name__ == "__main__":
  main()
