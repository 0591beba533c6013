"""Opt-in: push to a real Windows host over WinRM (see docs/windows-setup.md).

Skipped unless PROVISIONER_LIVE_HOST is set; marked ``windows_live``. It proves on real
Windows what the lab emulates: the agent scripts run under Windows PowerShell 5.1, resolve the
user's profile, write UTF-16LE atomically with a backup, and are idempotent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provisioner import build, connections, push, resolve, secretstore, vault
from provisioner.credscope import Scope
from provisioner.model import Secret
from provisioner.results import Status
from provisioner.transport.base import ReadOnlyTransport

pytestmark = [
    pytest.mark.windows_live,
    pytest.mark.skipif(not os.environ.get("PROVISIONER_LIVE_HOST"), reason="no live host"),
]


def _inventory(root: Path) -> vault.Keyring:
    env = os.environ
    transport = env.get("PROVISIONER_LIVE_TRANSPORT", "ntlm")
    user = env["PROVISIONER_LIVE_USER"]
    windows_user = env.get("PROVISIONER_LIVE_WINDOWS_USER", user)
    if "\\" not in windows_user:
        windows_user = f".\\{windows_user}"
    scheme = "https" if transport == "basic" else "http"
    ca = env.get("PROVISIONER_LIVE_CA", "")
    install_dir = env.get("PROVISIONER_LIVE_MICROSIP_DIR", r"C:\Program Files\MicroSIP")
    (root / "inventory.yaml").write_text(
        f"""\
defaults:
  winrm:
    transport: {transport}
    scheme: {scheme}
    username: {user}
    password:
{f"    ca_trust_path: {ca}" if ca else ""}
  microsip:
    install_dir: '{install_dir}'
workstations:
  live:
    address: {env["PROVISIONER_LIVE_HOST"]}
    users: [tester]
users:
  tester:
    windows: '{windows_user}'
    accounts:
      main:
        sip_uri: 1001@pbx.example.com
        password:
"""
    )
    identity = vault.generate_identity()
    recipients = vault.new_recipients("live-test", identity.recipient())
    secretstore.write_recipients(root, recipients)
    password = Path(env["PROVISIONER_LIVE_PASSWORD_FILE"]).read_text().strip()
    scope = Scope.build([env["PROVISIONER_LIVE_HOST"]], "encrypted")
    secretstore.set_secret(root, "/defaults/winrm/password", Secret(password), recipients, scope)
    secretstore.set_secret(
        root, "/users/tester/accounts/main/password", Secret("Live-Test-Pw-1"), recipients
    )
    return vault.Keyring(recipients, {identity.kid: identity})


def test_push_is_idempotent_and_rolls_back(tmp_path: Path) -> None:
    keyring = _inventory(tmp_path)
    result = build.build(tmp_path, opener_factory=lambda _: keyring)
    assert result.ok, [str(f) for f in result.findings]
    assert result.inventory is not None
    station = resolve.resolve_station(result.inventory, "live")

    def transport() -> connections.WinrmTransport:
        return connections.open_transport(station, keyring)

    first = push.push_host(station, result.files, transport())
    assert first.ok, first.message
    again = push.push_host(station, result.files, ReadOnlyTransport(transport()), dry_run=True)
    assert again.status == Status.UNCHANGED, again.message
    reset = push.push_host(station, result.files, transport(), push.PushOptions(reset=True))
    assert reset.status == Status.CHANGED, reset.message
    back = push.rollback_host(station, result.files, transport())
    assert back.status == Status.CHANGED, back.message
