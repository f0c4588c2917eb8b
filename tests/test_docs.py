"""Runs the docstring examples and the README quick start, so the docs cannot rot."""

import doctest
import importlib
import pathlib
import pkgutil
import re
import tempfile

import pytest

import jaxckpt

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxckpt.__path__, "jaxckpt."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # The examples' mkdtemp() lands here.
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
  if ">>>" in pathlib.Path(module.__file__).read_text():
    assert result.attempted > 0


def test_every_public_name_is_documented():
  for name in jaxckpt.__all__:
    assert getattr(jaxckpt, name).__doc__, name


def test_readme_quick_start_runs(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  text = (ROOT / "README.md").read_text()
  section = text.split("## Quick start", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  exec(compile(code, "README.md", "exec"), {})
  assert "committed" in capsys.readouterr().out


def test_readme_commands_are_what_ci_runs():
  readme = (ROOT / "README.md").read_text()
  assert "make test" in readme and "make demo" in readme
  assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_import_is_quiet_and_does_not_pull_flax():
  import subprocess
  import sys

  proc = subprocess.run(
    [sys.executable, "-c", "import sys, jaxckpt; print('flax' in sys.modules)"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.stdout == "False\n"
  assert proc.stderr == ""
