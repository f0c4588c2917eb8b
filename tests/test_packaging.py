"""The package as a user installs it: build the sdist and wheel, install the wheel beside the
newest JAX in a fresh virtual environment, and check that nothing is downgraded and the CLI runs."""

import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
VERSION = re.search(
  r'^__version__ = "([^"]+)"', (ROOT / "src" / "jaxckpt" / "__init__.py").read_text(), re.M
).group(1)


# --no-compile: skips byte-compiling JAX and SciPy, which nothing here needs.
PIP_INSTALL = ("-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check")


def _newest_python() -> str:
  """Python 3.13, found as the Makefile's test-newest finds it; else this interpreter.

  Either way the venv gets the newest JAX that interpreter can install.
  """
  candidates = [os.environ.get("NEWEST_PYTHON", "")]
  if shutil.which("pyenv"):
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    found = glob.glob(f"{root}/versions/3.13.*/bin/python")
    candidates += sorted(found, key=lambda p: Version(p.split("/")[-3]), reverse=True)
  candidates += [shutil.which("python3.13") or ""]
  for candidate in filter(None, candidates):
    probe = subprocess.run([candidate, "-c", "import sys"], capture_output=True)
    if probe.returncode == 0:
      return candidate
  return sys.executable


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
  proc = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
  assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


def _installed(python: str) -> dict[str, str]:
  out = _run(python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check").stdout
  return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
  """sdist and wheel of a copy of the files a build needs (so the build cannot see, or write
  into, anything else of the checkout); the wheel is built from the sdist."""
  tree = tmp_path_factory.mktemp("tree")
  for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
    shutil.copy(ROOT / name, tree / name)
  shutil.copytree(
    ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
  )
  out = tmp_path_factory.mktemp("dist")
  _run(sys.executable, "-m", "build", "--outdir", str(out), str(tree))
  return out


@pytest.mark.slow
@pytest.mark.packaging
def test_sdist_and_wheel_hold_the_package(dist):
  (sdist,) = dist.glob("jaxckpt-*.tar.gz")
  (wheel,) = dist.glob("jaxckpt-*-py3-none-any.whl")
  assert sdist.name == f"jaxckpt-{VERSION}.tar.gz"
  assert wheel.name == f"jaxckpt-{VERSION}-py3-none-any.whl"
  names = zipfile.ZipFile(wheel).namelist()
  assert "jaxckpt/__init__.py" in names and "jaxckpt/py.typed" in names
  assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]
  entry_points = zipfile.ZipFile(wheel).read(f"jaxckpt-{VERSION}.dist-info/entry_points.txt")
  assert "jaxckpt = jaxckpt._cli:main" in entry_points.decode()
  with tarfile.open(sdist) as tar:
    members = tar.getnames()
  for path in ("src/jaxckpt/py.typed", "LICENSE", "README.md", "pyproject.toml"):
    assert f"jaxckpt-{VERSION}/{path}" in members, path


@pytest.mark.slow
@pytest.mark.packaging
def test_wheel_installs_beside_the_newest_jax_without_downgrades(dist, tmp_path):
  venv = tmp_path / "venv"
  _run(_newest_python(), "-m", "venv", str(venv))
  python = str(venv / "bin" / "python")
  _run(python, *PIP_INSTALL, "jax")
  before = _installed(python)
  (wheel,) = dist.glob("jaxckpt-*.whl")
  _run(python, *PIP_INSTALL, str(wheel))
  after = _installed(python)

  downgraded = {
    name: (old, after.get(name))
    for name, old in before.items()
    if name not in after or Version(after[name]) < Version(old)
  }
  assert not downgraded, f"installing jaxckpt downgraded or removed {downgraded}"
  assert after["jaxckpt"] == VERSION
  assert after["jax"] == before["jax"]

  # From a directory holding a `jaxckpt` folder, which must not shadow the installed package.
  (tmp_path / "jaxckpt").mkdir()
  cli = _run(python, "-m", "jaxckpt", "--help", cwd=tmp_path)
  assert cli.stdout.startswith("usage: jaxckpt")
  version = _run(python, "-c", "import jaxckpt; print(jaxckpt.__version__)", cwd=tmp_path)
  assert version.stdout.strip() == VERSION
