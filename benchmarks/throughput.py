"""Save and restore throughput: jaxckpt and Orbax against the machine's own limits.

For each state size (``--sizes``, MiB) and leaf layout (``few``: 8 leaves,
``many``: 256 leaves) of random float32 ``jax.Array`` leaves on the default
device, measured in the same run and interleaved (the order rotates each
repeat), every number in GB/s (1e9 bytes per second of state):

* jaxckpt save: synchronous ``Checkpoint.save`` (Orbax/TensorStore write,
  manifest, fsync of every file and directory, atomic rename, state file), so
  the checkpoint is durable when it returns.
* Orbax save: ``ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save`` with
  Orbax's defaults (OCDBT; chunks zstd-compressed, which jaxckpt turns off).
  TensorStore fsyncs the array data files as it writes them, but Orbax 0.12.8
  does not fsync its own metadata files or the directories (seen with strace),
  so "orbax save+fsync" adds the time to fsync every file and directory of the
  checkpoint afterwards (what jaxckpt does): the like-for-like comparison.
* dd write, the write limit: the same number of bytes from a host numpy buffer
  written to one file with ``os.write`` in 64 MiB chunks, then ``fsync``
  (``dd bs=64M conv=fdatasync``). jaxckpt/dd is the fraction of it achieved.
* restore: jaxckpt ``Checkpoint.restore`` into a tracked tree of matching
  arrays, Orbax ``Checkpointer.restore`` with ``PyTreeRestore`` and a target
  ``ArrayRestoreArgs`` (sharding, dtype, shape) per leaf, and the read limit
  "dd read": the dd file read back with ``readinto`` in 64 MiB chunks into a
  preallocated buffer. All end with ``jax.block_until_ready``. The first repeat
  checks the restored values bit for bit.
* memcpy: ``np.copyto`` of the same bytes into a preallocated, already touched
  buffer (warm; best of 3) and into freshly allocated ``np.empty`` memory (first
  touch: page faults included).

Page cache: before the restores the data are evicted from the page cache
(``--evict auto``: ``sync`` then ``echo 3 > /proc/sys/vm/drop_caches``, which
needs root; if that fails, ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each
checkpoint file). Which method worked is printed and recorded, and where
``fincore`` exists the bytes still resident afterwards are reported. With
``--evict none`` restores read from the page cache. Checkpoints go to a fresh
temporary directory per size, layout and repeat, deleted right after.

Usage:
  python benchmarks/throughput.py [--sizes 64 128 256 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _results
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxckpt
from jaxckpt._store import fsync_tree  # The same fsyncs a jaxckpt commit does.

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "throughput.json"
LAYOUTS = {"few": 8, "many": 256}
CHUNK = 64 * 2**20
MIB = 2**20
GB = 1e9
EVICT_METHODS = ("auto", "drop_caches", "fadvise", "none")

# -- state and limits ----------------------------------------------------------


def make_state(size_mib: float, leaves: int, seed: int = 0) -> dict[str, jax.Array]:
  """Random float32 leaves totalling ``size_mib`` MiB (rounded down to whole floats)."""
  per_leaf = max(1, int(size_mib * MIB) // 4 // leaves)
  keys = jax.random.split(jax.random.key(seed), leaves)
  state = {f"w{i:03d}": jax.random.normal(k, (per_leaf,), jnp.float32) for i, k in enumerate(keys)}
  return jax.block_until_ready(state)


def host_bytes(state: dict[str, jax.Array]) -> np.ndarray:
  """The state's bytes in one host buffer (what the dd and memcpy limits move)."""
  total = sum(x.nbytes for x in state.values())
  buf = np.empty(total, np.uint8)
  offset = 0
  for x in state.values():
    raw = np.asarray(x).reshape(-1).view(np.uint8)
    buf[offset : offset + raw.size] = raw
    offset += raw.size
  return buf


def dd_write(path: str, buf: np.ndarray) -> float:
  """Seconds to write ``buf`` with os.write in 64 MiB chunks, then fsync."""
  view = memoryview(buf)
  start = time.perf_counter()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    offset = 0
    while offset < len(view):
      offset += os.write(fd, view[offset : offset + CHUNK])
    os.fsync(fd)
  finally:
    os.close(fd)
  return time.perf_counter() - start


def dd_read(path: str, buf: np.ndarray) -> float:
  """Seconds to read ``path`` into ``buf`` (preallocated) in 64 MiB chunks."""
  view = memoryview(buf)
  start = time.perf_counter()
  with open(path, "rb", buffering=0) as f:
    offset = 0
    while offset < len(view):
      n = f.readinto(view[offset : offset + CHUNK])
      if not n:
        raise OSError(f"{path}: short read at {offset} of {len(view)} bytes")
      offset += n
  return time.perf_counter() - start


def memcpy_warm(src: np.ndarray, dst: np.ndarray, iters: int = 3) -> float:
  """Best seconds of ``np.copyto(dst, src)`` into an already touched ``dst``."""
  np.copyto(dst, src)  # Touch every page first.
  best = float("inf")
  for _ in range(iters):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return best


def memcpy_first_touch(src: np.ndarray) -> float:
  """Seconds to allocate with np.empty and copy into it (page faults included)."""
  start = time.perf_counter()
  dst = np.empty_like(src)
  np.copyto(dst, src)
  took = time.perf_counter() - start
  del dst
  return took


def resident_bytes(paths: list[str]) -> int | None:
  """Bytes of ``paths`` in the page cache per ``fincore`` (None if unavailable)."""
  files = [f for p in paths for f in (_results.files_under(p) if os.path.isdir(p) else [p])]
  if not files or shutil.which("fincore") is None:
    return None
  try:
    out = subprocess.run(
      ["fincore", "--bytes", "--raw", "--noheadings", "--output", "RES", *files],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    return sum(int(line) for line in out.split())
  except (OSError, ValueError, subprocess.CalledProcessError):
    return None


# -- one measurement -----------------------------------------------------------


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def measure(
  state: dict[str, jax.Array],
  host: np.ndarray,
  warm_dst: np.ndarray,
  rep: int,
  root: str,
  evict_method: str,
  verify: bool,
) -> dict:
  """One repeat for one state: saves, restores, limits. Returns seconds per operation."""
  workdir = tempfile.mkdtemp(prefix="tp-", dir=root)
  jx_prefix = os.path.join(workdir, "jaxckpt", "ckpt")
  ob_path = os.path.join(workdir, "orbax")
  dd_path = os.path.join(workdir, "dd.bin")
  ckpt = jaxckpt.Checkpoint(state=state)
  orbax = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  t: dict = {}
  try:

    def save_jaxckpt():
      start = time.perf_counter()
      t["jx_path"] = ckpt.save(jx_prefix)
      t["jaxckpt_save"] = time.perf_counter() - start

    def save_orbax():
      start = time.perf_counter()
      orbax.save(ob_path, args=ocp.args.PyTreeSave(state))
      t["orbax_save"] = time.perf_counter() - start
      fsync_tree(ob_path)
      t["orbax_save_fsync"] = time.perf_counter() - start

    def write_dd():
      t["dd_write"] = dd_write(dd_path, host)

    writers = [save_jaxckpt, save_orbax, write_dd]
    k = rep % len(writers)
    for fn in writers[k:] + writers[:k]:
      fn()

    targets = [os.path.dirname(jx_prefix), ob_path, dd_path]
    t["evict"] = _results.evict(targets, evict_method)
    resident = resident_bytes(targets)
    t["resident_after_evict_bytes"] = resident

    def restore_jaxckpt():
      ckpt.state = state
      start = time.perf_counter()
      ckpt.restore(t["jx_path"])
      jax.block_until_ready(ckpt.state)
      t["jaxckpt_restore"] = time.perf_counter() - start
      if verify:
        t["jaxckpt_verified"] = _same(ckpt.state, state)
      ckpt.state = state

    def restore_orbax():
      item = {
        k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for k, x in state.items()
      }
      restore_args = {
        k: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape)
        for k, x in state.items()
      }
      start = time.perf_counter()
      restored = orbax.restore(
        ob_path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
      )
      jax.block_until_ready(restored)
      t["orbax_restore"] = time.perf_counter() - start
      if verify:
        t["orbax_verified"] = _same(restored, state)

    def read_dd():
      t["dd_read"] = dd_read(dd_path, warm_dst)

    readers = [restore_jaxckpt, restore_orbax, read_dd]
    for fn in readers[k:] + readers[:k]:
      fn()
  finally:
    orbax.close()
    ckpt.sync()
    shutil.rmtree(workdir, ignore_errors=True)

  t["memcpy_warm"] = memcpy_warm(host, warm_dst)
  t["memcpy_first_touch"] = memcpy_first_touch(host)
  del t["jx_path"]
  return t


TIMED = (
  "jaxckpt_save",
  "orbax_save",
  "orbax_save_fsync",
  "dd_write",
  "jaxckpt_restore",
  "orbax_restore",
  "dd_read",
  "memcpy_warm",
  "memcpy_first_touch",
)


def summarize(nbytes: int, runs: list[dict]) -> dict:
  """GB/s per operation (median, min, max over repeats) and the ratios of medians."""
  gbps = {}
  for key in TIMED:
    rates = [nbytes / GB / r[key] for r in runs]
    gbps[key] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
  med = {k: v["median"] for k, v in gbps.items()}
  return {
    "gbps": gbps,
    "ratios": {
      "jaxckpt_save_vs_dd": med["jaxckpt_save"] / med["dd_write"],
      "jaxckpt_save_vs_orbax_save_fsync": med["jaxckpt_save"] / med["orbax_save_fsync"],
      "jaxckpt_restore_vs_orbax": med["jaxckpt_restore"] / med["orbax_restore"],
      "jaxckpt_restore_vs_dd_read": med["jaxckpt_restore"] / med["dd_read"],
    },
  }


def fit_costs(runs: list[dict]) -> dict:
  """Least-squares ``seconds = fixed + bytes / rate`` per layout and operation.

  Uses the median seconds of each size; needs two or more sizes per layout.
  Returns ``{layout: {op: {"fixed_ms": ..., "marginal_gbps": ...}}}``.
  """
  fits: dict = {}
  for layout in dict.fromkeys(r["layout"] for r in runs):
    rows = [r for r in runs if r["layout"] == layout]
    if len({r["bytes"] for r in rows}) < 2:
      continue
    x = np.array([r["bytes"] for r in rows], np.float64)
    fits[layout] = {}
    for op in TIMED:
      y = np.array([statistics.median(r["seconds"][op]) for r in rows])
      slope, intercept = np.polyfit(x, y, 1)
      fits[layout][op] = {
        "fixed_ms": float(intercept) * 1e3,
        "marginal_gbps": float(1 / slope / GB) if slope > 0 else None,
      }
  return fits


# -- reporting ------------------------------------------------------------------

COLUMNS = (  # (header, getter)
  ("MiB", lambda r: f"{r['size_mib']:g}"),
  ("layout", lambda r: f"{r['layout']}({r['leaves']})"),
  ("jx save", lambda r: f"{r['gbps']['jaxckpt_save']['median']:.3g}"),
  ("ob save", lambda r: f"{r['gbps']['orbax_save']['median']:.3g}"),
  ("ob save+fsync", lambda r: f"{r['gbps']['orbax_save_fsync']['median']:.3g}"),
  ("dd write", lambda r: f"{r['gbps']['dd_write']['median']:.3g}"),
  ("jx/dd", lambda r: f"{r['ratios']['jaxckpt_save_vs_dd']:.2f}"),
  ("jx restore", lambda r: f"{r['gbps']['jaxckpt_restore']['median']:.3g}"),
  ("ob restore", lambda r: f"{r['gbps']['orbax_restore']['median']:.3g}"),
  ("jx/ob", lambda r: f"{r['ratios']['jaxckpt_restore_vs_orbax']:.2f}"),
  ("dd read", lambda r: f"{r['gbps']['dd_read']['median']:.3g}"),
  ("jx/rd", lambda r: f"{r['ratios']['jaxckpt_restore_vs_dd_read']:.2f}"),
  ("memcpy warm", lambda r: f"{r['gbps']['memcpy_warm']['median']:.3g}"),
  ("1st-touch", lambda r: f"{r['gbps']['memcpy_first_touch']['median']:.3g}"),
)


def format_table(results: dict) -> str:
  """The results as a fixed-width text table (GB/s, medians over repeats)."""
  rows = [[get(r) for _, get in COLUMNS] for r in results["runs"]]
  headers = [h for h, _ in COLUMNS]
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

  def line(cells):
    return "  ".join(
      c.ljust(w) if i < 2 else c.rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )

  out = [line(headers), "-" * (sum(widths) + 2 * (len(widths) - 1))]
  out += [line(row) for row in rows]
  cfg = results["config"]
  out.append(
    f"GB/s (1e9 B/s of state), median of {cfg['repeats']} repeat(s). jx = jaxckpt "
    "(durable), ob = Orbax (zstd on; metadata/dirs not fsynced; save+fsync adds it)."
  )
  out.append(
    "jx/dd = jaxckpt save / dd write+fsync; jx/ob and jx/rd = jaxckpt restore / Orbax "
    "restore and / dd read; memcpy = np.copyto warm and into fresh np.empty."
  )
  out.append(f"restore page cache: {results['page_cache']}")
  if results.get("fits"):
    ops = (
      "jaxckpt_save",
      "orbax_save_fsync",
      "dd_write",
      "jaxckpt_restore",
      "orbax_restore",
      "dd_read",
    )
    out.append("")
    out.append("cost vs size, least squares over sizes: seconds = fixed ms + bytes / marginal GB/s")
    out.append(f"{'layout':<7}" + "".join(f"{op:>22}" for op in ops))
    for layout, fit in results["fits"].items():
      cells = []
      for op in ops:
        f = fit[op]
        rate = "n/a" if f["marginal_gbps"] is None else f"{f['marginal_gbps']:.2f}"
        cells.append(f"{f['fixed_ms']:.0f} ms + /{rate}".rjust(22))
      out.append(f"{layout:<7}" + "".join(cells))
  return "\n".join(out)


def _page_cache_note(runs: list[dict], requested: str) -> str:
  methods = sorted({m for r in runs for m in r["evict_methods"]})
  resident = [b for r in runs for b in r["resident_after_evict_bytes"] if b is not None]
  note = {
    "drop_caches": "evicted with sync + echo 3 > /proc/sys/vm/drop_caches (cold reads)",
    "fadvise_dontneed": "drop_caches unavailable; evicted the checkpoint files with "
    "posix_fadvise(POSIX_FADV_DONTNEED) (cold reads)",
    "none": "NOT evicted: restores read from the page cache (warm)",
  }
  text = "; ".join(note[m] for m in methods) + f" [--evict {requested}]"
  if resident:
    text += (
      f"; fincore after eviction: at most {max(resident) / MIB:.1f} MiB of the files still resident"
    )
  return text


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--sizes",
    type=float,
    nargs="+",
    default=[64, 128, 256, 512],
    help="state sizes in MiB (default: 64 128 256 512)",
  )
  p.add_argument(
    "--layouts",
    nargs="+",
    default=list(LAYOUTS),
    choices=list(LAYOUTS),
    help="leaf layouts: few (8 leaves), many (256 leaves) (default: both)",
  )
  p.add_argument("--repeats", type=int, default=3, help="repeats per size/layout (default: 3)")
  p.add_argument(
    "--evict",
    default="auto",
    choices=EVICT_METHODS,
    help="page-cache eviction before restores (default: auto)",
  )
  p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
  p.add_argument(
    "--json",
    default=str(DEFAULT_JSON),
    help=f"where to write the results (default: {DEFAULT_JSON})",
  )
  args = p.parse_args(argv)
  if args.repeats < 1 or any(s <= 0 for s in args.sizes):
    p.error("--repeats and --sizes must be positive")
  return args


def _warm_up(root: str) -> None:
  """One tiny untimed save and restore per engine: thread pools, TensorStore context."""
  state = make_state(0.0625, 2, seed=1)
  measure(
    state,
    host_bytes(state),
    np.empty(sum(x.nbytes for x in state.values()), np.uint8),
    0,
    root,
    "none",
    verify=False,
  )


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints the table, writes JSON; returns the results."""
  args = _parse_args(argv)
  own_root = args.dir is None
  root = tempfile.mkdtemp(prefix="jaxckpt-tp-") if own_root else args.dir
  os.makedirs(root, exist_ok=True)
  print(
    f"sizes {args.sizes} MiB x layouts {args.layouts}, {args.repeats} repeat(s); "
    f"writing under {root}; device {jax.devices()[0]}",
    flush=True,
  )
  runs = []
  try:
    _warm_up(root)
    for size in args.sizes:
      for layout in args.layouts:
        leaves = LAYOUTS[layout]
        state = make_state(size, leaves)
        nbytes = sum(x.nbytes for x in state.values())
        host = host_bytes(state)
        warm_dst = np.empty_like(host)
        reps = [
          measure(state, host, warm_dst, rep, root, args.evict, verify=rep == 0)
          for rep in range(args.repeats)
        ]
        run = {
          "size_mib": size,
          "layout": layout,
          "leaves": leaves,
          "bytes": nbytes,
          "seconds": {k: [r[k] for r in reps] for k in TIMED},
          "evict_methods": [r["evict"] for r in reps],
          "resident_after_evict_bytes": [r["resident_after_evict_bytes"] for r in reps],
          "verified": {"jaxckpt": reps[0]["jaxckpt_verified"], "orbax": reps[0]["orbax_verified"]},
          **summarize(nbytes, reps),
        }
        runs.append(run)
        g = run["gbps"]
        print(
          f"  {size:g} MiB {layout:<4}: jaxckpt save {g['jaxckpt_save']['median']:.2f} "
          f"restore {g['jaxckpt_restore']['median']:.2f} GB/s; orbax save "
          f"{g['orbax_save']['median']:.2f} restore {g['orbax_restore']['median']:.2f}; "
          f"dd {g['dd_write']['median']:.2f}/{g['dd_read']['median']:.2f}; "
          f"evict {','.join(sorted(set(run['evict_methods'])))}",
          flush=True,
        )
        if not all(run["verified"].values()):
          print(f"  WARNING: restored values differ from the saved ones: {run['verified']}")
        del state, host, warm_dst
  finally:
    if own_root:
      shutil.rmtree(root, ignore_errors=True)

  results = {
    "config": {
      "sizes_mib": args.sizes,
      "layouts": {k: LAYOUTS[k] for k in args.layouts},
      "repeats": args.repeats,
      "evict": args.evict,
      "chunk_bytes": CHUNK,
      "unit": "GB/s = 1e9 bytes of state per second",
    },
    "env": _results.environment(),
    "page_cache": _page_cache_note(runs, args.evict),
    "runs": runs,
    "fits": fit_costs(runs),
  }
  print(format_table(results))
  return _results.write(results, args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
