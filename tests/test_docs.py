"""Runs the docstring examples and the README quick start, so the docs cannot rot."""

import doctest
import importlib
import inspect
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


# Public methods that raise nothing of their own, so their docstrings have no Raises: section.
NEVER_RAISE = {
  "CheckpointOptions.copy",
  "CheckpointReader.get_variable_to_shape_map",
  "CheckpointReader.get_variable_to_dtype_map",
  "CheckpointReader.has_tensor",
  "LoadStatus.expect_partial",
}


def _public_callables():
  """(qualified name, object, docstring) of every public function, class, method and property."""
  for name in jaxckpt.__all__:
    obj = getattr(jaxckpt, name)
    yield name, obj, inspect.getdoc(obj) or ""
    if not isinstance(obj, type) or issubclass(obj, BaseException):
      continue
    for member, value in vars(obj).items():
      if not member.startswith("_") and (callable(value) or isinstance(value, property)):
        yield f"{name}.{member}", value, inspect.getdoc(value) or ""


def _parameters(function) -> list[str]:
  params = inspect.signature(function).parameters
  return [p for p in params if p not in ("self", "cls")]


def test_public_docstrings_have_google_sections():
  problems = []
  for name, obj, doc in _public_callables():
    wanted = ["Examples:"]  # Every public name shows a runnable example (a doctest below).
    if isinstance(obj, type) and not issubclass(obj, BaseException):
      init = vars(obj).get("__init__")  # (SavePath's __new__ is jaxckpt's, not the user's.)
      wanted += ["Args:"] if init and _parameters(init) else []
      wanted += ["Raises:"] if init and "raise " in inspect.getsource(init) else []
    elif inspect.isfunction(obj):
      wanted += ["Args:"] if _parameters(obj) else []
      wanted += ["Returns:"] if inspect.signature(obj).return_annotation not in ("None",) else []
      wanted += [] if name in NEVER_RAISE else ["Raises:"]
    problems += [f"{name}: no {section}" for section in wanted if section not in doc]
    if "Examples:" in doc and ">>>" not in doc:
      problems.append(f"{name}: an Examples section without a doctest")
  assert not problems, "\n".join(problems)


def test_api_reference_lists_every_public_name():
  documented = re.findall(r"^::: jaxckpt\.(\w+)\s*$", (ROOT / "docs" / "api.md").read_text(), re.M)
  assert sorted(documented) == sorted(jaxckpt.__all__)


def test_readme_quick_start_runs(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  text = (ROOT / "README.md").read_text()
  section = text.split("## Quick start", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  exec(compile(code, "README.md", "exec"), {})
  assert "committed" in capsys.readouterr().out


def test_readme_is_a_user_document():
  """No lab notebook: no dates, no first person; measurements live on the docs' Performance page."""
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 220
  assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", readme)
  assert not re.findall(r"\b(I|my|we|our)\b(?! ?/ ?O)", readme)
  assert "## Install" in readme and "## Quick start" in readme and "## License" in readme


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
