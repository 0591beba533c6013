"""The MicroSIP key table: loading, documented facts, lookups and suggestions."""

from __future__ import annotations

from importlib import resources

import pytest

from provisioner.errors import KeyTableError
from provisioner.microsip.keytable import (
    KeyTable,
    account_index,
    key_table_from_data,
    load_key_table,
)

# microsip-format.md section 10.7 (values from sections 3 and 5.1), plus autoAnswerCalls (5.1).
DOCUMENTED_ENUMS: dict[tuple[str, str], set[str]] = {
    ("Account", "transport"): {"udp", "tcp", "tls", ""},
    ("Account", "SRTP"): {"", "optional", "mandatory", "dtls-sdes", "dtls"},
    ("Settings", "DTMFMethod"): {"0", "1", "2", "3"},
    ("Settings", "autoAnswer"): {"", "button", "header", "all"},
    ("Settings", "autoAnswerCalls"): {"", "hold", "all"},
    ("Settings", "denyIncoming"): {
        "",
        "button",
        "user",
        "domain",
        "userdomain",
        "remotedomain",
        "all",
    },
    ("Settings", "forwarding"): {"", "button", "all"},
    ("Settings", "updatesInterval"): {"", "daily", "monthly", "quarterly", "never", "always"},
    ("Settings", "recordingFormat"): {"", "mp3", "wav"},
    ("Settings", "defaultAction"): {"", "call", "video", "message"},
}

# microsip-format.md section 5.3 (accountId is listed there too but is managed; see keytable).
RUNTIME_KEYS = [
    *("mainX", "mainY", "mainW", "mainH"),
    *("messagesX", "messagesY", "messagesW", "messagesH", "ringinX", "ringinY"),
    *(f"callsWidth{i}" for i in range(6)),
    *(f"contactsWidth{i}" for i in range(3)),
    *("activeTab", "alwaysOnTop", "volumeOutput", "volumeInput"),
    *("AA", "AC", "DND", "FWD"),
    *("lastCallNumber", "lastCallHasVideo", "callsLastKey", "checkUpdatesTime", "version"),
]

SETTINGS_KEYS = [
    "accountId",
    "singleMode",
    "ringingSound",
    "volumeRing",
    "audioRingDevice",
    "audioOutputDevice",
    "audioInputDevice",
    "micAmplification",
    "swLevelAdjustment",
    "audioCodecs",
    "VAD",
    "EC",
    "forceCodec",
    "opusStereo",
    "disableMessaging",
    "disableVideo",
    "videoCaptureDevice",
    "videoCodec",
    "videoH264",
    "videoH263",
    "videoVP8",
    "videoVP9",
    "videoBitrate",
    "rport",
    "sourcePort",
    "rtpPortMin",
    "rtpPortMax",
    "dnsSrv",
    "dnsSrvNs",
    "STUN",
    "enableSTUN",
    "recordingPath",
    "recordingFormat",
    "autoRecording",
    "recordingButton",
    "buttonAC",
    "buttonCONF",
    "DTMFMethod",
    "autoAnswer",
    "autoAnswerDelay",
    "autoAnswerNumber",
    "autoAnswerCalls",
    "forwarding",
    "forwardingNumber",
    "forwardingDelay",
    "featureCodeCP",
    "featureCodeBT",
    "featureCodeAT",
    "enableFeatureCodeCP",
    "enableFeatureCodeBT",
    "enableFeatureCodeAT",
    "denyIncoming",
    "usersDirectory",
    "defaultAction",
    "enableMediaButtons",
    "headsetSupport",
    "localDTMF",
    "enableLog",
    "bringToFrontOnIncoming",
    "enableLocalAccount",
    "randomAnswerBox",
    "disableNameLookup",
    "callWaiting",
    "multiMonitor",
    "networkChanges",
    "updatesInterval",
    "noResize",
    "userAgent",
    "autoHangUpTime",
    "maxConcurrentCalls",
    "noIgnoreCall",
    "minimized",
    "silent",
    "portKnockerHost",
    "portKnockerPorts",
    "enableShortcuts",
    "shortcutsBottom",
    "cmdOutgoingCall",
    "cmdIncomingCall",
    "cmdCallRing",
    "cmdCallAnswer",
    "cmdCallAnswerVideo",
    "cmdCallBusy",
    "cmdCallStart",
    "cmdCallEnd",
]

ACCOUNT_KEYS = [
    "label",
    "server",
    "proxy",
    "domain",
    "username",
    "password",
    "authID",
    "displayName",
    "dialingPrefix",
    "dialPlan",
    "hideCID",
    "voicemailNumber",
    "transport",
    "publicAddr",
    "SRTP",
    "registerRefresh",
    "keepAlive",
    "publish",
    "ICE",
    "allowRewrite",
    "disableSessionTimer",
]

LONG_ACCOUNT_FIELDS = ["server", "proxy", "domain", "username", "password", "authID", "displayName"]


@pytest.fixture(scope="module")
def table() -> KeyTable:
    return load_key_table()


def test_table_is_package_data_and_cached() -> None:
    data = resources.files("provisioner.microsip").joinpath("microsip_keys.toml")
    assert data.is_file()
    assert load_key_table() is load_key_table()


def test_every_documented_key_is_present_with_exact_spelling(table: KeyTable) -> None:
    for key in SETTINGS_KEYS:
        spec = table.lookup("Settings", key)
        assert spec is not None, key
        assert spec.key == key
        assert spec.section == "Settings"
    for key in ACCOUNT_KEYS:
        spec = table.lookup("Account1", key)
        assert spec is not None, key
        assert spec.key == key
    for key in RUNTIME_KEYS:
        assert table.lookup("Settings", key) is not None, key
    documented = {k.lower() for k in SETTINGS_KEYS + RUNTIME_KEYS}
    assert {s.key.lower() for s in table.keys("Settings")} == documented
    assert {s.key.lower() for s in table.keys("Account")} == {k.lower() for k in ACCOUNT_KEYS}


@pytest.mark.parametrize(("section", "key"), sorted(DOCUMENTED_ENUMS))
def test_documented_enums(table: KeyTable, section: str, key: str) -> None:
    spec = table.lookup(section, key)
    assert spec is not None
    assert spec.type == "enum"
    assert set(spec.allowed) == DOCUMENTED_ENUMS[(section, key)]
    assert len(spec.allowed) == len(set(spec.allowed))


def test_only_documented_keys_are_enums(table: KeyTable) -> None:
    enums = {(s.section, s.key) for s in table.specs if s.type == "enum"}
    assert enums == set(DOCUMENTED_ENUMS)


@pytest.mark.parametrize("key", RUNTIME_KEYS)
def test_runtime_keys_are_owned_by_microsip(table: KeyTable, key: str) -> None:
    spec = table.lookup("Settings", key)
    assert spec is not None
    assert spec.owner == "runtime"
    assert spec.is_runtime
    assert ("settings", key.lower()) in table.runtime_keys()


def test_runtime_key_set_is_exactly_section_5_3(table: KeyTable) -> None:
    assert table.runtime_keys() == {("settings", k.lower()) for k in RUNTIME_KEYS}
    # accountId is rewritten on account switches but the renderer must always write it.
    assert ("settings", "accountid") not in table.runtime_keys()
    assert all(not s.is_runtime for s in table.specs if s.section != "Settings")


def test_runtime_sections(table: KeyTable) -> None:
    assert table.runtime_sections() == {"calls", "dialed", "contacts"}
    assert table.is_runtime_section("CALLS")
    assert not table.is_runtime_section("Settings")


def test_max_lengths(table: KeyTable) -> None:
    for key in LONG_ACCOUNT_FIELDS:
        spec = table.lookup("Account1", key)
        assert spec is not None
        assert spec.max_len == 1040, key
    codecs = table.lookup("Settings", "audioCodecs")
    assert codecs is not None
    assert codecs.max_len == 511
    for index in range(8):
        shortcut = table.lookup("Shortcuts", str(index))
        assert shortcut is not None
        assert shortcut.max_len == 1023
    others = [
        s
        for s in table.specs
        if s.section != "Shortcuts" and s.key not in [*LONG_ACCOUNT_FIELDS, "audioCodecs"]
    ]
    assert others
    assert {s.max_len for s in others} == {255}


def test_ranges_defaults_and_versions(table: KeyTable) -> None:
    volume = table.lookup("Settings", "volumeRing")
    dtmf = table.lookup("Settings", "DTMFMethod")
    assert volume is not None
    assert dtmf is not None
    assert (volume.min, volume.max, volume.default) == (0, 100, "100")
    assert (dtmf.min, dtmf.max, dtmf.default) == (0, 3, "0")
    expected_defaults = {
        ("Settings", "autoAnswer"): "button",
        ("Settings", "denyIncoming"): "button",
        ("Settings", "updatesInterval"): "",
        ("Settings", "audioCodecs"): "PCMA/8000/1 PCMU/8000/1",
        ("Settings", "featureCodeAT"): "*2",
        ("Settings", "enableFeatureCodeCP"): "1",
        ("Account", "transport"): "udp",
        ("Account", "registerRefresh"): "300",
        ("Account", "keepAlive"): "15",
    }
    for (section, key), default in expected_defaults.items():
        spec = table.lookup(section, key)
        assert spec is not None
        assert spec.default == default, key
    domain = table.lookup("Account", "domain")
    assert domain is not None
    assert domain.required
    assert domain.default is None
    versions = {
        "autoAnswerCalls": "3.22",
        "forwarding": "3.21",
        "videoVP9": "3.21",
        "cmdCallAnswerVideo": "3.21",
        "networkChanges": "3.22",
    }
    for key, since in versions.items():
        spec = table.lookup("Settings", key)
        assert spec is not None
        assert spec.since == since, key
    silent = table.lookup("Settings", "silent")
    assert silent is not None
    assert silent.removed == "3.22.3"


def test_types(table: KeyTable) -> None:
    def type_of(section: str, key: str) -> str:
        spec = table.lookup(section, key)
        assert spec is not None
        return spec.type

    assert type_of("Settings", "EC") == "bool01"
    assert type_of("Settings", "sourcePort") == "int"
    assert type_of("Settings", "audioCodecs") == "codecs"
    assert type_of("Settings", "cmdCallEnd") == "command"
    assert type_of("Settings", "usersDirectory") == "url"
    assert type_of("Settings", "recordingPath") == "path"
    assert type_of("Settings", "STUN") == "list"
    assert type_of("Account", "hideCID") == "bool01"
    assert type_of("Shortcuts", "0") == "shortcut"
    assert {s.type for s in table.specs if s.key.startswith("cmd")} == {"command"}


def test_lookup_is_case_insensitive_and_maps_accounts(table: KeyTable) -> None:
    spec = table.lookup("settings", "dtmfmethod")
    assert spec is not None
    assert spec.key == "DTMFMethod"
    for name in ("Account1", "account0", "ACCOUNT42", "Account"):
        found = table.lookup(name, "SERVER")
        assert found is not None
        assert found.key == "server"
    assert table.lookup("Account01", "server") is None
    assert table.lookup("General", "server") is None
    assert table.lookup("Calls", "0") is None
    assert table.lookup("Settings", "server") is None
    assert table.lookup("Shortcuts", "8") is None


def test_account_index() -> None:
    assert account_index("Account1") == 1
    assert account_index("account0") == 0
    assert account_index("ACCOUNT100") == 100
    assert account_index("Account01") is None
    assert account_index("Account") is None
    assert account_index("Accounts1") is None


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        ("Settings", "updateInterval", "updatesInterval"),
        ("Settings", "disableLocalAccount", "enableLocalAccount=0"),
        ("Settings", "ListenPort", "sourcePort"),
        ("Account1", "STUN", "[Settings] STUN"),
        ("Account1", "listenport", "sourcePort"),
    ],
)
def test_documented_non_keys_and_suggestions(
    table: KeyTable, section: str, key: str, suggestion: str
) -> None:
    assert table.lookup(section, key) is None
    assert table.non_key(section, key)
    assert table.suggest(section, key) == suggestion


@pytest.mark.parametrize("key", ["enabled", "crashReport", "passwordSize"])
def test_non_keys_without_replacement(table: KeyTable, key: str) -> None:
    for section in ("Settings", "Account3"):
        assert table.non_key(section, key)
        assert table.suggest(section, key) is None


def test_where_microsip_expands_the_password(table: KeyTable) -> None:
    # microsip-format.md 4.5 and 5.1: only these two values carry the password's placeholders.
    expanding = {
        (spec.section, spec.key): spec.password_macros
        for spec in table.specs
        if spec.password_macros
    }
    assert expanding == {
        ("Settings", "cmdOutgoingCall"): ("{password}", "{md5_password}"),
        ("Settings", "usersDirectory"): ("{password}", "{md5_password}"),
    }
    formatted = {spec.key: spec.format_args for spec in table.specs if spec.format_args}
    assert formatted == {"usersDirectory": ("username", "password", "server")}


def test_stun_is_a_settings_key(table: KeyTable) -> None:
    assert table.non_key("Settings", "STUN") is None
    assert table.lookup("Settings", "stun") is not None
    assert table.suggest("Settings", "STUN") is None


def test_near_miss_and_cross_section_suggestions(table: KeyTable) -> None:
    assert table.suggest("Account2", "tranport") == "transport"
    assert table.suggest("Settings", "updatesIntervall") == "updatesInterval"
    assert table.suggest("Settings", "server") == "[AccountN] server"
    assert table.suggest("Settings", "password") == "[AccountN] password"
    assert table.suggest("Account1", "enableSTUN") == "[Settings] enableSTUN"
    assert table.suggest("Settings", "zzzzzz") is None
    assert table.suggest("General", "server") is None
    assert table.non_key("Settings", "singleMode") is None


def _row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "section": "Settings",
        "key": "x",
        "type": "int",
        "owner": "managed",
        "max_len": 255,
        "note": "",
    }
    row.update(overrides)
    return row


@pytest.mark.parametrize(
    "data",
    [
        {"key": [_row(), _row(key="X")]},
        {"key": [_row(type="float")]},
        {"key": [_row(owner="user")]},
        {"key": [_row(section="Global")]},
        {"key": [_row(type="enum")]},
        {"key": [_row(allowed=["a"])]},
        {"key": [_row(max_len=0)]},
        {"key": [_row(min="0")]},
        {"key": [_row(since="3.21 beta")]},
        {"key": [_row(removed="\x1b[31m3.22")]},
        {"key": [_row(password_macros="{password}")]},
        {"key": [_row(format_args=["username", 2])]},
        {"key": [_row()], "non_key": [{"key": "x", "sections": ["Settings"], "reason": "r"}]},
        {"key": "nope"},
    ],
)
def test_malformed_table_is_rejected(data: dict[str, object]) -> None:
    with pytest.raises(KeyTableError):
        key_table_from_data(data)


def test_minimal_table_from_data() -> None:
    table = key_table_from_data(
        {
            "runtime_sections": ["Calls"],
            "key": [_row(), _row(key="mainX", owner="runtime")],
            "non_key": [{"key": "y", "sections": ["Settings"], "suggest": "x", "reason": "r"}],
        }
    )
    assert table.runtime_keys() == {("settings", "mainx")}
    assert table.suggest("Settings", "y") == "x"
    assert table.runtime_sections() == {"calls"}
