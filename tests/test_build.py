"""Phase 1 end to end in-process, on throwaway inventories and the example."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from provisioner.inventory.resolve import Selection
from provisioner.microsip import ini, lint
from provisioner.microsip.inidoc import IniDocument
from provisioner.render import build
from provisioner.secrets import secretstore, vault
from tests.phase1kit import (
    DEMO_KEY,
    EXAMPLE,
    build_files,
    files_of,
    logical,
    real_opener,
    secret_for,
)


def errors_of(result: build.BuildResult) -> list[str]:
    return [str(f) for f in result.findings if f.severity == "error"]


# --------------------------------------------------------------------------- the example


@pytest.fixture(scope="module")
def demo_keyring(tmp_path_factory: pytest.TempPathFactory) -> vault.Keyring:
    folder = tmp_path_factory.mktemp("demo-key")
    identity = folder / "demo-only.sipid"
    shutil.copyfile(DEMO_KEY / "demo-only.sipid", identity)
    identity.chmod(0o600)
    passphrase = (DEMO_KEY / "demo-only.passphrase").read_bytes().splitlines()[0]
    example_recipients = vault.load_recipients_file(EXAMPLE / "recipients.yaml")
    keyring = vault.Keyring(example_recipients)
    keyring.add(secretstore.unlock(secretstore.read_identity(identity), passphrase))
    return keyring


@pytest.fixture(scope="module")
def example_placeholders() -> build.BuildResult:
    return build.build(EXAMPLE)


@pytest.fixture(scope="module")
def example_real(demo_keyring: vault.Keyring) -> build.BuildResult:
    return build.build(EXAMPLE, opener_factory=lambda _: demo_keyring)


EXPECTED_FILES = {
    "ber-rds-01/carol/microsip.ini",
    "ber-rds-01/dave/microsip.ini",
    "ber-rds-01/erin/microsip.ini",
    "ber-rds-01/override.ini",
    "ber-ws-001/alice/microsip.ini",
    "ber-ws-001/override.ini",
    "ber-ws-002/bob/microsip.ini",
    "ber-ws-002/override.ini",
    "ber-ws-003/grace/microsip.ini",
    "ber-ws-003/override.ini",
    "ber-ws-004/heidi/microsip.ini",
    "ber-ws-004/override.ini",
    "ham-kiosk-01/microsip.ini",
    "ham-kiosk-01/override.ini",
    "ham-ws-001/frank/microsip.ini",
    "ham-ws-001/override.ini",
    "ham-ws-002/ivan/microsip.ini",
    "ham-ws-002/judy/microsip.ini",
    "ham-ws-002/override.ini",
    "ham-ws-003/mallory/microsip.ini",
    "ham-ws-003/override.ini",
}


def _check_file_bytes(data: bytes) -> IniDocument:
    assert data.startswith(b"\xff\xfe")
    assert not data.startswith(b"\xff\xfe\xff\xfe")
    body = data[2:]
    assert len(body) % 2 == 0
    text = body.decode("utf-16-le")
    assert text.endswith("\r\n")
    assert text.count("\n") == text.count("\r\n") == text.count("\r")
    # Byte-exact: the codec's own output for the same text, and a clean round trip.
    assert ini.encode_ini(text) == data
    assert ini.decode_ini_bytes(data) == text
    return ini.parse_ini(text)


@pytest.mark.parametrize("which", ["placeholders", "real"])
def test_example_builds_clean_into_the_expected_files(
    which: str, request: pytest.FixtureRequest
) -> None:
    result: build.BuildResult = request.getfixturevalue(f"example_{which}")
    # The one finding: alice's second account, kept to show that the free MicroSIP never
    # registers it.
    assert [(f.severity, f.code, f.file, f.path) for f in result.findings] == [
        ("warning", "inactive-account", "ber-ws-001/alice/microsip.ini", "[Account2]")
    ]
    assert result.ok
    assert {f.relative_path for f in result.files} == EXPECTED_FILES
    assert len(result.targets) == len(EXPECTED_FILES)
    for built in result.files:
        doc = _check_file_bytes(built.data)
        assert doc == built.document
        if built.target.kind == "override":
            assert lint.lint_override_ini(doc) == []
            assert [s.name for s in doc.sections] == ["Settings"]
            continue
        expected = (
            ["inactive-account"] if built.target.name == "ber-ws-001/alice/microsip.ini" else []
        )
        assert [f.code for f in lint.lint_microsip_ini(doc)] == expected
        names = [s.name for s in doc.sections]
        assert names[0] == "Settings"
        accounts = names[1:]
        assert accounts == [f"Account{i}" for i in range(1, len(accounts) + 1)]
        active = int(doc.get("Settings", "accountId") or "0")
        assert 1 <= active <= len(accounts)
        for name in accounts:
            assert doc.get(name, "domain")
            assert doc.get(name, "username")


def test_example_layouts_portable_installed_and_rds(
    example_placeholders: build.BuildResult,
) -> None:
    by_station: dict[str, list[str]] = {}
    for built in example_placeholders.files:
        if built.target.kind == "microsip":
            by_station.setdefault(built.target.workstation, []).append(built.relative_path)
    assert by_station["ham-kiosk-01"] == ["ham-kiosk-01/microsip.ini"]
    assert sorted(by_station["ber-rds-01"]) == [
        "ber-rds-01/carol/microsip.ini",
        "ber-rds-01/dave/microsip.ini",
        "ber-rds-01/erin/microsip.ini",
    ]
    for station, paths in by_station.items():
        if station != "ham-kiosk-01":
            assert all(p.count("/") == 2 for p in paths), paths
    kiosk = next(f for f in example_placeholders.files if f.target.user == "reception")
    assert kiosk.install.mode == "portable"
    assert kiosk.install.install_dir == "C:\\Kiosk\\MicroSIP"


def test_each_user_gets_its_own_placeholder(example_placeholders: build.BuildResult) -> None:
    realm = vault.load_recipients_file(EXAMPLE / "recipients.yaml").realm
    inventory = example_placeholders.inventory
    assert inventory is not None
    seen: set[str] = set()
    for built in example_placeholders.files:
        if built.target.kind != "microsip":
            continue
        user = inventory.users[built.target.user or ""]
        assert len(user.accounts) == sum(
            1 for s in built.document.sections if s.name.startswith("Account")
        )
        for index, account in enumerate(user.accounts, start=1):
            pointer = f"/users/{user.name}/accounts/{account.id}/password"
            expected = vault.placeholder_for(realm, pointer)
            assert built.document.get(f"Account{index}", "password") == expected
            assert expected not in seen
            seen.add(expected)
        assert built.secret_paths == tuple(
            f"/users/{user.name}/accounts/{a.id}/password" for a in user.accounts
        )
    assert len(seen) == 13


def test_real_keys_put_each_users_own_password(example_real: build.BuildResult) -> None:
    inventory = example_real.inventory
    assert inventory is not None
    passwords: set[str] = set()
    for built in example_real.files:
        if built.target.kind != "microsip":
            continue
        user = inventory.users[built.target.user or ""]
        for index, account in enumerate(user.accounts, start=1):
            password = built.document.get(f"Account{index}", "password") or ""
            # The demo passwords name their owner: Demo-<user>-<account id>-<random>.
            assert password.startswith(f"Demo-{user.name}-{account.id}-"), password
            passwords.add(password)
        # No password lands anywhere else in the file.
        text = logical(built.data)
        for password in passwords:
            assert text.count(password) <= 1
    assert len(passwords) == 13


def test_example_highlights(example_placeholders: build.BuildResult) -> None:
    docs = {f.relative_path: f.document for f in example_placeholders.files}
    alice = docs["ber-ws-001/alice/microsip.ini"]
    assert alice.get("Settings", "accountId") == "1"
    assert alice.get("Account1", "label") == "Alice (direct)"
    assert alice.get("Account2", "label") == "Sales hotline"
    assert alice.get("Account1", "transport") == "tls"
    assert alice.get("Account1", "SRTP") == "mandatory"
    assert alice.get("Settings", "cmdIncomingCall", "").startswith('"C:\\Program Files\\AcmeCRM')
    frank = docs["ham-ws-001/frank/microsip.ini"]
    assert frank.get("Account1", "transport") == "udp"
    assert frank.get("Account1", "SRTP") == ""
    kiosk_override = docs["ham-kiosk-01/override.ini"]
    assert kiosk_override.get("Settings", "disableMessaging") == "1"
    assert kiosk_override.get("Settings", "updatesInterval") == "never"


def test_limit_builds_only_the_selection() -> None:
    result = build.build(EXAMPLE, selection=Selection("ber-rds-01,!dave"))
    assert [t.name for t in result.targets] == [
        "ber-rds-01/override.ini",
        "ber-rds-01/carol/microsip.ini",
        "ber-rds-01/erin/microsip.ini",
    ]
    bad = build.build(EXAMPLE, selection=Selection("site:berlin"))
    assert [f.code for f in bad.findings] == ["limit"]
    assert "unknown --limit term 'site:berlin'" in bad.findings[0].message


# --------------------------------------------------------------------------- build behaviour


def test_real_opener_writes_the_sealed_password(tmp_path: Path) -> None:
    _, result = build_files(tmp_path / "inv", {}, opener_factory=real_opener)
    assert result.findings == []
    [_, microsip] = result.files
    assert microsip.document.get("Account1", "password") == secret_for(
        "/users/u1/accounts/main/password"
    )


def test_copied_token_and_moved_token_are_errors(tmp_path: Path) -> None:
    root, result = build_files(
        tmp_path / "inv",
        {
            "users.yaml": """\
                users:
                  u1:
                    accounts:
                      main: {sip_uri: 1001@pbx.example.com, password: SEAL}
                  u2:
                    accounts:
                      main: {sip_uri: 1002@pbx.example.com, password: SEAL}
                """,
            "workstations.yaml": """\
                workstations:
                  ws1:
                    users: [u1, u2]
                """,
        },
    )
    assert result.ok
    users = root / "users.yaml"
    text = users.read_text()
    first = text.split("password: ")[1].split("}")[0]
    second = text.split("password: ")[2].split("}")[0]
    users.write_text(text.replace(second, first))
    result = build.build(root)
    codes = sorted(f.code for f in result.findings)
    assert codes == ["copied-token", "path-mismatch"]
    mismatch = next(f for f in result.findings if f.code == "path-mismatch")
    assert mismatch.path == "/users/u2/accounts/main/password"
    assert mismatch.file == str(users) and mismatch.line == 7 and mismatch.column > 0
    assert "Traceback" not in mismatch.message


def test_portable_workstation_with_two_users_is_an_error(tmp_path: Path) -> None:
    _, result = build_files(
        tmp_path / "inv",
        {
            "workstations.yaml": """\
                workstations:
                  ws1:
                    microsip: {mode: portable, exe: Qphone.exe}
                    users: [u1, u2]
                """,
            "more.yaml": """\
                users:
                  u2:
                    accounts:
                      main: {sip_uri: 1002@pbx.example.com, password: SEAL}
                """,
        },
    )
    messages = errors_of(result)
    assert len(messages) == 2
    assert all("portable mode" in m and "Qphone.ini" in m for m in messages)


def test_workstation_without_users_gets_only_override(tmp_path: Path) -> None:
    _, result = build_files(
        tmp_path / "inv",
        {
            "workstations.yaml": """\
                workstations:
                  ws1:
                    users: [u1]
                  spare:
                    enforced:
                      settings: {EC: 1}
                """,
        },
    )
    assert result.findings == []
    assert sorted(files_of(result)) == [
        "spare/override.ini",
        "ws1/override.ini",
        "ws1/u1/microsip.ini",
    ]
    assert "EC=1" in files_of(result)["spare/override.ini"]


def test_timings_cover_every_phase(example_placeholders: build.BuildResult) -> None:
    assert {"load", "resolve", "open", "render", "lint", "encode"} <= set(
        example_placeholders.timings
    )
