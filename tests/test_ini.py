"""Tests for provisioner.microsip.ini: the MicroSIP INI codec and the three-way merge."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioner.errors import LintError
from provisioner.microsip import ini as ini_module
from provisioner.microsip.ini import (
    MergeConflict,
    MergeResult,
    decode_ini_bytes,
    encode_ini,
    has_utf8_bom,
    is_account_section,
    merge_ini,
    normalize_line_endings,
    parse_ini,
    reset_ini,
    serialize_ini,
)
from provisioner.microsip.inidoc import IniDocument, IniEntry, IniSection

DATA = Path(__file__).parent / "data" / "ini"
PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Flat = dict[tuple[str, str], str]


# --------------------------------------------------------------------------- helpers


def ini(text: str) -> IniDocument:
    """Parse a test snippet written with LF line endings."""
    return parse_ini(text)


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def flat(doc: IniDocument | None) -> Flat:
    """What MicroSIP reads: (section, key) lower-cased → unquoted value, first one wins."""
    found: Flat = {}
    seen: set[str] = set()
    for section in () if doc is None else doc.sections:
        name = section.name.lower()
        if name in seen:
            continue
        seen.add(name)
        for entry in section.entries:
            if entry.key is not None:
                found.setdefault((name, entry.key.lower()), entry.value)
    return found


def only(values: Flat, section: str) -> dict[str, str]:
    return {k: v for (s, k), v in values.items() if s == section}


def section_names(doc: IniDocument | None) -> set[str]:
    return set() if doc is None else {s.name.lower() for s in doc.sections}


def account(name: str) -> bool:
    return re.fullmatch(r"account[1-9][0-9]*", name) is not None


def renumbered(doc: IniDocument) -> IniDocument:
    """``doc`` with the line numbers its canonical serialization gives (computed here, apart)."""
    number = 0
    preamble = []
    for entry in doc.preamble:
        number += 1
        preamble.append(dataclasses.replace(entry, line=number))
    sections = []
    for section in doc.sections:
        number += 1
        header = number
        entries = []
        for entry in section.entries:
            number += 1
            entries.append(dataclasses.replace(entry, line=number))
        sections.append(IniSection(section.name, tuple(entries), header))
    return IniDocument(tuple(sections), tuple(preamble))


# --------------------------------------------------------------------------- encoding


def test_encode_is_utf16le_with_bom_and_crlf_byte_exact() -> None:
    data = encode_ini("[Account1]\ndisplayName=Müller\r\nlabel=東京\r")
    assert data == (
        b"\xff\xfe"
        b"[\x00A\x00c\x00c\x00o\x00u\x00n\x00t\x001\x00]\x00\r\x00\n\x00"
        b"d\x00i\x00s\x00p\x00l\x00a\x00y\x00N\x00a\x00m\x00e\x00=\x00"
        b"M\x00\xfc\x00l\x00l\x00e\x00r\x00\r\x00\n\x00"
        b"l\x00a\x00b\x00e\x00l\x00=\x00\x71\x67\xac\x4e\r\x00\n\x00"
    )


def test_encode_never_leaves_a_bare_line_feed_or_carriage_return() -> None:
    text = encode_ini("a\nb\r\nc\rd\n\n").decode("utf-16")
    assert text == "a\r\nb\r\nc\r\nd\r\n\r\n"
    assert normalize_line_endings("x\r\r\ny\n") == "x\r\n\r\ny\r\n"


def test_encode_empty_text_is_only_the_bom() -> None:
    assert encode_ini("") == b"\xff\xfe"


@pytest.mark.parametrize(
    ("text", "line"),
    [("[Account1]\npassword=s3cr\x00et\n", 2), ("[Settings]\r\nlabel=\ud83d\n", 2)],
)
def test_encode_refuses_nul_and_lone_surrogates_without_echoing_the_value(
    text: str, line: int
) -> None:
    with pytest.raises(LintError) as caught:
        encode_ini(text)
    message = str(caught.value)
    assert f"line {line}" in message
    assert "s3cr" not in message


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")))
@PROPS
def test_decode_of_encode_is_the_normalised_text(text: str) -> None:
    data = encode_ini(text)
    assert data[:2] == b"\xff\xfe"
    assert decode_ini_bytes(data) == normalize_line_endings(text)
    body = data[2:].decode("utf-16-le")
    assert re.search(r"\r(?!\n)|(?<!\r)\n", body) is None


# --------------------------------------------------------------------------- decoding


def test_decode_utf16_file_written_by_microsip() -> None:
    data = (DATA / "microsip_written.ini").read_bytes()
    assert not has_utf8_bom(data)
    doc = parse_ini(decode_ini_bytes(data))
    assert doc.get("ACCOUNT1", "displayname") == "東京 Office"
    assert doc.get("account1", "Label") == "Müller"
    ring = doc.section("settings")
    assert ring is not None
    device = ring.entry("AUDIORINGDEVICE")
    assert device is not None
    assert device.raw_value == '"Speakers (Realtek High Definition Audio)"'
    assert device.value == "Speakers (Realtek High Definition Audio)"
    assert doc.get("Calls", "0") == "1002;Reception;0;1700000000;12;"


def test_canonical_file_round_trips_byte_for_byte() -> None:
    data = (DATA / "microsip_written.ini").read_bytes()
    text = decode_ini_bytes(data)
    assert serialize_ini(parse_ini(text)) == text
    assert encode_ini(serialize_ini(parse_ini(text))) == data


def test_decode_ansi_file_uses_the_given_code_page() -> None:
    data = (DATA / "legacy_cp1252.ini").read_bytes()
    assert parse_ini(decode_ini_bytes(data)).get("Account1", "displayName") == "Müller"
    # The same byte 0xFC is a different letter on a Cyrillic system.
    assert parse_ini(decode_ini_bytes(data, "cp1251")).get("Account1", "displayName") == "Mьller"


def test_decode_utf8_without_bom_gives_mojibake_like_microsip() -> None:
    data = "[Account1]\r\ndisplayName=Müller\r\n".encode()
    assert parse_ini(decode_ini_bytes(data)).get("Account1", "displayName") == "MÃ¼ller"


def test_utf8_bom_trap_loses_the_first_section() -> None:
    data = (DATA / "utf8_bom.ini").read_bytes()
    assert has_utf8_bom(data)
    text = decode_ini_bytes(data)
    assert text.startswith("ï»¿[Settings]")
    doc = parse_ini(text)
    assert doc.section("Settings") is None
    assert doc.get("Settings", "accountId") is None
    assert [s.name for s in doc.sections] == ["Account1"]
    assert doc.get("Account1", "domain") == "pbx.example.test"
    assert doc.preamble == ()


def test_decode_is_lenient_on_broken_utf16_and_empty_files() -> None:
    assert decode_ini_bytes(b"") == ""
    assert decode_ini_bytes(b"\xff\xfe") == ""
    assert decode_ini_bytes(b"\xff\xfea\x00b") == "a\ufffd"
    assert not has_utf8_bom(b"\xef\xbb")


# --------------------------------------------------------------------------- parsing


def test_parse_profile_api_semantics() -> None:
    text = (
        "; managed by provisioner\r\n"
        "stray=ignored before any section\r\n"
        "\r\n"
        "[ Settings ]\r\n"
        "  AccountId = 1 \r\n"
        "accountid=2\r\n"
        "no equals sign here\r\n"
        "# hash comment\r\n"
        "url=http://x/?a=b\r\n"
        "=no key\r\n"
        "[settings]\r\n"
        "accountId=3\r\n"
        "[Account1] ; trailing text after the header\r\n"
        "label='single'\r\n"
        'audioRingDevice=""\r\n'
        "[Broken\r\n"
        "[Broken=still a key\r\n"
    )
    doc = parse_ini(text)
    assert [e.raw_value for e in doc.preamble] == ["; managed by provisioner"]
    assert [s.name for s in doc.sections] == ["Settings", "settings", "Account1"]
    assert doc.get("SETTINGS", "accountID") == "1"  # first section and first key win
    settings_section = doc.sections[0]
    assert settings_section.line == 4
    assert [(e.key, e.raw_value, e.line) for e in settings_section.entries] == [
        ("AccountId", "1", 5),
        ("accountid", "2", 6),
        (None, "# hash comment", 8),
        ("url", "http://x/?a=b", 9),
    ]
    assert doc.get("account1", "label") == "single"
    assert doc.get("account1", "audioRingDevice") == ""
    assert doc.get("account1", "[Broken") == "still a key"
    assert doc.get("Settings", "stray") is None


def test_parse_accepts_every_line_ending_and_counts_lines() -> None:
    doc = parse_ini("[A]\ra=1\nb=2\r\nc=3\n\r[B]")
    assert [(e.key, e.line) for e in doc.sections[0].entries] == [("a", 2), ("b", 3), ("c", 4)]
    assert doc.sections[1].line == 6


def test_parse_empty_text() -> None:
    assert parse_ini("") == IniDocument()


def _reference_parse(text: str) -> IniDocument:
    """The parser spelled out line by line with the classifier the serializer checks against."""
    preamble: list[IniEntry] = []
    sections: list[tuple[str, int, list[IniEntry]]] = []
    for number, raw in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        line = ini_module._classify(raw)
        if line.kind == "header":
            sections.append((line.name, number, []))
        elif line.kind == "comment":
            (sections[-1][2] if sections else preamble).append(IniEntry(None, line.value, number))
        elif line.kind == "key" and sections:
            sections[-1][2].append(IniEntry(line.name, line.value, number))
    built = tuple(IniSection(name, tuple(entries), at) for name, at, entries in sections)
    return IniDocument(built, tuple(preamble))


_INI_LINES = st.lists(
    st.one_of(
        st.sampled_from(["[A]", " [b] x", "[", "[]", "k=v", " k = v ", "=v", "k", ";c", " #c", ""]),
        st.text(alphabet=st.sampled_from("[]=;# \tk\x85\u2028"), max_size=8),
    ),
    max_size=12,
).map("\r\n".join)


@given(_INI_LINES)
@PROPS
def test_parse_agrees_with_the_line_classifier(text: str) -> None:
    assert parse_ini(text) == _reference_parse(text)


# --------------------------------------------------------------------------- serializing


def test_serialize_canonical_form() -> None:
    doc = IniDocument(
        sections=(
            IniSection("Settings", (IniEntry("accountId", "1"), IniEntry(None, "; note"))),
            IniSection("Account1", (IniEntry("audioRingDevice", '"Mic (USB)"'),)),
            IniSection("Empty"),
        ),
        preamble=(IniEntry(None, "# header"),),
    )
    assert serialize_ini(doc) == (
        "# header\r\n[Settings]\r\naccountId=1\r\n; note\r\n"
        '[Account1]\r\naudioRingDevice="Mic (USB)"\r\n[Empty]\r\n'
    )
    assert serialize_ini(IniDocument()) == ""


@pytest.mark.parametrize(
    "doc",
    [
        IniDocument((IniSection("Account1", (IniEntry("password", "s3cret\r\n[Account2]"),)),)),
        IniDocument((IniSection("Account1", (IniEntry("password", "s3cret\nx=1"),)),)),
        IniDocument((IniSection("A", (IniEntry("a=b", "s3cret"),)),)),
        IniDocument((IniSection("A", (IniEntry(" a", "s3cret"),)),)),
        IniDocument((IniSection("A", (IniEntry(";a", "s3cret"),)),)),
        IniDocument((IniSection("A", (IniEntry("[x]", "s3cret"),)),)),
        IniDocument((IniSection("A", (IniEntry("", "s3cret"),)),)),
        IniDocument((IniSection("A", (IniEntry(None, "not a comment s3cret"),)),)),
        IniDocument((IniSection("A]B"),)),
        IniDocument((IniSection("A\nB"),)),
        IniDocument(preamble=(IniEntry("key", "s3cret"),)),
    ],
)
def test_serialize_refuses_what_would_not_read_back(doc: IniDocument) -> None:
    with pytest.raises(LintError) as caught:
        serialize_ini(doc)
    assert "s3cret" not in str(caught.value)


_LINE_SAFE = st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\x00")


def _stripped(min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(_LINE_SAFE, max_size=12).map(str.strip).filter(lambda t: len(t) >= min_size)


_KEY_TEXT = _stripped(1).filter(lambda k: "=" not in k and k[0] not in ";#[")
_SECTION_TEXT = _stripped().filter(lambda n: "]" not in n)
_COMMENT_TEXT = st.builds(lambda c, t: (c + t).strip(), st.sampled_from(";#"), _stripped())
_ENTRY = st.one_of(
    st.builds(IniEntry, _KEY_TEXT, _stripped()),
    st.builds(IniEntry, st.none(), _COMMENT_TEXT),
)
_DOC = st.builds(
    IniDocument,
    st.lists(
        st.builds(IniSection, _SECTION_TEXT, st.lists(_ENTRY, max_size=5).map(tuple)),
        max_size=5,
    ).map(tuple),
    st.lists(st.builds(IniEntry, st.none(), _COMMENT_TEXT), max_size=2).map(tuple),
)


@given(_DOC)
@PROPS
def test_parse_of_serialize_round_trips(doc: IniDocument) -> None:
    text = serialize_ini(doc)
    assert text == "" or text.endswith("\r\n")
    assert parse_ini(text) == renumbered(doc)
    assert decode_ini_bytes(encode_ini(text)) == text


# --------------------------------------------------------------------------- merge: examples

RUNTIME_KEYS = frozenset({("settings", "mainx"), ("settings", "volumeoutput")})

THEIRS = """\
; written by hand
[Settings]
accountId=1
mainX=333
volumeOutput=40
updatesInterval=weekly
volumeRing=50
enableLog=1
audioRingDevice="Speakers"
; user note
[Account1]
label=old
domain=old.example
; dropped with the account section
[Account2]
domain=user.example
[Calls]
0=1002;Reception;0;1700000000;12;
"""


def test_merge_first_push_into_a_file_microsip_wrote() -> None:
    ours = ini(
        "[Settings]\naccountId=1\nupdatesInterval=never\nmainX=0\naudioRingDevice=Speakers\n"
        "[Account1]\nlabel=Alice\ndomain=pbx.example\n[Shortcuts]\n0=Reception;1002;call\n"
    )
    result = merge_ini(base=None, ours=ours, theirs=ini(THEIRS), runtime_keys=RUNTIME_KEYS)
    assert serialize_ini(result.document) == crlf(
        "; written by hand\n"
        "[Settings]\n"
        "accountId=1\n"
        "mainX=333\n"
        "volumeOutput=40\n"
        "updatesInterval=never\n"
        "volumeRing=50\n"
        "enableLog=1\n"
        'audioRingDevice="Speakers"\n'
        "; user note\n"
        "[Account1]\n"
        "label=Alice\n"
        "domain=pbx.example\n"
        "[Calls]\n"
        "0=1002;Reception;0;1700000000;12;\n"
        "[Shortcuts]\n"
        "0=Reception;1002;call\n"
    )
    assert result.conflicts == ()
    assert result.changed_keys == (
        ("Settings", "updatesInterval"),
        ("Account1", "label"),
        ("Account1", "domain"),
        ("Shortcuts", "0"),
        ("Account2", "domain"),
    )
    assert parse_ini(serialize_ini(result.document)) == result.document


def test_merge_keeps_what_the_user_changed_since_the_last_push() -> None:
    base = ini("[Settings]\nvolumeRing=100\nenableLog=0\nringingSound=a.wav\n")
    ours = ini("[Settings]\nvolumeRing=100\nenableLog=0\n")
    theirs = ini("[Settings]\nvolumeRing=50\nenableLog=0\nringingSound=a.wav\nAA=1\n")
    result = merge_ini(base=base, ours=ours, theirs=theirs)
    assert flat(result.document) == {
        ("settings", "volumering"): "50",
        ("settings", "enablelog"): "0",
        ("settings", "aa"): "1",
    }
    assert result.changed_keys == (("Settings", "ringingSound"),)


def test_merge_key_dropped_from_ours_survives_when_theirs_changed_it() -> None:
    base = ini("[Settings]\nringingSound=a.wav\n[Custom]\nx=1\n")
    ours = ini("[Settings]\naccountId=1\n")
    theirs = ini("[Settings]\nringingSound=b.wav\n[Custom]\nx=1\n")
    result = merge_ini(base=base, ours=ours, theirs=theirs)
    assert serialize_ini(result.document) == crlf("[Settings]\nringingSound=b.wav\naccountId=1\n")
    assert result.changed_keys == (("Settings", "accountId"), ("Custom", "x"))


def test_merge_conflict_takes_ours_and_records_no_value() -> None:
    base = ini("[Account0]\nlabel=one\n[Settings]\nSTUN=stun.a\n")
    ours = ini("[Settings]\nstun=stun.b\n[Account0]\nlabel=two\n")
    theirs = ini("[settings]\nSTUN=stun.c\n[account0]\nlabel=one\n")
    result = merge_ini(base=base, ours=ours, theirs=theirs)
    assert result.document.get("Settings", "STUN") == "stun.b"
    assert result.document.get("Account0", "label") == "two"
    assert result.conflicts == (MergeConflict("Settings", "stun"),)
    assert [f.name for f in dataclasses.fields(MergeConflict)] == ["section", "key"]
    assert "stun.c" not in repr(result.conflicts)
    # The key spelling of theirs' line is replaced with ours', the section keeps theirs'.
    assert serialize_ini(result.document) == crlf(
        "[settings]\nstun=stun.b\n[account0]\nlabel=two\n"
    )


def test_merge_conflict_when_theirs_deleted_a_key_ours_changed() -> None:
    base = ini("[Settings]\nSTUN=stun.a\n")
    ours = ini("[Settings]\nSTUN=stun.b\n")
    result = merge_ini(base=base, ours=ours, theirs=ini("[Settings]\n"))
    assert result.document.get("Settings", "STUN") == "stun.b"
    assert result.conflicts == (MergeConflict("Settings", "STUN"),)


def test_merge_enforced_keys_win_everywhere() -> None:
    enforced = ini(
        "[Settings]\nupdatesInterval=never\nmainX=0\n[Account1]\ntransport=tls\n[Calls]\n0=x\n"
        "[Policy]\nlocked=1\n"
    )
    base = ini("[Settings]\nupdatesInterval=weekly\n")
    ours = ini("[Settings]\nupdatesInterval=weekly\n[Account1]\ndomain=d\ntransport=udp\n")
    theirs = ini("[Settings]\nupdatesInterval=daily\nmainX=5\n[Calls]\n0=y\n1=z\n")
    result = merge_ini(
        base=base, ours=ours, theirs=theirs, enforced=enforced, runtime_keys=RUNTIME_KEYS
    )
    assert serialize_ini(result.document) == crlf(
        "[Settings]\nupdatesInterval=never\nmainX=0\n[Calls]\n0=x\n1=z\n"
        "[Account1]\ndomain=d\ntransport=tls\n[Policy]\nlocked=1\n"
    )
    assert result.conflicts == ()


def test_merge_equal_values_keep_theirs_quoting_and_are_not_changes() -> None:
    base = ini("[Settings]\naudioRingDevice=Old\n")
    ours = ini("[Settings]\naudioRingDevice=Speakers\n")
    theirs = ini('[Settings]\naudioRingDevice="Speakers"\n')
    result = merge_ini(base=base, ours=ours, theirs=theirs)
    assert serialize_ini(result.document) == crlf('[Settings]\naudioRingDevice="Speakers"\n')
    assert result.changed_keys == ()
    assert result.conflicts == ()


def test_merge_new_settings_section_goes_first_and_new_sections_follow_ours() -> None:
    ours = ini("[Account1]\ndomain=d\n[Shortcuts]\n0=a;1;call\n[Settings]\naccountId=1\n")
    theirs = ini("[Custom]\nmine=1\n")
    result = merge_ini(base=None, ours=ours, theirs=theirs)
    names = [s.name for s in result.document.sections]
    assert names == ["Settings", "Custom", "Account1", "Shortcuts"]


def test_merge_account_sections_are_wholly_ours_and_contiguous() -> None:
    theirs = ini(
        "[Account1]\ndomain=a\nlabel=user label\n[Account2]\ndomain=b\n[ACCOUNT3]\ndomain=c\n"
        "[Account0]\nlabel=local\n"
    )
    ours = ini("[Account1]\ndomain=a\n")
    result = merge_ini(base=None, ours=ours, theirs=theirs)
    assert serialize_ini(result.document) == crlf("[Account1]\ndomain=a\n[Account0]\nlabel=local\n")
    assert result.changed_keys == (
        ("Account1", "label"),
        ("Account2", "domain"),
        ("ACCOUNT3", "domain"),
    )


def test_merge_runtime_section_from_ours_only_when_theirs_lacks_it() -> None:
    ours = ini("[Dialed]\n0=100\n[Settings]\nmainX=1\nvolumeOutput=5\n")
    theirs = ini("[Settings]\nmainX=700\n")
    result = merge_ini(base=ours, ours=ours, theirs=theirs, runtime_keys=RUNTIME_KEYS)
    assert flat(result.document) == {
        ("settings", "mainx"): "700",
        ("settings", "volumeoutput"): "5",
        ("dialed", "0"): "100",
    }


def test_merge_runtime_names_compare_case_insensitively() -> None:
    ours = ini("[SETTINGS]\nMAINX=1\n[calls]\n0=template\n")
    theirs = ini("[settings]\nmainx=700\n[CALLS]\n1=history\n")
    result = merge_ini(
        base=None,
        ours=ours,
        theirs=theirs,
        runtime_keys=frozenset({("Settings", "mainX")}),
        runtime_sections=frozenset({"Calls"}),
    )
    assert serialize_ini(result.document) == crlf("[settings]\nmainx=700\n[CALLS]\n1=history\n")


def test_merge_section_the_user_deleted_stays_deleted() -> None:
    base = ini("[Custom]\n; template note\nx=1\n[Settings]\na=1\n")
    theirs = ini("[Settings]\na=1\n")
    result = merge_ini(base=base, ours=base, theirs=theirs)
    assert serialize_ini(result.document) == crlf("[Settings]\na=1\n")
    # A key new in ours brings the section back, with ours' comments.
    ours = ini("[Custom]\n; template note\nx=1\ny=2\n[Settings]\na=1\n")
    result = merge_ini(base=base, ours=ours, theirs=theirs)
    assert serialize_ini(result.document) == crlf(
        "[Settings]\na=1\n[Custom]\n; template note\ny=2\n"
    )


def test_merge_drops_dead_duplicates_of_theirs() -> None:
    theirs = ini("[Settings]\na=1\na=2\n; kept\n[Custom]\nb=1\n[settings]\nc=3\n")
    result = merge_ini(base=None, ours=IniDocument(), theirs=theirs)
    assert serialize_ini(result.document) == crlf("[Settings]\na=1\n; kept\n[Custom]\nb=1\n")
    assert result.changed_keys == ()


def test_merge_without_a_current_file_is_the_reset() -> None:
    ours = ini("; banner\n[Settings]\naccountId=1\nmainX=1\n[Account1]\ndomain=d\n")
    enforced = ini("[Settings]\nupdatesInterval=never\n")
    result = merge_ini(base=ours, ours=ours, theirs=None, enforced=enforced)
    assert result.document == reset_ini(ours, enforced)
    assert serialize_ini(result.document) == crlf(
        "; banner\n[Settings]\naccountId=1\nmainX=1\nupdatesInterval=never\n[Account1]\ndomain=d\n"
    )
    assert result.changed_keys == (
        ("Settings", "accountId"),
        ("Settings", "mainX"),
        ("Settings", "updatesInterval"),
        ("Account1", "domain"),
    )
    assert reset_ini(ours) == renumbered(ours)


def test_merge_preamble_is_merged_as_one_block() -> None:
    base = ini("; v1\n[S]\n")
    theirs = ini("; v1\n; user\n[S]\n")
    assert [
        e.raw_value for e in merge_ini(base=base, ours=base, theirs=theirs).document.preamble
    ] == [
        "; v1",
        "; user",
    ]
    ours = ini("; v2\n[S]\n")
    assert [
        e.raw_value for e in merge_ini(base=base, ours=ours, theirs=theirs).document.preamble
    ] == ["; v2"]


def test_is_account_section() -> None:
    assert is_account_section("Account1")
    assert is_account_section("ACCOUNT12")
    assert not is_account_section("Account0")
    assert not is_account_section("Account01")
    assert not is_account_section("Accounts")


# --------------------------------------------------------------------------- merge: properties

_SECTIONS = ("Settings", "Account1", "Account2", "Account0", "Shortcuts", "Calls", "Custom")
_KEYS = ("accountId", "domain", "mainX", "volumeOutput", "label", "x")
_VALUES = st.sampled_from(("", "1", '"1"', "2", "never", "Müller"))
_COMMENTS = st.sampled_from(("; a", "# b", ";"))


def _spelled(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from((name, name.lower(), name.upper()))


@st.composite
def _merge_doc(draw: st.DrawFn, max_sections: int = 5) -> IniDocument:
    """A document with unique names (any case), so that it is its own MicroSIP view."""
    sections = []
    for name in draw(st.lists(st.sampled_from(_SECTIONS), unique=True, max_size=max_sections)):
        entries: list[IniEntry] = []
        seen: set[str] = set()
        for key in draw(st.lists(st.sampled_from((*_KEYS, None)), max_size=6)):
            if key is None:
                entries.append(IniEntry(None, draw(_COMMENTS)))
            elif key.lower() not in seen:
                seen.add(key.lower())
                entries.append(IniEntry(draw(_spelled(key)), draw(_VALUES)))
        sections.append(IniSection(draw(_spelled(name)), tuple(entries)))
    preamble = tuple(IniEntry(None, c) for c in draw(st.lists(_COMMENTS, max_size=2)))
    return parse_ini(serialize_ini(IniDocument(tuple(sections), preamble)))


@st.composite
def _edited(draw: st.DrawFn, doc: IniDocument) -> IniDocument:
    """``doc`` with some sections dropped, values changed, keys deleted or added."""
    sections = []
    for section in doc.sections:
        action = draw(st.sampled_from(("keep", "edit", "edit", "drop")))
        if action == "drop":
            continue
        entries = list(section.entries)
        if action == "edit":
            entries = []
            for entry in section.entries:
                op = draw(st.sampled_from(("keep", "value", "value", "drop")))
                if entry.key is None or op == "keep":
                    entries.append(entry)
                elif op == "value":
                    entries.append(dataclasses.replace(entry, raw_value=draw(_VALUES)))
            present = {e.key.lower() for e in entries if e.key is not None}
            for key in draw(st.lists(st.sampled_from(_KEYS), unique=True, max_size=2)):
                if key.lower() not in present:
                    entries.append(IniEntry(key, draw(_VALUES)))
        sections.append(IniSection(section.name, tuple(entries)))
    names = {s.name.lower() for s in sections} | {s.name.lower() for s in doc.sections}
    extra = draw(_merge_doc(max_sections=2))
    sections += [s for s in extra.sections if s.name.lower() not in names]
    preamble = doc.preamble if draw(st.booleans()) else extra.preamble
    return parse_ini(serialize_ini(IniDocument(tuple(sections), preamble)))


@st.composite
def _related(draw: st.DrawFn, doc: IniDocument) -> IniDocument:
    return doc if draw(st.integers(0, 9)) == 4 else draw(_edited(doc))


@st.composite
def _triple(
    draw: st.DrawFn,
) -> tuple[IniDocument | None, IniDocument, IniDocument | None, IniDocument | None]:
    base = draw(_merge_doc())
    ours = draw(_related(base))
    theirs = draw(_related(base))
    enforced = draw(st.none() | _merge_doc(max_sections=2))
    # Hypothesis favours boundary values, so the rare cases sit in the middle of the range.
    no_base = draw(st.integers(0, 9)) in (3, 6)
    no_theirs = draw(st.integers(0, 9)) == 5
    return (None if no_base else base, ours, None if no_theirs else theirs, enforced)


def _merge(
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None = None,
) -> MergeResult:
    return merge_ini(
        base=base, ours=ours, theirs=theirs, enforced=enforced, runtime_keys=RUNTIME_KEYS
    )


def _runtime(section: str, key: str) -> bool:
    return not account(section) and (
        section in {"calls", "dialed", "contacts"} or (section, key) in RUNTIME_KEYS
    )


@given(_merge_doc())
@PROPS
def test_prop_a_merging_a_document_with_itself_changes_nothing(doc: IniDocument) -> None:
    result = _merge(doc, doc, doc)
    assert result.document == doc
    assert result.conflicts == ()
    assert result.changed_keys == ()


@given(_merge_doc(), st.data())
@PROPS
def test_prop_b_unchanged_theirs_gives_ours_plus_theirs_runtime(
    base: IniDocument, data: st.DataObject
) -> None:
    ours = data.draw(_edited(base) | _merge_doc())
    result = _merge(base, ours, base)
    mine, theirs = flat(ours), flat(base)
    expected: Flat = {}
    for (s, k), v in mine.items():
        if s in {"calls", "dialed", "contacts"}:
            if s not in section_names(base):
                expected[(s, k)] = v
        else:
            expected[(s, k)] = theirs.get((s, k), v) if _runtime(s, k) else v
    expected.update({sk: v for sk, v in theirs.items() if _runtime(*sk)})
    assert flat(result.document) == expected
    assert result.conflicts == ()
    assert [e.raw_value for e in result.document.preamble] == [e.raw_value for e in ours.preamble]


def _check_c_enforced_keys_always_hold_the_enforced_value(
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None,
) -> None:
    merged = flat(_merge(base, ours, theirs, enforced).document)
    for key, value in flat(enforced).items():
        assert merged[key] == value


def _check_d_runtime_keys_and_sections_stay_as_theirs(
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None,
) -> None:
    merged, current, forced = (
        flat(_merge(base, ours, theirs, enforced).document),
        flat(theirs),
        flat(enforced),
    )
    for (s, k), value in current.items():
        if _runtime(s, k) and (s, k) not in forced:
            assert merged[(s, k)] == value
    for s in section_names(theirs) & {"calls", "dialed", "contacts"}:
        assert only(merged, s) == {**only(current, s), **only(forced, s)}


def _check_e_account_sections_are_exactly_ours(
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None,
) -> None:
    result = _merge(base, ours, theirs, enforced).document
    merged, mine, forced = flat(result), flat(ours), flat(enforced)
    accounts = {n for n in section_names(result) | section_names(ours) if account(n)}
    assert {n for n in section_names(result) if account(n)} == {
        n for n in section_names(ours) | section_names(enforced) if account(n)
    }
    for name in accounts:
        assert only(merged, name) == {**only(mine, name), **only(forced, name)}
        if enforced is None or enforced.section(name) is None:
            got, want = result.section(name), ours.section(name)
            assert got is not None and want is not None
            assert [(e.key, e.raw_value) for e in got.entries] == [
                (e.key, e.raw_value) for e in want.entries
            ]


def _check_f_unmanaged_keys_of_theirs_survive(
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None,
) -> None:
    merged = flat(_merge(base, ours, theirs, enforced).document)
    managed = flat(base).keys() | flat(ours).keys() | flat(enforced).keys()
    for (s, k), value in flat(theirs).items():
        if not account(s) and (s, k) not in managed:
            assert merged[(s, k)] == value


def _check_g_merging_again_is_idempotent(
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None,
) -> None:
    first = _merge(base, ours, theirs, enforced)
    again = _merge(ours, ours, first.document, enforced)
    assert again.document == first.document
    assert again.changed_keys == ()
    assert again.conflicts == ()


def _check_managed_keys_follow_the_three_way_table(
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None,
) -> None:
    result = _merge(base, ours, theirs, enforced)
    merged, mine, forced = flat(result.document), flat(ours), flat(enforced)
    last, current = flat(base if theirs is not None else None), flat(theirs)
    conflicts = set()
    for key in mine.keys() | last.keys() | current.keys():
        if account(key[0]) or _runtime(*key) or key in forced:
            continue
        o, b, t = mine.get(key), last.get(key), current.get(key)
        if o is None:
            want = t if b is None or t != b else None
        elif b is not None and o == b:
            want = t if theirs is not None else o
        else:
            want = o
            if b is not None and t not in (b, o):
                conflicts.add(key)
        assert merged.get(key) == want, key
    assert {(c.section.lower(), c.key.lower()) for c in result.conflicts} == conflicts


def _check_changed_keys_are_exactly_the_value_differences(
    base: IniDocument | None,
    ours: IniDocument,
    theirs: IniDocument | None,
    enforced: IniDocument | None,
) -> None:
    result = _merge(base, ours, theirs, enforced)
    merged, current = flat(result.document), flat(theirs)
    differing = {k for k in merged.keys() | current.keys() if merged.get(k) != current.get(k)}
    reported = [(s.lower(), k.lower()) for s, k in result.changed_keys]
    assert len(reported) == len(set(reported))
    assert set(reported) == differing
    assert parse_ini(serialize_ini(result.document)) == result.document
    if theirs is None:
        assert result.document == reset_ini(ours, enforced)


Triple = tuple[IniDocument | None, IniDocument, IniDocument | None, IniDocument | None]


@given(_triple())
@settings(PROPS, max_examples=300)
def test_prop_merge_rules_hold_for_random_triples(triple: Triple) -> None:
    """One generated (base, ours, theirs, enforced) checked against every merge property.

    (c) enforced values win, (d) runtime keys and sections stay theirs, (e) account sections
    are ours, (f) unmanaged keys survive, (g) idempotence, the per-key three-way table and
    the changed keys; generating a triple costs more than checking it, hence one test.
    """
    _check_c_enforced_keys_always_hold_the_enforced_value(*triple)
    _check_d_runtime_keys_and_sections_stay_as_theirs(*triple)
    _check_e_account_sections_are_exactly_ours(*triple)
    _check_f_unmanaged_keys_of_theirs_survive(*triple)
    _check_g_merging_again_is_idempotent(*triple)
    _check_managed_keys_follow_the_three_way_table(*triple)
    _check_changed_keys_are_exactly_the_value_differences(*triple)
