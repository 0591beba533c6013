"""Which inventory paths hold secrets: path patterns the inventory schema declares.

A pattern is a JSON Pointer whose segments may be ``*`` (exactly one segment).
Every value at a matching path must be a sipvault token, and tokens may stand nowhere else.
"""

from __future__ import annotations

import re

from provisioner.errors import InventoryError

TOKEN_PREFIX = "sipvault:"  # noqa: S105 - a format prefix, not a password
_TOKEN_KID = re.compile(r"^sipvault:v[12]:(k[a-z2-7]{8}):")

SECRET_PATH_PATTERNS: tuple[str, ...] = (
    "/users/*/accounts/*/password",
    "/defaults/winrm/password",
    "/groups/*/winrm/password",
    "/workstations/*/winrm/password",
)


SCOPED_PATH_PATTERNS: tuple[str, ...] = tuple(
    p for p in SECRET_PATH_PATTERNS if p.endswith("/winrm/password")
)
"""The WinRM passwords: sealed with a credential scope (``sipvault:v2``, docs/secrets.md)."""


def split_pointer(pointer: str) -> list[str]:
    """Split an RFC 6901 JSON Pointer into unescaped segments."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise InventoryError(f"a path is a JSON Pointer starting with '/', got {pointer[:80]!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def join_pointer(segments: list[str] | tuple[str, ...]) -> str:
    """Build an RFC 6901 JSON Pointer from unescaped segments."""
    joined = "/".join(segments)
    # Fast path: nothing to escape (one '/' per boundary and no '~').
    if "~" not in joined and joined.count("/") == len(segments) - 1:
        return "/" + joined if segments else ""
    return "".join("/" + s.replace("~", "~0").replace("/", "~1") for s in segments)


def _split(patterns: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(p[1:].split("/")) for p in patterns)


_SECRET_SPLIT = _split(SECRET_PATH_PATTERNS)
_SCOPED_SPLIT = _split(SCOPED_PATH_PATTERNS)
_LAST_SEGMENTS = frozenset(p[-1] for p in _SECRET_SPLIT)


def _matches(segments: tuple[str, ...] | list[str], patterns: tuple[tuple[str, ...], ...]) -> bool:
    return any(
        len(wanted) == len(segments)
        and all(w == "*" or w == s for w, s in zip(wanted, segments, strict=True))
        for wanted in patterns
    )


def is_secret_path(segments: tuple[str, ...] | list[str]) -> bool:
    """True when a value at this path must be a sealed token."""
    # Called for every scalar of an inventory: most paths end in a key no pattern ends in.
    if not segments or (segments[-1] not in _LAST_SEGMENTS and "*" not in _LAST_SEGMENTS):
        return False
    return _matches(segments, _SECRET_SPLIT)


def is_scoped_path(segments: tuple[str, ...] | list[str]) -> bool:
    """True for a WinRM password: its token must carry a credential scope."""
    return _matches(segments, _SCOPED_SPLIT)


def token_kid(text: str) -> str:
    """The key id a token names, or "" for anything else (read without the vault's checks)."""
    match = _TOKEN_KID.match(text)
    return match.group(1) if match else ""
