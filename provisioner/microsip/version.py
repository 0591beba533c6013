"""MicroSIP's version, as a workstation reports it and as the inventory and key table name it.

A version read on a workstation comes from the version resource of ``microsip.exe``, i.e. from
whoever controls that file (a per-user install is the user's): it is parsed strictly (digits
and dots, bounded) and never shown raw; what does not parse is ``unreadable``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_VERSION_CHARS = 32
"""The longest version text taken: four parts of at most five digits fit well within it."""

UNREADABLE = "unreadable"
"""How a version that is missing or does not parse is shown."""

_VERSION = re.compile(r"[0-9]{1,5}(?:\.[0-9]{1,5}){0,3}")
_RESOURCE_SEPARATOR = re.compile(r", ?")


@dataclass(frozen=True, order=True)
class Version:
    """A dotted version (``3.21.6``), compared part by part; missing parts count as 0."""

    parts: tuple[int, ...]

    def __str__(self) -> str:
        return ".".join(str(part) for part in self.parts)

    def _padded(self) -> tuple[int, ...]:
        return self.parts + (0,) * (4 - len(self.parts))

    def below(self, other: Version) -> bool:
        """Whether this version is older than ``other`` (``3.21`` equals ``3.21.0``)."""
        return self._padded() < other._padded()


def parse_version(text: object) -> Version | None:
    """``text`` as a version, or None unless it is 1 to 4 dot-separated numbers (ASCII only,
    no spaces, at most :data:`MAX_VERSION_CHARS` characters)."""
    if not isinstance(text, str) or len(text) > MAX_VERSION_CHARS:
        return None
    if _VERSION.fullmatch(text) is None:
        return None
    return Version(tuple(int(part) for part in text.split(".")))


def parse_exe_version(text: object) -> Version | None:
    """A version resource's ``FileVersion`` text as a version: dotted (``3.22.3``) or in the
    comma form older Visual Studio resource templates write (``3, 22, 3, 0``); else None."""
    if isinstance(text, str) and len(text) <= MAX_VERSION_CHARS and "," in text:
        text = _RESOURCE_SEPARATOR.sub(".", text)
    return parse_version(text)


def shown(version: Version | None) -> str:
    """What a report or terminal may print for a version read on a workstation."""
    return UNREADABLE if version is None else str(version)


def version_order(text: str) -> tuple[int, tuple[int, ...]]:
    """A sort key for shown versions: oldest first, ``unreadable`` (or anything else) last."""
    parsed = parse_version(text)
    return (1, ()) if parsed is None else (0, parsed.parts)
