"""Opt-in: push to a real Windows host over WinRM (see docs/windows-setup.md).

Skipped unless PROVISIONER_LIVE_HOST is set; marked ``windows_live``. It proves on real
Windows what the lab emulates: the agent scripts run under Windows PowerShell 5.1, resolve a
local account written ``.\\name``, decide installed mode as MicroSIP does (the installer's
registry value), resolve the user's profile, write UTF-16LE atomically with a backup into the
state folder in ProgramData, are idempotent, refuse a junction or a hard link that the user
put in the way, and roll back a first push by removing the file it created. The link and
removal tests make their files on the host itself, so they run only where the live host
is this machine (the Windows runner pushing to its own listener).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.inventory import resolve
from provisioner.inventory.model import Secret
from provisioner.records.results import HostResult, Status
from provisioner.render import build
from provisioner.rollout import connections, push
from provisioner.secrets import secretstore, vault
from provisioner.secrets.credscope import Scope
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


class Live:
    """The built inventory and a way to push it to the live host."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.keyring = _inventory(root)
        self.result = build.build(root, opener_factory=lambda _: self.keyring)
        assert self.result.ok, [str(f) for f in self.result.findings]
        assert self.result.inventory is not None
        self.station = resolve.resolve_station(self.result.inventory, "live")

    def transport(self) -> connections.WinrmTransport:
        return connections.open_transport(self.station, self.keyring)

    def push(self, options: push.PushOptions | None = None) -> HostResult:
        return push.push_host(
            self.station, self.result.files, self.transport(), options or push.PushOptions()
        )


def test_push_is_idempotent_and_rolls_back(tmp_path: Path) -> None:
    live = Live(tmp_path)
    station, result, transport = live.station, live.result, live.transport
    # The user is written '.\\name': NTAccount does not resolve '.', the agent rewrites it.
    assert station is not None and result.inventory is not None
    assert result.inventory.users["tester"].windows.startswith(".\\")

    first = push.push_host(station, result.files, transport())
    assert first.ok, first.message
    again = push.push_host(station, result.files, ReadOnlyTransport(transport()), dry_run=True)
    assert again.status == Status.UNCHANGED, again.message
    reset = push.push_host(station, result.files, transport(), push.PushOptions(reset=True))
    assert reset.status == Status.CHANGED, reset.message
    back = push.rollback_host(station, result.files, transport())
    assert back.status == Status.CHANGED, back.message


# --- links a user can make, on this very machine ---------------------------------------------

on_this_machine = pytest.mark.skipif(
    os.name != "nt" or os.environ.get("PROVISIONER_LIVE_HOST") not in ("127.0.0.1", "localhost"),
    reason="the links are made on the live host itself",
)


def _is_reparse_point(path: Path) -> bool:
    try:
        attributes = getattr(os.lstat(path), "st_file_attributes", 0)
    except FileNotFoundError:
        return False
    return bool(attributes & getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0x400))


@pytest.fixture
def microsip_folder() -> Iterator[Path]:
    """The live Windows user's %APPDATA%\\MicroSIP (the test runs as that user), kept aside."""
    folder = Path(os.environ["APPDATA"]) / "MicroSIP"
    aside = folder.with_name("MicroSIP.live-test")
    if folder.exists():
        folder.rename(aside)
    try:
        yield folder
    finally:
        if _is_reparse_point(folder):
            os.rmdir(folder)  # the junction itself, never its target
        elif folder.exists():
            shutil.rmtree(folder)
        if aside.exists():
            aside.rename(folder)


@on_this_machine
def test_a_junction_as_the_users_microsip_folder_is_refused(
    tmp_path: Path, microsip_folder: Path
) -> None:
    target = tmp_path / "somewhere-else"
    target.mkdir()
    subprocess.run(["cmd", "/c", "mklink", "/J", str(microsip_folder), str(target)], check=True)
    result = Live(tmp_path / "inventory").push()
    assert result.status == Status.FAILED
    assert "unsafe-path" in result.message, result.message
    assert list(target.iterdir()) == []


@on_this_machine
def test_a_hard_link_as_the_users_ini_is_refused(tmp_path: Path, microsip_folder: Path) -> None:
    other = tmp_path / "another-users-file.ini"
    other.write_bytes(b"\xff\xfe")
    microsip_folder.mkdir()
    ini = microsip_folder / "microsip.ini"
    subprocess.run(["cmd", "/c", "mklink", "/H", str(ini), str(other)], check=True)
    result = Live(tmp_path / "inventory").push()
    assert result.status == Status.FAILED
    assert "hard link" in result.message, result.message
    assert other.read_bytes() == b"\xff\xfe"


@on_this_machine
def test_a_rollback_removes_the_file_the_first_push_created(
    tmp_path: Path, microsip_folder: Path
) -> None:
    # The agent created the file: its owner passes the rollback's check (SYSTEM,
    # Administrators or the agent's account, none of which a standard user can give a file).
    live = Live(tmp_path / "inventory")
    mine = push.PushOptions(users=("tester",))
    ini = microsip_folder / "microsip.ini"
    first = live.push(mine)
    assert first.ok and ini.is_file(), first.message
    back = push.rollback_host(live.station, live.result.files, live.transport(), mine)
    [undone] = back.files
    assert undone.status == Status.CHANGED, back.message
    assert undone.message.startswith("removed"), undone.message
    assert not ini.exists()


@pytest.mark.skipif(os.name != "nt", reason="a fact of NTFS on this machine")
def test_windows_refuses_to_rename_a_folder_that_holds_an_open_file(tmp_path: Path) -> None:
    # What the agent's folder locks rely on (MS-FSA 2.1.5.14.11): while a file in a folder is
    # open, the folder is not renamed, so it cannot be swapped for a junction.
    folder = tmp_path / "locked"
    folder.mkdir()
    with (folder / "held").open("wb"):
        with pytest.raises(PermissionError) as refused:
            folder.rename(tmp_path / "moved")
        assert getattr(refused.value, "winerror", None) == 5
    folder.rename(tmp_path / "moved")  # once the file is closed, it may go
