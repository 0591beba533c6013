"""MicroSIP INI codec (profile-API semantics, UTF-16LE/BOM/CRLF) and the three-way merge.

Reading follows what MicroSIP sees through ``GetPrivateProfileString``: names are
case-insensitive, the first section and the first key of a name win, one pair of enclosing
quotes is stripped on lookup (see :mod:`provisioner.microsip.inidoc`).

Canonical text written by :func:`serialize_ini`: comment lines of the preamble, then every
section as a ``[name]`` header followed by its lines (``key=value`` without spaces around
``=``, comments verbatim); no blank lines (MicroSIP writes none); every line ends with CRLF,
the last one included; an empty document is the empty string.

Merged documents (:func:`merge_ini`, :func:`reset_ini`) carry line numbers that are their
positions in that canonical text, so ``parse_ini(serialize_ini(result)) == result``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

from provisioner.errors import LintError
from provisioner.microsip.inidoc import IniDocument, IniEntry, IniSection
from provisioner.microsip.keytable import account_index, load_key_table

__all__ = [
    "UTF8_BOM",
    "UTF16LE_BOM",
    "MergeConflict",
    "MergeResult",
    "decode_ini_bytes",
    "encode_ini",
    "has_utf8_bom",
    "is_account_section",
    "merge_ini",
    "normalize_line_endings",
    "parse_ini",
    "reset_ini",
    "serialize_ini",
]

UTF16LE_BOM = b"\xff\xfe"
UTF8_BOM = b"\xef\xbb\xbf"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SURROGATE = re.compile("[\ud800-\udfff]")
_COMMENT_START = (";", "#")


# --------------------------------------------------------------------------- parsing


class _Line(NamedTuple):
    """One physical line classified: ``kind`` is header, key, comment or ignored.

    A named tuple: parsing builds one per line, and a frozen dataclass costs five times more.
    """

    kind: str
    name: str = ""
    value: str = ""


_IGNORED = _Line("ignored")


def _classify(line: str) -> _Line:
    text = line.strip()
    if not text:
        return _IGNORED
    if text.startswith(_COMMENT_START):
        return _Line("comment", value=text)
    if text.startswith("["):
        end = text.find("]")
        # Without a closing bracket the profile API does not see a header; the line may still
        # be read as a key below.
        if end != -1:
            return _Line("header", name=text[1:end].strip())
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        return _IGNORED
    return _Line("key", name=key, value=value.strip())


def parse_ini(text: str) -> IniDocument:
    """Parse INI text the way the Windows profile API reads it.

    Blank lines, lines without ``=`` and key lines before the first section are dropped, as
    Windows ignores them; comments before the first section go to ``preamble``.
    """
    preamble: list[IniEntry] = []
    sections: list[IniSection] = []
    name = ""
    header_line = 0
    entries: list[IniEntry] = []
    in_section = False
    # The rules of _classify, inlined: Phase 1 parses every rendered file (a call and a tuple
    # per line were a third of the parse).
    for number, raw in enumerate(_LINE_BREAK.split(text), start=1):
        line = raw.strip()
        if not line:
            continue
        first = line[0]
        if first == ";" or first == "#":
            (entries if in_section else preamble).append(IniEntry(None, line, number))
            continue
        if first == "[":
            end = line.find("]")
            if end != -1:
                if in_section:
                    sections.append(IniSection(name, tuple(entries), header_line))
                name, header_line, entries = line[1:end].strip(), number, []
                in_section = True
                continue
        if in_section:
            key, sep, value = line.partition("=")
            key = key.strip()
            if sep and key:
                entries.append(IniEntry(key, value.strip(), number))
    if in_section:
        sections.append(IniSection(name, tuple(entries), header_line))
    return IniDocument(tuple(sections), tuple(preamble))


# --------------------------------------------------------------------------- bytes


def has_utf8_bom(data: bytes) -> bool:
    """True when ``data`` starts with a UTF-8 BOM, which makes MicroSIP lose the first section."""
    return data.startswith(UTF8_BOM)


def decode_ini_bytes(data: bytes, ansi_codepage: str = "cp1252") -> str:
    """Decode an ini file exactly as MicroSIP does.

    ``FF FE`` first: UTF-16LE (BOM stripped). Anything else, a UTF-8 BOM included, is ANSI in
    the system code page, so a UTF-8 BOM shows up as junk (``ï»¿`` in cp1252).
    """
    if data.startswith(UTF16LE_BOM):
        return data[len(UTF16LE_BOM) :].decode("utf-16-le", errors="replace")
    return data.decode(ansi_codepage, errors="replace")


def normalize_line_endings(text: str) -> str:
    """Every CRLF, lone CR and lone LF replaced by CRLF."""
    return _LINE_BREAK.sub("\r\n", text)


def encode_ini(text: str) -> bytes:
    """Encode text as MicroSIP writes its ini: BOM ``FF FE``, UTF-16LE, CRLF line endings.

    Raises LintError for a NUL (it would end the value for the profile API) or a surrogate
    code point (not encodable as UTF-16).
    """
    if "\x00" in text or _SURROGATE.search(text):
        # Only on failure is it worth finding the line.
        for number, line in enumerate(_LINE_BREAK.split(text), start=1):
            if "\x00" in line:
                raise LintError(
                    f"line {number}: contains a NUL character, which microsip.ini cannot hold"
                )
            if _SURROGATE.search(line):
                raise LintError(
                    f"line {number}: contains a lone surrogate code point, which is not valid "
                    "UTF-16"
                )
    return UTF16LE_BOM + normalize_line_endings(text).encode("utf-16-le")


# --------------------------------------------------------------------------- serializing


def _where(section: str | None, key: str | None = None) -> str:
    place = "before the first section" if section is None else f"section [{section}]"
    return place if key is None else f"{place}, key {key!r}"


def _check_line(line: str, expected: _Line, where: str) -> None:
    if _LINE_BREAK.search(line):
        raise LintError(f"{where}: contains a line break, which would split the line")
    if _classify(line) != expected:
        raise LintError(f"{where}: would not read back unchanged from microsip.ini")


def _entry_line(entry: IniEntry, section: str | None) -> str:
    if entry.key is None:
        line = entry.raw_value
        _check_line(line, _Line("comment", value=line.strip()), _where(section) + " (comment)")
        return line
    if section is None:
        raise LintError(f"{_where(section, entry.key)}: Windows ignores keys outside a section")
    line = f"{entry.key}={entry.raw_value}"
    expected = _Line("key", name=entry.key, value=entry.raw_value.strip())
    _check_line(line, expected, _where(section, entry.key))
    return line


def serialize_ini(doc: IniDocument) -> str:
    """The canonical text of ``doc`` (see the module docstring), CRLF line endings.

    Raises LintError when a name, value or comment would not read back unchanged, for
    example a value holding a line break (which could inject keys). Messages never hold values.
    """
    lines = [_entry_line(entry, None) for entry in doc.preamble]
    for section in doc.sections:
        header = f"[{section.name}]"
        _check_line(header, _Line("header", name=section.name), f"section [{section.name}]")
        lines.append(header)
        lines.extend(_entry_line(entry, section.name) for entry in section.entries)
    return "".join(line + "\r\n" for line in lines)


# --------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class MergeConflict:
    """Both the new render and the workstation changed this key since the last push.

    Ours was taken. No values are kept: they may be secrets.
    """

    section: str
    key: str


@dataclass(frozen=True)
class MergeResult:
    """The merged document, the conflicts met, and the keys whose value differs from theirs."""

    document: IniDocument
    conflicts: tuple[MergeConflict, ...] = ()
    changed_keys: tuple[tuple[str, str], ...] = ()


def is_account_section(name: str) -> bool:
    """True for ``[AccountN]`` with N >= 1 spelled as MicroSIP spells it (any case)."""
    index = account_index(name)
    return index is not None and index >= 1


def _first_sections(doc: IniDocument | None) -> dict[str, IniSection]:
    """The sections MicroSIP sees, by lower-cased name (later duplicates are invisible)."""
    found: dict[str, IniSection] = {}
    for section in () if doc is None else doc.sections:
        found.setdefault(section.name.lower(), section)
    return found


def _live_entries(section: IniSection | None) -> list[IniEntry]:
    """Comments and the first entry of every key; later duplicate keys are invisible."""
    seen: set[str] = set()
    live: list[IniEntry] = []
    for entry in () if section is None else section.entries:
        if entry.key is not None:
            if entry.key.lower() in seen:
                continue
            seen.add(entry.key.lower())
        live.append(entry)
    return live


def _key_map(section: IniSection | None) -> dict[str, IniEntry]:
    found: dict[str, IniEntry] = {}
    for entry in () if section is None else section.entries:
        if entry.key is not None:
            found.setdefault(entry.key.lower(), entry)
    return found


class _View:
    """What MicroSIP sees of a document: first sections and first keys, by lower-cased name."""

    def __init__(self, doc: IniDocument | None) -> None:
        self.sections = _first_sections(doc)
        self._keys = {name: _key_map(section) for name, section in self.sections.items()}

    def keys(self, section: str) -> dict[str, IniEntry]:
        return self._keys.get(section, {})

    def entry(self, section: str, key: str) -> IniEntry | None:
        return self.keys(section).get(key)


def _prefer(current: IniEntry | None, wanted: IniEntry) -> IniEntry:
    # Keep the existing line when it already reads the same (for example MicroSIP's quoting),
    # so an unchanged value never shows up as a change.
    if current is not None and current.value == wanted.value:
        return current
    return wanted


def _value(entry: IniEntry | None) -> str | None:
    return None if entry is None else entry.value


class _Merger:
    """State of one three-way merge; see :func:`merge_ini` for the rules."""

    def __init__(
        self,
        *,
        base: IniDocument | None,
        ours: IniDocument,
        theirs: IniDocument | None,
        enforced: IniDocument | None,
        runtime_keys: frozenset[tuple[str, str]],
        runtime_sections: frozenset[str],
    ) -> None:
        self.ours = _View(ours)
        self.theirs = _View(theirs)
        # Without a current file there is nothing to keep: the result is ours, like a reset.
        self.base = _View(None if theirs is None else base)
        self.enforced = _View(enforced)
        self.runtime_keys = frozenset((s.lower(), k.lower()) for s, k in runtime_keys)
        self.runtime_sections = frozenset(s.lower() for s in runtime_sections)
        self.conflicts: list[MergeConflict] = []

    def sections(self) -> list[IniSection]:
        """The merged sections in their final order."""
        theirs, ours = self.theirs.sections, self.ours.sections
        names = list(theirs)
        names += [n for n in ours if n not in theirs]
        names += [n for n in self.enforced.sections if n not in theirs and n not in ours]
        built: list[tuple[str, IniSection]] = []
        for name in names:
            section = self._section(name)
            if section is not None:
                built.append((name, section))
        if "settings" not in theirs:
            # MicroSIP itself starts a new file with [Settings].
            built.sort(key=lambda item: item[0] != "settings")
        return [section for _, section in built]

    def _section(self, name: str) -> IniSection | None:
        if is_account_section(name):
            return self._wholesale(name, self.ours.sections.get(name))
        if name in self.runtime_sections:
            kept = self.theirs.sections.get(name)
            return self._wholesale(name, kept if kept is not None else self.ours.sections.get(name))
        return self._managed(name)

    def _wholesale(self, name: str, kept: IniSection | None) -> IniSection | None:
        """``kept`` as a whole (or nothing), with the enforced keys applied."""
        forced = dict(self.enforced.keys(name))
        source = kept if kept is not None else self.enforced.sections.get(name)
        if source is None:
            return None
        entries: list[IniEntry] = []
        for entry in _live_entries(kept):
            if entry.key is not None and entry.key.lower() in forced:
                entry = _prefer(entry, forced.pop(entry.key.lower()))
            entries.append(entry)
        entries.extend(forced.values())
        return IniSection(source.name, tuple(entries))

    def _managed(self, name: str) -> IniSection | None:
        theirs, ours = self.theirs.sections.get(name), self.ours.sections.get(name)
        entries: list[IniEntry] = []
        seen: set[str] = set()
        removed = False
        keys_kept = 0
        for from_theirs, source in ((True, theirs), (False, ours)):
            for entry in _live_entries(source):
                if entry.key is None:
                    # Ours' comments only come with a section that is new to the file.
                    if from_theirs or theirs is None:
                        entries.append(entry)
                    continue
                key = entry.key.lower()
                if key in seen:
                    continue
                seen.add(key)
                chosen = self._decide(name, key)
                if chosen is None:
                    removed = True
                else:
                    entries.append(chosen)
                    keys_kept += 1
        for key, entry in self.enforced.keys(name).items():
            if key not in seen:
                entries.append(entry)
                keys_kept += 1
        if theirs is not None:
            # A section of theirs disappears only when this merge removed its last line.
            keep = bool(entries) or ours is not None or not removed
            return IniSection(theirs.name, tuple(entries)) if keep else None
        header = ours if ours is not None else self.enforced.sections.get(name)
        # A new section whose keys are all withheld (the user deleted them) stays away, and
        # so does an enforced section that brings no key.
        if header is None or (keys_kept == 0 and (ours is None or self.ours.keys(name))):
            return None
        return IniSection(header.name, tuple(entries))

    def _decide(self, section: str, key: str) -> IniEntry | None:
        """The entry a key of a non-account, non-runtime section gets, or None to drop it."""
        theirs = self.theirs.entry(section, key)
        forced = self.enforced.entry(section, key)
        if forced is not None:
            return _prefer(theirs, forced)
        ours = self.ours.entry(section, key)
        if (section, key) in self.runtime_keys:
            return theirs if theirs is not None else ours
        base = self.base.entry(section, key)
        if ours is None:
            if base is None:
                return theirs  # unmanaged: never ours
            # No longer rendered: remove it unless theirs changed it since the last push.
            return None if theirs is None or theirs.value == base.value else theirs
        if base is not None and ours.value == base.value:
            return theirs
        if base is not None and _value(theirs) not in (base.value, ours.value):
            name = self.ours.sections[section].name
            self.conflicts.append(MergeConflict(name, ours.key or key))
        return _prefer(theirs, ours)

    @staticmethod
    def preamble(
        ours: IniDocument, base: IniDocument | None, theirs: IniDocument | None
    ) -> tuple[IniEntry, ...]:
        """Comments before the first section, merged three-way as one block."""
        if theirs is None:
            return ours.preamble
        if base is None:
            return ours.preamble or theirs.preamble
        if _texts(ours.preamble) != _texts(base.preamble):
            return ours.preamble
        return theirs.preamble


def _texts(entries: Iterable[IniEntry]) -> tuple[tuple[str | None, str], ...]:
    return tuple((entry.key, entry.raw_value) for entry in entries)


def _renumber(preamble: Iterable[IniEntry], sections: Iterable[IniSection]) -> IniDocument:
    """Line numbers as positions in :func:`serialize_ini` output."""
    number = 0

    def next_line() -> int:
        nonlocal number
        number += 1
        return number

    new_preamble = tuple(replace(entry, line=next_line()) for entry in preamble)
    new_sections = []
    for section in sections:
        line = next_line()
        entries = tuple(replace(entry, line=next_line()) for entry in section.entries)
        new_sections.append(replace(section, entries=entries, line=line))
    return IniDocument(tuple(new_sections), new_preamble)


def _changed_keys(theirs: _View, result: IniDocument) -> list[tuple[str, str]]:
    """Keys whose value MicroSIP will read differently: result order, then removed keys."""
    changed: list[tuple[str, str]] = []
    merged = _View(result)
    for name, section in merged.sections.items():
        for key, entry in merged.keys(name).items():
            if _value(theirs.entry(name, key)) != entry.value:
                changed.append((section.name, entry.key or key))
    for name, section in theirs.sections.items():
        changed.extend(
            (section.name, entry.key or key)
            for key, entry in theirs.keys(name).items()
            if merged.entry(name, key) is None
        )
    return changed


def merge_ini(
    *,
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None = None,
    runtime_keys: frozenset[tuple[str, str]] = frozenset(),
    runtime_sections: frozenset[str] | None = None,
) -> MergeResult:
    """Three-way merge of the new render into the workstation's current file.

    ``base`` is what was last applied (None on the first push), ``ours`` the new render,
    ``theirs`` the current file (None if absent: the result is then ours), ``enforced`` the
    override.ini layer. Names compare case-insensitively; only what MicroSIP sees counts
    (first section and first key of a name win; later duplicates are dropped). Per key,
    first rule that applies:

    1. enforced keys take the enforced value, in every section;
    2. ``[AccountN]`` (N >= 1) sections are exactly ours, theirs' accounts missing from ours go;
    3. runtime sections (default: the key table's) and runtime keys stay as theirs; ours only
       fills them in when absent;
    4. managed keys (in ours or base): ours where ours changed since base (a
       :class:`MergeConflict` when theirs changed it to a third value), else theirs; a key
       dropped from ours goes unless theirs changed it;
    5. anything else in theirs stays.

    Theirs' order and comments are kept (except inside account sections, which are ours);
    new keys and sections follow in ours' order, a new ``[Settings]`` comes first, ours'
    comments only come with sections new to the file. Values compare as MicroSIP reads them
    (quotes stripped), and a line whose value does not change is kept as theirs wrote it. A
    section of theirs emptied by removals, or a new one whose keys the user had deleted, is
    left out. The preamble is merged three-way as one block.
    """
    merger = _Merger(
        base=base,
        ours=ours,
        theirs=theirs,
        enforced=enforced,
        runtime_keys=runtime_keys,
        runtime_sections=(
            load_key_table().runtime_sections() if runtime_sections is None else runtime_sections
        ),
    )
    document = _renumber(merger.preamble(ours, base, theirs), merger.sections())
    return MergeResult(
        document=document,
        conflicts=tuple(merger.conflicts),
        changed_keys=tuple(_changed_keys(merger.theirs, document)),
    )


def reset_ini(ours: IniDocument, enforced: IniDocument | None = None) -> IniDocument:
    """What a helpdesk ``--reset`` writes: ours with the enforced keys applied."""
    return merge_ini(base=None, ours=ours, theirs=None, enforced=enforced).document
