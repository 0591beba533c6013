"""Lint rules for microsip.ini and override.ini, on documents built without a parser."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.inventory.model import Finding, Source
from provisioner.microsip.inidoc import IniDocument, IniEntry, IniSection
from provisioner.microsip.lint import (
    FINDING_CODES,
    has_errors,
    lint_microsip_ini,
    lint_override_ini,
)

CANARY = "Canary-Pw-7731"

Pairs = Sequence[tuple[str | None, str]]


def make_doc(*sections: tuple[str, Pairs], preamble: Pairs = ()) -> IniDocument:
    """Build a document with line numbers as a file with these lines would have them."""
    line = 0

    def entries(pairs: Pairs) -> tuple[IniEntry, ...]:
        nonlocal line
        out = []
        for key, value in pairs:
            line += 1
            out.append(IniEntry(key, value, line))
        return tuple(out)

    pre = entries(preamble)
    built = []
    for name, pairs in sections:
        line += 1
        header = line
        built.append(IniSection(name, entries(pairs), header))
    return IniDocument(tuple(built), pre)


def account(label: str, user: str) -> list[tuple[str | None, str]]:
    return [
        ("label", label),
        ("server", "sip.example.com:5061"),
        ("proxy", "sbc1.example.com:5061 sbc2.example.com:5061"),
        ("domain", "example.com"),
        ("username", user),
        ("password", CANARY),
        ("authID", user),
        ("displayName", f'"{label}"'),
        ("transport", "tls"),
        ("SRTP", "mandatory"),
        ("registerRefresh", "300"),
        ("keepAlive", "15"),
        ("publish", "0"),
        ("ICE", "0"),
        ("allowRewrite", "0"),
        ("disableSessionTimer", "0"),
        ("hideCID", "0"),
    ]


SETTINGS: list[tuple[str | None, str]] = [
    (None, "; rendered by microsip-provisioner"),
    ("accountId", "1"),
    ("updatesInterval", "never"),
    ("enableLocalAccount", "0"),
    ("denyIncoming", ""),
    ("autoAnswer", ""),
    ("audioCodecs", "opus/48000/2 PCMA/8000/1 PCMU/8000/1 G722/16000/1"),
    ("DTMFMethod", "2"),
    ("volumeRing", "80"),
    ("STUN", "stun.example.com"),
    ("enableSTUN", "0"),
    ("recordingPath", r"C:\Recordings"),
    ("cmdCallStart", r'"C:\Program Files\CRM\popup.exe" --call'),
    ("usersDirectory", "https://pbx.example.com/directory.xml"),
    ("enableShortcuts", "1"),
]


def clean_doc() -> IniDocument:
    return make_doc(
        ("Settings", SETTINGS),
        ("Account1", account("Jane Doe", "1001")),
        ("Shortcuts", [("0", "Reception;100;call;;1"), ("1", "Voicemail;*97;call;;0")]),
    )


def codes(findings: Sequence[Finding]) -> list[str]:
    return [f.code for f in findings]


def lint_settings(*pairs: tuple[str, str], **kwargs: bool) -> list[Finding]:
    """Lint a valid document with [Settings] lines replaced or appended."""
    overrides = dict(pairs)
    base = [(k, v if k is None else overrides.pop(k, v)) for k, v in SETTINGS]
    doc = make_doc(
        ("Settings", [*base, *overrides.items()]),
        ("Account1", account("Jane Doe", "1001")),
    )
    return lint_microsip_ini(doc, file="pc01", **kwargs)


def lint_account(*pairs: tuple[str, str]) -> list[Finding]:
    """Lint a valid document with [Account1] lines replaced or appended."""
    overrides = dict(pairs)
    base = [(k, overrides.pop(k, v)) for k, v in account("Jane Doe", "1001") if k is not None]
    doc = make_doc(("Settings", SETTINGS), ("Account1", [*base, *overrides.items()]))
    return lint_microsip_ini(doc, file="pc01")


def only(findings: Sequence[Finding]) -> Finding:
    assert len(findings) == 1, [str(f) for f in findings]
    return findings[0]


# ---- clean documents ---------------------------------------------------------------------


def test_clean_realistic_document_has_no_findings() -> None:
    assert lint_microsip_ini(clean_doc(), file="pc01") == []


def test_empty_document_has_no_findings() -> None:
    assert lint_microsip_ini(IniDocument()) == []


def test_account0_is_the_local_account_and_not_counted() -> None:
    doc = make_doc(
        ("Settings", SETTINGS),
        ("Account0", [("label", "Local (call by IP address)")]),
        ("Account1", account("Jane Doe", "1001")),
    )
    assert lint_microsip_ini(doc) == []


# ---- keys --------------------------------------------------------------------------------


def test_unknown_key_with_suggestion() -> None:
    finding = only(lint_account(("tranport", "tls")))
    assert (finding.severity, finding.code) == ("error", "unknown-key")
    assert "did you mean transport?" in finding.message
    assert (finding.file, finding.path) == ("pc01", "[Account1] tranport")
    assert finding.line > 0


def test_account_key_in_settings_points_to_account_section() -> None:
    finding = only(lint_settings(("server", "sip.example.com")))
    assert finding.code == "unknown-key"
    assert "[AccountN] server" in finding.message


@pytest.mark.parametrize(
    ("section", "key", "value", "suggestion"),
    [
        ("Settings", "updateInterval", "never", "updatesInterval"),
        ("Settings", "disableLocalAccount", "1", "enableLocalAccount=0"),
        ("Settings", "ListenPort", "5060", "sourcePort"),
        ("Account1", "STUN", "stun.example.com", "[Settings] STUN"),
    ],
)
def test_documented_script_mistakes_get_suggestions(
    section: str, key: str, value: str, suggestion: str
) -> None:
    settings_pairs = list(SETTINGS)
    account_pairs = account("Jane Doe", "1001")
    (settings_pairs if section == "Settings" else account_pairs).append((key, value))
    doc = make_doc(("Settings", settings_pairs), ("Account1", account_pairs))
    finding = only(lint_microsip_ini(doc))
    assert (finding.severity, finding.code, finding.path) == (
        "error",
        "non-key",
        f"[{section}] {key}",
    )
    assert f"did you mean {suggestion}?" in finding.message


@pytest.mark.parametrize("key", ["enabled", "crashReport"])
def test_other_known_non_keys(key: str) -> None:
    finding = only(lint_settings((key, "0")))
    assert finding.code == "non-key"
    assert "did you mean" not in finding.message


@pytest.mark.parametrize("section", ["Settings", "Account1"])
def test_password_size_is_an_error(section: str) -> None:
    if section == "Settings":
        findings = lint_settings(("passwordSize", "8"))
    else:
        findings = lint_account(("passwordSize", "8"))
    finding = only(findings)
    assert (finding.severity, finding.code) == ("error", "password-size")


def test_key_case_is_a_warning() -> None:
    found = lint_account(("Transport", "tls"))
    # The first 'transport' line wins; this one is a duplicate spelled differently.
    assert codes(found) == ["duplicate-key", "key-case"]
    doc = make_doc(
        ("settings", [("ACCOUNTID", "1")]),
        ("account1", [("DOMAIN", "example.com"), ("UserName", "1001")]),
    )
    found = lint_microsip_ini(doc)
    assert codes(found) == ["key-case", "key-case", "key-case"]
    assert all(f.severity == "warning" for f in found)
    assert "'accountId'" in found[0].message


def test_key_before_any_section_is_ignored_by_microsip() -> None:
    doc = make_doc(
        ("Settings", SETTINGS),
        ("Account1", account("Jane Doe", "1001")),
        preamble=[(None, "; header"), ("accountId", "1")],
    )
    finding = only(lint_microsip_ini(doc))
    assert finding.code == "orphan-key"


def test_obsolete_key_warns() -> None:
    finding = only(lint_settings(("silent", "1")))
    assert (finding.severity, finding.code) == ("warning", "obsolete-key")


# ---- values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("Account1", "transport", "tls1.2"),
        ("Account1", "SRTP", "required"),
        ("Settings", "DTMFMethod", "4"),
        ("Settings", "autoAnswer", "0"),  # from a published script: empty means "no"
        ("Settings", "autoAnswerCalls", "idle"),
        ("Settings", "denyIncoming", "0"),  # from a published script: empty means "no"
        ("Settings", "forwarding", "always"),
        ("Settings", "updatesInterval", "weekly-ish"),
        ("Settings", "recordingFormat", "ogg"),
        ("Settings", "defaultAction", "chat"),
    ],
)
def test_bad_enum(section: str, key: str, value: str) -> None:
    findings = lint_settings((key, value)) if section == "Settings" else lint_account((key, value))
    finding = only(findings)
    assert (finding.severity, finding.code, finding.path) == (
        "error",
        "bad-enum",
        f"[{section}] {key}",
    )
    assert f"'{value}'" in finding.message


def test_bad_enum_suggests_the_right_case() -> None:
    finding = only(lint_account(("transport", "TLS")))
    assert finding.code == "bad-enum"
    assert "did you mean 'tls'?" in finding.message


@pytest.mark.parametrize(("key", "value"), [("transport", ""), ("SRTP", ""), ("SRTP", "dtls")])
def test_meaningful_empty_and_new_enum_values(key: str, value: str) -> None:
    assert lint_account((key, value)) == []


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("Account1", "hideCID", "true"),
        ("Account1", "ICE", "yes"),
        ("Settings", "EC", "2"),
        ("Settings", "enableLog", ""),
        ("Settings", "VAD", " 01"),
    ],
)
def test_bad_bool(section: str, key: str, value: str) -> None:
    findings = lint_settings((key, value)) if section == "Settings" else lint_account((key, value))
    finding = only(findings)
    assert (finding.severity, finding.code) == ("error", "bad-bool")


def test_bad_int_and_out_of_range() -> None:
    assert codes(lint_account(("registerRefresh", "5m"))) == ["bad-int"]
    assert codes(lint_settings(("sourcePort", ""))) == ["bad-int"]
    finding = only(lint_settings(("autoAnswerDelay", "1.5")))
    assert finding.code == "bad-int"
    finding = only(lint_settings(("volumeRing", "101")))
    assert finding.code == "out-of-range"
    assert "between 0 and 100" in finding.message
    assert lint_account(("registerRefresh", "-1")) == []


@pytest.mark.parametrize(
    ("section", "key", "limit"),
    [
        ("Account1", "label", 255),
        ("Account1", "server", 1040),
        ("Account1", "displayName", 1040),
        ("Settings", "userAgent", 255),
        ("Settings", "audioCodecs", 511),
    ],
)
def test_length_limits(section: str, key: str, limit: int) -> None:
    fits = "a" * limit

    def run(value: str) -> list[Finding]:
        if section == "Settings":
            return lint_settings((key, value))
        return lint_account((key, value))

    assert [f for f in run(fits) if f.code != "unknown-codec"] == []
    finding = only([f for f in run(fits + "y") if f.code != "unknown-codec"])
    assert (finding.code, finding.path) == ("too-long", f"[{section}] {key}")
    assert str(limit) in finding.message


def test_shortcut_limit_type_and_gap() -> None:
    long_label = "x" * 1020
    doc = make_doc(
        ("Settings", SETTINGS),
        ("Account1", account("Jane Doe", "1001")),
        ("Shortcuts", [("0", f"{long_label};100;call"), ("1", "A;1;dial"), ("3", "B;2;call")]),
    )
    found = lint_microsip_ini(doc)
    assert sorted(codes(found)) == ["bad-shortcut", "shortcut-gap", "too-long"]
    gap = next(f for f in found if f.code == "shortcut-gap")
    assert gap.severity == "warning"
    assert "no key 2" in gap.message


def test_unknown_codec_is_a_warning() -> None:
    finding = only(lint_settings(("audioCodecs", "PCMA/8000/1 G726/8000/1")))
    assert (finding.severity, finding.code) == ("warning", "unknown-codec")
    assert "G726/8000/1" in finding.message


@pytest.mark.parametrize(
    "char", ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\x0b"]
)
def test_control_characters(char: str) -> None:
    finding = only(lint_account(("label", f"Jane{char}Doe")))
    assert (finding.severity, finding.code) == ("error", "control-char")
    assert f"U+{ord(char):04X}" in finding.message
    assert char not in finding.message


def test_tab_is_not_a_control_character() -> None:
    assert lint_account(("label", "Jane\tDoe")) == []


# ---- hooks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        r'"C:\Tools\notify.exe" "two words"',
        r"C:\Tools\notify.exe --title " + '"Incoming call"',
        r'"C:\Program Files\x\notify.exe" --x "y z"',  # outer quotes are stripped first
    ],
)
def test_hook_with_quoted_arguments_warns(value: str) -> None:
    finding = only(lint_settings(("cmdCallRing", value)))
    assert (finding.severity, finding.code) == ("warning", "hook-quotes")
    assert "CommandLineToArgvW" in finding.message


@pytest.mark.parametrize(
    "value",
    [
        r'"C:\Program Files\CRM\popup.exe" --call',
        r'"C:\Tools\notify.exe --flag"',
        r'""C:\Program Files\CRM\popup.exe" --call"',
        r"C:\Tools\notify.exe",
        "",
    ],
)
def test_hook_with_outer_quotes_only_is_fine(value: str) -> None:
    assert lint_settings(("cmdCallRing", value)) == []


# ---- runtime -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mainX", "100"),
        ("callsWidth3", "80"),
        ("volumeOutput", "50"),
        ("AA", "1"),
        ("DND", "0"),
        ("lastCallNumber", "100"),
        ("callsLastKey", "12"),
        ("checkUpdatesTime", "1700000000"),
        ("version", "3.22.3"),
    ],
)
def test_runtime_keys_are_errors_unless_allowed(key: str, value: str) -> None:
    finding = only(lint_settings((key, value)))
    assert (finding.severity, finding.code) == ("error", "runtime-key")
    assert lint_settings((key, value), allow_runtime=True) == []


def test_runtime_keys_are_still_type_checked_when_allowed() -> None:
    # A published template wrote the autoAnswer string into the AA toggle.
    finding = only(lint_settings(("AA", "all"), allow_runtime=True))
    assert finding.code == "bad-bool"


@pytest.mark.parametrize("name", ["Calls", "Dialed", "Contacts", "calls"])
def test_runtime_sections(name: str) -> None:
    doc = make_doc(
        ("Settings", SETTINGS),
        ("Account1", account("Jane Doe", "1001")),
        (name, [("0", "100;Reception;1;1700000000;12;")]),
    )
    finding = only(lint_microsip_ini(doc))
    assert (finding.severity, finding.code, finding.path) == (
        "error",
        "runtime-section",
        f"[{name}]",
    )
    assert lint_microsip_ini(doc, allow_runtime=True) == []


def test_unknown_sections() -> None:
    doc = make_doc(
        ("Settings", SETTINGS),
        ("Account1", account("Jane Doe", "1001")),
        ("General", [("foo", "bar")]),
        ("Account01", [("domain", "example.com")]),
    )
    found = lint_microsip_ini(doc)
    assert codes(found) == ["unknown-section", "unknown-section"]
    assert "leading zeros" in found[1].message


# ---- duplicates --------------------------------------------------------------------------


def test_duplicate_section_and_key_are_warnings() -> None:
    doc = make_doc(
        ("Settings", [*SETTINGS, ("updatesInterval", "daily")]),
        ("Account1", account("Jane Doe", "1001")),
        ("settings", [("updatesInterval", "never")]),
    )
    found = lint_microsip_ini(doc)
    assert codes(found) == ["duplicate-key", "duplicate-section"]
    dup_key, dup_section = found[0], found[1]
    assert dup_key.severity == dup_section.severity == "warning"
    assert "first at line" in dup_key.message
    assert "ignored" in dup_section.message


# ---- accounts ----------------------------------------------------------------------------


def test_account_gap_names_the_first_missing_index() -> None:
    doc = make_doc(
        ("Settings", SETTINGS),
        ("Account1", account("A", "1001")),
        ("Account3", account("C", "1003")),
        ("Account4", account("D", "1004")),
    )
    finding = only(lint_microsip_ini(doc))
    assert (finding.severity, finding.code, finding.path) == ("error", "account-gap", "[Account3]")
    assert "[Account2] is missing" in finding.message


def test_accounts_must_start_at_one() -> None:
    doc = make_doc(("Settings", [("accountId", "2")]), ("Account2", account("B", "1002")))
    assert sorted(codes(lint_microsip_ini(doc))) == ["account-gap", "account-id"]


def test_account_without_domain_or_username() -> None:
    missing = [(k, v) for k, v in account("B", "1002") if k not in ("domain", "username")]
    empty_domain = [(k, "" if k == "domain" else v) for k, v in account("C", "1003")]
    doc = make_doc(
        ("Settings", SETTINGS),
        ("Account1", account("A", "1001")),
        ("Account2", missing),
        ("Account3", empty_domain),
    )
    found = lint_microsip_ini(doc)
    assert [(f.code, f.path) for f in found] == [
        ("account-missing-domain", "[Account2] domain"),
        ("account-missing-username", "[Account2] username"),
        ("account-missing-domain", "[Account3] domain"),
    ]
    assert all(f.severity == "error" for f in found)
    assert found[2].line == doc.sections[3].entries[3].line  # points at the empty domain line
    assert "every account after it" in found[0].message


def test_account_id_on_an_account_without_domain() -> None:
    doc = make_doc(
        ("Settings", SETTINGS),
        ("Account1", [(k, "" if k == "domain" else v) for k, v in account("A", "1")]),
    )
    assert sorted(codes(lint_microsip_ini(doc))) == ["account-id", "account-missing-domain"]


def test_account_id_must_be_present_when_accounts_exist() -> None:
    settings_pairs = [(k, v) for k, v in SETTINGS if k != "accountId"]
    doc = make_doc(("Settings", settings_pairs), ("Account1", account("A", "1001")))
    finding = only(lint_microsip_ini(doc))
    assert (finding.severity, finding.code) == ("error", "account-id")
    assert "accountId=1" in finding.message
    doc = make_doc(
        ("Settings", [*settings_pairs, ("accountId", "")]), ("Account1", account("A", "1"))
    )
    assert codes(lint_microsip_ini(doc)) == ["account-id"]
    doc = make_doc(("Account1", account("A", "1001")))
    assert codes(lint_microsip_ini(doc)) == ["account-id"]
    # No account at all: nothing to select.
    assert lint_microsip_ini(make_doc(("Settings", settings_pairs))) == []


@pytest.mark.parametrize("value", ["3", "abc", "-1", "1.0"])
def test_account_id_must_point_at_an_existing_account(value: str) -> None:
    doc = make_doc(
        ("Settings", [("accountId", value)]),
        ("Account1", account("A", "1001")),
        ("Account2", account("B", "1002")),
    )
    finding = only(lint_microsip_ini(doc))
    assert (finding.severity, finding.code) == ("error", "account-id")


def test_account_id_pointing_at_unloadable_account() -> None:
    no_domain = [(k, v) for k, v in account("A", "1001") if k != "domain"]
    doc = make_doc(
        ("Settings", [("accountId", "2")]),
        ("Account1", no_domain),
        ("Account2", account("B", "1002")),
    )
    found = lint_microsip_ini(doc)
    assert sorted(codes(found)) == ["account-id", "account-missing-domain"]
    assert "cannot load" in next(f for f in found if f.code == "account-id").message


def test_account_id_zero_needs_the_local_account() -> None:
    doc = make_doc(("Settings", [("accountId", "0")]), ("Account1", account("A", "1001")))
    finding = only(lint_microsip_ini(doc))
    assert (finding.severity, finding.code) == ("warning", "account-id")
    doc = make_doc(
        ("Settings", [("accountId", "0"), ("enableLocalAccount", "1")]),
        ("Account1", account("A", "1001")),
    )
    assert lint_microsip_ini(doc) == []


def test_at_most_100_accounts() -> None:
    sections = [(f"Account{i}", account(f"A{i}", str(1000 + i))) for i in range(1, 102)]
    doc = make_doc(("Settings", [("accountId", "1")]), *sections)
    found = [f for f in lint_microsip_ini(doc) if f.code != "inactive-account"]
    assert (only(found).code, only(found).path) == ("too-many-accounts", "[Account101]")
    within = lint_microsip_ini(make_doc(("Settings", [("accountId", "1")]), *sections[:100]))
    # Every account but the active one is reported as never registering, and nothing else.
    assert [f.path for f in within] == [f"[Account{i}]" for i in range(2, 101)]
    assert set(codes(within)) == {"inactive-account"}


# ---- override.ini ------------------------------------------------------------------------


def test_override_allows_partial_accounts() -> None:
    doc = make_doc(
        ("Settings", [("updatesInterval", "never"), ("DTMFMethod", "2")]),
        ("Account3", [("password", CANARY)]),
        ("Account0", [("label", "Local")]),
    )
    assert lint_override_ini(doc, file="override.ini") == []


def test_override_applies_the_same_key_checks() -> None:
    doc = make_doc(
        ("Settings", [("updateInterval", "never"), ("accountId", "x"), ("EC", "on")]),
        ("Account2", [("transport", "sctp"), ("STUN", "stun.example.com")]),
    )
    found = lint_override_ini(doc, file="override.ini")
    assert codes(found) == ["non-key", "bad-int", "bad-bool", "bad-enum", "non-key"]
    assert {f.file for f in found} == {"override.ini"}


def test_override_rejects_runtime_data_and_other_sections() -> None:
    doc = make_doc(
        ("Settings", [("mainX", "10"), ("AA", "1")]),
        ("Shortcuts", [("0", "A;1;call")]),
        ("Calls", [("0", "x")]),
        ("General", [("x", "1")]),
    )
    assert codes(lint_override_ini(doc)) == [
        "runtime-key",
        "runtime-key",
        "unknown-section",
        "runtime-section",
        "unknown-section",
    ]


# ---- findings and secrets ----------------------------------------------------------------


def test_finding_is_frozen_and_prints_location() -> None:
    finding = only(lint_account(("tranport", "tls")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.code = "x"  # type: ignore[misc]
    text = str(finding)
    assert text.startswith(f"pc01:{finding.line}: error[unknown-key]: [Account1] tranport:")
    assert has_errors([finding])
    assert not has_errors([dataclasses.replace(finding, severity="warning")])


def test_a_finding_names_where_its_value_was_set() -> None:
    doc = make_doc(("Settings", SETTINGS), ("Account1", [*account("A", "1001"), ("tranport", "x")]))
    set_at = Source("users/a.yaml", 7, 5, "user a")
    asked: list[tuple[str, str]] = []

    def origin(section: str, key: str) -> Source | None:
        asked.append((section, key))
        return set_at if (section, key) == ("Account1", "tranport") else None

    finding = only(lint_microsip_ini(doc, file="pc01", origin=origin))
    assert (finding.code, finding.source) == ("unknown-key", set_at)
    assert ("Account1", "tranport") in asked
    assert str(finding).endswith("(value set at users/a.yaml:7:5 (user a))")


def test_long_values_are_truncated_in_messages() -> None:
    value = "z" * 300
    found = lint_settings(("autoAnswer", value))
    assert codes(found) == ["too-long", "bad-enum"]
    finding = found[1]
    assert value not in finding.message
    assert len(finding.message) < 200


def test_findings_are_in_line_order_and_use_known_codes() -> None:
    doc = make_doc(
        ("Settings", [("updateInterval", "x"), ("EC", "9"), ("mainX", "1")]),
        ("Account2", [("transport", "x")]),
        ("Calls", []),
    )
    found = lint_microsip_ini(doc)
    assert set(codes(found)) <= FINDING_CODES
    lines = [f.line for f in found if f.line]
    assert lines == sorted(lines)


def _password_mistakes(password: str) -> IniDocument:
    return make_doc(
        ("Settings", [("accountId", "1"), ("password", password), ("passwordSize", password)]),
        (
            "Account1",
            [
                ("domain", "example.com"),
                ("username", "1001"),
                ("password", password + "\n" + password),
                ("Password", password),
                ("PASSWORD", password * 120),
            ],
        ),
        ("Account2", [("password", f'"{password}\x00"')]),
        ("Account4", [("password", password)]),
    )


def test_no_message_contains_a_password_value() -> None:
    findings = lint_microsip_ini(_password_mistakes(CANARY))
    findings += lint_override_ini(_password_mistakes(CANARY))
    assert {"too-long", "control-char", "duplicate-key", "unknown-key"} <= set(codes(findings))
    for finding in findings:
        assert CANARY not in finding.message
        assert CANARY not in str(finding)


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=1100).map(lambda s: "Pw-7731-" + s))
def test_no_message_contains_any_password_value(password: str) -> None:
    doc = make_doc(
        ("Settings", [("accountId", "1")]),
        ("Account1", [("domain", "example.com"), ("username", "1"), ("password", password)]),
        ("Account2", [("password", password), ("password", password)]),
    )
    findings = lint_microsip_ini(doc) + lint_override_ini(doc)
    for finding in findings:
        assert "Pw-7731-" not in str(finding)


# ---- MicroSIP's pitfalls -----------------------------------------------------------------

HOOK_KEYS = [
    "cmdOutgoingCall",
    "cmdIncomingCall",
    "cmdCallRing",
    "cmdCallAnswer",
    "cmdCallAnswerVideo",
    "cmdCallBusy",
    "cmdCallStart",
    "cmdCallEnd",
]


def test_a_dialing_prefix_without_a_dial_plan_warns_where_it_is_set() -> None:
    set_at = Source("groups.yaml", 11, 7, "group site-berlin")
    pairs = [*account("A", "1001"), ("dialingPrefix", "0")]
    doc = make_doc(("Settings", SETTINGS), ("Account1", pairs))

    def origin(section: str, key: str) -> Source | None:
        return set_at if (section, key) == ("Account1", "dialingPrefix") else None

    finding = only(lint_microsip_ini(doc, file="pc01", origin=origin))
    assert (finding.severity, finding.code, finding.path) == (
        "warning",
        "dialing-prefix",
        "[Account1] dialingPrefix",
    )
    assert finding.line == doc.sections[1].entries[-1].line
    assert finding.source == set_at
    for words in ("('0')", "longer than 3 characters", "leading '+'", "4-digit", "dialPlan"):
        assert words in finding.message
    assert not has_errors([finding])


@pytest.mark.parametrize(
    "pairs",
    [
        [("dialingPrefix", "0"), ("dialPlan", "(xxxx|0x.)")],  # the dial plan decides
        [("dialingPrefix", "")],
        [("dialingPrefix", '""')],  # MicroSIP strips the quotes: empty
        [("dialPlan", "(xxxx|0x.)")],
        [],
    ],
)
def test_no_dialing_prefix_warning_without_a_prefix_or_with_a_dial_plan(
    pairs: list[tuple[str, str]],
) -> None:
    assert codes(lint_account(("dialingPrefix", "0"))) == ["dialing-prefix"]
    assert lint_account(*pairs) == []


def test_the_dialing_prefix_is_checked_in_every_account_but_the_local_one() -> None:
    doc = make_doc(
        ("Settings", [("accountId", "1"), ("enableLocalAccount", "1")]),
        ("Account0", [("label", "Local"), ("dialingPrefix", "0")]),  # calls by IP: no prefix
        ("Account1", account("A", "1001")),
        ("Account2", [*account("B", "1002"), ("dialingPrefix", "9")]),
    )
    found = [f for f in lint_microsip_ini(doc) if f.code == "dialing-prefix"]
    assert [f.path for f in found] == ["[Account2] dialingPrefix"]


def test_every_account_but_the_active_one_is_said_never_to_register() -> None:
    doc = make_doc(
        ("Settings", [*SETTINGS[:1], ("accountId", "2"), *SETTINGS[2:]]),
        ("Account1", account("Jane Doe", "1001")),
        ("Account2", account("Front desk", "1002")),
        ("Account3", [(k, v) for k, v in account("Hotline", "1003") if k != "label"]),
    )
    set_at = Source("users/berlin.yaml", 14, 7, "account jane/direct")

    def origin(section: str, key: str) -> Source | None:
        return set_at if (section, key) == ("Account1", "") else None

    found = lint_microsip_ini(doc, file="pc01", origin=origin)
    assert [(f.severity, f.code, f.path) for f in found] == [
        ("warning", "inactive-account", "[Account1]"),
        ("warning", "inactive-account", "[Account3]"),
    ]
    first, third = found
    assert (first.line, third.line) == (doc.sections[1].line, doc.sections[3].line)
    assert first.source == set_at
    assert "('Jane Doe')" in first.message and "accountId=2" in first.message
    assert "registers only the active account" in third.message
    assert "paid MicroSIP edition" in third.message
    assert not has_errors(found)


def test_one_account_or_an_unusable_account_id_gives_no_inactive_account() -> None:
    two = (("Account1", account("A", "1001")), ("Account2", account("B", "1002")))
    assert codes(lint_microsip_ini(make_doc(("Settings", SETTINGS), *two))) == ["inactive-account"]
    one = make_doc(("Settings", SETTINGS), ("Account1", account("A", "1")))
    assert lint_microsip_ini(one) == []
    # An accountId that selects no account is reported as such, not as inactive accounts.
    for value in ("3", "x", ""):
        doc = make_doc(("Settings", [("accountId", value)]), *two)
        assert codes(lint_microsip_ini(doc)) == ["account-id"], value
    local = make_doc(("Settings", [("accountId", "0"), ("enableLocalAccount", "1")]), *two)
    assert lint_microsip_ini(local) == []


@pytest.mark.parametrize("key", ["cmdOutgoingCall", "usersDirectory"])
@pytest.mark.parametrize("macro", ["{password}", "{md5_password}"])
def test_a_password_macro_where_microsip_expands_it_is_an_error(key: str, macro: str) -> None:
    value = f"https://crm.example.com/call?u={{username}}&p={macro}"
    if key.startswith("cmd"):
        value = rf"C:\Tools\dial.exe --auth {macro}"
    finding = only(lint_settings((key, value)))
    assert (finding.severity, finding.code, finding.path) == (
        "error",
        "password-expansion",
        f"[Settings] {key}",
    )
    assert macro in finding.message
    assert ("command line" if key.startswith("cmd") else "URL") in finding.message
    # The same key in override.ini (an enforced value) is the same error.
    doc = make_doc(("Settings", [(key, value)]))
    assert codes(lint_override_ini(doc)) == ["password-expansion"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # Only cmdOutgoingCall goes through MicroSIP's macro expansion.
        ("cmdIncomingCall", r"C:\Tools\popup.exe {password}"),
        ("cmdCallEnd", r"C:\Tools\popup.exe {md5_password}"),
        # MicroSIP replaces the exact lower-case spelling only.
        ("cmdOutgoingCall", r"C:\Tools\dial.exe {Password}"),
        ("usersDirectory", "https://pbx.example.com/dir?user={username}&label={label}"),
        ("usersDirectory", "https://pbx.example.com/dir?user=%s"),  # the first slot: username
        ("usersDirectory", "https://pbx.example.com/dir?pass=%d"),
    ],
)
def test_no_password_expansion_where_microsip_does_not_expand(key: str, value: str) -> None:
    expanded = lint_settings(("cmdOutgoingCall", r"C:\Tools\dial.exe {password}"))
    assert codes(expanded) == ["password-expansion"]
    assert lint_settings((key, value)) == []


@pytest.mark.parametrize(
    "value",
    [
        "https://pbx.example.com/dir?user=%s&pass=%s",
        "https://pbx.example.com/dir/%s/%s/%s",
        "https://pbx.example.com/dir?user=%s&pass=*s",  # MicroSIP turns *s into %s first
    ],
)
def test_the_password_slot_of_the_directory_url_is_an_error(value: str) -> None:
    finding = only(lint_settings(("usersDirectory", value)))
    assert (finding.severity, finding.code) == ("error", "password-expansion")
    assert "username, password, server" in finding.message
    assert "%s number 2" in finding.message


@pytest.mark.parametrize("key", HOOK_KEYS)
def test_every_hook_that_runs_a_batch_file_warns_with_the_safe_form(key: str) -> None:
    finding = only(lint_settings((key, r"C:\Scripts\crm-popup.bat --source microsip")))
    assert (finding.severity, finding.code, finding.path) == (
        "warning",
        "hook-batch",
        f"[Settings] {key}",
    )
    assert "cmd.exe" in finding.message and "unquoted" in finding.message
    assert "$args[-1]" in finding.message  # after the hook's own arguments
    assert (
        f"{key}=powershell.exe -NoProfile -NonInteractive -File C:\\Scripts\\crm-popup.ps1"
        " --source microsip."
    ) in finding.message
    assert "without spaces" not in finding.message


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (r"C:\SCRIPTS\POPUP.CMD", r"-File C:\SCRIPTS\POPUP.ps1."),
        (r'"C:\Program Files\CRM\popup.bat" --x', r"-File C:\Program Files\CRM\popup.ps1 --x"),
        (r"C:\Windows\System32\cmd.exe /c C:\Scripts\popup.bat", r"-File C:\Scripts\on-call.ps1"),
        ("cmd /c echo", r"-File C:\Scripts\on-call.ps1"),
        ("popup.bat", "-File popup.ps1"),
    ],
)
def test_batch_files_and_cmd_exe_in_hooks(value: str, shown: str) -> None:
    finding = only(lint_settings(("cmdIncomingCall", value)))
    assert finding.code == "hook-batch"
    assert shown in finding.message
    assert ("folder without spaces" in finding.message) == ("Program Files" in value)


@pytest.mark.parametrize(
    "value",
    [
        r'"C:\Program Files\CRM\popup.exe" --call',
        r"powershell.exe -NoProfile -NonInteractive -File C:\Scripts\popup.ps1",
        r"C:\Tools.bat\popup.exe",  # a folder's name is not the program's
        r"C:\Tools\runner.exe C:\Scripts\popup.bat",  # the program decides how it runs it
        r"C:\Tools\cmdline.exe",
        "",
    ],
)
def test_hooks_that_start_no_cmd_exe_do_not_warn(value: str) -> None:
    assert codes(lint_settings(("cmdIncomingCall", r"C:\Scripts\popup.bat"))) == ["hook-batch"]
    assert lint_settings(("cmdIncomingCall", value)) == []


def _recording_doc(*pairs: tuple[str, str]) -> IniDocument:
    settings_pairs = [(k, v) for k, v in SETTINGS if k != "recordingPath"]
    return make_doc(("Settings", [*settings_pairs, *pairs]), ("Account1", account("A", "1")))


def test_automatic_recording_without_a_folder_warns() -> None:
    doc = _recording_doc(("autoRecording", "1"))
    finding = only(lint_microsip_ini(doc, file="pc01"))
    assert (finding.severity, finding.code, finding.path) == (
        "warning",
        "recording-path",
        "[Settings] autoRecording",
    )
    assert finding.line == doc.sections[0].entries[-1].line
    assert "<Desktop>\\Recordings" in finding.message and "OneDrive" in finding.message
    empty = only(lint_microsip_ini(_recording_doc(("autoRecording", "1"), ("recordingPath", ""))))
    assert empty.code == "recording-path" and "empty recordingPath" in empty.message
    # A portable MicroSIP records to its own Recordings folder by default, not the Desktop.
    assert lint_microsip_ini(doc, portable=True) == []
    portable_empty = _recording_doc(("autoRecording", "1"), ("recordingPath", ""))
    assert codes(lint_microsip_ini(portable_empty, portable=True)) == ["recording-path"]


@pytest.mark.parametrize(
    "pairs",
    [
        [("autoRecording", "1"), ("recordingPath", r"D:\Recordings")],
        [("autoRecording", "0")],
        [("recordingButton", "1")],
        [],
    ],
)
def test_no_recording_warning_with_a_folder_or_without_automatic_recording(
    pairs: list[tuple[str, str]],
) -> None:
    without_folder = _recording_doc(("autoRecording", "1"))
    assert codes(lint_microsip_ini(without_folder)) == ["recording-path"]
    assert lint_microsip_ini(_recording_doc(*pairs)) == []


def test_pitfall_checks_never_read_a_hidden_line() -> None:
    # A line that holds a password outside its key is hidden: no check may look at it (its
    # value would be quoted) or act as if it were absent.
    doc = make_doc(
        ("Settings", [("accountId", "1"), ("autoRecording", "1"), ("recordingPath", CANARY)]),
        ("Account1", [*account("A", "1001"), ("dialingPrefix", CANARY)]),
        ("Account2", [*account(CANARY, "1002")]),
    )
    settings, first, second = doc.sections
    # recordingPath, dialingPrefix and Account2's label
    hidden = frozenset({settings.entries[2].line, first.entries[-1].line, second.entries[0].line})
    found = lint_microsip_ini(doc, hidden=hidden)
    assert codes(found) == ["inactive-account"]
    assert CANARY not in str(found[0])
    assert "('" not in found[0].message  # the hidden label is not named


def test_docs_list_every_finding_code() -> None:
    docs = Path(__file__).parents[1] / "docs" / "validation.md"
    text = docs.read_text(encoding="utf-8")
    table = text.split("### Codes of the rendered files' lint", 1)[1].split("\n#", 1)[0]
    listed = re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.MULTILINE)
    assert len(listed) == len(set(listed))
    assert set(listed) == FINDING_CODES
