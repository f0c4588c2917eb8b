"""What every benchmark's JSON carries (hardware, versions, date, command) and how it is written.

Imported by the scripts in this directory as ``import _results`` (a script's own
directory is first on ``sys.path``; tests add it).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def _memory_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment(extra: tuple[str, ...] = ()) -> dict[str, Any]:
  """Hardware, library versions (and those of the ``extra`` distributions), date and
  command line of this run."""
  import jax

  names = ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy", "jaxckpt", *extra)
  env: dict[str, Any] = {name.removesuffix("-checkpoint"): _version(name) for name in names}
  env.update(
    python=platform.python_version(),
    platform=platform.platform(),
    cpus=os.cpu_count(),
    cpu_model=_cpu_model(),
    memory_bytes=_memory_bytes(),
    backend=jax.default_backend(),
    device=str(jax.devices()[0]),
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    command=" ".join([os.path.basename(sys.executable), *sys.argv]),
  )
  return env


def write(results: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
  """Writes ``results`` as JSON to ``path`` (parents created); returns them with
  ``json_path`` added (not written)."""
  json_path = Path(path)
  json_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
  print(f"wrote {json_path}")
  results["json_path"] = str(json_path)
  return results


def files_under(root: str) -> list[str]:
  return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


def evict(paths: list[str], method: str) -> str:
  """Drops ``paths`` (files or directories) from the page cache; returns the method used."""
  if method == "none":
    return "none"
  os.sync()
  if method in ("auto", "drop_caches"):
    try:
      with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
      return "drop_caches"
    except OSError:
      if method == "drop_caches":
        return "none"
  files = [f for p in paths for f in (files_under(p) if os.path.isdir(p) else [p])]
  try:
    for name in files:
      fd = os.open(name, os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)
  except (OSError, AttributeError):
    return "none"
  return "fadvise_dontneed"
