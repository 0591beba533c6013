"""The WinRM password goes only where the scope sealed with it says (docs/secrets.md).

The attacker here can edit the inventory (helpdesk, a reviewed contributor, CI) but cannot
read any password. They point a workstation at a listener of their own on loopback, or weaken
the transport of a workstation they can watch, and wait for the next push. The listener records
every connection and every byte: nothing may reach it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
from pathlib import Path

import pytest

from provisioner import errors
from provisioner.inventory.model import Secret
from provisioner.lab.certs import CertAuthority
from provisioner.rollout import connections
from provisioner.secrets import secretstore, vault
from provisioner.secrets.credscope import Scope, ca_fingerprint
from provisioner.transport.winrm import WinrmOptions, WinrmTransport
from tests.labkit import (
    ATTACKER,
    INSPECT_NOTHING,
    WINRM_PASSWORD,
    clean_env,
    copy_example,
    lab_kit,
    listener,
    run_cli,
)

WINRM_PATH = "/defaults/winrm/password"


def _example(tmp_path: Path) -> tuple[Path, list[str], str]:
    """The example inventory, the options that open its demo key, and its WinRM password."""
    inventory, identity, passphrase = copy_example(tmp_path)
    recipients = vault.load_recipients_file(inventory / "recipients.yaml")
    keyring = vault.Keyring(recipients)
    keyring.add(
        secretstore.unlock(
            secretstore.read_identity(identity), passphrase.read_bytes().split(b"\n")[0]
        )
    )
    token = secretstore.token_at(secretstore.scan_inventory(inventory), WINRM_PATH).ref.value
    password = keyring.open(token, WINRM_PATH).reveal()
    return inventory, ["--identity", str(identity), "--passphrase-file", str(passphrase)], password


def _redirect(inventory: Path, winrm: str) -> None:
    """The attacker's edit of workstations.yaml: ber-ws-001 now points at their listener."""
    stations = inventory / "workstations.yaml"
    text = stations.read_text(encoding="utf-8")
    edited = text.replace(
        "    address: ber-ws-001.corp.example.com\n",
        f"    address: {ATTACKER}\n    winrm: {{{winrm}}}\n",
    )
    assert edited != text
    stations.write_text(edited, encoding="utf-8")


EDITS = {
    "address": "port: {port}",
    "basic-over-http": "port: {port}, transport: basic, scheme: http, allow_basic_over_http: true",
    "https-without-validation": (
        "port: {port}, transport: basic, scheme: https, server_cert_validation: ignore"
    ),
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_inventory_edit_cannot_send_the_password_elsewhere(tmp_path: Path, edit: str) -> None:
    inventory, keys, password = _example(tmp_path)
    with listener() as attacker:
        _redirect(inventory, EDITS[edit].format(port=attacker.port))
        result = run_cli(
            tmp_path, "push", "ber-ws-001", "--check", "-i", str(inventory), *keys,
            env=clean_env(tmp_path),
        )  # fmt: skip
    assert attacker.connections == 0, bytes(attacker.received)[:300]
    assert not attacker.saw(password)
    # Refused as a configuration error (exit 1: nothing was contacted), in one line that
    # names the workstation, the address and the scope.
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"for ber-ws-001 to {ATTACKER}" in result.stderr
    assert "*.corp.example.com (at least encrypted)" in result.stderr
    assert password not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["diff", "ber-ws-001"],
        ["rollback", "ber-ws-001"],
        ["rollout", "--check", "--limit", "ber-ws-001"],
        ["user", "regenerate", "alice", "--check"],
        ["doctor", "ber-ws-001"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_every_command_that_connects_checks_the_scope_first(
    tmp_path: Path, command: list[str]
) -> None:
    inventory, keys, password = _example(tmp_path)
    with listener() as attacker:
        _redirect(inventory, EDITS["basic-over-http"].format(port=attacker.port))
        result = run_cli(tmp_path, *command, "-i", str(inventory), *keys, env=clean_env(tmp_path))
    assert attacker.connections == 0
    assert result.returncode in (1, 3), (result.stdout, result.stderr)
    said = result.stdout + result.stderr
    assert "outside its scope *.corp.example.com" in said and ATTACKER in said
    assert password not in said
    if command[0] == "rollout" or command[0] == "user":
        assert "nothing was contacted" in said  # the whole run stops before the fleet
    if command[0] == "doctor":
        assert "FAIL scope" in said and "dns" not in said  # not even a DNS lookup or a port


def test_a_fleet_run_stops_before_any_workstation_when_one_is_out_of_scope(
    tmp_path: Path,
) -> None:
    inventory, keys, _ = _example(tmp_path)
    with listener() as attacker:
        _redirect(inventory, EDITS["address"].format(port=attacker.port))
        result = run_cli(
            tmp_path, "rollout", "--check", "-i", str(inventory), *keys, env=clean_env(tmp_path)
        )
    assert result.returncode == 1
    assert attacker.connections == 0
    assert "1 workstation(s) cannot be reached" in result.stderr
    # The other eight were not contacted either (no DNS lookup of corp.example.com was tried).
    assert "ber-ws-002" not in result.stdout


# --------------------------------------------------------------------------- weaker transport


def _scoped_kit_options(kit: object, scope: Scope, **changes: object) -> WinrmOptions:
    from tests.labkit import Kit

    assert isinstance(kit, Kit)
    options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
    return dataclasses.replace(options, scope=scope, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"server_cert_validation": "ignore"}, "server_cert_validation: ignore"),
        ({"message_encryption": "never"}, "message_encryption: never"),
        ({"transport": "basic", "allow_basic_over_http": True}, "basic authentication"),
    ],
)
def test_push_refuses_settings_that_expose_the_credential(
    tmp_path: Path, changes: dict[str, object], refusal: str
) -> None:
    # Even a scope that asks for no security at all: a push never sends it that way.
    weak = Scope.build(["ws*"], "none")
    with lab_kit(tmp_path) as kit:
        options = _scoped_kit_options(kit, weak, **changes)
        with pytest.raises(errors.TransportError, match=refusal):
            WinrmTransport("ws01", options)
        # doctor may connect with them, to report them
        WinrmTransport("ws01", dataclasses.replace(options, diagnostic=True)).close()
        assert kit.lab.hosts["ws01"].request_count == 0


def test_a_scope_that_asks_for_tls_refuses_message_encryption(tmp_path: Path) -> None:
    with lab_kit(tmp_path) as kit:
        options = _scoped_kit_options(kit, Scope.build(["ws*"], "tls"))
        with pytest.raises(errors.TransportError, match="message encryption without verified"):
            WinrmTransport("ws01", options)
        with pytest.raises(errors.TransportError, match="outside its scope"):
            WinrmTransport("ws01", dataclasses.replace(options, lab_for="ber-ws-001"))


# --------------------------------------------------------------------------- the CA


def _rescope(inventory: Path, keys: list[str], *options: str) -> None:
    """The admin seals the example's WinRM password again (``secrets scope``)."""
    done = run_cli(
        inventory.parent, "secrets", "scope", "--path", WINRM_PATH, "-i", str(inventory),
        *options, *keys, env=clean_env(inventory.parent),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_an_inventory_ca_cannot_vouch_for_the_editors_own_listener(tmp_path: Path) -> None:
    # The admin's scope holds a network the attacker has a machine in (here loopback). The
    # attacker edits the inventory: basic over HTTPS, validated against a CA of their own.
    inventory, keys, password = _example(tmp_path)
    _rescope(inventory, keys, "--scope", "*.corp.example.com", "--scope", "127.0.0.0/8")
    authority = CertAuthority(tmp_path / "attacker-ca")
    issued = authority.issue("attacker", ATTACKER)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(issued.cert_path, issued.key_path)
    with listener(tls) as attacker:
        _redirect(
            inventory,
            f"port: {attacker.port}, transport: basic, scheme: https, "
            f"ca_trust_path: '{authority.ca_path}'",
        )
        result = run_cli(
            tmp_path, "push", "ber-ws-001", "--check", "-i", str(inventory), *keys,
            env=clean_env(tmp_path),
        )  # fmt: skip
    assert attacker.connections == 0 and not attacker.saw(password)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "a CA file the scope does not pin" in result.stderr
    assert password not in result.stdout + result.stderr


def _with_ca(kit: object, ca_path: Path) -> None:
    """The inventory names ``ca_trust_path`` for every workstation."""
    from tests.labkit import Kit

    assert isinstance(kit, Kit)
    defaults = kit.root / "inventory.yaml"
    text = defaults.read_text()
    defaults.write_text(text.replace("  winrm:\n", f"  winrm:\n    ca_trust_path: '{ca_path}'\n"))
    kit.rebuild()


def test_a_ca_file_pinned_in_the_scope_verifies_tls(tmp_path: Path) -> None:
    with lab_kit(tmp_path, transport="basic") as kit:
        # The admin's copy of the CA, checked out with Windows line endings: the same pin.
        ca = tmp_path / "corp-ca.pem"
        ca.write_bytes(Path(kit.lab.lab_map().ca_path).read_bytes())
        checkout = tmp_path / "checkout-ca.pem"
        checkout.write_bytes(ca.read_bytes().replace(b"\n", b"\r\n"))
        _with_ca(kit, checkout)
        # Sealed before the inventory named a CA: at least encrypted is no longer met.
        with pytest.raises(errors.TransportError, match="a CA file the scope does not pin"):
            kit.transport("ws01")
        pinned = Scope.build(["ws*"], "tls", ca=ca_fingerprint(ca.read_bytes()))
        scan = secretstore.scan_inventory(kit.root)
        secretstore.rescope(scan, kit.keyring, WINRM_PATH, pinned)
        kit.rebuild()
        assert kit.push("ws01").ok
        # Another certificate appended to the named file is another CA file.
        other = CertAuthority(tmp_path / "other-ca").ca_path.read_bytes()
        checkout.write_bytes(checkout.read_bytes() + other)
        with pytest.raises(errors.TransportError, match="a CA file the scope does not pin"):
            kit.transport("ws01")
        checkout.unlink()
        with pytest.raises(errors.CaFileError, match=r"ws01: winrm\.ca_trust_path: cannot"):
            kit.transport("ws01")


SCOPE_MATCHES = [
    ("ws01.corp.example.com", "WS01.corp.example.com", True),
    ("ws01.corp.example.com", "ws01.corp.example.com.attacker.example", False),
    ("*.corp.example.com", "a.b.corp.example.com", True),
    ("*.corp.example.com", "corp.example.com", False),
    ("ber-ws-*", "ber-ws-001", True),
    ("ber-ws-*", "ber-ws-001.attacker.example", False),
    ("ber-ws-*.corp.example.com", "ber-ws-001.corp.example.com", True),
    ("10.20.0.0/16", "10.20.1.5", True),
    ("10.20.0.0/16", "ws01.corp.example.com", False),
    ("*.corp.example.com", "10.20.1.5", False),
]


@pytest.mark.parametrize(("pattern", "address", "allowed"), SCOPE_MATCHES)
def test_a_scope_pattern_matches_what_the_docs_say(
    pattern: str, address: str, allowed: bool
) -> None:
    assert Scope.build([pattern], "encrypted").allows(address) is allowed


@pytest.mark.parametrize(
    ("patterns", "why"),
    [
        (["*"], "matches every host"),
        (["**"], "matches every host"),
        (["**.corp.example.com"], "matches every host"),
        (["*.**"], "first label only"),
        (["corp.*"], "first label only"),
        (["*.c*"], "first label only"),
        (["0.0.0.0/0"], "matches every address"),
        (["::/0"], "matches every address"),
        ([f"ws{n:03d}-{'x' * 55}.corp.example.com" for n in range(64)], "more than 4096"),
    ],
)
def test_a_scope_that_would_match_anything_or_not_fit_a_token_is_refused(
    patterns: list[str], why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        Scope.build(patterns, "encrypted")


def test_a_pinned_scope_reads_back_from_its_token(tmp_path: Path) -> None:
    pin = ca_fingerprint(b"-----BEGIN CERTIFICATE-----\n")
    scope = Scope.build(["ws*"], "tls", ca=pin)
    assert scope.text == f"min=tls;ca={pin};hosts=ws*"
    assert Scope.parse(scope.text) == scope
    assert Scope.parse("min=encrypted;hosts=ws*") == Scope.build(["ws*"], "encrypted")
    for edited in (f"min=tls;ca={pin.upper()};hosts=ws*", f"min=tls;ca={pin[:-1]};hosts=ws*"):
        with pytest.raises(ValueError):
            Scope.parse(edited)


def test_scope_options_are_checked_before_any_key_or_password_is_asked(tmp_path: Path) -> None:
    inventory, _, _ = copy_example(tmp_path)
    env = clean_env(tmp_path)
    alone = run_cli(
        tmp_path, "secrets", "scope", "--path", WINRM_PATH, "-i", str(inventory),
        "--min-security", "tls", env=env,
    )  # fmt: skip
    assert alone.returncode == 1 and "give --scope too" in alone.stderr
    sip = run_cli(
        tmp_path, "secrets", "scope", "--path", "/users/alice/accounts/main/password",
        "-i", str(inventory), "--scope", "ws*", env=env,
    )  # fmt: skip
    # No identity was given: the refusal comes first, not a request for the key.
    assert sip.returncode == 1 and "only those take --scope" in sip.stderr
    level = run_cli(
        tmp_path, "secrets", "set", "--path", WINRM_PATH, "-i", str(inventory), "--stdin",
        "--scope", "ws*", "--min-security", "strong", env=env, stdin="x-Pw-1\n",
    )  # fmt: skip
    assert level.returncode == 1 and "--min-security: one of none, encrypted, tls" in level.stderr
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)  # no writer ever comes: reading it would wait for ever
    never = run_cli(
        tmp_path, "secrets", "set", "--path", WINRM_PATH, "-i", str(inventory), "--stdin",
        "--scope", "ws*", "--ca", str(fifo), env=env, stdin="x-Pw-1\n",
    )  # fmt: skip
    assert never.returncode == 1 and f"--ca: {fifo} is not a file" in never.stderr


def test_a_winrm_token_cannot_be_rebound_to_a_sip_password(tmp_path: Path) -> None:
    with lab_kit(tmp_path) as kit:
        defaults = kit.root / "inventory.yaml"
        text = defaults.read_text()
        token = _winrm_token(kit.root)
        sip = "/users/u1x1/accounts/main/password"
        sip_token = secretstore.token_at(secretstore.scan_inventory(kit.root), sip).ref.value
        defaults.write_text(text.replace(sip_token, token))
        with pytest.raises(errors.VaultError, match="not a WinRM password"):
            secretstore.rebind(secretstore.scan_inventory(kit.root), kit.keyring, WINRM_PATH, sip)
        assert defaults.read_text() == text.replace(sip_token, token)


# --------------------------------------------------------------------------- the token


def _winrm_token(root: Path) -> str:
    return secretstore.token_at(secretstore.scan_inventory(root), WINRM_PATH).ref.value


def test_an_edited_scope_does_not_open(tmp_path: Path) -> None:
    with lab_kit(tmp_path) as kit:
        token = _winrm_token(kit.root)
        head, scope_field, payload = token.rsplit(":", 2)
        wider = Scope.build(["ws*", "127.0.0.0/8", "*.attacker.example"], "none")
        forged = f"{head}:{vault.b64url_encode(wider.text.encode())}:{payload}"
        assert vault.token_scope(forged) == wider  # what the token claims...
        with pytest.raises(errors.CannotDecryptError):
            kit.keyring.open(forged, WINRM_PATH)  # ...is not what was sealed
        # Dropping the scope (a v1 token with the same payload) does not open either.
        v1 = token.replace("sipvault:v2:", "sipvault:v1:").replace(f":{scope_field}:", ":")
        assert vault.token_scope(v1) is None
        with pytest.raises(errors.CannotDecryptError):
            kit.keyring.open(v1, WINRM_PATH)


def test_a_copied_scoped_token_opens_only_where_it_was_sealed(tmp_path: Path) -> None:
    with lab_kit(tmp_path) as kit:
        token = _winrm_token(kit.root)
        with pytest.raises(errors.PathMismatchError):
            kit.keyring.open(token, "/workstations/ws01/winrm/password")


def test_an_unscoped_winrm_password_is_never_sent_and_the_fix_is_one_command(
    tmp_path: Path,
) -> None:
    with lab_kit(tmp_path) as kit:
        recipients = kit.keyring.recipients
        old = vault.seal(
            Secret(WINRM_PASSWORD),
            realm=recipients.realm,
            path=WINRM_PATH,
            recipient=recipients.active_key(),
        )
        defaults = kit.root / "inventory.yaml"
        defaults.write_text(defaults.read_text().replace(_winrm_token(kit.root), old))
        kit.rebuild()
        with pytest.raises(errors.TransportError) as caught:
            kit.transport("ws01")
        assert "sealed without a scope" in str(caught.value)
        assert f"provisioner secrets scope --path {WINRM_PATH}" in str(caught.value)
        findings = secretstore.lint_secrets(secretstore.scan_inventory(kit.root), recipients)
        assert [f.code for f in findings] == ["unscoped-credential"]
        scan = secretstore.scan_inventory(kit.root)
        secretstore.rescope(scan, kit.keyring, WINRM_PATH, Scope.build(["ws*"], "encrypted"))
        kit.rebuild()
        assert kit.push("ws01").ok
        assert kit.lab.hosts["ws01"].request_count > 0


def test_secrets_set_asks_a_winrm_password_for_its_scope(tmp_path: Path) -> None:
    with lab_kit(tmp_path) as kit:
        env = clean_env(tmp_path)
        refused = run_cli(
            tmp_path, "secrets", "set", "--path", WINRM_PATH, "-i", str(kit.root), "--stdin",
            env=env, stdin="New-WinRM-Pw-1\n",
        )  # fmt: skip
        assert refused.returncode == 1 and "--scope" in refused.stderr
        sip = run_cli(
            tmp_path, "secrets", "set", "--user", "u1x1", "-i", str(kit.root), "--stdin",
            "--scope", "ws*", env=env, stdin="New-Sip-Pw-1\n",
        )  # fmt: skip
        assert sip.returncode == 1 and "only those take --scope" in sip.stderr
        done = run_cli(
            tmp_path, "secrets", "set", "--path", WINRM_PATH, "-i", str(kit.root), "--stdin",
            "--scope", "WS*", "--scope", "10.20.0.0/16", "--min-security", "tls",
            env=env, stdin="New-WinRM-Pw-1\n",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "scope 10.20.0.0/16, ws* (at least tls)" in done.stdout.replace("scope:", "scope")
        shown = run_cli(
            tmp_path, "secrets", "scope", "--path", WINRM_PATH, "-i", str(kit.root), env=env
        )
        assert "scope 10.20.0.0/16, ws* (at least tls)" in shown.stdout
        bad = run_cli(
            tmp_path, "secrets", "set", "--path", WINRM_PATH, "-i", str(kit.root), "--stdin",
            "--scope", "*", env=env, stdin="x-Pw-1\n",
        )  # fmt: skip
        assert bad.returncode == 1 and "matches every host" in bad.stderr


def test_rekey_and_rebind_keep_the_scope(tmp_path: Path) -> None:
    with lab_kit(tmp_path) as kit:
        before = vault.token_scope(_winrm_token(kit.root))
        new = vault.generate_identity()
        recipients = kit.keyring.recipients.with_key(new.recipient(), make_active=True)
        secretstore.write_recipients(kit.root, recipients)
        keyring = vault.Keyring(recipients, {**kit.keyring.identities, new.kid: new})
        secretstore.rekey(secretstore.scan_inventory(kit.root), keyring, new.kid)
        after = _winrm_token(kit.root)
        assert vault.parse_token(after).kid == new.kid
        assert vault.token_scope(after) == before
        assert keyring.open(after, WINRM_PATH).reveal() == WINRM_PASSWORD


# --------------------------------------------------------------------------- the lab


def test_a_lab_file_only_points_at_loopback(tmp_path: Path) -> None:
    # .lab.json may sit in the inventory folder, where an editor could commit one.
    lab_file = tmp_path / ".lab.json"
    lab_file.write_text(
        json.dumps(
            {
                "version": 1,
                "ca_path": "ca.pem",
                "hosts": {"ws01": {"address": "192.0.2.10", "port": 5985, "scheme": "http"}},
            }
        )
    )
    with pytest.raises(errors.LabError, match="not loopback"):
        connections.LabMap.load(lab_file)


def test_the_lab_needs_no_wider_scope(tmp_path: Path) -> None:
    # The example's password may go to *.corp.example.com only; the lab stands in for those
    # addresses on 127.0.0.N, and a push to it is checked against the inventory address.
    with lab_kit(tmp_path) as kit:
        options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
        assert options.lab_for == "ws01" and options.address.startswith("127.")
        assert options.scope is not None and not options.scope.allows(options.address)
        assert kit.push("ws01").ok


# --------------------------------------------------------------------------- addresses


HOSTILE_ADDRESSES = [
    "evil.example.net:8443",
    "http://evil.example.net/wsman",
    "svc@evil.example.net",
    "evil.example.net/x?",
    "[::1]",
    "fe80::1%eth0",
    "127.1",
    "0x7f000001",
    "2130706433",
    "ws01.",
    "münchen.example",
]


@pytest.mark.parametrize("address", HOSTILE_ADDRESSES)
def test_addresses_are_host_names_or_ip_literals(tmp_path: Path, address: str) -> None:
    inventory, _, _ = copy_example(tmp_path)
    stations = inventory / "workstations.yaml"
    text = stations.read_text(encoding="utf-8")
    stations.write_text(
        text.replace("address: ber-ws-002.corp.example.com", f"address: '{address}'"),
        encoding="utf-8",
    )
    result = run_cli(tmp_path, "validate", str(inventory), env=clean_env(tmp_path))
    assert result.returncode == 1, result.stdout
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "ber-ws-002.corp" in row)
    assert f"workstations.yaml:{line}:14: error[inventory]: " in result.stdout
    assert "/workstations/ber-ws-002/address" in result.stdout


def test_a_workstation_named_like_a_number_needs_an_address(tmp_path: Path) -> None:
    inventory, _, _ = copy_example(tmp_path)
    stations = inventory / "workstations.yaml"
    stations.write_text(
        stations.read_text(encoding="utf-8") + "  '3232235777':\n    groups: [kiosk]\n",
        encoding="utf-8",
    )
    result = run_cli(tmp_path, "validate", str(inventory), env=clean_env(tmp_path))
    assert result.returncode == 1
    assert "name is its address unless 'address' is set" in result.stdout


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [
        ("ws01.corp.example.com", "https://ws01.corp.example.com:5986/wsman"),
        ("10.20.1.5", "https://10.20.1.5:5986/wsman"),
        ("fd00::5", "https://[fd00::5]:5986/wsman"),
    ],
)
def test_the_endpoint_is_built_from_its_parts(address: str, endpoint: str) -> None:
    scope = Scope.build(["*.corp.example.com", "10.0.0.0/8", "fd00::/8"], "tls")
    options = WinrmOptions(address, "svc", Secret("pw"), transport="basic", scope=scope)
    assert options.endpoint == endpoint
    host, port = options.connect_to
    assert (host, port) == (address, 5986)


def test_a_hostile_address_given_directly_is_refused_before_connecting() -> None:
    scope = Scope.build(["*.example.net"], "encrypted")
    for address in ("evil.example.net/x?", "evil.example.net:80", "a@evil.example.net"):
        with pytest.raises(errors.TransportError, match="address"):
            WinrmTransport("ws01", WinrmOptions(address, "svc", Secret("pw"), scope=scope))


def test_doctor_connects_where_the_push_connects(tmp_path: Path) -> None:
    from provisioner.rollout import doctor

    scope = Scope.build(["127.0.0.0/8", "localhost"], "encrypted")
    with listener() as target:
        for address in (ATTACKER, "localhost"):
            options = WinrmOptions(address, "svc", Secret("pw"), port=target.port, scope=scope)
            before = target.connections
            checks = doctor.network_checks(options)
            assert [c.name for c in checks] == ["dns", "port"] and all(c.ok for c in checks)
            transport = WinrmTransport("ws01", options)
            with pytest.raises(errors.TransportError):
                transport.request(INSPECT_NOTHING)
            transport.close()
            # one connection from doctor's port check, then the push's own to the same socket
            assert target.connections >= before + 2
        assert b"POST /wsman HTTP/1.1" in bytes(target.received)
