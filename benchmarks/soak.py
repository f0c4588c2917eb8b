"""Soak: many async saves through a CheckpointManager; callbacks, threads and RSS stay flat.

Usage: python benchmarks/soak.py --saves 1000 [--max-to-keep 3] [--mib 4] [--compression]
(``--compression`` sends every save through Orbax instead of the fast writer.)
Prints a line per 100 saves (threads, RSS) and a summary; exits 1 on a violation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import jax.numpy as jnp

import jaxckpt


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--saves", type=int, default=1000)
  parser.add_argument("--max-to-keep", type=int, default=3)
  parser.add_argument("--mib", type=float, default=4.0, help="state size")
  parser.add_argument("--dir", default=None)
  parser.add_argument("--compression", action="store_true", help="zstd: saves go through Orbax")
  args = parser.parse_args(argv)
  directory = args.dir or tempfile.mkdtemp(prefix="jaxckpt-soak-")
  try:
    return _soak(args, directory)
  finally:
    if args.dir is None:  # Our own temp dir: leave nothing behind.
      shutil.rmtree(directory, ignore_errors=True)


def _soak(args, directory: str) -> dict:
  n = int(args.mib * 2**20 / 4)
  ckpt = jaxckpt.Checkpoint(w=jnp.zeros(n), step=0)
  calls: list[str] = []
  opts = jaxckpt.CheckpointOptions(
    enable_async=True, compression=args.compression, experimental_write_callbacks=[calls.append]
  )
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=args.max_to_keep)
  samples = []
  start = time.perf_counter()
  for step in range(1, args.saves + 1):
    ckpt.w, ckpt.step = jnp.full((n,), float(step)), step
    manager.save(options=opts)
    if step % 100 == 0 or step == args.saves:
      manager.sync()
      threads = len([t for t in threading.enumerate() if t.name != "jaxckpt-save"])
      samples.append((step, threads, _rss_mib()))
      print(f"save {step:5d}: threads {threads}, RSS {samples[-1][2]:.0f} MiB", flush=True)
  manager.sync()
  elapsed = time.perf_counter() - start
  expected = [os.path.join(directory, f"ckpt-{i}") for i in range(1, args.saves + 1)]
  result = {
    "saves": args.saves,
    "seconds": elapsed,
    "ms_per_save": 1e3 * elapsed / args.saves,
    "callbacks_in_order_once_each": calls == expected,
    "threads": sorted({s[1] for s in samples}),
    "rss_first_mib": samples[0][2],
    "rss_last_mib": samples[-1][2],
    "kept": [os.path.basename(p) for p in manager.checkpoints],
  }
  print(result)
  ok = (
    result["callbacks_in_order_once_each"]
    and len(result["threads"]) == 1
    and result["rss_last_mib"] - result["rss_first_mib"] < 64
  )
  result["ok"] = ok
  return result


if __name__ == "__main__":
  sys.exit(0 if main()["ok"] else 1)
