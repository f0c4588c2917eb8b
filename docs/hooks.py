"""MkDocs hooks: generate the Performance page and check the API reference before each build."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent


def public_names() -> list[str]:
  """``jaxckpt.__all__``, read from the source without importing JAX."""
  tree = ast.parse((ROOT / "src" / "jaxckpt" / "__init__.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
    ):
      return list(ast.literal_eval(node.value))
  raise PluginError("src/jaxckpt/__init__.py defines no __all__.")


def documented_names() -> list[str]:
  """The names ``docs/api.md`` renders with ``::: jaxckpt.NAME``."""
  return re.findall(r"^::: jaxckpt\.(\w+)\s*$", (DOCS / "api.md").read_text(), re.M)


def check_api_reference() -> None:
  """Fails the build if a name in ``__all__`` has no reference entry, or an entry no name."""
  public, documented = set(public_names()), documented_names()
  missing = sorted(public - set(documented))
  extra = sorted(set(documented) - public)
  twice = sorted({n for n in documented if documented.count(n) > 1})
  if missing or extra or twice:
    raise PluginError(
      f"docs/api.md does not match jaxckpt.__all__: missing {missing}, not public {extra}, "
      f"listed twice {twice}."
    )


def on_pre_build(config, **kwargs) -> None:
  check_api_reference()
  spec = importlib.util.spec_from_file_location("gen_performance", DOCS / "gen_performance.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main()
