"""Values that cross module borders."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

_MASK = "Secret(***)"


class Secret:
    """A decrypted value that masks itself everywhere except :meth:`reveal`.

    ``repr``, ``str`` and ``format`` print ``Secret(***)``; pickling and copying raise;
    ``json.dumps`` refuses it like any foreign object. Only the renderer calls ``reveal``.
    """

    __slots__ = ("_plain",)
    _plain: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_plain", value)

    def reveal(self) -> str:
        """The plaintext. Call only where the value is written to its destination."""
        return self._plain

    def __repr__(self) -> str:
        return _MASK

    def __str__(self) -> str:
        return _MASK

    def __format__(self, format_spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._plain.encode(), other._plain.encode())

    __hash__ = None  # type: ignore[assignment]

    def matches_text(self, text: str) -> bool:
        """True when ``text`` is the plaintext. Not constant-time: for checks of our own output."""
        return self._plain == text

    def occurs_in(self, text: str) -> bool:
        """True when the plaintext stands anywhere in ``text`` (whole, for short ones).

        Not constant-time: for checks of our own output. A short secret (a 4-digit PIN) would
        be "found" in unrelated text such as a number or a host name, so it must match whole.
        """
        if len(self._plain) < 8:
            return self._plain == text
        return self._plain in text

    def count_in(self, text: str) -> int:
        """How many times the plaintext stands in ``text`` (for checks of our own output)."""
        return text.count(self._plain)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or copied")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or copied")

    def __len__(self) -> int:
        return len(self._plain)


# --------------------------------------------------------------------------- inventory model

Scalar = str | int | bool | float | None
Value = Scalar | tuple[str, ...] | Secret


@dataclass(frozen=True, slots=True)
class Source:
    """Where a value was written: file, line, column and the layer it belongs to."""

    file: str
    line: int
    column: int
    layer: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where} ({self.layer})" if self.layer else where


# The layer of a Source that is a template line (a template error), not an inventory value.
TEMPLATE_LAYER = "template"


@dataclass(frozen=True, slots=True)
class Sourced:
    """A value and where it came from; ``token`` is the sealed text for secret fields."""

    value: Value
    source: Source
    pointer: str = ""


Block = Mapping[str, Sourced]


@dataclass(frozen=True)
class Layer:
    """The configuration blocks one inventory entity contributes."""

    settings: Block = field(default_factory=dict)
    account: Block = field(default_factory=dict)
    enforced_settings: Block = field(default_factory=dict)
    enforced_account: Block = field(default_factory=dict)
    winrm: Block = field(default_factory=dict)
    microsip: Block = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """A site, department or any other set of workstations or users."""

    name: str
    parents: tuple[str, ...]
    layer: Layer
    source: Source
    description: str = ""


@dataclass(frozen=True)
class SipAccount:
    """One SIP account of a user, keyed by a stable id."""

    id: str
    active: bool
    keys: Block
    source: Source


@dataclass(frozen=True)
class User:
    """A Windows user and their SIP accounts."""

    name: str
    windows: str
    display_name: str
    groups: tuple[str, ...]
    workstations: tuple[str, ...]
    layer: Layer
    accounts: tuple[SipAccount, ...]
    source: Source


@dataclass(frozen=True)
class Workstation:
    """A Windows workstation (or RDS host) and the users who use MicroSIP on it."""

    name: str
    address: str
    groups: tuple[str, ...]
    users: tuple[str, ...]
    layer: Layer
    source: Source
    description: str = ""


@dataclass(frozen=True)
class Inventory:
    """A whole inventory directory, merged into one namespace and cross-checked."""

    root: str
    defaults: Layer
    groups: Mapping[str, Group]
    workstations: Mapping[str, Workstation]
    users: Mapping[str, User]
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found by validation, with where it is. Never holds a secret value."""

    severity: str
    code: str
    message: str
    file: str = ""
    line: int = 0
    column: int = 0
    path: str = ""
    # For a finding on a rendered file: the inventory or template line it comes from, where
    # known (CI annotations point there, at a file of the repository).
    source: Source | None = None

    @property
    def value_source(self) -> bool:
        """True when ``source`` is where a rendered value was set in the inventory.

        False for a template line (a template error's message names that line already).
        """
        return self.source is not None and self.source.layer != TEMPLATE_LAYER

    @property
    def where(self) -> str:
        """``file:line:column`` (as much as is known)."""
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        return where

    def to_dict(self) -> dict[str, object]:
        """The finding as JSON data (``validate`` and ``secrets lint`` ``--format json``)."""
        source = self.source
        return {
            "severity": self.severity,
            "code": self.code,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
            "source": (
                {"file": source.file, "line": source.line, "column": source.column}
                if source
                else None
            ),
        }

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        at = f" {self.path}:" if self.path else ""
        origin = f" (value set at {self.source})" if self.value_source else ""
        return f"{prefix}{self.severity}[{self.code}]:{at} {self.message}{origin}"
