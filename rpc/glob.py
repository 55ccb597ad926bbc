"""Mongoose glob matching of method names, as rpc-common uses it for handlers and ACL entries.

``*`` matches any run of characters, ``?`` one character, ``|`` separates alternatives; the whole
name must match; comparison is case-insensitive (spec/frame.md §3).
"""

from __future__ import annotations

import functools
import re

__all__ = ["glob_match", "is_glob"]


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    alts = []
    for alt in pattern.split("|"):
        out = []
        for ch in alt:
            if ch == "*":
                out.append(".*")
            elif ch == "?":
                out.append(".")
            else:
                out.append(re.escape(ch))
        alts.append("".join(out))
    return re.compile("(?:" + "|".join(alts) + ")", re.IGNORECASE | re.DOTALL)


def glob_match(pattern: str, name: str) -> bool:
    """True if ``name`` matches the mongoose glob ``pattern`` (case-insensitive, whole name)."""
    return _compile(pattern).fullmatch(name) is not None


def is_glob(pattern: str) -> bool:
    """True if ``pattern`` contains glob syntax (so it is not a plain method name)."""
    return any(c in pattern for c in "*?|")
