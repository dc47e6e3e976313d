"""The controller's modules import only the modules listed above them in the package docstring (so the list in
stadi_operator/controller/__init__.py stays the true reading order, and no import cycle can form)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import stadi_operator.controller as controller

PACKAGE = Path(controller.__file__).parent


def listed() -> list[str]:
    """The modules in the docstring's order."""
    return re.findall(r"^- ``(\w+)``:", controller.__doc__ or "", flags=re.MULTILINE)


def controller_imports(module: str) -> set[str]:
    """The controller modules ``module`` imports (at the top or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "stadi_operator.controller":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stadi_operator.controller."):
            found.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("stadi_operator.controller.")}
    return found


def test_every_module_is_listed_once() -> None:
    assert sorted(listed()) == sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_imports_point_up_the_list() -> None:
    order = listed()
    for i, module in enumerate(order):
        assert controller_imports(module) <= set(order[:i]), f"{module} imports {controller_imports(module)}"
