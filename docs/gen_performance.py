"""Renders ``docs/performance.md`` and its plot from the benchmark JSON in ``docs/benchmarks/``.

Run by the docs build (``docs/hooks.py``) and usable alone: ``python docs/gen_performance.py``.
Every number on the page comes from those files; ``docs/benchmarks/run.py`` regenerates them.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent
RESULTS = DOCS / "benchmarks"
PAGE = DOCS / "performance.md"
PLOT = DOCS / "assets" / "performance.png"

HEADER = """\
# Performance

Generated from the JSON files in `docs/benchmarks/` by `docs/gen_performance.py`; nothing here is
typed by hand. To refresh it, run `python docs/benchmarks/run.py` (all benchmarks, a few minutes
each) and rebuild the docs. Each section names the command, the date and the machine of its run.
The benchmarks themselves live in `benchmarks/`; each `--help` explains its modes.

Numbers from a shared 2-core CPU machine move between runs: compare modes within one table (they
run interleaved in the same process), not across tables or dates. On the CPU backend the
"accelerator" is the host CPU, so background checkpoint work competes with the training step for
the same cores; on a GPU/TPU host the step runs on the accelerator.
"""


def _load(name: str) -> dict | None:
  path = RESULTS / f"{name}.json"
  return json.loads(path.read_text()) if path.is_file() else None


def _table(headers: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _provenance(result: dict) -> str:
  run = result.get("run", {})
  versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
  memory = run.get("memory_gib")
  machine = f"{run.get('cpus', '?')} × {run.get('cpu', '?')}" + (
    f", {memory:.0f} GiB" if memory else ""
  )
  load = run.get("load_average")
  busy = f"; 1-minute load average {load[0]} before, {load[1]} after" if load else ""
  return (
    f"Command: `{run.get('command', '?')}`  \n"
    f"Run: {run.get('date', '?')} on {machine}{busy}; Python {run.get('python', '?')}; "
    f"{versions}."
  )


def _ms(x: float) -> str:
  return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def async_save(result: dict) -> str:
  cfg = result["config"]
  rows = [
    [
      f"`{mode}`",
      _ms(r["p50_blocked_ms"]),
      f"{_ms(r['min_blocked_ms'])}–{_ms(r['max_blocked_ms'])}",
      f"{r['p50_commit_s']:.2f}",
      f"{r['blocked_vs_orbax_async']:.3f}x",
    ]
    for mode, r in result["modes"].items()
  ]
  table = _table(["mode", "blocked p50 (ms)", "range (ms)", "commit p50 (s)", "vs Orbax"], rows)
  return (
    "## Time a save blocks the caller\n\n"
    f"{cfg['size_mib']:g} MiB in {cfg['leaves']} float32 arrays, {cfg['repeats']} saves per mode. "
    "*Blocked* is the time inside the `save` call once the arrays are ready; *commit* is the time "
    "until the checkpoint is complete (for jaxckpt: fsynced and renamed). `*-step-running` modes "
    f"call `save` right after dispatching a {cfg['measured_step_s']:.2f} s step that produces the "
    "state; *vs Orbax* divides by the matching Orbax async mode.\n\n"
    f"{table}\n\n{_provenance(result)}\n"
  )


def throughput(result: dict) -> str:
  def g(run: dict, key: str) -> str:
    return f"{run['gbps'][key]['median']:.2f}"

  rows = [
    [
      f"{r['size_mib']:g} MiB / {r['leaves']}",
      g(r, "jaxckpt_save"),
      g(r, "orbax_save_fsync"),
      g(r, "dd_write"),
      g(r, "jaxckpt_restore"),
      g(r, "orbax_restore"),
      g(r, "dd_read"),
    ]
    for r in result["runs"]
  ]
  headers = [
    "state / arrays",
    "jaxckpt save",
    "Orbax save + fsync",
    "dd write",
    "jaxckpt restore",
    "Orbax restore",
    "dd read",
  ]
  cfg = result["config"]
  return (
    "## Save and restore throughput\n\n"
    f"GB/s (10⁹ bytes of state per second), median of {cfg['repeats']}. Saves are durable "
    "(jaxckpt fsyncs every file and directory; *Orbax save + fsync* adds the same fsyncs after "
    "Orbax's save). *dd* writes the same bytes to one file and fsyncs it, or reads them back: the "
    f"disk's own limit in the same run. Restores read with a cold page cache "
    f"({result['page_cache']}).\n\n{_table(headers, rows)}\n\n{_provenance(result)}\n"
  )


def tpu_idle(result: dict) -> str:
  cfg = result["config"]

  def cell(stat: dict, scale: float, fmt: str) -> str:
    med, lo, hi = (format(stat[k] * scale, fmt) for k in ("median", "min", "max"))
    return med if lo == hi else f"{med} [{lo}, {hi}]"

  rows = []
  for mode, r in result["modes"].items():
    s = r["summary"]
    rows.append(
      [
        f"`{mode}`",
        cell(s["ms_per_step"], 1, ".0f"),
        cell(s["overhead"], 100, ".1f"),
        cell(s["blocked_p50_ms"], 1, ".1f"),
        cell(s["commit_p50_s"], 1, ".2f"),
        cell(s["peak_rss_delta_mib"], 1, ".0f"),
      ]
    )
  headers = ["mode", "ms/step", "overhead %", "blocked p50 (ms)", "commit p50 (s)", "peak RSS +MiB"]
  return (
    "## A training loop\n\n"
    f"A Flax NNX decoder language model with Adam: {cfg['state_mib']:.0f} MiB of state in "
    f"{cfg['state_arrays']} arrays, a save every {cfg['save_every']} of {cfg['steps']} steps, "
    f"{cfg['repeats']} repeat(s) (median [min, max]). *Overhead* is the loop's wall time against "
    "the `none` mode of the same repeat. `dd_async` is the least work any async checkpointer "
    "must do (copy the state, write its bytes to one file, fsync), not a checkpointer.\n\n"
    f"{_table(headers, rows)}\n\n{_provenance(result)}\n"
  )


def incremental(result: dict) -> str:
  rows = [
    [
      "full",
      f"{result['full_second_save_s']:.3f}",
      f"{result['full_bytes'] / 2**20:.1f}",
    ],
    [
      "`incremental=True`",
      f"{result['incremental_second_save_s']:.3f}",
      f"{result['incremental_bytes'] / 2**20:.1f}",
    ],
  ]
  return (
    "## Incremental saves\n\n"
    f"{result['size_mib']:g} MiB in {result['leaves']} arrays, "
    f"{result['frozen_fraction']:.0%} of the bytes unchanged between two saves; the second "
    f"save's time and bytes written (median). Incremental / full: bytes "
    f"{result['bytes_ratio']:.2f}x, time {result['time_ratio']:.2f}x.\n\n"
    f"{_table(['second save', 'seconds', 'MiB written'], rows)}\n\n{_provenance(result)}\n"
  )


def multiprocess(result: dict) -> str:
  def p50(xs: list[float]) -> float:
    return statistics.median(xs)

  rows = [
    [
      f"`{name}`",
      f"{p50(r['save_s']):.3f}",
      _ms(p50(r["blocked_ms"])),
      f"{p50(r['restore_s']):.3f}",
    ]
    for name, r in result["configs"].items()
  ]
  return (
    "## Several processes\n\n"
    f"{result['size_mib']} MiB in {result['leaves']} arrays sharded over all devices, p50 of "
    f"{result['repeats']}, slowest process (`processes x devices`; `io-task0`: "
    '`experimental_io_device="/task:0"`). The processes share one machine\'s cores and disk, so '
    "this measures coordination overhead, not the speed-up of separate hosts.\n\n"
    f"{_table(['configuration', 'sync save (s)', 'async blocked (ms)', 'restore (s)'], rows)}"
    f"\n\n{_provenance(result)}\n"
  )


def _leaf_ratios(result: dict, sweep: str, peers: list[str]) -> str:
  def cell(entry: dict, peer: str, op: str, key: str) -> str:
    value = entry["peers"].get(peer, {}).get(op, {}).get(key)
    return "–" if value is None else f"{value:.3f}"

  rows = []
  for entry in result[sweep]:
    st = entry["peers"].get("safetensors", {}).get("save", {}).get("durable_s")
    ours = entry["peers"]["jaxckpt"]["save"]["durable_s"]
    raw = entry["peers"].get("raw", {}).get("restore", {}).get("s")
    restore = entry["peers"]["jaxckpt"]["restore"]["s"]
    rows.append(
      [f"{entry['leaves']}", f"{entry['total_bytes'] / 2**20:.0f} MiB"]
      + [cell(entry, p, "save", "durable_s") for p in peers]
      + [f"{ours / st:.2f}×" if st else "–"]
      + [cell(entry, p, "restore", "s") for p in peers]
      + [f"{restore / raw:.2f}×" if raw else "–"]
    )
  headers = (
    ["leaves", "total"]
    + [f"{p} save (s)" for p in peers]
    + ["jaxckpt / safetensors"]
    + [f"{p} restore (s)" for p in peers]
    + ["jaxckpt / raw read"]
  )
  return _table(headers, rows)


def _leaf_details(result: dict, sweep: str) -> str:
  """Every peer's medians: blocked, durable, CPU-seconds, RSS and staging held."""
  rows = []
  for entry in result[sweep]:
    for peer, got in entry["peers"].items():
      save, restore = got["save"], got["restore"]
      held = save.get("staging_held_mib")
      rows.append(
        [
          f"{entry['leaves']}",
          f"{entry['total_bytes'] / 2**20:.0f} MiB",
          f"`{peer}`",
          f"{save['blocked_s']:.3f}",
          f"{save['durable_s']:.3f}",
          f"{save['cpu_s']:.2f}",
          f"{save['peak_rss_mib']:.0f} / {save['held_rss_mib']:.0f}",
          "–" if held is None else f"{held:.0f}",
          f"{restore['s']:.3f}",
          f"{restore['cpu_s']:.2f}",
        ]
      )
  headers = [
    "leaves",
    "total",
    "peer",
    "blocked (s)",
    "durable (s)",
    "save CPU (s)",
    "save RSS peak / held (MiB)",
    "staging kept (MiB)",
    "restore (s)",
    "restore CPU (s)",
  ]
  return _table(headers, rows)


def leaves(result: dict) -> str:
  peers = [p for p in ("jaxckpt", "safetensors", "raw", "orbax") if p in result["config"]["peers"]]
  first = [
    [
      f"`{f['peer']}`",
      f"{f['leaves']}",
      f"{f['first']['blocked_s']:.3f}",
      f"{f['second']['blocked_s']:.3f}",
      f"{f['first'].get('compiles', '–')}",
    ]
    for f in result.get("first_save", [])
  ]
  sizes = ""
  if result.get("size_sweep"):
    sizes = (
      f"The same at {result['config']['size_leaves']} leaves and growing sizes:\n\n"
      f"{_leaf_ratios(result, 'size_sweep', peers)}\n\n"
      f"{_leaf_details(result, 'size_sweep')}\n\n"
    )
  return (
    "## Many leaves\n\n"
    f"{result['config']['total_mib']:g} MiB of {result['config']['dtype']} split into more and "
    "more arrays, one process, all peers on the same state in the same run, their order rotated; "
    "saves are durable (fsynced) commits, restores read from a cold page cache and are checked "
    "bit for bit; medians. `safetensors` is a synchronous `save_file` plus fsync, `raw` one file "
    "written with `writev` and fsynced (and read back into fresh memory), `jaxckpt-free` jaxckpt "
    "with `keep_staging_bytes=0`, `jaxckpt-unpacked` jaxckpt with `pack_small_arrays=False` (by "
    "default, 512 or more arrays of up to 256 KiB are packed into one file).\n\n"
    f"{_leaf_ratios(result, 'leaf_sweep', peers)}\n\n"
    "Every peer, with CPU-seconds of the whole process, RSS over the RSS before (peak during, "
    "held after) and the staging buffers jaxckpt keeps for the next save:\n\n"
    f"{_leaf_details(result, 'leaf_sweep')}\n\n"
    f"{sizes}"
    "First and second save in a fresh process (seconds the caller is blocked; XLA compilations "
    "during each):\n\n"
    f"{_table(['peer', 'leaves', 'first save blocked (s)', 'second (s)', 'compiles'], first)}"
    f"\n\n{_provenance(result)}\n"
  )


SECTIONS: dict[str, Callable[[dict], str]] = {
  "async_save": async_save,
  "tpu_idle": tpu_idle,
  "throughput": throughput,
  "incremental": incremental,
  "multiprocess": multiprocess,
  "leaves": leaves,
}


def plot(results: dict[str, dict]) -> bool:
  """Blocked time per save mode and throughput per state; False if there is nothing to plot."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [name for name in ("async_save", "throughput") if name in results]
  if not panels:
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
  for ax, name in zip(axes[0], panels, strict=True):
    result = results[name]
    if name == "async_save":
      modes = list(result["modes"])
      values = [result["modes"][m]["p50_blocked_ms"] for m in modes]
      colors = ["tab:blue" if m.startswith("jaxckpt") else "tab:gray" for m in modes]
      ax.barh(modes, values, color=colors)
      ax.set_xscale("log")
      ax.set_xlabel("blocked in save, p50 (ms, log scale)")
      ax.invert_yaxis()
    else:
      runs = result["runs"]
      labels = [f"{r['size_mib']:g} MiB/{r['leaves']}" for r in runs]
      keys = {
        "jaxckpt_save": "jaxckpt save",
        "orbax_save_fsync": "Orbax save + fsync",
        "jaxckpt_restore": "jaxckpt restore",
        "orbax_restore": "Orbax restore",
      }
      width = 0.2
      for i, (key, label) in enumerate(keys.items()):
        xs = [j + (i - 1.5) * width for j in range(len(runs))]
        ax.bar(xs, [r["gbps"][key]["median"] for r in runs], width, label=label)
      ax.set_xticks(range(len(runs)), labels)
      ax.set_ylabel("GB/s")
      ax.legend(fontsize="small")
    ax.set_title({"async_save": "Time a save blocks", "throughput": "Throughput"}[name])
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  _write_if_changed(PLOT, buffer.getvalue())
  return True


def render() -> str:
  """The page's Markdown (and, as a side effect, the plot)."""
  results = {name: r for name in SECTIONS if (r := _load(name)) is not None}
  parts = [HEADER]
  if plot(results):
    parts.append("![Blocked time and throughput](assets/performance.png)\n")
  parts += [SECTIONS[name](result) for name, result in results.items()]
  if not results:
    parts.append("No benchmark results in `docs/benchmarks/` yet.\n")
  return "\n".join(parts)


def _write_if_changed(path: Path, data: bytes) -> None:
  # Unchanged files keep their mtime, so `mkdocs serve` does not rebuild in a loop.
  if not path.is_file() or path.read_bytes() != data:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def main() -> None:
  _write_if_changed(PAGE, render().encode())


if __name__ == "__main__":
  main()
