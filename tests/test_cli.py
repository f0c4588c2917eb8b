import json
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import _manifest
from jaxckpt import _store
from jaxckpt._cli import main


def _three_managed_saves(directory, *, size: int) -> None:
  """ckpt-1..3 of a sharded model in ``directory``; the manager keeps ckpt-2 and ckpt-3."""
  sharded = jax.device_put(
    jnp.arange(float(size)), jax.NamedSharding(jax.make_mesh((4,), ("d",)), jax.P("d"))
  )
  ckpt = jaxckpt.Checkpoint(model={"w": sharded, "b": np.ones(3, np.float32)}, step=4)
  manager = jaxckpt.CheckpointManager(ckpt, directory, max_to_keep=2)
  for _ in range(3):
    manager.save()


@pytest.fixture
def directory(tmp_path):
  _three_managed_saves(tmp_path, size=16384)
  (tmp_path / ".ckpt-9.jaxckpt-tmp-abc").mkdir()  # An interrupted save.
  return tmp_path


def _json(capsys, argv):
  code = main(argv + ["--json"])
  return code, json.loads(capsys.readouterr().out)


def test_ls(directory, capsys):
  code, out = _json(capsys, ["ls", str(directory)])
  assert code == 0
  assert [(Path(r["path"]).name, r["number"], r["latest"]) for r in out["checkpoints"]] == [
    ("ckpt-2", 2, False),
    ("ckpt-3", 3, True),
  ]
  assert all(r["bytes"] > 0 and r["arrays"] == 3 for r in out["checkpoints"])
  assert out["incomplete"] == [".ckpt-9.jaxckpt-tmp-abc"]
  assert main(["ls", str(directory)]) == 0
  assert "committed, latest" in capsys.readouterr().out


def test_inspect_with_values(directory, capsys):
  code, out = _json(capsys, ["inspect", str(directory), "--values"])
  assert code == 0 and out["save_counter"] == 3
  arrays = {a["name"]: a for a in out["arrays"]}
  assert list(arrays) == ["model/b", "model/w", "step"]
  assert arrays["model/w"]["shape"] == [16384] and arrays["model/w"]["bytes"] == 65536
  assert "spec ('d',)" in arrays["model/w"]["sharding"]
  assert arrays["model/w"]["value"] == list(range(16384))
  assert arrays["step"]["value"] == 4


def test_verify_reports_corruption_with_tree_path(directory, capsys):
  code, out = _json(capsys, ["verify", str(directory)])
  assert code == 0 and out["ok"] and len(out["checkpoints"]) == 2
  latest = jaxckpt.latest_checkpoint(directory)
  needle = np.arange(100.0, 116.0, dtype=np.float32).tobytes()  # Inside shard 0 of model/w.
  for f in Path(latest, "state").rglob("*"):
    if f.is_file() and needle in f.read_bytes():
      data = bytearray(f.read_bytes())
      data[data.find(needle) + 4] ^= 0xFF
      f.write_bytes(bytes(data))
      break
  else:
    raise AssertionError("shard bytes not found")
  code, out = _json(capsys, ["verify", str(directory)])
  assert code == 1 and not out["ok"]
  bad = next(c for c in out["checkpoints"] if c["path"] == latest)
  assert "CRC-32" in bad["arrays"]["model/w"] and bad["arrays"]["model/b"] == "ok"
  assert main(["verify", latest]) == 1
  assert "CORRUPT" in capsys.readouterr().out


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
  assert main(["inspect", str(tmp_path / "missing")]) == 2
  assert "No checkpoint found" in capsys.readouterr().err


def test_console_entry_points():
  for cmd in (
    [sys.executable, "-m", "jaxckpt", "--help"],
    [str(Path(sys.executable).parent / "jaxckpt"), "verify", "--help"],
  ):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: jaxckpt" in proc.stdout


# -- key-value stores: the CLI in-process (memory:// lives in this process) ------


@pytest.fixture(params=["memory", "s3"])
def store(request):
  """A manager directory on a key-value store: (URL, put(url, bytes) to overwrite an object).

  Like ``directory``: ckpt-2 and ckpt-3 kept, plus the data of an interrupted save
  (ckpt-9: a data prefix, no manifest).
  """
  if request.param == "memory":
    root, put = f"memory://{uuid.uuid4().hex}/run", _store.KV.replace_file
  else:
    client, bucket = request.getfixturevalue("s3")
    root = f"s3://{bucket}/run"

    def put(url, data):  # Through S3 itself, behind jaxckpt's back.
      client.put_object(Bucket=bucket, Key=url.removeprefix(f"s3://{bucket}/"), Body=data)

  _three_managed_saves(root, size=16)
  _store.KV.replace_file(f"{root}/ckpt-9/data-0123456789ab/model/w/zarr.json", b"{}")
  return root, put


def test_ls_on_a_store(store, capsys):
  root, _ = store
  code, out = _json(capsys, ["ls", root])
  assert code == 0 and out["directory"] == root and out["latest"] == f"{root}/ckpt-3"
  assert [
    (r["path"], r["number"], r["latest"], r["in_state_file"]) for r in out["checkpoints"]
  ] == [(f"{root}/ckpt-2", 2, False, True), (f"{root}/ckpt-3", 3, True, True)]
  assert all(
    r["arrays"] == 3 and r["save_counter"] == r["number"] and r["bytes"] is None
    for r in out["checkpoints"]
  )  # Object sizes are not listed: unknown.
  assert out["incomplete"] == ["ckpt-9"]
  assert main(["ls", root]) == 0
  table = capsys.readouterr().out
  assert "committed, latest" in table and "unknown" in table
  assert "1 incomplete save(s)" in table


def test_inspect_on_a_store(store, capsys):
  root, _ = store
  code, out = _json(capsys, ["inspect", root])  # The directory: its latest checkpoint.
  assert code == 0 and out["path"] == f"{root}/ckpt-3" and out["save_counter"] == 3
  arrays = {a["name"]: a for a in out["arrays"]}
  assert list(arrays) == ["model/b", "model/w", "step"]
  assert arrays["model/w"]["shape"] == [16] and arrays["model/w"]["dtype"] == "float32"
  assert arrays["model/w"]["bytes"] == 64 and arrays["model/w"]["crc32"] is not None
  assert all("value" not in a for a in arrays.values())

  code, out = _json(capsys, ["inspect", f"{root}/ckpt-2", "--values"])
  assert code == 0 and out["save_counter"] == 2
  values = {a["name"]: a["value"] for a in out["arrays"]}
  assert values == {"model/b": [1.0, 1.0, 1.0], "model/w": list(range(16)), "step": 4}
  assert main(["inspect", root, "--values"]) == 0
  text = capsys.readouterr().out
  assert "tensor_name: model/w" in text and "15." in text


def test_verify_on_a_store_names_the_corrupt_array(store, capsys):
  root, put = store
  code, out = _json(capsys, ["verify", root])
  assert code == 0 and out["ok"]
  assert [c["path"] for c in out["checkpoints"]] == [f"{root}/ckpt-2", f"{root}/ckpt-3"]
  assert all(set(c["arrays"].values()) == {"ok"} for c in out["checkpoints"])

  latest = f"{root}/ckpt-3"
  data = jaxckpt.load_checkpoint(latest).manifest.data
  chunk = f"{latest}/{data}/model/w/c/1"  # Shard 1 of model/w: [4., 5., 6., 7.].
  body = bytearray(_store.KV.read_bytes(chunk))
  assert body == np.arange(4.0, 8.0, dtype=np.float32).tobytes()
  body[3] ^= 0xFF
  put(chunk, bytes(body))
  code, out = _json(capsys, ["verify", root])
  assert code == 1 and not out["ok"]
  good, bad = out["checkpoints"]
  assert good["ok"] and bad["path"] == latest and not bad["ok"]
  assert "CRC-32" in bad["arrays"]["model/w"] and bad["arrays"]["model/b"] == "ok"
  assert main(["verify", latest]) == 1
  text = capsys.readouterr().out
  assert "CORRUPT" in text and "model/w" in text


def test_store_errors_are_clear_and_exit_2(store, capsys):
  root, _ = store
  assert main(["inspect", f"{root}/missing"]) == 2
  assert "No checkpoint found" in capsys.readouterr().err
  assert main(["ls", f"{root}/missing"]) == 2
  assert "Nothing is stored" in capsys.readouterr().err
  assert main(["verify", f"{root}/ckpt-9"]) == 2
  assert "interrupted save" in capsys.readouterr().err
  code, out = _json(capsys, ["verify", f"{root}/missing"])
  assert code == 2 and "No committed checkpoints" in out["error"]


def test_s3_access_errors_exit_2(s3, capsys):
  assert main(["ls", "s3://no-such-bucket-here/run"]) == 2
  err = capsys.readouterr().err  # TensorStore's error, without a traceback.
  assert err.startswith("jaxckpt ls: ") and "NoSuchBucket" in err


@pytest.mark.parametrize("created", ["1e300", "NaN", '"yesterday"'])
def test_a_manifest_with_a_bad_time_is_an_error_not_a_traceback(tmp_path, capsys, created):
  path = jaxckpt.Checkpoint(w=np.ones(2, np.float32)).save(tmp_path / "ckpt")
  manifest = Path(path, "jaxckpt", "metadata")
  text = manifest.read_text()
  body = json.loads(text.replace(json.dumps(json.loads(text)["created"]), created))
  manifest.write_bytes(_manifest.seal(body))  # Damaged before it was sealed.
  assert main(["ls", str(tmp_path)]) == 1
  assert "damaged jaxckpt manifest" in capsys.readouterr().err


def test_piped_tables_wrap_instead_of_cutting(tmp_path, capsys):
  # capsys is not a terminal, as a pipe into a file or `head` is not.
  name = "optimizer_state_with_a_long_name"
  sharded = jax.device_put(
    jnp.arange(8.0), jax.NamedSharding(jax.make_mesh((4,), ("d",)), jax.P("d"))
  )
  ckpt = jaxckpt.Checkpoint(**{name: {"layer_0_attention_query_kernel_weights": sharded}})
  manager = jaxckpt.CheckpointManager(
    ckpt, tmp_path, max_to_keep=1, checkpoint_name="a_checkpoint_name_longer_than_a_terminal"
  )
  manager.save()
  assert main(["inspect", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert f"{name}/layer_0_attention_query_kernel_weights" in out and "…" not in out
  assert "mesh {'d': 4}" in out and "np.int64" not in out
  assert main(["ls", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "a_checkpoint_name_longer_than_a_terminal-1" in out and " KiB" in out


@pytest.mark.parametrize("nbytes, text", [(512, "512 B"), (2048, "2.0 KiB"), (3 << 20, "3.0 MiB")])
def test_sizes_have_sensible_units(nbytes, text):
  from jaxckpt._cli import _size

  assert _size(nbytes) == text


@pytest.mark.parametrize("extra", [["--json"], []])
def test_closed_pipe_exits_quietly(tmp_path, extra):
  jaxckpt.Checkpoint(w=np.arange(30000, dtype=np.int32)).save(tmp_path / "c")
  proc = subprocess.Popen(
    [sys.executable, "-m", "jaxckpt", "inspect", str(tmp_path), "--values", *extra],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  proc.stdout.readline()  # Like `| head -1`: read a line, then go away.
  proc.stdout.close()
  stderr = proc.stderr.read().decode()
  assert proc.wait(timeout=120) in (0, 141)
  assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
