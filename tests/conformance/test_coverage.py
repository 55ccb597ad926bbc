"""docs/protocol/coverage.md is complete and true: every statement of the protocol reference has a
row, every check it names exists, and its figures add up."""

from __future__ import annotations

import re
from pathlib import Path

import conformance.checks  # noqa: F401  (registers the device checks)
from conformance import clientcheck
from conformance.model import CHECKS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol"
FILES = ("frames.md", "transports.md", "ota.md", "updater.md", "tool.md", "jsonrpc.md")
STEPS = {("transports.md", "1.2"), ("updater.md", "5")}  # sections whose numbered steps are statements


def _statements() -> set[str]:
    """Statement ids of the reference: lettered items, numbered steps (STEPS), jsonrpc.md sections."""
    out: set[str] = set()
    for f in FILES:
        sec = ""
        for line in (DOCS / f).read_text().splitlines():
            m = re.match(r"^#{1,6}\s+(\d+(?:\.\d+)*)[.\s]", line)
            if m:
                sec = m.group(1)
                if f == "jsonrpc.md" and "." not in sec:
                    out.add(f"jsonrpc.md §{sec}")
            out.update(f"{f} {sid}" for sid in re.findall(r"\*\*(§[\d.]+-[a-z]+)\*\*", line))
            step = re.match(r"^(\d)\. ", line)
            if step and (f, sec) in STEPS:
                out.add(f"{f} §{sec} ({step.group(1)})")
    return out


def _rows() -> dict[str, str]:
    """coverage.md's rows: statement id -> the 'checked by' cell."""
    rows: dict[str, str] = {}
    file = ""
    for line in (DOCS / "coverage.md").read_text().splitlines():
        head = re.match(r"^## (\S+\.md)$", line)
        if head:
            file = head.group(1)
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if file and len(cells) == 3 and cells[0].startswith("§"):
            key = f"{file} {cells[0]}"
            assert key not in rows, f"{key} has two rows"
            rows[key] = cells[2]
    return rows


def test_every_statement_has_one_row() -> None:
    rows, statements = _rows(), _statements()
    assert not statements - set(rows), f"statements without a row in coverage.md: {sorted(statements - set(rows))}"
    assert not set(rows) - statements, f"rows for statements that do not exist: {sorted(set(rows) - statements)}"


def test_named_checks_exist_and_every_row_says_something() -> None:
    known = set(CHECKS) | {f"client.{c.name}" for c in clientcheck.CLIENT_CHECKS}
    for key, cell in _rows().items():
        named = re.findall(r"`([a-z0-9_]+\.[a-z0-9_]+)`", cell)
        if cell.startswith(("**not checked**:", "not testable:")):
            assert len(cell.split(":", 1)[1].strip()) > 10, f"{key}: say why"
        else:
            assert named, f"{key}: neither checks nor a reason: {cell!r}"
            assert set(named) <= known, f"{key} names unknown checks {sorted(set(named) - known)}"


def test_figures_add_up() -> None:
    text = (DOCS / "coverage.md").read_text()
    rows = _rows()
    checked = sum(1 for c in rows.values() if not c.startswith(("**not checked**:", "not testable:")))
    testable = sum(1 for c in rows.values() if not c.startswith("not testable:"))
    m = re.search(
        r"\*\*(\d+) of (\d+) testable statements are checked \((\d+) %\); (\d+) statements in all\.\*\*", text
    )
    assert m, "the summary line is missing"
    assert (int(m.group(1)), int(m.group(2)), int(m.group(4))) == (checked, testable, len(rows))
    assert int(m.group(3)) == 100 * checked // testable
    for f in FILES:
        mine = {k: c for k, c in rows.items() if k.startswith(f + " ")}
        want = (
            len(mine),
            sum(1 for c in mine.values() if not c.startswith("not testable:")),
            sum(1 for c in mine.values() if not c.startswith(("**not checked**:", "not testable:"))),
        )
        assert f"| {f} | {want[0]} | {want[1]} | {want[2]} |" in text, (f, want)
