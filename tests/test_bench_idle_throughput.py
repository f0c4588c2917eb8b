"""Smoke tests of benchmarks/tpu_idle.py and benchmarks/throughput.py at tiny sizes.

Structure only (every mode / size / layout present, numbers positive, JSON
written); no timing comparisons.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # The scripts import their shared _results.py.


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_tpu_idle_tiny(tmp_path, capsys):
  bench = _load("tpu_idle")
  json_path = tmp_path / "out" / "idle.json"
  workdir = tmp_path / "work"
  results = bench.main(
    [
      "--layers",
      "2",
      "--d-model",
      "32",
      "--heads",
      "4",
      "--vocab",
      "64",
      "--seq",
      "8",
      "--batch",
      "2",
      "--steps",
      "4",
      "--save-every",
      "2",
      "--warmup",
      "1",
      "--repeats",
      "1",
      "--dir",
      str(workdir),
      "--json",
      str(json_path),
    ]
  )

  assert list(results["modes"]) == list(bench.MODES)
  assert results["config"]["saves_per_mode"] == 2
  assert results["config"]["state_bytes"] > 0
  for mode, r in results["modes"].items():
    (rec,) = r["repeats"]
    for key in ("wall_s", "loop_s", "ms_per_step", "baseline_rss_mib"):
      assert _positive(rec[key]), (mode, key, rec[key])
    assert rec["drain_s"] >= 0 and _finite(rec["peak_rss_delta_mib"]), mode
    assert rec["wall_s"] == pytest.approx(rec["loop_s"] + rec["drain_s"])
    assert _finite(rec["final_loss"]), mode
    for key in bench.SUMMARY_KEYS:
      stat = r["summary"][key]
      assert stat["min"] <= stat["median"] <= stat["max"], (mode, key)
    if mode == "none":
      assert rec["saves"] == 0 and rec["blocked_ms"] == [] and rec["overhead"] == 0
      continue
    assert rec["saves"] == 2, mode
    assert 0 <= rec["saves_found_previous_in_flight"] <= 2, mode
    if mode.endswith("_sync"):
      assert rec["saves_found_previous_in_flight"] == 0, mode
    assert len(rec["blocked_ms"]) == len(rec["commit_s"]) == 2, mode
    assert all(_positive(b) for b in rec["blocked_ms"]), mode
    assert all(_positive(c) for c in rec["commit_s"]), mode
    if mode.endswith("_sync"):  # Committed when the save call returns.
      assert [c * 1e3 for c in rec["commit_s"]] == pytest.approx(rec["blocked_ms"]), mode
    assert rec["blocked_p50_ms"] <= rec["blocked_p95_ms"] <= rec["blocked_max_ms"], mode
    assert _finite(rec["overhead"]), mode

  assert json_path.is_file() and results["json_path"] == str(json_path)
  on_disk = json.loads(json_path.read_text())
  assert on_disk["modes"].keys() == results["modes"].keys()
  assert on_disk["config"] == results["config"]
  # Each mode's directory is deleted; the --dir root stays.
  assert workdir.is_dir() and not any(workdir.iterdir())
  out = capsys.readouterr().out
  for mode in bench.MODES:
    assert mode in out


@pytest.mark.slow
def test_throughput_tiny(tmp_path, capsys):
  bench = _load("throughput")
  json_path = tmp_path / "throughput.json"
  workdir = tmp_path / "work"
  # --evict fadvise: never drop the whole machine's page cache from a test.
  results = bench.main(
    [
      "--sizes",
      "1",
      "2",
      "--repeats",
      "1",
      "--evict",
      "fadvise",
      "--dir",
      str(workdir),
      "--json",
      str(json_path),
    ]
  )

  runs = results["runs"]
  assert {(r["size_mib"], r["layout"]) for r in runs} == {
    (s, layout) for s in (1.0, 2.0) for layout in ("few", "many")
  }
  for r in runs:
    assert r["bytes"] == r["size_mib"] * 2**20 and r["leaves"] == bench.LAYOUTS[r["layout"]]
    for op in bench.TIMED:
      assert len(r["seconds"][op]) == 1 and _positive(r["seconds"][op][0]), (r["layout"], op)
      stat = r["gbps"][op]
      assert _positive(stat["median"]) and stat["min"] <= stat["median"] <= stat["max"]
    for name, ratio in r["ratios"].items():
      assert _positive(ratio), name
    assert r["verified"] == {"jaxckpt": True, "orbax": True}
    assert r["evict_methods"] == ["fadvise_dontneed"]
  assert set(results["fits"]) == {"few", "many"}
  assert "fadvise" in results["page_cache"]

  assert json_path.is_file() and results["json_path"] == str(json_path)
  on_disk = json.loads(json_path.read_text())
  assert len(on_disk["runs"]) == 4 and on_disk["config"] == results["config"]
  assert workdir.is_dir() and not any(workdir.iterdir())
  out = capsys.readouterr().out
  assert "jx save" in out and "many(256)" in out
