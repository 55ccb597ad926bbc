"""Every check cites sections of the repository's protocol reference (docs/protocol/) that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import conformance.checks  # noqa: F401  (registers the device checks)
from conformance import clientcheck
from conformance.model import CHECKS, citations, cite
from conformance.runner import PREFLIGHT_SECTION

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol"


def _anchors(path: Path) -> set[str]:
    """Section numbers (headings ``## 1.2 ...``, items ``**7.4**``) and observation ids (``**RD-S7**``)."""
    text = path.read_text()
    found = set(re.findall(r"^#{1,6}\s+(\d+(?:\.\d+)*)[.\s]", text, flags=re.M))
    found |= set(re.findall(r"\*\*(\d+(?:\.\d+)*)\*\*", text))
    found |= set(re.findall(r"\*\*(RD-[A-Z]\d+)\*\*", text))
    return found


def _all_sections() -> dict[str, str]:
    out = {name: spec.section for name, spec in CHECKS.items()}
    out.update({f"client.{spec.name}": spec.section for spec in clientcheck.CLIENT_CHECKS})
    out["preflight"] = PREFLIGHT_SECTION
    return out


@pytest.mark.parametrize(("name", "section"), sorted(_all_sections().items()))
def test_check_cites_an_existing_section(name: str, section: str) -> None:
    cited = citations(section)
    assert cited, f"{name} cites nothing: {section!r}"
    for file, anchor in cited:
        assert file, f"{name}: {section!r} names no file"
        path = DOCS / file
        assert path.exists(), f"{name} cites {file}, which is not in docs/protocol/"
        assert anchor in _anchors(path), f"{name} cites {file} §{anchor}, which has no such section"


def test_citations_parse_files_ranges_and_observations() -> None:
    assert citations("frames.md §1.2, §9; tool.md §4") == [("frames.md", "1.2"), ("frames.md", "9"), ("tool.md", "4")]
    assert citations("ota.md §1.2-§1.4, §2") == [("ota.md", "1.2"), ("ota.md", "1.4"), ("ota.md", "2")]
    assert citations("transports.md §1.2 (1); real-device.md RD-S7") == [
        ("transports.md", "1.2"),
        ("real-device.md", "RD-S7"),
    ]


def test_reports_print_the_repository_path() -> None:
    assert cite("frames.md §1.2") == "docs/protocol/frames.md §1.2"
    assert cite("frames.md §2; transports.md §2.6") == "docs/protocol/frames.md §2; docs/protocol/transports.md §2.6"
    assert cite("docs/protocol/frames.md §1") == "docs/protocol/frames.md §1"


def test_no_check_cites_the_notes_outside_the_repository() -> None:
    for name, section in _all_sections().items():
        assert "frame.md" not in section.replace("frames.md", ""), (name, section)
        assert "spec/" not in section and "errata" not in section, (name, section)
