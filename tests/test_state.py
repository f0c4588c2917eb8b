"""State beyond arrays: values, stateful objects, nested Checkpoints, zero-size arrays,
escaped keys, restores without a template, and restores of in-flight saves."""

import json
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxckpt
from jaxckpt import _store

ASYNC = jaxckpt.CheckpointOptions(enable_async=True)


def _values():
  return {
    "text": "héllo\u2603",
    "raw": b"\x00\xff\x10",
    "big": 2**70 + 1,
    "neg": -(2**80),
    "z": complex(1.5, -0.25),
    "floats": [float("nan"), float("inf"), -0.0, 0.1],
    "nothing": [None, True, {"k": "v"}],
    "strings": np.array([["ab", "c"], ["", "déf"]]),
    "blobs": np.array([b"x", b"\x00yz"]),
    "label": np.str_("cat"),
  }


def _blank():
  return {
    "text": "",
    "raw": b"",
    "big": 0,
    "neg": 0,
    "z": 0j,
    "floats": [0.0, 0.0, 0.0, 0.0],
    "nothing": [None, False, {"k": ""}],
    "strings": np.array([""]),
    "blobs": np.array([b""]),
    "label": np.str_(""),
  }


def _assert_exact(got, want):
  assert type(got) is type(want), (got, want)
  if isinstance(want, dict):
    assert got.keys() == want.keys()
    for k in want:
      _assert_exact(got[k], want[k])
  elif isinstance(want, list):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
      _assert_exact(g, w)
  elif isinstance(want, np.ndarray):
    assert got.dtype == want.dtype and np.array_equal(got, want)
  elif isinstance(want, float):
    assert got.hex() == want.hex() or (math.isnan(got) and math.isnan(want))
  else:
    assert got == want


@pytest.mark.parametrize("options", [None, ASYNC], ids=["sync", "async"])
def test_values_round_trip_exactly_with_their_python_types(tmp_path, options):
  ckpt = jaxckpt.Checkpoint(state=_values(), w=jnp.arange(3.0))
  path = ckpt.save(tmp_path / "ckpt", options=options)
  ckpt.sync()
  fresh = jaxckpt.Checkpoint(state=_blank(), w=jnp.zeros(3))
  fresh.restore(path).assert_consumed()
  _assert_exact(fresh.state, _values())
  assert jnp.array_equal(fresh.w, jnp.arange(3.0))
  # Values live in the manifest; the array part stays a plain Orbax checkpoint.
  plain = ocp.StandardCheckpointer().restore(f"{path}/state")
  assert set(plain) == {"state", "w"} and set(plain["state"]) == {"floats", "nothing"}
  assert np.array_equal(plain["w"], np.arange(3.0))


def test_a_value_restores_into_a_python_scalar_and_is_listed(tmp_path):
  path = jaxckpt.Checkpoint(step=2**64, name="run-1").write(tmp_path / "c")
  ckpt = jaxckpt.Checkpoint(step=0, name="")
  ckpt.read(path).assert_consumed()
  assert (ckpt.step, ckpt.name) == (2**64, "run-1")
  assert jaxckpt.list_variables(path) == [("name", []), ("step", [])]
  assert jaxckpt.load_checkpoint(path).get_tensor("step") == 2**64


class Counter:
  """An object that carries its own state (Grain iterators' protocol)."""

  def __init__(self, start=0):
    self.n = start

  def get_state(self):
    return {"n": self.n, "tag": b"\x01"}

  def set_state(self, state):
    self.n = state["n"]


def test_stateful_objects_are_saved_at_save_time_and_restored_in_place(tmp_path):
  counter, gen = Counter(5), np.random.default_rng(7)
  ckpt = jaxckpt.Checkpoint(loader=counter, data={"rng": gen, "w": jnp.ones(2)})
  gen.random(3)
  path = ckpt.save(tmp_path / "ckpt", options=ASYNC)
  expected = gen.random(4)  # After save() returned: not in the checkpoint.
  counter.n = 99
  ckpt.sync()
  other_counter, other_gen = Counter(), np.random.default_rng(0)
  fresh = jaxckpt.Checkpoint(loader=other_counter, data={"rng": other_gen, "w": jnp.zeros(2)})
  fresh.restore(path).assert_consumed()
  assert fresh.loader is other_counter and other_counter.n == 5
  assert fresh.data["rng"] is other_gen
  np.testing.assert_array_equal(other_gen.random(4), expected)


def test_nested_checkpoints_are_saved_under_their_names_and_restored_in_place(tmp_path):
  # TF's "loading mechanics": Checkpoint(model=Checkpoint(...), iterator=...).
  model = jaxckpt.Checkpoint(net={"w": jnp.ones(2)}, opt={"mu": jnp.full(2, 3.0)})
  path = jaxckpt.Checkpoint(model=model, iterator=Counter(4)).save(tmp_path / "ckpt")
  assert [name for name, _ in jaxckpt.list_variables(path)] == [
    "iterator",
    "model/net/w",
    "model/opt/mu",
    "save_counter",
  ]
  inner = jaxckpt.Checkpoint(net={"w": jnp.zeros(2)}, opt={"mu": jnp.zeros(2)})
  it = Counter()
  outer = jaxckpt.Checkpoint(model=inner, iterator=it)
  outer.restore(path).assert_consumed()
  assert outer.model is inner and it.n == 4
  assert inner.net["w"].tolist() == [1.0, 1.0] and inner.opt["mu"].tolist() == [3.0, 3.0]
  # As in TF, names start at the root: the nested Checkpoint alone matches nothing.
  status = jaxckpt.Checkpoint(net={"w": jnp.zeros(2)}).restore(path)
  assert not status.matched


@pytest.mark.parametrize("options", [None, ASYNC], ids=["sync", "async"])
def test_zero_size_arrays_save_restore_and_do_not_break_the_next_save(tmp_path, options):
  ckpt = jaxckpt.Checkpoint(
    empty=jnp.zeros((0, 3)), host=np.zeros((2, 0), np.int32), half=jnp.zeros(0, jnp.bfloat16)
  )
  first = ckpt.save(tmp_path / "ckpt", options=options)
  second = ckpt.save(tmp_path / "ckpt", options=options)
  ckpt.sync()
  assert jaxckpt.latest_checkpoint(tmp_path) == second
  fresh = jaxckpt.Checkpoint(
    empty=jnp.ones((0, 3)), host=np.ones((2, 0), np.int32), half=jnp.ones(0, jnp.bfloat16)
  )
  fresh.restore(first).assert_consumed()
  assert isinstance(fresh.empty, jax.Array) and fresh.empty.shape == (0, 3)
  assert isinstance(fresh.host, np.ndarray) and fresh.host.dtype == np.int32
  assert fresh.half.dtype == jnp.bfloat16
  assert jaxckpt.list_variables(second) == [
    ("empty", [0, 3]),
    ("half", [0]),
    ("host", [2, 0]),
    ("save_counter", []),
  ]
  with pytest.raises(jaxckpt.ShapeMismatchError, match=r"'empty': checkpoint \(0, 3\)"):
    jaxckpt.Checkpoint(empty=jnp.ones((0, 4))).restore(first)


@pytest.mark.parametrize("url", [False, True], ids=["local", "memory"])
def test_keys_with_dots_and_slashes_round_trip_exactly(tmp_path, url):
  weights = {"encoder.layer.0.weight": jnp.ones(2), "a/b": {"c.d": 3}, "plain": "x.y/z"}
  prefix = f"memory://{tmp_path.name}/ckpt" if url else tmp_path / "ckpt"
  path = jaxckpt.Checkpoint(model=weights).save(prefix)
  names = [name for name, _ in jaxckpt.list_variables(path)]
  assert names == [
    "model/a%2Fb/c%2Ed",
    "model/encoder%2Elayer%2E0%2Eweight",
    "model/plain",
    "save_counter",
  ]
  fresh = jaxckpt.Checkpoint(
    model={"encoder.layer.0.weight": jnp.zeros(2), "a/b": {"c.d": 0}, "plain": ""}
  )
  fresh.restore(path).assert_consumed()
  assert fresh.model["encoder.layer.0.weight"].tolist() == [1.0, 1.0]
  assert fresh.model["a/b"] == {"c.d": 3} and fresh.model["plain"] == "x.y/z"
  tree = jaxckpt.load_checkpoint(path).to_tree()
  assert set(tree["model"]) == {"encoder.layer.0.weight", "a/b", "plain"}
  assert tree["model"]["a/b"]["c.d"] == 3
  if not url:  # Plain Orbax sees the escaped names.
    plain = ocp.StandardCheckpointer().restore(f"{path}/state")
    assert set(plain["model"]) == {"encoder%2Elayer%2E0%2Eweight", "a%2Fb"}
    assert plain["model"]["a%2Fb"] == {"c%2Ed": 3}


def test_to_tree_restores_without_a_template(tmp_path):
  ckpt = jaxckpt.Checkpoint(
    model={"layers": [{"w": jnp.ones((2, 2))}, {"w": jnp.zeros(3, jnp.bfloat16)}]},
    step=7,
    name="run",
    empty=np.zeros((0, 2)),
  )
  tree = jaxckpt.load_checkpoint(ckpt.save(tmp_path / "ckpt")).to_tree()
  assert set(tree) == {"model", "step", "name", "empty"}
  layers = tree["model"]["layers"]
  assert isinstance(layers, list) and len(layers) == 2
  assert isinstance(layers[0]["w"], np.ndarray) and layers[0]["w"].sum() == 4
  assert layers[1]["w"].dtype == jnp.bfloat16
  assert tree["step"] == 7 and tree["name"] == "run" and tree["empty"].shape == (0, 2)
  placed = jax.device_put(tree["model"])  # Shardings are the caller's choice.
  assert isinstance(placed["layers"][0]["w"], jax.Array)


def test_shape_mismatch_lists_every_mismatching_array(tmp_path):
  path = jaxckpt.Checkpoint(a=jnp.ones(2), b=jnp.ones((2, 3)), c=jnp.ones(4), d=1.5).write(
    tmp_path / "c"
  )
  ckpt = jaxckpt.Checkpoint(a=jnp.ones(3), b=jnp.ones((3, 2)), c=jnp.ones(4), d=jnp.int32(0))
  with pytest.raises(jaxckpt.ShapeMismatchError) as info:
    ckpt.restore(path)
  message = str(info.value)
  assert "2 array(s) differ in shape" in message and "1 in dtype" in message
  assert "'a': checkpoint (2,), tracked (3,)" in message
  assert "'b': checkpoint (2, 3), tracked (3, 2)" in message
  assert "'d': checkpoint float64, tracked int32" in message and "'c'" not in message
  assert ckpt.a.shape == (3,)  # Nothing was restored.


def test_dtype_mismatch_is_a_clear_tree_error(tmp_path):
  path = jaxckpt.Checkpoint(a=jnp.ones(2), s="text").write(tmp_path / "c")
  ckpt = jaxckpt.Checkpoint(a=jnp.zeros(2, jnp.int32), s=jnp.zeros(2))
  with pytest.raises(jaxckpt.DtypeMismatchError) as info:
    ckpt.restore(path)
  assert isinstance(info.value, jaxckpt.TreeError)
  assert "'a': checkpoint float32, tracked int32 (casting float to int" in str(info.value)
  assert "'s': the checkpoint has a value but the tracked value is a jax" in str(info.value)


def _block_commits(monkeypatch):
  """Makes this process's saves wait before their commit until the event is set."""
  release, started = threading.Event(), threading.Event()
  real = _store.fsync_tree

  def slow_fsync(root):
    started.set()
    assert release.wait(timeout=120)
    real(root)

  monkeypatch.setattr(_store, "fsync_tree", slow_fsync)
  return started, release


@pytest.mark.parametrize("how", ["restore", "read", "load_checkpoint"])
def test_restore_of_a_path_another_checkpoint_is_saving_waits_for_it(tmp_path, monkeypatch, how):
  started, release = _block_commits(monkeypatch)
  writer = jaxckpt.Checkpoint(w=jnp.full(3, 2.0))
  path = writer.save(tmp_path / "ckpt", options=ASYNC)
  assert started.wait(timeout=120)
  reader = jaxckpt.Checkpoint(w=jnp.zeros(3))
  outcome = {}

  def restore():
    try:
      if how == "load_checkpoint":
        outcome["w"] = jaxckpt.load_checkpoint(path).get_tensor("w")
      else:
        getattr(reader, how)(path)
        outcome["w"] = reader.w
    except BaseException as e:
      outcome["error"] = e

  thread = threading.Thread(target=restore)
  thread.start()
  try:
    thread.join(timeout=0.5)
    assert thread.is_alive(), outcome  # Waiting, not CheckpointNotFoundError.
  finally:
    release.set()
  thread.join(timeout=120)
  assert "error" not in outcome, outcome
  assert np.asarray(outcome["w"]).tolist() == [2.0, 2.0, 2.0]
  writer.sync()


def test_cli_inspect_lists_values_and_verify_reads_them(tmp_path, capsys):
  from jaxckpt._cli import main

  path = jaxckpt.Checkpoint(
    w=jnp.ones(2), empty=jnp.zeros((0, 2)), name="run", rng=np.random.default_rng(0)
  ).write(tmp_path / "c")
  assert main(["verify", path]) == 0
  capsys.readouterr()
  assert main(["inspect", path, "--values", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert [a["name"] for a in out["arrays"]] == ["empty", "w"]
  values = {v["name"]: (v["kind"], v["value"]) for v in out["values"]}
  assert values["name"] == ("value", "'run'")
  assert values["rng"][0] == "numpy_generator" and "PCG64" in values["rng"][1]
