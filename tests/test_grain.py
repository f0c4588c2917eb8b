"""Grain iterators and numpy Generators in a Checkpoint: the same next batches after a
restore, and a SIGKILLed Grain-fed NNX loop that resumes bit-exactly."""

import os
import signal
import subprocess
import sys

import grain
import numpy as np
import pytest

import jaxckpt

sys.path.insert(0, os.path.dirname(__file__))
import grain_loop  # noqa: E402

TIMEOUT = 240


def _iterators():
  loader = iter(grain_loop.data_loader())
  source = np.arange(40)
  dataset = grain.MapDataset.source(source).shuffle(seed=5).map(lambda x: x * 2).batch(3)
  return loader, iter(dataset.to_iter_dataset()), np.random.default_rng(2)


def _draw(loader, dataset, rng):
  return [next(loader), next(dataset), rng.integers(0, 1000, size=3)]


@pytest.mark.parametrize("options", [None, jaxckpt.CheckpointOptions(enable_async=True)])
def test_grain_iterators_and_a_generator_continue_with_the_same_batches(tmp_path, options):
  loader, dataset, rng = _iterators()
  for _ in range(3):
    _draw(loader, dataset, rng)
  ckpt = jaxckpt.Checkpoint(loader=loader, data={"dataset": dataset, "rng": rng})
  path = ckpt.save(tmp_path / "ckpt", options=options)
  expected = [_draw(loader, dataset, rng) for _ in range(4)]
  ckpt.sync()
  kinds = {name: info.kind for name, info in jaxckpt.load_checkpoint(path).manifest.values.items()}
  assert kinds == {"loader": "state", "data/dataset": "state", "data/rng": "numpy_generator"}

  fresh_loader, fresh_dataset, fresh_rng = _iterators()
  fresh = jaxckpt.Checkpoint(loader=fresh_loader, data={"dataset": fresh_dataset, "rng": fresh_rng})
  fresh.restore(path).assert_consumed()
  assert fresh.loader is fresh_loader and fresh.data["dataset"] is fresh_dataset
  got = [_draw(fresh_loader, fresh_dataset, fresh_rng) for _ in range(4)]
  for want, have in zip(expected, got, strict=True):
    for a, b in zip(want, have, strict=True):
      np.testing.assert_array_equal(a, b)


def _run_child(directory, steps, kill_after=None):
  """Runs grain_loop.py; with ``kill_after``, SIGKILLs it once that step is committed."""
  child = subprocess.Popen(
    [sys.executable, grain_loop.__file__, str(directory), str(steps)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines = []
  try:
    for line in child.stdout:  # Ends at EOF if the child exits or dies.
      lines.append(line.split())
      if kill_after is not None and lines[-1] == ["committed", str(kill_after)]:
        child.send_signal(signal.SIGKILL)
        break
    _, err = child.communicate(timeout=TIMEOUT)
  finally:
    if child.poll() is None:
      child.kill()
  if kill_after is None:
    assert child.returncode == 0, err[-3000:]
  else:
    assert child.returncode == -signal.SIGKILL, err[-3000:]
  return lines


@pytest.mark.slow
def test_sigkilled_grain_nnx_loop_resumes_bit_exactly(tmp_path):
  steps = 16
  reference = []
  expected_params = grain_loop.run(str(tmp_path / "reference"), steps, report=reference.append)
  expected_batches = dict(line.split()[1:] for line in reference if line.startswith("batch"))
  assert len(expected_batches) == steps

  killed = _run_child(tmp_path / "run", steps, kill_after=6)
  killed_batches = {step: rest[0] for kind, step, *rest in killed if kind == "batch"}
  assert all(expected_batches[s] == d for s, d in killed_batches.items())
  committed = max(int(step) for kind, step, *_ in killed if kind == "committed")
  assert committed >= 6

  resumed = _run_child(tmp_path / "run", steps)
  resumed_batches = {step: rest[0] for kind, step, *rest in resumed if kind == "batch"}
  # It continues right after the latest committed step, with the same data order and noise.
  first = min(int(s) for s in resumed_batches)
  assert committed + 1 <= first <= max(int(s) for s in killed_batches) + 1
  assert resumed_batches == {s: expected_batches[s] for s in map(str, range(first, steps + 1))}
  assert resumed[-1] == ["params", expected_params]
