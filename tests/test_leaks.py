"""A canary password never leaves its sealed form: not in output, files, temp files, errors."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from provisioner import errors
from provisioner.inventory.model import Secret
from provisioner.lab import Lab
from provisioner.lab.agent import LabAgent
from provisioner.lab.fleet import WorkstationSpec, add_workstation
from provisioner.lab.host import HostConfig
from provisioner.secrets import secretstore, vault
from provisioner.secrets.credscope import Scope
from provisioner.transport import winrm
from tests.conftest import USERS_YAML, Realm, make_realm
from tests.labkit import INSPECT_NOTHING

CANARY = "Canary-Pw-7731"
FORMS = [CANARY.encode("utf-8"), CANARY.encode("utf-16-le"), CANARY.lower().encode()]
# NTLM derives the canary's LM and NT hashes (pyspnego): as good as the password to an attacker
# (pass-the-hash), so they are kept out wherever the canary is. MS-NLMP LMOWFv1 and NTOWFv1
# (MD4 of UTF-16LE) of CANARY:
CANARY_LM = "9a7ea64e9d3a509675056e4918115f8d"
CANARY_NT = "545a777085fd94d90d001611acd5213c"
HASH_TEXTS = [form for h in (CANARY_NT, CANARY_LM) for form in (h, h.upper())]
FORMS += [text.encode() for text in HASH_TEXTS]
FORMS += [bytes.fromhex(CANARY_NT), bytes.fromhex(CANARY_LM)]


def _assert_no_canary_hash(text: str) -> None:
    for form in HASH_TEXTS:
        assert form not in text, "an NTLM hash of the canary leaked"


def _assert_no_canary_in_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for form in FORMS:
                assert form not in data, f"canary found in {path}"


def test_every_command_keeps_the_canary_secret(realm: Realm) -> None:
    inv = str(realm.inventory)
    pp = ("--passphrase-file", str(realm.passphrase_file))
    outputs: list[str] = []

    def run(*args: str, stdin: str | None = None) -> None:
        result = realm.run(*args, stdin=stdin)
        outputs.extend([result.stdout, result.stderr])

    make_realm(realm)
    users = realm.inventory / "users.yaml"
    users.write_text(USERS_YAML)
    alice = "/users/alice/accounts/0/password"
    run("secrets", "set", "--path", alice, "-i", inv, stdin=CANARY)
    run("secrets", "set", "--path", "/users/bob/accounts/0/password", "-i", inv, stdin="bob-pw")
    # Error paths: policy violations, unknown entries, non-secret fields, bad YAML.
    run("secrets", "set", "--path", alice, "-i", inv, stdin=CANARY + "\r\n[Account1]")
    run("secrets", "set", "--path", alice, "-i", inv, stdin=f'"{CANARY}"')
    run("secrets", "set", "--path", alice, "-i", inv, stdin=CANARY + "\x00")
    run("secrets", "set", "--path", alice, "-i", inv, stdin=CANARY * 30)
    run("secrets", "set", "--path", "/users/zoe/accounts/0/password", "-i", inv, stdin=CANARY)
    run("secrets", "set", "--path", "/users/alice/display_name", "-i", inv, stdin=CANARY)
    run("secrets", "set", "--path", "not-a-pointer", "-i", inv, stdin=CANARY)
    run("secrets", "verify", "-i", inv, *pp)
    bad_pp = realm.root / "bad"
    bad_pp.write_text("wrong passphrase entirely\n")
    bad_pp.chmod(0o600)
    run("secrets", "verify", "-i", inv, "--passphrase-file", str(bad_pp))
    run("secrets", "lint", "-i", inv)
    run("secrets", "lint", "-i", inv, "--format", "json")
    # Rotation and re-key, then a rename and rebind.
    run("keys", "rotate", "-i", inv, *pp)
    run("secrets", "rekey", "-i", inv, *pp)
    users.write_text(users.read_text().replace("  alice:", "  alice2:"))
    run("secrets", "verify", "-i", inv, *pp)
    run("secrets", "rebind", alice, "/users/alice2/accounts/0/password", "-i", inv, *pp)
    run("secrets", "rebind", alice, "/users/nobody/accounts/0/password", "-i", inv, *pp)
    run("secrets", "verify", "-i", inv, *pp)
    [first, *_] = realm.identity_files
    run(
        "keys",
        "add-admin",
        "--identity",
        str(first),
        "--out",
        str(realm.root / "copy.sipid"),
        *pp,
        "--new-passphrase-file",
        str(realm.passphrase_file),
    )
    run("keys", "list", "-i", inv)
    # A token whose plaintext breaks the policy: verify must say so without the value.
    recipients = secretstore.load_recipients(realm.inventory)
    poisoned = vault.seal_padded(
        vault.pad_plaintext((CANARY + "\r\nserver=evil").encode()),
        realm=recipients.realm,
        path="/users/bob/accounts/0/password",
        recipient=recipients.active_key(),
    )
    text = users.read_text()
    bob_token = re.findall(r"sipvault:[\w:-]+", text)[-1]
    users.write_text(text.replace(bob_token, poisoned))
    run("secrets", "verify", "-i", inv, *pp)
    run("secrets", "rekey", "-i", inv, *pp)
    joined = "\n".join(outputs)
    assert "policy: 1" in joined and "Traceback" not in joined
    for form in (CANARY, CANARY.lower()):
        assert form not in joined
    _assert_no_canary_hash(joined)
    _assert_no_canary_in_tree(realm.root)


def test_plaintext_in_a_password_field_is_reported_without_its_value(realm: Realm) -> None:
    make_realm(realm)
    (realm.inventory / "users.yaml").write_text(
        USERS_YAML.replace("password:\n", f"password: {CANARY}\n")
    )
    result = realm.run("secrets", "lint", "-i", str(realm.inventory))
    assert result.returncode == 1
    assert "users.yaml:7:" in result.stdout and "plaintext" in result.stdout
    assert CANARY not in result.stdout + result.stderr
    result = realm.run(
        "secrets",
        "verify",
        "-i",
        str(realm.inventory),
        "--passphrase-file",
        str(realm.passphrase_file),
    )
    assert CANARY not in result.stdout + result.stderr
    _assert_no_canary_hash(result.stdout + result.stderr)


def _chain_text(exc: BaseException) -> str:
    parts = []
    current: BaseException | None = exc
    while current is not None:
        parts += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def test_exception_text_and_logs_never_hold_the_canary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    identity = vault.generate_identity()
    recipients = vault.new_recipients("leak-test", identity.recipient())
    keyring = vault.Keyring(recipients, {identity.kid: identity})
    path = "/users/alice/accounts/0/password"
    failures: list[BaseException] = []
    for bad in (CANARY + "\n", CANARY + "\x01", " " + CANARY, CANARY * 20):
        with pytest.raises(errors.PolicyViolationError) as caught:
            vault.seal(Secret(bad), realm="leak-test", path=path, recipient=identity.recipient())
        failures.append(caught.value)
    token = vault.seal(Secret(CANARY), realm="leak-test", path=path, recipient=identity.recipient())
    with pytest.raises(errors.PathMismatchError) as moved:
        keyring.open(token, "/users/bob/accounts/0/password")
    failures.append(moved.value)
    poisoned = vault.seal_padded(
        vault.pad_plaintext((CANARY + "\n").encode()),
        realm="leak-test",
        path=path,
        recipient=identity.recipient(),
    )
    with pytest.raises(errors.PolicyViolationError) as policy:
        vault.check_policy(keyring.open(poisoned, path))
    failures.append(policy.value)
    secretstore.write_recipients(tmp_path, recipients)
    (tmp_path / "u.yaml").write_text("users:\n  a:\n    accounts:\n      - password: |\n  x\n")
    with pytest.raises(errors.ProvisionerError) as patch:
        secretstore.set_secret(tmp_path, path.replace("alice", "a"), Secret(CANARY), recipients)
    failures.append(patch.value)
    for failure in failures:
        assert CANARY not in _chain_text(failure)
    assert CANARY not in caplog.text
    for failure in failures:
        _assert_no_canary_hash(_chain_text(failure))
    _assert_no_canary_hash(caplog.text)
    _assert_no_canary_in_tree(tmp_path)


def test_ntlm_pushes_keep_the_canary_and_its_hashes_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with Lab(LabAgent(), folder=tmp_path / "lab") as lab:
        good, _ = add_workstation(
            lab, HostConfig(credentials={"svc-canary": CANARY}, port=0), WorkstationSpec()
        )
        other, _ = add_workstation(
            lab, HostConfig(credentials={"svc-other": "Other-Pw-1"}, port=0), WorkstationSpec()
        )
        loopback = Scope.build(["127.0.0.0/8"], "encrypted")
        options = winrm.WinrmOptions(
            good.address, "svc-canary", Secret(CANARY), port=good.port, scope=loopback
        )
        accepted = winrm.WinrmTransport("ws-good", options)
        try:
            assert accepted.request(INSPECT_NOTHING).install.found
            texts += [repr(accepted), repr(vars(accepted)), repr(options)]
        finally:
            accepted.close()
        # Wrong credentials: the canary's hashes against an account with another password.
        options = winrm.WinrmOptions(
            other.address, "svc-other", Secret(CANARY), port=other.port, scope=loopback
        )
        rejected = winrm.WinrmTransport("ws-bad", options)
        with pytest.raises(errors.AuthError) as caught:
            rejected.request(INSPECT_NOTHING)
        texts += [_chain_text(caught.value), repr(vars(rejected))]
        rejected.close()
    assert "credentials were rejected" in str(caught.value)
    captured = capsys.readouterr()
    joined = "\n".join([*texts, caplog.text, captured.out, captured.err])
    for form in (CANARY, CANARY.lower()):
        assert form not in joined
    _assert_no_canary_hash(joined)
    _assert_no_canary_in_tree(tmp_path)


def test_a_template_cannot_make_a_command_print_the_canary(realm: Realm) -> None:
    # A template author writes the password into another key: lint checked that key's value
    # and quoted it in its message, which validate, rollout and diff printed with real keys.
    make_realm(realm)
    inv = str(realm.inventory)
    (realm.inventory / "users.yaml").write_text(
        "users:\n  alice:\n    accounts:\n      main:\n        sip_uri: 1001@pbx.example.com\n"
        "        password:\n  bob:\n    accounts:\n      main: {sip_uri: 1002@pbx.example.com}\n"
    )
    (realm.inventory / "workstations.yaml").write_text(
        "workstations:\n  ws1:\n    address: 127.0.0.1\n    users: [alice, bob]\n"
    )
    alice = "/users/alice/accounts/main/password"
    realm.run("secrets", "set", "--path", alice, "-i", inv, stdin=CANARY, check=True)
    templates = realm.inventory / "templates"
    templates.mkdir()
    (templates / "microsip.ini.j2").write_text(
        "[Settings]\naccountId={{ active_account }}\n"
        "{% for account in accounts %}\n[Account{{ account.index }}]\n"
        "{% for key, value in account.fields.items() %}\n{{ key }}={{ value | ini }}\n"
        "{% endfor %}\ntransport={{ account.fields.password | ini }}\n{% endfor %}\n"
    )
    keys = ("--passphrase-file", str(realm.passphrase_file))
    outputs: list[str] = []
    for args in (
        ("validate", inv, *keys),
        ("validate", inv, "--format", "json", *keys),
        ("validate", inv, "--format", "github", *keys),
        ("validate", inv, "--format", "junit", *keys),
        ("render", inv, "--out", str(realm.root / "out"), *keys),
        ("rollout", "-i", inv, "--yes", *keys),
        ("diff", "ws1", "-i", inv, *keys),
    ):
        result = realm.run(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        outputs += [result.stdout, result.stderr]
    joined = "\n".join(outputs)
    assert "a password is written only through the ini filter" in joined
    assert "Traceback" not in joined
    for form in (CANARY, CANARY.lower(), CANARY[::-1]):
        assert form not in joined
    _assert_no_canary_in_tree(realm.root)
