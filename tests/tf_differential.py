"""Differential run against TensorFlow: the same random operations through ``tf.train`` and
``jaxckpt.train``, every observable outcome compared.

Each seed builds a `CheckpointManager` with random arguments and applies random operations
(manager saves, numbered saves, reopening the manager, ``Checkpoint.save`` / ``write`` into the
same directory, restores, and restores/reads into fresh Checkpoints followed by a deferred
assignment), recording returned paths, ``manager.checkpoints``, ``latest_checkpoint``,
``save_counter``, checkpoints on disk, load-status assertion outcomes and restored values.

Needs TensorFlow in another environment (it is no dependency of jaxckpt)::

  python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
  /tmp/tfvenv/bin/python tests/tf_differential.py tf 300 > tf.json
  python tests/tf_differential.py jaxckpt 300 > jaxckpt.json
  python tests/tf_differential.py compare tf.json jaxckpt.json
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile
from typing import Any

ASSERTIONS = ("assert_consumed", "assert_existing_objects_matched", "assert_nontrivial_match")


class Library:
  """The few calls that differ between TF (variables) and jaxckpt (immutable arrays)."""

  def __init__(self, name: str):
    self.tf = name == "tf"
    if self.tf:
      import tensorflow as tf

      self.train: Any = tf.train
      self._variable = tf.Variable
    else:
      import jax.numpy as jnp

      import jaxckpt.train

      self.train = jaxckpt.train
      self._array = jnp.array

  def value(self, x: float) -> Any:
    return self._variable(float(x)) if self.tf else self._array(float(x))

  def assign(self, ckpt: Any, x: float) -> None:
    if self.tf:
      ckpt.a.assign(float(x))
    else:
      ckpt.a = self._array(float(x))


def _on_disk(directory: str) -> list[str]:
  names = set()
  for root, dirs, files in os.walk(directory):
    for entry in files + dirs:
      stem = entry.split(".")[0]
      if entry != "checkpoint" and re.search(r"-\d+$", stem):
        names.add(os.path.normpath(os.path.join(os.path.relpath(root, directory), stem)))
  return sorted(names)


def _fresh(lib: Library, rng: random.Random, path: str | None, read: bool) -> list[Any]:
  fresh = lib.train.Checkpoint(z=lib.value(0)) if rng.random() < 0.5 else lib.train.Checkpoint()
  out: list[Any] = []
  try:
    status = fresh.read(path) if read else fresh.restore(path)
    for name in ASSERTIONS:
      try:
        getattr(status, name)()
        out.append("ok")
      except AssertionError:
        out.append("fails")
    fresh.a = lib.value(-5)  # Restored from the checkpoint if it holds 'a' (deferred).
    out += [float(fresh.a), int(fresh.save_counter)]
    status.expect_partial()
  except Exception as e:  # TF's NotFoundError is no FileNotFoundError.
    if not (isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError"):
      raise
    out.append("not found")
  return out


def trace(lib: Library, seed: int) -> list[Any]:
  rng = random.Random(seed)
  d = tempfile.mkdtemp()
  kwargs = {
    "max_to_keep": rng.choice([None, 1, 2, 3]),
    "keep_checkpoint_every_n_hours": rng.choice([None, 0]),
    "checkpoint_name": rng.choice(["ckpt", "model"]),
  }
  ckpt = lib.train.Checkpoint(a=lib.value(0))
  manager = lib.train.CheckpointManager(ckpt, d, **kwargs)

  def rel(path: str | None) -> str | None:
    return None if path is None else os.path.relpath(path, d)

  out: list[Any] = [repr(kwargs)]
  ops = ["save", "save", "numbered", "reopen", "ckpt_save", "restore", "write", "fresh", "read"]
  for i in range(rng.randint(3, 9)):
    op = rng.choice(ops)
    result: Any = None
    if op == "save":
      result = rel(manager.save())
    elif op == "numbered":
      result = rel(manager.save(checkpoint_number=rng.randint(0, 6)))
    elif op == "reopen":
      manager = lib.train.CheckpointManager(ckpt, d, **kwargs)
    elif op == "ckpt_save":
      result = rel(ckpt.save(os.path.join(d, "direct")))
    elif op == "write":
      result = rel(ckpt.write(os.path.join(d, f"w{i}")))
    elif op == "restore":
      lib.assign(ckpt, -1)
      result = [rel(manager.latest_checkpoint)]
      if manager.latest_checkpoint is not None:
        ckpt.restore(manager.latest_checkpoint)
        result.append(int(ckpt.save_counter))
    else:
      path = rng.choice([manager.latest_checkpoint, os.path.join(d, f"w{i - 1}")])
      result = _fresh(lib, rng, path, read=op == "read")
    lib.assign(ckpt, i + 1)
    checkpoints = [rel(p) for p in manager.checkpoints]
    latest = rel(manager.latest_checkpoint)
    out.append([op, result, checkpoints, latest, int(ckpt.save_counter), _on_disk(d)])
  return out


def compare(a_file: str, b_file: str) -> int:
  with open(a_file) as f:
    a = json.load(f)
  with open(b_file) as f:
    b = json.load(f)
  diverged = [seed for seed in a if a[seed] != b.get(seed)]
  print(json.dumps({"seeds": len(a), "diverged": diverged}))
  for seed in diverged[:5]:
    for x, y in zip(a[seed], b[seed], strict=False):
      if x != y:
        print(f"seed {seed}:\n  {a_file}: {x}\n  {b_file}: {y}")
        break
  return 1 if diverged else 0


def main(argv: list[str]) -> int:
  if argv[0] == "compare":
    return compare(argv[1], argv[2])
  lib = Library(argv[0])
  print(json.dumps({seed: trace(lib, seed) for seed in range(int(argv[1]))}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
