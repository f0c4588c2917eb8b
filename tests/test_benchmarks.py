"""Smoke test of benchmarks/async_save.py on a tiny state (structure only, no timing asserts)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "async_save.py"
sys.path.insert(0, str(BENCHMARK.parent))  # The scripts import their shared _results.py.


def _load_benchmark():
  spec = importlib.util.spec_from_file_location("async_save_benchmark", BENCHMARK)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _load_benchmark()


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_run_reports_every_mode(bench, tmp_path, capsys):
  workdir = tmp_path / "work"
  json_path = tmp_path / "out" / "result.json"
  results = bench.main(
    [
      "--size-mib",
      "2",
      "--leaves",
      "4",
      "--repeats",
      "1",
      "--step-seconds",
      "0.2",
      "--dir",
      str(workdir),
      "--json",
      str(json_path),
    ]
  )

  assert set(results["modes"]) == set(bench.MODES)
  assert {
    "jaxckpt-async",
    "orbax-async",
    "jaxckpt-async-step-running",
    "orbax-async-step-running",
    "jaxckpt-sync",
    "orbax-sync",
  } <= set(results["modes"])
  for mode, r in results["modes"].items():
    assert len(r["blocked_ms"]) == len(r["commit_s"]) == 1, mode
    for key in (
      "p50_blocked_ms",
      "min_blocked_ms",
      "max_blocked_ms",
      "p50_commit_s",
      "blocked_vs_orbax_async",
    ):
      assert _positive(r[key]), (mode, key, r[key])
    assert all(_positive(b) for b in r["blocked_ms"]), mode
    assert r["min_blocked_ms"] <= r["p50_blocked_ms"] <= r["max_blocked_ms"], mode
    if "async" in mode:
      for blocked_ms, commit_s in zip(r["blocked_ms"], r["commit_s"], strict=True):
        assert commit_s * 1e3 >= blocked_ms, mode
  assert results["modes"]["orbax-async"]["blocked_vs_orbax_async"] == pytest.approx(1.0)

  config = results["config"]
  assert config["leaves"] == 4 and config["repeats"] == 1
  assert config["state_bytes"] == 2 * 2**20

  assert json_path.is_file()
  assert results["json_path"] == str(json_path)
  on_disk = json.loads(json_path.read_text())
  assert on_disk["modes"].keys() == results["modes"].keys()
  assert on_disk["config"] == config

  # Every measurement's directory is cleaned up; the root given with --dir stays.
  assert workdir.is_dir() and not any(workdir.iterdir())

  out = capsys.readouterr().out
  for mode in bench.MODES:
    assert mode in out


def test_table_formats_results(bench):
  row = {
    "p50_blocked_ms": 2.0,
    "min_blocked_ms": 1.0,
    "max_blocked_ms": 3.0,
    "p50_commit_s": 0.5,
    "blocked_vs_orbax_async": 0.25,
  }
  table = bench.format_table({"modes": {m: row for m in bench.MODES}})
  assert len(table.splitlines()) == len(bench.MODES) + 3
  assert "0.250x" in table


def test_incremental_benchmark_runs_tiny(tmp_path):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "incremental_bench", Path(__file__).parent.parent / "benchmarks" / "incremental.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "incr.json"
  result = module.main(
    ["--size-mib", "4", "--repeats", "1", "--dir", str(tmp_path / "d"), "--json", str(out)]
  )
  assert out.exists() and result["incremental_bytes"] < result["full_bytes"]
  assert result["full_second_save_s"] > 0 and result["incremental_second_save_s"] > 0


def test_multiprocess_benchmark_runs_tiny(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
    "multiprocess_benchmark", BENCHMARK.parent / "multiprocess.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  results = module.main(
    [
      "--size-mib",
      "1",
      "--leaves",
      "2",
      "--repeats",
      "1",
      "--dir",
      str(tmp_path),
      "--json",
      str(tmp_path / "mp.json"),
    ]
  )
  assert set(results["configs"]) == {"1x4", "2x2", "2x2-io-task0"}
  for r in results["configs"].values():
    assert all(_positive(x) for k in ("save_s", "blocked_ms", "restore_s") for x in r[k])
    assert r["bytes"] == results["configs"]["1x4"]["bytes"] > 0
  assert results.pop("json_path") == str(tmp_path / "mp.json")
  assert json.loads((tmp_path / "mp.json").read_text()) == results
  assert "2x2-io-task0" in capsys.readouterr().out
  assert [p.name for p in tmp_path.iterdir()] == ["mp.json"]  # Scratch dirs removed.


@pytest.mark.slow  # ~30-50 s: five peers, cold restores, two fresh processes.
def test_leaves_benchmark_quick(tmp_path):
  spec = importlib.util.spec_from_file_location("leaves_benchmark", BENCHMARK.parent / "leaves.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  json_path = tmp_path / "leaves.json"
  results = module.main(
    ["--quick", "--total-mib", "2", "--leaves", "4", "64", "--sizes-mib", "1", "--size-leaves"]
    + ["8", "--first-save-leaves", "16", "--dir", str(tmp_path / "d"), "--json", str(json_path)]
  )
  on_disk = json.loads(json_path.read_text())
  assert results.pop("json_path") == str(json_path) and on_disk == results
  assert on_disk["config"]["quick"] and on_disk["env"]["command"]
  assert [p["leaves"] for p in on_disk["leaf_sweep"]] == [4, 64]
  assert [p["total_bytes"] for p in on_disk["size_sweep"]] == [2**20]
  for point in on_disk["leaf_sweep"] + on_disk["size_sweep"]:
    assert set(point["peers"]) == set(module.PEERS)
    for peer, r in point["peers"].items():
      assert r["restore"]["verified"] is True, peer
      assert len(r["save"]["runs"]) == len(r["restore"]["runs"]) == 1
      for key in ("blocked_s", "durable_s", "cpu_s"):
        assert _positive(r["save"][key]), (peer, key)
      assert r["save"]["blocked_s"] <= r["save"]["durable_s"]
      assert _positive(r["restore"]["s"])
    assert _positive(point["ratios"]["commit_vs_safetensors"])
  firsts = {r["peer"]: r for r in on_disk["first_save"]}
  assert set(firsts) == {"jaxckpt", "orbax"}
  for r in firsts.values():
    assert r["leaves"] == 16 and _positive(r["first"]["blocked_s"]), r
    assert r["second"]["compiles"] == 0, r  # Nothing compiles again on a second save.
  assert not any((tmp_path / "d").iterdir())  # Scratch cleaned up; --dir itself stays.
