"""docs/architecture.md and the README's layout table match the tree: every module is described, and every path
they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = [ROOT / "stadi", ROOT / "worker" / "stadi_worker", ROOT / "operator" / "stadi_operator",
            ROOT / "bench" / "stadi_bench"]


def described(text: str, package: Path, module: Path) -> bool:
    """Whether ``text`` names the module: its path in the package, its file name, or a folder holding it."""
    rel = module.relative_to(package)
    folders = [f"`{'/'.join(rel.parts[:i])}/`" for i in range(1, len(rel.parts))]
    names = [f"`{rel.as_posix()}`", f"{module.name}`", f"`{module.stem}`", f", {module.name}"]
    return any(n in text for n in names + folders)


def modules() -> list[tuple[Path, Path]]:
    return [(pkg, path) for pkg in PACKAGES for path in sorted(pkg.rglob("*.py")) if path.name != "__init__.py"]


@pytest.mark.parametrize(("package", "module"), modules(), ids=lambda p: p.name if isinstance(p, Path) else str(p))
def test_every_module_is_in_the_architecture(package: Path, module: Path) -> None:
    assert described(DOC.read_text(), package, module), f"{module.relative_to(ROOT)} is not in {DOC.name}"


def _table_paths(text: str) -> list[str]:
    """The backticked paths in the first column of markdown tables."""
    found = []
    for line in text.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            found += [p for p in re.findall(r"`([^`]+)`", first) if "/" in p or p.endswith(".py")]
    return found


def test_every_path_the_architecture_names_exists() -> None:
    missing = []
    for name in _table_paths(DOC.read_text()):
        bases = [ROOT, *PACKAGES, *(p / d for p in PACKAGES for d in ("models", "engine", "job", "cli", "controller"))]
        if not any((base / name.rstrip("/")).exists() for base in bases):
            missing.append(name)
    assert missing == []


def test_the_readme_layout_names_existing_paths() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = _table_paths(layout)
    assert paths and all((ROOT / p.rstrip("/")).exists() for p in paths), paths
