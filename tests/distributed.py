"""Launches N real JAX processes on 127.0.0.1 and collects what each returned or raised.

Used by the multi-process tests: ``launch("distributed_cases", "save_restore", 2)``
runs ``distributed_cases.save_restore(**kwargs)`` in 2 fresh interpreters joined by
``jax.distributed.initialize`` (gloo CPU collectives, a free port picked now),
each with ``devices`` CPU devices. Returns the per-process return values; if a
process raises, exits non-zero or outlives ``timeout``, every process is killed
and the test fails with each process's traceback and stderr tail.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ProcessFailure(AssertionError):
  """A launched process raised, crashed or timed out."""


def start(
  module: str,
  function: str,
  n: int,
  *,
  devices: int = 2,
  cwds=None,
  kwargs: dict | None = None,
  env: dict | None = None,
  hard_exit: bool = False,
  recoverable: bool = False,
):
  """Starts the processes; returns (procs, outdir). `collect` finishes the job.

  ``hard_exit``: skip ``jax.distributed.shutdown()`` (whose barrier waits for
  every process) once the result is written; for tests where a process dies.
  ``recoverable``: set ``jax_enable_recoverability`` so the others keep running
  when a process dies (by default JAX aborts them all).
  """
  port = free_port()
  outdir = tempfile.mkdtemp(prefix="jaxckpt-mp-")
  procs = []
  for i in range(n):
    spec = {
      "module": module,
      "function": function,
      "kwargs": kwargs or {},
      "port": port,
      "n": n,
      "id": i,
      "devices": devices,
      "out": os.path.join(outdir, f"result.{i}"),
      "hard_exit": hard_exit,
      "recoverable": recoverable,
    }
    child_env = dict(
      os.environ,
      JAXCKPT_TEST_SPEC=json.dumps(spec),
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      # The tests, the jaxckpt under test (this checkout's, ahead of an install), and
      # the checkout's root (benchmarks.* run through this launcher too).
      PYTHONPATH=os.pathsep.join([HERE, os.path.join(ROOT, "src"), ROOT]),
      **(env or {}),
    )
    with (
      open(os.path.join(outdir, f"stdout.{i}"), "w") as stdout,
      open(os.path.join(outdir, f"stderr.{i}"), "w") as stderr,
    ):
      procs.append(
        subprocess.Popen(
          [sys.executable, os.path.join(HERE, "distributed.py")],
          cwd=(cwds[i] if cwds else None),
          env=child_env,
          stdout=stdout,
          stderr=stderr,
        )
      )
  return procs, outdir


def collect(procs, outdir: str, *, timeout: float = 120, expect_fail: set[int] = frozenset()):
  """Waits for all processes; returns a list of per-process results.

  A result is the function's return value; for processes in ``expect_fail``
  a dict: the returned dict (or ``{"error": traceback or None}``) plus
  ``returncode`` and ``stderr``.
  """
  deadline = time.monotonic() + timeout
  results_at = None
  timed_out = False
  release = os.path.join(outdir, "release")
  while any(p.poll() is None for p in procs):
    now = time.monotonic()
    if not os.path.exists(release) and all(
      p.poll() is not None or os.path.exists(os.path.join(outdir, f"result.{i}"))
      for i, p in enumerate(procs)
    ):  # Every process is done: process 0 (the coordination service) may go.
      open(release, "w").close()
    # jax.distributed.shutdown() occasionally hangs after every process has
    # returned its result (seen once in ~30 runs); that teardown is JAX's, not
    # what a test checks, so processes still there 20 s after all results are
    # in are killed, and how they end after that does not fail the test.
    if results_at is None and all(
      os.path.exists(os.path.join(outdir, f"result.{i}")) for i in range(len(procs))
    ):
      results_at = now
    if now > deadline or (results_at is not None and now > results_at + 20):
      timed_out = results_at is None
      break
    time.sleep(0.05)
  if any(p.poll() is None for p in procs):
    for p in procs:
      p.kill()
    for p in procs:
      p.wait()
  all_in = all(os.path.exists(os.path.join(outdir, f"result.{i}")) for i in range(len(procs)))
  results, problems = [], []
  for i, p in enumerate(procs):
    out = os.path.join(outdir, f"result.{i}")
    status, value = "missing", None
    if os.path.exists(out):
      with open(out, "rb") as f:
        status, value = pickle.load(f)
    with open(os.path.join(outdir, f"stderr.{i}")) as f:
      stderr = f.read()
    if i in expect_fail:  # Whatever it returned, plus how it ended.
      got = (
        dict(value)
        if status == "ok" and isinstance(value, dict)
        else {"error": value if status == "error" else None}
      )
      results.append({**got, "returncode": p.returncode, "stderr": stderr})
      continue
    if status != "ok" or (p.returncode != 0 and not all_in):
      problems.append(
        f"--- process {i}: returncode {p.returncode}, status {status}\n"
        f"{value or ''}\n--- stderr tail:\n{stderr[-3000:]}"
      )
    results.append(value)
  if timed_out:
    problems.insert(0, f"Timed out after {timeout} s; all processes killed.")
  shutil.rmtree(outdir, ignore_errors=True)  # Everything worth keeping is in the message.
  if problems:
    raise ProcessFailure("\n".join(problems))
  return results


def launch(
  module: str,
  function: str,
  n: int,
  *,
  devices: int = 2,
  timeout: float = 120,
  cwds=None,
  kwargs: dict | None = None,
  env: dict | None = None,
):
  """Runs ``module.function(**kwargs)`` in ``n`` processes; returns their results."""
  procs, outdir = start(module, function, n, devices=devices, cwds=cwds, kwargs=kwargs, env=env)
  return collect(procs, outdir, timeout=timeout)


def _child() -> None:
  spec = json.loads(os.environ["JAXCKPT_TEST_SPEC"])
  import importlib
  import traceback

  import jax

  jax.config.update("jax_num_cpu_devices", spec["devices"])
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # Option renamed/removed in another JAX: gloo is the default.
    pass
  if spec["recoverable"]:
    jax.config.update("jax_enable_recoverability", True)
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{spec['port']}", num_processes=spec["n"], process_id=spec["id"]
  )
  try:
    fn = getattr(importlib.import_module(spec["module"]), spec["function"])
    result = ("ok", fn(**spec["kwargs"]))
  except BaseException:
    result = ("error", traceback.format_exc())
  with open(spec["out"] + ".tmp", "wb") as f:
    pickle.dump(result, f)
  os.replace(spec["out"] + ".tmp", spec["out"])
  sys.stdout.flush()
  if result[0] != "ok" or spec["hard_exit"]:
    if spec["id"] == 0:  # It hosts the coordination service: the others may still need it.
      release = os.path.join(os.path.dirname(spec["out"]), "release")
      deadline = time.monotonic() + 120
      while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0 if result[0] == "ok" else 1)  # Skip the shutdown barrier: peers may be gone.
  jax.distributed.shutdown()


if __name__ == "__main__":
  _child()
