import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt._cli import main


@pytest.fixture
def directory(tmp_path):
  sharded = jax.device_put(jnp.arange(16384.0), jax.NamedSharding(jax.make_mesh((4,), ("d",)),
                                                              jax.P("d")))
  ckpt = jaxckpt.Checkpoint(model={"w": sharded, "b": np.ones(3, np.float32)}, step=4)
  manager = jaxckpt.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
  for _ in range(3):
    manager.save()
  (tmp_path / ".ckpt-9.jaxckpt-tmp-abc").mkdir()  # An interrupted save.
  return tmp_path


def _json(capsys, argv):
  code = main(argv + ["--json"])
  return code, json.loads(capsys.readouterr().out)


def test_ls(directory, capsys):
  code, out = _json(capsys, ["ls", str(directory)])
  assert code == 0
  assert [(Path(r["path"]).name, r["number"], r["latest"]) for r in out["checkpoints"]] == [
      ("ckpt-2", 2, False), ("ckpt-3", 3, True)]
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
  for cmd in ([sys.executable, "-m", "jaxckpt", "--help"],
              [str(Path(sys.executable).parent / "jaxckpt"), "verify", "--help"]):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: jaxckpt" in proc.stdout
