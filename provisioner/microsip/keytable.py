"""The MicroSIP ini key table: every key MicroSIP reads, as data (``microsip_keys.toml``).

Layer 1: stdlib and :mod:`provisioner.errors` only. Lookups are case-insensitive, like the
Windows profile API; ``[AccountN]`` for any N (including the local ``[Account0]``) maps to the
account table.
"""

from __future__ import annotations

import difflib
import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Final

from provisioner.errors import KeyTableError
from provisioner.microsip.version import parse_version

KEY_TYPES: Final = frozenset(
    {"bool01", "int", "string", "enum", "list", "path", "url", "command", "codecs", "shortcut"}
)
OWNERS: Final = frozenset({"managed", "runtime"})
TABLE_SECTIONS: Final = ("Settings", "Account", "Shortcuts")

_DATA_FILE: Final = "microsip_keys.toml"
_ACCOUNT_RE: Final = re.compile(r"account(0|[1-9][0-9]*)", re.IGNORECASE)
_SUGGEST_CUTOFF: Final = 0.7


def account_index(section_name: str) -> int | None:
    """The N of an ``[AccountN]`` section name (case-insensitive), or None.

    MicroSIP formats names with ``Account%d``, so ``Account01`` is not an account section.
    """
    match = _ACCOUNT_RE.fullmatch(section_name.strip())
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class KeySpec:
    """One key MicroSIP reads: where it lives, its type and limits, and who owns it."""

    section: str
    key: str
    type: str
    owner: str
    max_len: int
    note: str = ""
    allowed: tuple[str, ...] = ()
    default: str | None = None
    min: int | None = None
    max: int | None = None
    since: str | None = None
    removed: str | None = None
    required: bool = False
    password_macros: tuple[str, ...] = ()
    """Placeholders MicroSIP replaces with (a form of) the active account's password."""
    format_args: tuple[str, ...] = ()
    """What MicroSIP's printf-style ``%s`` placeholders in the value receive, in order."""

    @property
    def is_runtime(self) -> bool:
        """True when MicroSIP rewrites the key itself, so a renderer must not manage it."""
        return self.owner == "runtime"


@dataclass(frozen=True)
class NonKey:
    """A name seen in published scripts that MicroSIP does not read, with what to do instead."""

    key: str
    sections: tuple[str, ...]
    suggest: str | None
    reason: str


@dataclass(frozen=True)
class KeyTable:
    """All key specs, known non-keys and runtime sections, with case-insensitive lookups."""

    specs: tuple[KeySpec, ...]
    non_keys: tuple[NonKey, ...] = ()
    runtime_section_names: tuple[str, ...] = ()
    shortcut_types: tuple[str, ...] = ()
    codec_ids: tuple[str, ...] = ()
    _by_key: Mapping[tuple[str, str], KeySpec] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _non_by_key: Mapping[tuple[str, str], NonKey] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _runtime_keys: frozenset[tuple[str, str]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        by_key: dict[tuple[str, str], KeySpec] = {}
        for spec in self.specs:
            ident = (spec.section.lower(), spec.key.lower())
            if ident in by_key:
                raise KeyTableError(f"{_DATA_FILE}: duplicate key [{spec.section}] {spec.key}")
            by_key[ident] = spec
        non_by_key: dict[tuple[str, str], NonKey] = {}
        for non in self.non_keys:
            for section in non.sections:
                ident = (section.lower(), non.key.lower())
                if ident in by_key:
                    raise KeyTableError(
                        f"{_DATA_FILE}: [{section}] {non.key} is both a key and a non-key"
                    )
                non_by_key[ident] = non
        runtime = frozenset(
            ident for ident, spec in by_key.items() if spec.is_runtime and ident[0] == "settings"
        )
        # The dataclass is frozen; these derived indexes are filled in once, here.
        object.__setattr__(self, "_by_key", MappingProxyType(by_key))
        object.__setattr__(self, "_non_by_key", MappingProxyType(non_by_key))
        object.__setattr__(self, "_runtime_keys", runtime)

    def table_section(self, section: str) -> str | None:
        """``Settings``, ``Account`` or ``Shortcuts`` for a section name, else None."""
        name = section.strip()
        if account_index(name) is not None or name.lower() == "account":
            return "Account"
        for known in ("Settings", "Shortcuts"):
            if name.lower() == known.lower():
                return known
        return None

    def is_runtime_section(self, section: str) -> bool:
        """True for sections MicroSIP writes at run time ([Calls], [Dialed], [Contacts])."""
        return section.strip().lower() in self.runtime_sections()

    def keys(self, section: str) -> tuple[KeySpec, ...]:
        """The specs of one table section, in table order."""
        table = self.table_section(section)
        return tuple(spec for spec in self.specs if spec.section == table)

    def lookup(self, section: str, key: str) -> KeySpec | None:
        """The spec of ``key`` in ``section`` (case-insensitive), or None if MicroSIP ignores it."""
        table = self.table_section(section)
        if table is None:
            return None
        return self._by_key.get((table.lower(), key.strip().lower()))

    def runtime_keys(self) -> frozenset[tuple[str, str]]:
        """Lower-cased ``("settings", key)`` pairs of the [Settings] keys MicroSIP rewrites."""
        return self._runtime_keys

    def runtime_sections(self) -> frozenset[str]:
        """Lower-cased names of the sections MicroSIP writes at run time."""
        return frozenset(name.lower() for name in self.runtime_section_names)

    def non_key_spec(self, section: str, key: str) -> NonKey | None:
        """The known non-key entry for ``key`` in ``section``, or None."""
        table = self.table_section(section)
        if table is None:
            return None
        return self._non_by_key.get((table.lower(), key.strip().lower()))

    def non_key(self, section: str, key: str) -> str | None:
        """Why ``key`` is a known non-key in ``section`` (one phrase), or None."""
        non = self.non_key_spec(section, key)
        return None if non is None else non.reason

    def suggest(self, section: str, key: str) -> str | None:
        """What to write instead of an unknown or non-key ``key``, or None.

        Known non-keys give their documented replacement; a key of the other section gives
        ``[Settings] key`` or ``[AccountN] key``; otherwise the closest key of the section.
        """
        non = self.non_key_spec(section, key)
        if non is not None:
            return non.suggest
        table = self.table_section(section)
        if table is None or self.lookup(section, key) is not None:
            return None
        wanted = key.strip().lower()
        for other, shown in (("Settings", "[Settings]"), ("Account", "[AccountN]")):
            spec = self._by_key.get((other.lower(), wanted))
            if other != table and spec is not None:
                return f"{shown} {spec.key}"
        names = {spec.key.lower(): spec.key for spec in self.keys(table)}
        close = difflib.get_close_matches(wanted, list(names), n=1, cutoff=_SUGGEST_CUTOFF)
        return names[close[0]] if close else None


@functools.cache
def load_key_table() -> KeyTable:
    """The key table shipped as package data (loaded once)."""
    try:
        text = (
            resources.files("provisioner.microsip").joinpath(_DATA_FILE).read_text(encoding="utf-8")
        )
    except OSError:
        # A stale editable install can expose `provisioner` as a namespace package, for which
        # Python 3.11's resource reader raises NotADirectoryError; the file sits next to us.
        try:
            text = Path(__file__).with_name(_DATA_FILE).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyTableError(f"{_DATA_FILE}: cannot read the key table: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeyTableError(f"{_DATA_FILE}: not valid TOML: {exc}") from exc
    return key_table_from_data(data)


def key_table_from_data(data: Mapping[str, object]) -> KeyTable:
    """Build and validate a :class:`KeyTable` from the parsed TOML document."""
    specs = tuple(_spec_from_row(row, f"key #{n}") for n, row in enumerate(_tables(data, "key"), 1))
    non_keys = tuple(
        _non_key_from_row(row, f"non_key #{n}") for n, row in enumerate(_tables(data, "non_key"), 1)
    )
    return KeyTable(
        specs=specs,
        non_keys=non_keys,
        runtime_section_names=_strings(data, "runtime_sections", "top level"),
        shortcut_types=_strings(data, "shortcut_types", "top level"),
        codec_ids=_strings(data, "codec_ids", "top level"),
    )


def _spec_from_row(row: Mapping[str, object], where: str) -> KeySpec:
    spec = KeySpec(
        section=_text(row, "section", where),
        key=_text(row, "key", where),
        type=_text(row, "type", where),
        owner=_text(row, "owner", where),
        max_len=_integer(row, "max_len", where) or 0,
        note=_text(row, "note", where, default=""),
        allowed=_strings(row, "allowed", where) if "allowed" in row else (),
        default=_text(row, "default", where) if "default" in row else None,
        min=_integer(row, "min", where),
        max=_integer(row, "max", where),
        since=_text(row, "since", where) if "since" in row else None,
        removed=_text(row, "removed", where) if "removed" in row else None,
        required=_flag(row, "required", where),
        password_macros=_strings(row, "password_macros", where),
        format_args=_strings(row, "format_args", where),
    )
    where = f"{where} ([{spec.section}] {spec.key})"
    if spec.section not in TABLE_SECTIONS:
        raise KeyTableError(f"{_DATA_FILE}: {where}: unknown section {spec.section!r}")
    if spec.type not in KEY_TYPES:
        raise KeyTableError(f"{_DATA_FILE}: {where}: unknown type {spec.type!r}")
    if spec.owner not in OWNERS:
        raise KeyTableError(f"{_DATA_FILE}: {where}: unknown owner {spec.owner!r}")
    if spec.max_len <= 0:
        raise KeyTableError(f"{_DATA_FILE}: {where}: max_len must be positive")
    if (spec.type == "enum") != bool(spec.allowed):
        raise KeyTableError(f"{_DATA_FILE}: {where}: allowed values are for enums only")
    for name, version in (("since", spec.since), ("removed", spec.removed)):
        # Compared with the versions workstations report and microsip.min_version.
        if version is not None and parse_version(version) is None:
            raise KeyTableError(f"{_DATA_FILE}: {where}: {name} {version!r} is not a version")
    return spec


def _non_key_from_row(row: Mapping[str, object], where: str) -> NonKey:
    sections = _strings(row, "sections", where)
    for section in sections:
        if section not in TABLE_SECTIONS:
            raise KeyTableError(f"{_DATA_FILE}: {where}: unknown section {section!r}")
    return NonKey(
        key=_text(row, "key", where),
        sections=sections,
        suggest=_text(row, "suggest", where, default="") or None,
        reason=_text(row, "reason", where),
    )


def _tables(data: Mapping[str, object], name: str) -> list[Mapping[str, object]]:
    rows = data.get(name, [])
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise KeyTableError(f"{_DATA_FILE}: {name} must be an array of tables")
    return rows


def _text(row: Mapping[str, object], name: str, where: str, *, default: str | None = None) -> str:
    value = row.get(name, default)
    if not isinstance(value, str):
        raise KeyTableError(f"{_DATA_FILE}: {where}: {name} must be a string")
    return value


def _strings(row: Mapping[str, object], name: str, where: str) -> tuple[str, ...]:
    value = row.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise KeyTableError(f"{_DATA_FILE}: {where}: {name} must be a list of strings")
    return tuple(value)


def _integer(row: Mapping[str, object], name: str, where: str) -> int | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise KeyTableError(f"{_DATA_FILE}: {where}: {name} must be an integer")
    return value


def _flag(row: Mapping[str, object], name: str, where: str) -> bool:
    value = row.get(name, False)
    if not isinstance(value, bool):
        raise KeyTableError(f"{_DATA_FILE}: {where}: {name} must be true or false")
    return value
