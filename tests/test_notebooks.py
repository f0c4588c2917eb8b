"""Executes the notebooks in notebooks/ (tiny benchmark config) so they cannot rot."""

import base64
import pathlib
import sys
import tempfile

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
kernelspecs = pytest.importorskip("jupyter_client.kernelspec")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
  """A ``python3`` kernelspec that runs this interpreter, ahead of any user-level one."""
  prefix = tmp_path_factory.mktemp("kernel")
  with pytest.MonkeyPatch.context() as mp:
    # install() stages the spec in a mkdtemp() it leaves behind (empty): not in /tmp.
    mp.setattr(tempfile, "tempdir", str(prefix))
    kernelspec.install(kernel_name="python3", prefix=str(prefix))
  return str(prefix / "share" / "jupyter")


def _execute(name, jupyter_path, monkeypatch, tmp_path):
  """Runs every cell of ``notebooks/name`` in a fresh kernel; returns the executed notebook."""
  monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # The kernel's mkdtemp()s land here.
  monkeypatch.setenv("JAXCKPT_NOTEBOOK_SMALL", "1")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
  )
  client.execute()  # Raises CellExecutionError on the first failing cell.
  errors = [
    o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
  ]
  assert not errors, errors
  return nb


def _text(nb) -> str:
  return "".join(
    o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
  )


@pytest.mark.parametrize("name", ["quickstart.ipynb", "benchmark.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_kernel_runs_this_interpreter(jupyter_path):
  manager = kernelspecs.KernelSpecManager(kernel_dirs=[jupyter_path + "/kernels"])
  assert manager.get_kernel_spec("python3").argv[0] == sys.executable


@pytest.mark.slow
def test_quickstart_notebook_runs(jupyter_path, monkeypatch, tmp_path):
  text = _text(_execute("quickstart.ipynb", jupyter_path, monkeypatch, tmp_path))
  assert "committed paths: ['" in text and "ckpt-1'" in text
  assert "WriteCallbackError: " in text and "upload of ckpt-2 failed" in text
  assert "kept: ['ckpt-3', 'ckpt-4', 'ckpt-5']" in text
  assert "assert_consumed failed:" in text
  assert "$ jaxckpt verify" in text and "OK " in text
  assert "resumed losses identical: True" in text


@pytest.mark.slow
def test_benchmark_notebook_plots(jupyter_path, monkeypatch, tmp_path):
  nb = _execute("benchmark.ipynb", jupyter_path, monkeypatch, tmp_path)
  text = _text(nb)
  assert list(tmp_path.rglob("tpu_idle.json"))  # Written under tmp_path, not left in /tmp.
  assert "small configuration" in text and "jaxckpt_async" in text
  images = [
    o["data"]["image/png"]
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if "image/png" in o.get("data", {})
  ]
  assert len(images) == 1
  assert base64.b64decode(images[0]).startswith(b"\x89PNG")
