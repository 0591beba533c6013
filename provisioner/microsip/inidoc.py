"""The logical model of a MicroSIP INI file, with Windows profile-API lookup semantics.

Names are matched case-insensitively, the first section of a name wins, the first key of a
name within a section wins, and one pair of enclosing quotes is stripped from values on lookup
(as ``GetPrivateProfileString`` does). The raw text of every value is kept for round trips.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

PASSWORD_KEY = "password"  # noqa: S105 - the INI key name


def is_password_key(key: str | None) -> bool:
    """True for a ``password`` key as the profile API finds it (any case, spaces around)."""
    return key is not None and key.strip().lower() == PASSWORD_KEY


def unquote(raw: str) -> str:
    """Strip one pair of enclosing double or single quotes, as the profile API does."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


@dataclass(frozen=True)
class IniEntry:
    """One line of a section: a ``key=value`` pair, or a comment when ``key`` is None."""

    key: str | None
    raw_value: str
    line: int = 0

    @property
    def value(self) -> str:
        """The value as MicroSIP reads it."""
        return unquote(self.raw_value)


@dataclass(frozen=True)
class IniSection:
    """A ``[name]`` section and its lines in file order."""

    name: str
    entries: tuple[IniEntry, ...] = ()
    line: int = 0

    def keys(self) -> Iterator[IniEntry]:
        """Key entries in file order, comments skipped."""
        return (e for e in self.entries if e.key is not None)

    def entry(self, key: str) -> IniEntry | None:
        """The first entry for ``key`` (case-insensitive), or None."""
        wanted = key.lower()
        for candidate in self.keys():
            if candidate.key is not None and candidate.key.lower() == wanted:
                return candidate
        return None

    def get(self, key: str, default: str | None = None) -> str | None:
        """The unquoted value of ``key`` as MicroSIP would read it."""
        found = self.entry(key)
        return default if found is None else found.value


@dataclass(frozen=True)
class IniDocument:
    """A whole INI file: sections in file order (duplicates kept, first one wins on lookup).

    ``preamble`` holds comment lines before the first section.
    """

    sections: tuple[IniSection, ...] = ()
    preamble: tuple[IniEntry, ...] = field(default=())

    def section(self, name: str) -> IniSection | None:
        """The first section called ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for candidate in self.sections:
            if candidate.name.lower() == wanted:
                return candidate
        return None

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        """The value of ``key`` in ``section`` as MicroSIP would read it."""
        found = self.section(section)
        return default if found is None else found.get(key, default)
