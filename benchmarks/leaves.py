"""Per-leaf cost: jaxckpt beside Orbax, safetensors and a raw write+fsync floor.

A leaf-count sweep at fixed total bytes (``--leaves`` over ``--total-mib``) and
a size sweep at a fixed leaf count (``--sizes-mib`` at ``--size-leaves``), all
peers in one process on the same state, their order rotated per repeat:

* ``jaxckpt``: async ``Checkpoint.write``; blocked = the call, commit = its
  future resolving (jaxckpt commits durably: every file and directory fsynced).
  ``staging_held_mib``: staging buffers it keeps after the commit (default
  ``keep_staging_bytes``: up to an eighth of physical memory).
* ``jaxckpt-free``: the same with ``CheckpointOptions(keep_staging_bytes=0)``
  (staging buffers freed at every commit).
* ``jaxckpt-unpacked``: the same with ``CheckpointOptions(pack_small_arrays=False)``
  (every array its own OCDBT entry; by default, states of 512 or more arrays
  of up to 256 KiB keep them in one file).
* ``orbax``: ``ocp.StandardCheckpointer`` (async); commit =
  ``wait_until_finished``, durable = after fsyncing its files and directories
  as jaxckpt does (Orbax 0.12.8 fsyncs only TensorStore's data files).
* ``safetensors``: ``safetensors.numpy.save_file`` then fsync (synchronous).
* ``raw``: every leaf's bytes ``writev``'d into one file, then fsync.

Restores are cold (``sync; echo 3 > /proc/sys/vm/drop_caches``, else
``posix_fadvise(DONTNEED)`` per file, else warm: the JSON says which) and
checked bit for bit: jaxckpt's restore into jax.Arrays, Orbax's, safetensors'
``load_file`` (numpy) and a raw read into fresh memory. Per operation:
seconds, CPU-seconds of the process (all threads), peak RSS over the RSS
before it, and RSS held after it (after ``gc``). First saves are measured
separately, each in a fresh process (``--first-save-leaves``): blocked time and
XLA compilations of the first and second save.

Usage:
  python benchmarks/leaves.py                 # 4, 64, 1024, 8192 leaves over 256 MiB
  python benchmarks/leaves.py --quick         # CI smoke: 64 MiB, fewer points
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import _results
import jax
import numpy as np
import orbax.checkpoint as ocp

import jaxckpt
from jaxckpt._store import fsync_tree  # The fsyncs a jaxckpt commit does.

MIB = 2**20
PEERS = ("jaxckpt", "jaxckpt-free", "jaxckpt-unpacked", "orbax", "safetensors", "raw")
_IOV_MAX = 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


def make_state(total_bytes: int, leaves: int, seed: int = 0) -> tuple[dict, dict]:
  """(``{name: jax.Array}``, the same as numpy copies): float32 leaves of equal size."""
  per_leaf = max(1, total_bytes // 4 // leaves)
  rng = np.random.default_rng(seed)
  host = {f"layer{i:05d}": rng.standard_normal(per_leaf, np.float32) for i in range(leaves)}
  arrays = jax.device_put(list(host.values()))
  return jax.block_until_ready(dict(zip(host, arrays, strict=True))), host


def rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * _PAGE


def cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _trim() -> None:
  gc.collect()
  with contextlib.suppress(OSError, AttributeError):
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Peak(threading.Thread):
  """Samples RSS every few ms until stopped; ``peak`` is the largest seen."""

  def __init__(self, period_s: float = 0.005):
    super().__init__(daemon=True)
    self.period_s, self.peak = period_s, rss()
    self._stop_event = threading.Event()

  def run(self) -> None:
    while not self._stop_event.wait(self.period_s):
      self.peak = max(self.peak, rss())

  def stop(self) -> int:
    self._stop_event.set()
    self.join()
    return max(self.peak, rss())


def measured(op: Callable[[], dict[str, float]]) -> dict[str, float]:
  """Runs ``op`` (returns its own times); adds CPU-seconds, peak and held RSS (MiB)."""
  _trim()
  before, cpu0 = rss(), cpu_s()
  peak = _Peak()
  peak.start()
  try:
    times = op()
  finally:
    top = peak.stop()
  cpu = cpu_s() - cpu0
  _trim()
  return {
    **times,
    "cpu_s": cpu,
    "peak_rss_mib": (top - before) / MIB,
    "held_rss_mib": (rss() - before) / MIB,
  }


# -- savers: each returns blocked/commit/durable seconds --------------------------


def _synchronous(start: float) -> dict[str, float]:
  """A synchronous save's times: blocked for the whole durable commit."""
  took = time.perf_counter() - start
  return {"blocked_s": took, "commit_s": took, "durable_s": took}


class Peers:
  """The peers' save and restore operations on one state, in one directory."""

  def __init__(self, state: dict, host: dict, root: str):
    self.state, self.host, self.root = state, host, root
    self.ckpt = jaxckpt.Checkpoint(state=state)
    self.free = jaxckpt.Checkpoint(state=state)
    self.unpacked = jaxckpt.Checkpoint(state=state)
    self.orbax = ocp.StandardCheckpointer()
    self.nbytes = sum(a.nbytes for a in host.values())
    self.paths: dict[str, str] = {}
    self._n = 0

  def close(self) -> None:
    self.ckpt.sync()
    self.free.sync()
    self.unpacked.sync()
    self.orbax.close()

  def _fresh(self, peer: str) -> str:
    self._n += 1
    old = self.paths.get(peer)
    if old is not None:  # One checkpoint per peer on disk at a time.
      shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    path = os.path.join(self.root, f"{peer}-{self._n}")
    self.paths[peer] = path
    return path

  def save(self, peer: str) -> dict[str, float]:
    return measured(lambda: getattr(self, "_save_" + peer.replace("-", "_"))(self._fresh(peer)))

  def _jaxckpt(self, ckpt, path: str, options) -> dict[str, float]:
    start = time.perf_counter()
    saved = ckpt.write(path, options=options)
    blocked = time.perf_counter() - start
    saved.future.result()
    commit = time.perf_counter() - start
    held = ckpt._saver.staging.idle_bytes / MIB  # (A private attribute: no public one.)
    return {"blocked_s": blocked, "commit_s": commit, "durable_s": commit, "staging_held_mib": held}

  def _save_jaxckpt(self, path: str) -> dict[str, float]:
    return self._jaxckpt(self.ckpt, path, jaxckpt.CheckpointOptions(enable_async=True))

  def _save_jaxckpt_free(self, path: str) -> dict[str, float]:
    opts = jaxckpt.CheckpointOptions(enable_async=True, keep_staging_bytes=0)
    return self._jaxckpt(self.free, path, opts)

  def _save_jaxckpt_unpacked(self, path: str) -> dict[str, float]:
    opts = jaxckpt.CheckpointOptions(enable_async=True, pack_small_arrays=False)
    return self._jaxckpt(self.unpacked, path, opts)

  def _save_orbax(self, path: str) -> dict[str, float]:
    start = time.perf_counter()
    self.orbax.save(path, self.state)
    blocked = time.perf_counter() - start
    self.orbax.wait_until_finished()
    commit = time.perf_counter() - start
    fsync_tree(path)
    return {"blocked_s": blocked, "commit_s": commit, "durable_s": time.perf_counter() - start}

  def _save_safetensors(self, path: str) -> dict[str, float]:
    from safetensors.numpy import save_file

    start = time.perf_counter()
    save_file({k: np.asarray(v) for k, v in self.state.items()}, path)
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    return _synchronous(start)

  def _save_raw(self, path: str) -> dict[str, float]:
    start = time.perf_counter()
    views = [memoryview(np.asarray(v)).cast("B") for v in self.state.values()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      for i in range(0, len(views), _IOV_MAX):
        batch = views[i : i + _IOV_MAX]
        want = sum(len(v) for v in batch)
        if os.writev(fd, batch) != want:  # Short writes: finish one by one.
          os.lseek(fd, sum(len(v) for v in views[:i]), os.SEEK_SET)
          for v in batch:
            os.write(fd, v)
      os.fsync(fd)
    finally:
      os.close(fd)
    return _synchronous(start)

  # -- restores: each returns seconds and whether every byte matched ------------

  def restore(self, peer: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def op() -> dict[str, float]:
      fn = getattr(self, "_restore_" + peer.split("-")[0])  # (jaxckpt-*: jaxckpt's.)
      start = time.perf_counter()
      restored = fn(self.paths[peer])
      took = time.perf_counter() - start
      out["verified"] = self._same(restored)
      return {"s": took}

    result = measured(op)
    return {**result, **out}

  def _same(self, restored: dict[str, Any]) -> bool:
    return restored.keys() == self.host.keys() and all(
      np.array_equal(np.asarray(restored[k]).view(np.uint8), v.view(np.uint8))
      for k, v in self.host.items()
    )

  def _restore_jaxckpt(self, path: str) -> dict[str, Any]:
    ckpt = jaxckpt.Checkpoint(state=self.state)
    ckpt.read(path)
    return jax.block_until_ready(ckpt.state)

  def _restore_orbax(self, path: str) -> dict[str, Any]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
    return jax.block_until_ready(self.orbax.restore(path, abstract))

  def _restore_safetensors(self, path: str) -> dict[str, Any]:
    from safetensors.numpy import load_file

    return load_file(path)

  def _restore_raw(self, path: str) -> dict[str, Any]:
    buf = np.empty(self.nbytes, np.uint8)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
      offset = 0
      while offset < len(view):
        n = f.readinto(view[offset : offset + 64 * MIB])
        if not n:
          raise OSError(f"{path}: short read at {offset}")
        offset += n
    out, offset = {}, 0
    for k, v in self.host.items():
      out[k] = buf[offset : offset + v.nbytes].view(v.dtype)
      offset += v.nbytes
    return out


def evict(paths: list[str]) -> str:
  """Drops ``paths`` from the page cache; returns how (or "none": warm reads)."""
  return _results.evict(paths, "auto")


# -- one point of a sweep ---------------------------------------------------------


def _median(values: list[float]) -> float:
  return statistics.median(values)


def measure_point(
  total_bytes: int, leaves: int, peers: tuple[str, ...], repeats: int, root: str
) -> dict[str, Any]:
  """Saves and cold restores of every peer, ``repeats`` times, order rotated."""
  state, host = make_state(total_bytes, leaves)
  workdir = tempfile.mkdtemp(prefix=f"leaves-{leaves}-", dir=root)
  bench = Peers(state, host, workdir)
  runs: dict[str, dict[str, list]] = {p: {"save": [], "restore": []} for p in peers}
  evicted = set()
  try:
    for peer in peers:  # Warm-up: first saves (compiles) are measured elsewhere.
      bench.save(peer)
    for rep in range(repeats):
      order = peers[rep % len(peers) :] + peers[: rep % len(peers)]
      for peer in order:
        runs[peer]["save"].append(bench.save(peer))
      evicted.add(evict(list(bench.paths.values())))
      for peer in order:
        runs[peer]["restore"].append(bench.restore(peer))
  finally:
    bench.close()
    shutil.rmtree(workdir, ignore_errors=True)
  point = {
    "leaves": leaves,
    "leaf_bytes": total_bytes // leaves,
    "total_bytes": bench.nbytes,
    "evict": sorted(evicted),
    "peers": {p: _summary(r) for p, r in runs.items()},
  }
  point["ratios"] = _ratios(point["peers"])
  return point


def _summary(runs: dict[str, list[dict]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for op, rows in runs.items():
    keys = [k for k in rows[0] if k != "verified"]
    out[op] = {k: _median([r[k] for r in rows]) for k in keys}
    out[op]["runs"] = rows
    if op == "restore":
      out[op]["verified"] = all(r["verified"] for r in rows)
  return out


def _ratios(peers: dict[str, Any]) -> dict[str, float]:
  """Medians of jaxckpt over its peers' (the issue's targets)."""
  pairs = {
    "commit_vs_safetensors": ("save", "durable_s", "safetensors"),
    "commit_vs_raw": ("save", "durable_s", "raw"),
    "commit_vs_orbax": ("save", "durable_s", "orbax"),
    "blocked_vs_orbax": ("save", "blocked_s", "orbax"),
    "cpu_vs_raw": ("save", "cpu_s", "raw"),
    "cpu_vs_safetensors": ("save", "cpu_s", "safetensors"),
    "restore_vs_raw": ("restore", "s", "raw"),
    "restore_vs_safetensors": ("restore", "s", "safetensors"),
    "restore_vs_orbax": ("restore", "s", "orbax"),
  }
  if "jaxckpt" not in peers:
    return {}
  ours = peers["jaxckpt"]
  return {
    name: ours[op][key] / peers[other][op][key]
    for name, (op, key, other) in pairs.items()
    if other in peers and peers[other][op][key] > 0
  }


# -- first saves, each in a fresh process -------------------------------------------


def first_save_child(peer: str, leaves: int, total_bytes: int, root: str) -> dict[str, Any]:
  """First and second save of a fresh process: blocked, commit, XLA compilations."""
  compiles = [0]

  def listener(event: str, _duration: float, **_kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      compiles[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  state, host = make_state(total_bytes, leaves)
  bench = Peers(state, host, root)
  out: dict[str, Any] = {"peer": peer, "leaves": leaves, "total_bytes": bench.nbytes}
  try:
    for which in ("first", "second"):
      before = compiles[0]
      r = bench.save(peer)
      out[which] = {**r, "compiles": compiles[0] - before}
  finally:
    bench.close()
  return out


def first_save(peer: str, leaves: int, total_bytes: int, root: str) -> dict[str, Any]:
  with tempfile.TemporaryDirectory(dir=root) as workdir:
    command = [sys.executable, __file__, "--first-save-child", peer, str(leaves)]
    command += [str(total_bytes), workdir]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
  if done.returncode != 0:
    return {"peer": peer, "leaves": leaves, "error": done.stderr[-2000:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------


def format_table(results: dict[str, Any]) -> str:
  lines = []
  for sweep in ("leaf_sweep", "size_sweep"):
    points = results.get(sweep) or []
    if not points:
      continue
    lines.append(
      f"{sweep}: medians; seconds, cpu-s, MiB (peak and held RSS over the RSS before, staging"
      " buffers kept); restores cold"
    )
    header = f"{'leaves':>7}{'MiB':>6}  {'peer':<13}{'blocked':>9}{'durable':>9}{'cpu':>7}"
    lines.append(header + f"{'peak':>7}{'held':>7}{'staged':>7}{'restore':>9}{'cpu':>7}{'ok':>4}")
    for point in points:
      for peer, r in point["peers"].items():
        s, rs = r["save"], r["restore"]
        lines.append(
          f"{point['leaves']:>7}{point['total_bytes'] / MIB:>6.0f}  {peer:<13}"
          f"{s['blocked_s']:>9.3f}{s['durable_s']:>9.3f}{s['cpu_s']:>7.2f}"
          f"{s['peak_rss_mib']:>7.0f}{s['held_rss_mib']:>7.0f}{s.get('staging_held_mib', 0):>7.0f}"
          f"{rs['s']:>9.3f}{rs['cpu_s']:>7.2f}{'y' if rs['verified'] else 'N':>4}"
        )
      ratios = ", ".join(f"{k} {v:.2f}x" for k, v in point["ratios"].items())
      lines.append(f"{'':>15}{ratios}")
  for r in results.get("first_save") or []:
    if "error" in r:
      lines.append(f"first save {r['peer']} {r['leaves']} leaves: failed")
      continue
    f, s = r["first"], r["second"]
    lines.append(
      f"first save {r['peer']:<12}{r['leaves']:>6} leaves: blocked {f['blocked_s']:.3f} s "
      f"({f['compiles']} compiles), second {s['blocked_s']:.3f} s ({s['compiles']} compiles)"
    )
  return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--total-mib", type=float, default=256)
  parser.add_argument("--leaves", type=int, nargs="*", default=[4, 64, 1024, 8192])
  parser.add_argument("--sizes-mib", type=float, nargs="*", default=[64, 1024])
  parser.add_argument("--size-leaves", type=int, default=256)
  parser.add_argument("--first-save-leaves", type=int, nargs="*", default=[1024, 8192])
  parser.add_argument("--first-save-peers", nargs="*", default=["jaxckpt", "orbax"])
  parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--quick", action="store_true", help="CI smoke: 64 MiB, few points")
  parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
  parser.add_argument("--json", default=str(_results.RESULTS / "leaves.json"))
  if parser.parse_known_args(argv)[0].quick:  # Other defaults; explicit arguments still win.
    parser.set_defaults(
      total_mib=64, leaves=[4, 1024], sizes_mib=[16], size_leaves=64, first_save_leaves=[1024]
    )
    parser.set_defaults(repeats=1)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = _parse_args(argv)
  root = args.dir or tempfile.mkdtemp(prefix="leaves-")
  os.makedirs(root, exist_ok=True)
  peers = tuple(args.peers)
  try:
    total = int(args.total_mib * MIB)
    leaf_sweep = [measure_point(total, n, peers, args.repeats, root) for n in args.leaves]
    size_sweep = [
      measure_point(int(mib * MIB), args.size_leaves, peers, args.repeats, root)
      for mib in args.sizes_mib
    ]
    firsts = [
      first_save(peer, n, total, root)
      for n in args.first_save_leaves
      for peer in args.first_save_peers
    ]
  finally:
    if args.dir is None:
      shutil.rmtree(root, ignore_errors=True)
  results = {
    "config": {
      "total_mib": args.total_mib,
      "leaves": args.leaves,
      "sizes_mib": args.sizes_mib,
      "size_leaves": args.size_leaves,
      "first_save_leaves": args.first_save_leaves,
      "peers": list(peers),
      "repeats": args.repeats,
      "quick": args.quick,
      "dtype": "float32",
    },
    "env": _results.environment(("safetensors", "psutil")),
    "leaf_sweep": leaf_sweep,
    "size_sweep": size_sweep,
    "first_save": firsts,
  }
  print(format_table(results))
  return _results.write(results, args.json)


if __name__ == "__main__":
  if len(sys.argv) == 6 and sys.argv[1] == "--first-save-child":
    _, _, peer, leaves, nbytes, workdir = sys.argv
    print(json.dumps(first_save_child(peer, int(leaves), int(nbytes), workdir)))
  else:
    main(sys.argv[1:])
