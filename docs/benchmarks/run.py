"""Runs the benchmarks' short configurations and stores their JSON for the Performance page.

Each benchmark in ``benchmarks/`` writes its own JSON (configuration, versions, hardware); this
script runs it with the arguments below, writes that JSON to ``docs/benchmarks/<name>.json`` and
adds the exact command, the UTC date and the host's hardware, so ``docs/gen_performance.py`` can
render every number with where it came from. Nothing on the Performance page is typed by hand.

Usage (from the repository root): python docs/benchmarks/run.py [NAME ...]
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "benchmarks"

# Short enough to run on a 2-core machine in a few minutes each; long enough to show the shape.
RUNS = {
  "async_save": ["--size-mib", "128", "--leaves", "16", "--repeats", "3", "--step-seconds", "0.5"],
  "throughput": ["--sizes", "64", "128", "--repeats", "2"],
  "incremental": ["--size-mib", "256", "--repeats", "3"],
  "multiprocess": ["--size-mib", "64", "--repeats", "2"],
  "tpu_idle": ["--steps", "60", "--repeats", "2"],
  "leaves": [
    "--total-mib",
    "256",
    "--leaves",
    "4",
    "64",
    "1024",
    "8192",
    "--sizes-mib",
    "64",
    "1024",
    "--size-leaves",
    "256",
    "--first-save-leaves",
    "8192",
    "--repeats",
    "5",
  ],
}


def _memory_gib() -> float | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    return None


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
  found = {}
  for package in ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "flax", "numpy"):
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def run(name: str) -> None:
  """Runs one benchmark and writes its annotated JSON under docs/benchmarks/."""
  json_path = OUT / f"{name}.json"
  argv = [f"benchmarks/{name}.py", *RUNS[name], "--json", str(json_path.relative_to(ROOT))]
  started = datetime.datetime.now(datetime.UTC)
  load_before = os.getloadavg()[0]  # Other work on the machine moves every number.
  subprocess.run([sys.executable, *argv], cwd=ROOT, check=True)
  result = json.loads(json_path.read_text())
  result["run"] = {
    "command": "python " + shlex.join(argv),
    "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
    "cpu": _cpu_model(),
    "cpus": os.cpu_count(),
    "memory_gib": _memory_gib(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "versions": _versions(),
    "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
  }
  json_path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")


def main(names: list[str]) -> None:
  for name in names or list(RUNS):
    run(name)


if __name__ == "__main__":
  main(sys.argv[1:])
