"""Lint a rendered microsip.ini (or an override.ini) against MicroSIP's rules.

Layer 2: depends on :mod:`provisioner.microsip.inidoc`, :mod:`provisioner.microsip.keytable`
and :mod:`provisioner.inventory.model` (its :class:`~provisioner.inventory.model.Finding`, the
one finding type of ``validate`` and ``secrets lint``) only. Findings never quote the value of a
``password`` key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from provisioner.inventory.model import Finding, Source
from provisioner.microsip.inidoc import IniDocument, IniEntry, IniSection
from provisioner.microsip.keytable import KeySpec, KeyTable, account_index, load_key_table

#: Every finding code this module emits.
FINDING_CODES: Final = frozenset(
    {
        "unknown-key",
        "unknown-section",
        "non-key",
        "password-size",
        "key-case",
        "orphan-key",
        "bad-enum",
        "bad-bool",
        "bad-int",
        "out-of-range",
        "too-long",
        "control-char",
        "unknown-codec",
        "bad-shortcut",
        "shortcut-gap",
        "hook-quotes",
        "obsolete-key",
        "runtime-key",
        "runtime-section",
        "duplicate-section",
        "duplicate-key",
        "account-gap",
        "account-missing-domain",
        "account-missing-username",
        "account-id",
        "too-many-accounts",
        "inactive-account",
        "dialing-prefix",
        "password-expansion",
        "hook-batch",
        "recording-path",
    }
)

MAX_ACCOUNTS: Final = 100
_SECRET_KEYS: Final = frozenset({"password"})
_SHOWN_CHARS: Final = 40
_INT_RE: Final = re.compile(r"-?[0-9]+")
_CONTROL_EXTRA: Final = frozenset({"\x7f", "\x85", "\u2028", "\u2029"})
_CONTROL_RE: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
# MicroSIP turns every '%' into '*' and then every '*s' into '%s' before its Format call, so
# both spellings are Format slots (mainDlg.cpp UsersDirectoryLoad).
_FORMAT_SLOT_RE: Final = re.compile(r"[%*]s")
_BATCH_SUFFIXES: Final = (".bat", ".cmd")
_SHELL_NAMES: Final = frozenset({"cmd", "cmd.exe"})


Origin = Callable[[str, str], Source | None]
"""Where the value of a key (section, key) was set, for a finding on it (None: unknown)."""


def has_errors(findings: Iterable[Finding]) -> bool:
    """True when any finding is an error (warnings alone do not block a push)."""
    return any(f.severity == "error" for f in findings)


def lint_microsip_ini(
    doc: IniDocument,
    *,
    file: str = "",
    allow_runtime: bool = False,
    hidden: frozenset[int] = frozenset(),
    origin: Origin | None = None,
    portable: bool = False,
) -> list[Finding]:
    """Check a whole microsip.ini: keys, values, sections and the account structure.

    Findings name ``file``, the line and ``[section] key``, and where ``origin`` says the
    value was set (for a whole ``[AccountN]`` section, the key is empty). ``allow_runtime``
    accepts the keys and sections MicroSIP writes itself (for a file read back from a
    workstation); a freshly rendered file must not contain them. Lines in ``hidden`` (they hold
    a password outside its key) are not looked at, so no message quotes them; a section whose
    header is hidden is skipped whole. ``portable``: the file sits next to a portable
    MicroSIP, whose defaults differ (recordings go to a relative ``Recordings`` folder).
    """
    linter = _Linter(
        load_key_table(),
        file,
        override=False,
        allow_runtime=allow_runtime,
        hidden=hidden,
        origin=origin,
    )
    linter.check_document(doc)
    linter.check_accounts(doc)
    linter.check_shortcuts(doc)
    linter.check_dialing_prefix(doc)
    linter.check_recording_path(doc, portable=portable)
    return linter.result()


def lint_override_ini(
    doc: IniDocument,
    *,
    file: str = "",
    hidden: frozenset[int] = frozenset(),
    origin: Origin | None = None,
) -> list[Finding]:
    """Check an override.ini: managed [Settings] keys and partial [AccountN] sections only."""
    linter = _Linter(
        load_key_table(), file, override=True, allow_runtime=False, hidden=hidden, origin=origin
    )
    linter.check_document(doc)
    return linter.result()


def is_control_char(char: str) -> bool:
    """True for characters that must never appear in an ini value (TAB is allowed)."""
    return (ord(char) < 0x20 and char != "\t") or char in _CONTROL_EXTRA


def _show(key: str, value: str) -> str:
    """A value as quoted in messages: hidden for secrets, truncated, non-printables escaped."""
    if key.strip().lower() in _SECRET_KEYS:
        return "(hidden)"
    if value == "":
        return "an empty value"
    if len(value) > _SHOWN_CHARS:
        value = value[: _SHOWN_CHARS - 1] + "…"
    value = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in value)
    return f"'{value}'"


def _shown_text(text: str, limit: int = 100) -> str:
    """Text of a non-secret value as it stands in a message: truncated, non-printables escaped."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def _choices(allowed: Iterable[str]) -> str:
    return ", ".join(v if v else "(empty)" for v in allowed)


def _split_hook(command: str) -> tuple[str, str]:
    """The program of a hook command and the rest, as CommandLineToArgvW splits the program."""
    text = command.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        if end < 0:
            return text[1:], ""
        return text[1:end], text[end + 1 :]
    space = re.search(r"\s", text)
    if space is None:
        return text, ""
    return text[: space.start()], text[space.start() :]


def _hook_args_have_quotes(command: str) -> bool:
    """True when a quote follows the program name, as CommandLineToArgvW would split it."""
    return '"' in _split_hook(command)[1]


def _hook_shell(program: str) -> str | None:
    """How a hook's program goes through cmd.exe ("batch" or "cmd"), or None if it does not."""
    name = program.strip().replace("/", "\\").rsplit("\\", 1)[-1].lower()
    if name.endswith(_BATCH_SUFFIXES):
        return "batch"
    if name in _SHELL_NAMES:
        return "cmd"
    return None


def _format_slots(value: str) -> int:
    """How many printf-style ``%s`` slots MicroSIP fills in a usersDirectory-style value."""
    return len(_FORMAT_SLOT_RE.findall(value))


# Lines that hold a password outside its key are never checked, so never cached.
_ENTRY_CACHE: dict[tuple[bool, bool, str, str, str], tuple[tuple[str, str, str], ...]] = {}
_ENTRY_CACHE_LIMIT = 100_000


class _Where(NamedTuple):
    line: int
    section: str
    key: str


@dataclass
class _Linter:
    table: KeyTable
    file: str
    override: bool
    allow_runtime: bool
    hidden: frozenset[int] = frozenset()
    origin: Origin | None = None
    findings: list[Finding] = field(default_factory=list)

    def add(self, severity: str, code: str, message: str, where: _Where) -> None:
        line, section, key = where
        path = f"[{section}] {key}".strip() if section else ""
        source = self.origin(section, key) if self.origin is not None else None
        self.findings.append(Finding(severity, code, message, self.file, line, 0, path, source))

    def result(self) -> list[Finding]:
        # Stable sort: document order, findings without a line last.
        return sorted(self.findings, key=lambda f: (f.line == 0, f.line))

    # ---- whole document ------------------------------------------------------------------

    def sections(self, doc: IniDocument) -> Sequence[IniSection]:
        """The sections to check: those whose header line is not hidden."""
        if not self.hidden:
            return doc.sections
        return [section for section in doc.sections if section.line not in self.hidden]

    def check_document(self, doc: IniDocument) -> None:
        for entry in doc.preamble:
            if entry.line in self.hidden:
                continue
            self.check_control_chars(entry, "")
            if entry.key is not None:
                self.add(
                    "error",
                    "orphan-key",
                    f"'{entry.key}' stands before any [section], so MicroSIP ignores it.",
                    _Where(entry.line, "", entry.key),
                )
        first_seen: dict[str, IniSection] = {}
        for section in self.sections(doc):
            name = section.name.strip().lower()
            first = first_seen.setdefault(name, section)
            if first is not section:
                self.add(
                    "warning",
                    "duplicate-section",
                    f"[{section.name}] appears again (first at line {first.line}); MicroSIP reads"
                    " only the first one, so this section is ignored.",
                    _at(section),
                )
            self.check_section(section)

    def check_section(self, section: IniSection) -> None:
        table_section = self.table.table_section(section.name)
        runtime = self.table.is_runtime_section(section.name)
        readable = not runtime and not (
            table_section is None or (self.override and table_section == "Shortcuts")
        )
        first_line: dict[str, int] = {}
        # One pass per section: thousands of rendered files go through here.
        for entry in section.entries:
            key = entry.key
            if self.hidden and entry.line in self.hidden:
                continue
            if _CONTROL_RE.search(entry.raw_value if key is None else key + entry.raw_value):
                self.check_control_chars(entry, section.name)
            if key is None or not readable:
                continue
            name = key.strip().lower()
            if name in first_line:
                self.add(
                    "warning",
                    "duplicate-key",
                    f"'{key}' appears again in [{section.name}] (first at line"
                    f" {first_line[name]}); MicroSIP uses the first value and ignores this one.",
                    _Where(entry.line, section.name, key),
                )
            else:
                first_line[name] = entry.line
            self.check_entry(section, entry, key, name)
        if readable:
            return
        if runtime:
            if self.override or not self.allow_runtime:
                self.add(
                    "error",
                    "runtime-section",
                    f"[{section.name}] holds runtime data that MicroSIP writes itself;"
                    " do not render it.",
                    _at(section),
                )
            return
        self.add("error", "unknown-section", self.unknown_section(section), _at(section))

    def unknown_section(self, section: IniSection) -> str:
        if self.override:
            return (
                f"[{section.name}] cannot be overridden; override.ini may only contain"
                " [Settings] and [AccountN] sections."
            )
        if section.name.strip().lower().startswith("account"):
            return (
                f"[{section.name}] is not an account section MicroSIP reads; accounts are named"
                " [Account1], [Account2], … without leading zeros."
            )
        return f"MicroSIP does not read a [{section.name}] section."

    def check_control_chars(self, entry: IniEntry, section: str) -> None:
        text = (entry.key or "") + entry.raw_value
        found = _CONTROL_RE.search(text)
        if found is None:
            return
        bad = found.group()
        what = f"The value of '{entry.key}'" if entry.key is not None else "A comment"
        self.add(
            "error",
            "control-char",
            f"{what} contains the control character U+{ord(bad):04X}, which breaks the ini line.",
            _Where(entry.line, section, entry.key or ""),
        )

    # ---- one key -------------------------------------------------------------------------

    def check_entry(self, section: IniSection, entry: IniEntry, written: str, name: str) -> None:
        # Thousands of profiles repeat the same (section, key, value): check each once.
        # Passwords are never used as cache keys, so no plaintext outlives its document.
        if name == "password":
            self._check_entry(section, entry, written)
            return
        cache_key = (self.override, self.allow_runtime, section.name, written, entry.raw_value)
        cached = _ENTRY_CACHE.get(cache_key)
        if cached is None:
            before = len(self.findings)
            self._check_entry(section, entry, written)
            cached = tuple((f.severity, f.code, f.message) for f in self.findings[before:])
            del self.findings[before:]
            if len(_ENTRY_CACHE) >= _ENTRY_CACHE_LIMIT:
                _ENTRY_CACHE.clear()
            _ENTRY_CACHE[cache_key] = cached
        for severity, code, message in cached:
            self.add(severity, code, message, _Where(entry.line, section.name, written))

    def _check_entry(self, section: IniSection, entry: IniEntry, written: str) -> None:
        key = written.strip()
        where = _Where(entry.line, section.name, written)
        if key.lower() == "passwordsize":
            self.add(
                "error",
                "password-size",
                "passwordSize is the legacy binary-password marker that MicroSIP migrates and"
                " deletes; never write it, write the plain password instead.",
                where,
            )
            return
        non_key = self.table.non_key_spec(section.name, key)
        if non_key is not None:
            hint = f"; did you mean {non_key.suggest}?" if non_key.suggest else "."
            self.add(
                "error",
                "non-key",
                f"MicroSIP does not read '{key}' in [{section.name}] ({non_key.reason}){hint}",
                where,
            )
            return
        spec = self.table.lookup(section.name, key)
        if spec is None:
            suggestion = self.table.suggest(section.name, key)
            hint = f"; did you mean {suggestion}?" if suggestion else "."
            self.add(
                "error",
                "unknown-key",
                f"MicroSIP does not read '{key}' in [{section.name}]{hint}",
                where,
            )
            return
        if spec.is_runtime and (self.override or not self.allow_runtime):
            self.add(
                "error",
                "runtime-key",
                f"'{spec.key}' is runtime state that MicroSIP rewrites itself; do not render it.",
                where,
            )
            return
        if key != spec.key:
            self.add(
                "warning",
                "key-case",
                f"'{key}' works (keys are case-insensitive) but should be spelled '{spec.key}'.",
                where,
            )
        if spec.removed:
            self.add(
                "warning",
                "obsolete-key",
                f"'{spec.key}' is no longer read since MicroSIP {spec.removed}.",
                where,
            )
        self.check_value(spec, entry.value, where)

    def check_value(self, spec: KeySpec, value: str, where: _Where) -> None:
        shown = _show(where.key, value)

        def error(code: str, message: str) -> None:
            self.add("error", code, message, where)

        if len(value) > spec.max_len:
            error(
                "too-long",
                f"'{spec.key}' is {len(value)} characters long; MicroSIP reads at most"
                f" {spec.max_len} and truncates the rest.",
            )
        if spec.password_macros or spec.format_args:
            self.check_password_expansion(spec, value, where)
        if spec.type == "bool01" and value not in ("0", "1"):
            error("bad-bool", f"'{spec.key}' must be exactly 0 or 1, not {shown}.")
        elif spec.type == "int":
            if spec.key == "accountId" and not self.override:
                return  # check_accounts reports accountId with the account structure in view
            self.check_int(spec, value, shown, error)
        elif spec.type == "enum" and value not in spec.allowed:
            near = [a for a in spec.allowed if a.lower() == value.lower()]
            hint = f"; did you mean '{near[0]}'?" if near else "."
            error(
                "bad-enum",
                f"'{spec.key}' must be one of {_choices(spec.allowed)}, not {shown}{hint}",
            )
        elif spec.type == "codecs":
            known = {c.lower() for c in self.table.codec_ids}
            unknown = [c for c in value.split() if c.lower() not in known]
            if unknown:
                self.add(
                    "warning",
                    "unknown-codec",
                    f"'{spec.key}' lists codec IDs MicroSIP does not know: {', '.join(unknown)}.",
                    where,
                )
        elif spec.type == "command":
            self.check_hook(spec, value, where)
        elif spec.type == "shortcut":
            fields = value.split(";")
            if len(fields) >= 3 and fields[2] not in self.table.shortcut_types:
                error(
                    "bad-shortcut",
                    f"speed dial {spec.key} has type {_show('', fields[2])}; use one of"
                    f" {_choices(self.table.shortcut_types)}.",
                )

    def check_password_expansion(self, spec: KeySpec, value: str, where: _Where) -> None:
        """An error when MicroSIP would put the SIP password into this URL or command line."""
        if spec.type == "command":
            lands = (
                "into the command line of the program it starts, where process-creation logs"
                " (event 4688, Sysmon) and other users of the machine can read it"
            )
        else:
            lands = "into the URL it requests, which servers and proxies log"
        for macro in spec.password_macros:
            if macro not in value:  # MicroSIP replaces the exact, lower-case spelling only
                continue
            what = "an unsalted MD5 of the SIP password" if "md5" in macro else "the SIP password"
            self.add(
                "error",
                "password-expansion",
                f"'{spec.key}' contains {macro}, which MicroSIP replaces with {what} of the"
                f" active account, so it goes {lands}; remove it: no URL or command may carry"
                " the password.",
                where,
            )
        if "password" in spec.format_args:
            position = spec.format_args.index("password") + 1
            slots = _format_slots(value)
            if slots >= position:
                order = ", ".join(spec.format_args)
                self.add(
                    "error",
                    "password-expansion",
                    f"'{spec.key}' has {slots} %s placeholders; MicroSIP fills them with the"
                    f" {order} (in that order), so %s number {position} puts the SIP password"
                    f" {lands}; use at most {position - 1} (MicroSIP reads *s as %s too).",
                    where,
                )

    def check_hook(self, spec: KeySpec, value: str, where: _Where) -> None:
        """Warn about hook commands MicroSIP would run in a way that breaks or is unsafe."""
        program, rest = _split_hook(value)
        if '"' in rest:
            self.add(
                "warning",
                "hook-quotes",
                f"'{spec.key}' passes quoted arguments, but MicroSIP splits the command with"
                " CommandLineToArgvW and rejoins the arguments with single spaces, so the quotes"
                " are lost and arguments containing spaces break; call a script instead.",
                where,
            )
        shell = _hook_shell(program)
        if shell is None:
            return
        if shell == "batch":
            runs = f"the batch file {_shown_text(program)}, which Windows runs through cmd.exe"
            script = program.strip()[:-4] + ".ps1"
            arguments = " ".join(rest.split())
        else:
            runs = "cmd.exe"
            script = "C:\\Scripts\\on-call.ps1"
            arguments = ""
        safe = f"{spec.key}=powershell.exe -NoProfile -NonInteractive -File {script} {arguments}"
        spaces = (
            " (with the script in a folder without spaces: MicroSIP drops the quotes around"
            " arguments)"
            if re.search(r"\s", script)
            else ""
        )
        self.add(
            "warning",
            "hook-batch",
            f"'{spec.key}' runs {runs}, and MicroSIP appends the other party's number to the"
            " command unquoted: cmd.exe reads & | < > ^ % in it as its own syntax, so a"
            " crafted caller ID can run commands. Start a program that takes the number as a"
            " plain argument instead: a .exe, or the script rewritten for PowerShell (the"
            f" number is its last argument, $args[-1]), e.g. {_shown_text(safe.rstrip(), 160)}"
            f"{spaces}.",
            where,
        )

    def check_int(
        self, spec: KeySpec, value: str, shown: str, error: Callable[[str, str], None]
    ) -> None:
        if not _INT_RE.fullmatch(value):
            error("bad-int", f"'{spec.key}' must be an integer, not {shown}.")
            return
        number = int(value)
        if (spec.min is not None and number < spec.min) or (
            spec.max is not None and number > spec.max
        ):
            if spec.min is not None and spec.max is not None:
                bounds = f"between {spec.min} and {spec.max}"
            elif spec.min is not None:
                bounds = f"at least {spec.min}"
            else:
                bounds = f"at most {spec.max}"
            error("out-of-range", f"'{spec.key}' must be {bounds}, not {number}.")

    # ---- structure -----------------------------------------------------------------------

    def accounts(self, doc: IniDocument) -> dict[int, IniSection]:
        """The SIP account sections (N >= 1) MicroSIP would read, by index (first one wins)."""
        accounts: dict[int, IniSection] = {}
        for section in self.sections(doc):
            index = account_index(section.name)
            if index is not None and index >= 1:
                accounts.setdefault(index, section)
        return accounts

    def readable(self, section: IniSection, *keys: str) -> bool:
        """True when no line the keys are read from is hidden (lint must not look at it)."""
        if not self.hidden:
            return True
        entries = (section.entry(key) for key in keys)
        return all(entry is None or entry.line not in self.hidden for entry in entries)

    def check_accounts(self, doc: IniDocument) -> None:
        accounts = self.accounts(doc)
        indexes = sorted(accounts)
        for index in indexes:
            if index > MAX_ACCOUNTS:
                self.add(
                    "error",
                    "too-many-accounts",
                    f"MicroSIP offers at most {MAX_ACCOUNTS} accounts, so [Account{index}] is out"
                    " of reach.",
                    _at(accounts[index]),
                )
                break
        for expected, index in enumerate(indexes, 1):
            if index != expected:
                self.add(
                    "error",
                    "account-gap",
                    f"[Account{expected}] is missing; accounts must be numbered contiguously from"
                    f" [Account1], so MicroSIP ignores [Account{index}] and every account after"
                    " it.",
                    _at(accounts[index]),
                )
                break
        for index in indexes:
            section = accounts[index]
            if not section.get("domain"):
                self.add(
                    "error",
                    "account-missing-domain",
                    f"[{section.name}] has no domain, so MicroSIP ignores it and every account"
                    " after it.",
                    _at(section, "domain"),
                )
            if not section.get("username"):
                self.add(
                    "error",
                    "account-missing-username",
                    f"[{section.name}] has no username; MicroSIP needs it as the SIP user and"
                    " drops the password whenever it saves an account without one.",
                    _at(section, "username"),
                )
        loadable = 0
        while loadable + 1 in accounts and accounts[loadable + 1].get("domain"):
            loadable += 1
        active = self.check_account_id(doc, accounts, loadable)
        if active is not None and loadable > 1:
            self.check_inactive_accounts(accounts, loadable, active)

    def check_inactive_accounts(
        self, accounts: dict[int, IniSection], loadable: int, active: int
    ) -> None:
        """The free MicroSIP registers the active account only: say so for every other one."""
        for index in range(1, loadable + 1):
            if index == active:
                continue
            section = accounts[index]
            label = section.get("label") if self.readable(section, "label") else None
            named = f" ({_show('label', label)})" if label else ""
            self.add(
                "warning",
                "inactive-account",
                f"this account{named} is not the active one (accountId={active}): the free"
                " MicroSIP registers only the active account, so this one never registers and"
                " receives no calls; it only shows in the account menu, for the user to switch"
                " to. Keep one account per profile, or use a paid MicroSIP edition that"
                " registers several accounts.",
                _at(section),
            )

    def check_account_id(
        self, doc: IniDocument, accounts: dict[int, IniSection], loadable: int
    ) -> int | None:
        """Check ``accountId``; return the active account's index when it points at one."""
        settings = doc.section("Settings")
        entry = None if settings is None else settings.entry("accountId")
        line = entry.line if entry is not None else (settings.line if settings else 0)
        if line in self.hidden or (settings is not None and settings.line in self.hidden):
            return None
        where = _Where(line, "Settings" if settings is None else settings.name, "accountId")
        if entry is None or entry.value == "":
            if accounts:
                self.add(
                    "error",
                    "account-id",
                    "[Settings] accountId is missing or empty, so MicroSIP runs its legacy"
                    " migration and uses no account; write accountId=1 (or the active index).",
                    where,
                )
            return None
        value = entry.value
        if not _INT_RE.fullmatch(value):
            self.add(
                "error",
                "account-id",
                f"accountId must be an account number, not {_show('accountId', value)}.",
                where,
            )
            return None
        number = int(value)
        if number == 0:
            if settings is None or settings.get("enableLocalAccount") != "1":
                self.add(
                    "warning",
                    "account-id",
                    "accountId=0 selects the local account only with enableLocalAccount=1;"
                    " otherwise MicroSIP forces it to 1.",
                    where,
                )
            return None
        if 1 <= number <= loadable:
            return number
        if number in accounts:
            why = f"[Account{number}] exists but MicroSIP cannot load it (see the account errors)"
        else:
            why = f"there is no [Account{number}]"
        self.add(
            "error",
            "account-id",
            f"accountId={number} does not point at an existing account ({why}), so MicroSIP"
            " falls back to no SIP account.",
            where,
        )
        return None

    def check_shortcuts(self, doc: IniDocument) -> None:
        section = doc.section("Shortcuts")
        if section is None or section.line in self.hidden:
            return
        present = {
            key.strip()
            for _, key in _keyed(section)
            if self.table.lookup("Shortcuts", key) is not None
        }
        missing = next((str(i) for i in range(len(present)) if str(i) not in present), None)
        if missing is not None:
            self.add(
                "warning",
                "shortcut-gap",
                f"[Shortcuts] has no key {missing}; MicroSIP stops loading speed dials at the"
                " first missing index, so the later ones are ignored.",
                _at(section),
            )

    def check_dialing_prefix(self, doc: IniDocument) -> None:
        """Warn about a dialingPrefix that no dialPlan confines to the numbers needing it."""
        for section in self.accounts(doc).values():
            entry = section.entry("dialingPrefix")
            if entry is None or entry.key is None or entry.value == "" or section.get("dialPlan"):
                continue
            if not self.readable(section, "dialingPrefix", "dialPlan"):
                continue
            self.add(
                "warning",
                "dialing-prefix",
                f"a dialingPrefix ({_show('', entry.value)}) without a dialPlan: MicroSIP puts it"
                " in front of every all-digit number longer than 3 characters and drops a"
                " leading '+', so 4-digit internal extensions and international numbers (+…)"
                " become unreachable. Remove it; where outside lines need a prefix, write a"
                " dialPlan whose rules add it to those numbers only (a number no rule matches"
                " is blocked).",
                _Where(entry.line, section.name, entry.key),
            )

    def check_recording_path(self, doc: IniDocument, *, portable: bool) -> None:
        """Warn when automatic recording has no folder of its own to go to."""
        settings = doc.section("Settings")
        if settings is None or settings.line in self.hidden:
            return
        entry = settings.entry("autoRecording")
        path = settings.entry("recordingPath")
        if entry is None or entry.key is None or entry.value != "1":
            return
        if not self.readable(settings, "autoRecording", "recordingPath"):
            return
        if path is None and not portable:
            why = (
                "without a recordingPath: MicroSIP then records every call to"
                " <Desktop>\\Recordings, and where OneDrive's Known Folder Move syncs the"
                " Desktop, every recording is uploaded."
            )
        elif path is not None and path.value == "":
            why = (
                "with an empty recordingPath: MicroSIP then writes every recording to the"
                " folder it was started in, wherever that is."
            )
        else:
            return  # a folder, or a portable MicroSIP's own Recordings folder
        self.add(
            "warning",
            "recording-path",
            f"autoRecording=1 {why} Set recordingPath to a folder that is not synced.",
            _Where(entry.line, settings.name, entry.key),
        )


def _keyed(section: IniSection) -> list[tuple[IniEntry, str]]:
    """The key entries of a section with their key, in file order."""
    return [(entry, entry.key) for entry in section.entries if entry.key is not None]


def _at(section: IniSection, key: str = "") -> _Where:
    """The line of ``key`` in ``section`` if present, else the section header line."""
    entry = section.entry(key) if key else None
    line = entry.line if entry is not None else section.line
    return _Where(line, section.name, key)
