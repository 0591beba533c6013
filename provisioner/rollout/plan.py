"""Pure helpers of the push plan: password markers, redacted copies and masked diffs."""

from __future__ import annotations

import difflib
import hashlib
import hmac
import os
import re

from provisioner.microsip.inidoc import (
    PASSWORD_KEY,
    IniDocument,
    IniEntry,
    IniSection,
    is_password_key,
)

_MARKER = re.compile(r"^\{sha256:([0-9a-f]{32}):([0-9a-f]{64})\}$")


def password_marker(value: str, salt: bytes | None = None) -> str:
    """``{sha256:<salt>:<digest>}``: lets the next push tell whether a password changed."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.sha256(salt + value.encode("utf-8")).hexdigest()
    return f"{{sha256:{salt.hex()}:{digest}}}"


def marker_matches(marker: str | None, value: str) -> bool:
    """True when ``marker`` was made from ``value``."""
    if marker is None:
        return False
    found = _MARKER.match(marker.strip())
    if found is None:
        return False
    expected = password_marker(value, bytes.fromhex(found.group(1)))
    return hmac.compare_digest(expected, marker.strip())


def redact(document: IniDocument) -> IniDocument:
    """A copy whose password values are replaced by salted markers (for the applied copy)."""
    sections = []
    for section in document.sections:
        entries = tuple(
            IniEntry(e.key, password_marker(e.value), e.line) if is_password_key(e.key) else e
            for e in section.entries
        )
        sections.append(IniSection(section.name, entries, section.line))
    return IniDocument(tuple(sections), document.preamble)


def keep_unchanged_passwords(
    ours: IniDocument, base: IniDocument | None, theirs: IniDocument | None
) -> IniDocument:
    """Ours, where each password unchanged since the last push takes the workstation's value.

    MicroSIP replaces a plain password with its own encrypted form at first start; without
    this, every push would see a "changed" password and rewrite the file.
    """
    if base is None or theirs is None:
        return ours
    sections = []
    for section in ours.sections:
        base_section = base.section(section.name)
        their_section = theirs.section(section.name)
        entries = []
        for entry in section.entries:
            if is_password_key(entry.key) and base_section and their_section:
                marker = base_section.get(PASSWORD_KEY)
                their_entry = their_section.entry(PASSWORD_KEY)
                if their_entry is not None and marker_matches(marker, entry.value):
                    entry = IniEntry(entry.key, their_entry.raw_value, entry.line)
            entries.append(entry)
        sections.append(IniSection(section.name, tuple(entries), section.line))
    return IniDocument(tuple(sections), ours.preamble)


def _masked_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        key, sep, _ = line.partition("=")
        if sep and is_password_key(key):
            line = f"{key}=********"
        lines.append(line)
    return lines


def masked_diff(old_text: str | None, new_text: str, label: str) -> str:
    """A unified diff with every password value masked; a changed password is named so."""
    old_lines = _masked_lines(old_text or "")
    new_lines = _masked_lines(new_text)
    diff = list(
        difflib.unified_diff(
            old_lines,
            new_lines,
            fromfile=f"{label} (workstation)" if old_text is not None else "/dev/null",
            tofile=f"{label} (new)",
            lineterm="",
        )
    )
    return "\n".join(diff)


def password_changes(old: IniDocument | None, new: IniDocument) -> list[str]:
    """Sections whose password differs, e.g. ``[Account1] password: changed``."""
    changes = []
    for section in new.sections:
        value = section.get(PASSWORD_KEY)
        if value is None:
            continue
        previous = old.section(section.name) if old is not None else None
        before = previous.get(PASSWORD_KEY) if previous is not None else None
        if before is None:
            changes.append(f"[{section.name}] password: set")
        elif not hmac.compare_digest(before.encode(), value.encode()):
            changes.append(f"[{section.name}] password: changed")
    return changes
