"""Accelerator idle time from checkpointing a real training loop: jaxckpt vs Orbax.

Trains a Flax NNX decoder-only transformer language model (token embedding +
learned positions, ``--layers`` pre-LayerNorm blocks of causal multi-head
self-attention and a 4x GELU MLP, final LayerNorm, untied output head) with
``optax.adam`` on synthetic random tokens. The train step is ``jax.jit`` over
the ``nnx.split`` state of (model, optimizer) and DONATES that state
(``donate_argnums=0``), as real training loops do, so a checkpoint must not
read the step's input buffers once the next step is dispatched. The default
size (d_model 512, 6 layers, vocab 8192, seq 64) has about 104 MiB of float32
parameters, i.e. about 313 MiB of checkpointed state with Adam's mu and nu.

Modes (same loop, only the save call differs):

* ``none``: no checkpoint (the baseline).
* ``dd_async``: the floor for any async checkpointer, not a checkpointer: the
  least work one must do. ``jax.device_put(leaves, may_alias=False)`` copies
  the state (the next step donates it), then a background thread writes every
  array's bytes back to back into one file and fsyncs it (``dd
  conv=fdatasync``-style; on GPU/TPU ``np.asarray`` is the device-to-host
  transfer). No metadata, no checksums, no directory fsync, no commit rename.
  If this mode's overhead exceeds a target, no checkpointer can meet it here.
* ``orbax_sync``: ``ocp.Checkpointer(ocp.PyTreeCheckpointHandler())``,
  ``save(dir/step_N, args=ocp.args.PyTreeSave(state))``.
* ``orbax_async``: ``ocp.CheckpointManager`` with
  ``enable_async_checkpointing=True`` (what the Flax docs recommend),
  ``mngr.save(step, args=ocp.args.StandardSave(state))``.
* ``jaxckpt_sync`` / ``jaxckpt_async``: ``jaxckpt.Checkpoint(state=...)``,
  ``ckpt.state = state; ckpt.save(dir/ckpt, options=...)`` with
  ``CheckpointOptions()`` / ``CheckpointOptions(enable_async=True)``.

Every ``--save-every`` steps (all modes, ``none`` included, so the loops are
identical) the loop calls ``jax.block_until_ready(state)``: from that moment the
accelerator has nothing queued, and the time spent inside the save call alone is
the *blocked* time (accelerator idle). Per mode and repeat it records:

* ``loop_s``: wall time of ``--steps`` timed steps (after ``--warmup`` untimed
  steps and two untimed warm-up saves; compilation happens before any mode),
  ending when the last step's outputs are ready; ``ms_per_step`` = loop_s/steps
  (``ms_per_step_excl_blocked`` leaves out the blocked time: how much slower
  the steps themselves ran while saves went on in the background).
* ``drain_s``: after the loop, the wait for the last save to be committed
  (``ckpt.sync()`` / ``mngr.wait_until_finished()``; 0 for sync modes).
  ``wall_s`` = loop_s + drain_s (every checkpoint committed at the end).
* ``overhead`` = wall_s / wall_s of ``none`` in the same repeat - 1.
* blocked time of every save, and its p50 / p95 / max; and how many saves
  found the previous one still uncommitted (async modes: such a save first
  waits for it, so its blocked time includes that wait).
* commit latency, from the start of the save call until the checkpoint is
  committed. jaxckpt: a ``path.future.add_done_callback`` records the time the
  future resolves (after the durable commit and state-file update). Orbax async:
  right after ``mngr.save`` returns, a helper thread calls
  ``mngr.wait_until_finished()`` (which just joins Orbax's finalize thread) and
  records when it returns. Sync modes: commit = blocked.
* ``peak_rss_delta_mib``: a background thread samples this process's RSS
  (psutil) every 5 ms; reported is the peak over the RSS at the start of the
  mode (after ``gc.collect()`` and glibc ``malloc_trim(0)``, so that memory
  freed by an earlier mode but kept by the allocator is not silently reused).

Modes run interleaved, ``--repeats`` times, each in a fresh temporary
directory deleted (followed by ``os.sync()``) after the mode, outside any
timing. Each repeat starts one mode further down the list above than the one
before (the first in that order): this machine's speed drifts over minutes, and in a fixed order the
last modes ran furthest from their repeat's ``none`` (one run measured
jaxckpt async at 34% overhead in 6 fixed-order modes and 18% in 3 right after).
The table shows, per mode, the median across repeats and the
[min, max] range in brackets.

Caveats, printed with the results:

* Durability differs slightly: TensorStore (under both) fsyncs the array data
  files as it writes them, but Orbax 0.12.8 does not fsync its own metadata
  files or the directories (seen with strace); jaxckpt fsyncs everything before
  its commit rename and then the parent directory. Orbax compresses chunks with
  zstd by default, jaxckpt does not.
* On the CPU backend the "accelerator" is the host CPU: background checkpoint
  work competes with the training step for the same cores, so async cost shows
  up as slower steps rather than blocked time, and device arrays live in host
  RAM, so RSS also counts on-"device" snapshot copies. The benchmark uses the
  default JAX backend and runs unchanged on GPU/TPU.

Usage:
  python benchmarks/tpu_idle.py [--d-model 512] [--layers 6] [--vocab 8192]
      [--seq 64] [--batch 2] [--steps 60] [--save-every 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import _results
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import psutil
from flax import nnx

import jaxckpt

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "tpu_idle.json"
MODES = ("none", "dd_async", "orbax_sync", "orbax_async", "jaxckpt_sync", "jaxckpt_async")
RSS_PERIOD_S = 0.005
MIB = 2**20

# -- model ------------------------------------------------------------------


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention + 4x GELU MLP."""

  def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (z.reshape(b, t, self.heads, d // self.heads) for z in (q, k, v))
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(att.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Decoder-only LM: embedding + positions, blocks, final LayerNorm, output head."""

  def __init__(
    self, *, vocab: int, d_model: int, layers: int, heads: int, seq: int, rngs: nnx.Rngs
  ):
    self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq, d_model)) * 0.02)
    self.blocks = nnx.List([Block(d_model, heads, rngs=rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def param_count(*, vocab: int, d_model: int, layers: int, seq: int) -> int:
  """Parameters of `TransformerLM` (for sizing from the command line)."""
  per_block = 12 * d_model**2 + 4 * d_model + d_model + 4 * d_model  # qkv,proj,up,down; biases; LNs
  return 2 * vocab * d_model + seq * d_model + layers * per_block + 2 * d_model


def build(args) -> tuple[nnx.GraphDef, nnx.State, Callable, list[jax.Array]]:
  """Model, Adam optimizer, the donating jitted step and a few synthetic batches."""
  model = TransformerLM(
    vocab=args.vocab,
    d_model=args.d_model,
    layers=args.layers,
    heads=args.heads,
    seq=args.seq,
    rngs=nnx.Rngs(0),
  )
  optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @partial(jax.jit, donate_argnums=0)
  def train_step(state, tokens):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  keys = jax.random.split(jax.random.key(1), 4)
  batches = [
    jax.random.randint(k, (args.batch, args.seq + 1), 0, args.vocab, jnp.int32) for k in keys
  ]
  return graphdef, state, train_step, batches


# -- measurement helpers ------------------------------------------------------


class RssSampler:
  """Samples this process's RSS every `RSS_PERIOD_S` on a daemon thread; keeps the peak."""

  def __init__(self):
    self._proc = psutil.Process()
    self._stop = threading.Event()
    self.baseline = self._proc.memory_info().rss
    self.peak = self.baseline
    self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

  def _run(self) -> None:
    while not self._stop.wait(RSS_PERIOD_S):
      self.peak = max(self.peak, self._proc.memory_info().rss)

  def __enter__(self) -> RssSampler:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._proc.memory_info().rss)

  @property
  def delta_mib(self) -> float:
    return (self.peak - self.baseline) / MIB


class Saver:
  """One mode's checkpointing engine: ``save(step, state)``, ``drain()``, ``close()``.

  ``save`` returns the commit timestamp holder: a one-element list filled (from
  any thread) with ``time.perf_counter()`` when the checkpoint is committed.
  """

  def __init__(self, mode: str, workdir: str):
    self.mode, self.workdir = mode, workdir
    self._waiters: list[threading.Thread] = []
    self._last: list[float] | None = None
    if mode == "orbax_sync":
      self._orbax = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    elif mode == "orbax_async":
      self._mngr = ocp.CheckpointManager(
        os.path.join(workdir, "orbax"),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True),
      )
    elif mode == "dd_async":
      self._dd: threading.Thread | None = None
    elif mode.startswith("jaxckpt"):
      self._ckpt = jaxckpt.Checkpoint()
      self._opts = jaxckpt.CheckpointOptions(enable_async=mode == "jaxckpt_async")

  def previous_in_flight(self) -> bool:
    """Whether the previous save is still uncommitted (the next save will wait for it)."""
    return self._last is not None and not self._last

  def save(self, step: int, state) -> list[float]:
    committed: list[float] = []
    self._last = committed
    if self.mode == "orbax_sync":
      self._orbax.save(os.path.join(self.workdir, f"step_{step}"), args=ocp.args.PyTreeSave(state))
      committed.append(time.perf_counter())
    elif self.mode == "orbax_async":
      self._mngr.save(step, args=ocp.args.StandardSave(state))

      def wait():
        self._mngr.wait_until_finished()
        committed.append(time.perf_counter())

      waiter = threading.Thread(target=wait, daemon=True, name=f"orbax-commit-{step}")
      waiter.start()
      self._waiters.append(waiter)
    elif self.mode == "dd_async":
      if self._dd is not None:
        self._dd.join()  # One write in flight, like the async checkpointers' default.
      copies = jax.device_put(jax.tree.leaves(state), may_alias=False)
      self._dd = threading.Thread(
        target=_dd_write,
        args=(os.path.join(self.workdir, f"dd_{step}"), copies, committed),
        daemon=True,
        name=f"dd-{step}",
      )
      self._dd.start()
    else:
      self._ckpt.state = state
      path = self._ckpt.save(os.path.join(self.workdir, "ckpt"), options=self._opts)
      path.future.add_done_callback(lambda _: committed.append(time.perf_counter()))
    return committed

  def drain(self) -> None:
    """Waits until every save of this mode is committed."""
    if self.mode == "dd_async" and self._dd is not None:
      self._dd.join()
    if self.mode == "orbax_async":
      self._mngr.wait_until_finished()
    elif self.mode.startswith("jaxckpt"):
      self._ckpt.sync()
    for waiter in self._waiters:
      waiter.join()

  def close(self) -> None:
    if self.mode == "orbax_sync":
      self._orbax.close()
    elif self.mode == "orbax_async":
      self._mngr.close()
    elif self.mode.startswith("jaxckpt"):
      self._ckpt.sync()
      del self._ckpt.state


def _dd_write(path: str, arrays: list[jax.Array], committed: list[float]) -> None:
  """The dd_async floor: every array's bytes into one file, then fsync."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    for array in arrays:
      data = memoryview(np.ascontiguousarray(np.asarray(array))).cast("B")
      while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)
  finally:
    os.close(fd)
  committed.append(time.perf_counter())
  for name in os.listdir(os.path.dirname(path)):  # Keep the latest, like the others.
    if name != os.path.basename(path):
      os.unlink(os.path.join(os.path.dirname(path), name))


def trim_heap() -> bool:
  """Returns freed heap memory to the OS (glibc ``malloc_trim``); False if unavailable.

  Without it, memory an earlier mode freed stays in the allocator's arenas and a
  later mode reuses it without raising RSS, hiding that mode's true footprint.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    return False
  return True


def _percentile(xs: list[float], q: float) -> float:
  """Linear-interpolated percentile (numpy's default method)."""
  return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else 0.0


def run_mode(mode: str, state, train_step, batches, args, root: str):
  """One timed run of ``mode``; returns (new state, record dict)."""
  gc.collect()
  trim_heap()
  workdir = tempfile.mkdtemp(prefix=f"{mode}-", dir=root)
  saver = None if mode == "none" else Saver(mode, workdir)
  blocked, commit_at, starts = [], [], []
  step = in_flight = 0
  try:
    with RssSampler() as rss:
      for _ in range(args.warmup):
        state, loss = train_step(state, batches[step % len(batches)])
        step += 1
      jax.block_until_ready(state)
      # Two warm-up saves, untimed: first-save setup costs (jaxckpt's second
      # save is its first into staging buffers). The steps run in every mode.
      for _ in range(2):
        state, loss = train_step(state, batches[step % len(batches)])
        step += 1
        jax.block_until_ready(state)
        if saver is not None:
          saver.save(step, state)
          saver.drain()
      jax.block_until_ready(state)

      start = time.perf_counter()
      for i in range(1, args.steps + 1):
        state, loss = train_step(state, batches[step % len(batches)])
        step += 1
        if i % args.save_every == 0:
          jax.block_until_ready(state)  # From here on the accelerator is idle.
          if saver is not None:
            in_flight += saver.previous_in_flight()
            t0 = time.perf_counter()
            commit_at.append(saver.save(step, state))
            blocked.append(time.perf_counter() - t0)
            starts.append(t0)
      jax.block_until_ready((state, loss))
      loop_s = time.perf_counter() - start
      t_drain = time.perf_counter()
      if saver is not None:
        saver.drain()
      drain_s = time.perf_counter() - t_drain
  finally:
    if saver is not None:
      saver.close()
    shutil.rmtree(workdir, ignore_errors=True)
    os.sync()  # Leave no dirty pages for the next mode.

  if mode.endswith("_sync"):  # Committed when the save call returned.
    commit = list(blocked)
  else:
    commit = [c[0] - t0 for c, t0 in zip(commit_at, starts, strict=True)]
  record = {
    "loop_s": loop_s,
    "drain_s": drain_s,
    "wall_s": loop_s + drain_s,
    "ms_per_step": loop_s / args.steps * 1e3,
    "ms_per_step_excl_blocked": (loop_s - sum(blocked)) / args.steps * 1e3,
    "saves": len(blocked),
    "saves_found_previous_in_flight": in_flight,
    "blocked_ms": [b * 1e3 for b in blocked],
    "blocked_p50_ms": _percentile(blocked, 50) * 1e3,
    "blocked_p95_ms": _percentile(blocked, 95) * 1e3,
    "blocked_max_ms": max(blocked, default=0.0) * 1e3,
    "blocked_total_s": sum(blocked),
    "commit_s": commit,
    "commit_p50_s": _percentile(commit, 50),
    "commit_max_s": max(commit, default=0.0),
    "peak_rss_delta_mib": rss.delta_mib,
    "baseline_rss_mib": rss.baseline / MIB,
    "final_loss": float(loss),
  }
  return state, record


# -- reporting ----------------------------------------------------------------

SUMMARY_KEYS = (
  "wall_s",
  "loop_s",
  "drain_s",
  "ms_per_step",
  "ms_per_step_excl_blocked",
  "overhead",
  "blocked_p50_ms",
  "blocked_p95_ms",
  "blocked_max_ms",
  "blocked_total_s",
  "commit_p50_s",
  "commit_max_s",
  "peak_rss_delta_mib",
  "saves_found_previous_in_flight",
)


def summarize(records: list[dict]) -> dict:
  """Median, min and max across repeats of each summary metric."""
  out = {}
  for key in SUMMARY_KEYS:
    xs = [r[key] for r in records]
    out[key] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
  return out


def _cell(stat: dict, fmt: str) -> str:
  med, lo, hi = (format(stat[k], fmt) for k in ("median", "min", "max"))
  return med if lo == hi else f"{med} [{lo}, {hi}]"


COLUMNS = (  # (header, summary key, format, scale)
  ("wall s", "wall_s", ".1f", 1),
  ("ms/step", "ms_per_step", ".0f", 1),
  ("overhead %", "overhead", ".1f", 100),
  ("blocked p50 ms", "blocked_p50_ms", ".0f", 1),
  ("p95 ms", "blocked_p95_ms", ".0f", 1),
  ("max ms", "blocked_max_ms", ".0f", 1),
  ("commit p50 s", "commit_p50_s", ".2f", 1),
  ("peak RSS +MiB", "peak_rss_delta_mib", ".0f", 1),
  ("prev busy", "saves_found_previous_in_flight", "g", 1),
)


def format_table(results: dict) -> str:
  """One row per mode: median across repeats, [min, max] when they differ."""
  rows = []
  for mode, r in results["modes"].items():
    cells = [mode]
    for _, key, fmt, scale in COLUMNS:
      stat = {k: v * scale for k, v in r["summary"][key].items()}
      cells.append(_cell(stat, fmt))
    rows.append(cells)
  headers = ["mode"] + [c[0] for c in COLUMNS]
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
  line = lambda cells: "  ".join(  # noqa: E731
    c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
  )
  out = [line(headers), "-" * (sum(widths) + 2 * (len(widths) - 1))]
  out += [line(row) for row in rows]
  cfg = results["config"]
  out.append(
    f"{cfg['repeats']} repeat(s): median [min, max]. {cfg['saves_per_mode']} timed saves "
    f"per mode of {cfg['state_mib']:.0f} MiB every {cfg['save_every']} of {cfg['steps']} "
    "steps; blocked = time inside the save call after block_until_ready(state)."
  )
  out.append(
    "wall = timed loop + drain of the last save; overhead = wall / wall(none) - 1 in "
    "the same repeat; commit = save call -> committed;"
  )
  out.append(
    "prev busy = saves that found the previous save still uncommitted (they wait for "
    "it inside the save call)."
  )
  out.append(
    "Orbax leaves its metadata files and directories un-fsynced (data files are "
    "fsynced by TensorStore); jaxckpt fsyncs all."
  )
  out.append(
    "On CPU the 'accelerator' is the host: async writes share its cores and device "
    "arrays count in RSS."
  )
  return "\n".join(out)


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d-model", type=int, default=512, help="model width (default: 512)")
  p.add_argument("--layers", type=int, default=6, help="transformer blocks (default: 6)")
  p.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
  p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: 8192)")
  p.add_argument("--seq", type=int, default=64, help="sequence length (default: 64)")
  p.add_argument("--batch", type=int, default=2, help="batch size (default: 2)")
  p.add_argument("--steps", type=int, default=60, help="timed steps per mode (default: 60)")
  p.add_argument("--save-every", type=int, default=10, help="save period in steps (default: 10)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (default: 3)")
  p.add_argument("--repeats", type=int, default=2, help="runs of every mode (default: 2)")
  p.add_argument(
    "--modes",
    default=",".join(MODES),
    help=f"comma-separated subset of {','.join(MODES)} (default: all)",
  )
  p.add_argument("--dir", default=None, help="checkpoint root (default: a temp dir)")
  p.add_argument(
    "--json",
    default=str(DEFAULT_JSON),
    help=f"where to write the results (default: {DEFAULT_JSON})",
  )
  args = p.parse_args(argv)
  for name in (
    "d_model",
    "layers",
    "heads",
    "vocab",
    "seq",
    "batch",
    "steps",
    "save_every",
    "repeats",
  ):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be positive")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")
  if args.d_model % args.heads:
    p.error("--d-model must be a multiple of --heads")
  args.modes = tuple(m for m in args.modes.split(",") if m)
  unknown = set(args.modes) - set(MODES)
  if unknown or "none" not in args.modes:
    p.error(f"--modes must include 'none' and only use {MODES}; got {args.modes}")
  args.modes = tuple(m for m in MODES if m in args.modes)
  return args


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints the table, writes JSON; returns the results."""
  args = _parse_args(argv)
  own_root = args.dir is None
  root = tempfile.mkdtemp(prefix="jaxckpt-idle-") if own_root else args.dir
  os.makedirs(root, exist_ok=True)

  graphdef, state, train_step, batches = build(args)
  del graphdef
  leaves = jax.tree.leaves(state)
  state_bytes = sum(x.nbytes for x in leaves)
  params = param_count(vocab=args.vocab, d_model=args.d_model, layers=args.layers, seq=args.seq)
  print(
    f"model: d_model={args.d_model} layers={args.layers} heads={args.heads} "
    f"vocab={args.vocab} seq={args.seq} batch={args.batch}: {params / 1e6:.1f} M params "
    f"({params * 4 / MIB:.0f} MiB), checkpointed state {state_bytes / MIB:.0f} MiB in "
    f"{len(leaves)} arrays; backend {jax.default_backend()} ({jax.devices()[0]})"
  )
  t = time.perf_counter()
  state, loss = train_step(state, batches[0])  # Compiles.
  jax.block_until_ready((state, loss))
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for i in range(3):
    state, loss = train_step(state, batches[i % len(batches)])
  jax.block_until_ready((state, loss))
  step_s = (time.perf_counter() - t) / 3
  print(
    f"compile + first step {compile_s:.1f} s; {step_s * 1e3:.0f} ms/step; "
    f"{len(args.modes)} modes x {args.repeats} repeat(s), checkpoints under {root}",
    flush=True,
  )

  records = {m: [] for m in args.modes}
  try:
    for rep in range(args.repeats):
      k = rep % len(args.modes)
      for mode in args.modes[k:] + args.modes[:k]:
        state, rec = run_mode(mode, state, train_step, batches, args, root)
        records[mode].append(rec)
        print(
          f"  repeat {rep + 1}/{args.repeats} {mode:<14} wall {rec['wall_s']:6.2f} s  "
          f"{rec['ms_per_step']:6.0f} ms/step  blocked p50 {rec['blocked_p50_ms']:7.1f} ms  "
          f"commit p50 {rec['commit_p50_s']:6.2f} s  peak RSS +{rec['peak_rss_delta_mib']:.0f}"
          " MiB",
          flush=True,
        )
  finally:
    if own_root:
      shutil.rmtree(root, ignore_errors=True)

  for rep in range(args.repeats):
    base = records["none"][rep]["wall_s"]
    for mode in args.modes:
      records[mode][rep]["overhead"] = records[mode][rep]["wall_s"] / base - 1
  modes = {m: {"repeats": records[m], "summary": summarize(records[m])} for m in args.modes}
  results = {
    "config": {
      "d_model": args.d_model,
      "layers": args.layers,
      "heads": args.heads,
      "vocab": args.vocab,
      "seq": args.seq,
      "batch": args.batch,
      "steps": args.steps,
      "save_every": args.save_every,
      "warmup": args.warmup,
      "repeats": args.repeats,
      "modes": list(args.modes),
      "params": params,
      "param_mib": params * 4 / MIB,
      "state_bytes": state_bytes,
      "state_mib": state_bytes / MIB,
      "state_arrays": len(leaves),
      "saves_per_mode": args.steps // args.save_every,
      "compile_s": compile_s,
      "step_s_before_modes": step_s,
      "rss_period_s": RSS_PERIOD_S,
      "malloc_trim": trim_heap(),
    },
    "env": _results.environment(),
    "notes": [
      "blocked: time inside the save call, after jax.block_until_ready(state).",
      "commit: save call start -> committed (jaxckpt: path.future done callback; orbax_async:"
      " helper thread returning from mngr.wait_until_finished(); sync: = blocked).",
      "wall_s = loop_s + drain_s (wait for the last save after the loop).",
      "TensorStore fsyncs array data files in both; Orbax 0.12.8 does not fsync its"
      " metadata files or directories, jaxckpt fsyncs everything before committing.",
      "peak_rss_delta_mib: peak RSS (5 ms sampling) minus RSS at mode start (after gc and"
      " malloc_trim(0)).",
    ],
    "modes": modes,
  }
  print(format_table(results))
  return _results.write(results, args.json)


if __name__ == "__main__":
  main(sys.argv[1:])
