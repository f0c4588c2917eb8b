"""Local tier vs persistent tier: save and restore time of the same state, and steps lost.

The state (``--size-mib`` MiB of float32 in ``--leaves`` arrays) is sharded
along its first axis over all devices. Configurations, each run as fresh JAX
processes on 127.0.0.1 (gloo) through the test suite's launcher: ``1x4`` (1
process, 4 CPU devices) and ``2x2`` (2 processes, 2 devices each; every local
save also swaps replicas with the peer by ``ppermute``).

Per configuration and repeat (the slowest process counts):

* local save: time ``save()`` blocks (split into the snapshot, i.e. copying
  this process's shards into one host buffer, and the replica exchange) and
  time to commit (files in ``--local-dir``, default ``/dev/shm``);
* persistent save: an async ``Checkpoint.write`` to ``--dir`` (default: a temp
  dir on disk): blocked and commit time;
* local restore (agreement, read, device put), and for 2 processes the same
  with process 1's directory moved away, so its shards come from its peer;
* persistent restore (``Checkpoint.read``).

Steps lost per failure are simulated, not measured: a failure during step f
(uniform over ``--horizon`` steps) resumes from the newest step before f that
some tier holds, with persistent saves every ``P`` steps and local saves every
``L``. One lost process is recovered by its replica; losing a process and the
one holding its replica falls back to the persistent tier.

Usage:
  python benchmarks/tiers.py [--size-mib 64] [--leaves 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "tiers.json"
CONFIGS = {"1x4": (1, 4), "2x2": (2, 2)}


def _state(size_mib: int, leaves: int):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("x",)), P("x"))
  rows = 1024
  cols = max(1, size_mib * 2**20 // 4 // leaves // rows)
  state = {
    f"w{i}": jax.jit(
      lambda i=i: jax.random.normal(jax.random.key(i), (rows, cols)), out_shardings=sharding
    )()
    for i in range(leaves)
  }
  return jax.block_until_ready(state)


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run_in_process(directory: str, local: str, size_mib: int, leaves: int, repeats: int) -> dict:
  """Runs inside each launched process (every process calls the same saves)."""
  import jax

  import jaxckpt
  from jaxckpt._tiers import LocalTier

  state = _state(size_mib, leaves)
  ckpt = jaxckpt.Checkpoint(state=state)
  tier = LocalTier(local, interval=1, max_to_keep=2)
  async_ = jaxckpt.CheckpointOptions(enable_async=True, timeout_s=600)
  keys = ("local_blocked_ms", "local_commit_s", "persistent_blocked_ms", "persistent_commit_s")
  keys += ("local_snapshot_ms", "local_exchange_ms")
  keys += ("local_restore_s", "local_restore_via_peer_s", "persistent_restore_s")
  out: dict = {k: [] for k in keys}
  tier.save(ckpt, 0, 600)  # Warm-up: compiles the exchange.
  tier.wait()
  for r in range(1, repeats + 1):
    start = time.perf_counter()
    tier.save(ckpt, r, 600)
    out["local_blocked_ms"].append(1e3 * (time.perf_counter() - start))
    out["local_snapshot_ms"].append(1e3 * tier.last_save_s["snapshot"])
    out["local_exchange_ms"].append(1e3 * tier.last_save_s["exchange"])
    tier.wait()
    out["local_commit_s"].append(time.perf_counter() - start)
    start = time.perf_counter()
    path = ckpt.write(os.path.join(directory, f"p-{r}"), options=async_)
    out["persistent_blocked_ms"].append(1e3 * (time.perf_counter() - start))
    path.future.result()
    out["persistent_commit_s"].append(time.perf_counter() - start)

    def local_restore(r=r):
      if tier.restore(ckpt, 600, None) != r:
        raise RuntimeError("the local tier did not restore the newest step")
      jax.block_until_ready(ckpt.state)

    out["local_restore_s"].append(_timed(local_restore))
    if jax.process_count() > 1:
      aside = os.path.join(local, "aside")
      if jax.process_index() == 1:  # A host that came back empty.
        os.rename(tier.path(r), aside)
      out["local_restore_via_peer_s"].append(_timed(local_restore))
      tier.wait()  # The received shards are written back; the moved copy is not needed.
      shutil.rmtree(aside, ignore_errors=True)

    def persistent_restore(path=path):
      ckpt.read(str(path), options=jaxckpt.CheckpointOptions(timeout_s=600))
      jax.block_until_ready(ckpt.state)

    out["persistent_restore_s"].append(_timed(persistent_restore))
  tier.close()
  out["bytes"] = sum(v.nbytes for v in state.values())
  return out


def steps_lost(persistent_every: int, local_every: int | None, horizon: int) -> dict:
  """Mean and max steps redone per failure (failure during step f, uniform)."""

  def resumed(f: int, every: int | None) -> int:
    return 0 if every is None else (f - 1) // every * every

  lost = []
  for f in range(1, horizon + 1):
    best = max(resumed(f, persistent_every), resumed(f, local_every))
    lost.append(f - 1 - best)
  return {"mean": statistics.fmean(lost), "max": max(lost)}


def simulate(horizon: int) -> list[dict]:
  rows = []
  for persistent_every in (20, 100):
    for local_every, failure in [
      (None, "any"),
      (1, "one process"),
      (5, "one process"),
      (1, "a process and its replica's holder"),
    ]:
      effective = None if failure.startswith("a process and") else local_every
      rows.append(
        {
          "persistent_every": persistent_every,
          "local_every": local_every,
          "failure": failure,
          **steps_lost(persistent_every, effective, horizon),
        }
      )
  return rows


def _env() -> dict:
  import jax
  import orbax.checkpoint as ocp

  import jaxckpt

  return {
    "jax": jax.__version__,
    "orbax": ocp.__version__,
    "jaxckpt": jaxckpt.__version__,
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpus": os.cpu_count(),
    "device": "cpu",
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size-mib", type=int, default=64)
  parser.add_argument("--leaves", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--dir", default=None, help="Persistent tier scratch (default: temp dir).")
  shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
  parser.add_argument("--local-dir", default=shm, help="Local tier scratch (default /dev/shm).")
  parser.add_argument("--horizon", type=int, default=1000)
  parser.add_argument("--json", default=str(DEFAULT_JSON))
  args = parser.parse_args(argv)
  sys.path.insert(0, str(ROOT / "tests"))
  import distributed  # The test suite's N-process launcher.

  results: dict = {
    "command": " ".join(["python", "benchmarks/tiers.py", *(argv or sys.argv[1:])]),
    "env": _env(),
    "size_mib": args.size_mib,
    "leaves": args.leaves,
    "repeats": args.repeats,
    "configs": {},
    "steps_lost": simulate(args.horizon),
  }
  for name in args.configs.split(","):
    processes, devices = CONFIGS[name]
    scratch = tempfile.mkdtemp(prefix=f"jaxckpt-tiers-{name}-", dir=args.dir)
    local = tempfile.mkdtemp(prefix=f"jaxckpt-tiers-{name}-", dir=args.local_dir)
    try:
      per_process = distributed.launch(
        "benchmarks.tiers",
        "run_in_process",
        processes,
        devices=devices,
        timeout=1800,
        kwargs={
          "directory": scratch,
          "local": local,
          "size_mib": args.size_mib,
          "leaves": args.leaves,
          "repeats": args.repeats,
        },
      )
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
      shutil.rmtree(local, ignore_errors=True)
    keys = [k for k, v in per_process[0].items() if isinstance(v, list)]
    slowest = {k: [max(v) for v in zip(*(p[k] for p in per_process), strict=True)] for k in keys}
    results["configs"][name] = {
      **slowest,
      "bytes": per_process[0]["bytes"],
      "local_dir": args.local_dir or tempfile.gettempdir(),
    }
  print(table(results))
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(results, f, indent=1)
  return results


def _p50(values) -> float:
  return statistics.median(values) if values else float("nan")


def table(results: dict) -> str:
  lines = [
    f"{results['size_mib']} MiB in {results['leaves']} arrays, p50 of {results['repeats']}"
    " (slowest process); local tier vs persistent tier",
    f"{'config':<8}{'tier':<12}{'save blocked ms':>16}{'save commit s':>15}{'restore s':>11}"
    f"{'restore via peer s':>20}",
  ]
  for name, r in results["configs"].items():
    for tier in ("local", "persistent"):
      peer = _p50(r.get(f"{tier}_restore_via_peer_s", []))
      lines.append(
        f"{name:<8}{tier:<12}{_p50(r[f'{tier}_blocked_ms']):>16.1f}"
        f"{_p50(r[f'{tier}_commit_s']):>15.3f}{_p50(r[f'{tier}_restore_s']):>11.3f}"
        f"{'-' if peer != peer else f'{peer:.3f}':>20}"
      )
    ratio = _p50(r["persistent_restore_s"]) / _p50(r["local_restore_s"])
    lines.append(
      f"{name:<8}local save blocked: snapshot {_p50(r['local_snapshot_ms']):.1f} ms, replica "
      f"exchange {_p50(r['local_exchange_ms']):.1f} ms; restore time persistent / local: "
      f"{ratio:.2f}x"
    )
  lines.append(
    f"{'persistent every':<18}{'local every':<13}{'failure':<36}{'mean lost':>10}{'max':>6}"
  )
  for row in results["steps_lost"]:
    local = "-" if row["local_every"] is None else str(row["local_every"])
    lines.append(
      f"{row['persistent_every']:<18}{local:<13}{row['failure']:<36}{row['mean']:>10.1f}"
      f"{row['max']:>6}"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  main()
