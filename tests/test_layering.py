"""The import direction of DESIGN.md, one row per package: ``updater`` and ``rpc`` import none of the
others, ``transports`` may use ``rpc``, ``services`` may use ``rpc`` and ``updater``, ``conformance``
may use ``rpc``, ``transports`` and ``updater``; ``mgrpc`` (the application) may use everything and
nothing imports it. ``print`` is for the application alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED: dict[str, set[str]] = {
    "updater": set(),
    "rpc": set(),
    "transports": {"rpc"},
    "services": {"rpc", "updater"},
    "conformance": {"rpc", "transports", "updater"},
    "mgrpc": {"rpc", "transports", "services", "updater", "conformance"},
}
PACKAGES = set(ALLOWED)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _imports(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & PACKAGES


FILES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _id(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_import_direction(path: Path) -> None:
    pkg = _id(path).split("/")[0]
    bad = _imports(_tree(path)) - ALLOWED[pkg] - {pkg}
    assert not bad, f"{_id(path)} ({pkg}) imports {sorted(bad)}"


@pytest.mark.parametrize("path", [p for p in FILES if not _id(p).startswith("mgrpc/")], ids=_id)
def test_libraries_do_not_print(path: Path) -> None:
    calls = [
        n.lineno for n in ast.walk(_tree(path))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
    ]  # fmt: skip
    assert not calls, f"{_id(path)} calls print() on lines {calls}; only the application (mgrpc/) prints"
