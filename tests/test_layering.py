"""The import direction of DESIGN.md: updater and rpc import none of the others, transports may use
rpc, services may use rpc and updater; the CLI (rpc/cli) and conformance may use everything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rpc", "services", "transports", "updater", "conformance"}
ALLOWED = {
    "updater": set(),
    "rpc": set(),
    "transports": {"rpc"},
    "services": {"rpc", "updater"},
    "conformance": PACKAGES,
    "rpc/cli": PACKAGES,
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & PACKAGES


def _rule(path: Path) -> tuple[str, set[str]]:
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("rpc/cli/"):
        return "rpc/cli", ALLOWED["rpc/cli"]
    pkg = rel.split("/")[0]
    return pkg, ALLOWED[pkg] | {pkg}


FILES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "test" not in p.name or pkg != "conformance")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_import_direction(path: Path) -> None:
    pkg, allowed = _rule(path)
    bad = _imports(path) - allowed
    assert not bad, f"{path.relative_to(ROOT)} ({pkg}) imports {sorted(bad)}"
