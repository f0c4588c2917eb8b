"""The ``jaxckpt`` command: ``ls``, ``inspect`` and ``verify`` checkpoints.

Built on argparse (subcommands, help, errors) and rich (tables, progress bars).
Every command takes ``--json`` for machine-readable output. Paths may be local
or key-value-store URLs (``memory://``, ``s3://``, ``gs://``; see _store.py).
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

from jaxckpt._errors import CorruptCheckpointError
from jaxckpt._errors import JaxckptError
from jaxckpt._errors import UnsupportedTensorError
from jaxckpt._errors import _ClosedPipe
from jaxckpt._layout import layout_of
from jaxckpt._manifest import is_committed
from jaxckpt._manifest import read_manifest
from jaxckpt._reader import load_checkpoint
from jaxckpt._state_file import latest_checkpoint
from jaxckpt._state_file import read_state
from jaxckpt._store import fspath
from jaxckpt._store import store_for
from jaxckpt._tfcheckpoint import TFCheckpointReader
from jaxckpt._tfcheckpoint import tf_checkpoints_in
from jaxckpt._tfcheckpoint import tracked_name


def _number(name: str) -> int | None:
  m = re.search(r"-(\d+)$", name)
  return int(m.group(1)) if m else None


def _checkpoints_in(directory: str) -> list[str]:
  store = store_for(directory)
  names = [
    n
    for n in store.names(directory)
    if not n.startswith(".") and is_committed(store.join(directory, n))
  ]
  names.sort(key=lambda n: (re.sub(r"-\d+$", "", n), _number(n) or -1, n))
  return [store.join(directory, n) for n in names]


def _size(nbytes: int | None) -> str:
  """Bytes in the largest binary unit that keeps the number at least 1."""
  if nbytes is None:
    return "unknown"
  for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
    if nbytes >= 1 << shift:
      return f"{nbytes / (1 << shift):.1f} {unit}"
  return f"{nbytes} B"


def _console():
  """A rich console that never cuts text: piped into a file or ``head`` there is no
  terminal width to fit, so lines are as long as their content."""
  from rich.console import Console

  class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich exits with 1 (our "corrupt"); main() says 141.
      raise _ClosedPipe("stdout closed")

  console = _Console()
  if not console.is_terminal:
    console = _Console(width=_PIPE_WIDTH)
  return console


def _table(title: str, columns):
  from rich.table import Table

  table = Table(title=title)
  for col in columns:
    table.add_column(col, overflow="fold")  # Wrap on a narrow terminal; never "…".
  return table


_PIPE_WIDTH = 10_000


def _ls_row(store, path: str, latest: str | None, managed: set[str]) -> dict[str, Any]:
  manifest = read_manifest(path)
  return {
    "path": path,
    "number": _number(store.basename(path)),
    "save_counter": manifest.save_counter,
    "kind": manifest.kind,
    "time": datetime.datetime.fromtimestamp(manifest.created).isoformat(timespec="seconds"),
    "bytes": store.size(path),
    "arrays": len(manifest.leaves),
    "committed": True,
    "latest": latest is not None and store.absolute(path) == store.absolute(latest),
    "in_state_file": any(store.absolute(p) == store.absolute(path) for p in managed),
  }


def cmd_ls(args) -> tuple[Any, int]:
  directory = fspath(args.directory)
  store = store_for(directory)
  if store.renames and not os.path.isdir(directory):
    raise JaxckptError(f"{directory!r} is not a directory.")
  if not store.exists(directory):
    raise JaxckptError(f"Nothing is stored under {directory!r}.")
  latest = latest_checkpoint(directory)
  state = read_state(directory)
  managed = set(state.all_model_checkpoint_paths) if state else set()
  rows: list[dict[str, Any]] = []
  for path in _checkpoints_in(directory):
    try:
      rows.append(_ls_row(store, path, latest, managed))
    except JaxckptError as e:  # One damaged checkpoint: the others are still listed.
      rows.append({"path": path, "number": _number(store.basename(path)), "error": str(e)})
  if store.renames and os.path.isdir(directory):  # TensorFlow's checkpoints, if any.
    tf_rows, tf_latest = _tf_rows(directory)
    rows += tf_rows
    latest = latest or tf_latest
  incomplete = store.incomplete(directory)
  result = {"directory": directory, "checkpoints": rows, "latest": latest, "incomplete": incomplete}
  if not args.json:
    table = _table(
      f"Checkpoints in {directory}", ("name", "number", "time", "size", "arrays", "status")
    )
    for r in rows:
      if "error" in r:
        table.add_row(store.basename(r["path"]), str(r["number"] or ""), "", "", "", "corrupt")
        print(f"jaxckpt ls: {r['error']}", file=sys.stderr)
        continue
      size = _size(r["bytes"])
      table.add_row(
        store.basename(r["path"]),
        str(r["number"] or ""),
        r["time"],
        size,
        str(r["arrays"]),
        ("damaged" if r.get("error") else "committed")
        + (", latest" if r["latest"] else "")
        + (" (TensorFlow)" if r["kind"] == "tensorflow" else ""),
      )
    console = _console()
    console.print(table)
    if incomplete:
      console.print(
        f"{len(incomplete)} incomplete save(s) left by interrupted runs "
        f"({'hidden, ' if store.renames else ''}never restored; removed when a "
        "CheckpointManager opens the directory)."
      )
  return result, 1 if any("error" in r for r in rows) else 0


def _tf_rows(directory: str) -> tuple[list[dict[str, Any]], str | None]:
  """`cmd_ls` rows of the TensorFlow checkpoints in a local directory, and the latest."""
  prefixes, latest, listed = tf_checkpoints_in(directory)
  rows: list[dict[str, Any]] = []
  for prefix in prefixes:
    files = [prefix + ".index"] + [
      os.path.join(directory, n)
      for n in os.listdir(directory)
      if n.startswith(os.path.basename(prefix) + ".data-")
    ]
    row: dict[str, Any] = {
      "path": prefix,
      "number": _number(os.path.basename(prefix)),
      "kind": "tensorflow",
      "time": datetime.datetime.fromtimestamp(os.path.getmtime(files[0])).isoformat(
        timespec="seconds"
      ),
      "bytes": sum(os.path.getsize(f) for f in files),
      "committed": True,
      "latest": latest is not None and os.path.abspath(prefix) == os.path.abspath(latest),
      "in_state_file": any(os.path.abspath(prefix) == os.path.abspath(p) for p in listed),
    }
    try:
      reader = TFCheckpointReader(prefix)
      row.update(save_counter=reader.save_counter, arrays=len(reader.bundle.entries))
    except JaxckptError as e:
      row.update(save_counter=None, arrays=0, error=str(e))
    rows.append(row)
  return rows, latest if latest in prefixes else None


def _inspect_tf(args, reader: TFCheckpointReader) -> tuple[Any, int]:
  """`cmd_inspect` for a TensorFlow checkpoint: TF's keys, dtypes and shapes."""
  rows: list[dict[str, Any]] = []
  for name, entry in sorted(reader.bundle.entries.items()):
    row: dict[str, Any] = {
      "name": name,
      "shape": list(entry.shape),
      "dtype": entry.dtype_name,
      "bytes": entry.size if not entry.slices else None,
      "slices": len(entry.slices),
      "shard": entry.shard_id if not entry.slices else None,
      "crc32c": entry.crc32c if not entry.slices else None,  # Masked, as TF stores it.
      "restores_into": tracked_name(name),
    }
    if args.values:
      try:
        row["value"] = reader.get_tensor(name).tolist()
      except JaxckptError as e:
        row["value"], row["error"] = None, str(e)
    rows.append(row)
  result = {"path": reader.path, "format": "tensorflow", "save_counter": reader.save_counter}
  result["arrays"] = rows
  if not args.json:
    table = _table(
      f"{reader.path} (TensorFlow, save_counter={reader.save_counter})",
      ("tensor", "shape", "dtype", "bytes", "restores into"),
    )
    for r in rows:
      size = "" if r["bytes"] is None else str(r["bytes"])
      shape = str(tuple(r["shape"])) + (f", {r['slices']} slices" if r["slices"] else "")
      table.add_row(r["name"], shape, r["dtype"], size, r["restores_into"] or "")
    console = _console()
    console.print(table)
    if args.values:
      for r in rows:
        console.print(f"tensor_name: {r['name']}\n{r.get('error') or np.asarray(r['value'])}")
  return result, 0


def cmd_inspect(args) -> tuple[Any, int]:
  reader = load_checkpoint(args.path)
  if isinstance(reader, TFCheckpointReader):
    return _inspect_tf(args, reader)
  manifest = reader.manifest
  dtypes = reader.get_variable_to_dtype_map()
  shardings = layout_of(manifest).describe(reader.path, manifest)
  rows: list[dict[str, Any]] = []
  for name in sorted(manifest.leaves):
    info = manifest.leaves[name]
    dtype = dtypes[name]
    row = {
      "name": name,
      "shape": list(info.shape),
      "dtype": info.dtype,
      "bytes": int(np.prod(info.shape, dtype=np.int64)) * dtype.itemsize,
      "sharding": shardings.get(name, ""),
      "kind": info.kind,
      "crc32": manifest.checksums.get(name),
      "shard_crc32": manifest.shard_checksums.get(name),  # Saved by several processes.
      "stored_in": manifest.sources.get(name),
    }  # Incremental: reused from there.
    if args.values:
      row["value"] = reader.get_tensor(name).tolist()
    rows.append(row)
  values: list[dict[str, Any]] = [  # In the manifest (strings, iterator states: _values.py).
    {"name": n, "shape": list(v.shape), "kind": v.kind}
    | ({"value": repr(reader.get_tensor(n))} if args.values else {})
    for n, v in sorted(manifest.values.items())
  ]
  result = {
    "path": reader.path,
    "format_version": manifest.version,
    "save_counter": manifest.save_counter,
    "arrays": rows,
    "values": values,
  }
  if not args.json:
    reused = any(r["stored_in"] for r in rows)
    table = _table(
      f"{reader.path} (save_counter={manifest.save_counter})",
      ("tensor", "shape", "dtype", "bytes", "sharding") + (("reused from",) if reused else ()),
    )
    for r in rows:
      table.add_row(
        r["name"],
        str(tuple(r["shape"])),
        r["dtype"],
        str(r["bytes"]),
        r["sharding"],
        *((r["stored_in"] or "",) if reused else ()),
      )
    for v in values:
      table.add_row(v["name"], str(tuple(v["shape"])), v["kind"], "", "manifest")
    console = _console()
    console.print(table)
    if args.values:
      for r in rows:
        console.print(f"tensor_name: {r['name']}\n{np.asarray(r['value'])}")
      for v in values:
        console.print(f"tensor_name: {v['name']}\n{v['value']}", markup=False)
  return result, 0


def cmd_verify(args) -> tuple[Any, int]:
  from rich.progress import Progress

  target = fspath(args.path)
  store = store_for(target)
  paths = [target] if is_committed(target) else _checkpoints_in(target)
  if store.renames and os.path.isdir(target):
    paths += tf_checkpoints_in(target)[0]  # TensorFlow's, if any.
  elif not paths and os.path.isfile(target + ".index"):
    paths = [target]
  if not paths and store.exists(target) and not os.path.isdir(target):
    read_manifest(target)  # Raises, naming what is there instead (nothing, a partial save).
  if not paths:
    raise JaxckptError(f"No committed checkpoints in {target!r}.")
  results = []
  with Progress(disable=args.json, transient=True) as progress:
    for path in paths:
      entry: dict[str, Any] = {"path": path, "ok": True, "arrays": {}}
      try:
        reader = load_checkpoint(path)
        if isinstance(reader, TFCheckpointReader):
          names = sorted(reader.bundle.entries)
        else:
          names = sorted(reader.manifest.leaves)  # The arrays (not save_counter).
        task = progress.add_task(f"verify {store.basename(path)}", total=len(names))
        for name in names:
          try:
            reader.get_tensor(name)
            entry["arrays"][name] = "ok"
          except UnsupportedTensorError:  # A TF variant: not readable, so not checked.
            entry["arrays"][name] = "not checked (unsupported dtype)"
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
        if status != "ok" and not status.startswith("not checked"):
          print(f"    {name}: {status}")
      if "error" in r:
        print(f"    {r['error']}")
  return {"checkpoints": results, "ok": not bad}, 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jaxckpt", description="Inspect and verify jaxckpt checkpoints."
  )
  sub = parser.add_subparsers(dest="command", required=True)
  ls = sub.add_parser("ls", help="list the checkpoints in a directory")
  ls.add_argument("directory", help="a directory, or a URL (memory://, s3://, gs://)")
  ls.set_defaults(func=cmd_ls)
  inspect = sub.add_parser(
    "inspect", help="show a checkpoint's arrays (like TF's inspect_checkpoint)"
  )
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
  """Runs the CLI; returns the exit code (0 ok, 1 corrupt checkpoint found, 2 missing or
  unreadable, 141 when the reader of its output went away, as for a command killed by
  SIGPIPE)."""
  try:
    code = _main(argv)
    sys.stdout.flush()  # A closed pipe shows here, not in the interpreter's exit flush.
    return code
  except BrokenPipeError:
    try:  # Nothing more can be written; stop the exit flush from trying again.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
      pass
    return 141


def _main(argv: list[str] | None) -> int:
  args = build_parser().parse_args(argv)
  from absl import logging as absl_logging  # Orbax's warnings are noise here.

  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    try:
      result, code = args.func(args)
    except ValueError as e:  # TensorStore's errors (no such bucket, access denied, ...).
      if (
        isinstance(e, JaxckptError)
        or store_for(getattr(args, "directory", None) or args.path).renames
      ):
        raise
      raise JaxckptError(str(e)) from e
  except BrokenPipeError:
    raise  # An OSError, but not an error of the checkpoint: main() exits quietly.
  except (JaxckptError, OSError) as e:
    if getattr(args, "json", False):
      print(json.dumps({"error": str(e)}))
    else:
      print(f"jaxckpt {args.command}: {e}", file=sys.stderr)
    return 1 if isinstance(e, CorruptCheckpointError) else 2
  if args.json:
    print(json.dumps(result, indent=2, default=str))
  return code
