"""The ``jaxckpt`` command: ``ls``, ``inspect`` and ``verify`` checkpoints.

Built on argparse (subcommands, help, errors) and rich (tables, progress bars).
Every command takes ``--json`` for machine-readable output. Paths may be local
or key-value-store URLs (``memory://``, ``s3://``, ``gs://``; see _kvstore.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from typing import Any

import numpy as np

from jaxckpt import _kvstore
from jaxckpt._durable import LEFTOVER_MARKERS
from jaxckpt._errors import JaxckptError
from jaxckpt._manifest import is_committed
from jaxckpt._manifest import read_manifest
from jaxckpt._reader import load_checkpoint
from jaxckpt._state_file import latest_checkpoint
from jaxckpt._state_file import read_state


def _size(path: str) -> int | None:
  """Bytes on disk under ``path``; None (unknown) for URLs: TensorStore lists keys only."""
  if _kvstore.is_url(path):
    return None
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _join(directory: str, name: str) -> str:
  return _kvstore.join(directory, name) if _kvstore.is_url(directory) else os.path.join(
      directory, name)


def _basename(path: str) -> str:
  return _kvstore.basename(path) if _kvstore.is_url(path) else os.path.basename(path)


def _names_in(directory: str) -> list[str]:
  return sorted(_kvstore.children(directory)) if _kvstore.is_url(directory) else os.listdir(
      directory)


def _same_path(a: str, b: str) -> bool:
  if _kvstore.is_url(a) or _kvstore.is_url(b):
    return a.rstrip("/") == b.rstrip("/")
  return os.path.abspath(a) == os.path.abspath(b)


def _number(name: str) -> int | None:
  m = re.search(r"-(\d+)$", name)
  return int(m.group(1)) if m else None


def _checkpoints_in(directory: str) -> list[str]:
  names = [n for n in _names_in(directory)
           if not n.startswith(".") and is_committed(_join(directory, n))]
  names.sort(key=lambda n: (re.sub(r"-\d+$", "", n), _number(n) or -1, n))
  return [_join(directory, n) for n in names]


def _incomplete_in(directory: str) -> list[str]:
  """Leftovers of interrupted saves: hidden staging directories, or (URLs) names
  holding ``data-*`` prefixes but no manifest."""
  if not _kvstore.is_url(directory):
    return sorted(n for n in os.listdir(directory)  # (Not the lock files of saves.)
                  if n.startswith(".") and any(m in n for m in LEFTOVER_MARKERS)
                  and not n.endswith(".lock"))
  return sorted(
      n for n in _kvstore.children(directory)
      if not is_committed(_join(directory, n))
      and any(c.startswith("data-") for c in _kvstore.children(_join(directory, n))))


def cmd_ls(args) -> tuple[Any, int]:
  directory = args.directory
  url = _kvstore.is_url(directory)
  if url and not _kvstore.exists_prefix(directory):
    raise JaxckptError(f"Nothing is stored under {directory!r}.")
  if not url and not os.path.isdir(directory):
    raise JaxckptError(f"{directory!r} is not a directory.")
  latest = latest_checkpoint(directory)
  state = read_state(directory)
  managed = set(state.all_model_checkpoint_paths) if state else set()
  rows: list[dict[str, Any]] = []
  for path in _checkpoints_in(directory):
    manifest = read_manifest(path)
    rows.append({
        "path": path, "number": _number(_basename(path)),
        "save_counter": manifest.save_counter, "kind": manifest.kind,
        "time": datetime.datetime.fromtimestamp(manifest.created).isoformat(timespec="seconds"),
        "bytes": _size(path), "arrays": len(manifest.leaves), "committed": True,
        "latest": latest is not None and (_same_path(path, latest) if url
                                          else os.path.samefile(path, latest)),
        "in_state_file": any(_same_path(p, path) for p in managed),
    })
  incomplete = _incomplete_in(directory)
  result = {"directory": directory, "checkpoints": rows, "latest": latest,
            "incomplete": incomplete}
  if not args.json:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"Checkpoints in {directory}")
    for col in ("name", "number", "time", "size", "arrays", "status"):
      table.add_column(col)
    for r in rows:
      size = "unknown" if r["bytes"] is None else f"{r['bytes'] / 2**20:.1f} MiB"
      table.add_row(_basename(r["path"]), str(r["number"] or ""), r["time"], size,
                    str(r["arrays"]),
                    "committed, latest" if r["latest"] else "committed")
    console = Console()
    console.print(table)
    if incomplete:
      console.print(f"{len(incomplete)} incomplete save(s) left by interrupted runs "
                    f"({'' if url else 'hidden, '}never restored; removed when a "
                    "CheckpointManager opens the directory).")
  return result, 0


def _describe_sharding(sharding) -> str:
  if sharding is None:
    return "host (numpy / scalar)"
  if getattr(sharding, "device_str", None):
    return f"single device {sharding.device_str}"
  spec = getattr(sharding, "partition_spec", None)
  if spec is not None:
    mesh = dict(zip(sharding.axis_names, sharding.shape, strict=False))
    return f"mesh {mesh} spec {tuple(spec)}"
  return type(sharding).__name__


def _sharding_metadata(path: str) -> dict[str, str]:
  """Each array's sharding at save time, from Orbax's metadata; empty for URLs
  (their zarr arrays record no sharding)."""
  if _kvstore.is_url(path):
    return {}
  import orbax.checkpoint as ocp
  try:
    tree = ocp.PyTreeCheckpointer().metadata(os.path.join(os.path.abspath(path), "state"))
    tree = tree.item_metadata.tree
  except Exception:  # Sharding is informative only; an empty checkpoint has none.
    return {}
  out = {}
  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}/{k}" if prefix else k)
    else:
      out[prefix] = _describe_sharding(getattr(node, "sharding", None))
  walk(tree, "")
  return out


def cmd_inspect(args) -> tuple[Any, int]:
  reader = load_checkpoint(args.path)
  manifest = reader.manifest
  dtypes = reader.get_variable_to_dtype_map()
  shardings = _sharding_metadata(reader.path)
  rows: list[dict[str, Any]] = []
  for name in sorted(manifest.leaves):
    info = manifest.leaves[name]
    dtype = dtypes[name]
    row = {"name": name, "shape": list(info.shape), "dtype": info.dtype,
           "bytes": int(np.prod(info.shape, dtype=np.int64)) * dtype.itemsize,
           "sharding": shardings.get(name, ""), "kind": info.kind,
           "crc32": manifest.checksums.get(name),
           "shard_crc32": manifest.shard_checksums.get(name),  # Saved by several processes.
           "stored_in": manifest.sources.get(name)}  # Incremental: reused from there.
    if args.values:
      row["value"] = reader.get_tensor(name).tolist()
    rows.append(row)
  result = {"path": reader.path, "format_version": manifest.version,
            "save_counter": manifest.save_counter, "arrays": rows}
  if not args.json:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{reader.path} (save_counter={manifest.save_counter})")
    reused = any(r["stored_in"] for r in rows)
    for col in ("tensor", "shape", "dtype", "bytes", "sharding") + (
        ("reused from",) if reused else ()):
      table.add_column(col)
    for r in rows:
      table.add_row(r["name"], str(tuple(r["shape"])), r["dtype"], str(r["bytes"]),
                    r["sharding"], *((r["stored_in"] or "",) if reused else ()))
    console = Console()
    console.print(table)
    if args.values:
      for r in rows:
        console.print(f"tensor_name: {r['name']}\n{np.asarray(r['value'])}")
  return result, 0


def cmd_verify(args) -> tuple[Any, int]:
  from rich.progress import Progress
  target = args.path
  if _kvstore.is_url(target):  # No directories: a prefix is a checkpoint iff it is committed.
    paths = [target] if is_committed(target) else _checkpoints_in(target)
    if not paths and any(n.startswith("data-") for n in _kvstore.children(target)):
      read_manifest(target)  # Raises NotACheckpointError naming an interrupted save.
  else:
    paths = ([target] if is_committed(target) or not os.path.isdir(target)
             else _checkpoints_in(target))
  if not paths:
    raise JaxckptError(f"No committed checkpoints in {target!r}.")
  results = []
  with Progress(disable=args.json, transient=True) as progress:
    for path in paths:
      entry: dict[str, Any] = {"path": path, "ok": True, "arrays": {}}
      try:
        reader = load_checkpoint(path)
        names = sorted(reader.get_variable_to_shape_map())
        task = progress.add_task(f"verify {_basename(path)}", total=len(names))
        for name in names:
          try:
            reader.get_tensor(name)
            entry["arrays"][name] = "ok"
          except JaxckptError as e:
            entry["arrays"][name] = str(e)
            entry["ok"] = False
          progress.advance(task)
      except JaxckptError as e:
        entry["ok"], entry["error"] = False, str(e)
      results.append(entry)
  bad = [r for r in results if not r["ok"]]
  if not args.json:
    for r in results:
      print(f"{'OK     ' if r['ok'] else 'CORRUPT'} {r['path']} ({len(r['arrays'])} arrays)")
      for name, status in r["arrays"].items():
        if status != "ok":
          print(f"    {name}: {status}")
      if "error" in r:
        print(f"    {r['error']}")
  return {"checkpoints": results, "ok": not bad}, 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxckpt", description="Inspect and verify jaxckpt checkpoints.")
  sub = parser.add_subparsers(dest="command", required=True)
  ls = sub.add_parser("ls", help="list the checkpoints in a directory")
  ls.add_argument("directory", help="a directory, or a URL (memory://, s3://, gs://)")
  ls.set_defaults(func=cmd_ls)
  inspect = sub.add_parser(
      "inspect", help="show a checkpoint's arrays (like TF's inspect_checkpoint)")
  inspect.add_argument("path", help="a checkpoint, or a directory (its latest checkpoint)")
  inspect.add_argument("--values", action="store_true", help="also print every array's values")
  inspect.set_defaults(func=cmd_inspect)
  verify = sub.add_parser("verify", help="read every array and check its CRC-32")
  verify.add_argument("path", help="a checkpoint, or a directory (all its checkpoints)")
  verify.set_defaults(func=cmd_verify)
  for p in (ls, inspect, verify):
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (0 ok, 1 corrupt checkpoint found, 2 error)."""
  args = build_parser().parse_args(argv)
  from absl import logging as absl_logging  # Orbax's warnings are noise here.
  absl_logging.set_verbosity(absl_logging.ERROR)
  url = _kvstore.is_url(getattr(args, "directory", None) or getattr(args, "path", None))
  try:
    try:
      result, code = args.func(args)
    except ValueError as e:  # TensorStore's errors (no such bucket, access denied, ...).
      if not url:
        raise
      raise JaxckptError(str(e)) from e
  except (JaxckptError, OSError) as e:
    if getattr(args, "json", False):
      print(json.dumps({"error": str(e)}))
    else:
      print(f"jaxckpt {args.command}: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=2, default=str))
  return code
