"""The lab agent on emulated workstations, driven by the real pywinrm over real HTTPS.

Every request goes through the packaged bootstrap and scripts of
``provisioner.transport.agent.scripts`` (the lab checks the script text byte for byte) and
``winrm.protocol.Protocol``; the workstation behind each host is a real folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from winrm.protocol import Protocol

from provisioner.lab import HostConfig, Lab, LabHost
from provisioner.lab.agent import CRASH_EXIT_CODE, LabAgent
from provisioner.lab.fleet import UserSpec, WorkstationSpec, add_fleet
from provisioner.lab.ntlmusers import ENV_VAR
from provisioner.lab.workstation import (
    ADMINISTRATORS,
    DOMAIN_SID,
    MACHINE_SID,
    OVERRIDE_ACL,
    SYSTEM,
    USERS,
    FileError,
    User,
    Workstation,
    WorkstationFaults,
    corrupt,
    user_file_acl,
)
from provisioner.transport.agent import scripts

ADMIN = "lab-admin"
PASSWORD = "Corr3ct-h0rse"
CREDS = {ADMIN: PASSWORD}
PROGRAM_DIR = "C:\\Program Files\\MicroSIP"
ALICE_INI = "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP\\microsip.ini"
APPLY_KEYS = {"path", "status", "old_sha256", "new_sha256", "backup", "stopped", "error"}


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("test exceeded its time budget")


@pytest.fixture(autouse=True)
def time_budget() -> Iterator[None]:
    """Every test of this file must finish within 30 s, whatever happens."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def lab() -> Iterator[Lab]:
    before = os.environ.get(ENV_VAR)
    lab = Lab(LabAgent(), io_timeout=5.0)
    try:
        yield lab
    finally:
        lab.stop(timeout=5.0)
    assert [t.name for t in threading.enumerate() if t.name.startswith("lab-")] == []
    assert os.environ.get(ENV_VAR) == before


class Agent:
    """One WinRM shell on one lab host, as the controller uses it."""

    def __init__(self, lab: Lab, host: LabHost) -> None:
        self.host = host
        self.protocol = Protocol(
            host.url,
            transport="basic",
            username=ADMIN,
            password=PASSWORD,
            read_timeout_sec=5,
            operation_timeout_sec=3,
            server_cert_validation="validate",
            ca_trust_path=str(lab.ca_path),
            proxy=None,
        )
        self._shell: str | None = None

    def raw(
        self, stdin: bytes, command: tuple[str, list[str]] | None = None
    ) -> tuple[bytes, bytes, int]:
        """Run a command with ``stdin`` in the shared shell."""
        if self._shell is None:
            self._shell = self.protocol.open_shell(codepage=65001)
        line, arguments = command or scripts.bootstrap_command()
        command_id = self.protocol.run_command(self._shell, line, arguments)
        self.protocol.send_command_input(self._shell, command_id, stdin, end=True)
        result: tuple[bytes, bytes, int] = self.protocol.get_command_output(self._shell, command_id)
        self.protocol.cleanup_command(self._shell, command_id)
        return result

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request; the agent must exit 0 with a protocol-1 answer."""
        out, err, code = self.raw(scripts.make_envelope(request["op"], request))
        assert (code, err) == (0, b"")
        answer: dict[str, Any] = scripts.parse_answer(out)
        assert answer["protocol"] == 1 and answer["op"] == request["op"]
        return answer

    def close(self) -> None:
        if self._shell is not None:
            self.protocol.close_shell(self._shell)
            self._shell = None


@dataclass
class Station:
    host: LabHost
    ws: Workstation
    agent: Agent
    alice: User
    bob: User


@pytest.fixture
def station(lab: Lab, tmp_path: Path) -> Iterator[Station]:
    """An installed-mode workstation with two logged-on domain users."""
    host = lab.add_host(HostConfig(credentials=CREDS, scheme="https", port=0))
    ws = Workstation(tmp_path / "ws", computer="BER-WS-001")
    ws.install_microsip("installed")
    alice = ws.add_user("ACME\\alice")
    bob = ws.add_user("ACME\\bob")
    host.state = ws
    agent = Agent(lab, host)
    try:
        yield Station(host, ws, agent, alice, bob)
    finally:
        agent.close()
    assert host.handler_errors == []
    assert host.open_shells == 0


# --- request builders -------------------------------------------------------------------------


def ini(text: str) -> bytes:
    """A MicroSIP ini as written: UTF-16LE with BOM, CRLF."""
    return b"\xff\xfe" + f"[Settings]\r\naccountId=1\r\n; {text}\r\n".encode("utf-16-le")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def inspect_request(
    users: list[tuple[str, str]],
    *,
    mode: str = "installed",
    install_dir: str = PROGRAM_DIR,
    exe: str = "microsip.exe",
    override: bool = True,
) -> dict[str, Any]:
    return {
        "op": "inspect",
        "protocol": 1,
        "install": {"mode": mode, "install_dir": install_dir, "exe": exe},
        "users": [{"name": name, "windows": windows} for name, windows in users],
        "override": override,
    }


def file_entry(
    path: str,
    content: bytes,
    *,
    expect: str | None,
    user: User | None = None,
    applied: bytes | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """An apply entry: a user's microsip.ini when ``user`` is given, else override.ini."""
    return {
        "kind": "microsip" if user else "override",
        "user": user.sam if user else None,
        "sid": user.sid if user else None,
        "path": path,
        "expect_sha256": expect,
        "content_b64": b64(content),
        "sha256": sha256 or sha(content),
        "applied_b64": b64(b"applied " + content if applied is None else applied),
        "process": "microsip.exe" if user else None,
    }


def target(path: str, user: User | None = None) -> dict[str, Any]:
    """A rollback entry."""
    return {
        "kind": "microsip" if user else "override",
        "user": user.sam if user else None,
        "sid": user.sid if user else None,
        "path": path,
        "process": "microsip.exe" if user else None,
    }


def apply_request(files: list[dict[str, Any]], if_running: str = "skip") -> dict[str, Any]:
    return {"op": "apply", "protocol": 1, "if_running": if_running, "files": files}


def rollback_request(files: list[dict[str, Any]], if_running: str = "skip") -> dict[str, Any]:
    return {"op": "rollback", "protocol": 1, "if_running": if_running, "files": files}


def write(st: Station, user: User, content: bytes, if_running: str = "skip") -> dict[str, Any]:
    """Apply ``content`` to the user's ini with the right compare-and-swap hash."""
    path = st.ws.ini_path(user)
    entry = file_entry(path, content, expect=st.ws.sha256(path), user=user)
    [result] = st.agent.call(apply_request([entry], if_running))["files"]
    assert set(result) == APPLY_KEYS
    return dict(result)


def state(ws: Workstation, path: str, item: str) -> bytes | None:
    return ws.read(Workstation.state_path(path, item))


def temp_files(ws: Workstation, folder: str) -> list[str]:
    return [name for name in ws.listdir(folder) if name.endswith(".tmp")]


def error_code(result: dict[str, Any]) -> str | None:
    error = result["error"]
    return None if error is None else str(error["code"])


# --- the workstation itself -------------------------------------------------------------------


def test_paths_resolve_case_insensitively_and_accounts_translate(tmp_path: Path) -> None:
    ws = Workstation(tmp_path, computer="ber-ws-002")
    ws.put("C:\\Program Files\\MicroSIP\\MicroSIP.ini", b"x")
    real = ws.host_path("c:\\PROGRAM FILES\\microsip\\microsip.INI")
    assert real == tmp_path / "C" / "Program Files" / "MicroSIP" / "MicroSIP.ini"
    assert ws.read("C:/program files/microsip/MICROSIP.ini") == b"x"
    assert ws.host_path("D:\\Data\\New") == tmp_path / "D" / "Data" / "New"
    alice = ws.add_user("ACME\\alice")
    kiosk = ws.add_user(".\\kiosk", logged_on=False)
    assert (alice.sid, alice.profile) == (f"{DOMAIN_SID}-1104", "C:\\Users\\alice")
    assert (kiosk.windows, kiosk.sid, kiosk.profile) == (
        "BER-WS-002\\kiosk",
        f"{MACHINE_SID}-1001",
        None,
    )
    assert ws.lookup_account("acme\\ALICE") is alice
    assert ws.lookup_account(".\\Kiosk") is kiosk
    assert ws.lookup_account("alice") is alice
    assert ws.lookup_account("OTHER\\alice") is None
    assert ws.host_path(alice.appdata or "").is_dir()
    with pytest.raises(ValueError, match="exists"):
        ws.add_user("Acme\\Alice")


def test_folders_are_created_under_existing_ones_whatever_their_case(tmp_path: Path) -> None:
    ws = Workstation(tmp_path)
    ws.put("C:\\Data\\Sub\\File.txt", b"x")
    events: list[str] = []
    ws.observe(events.append)
    assert ws.make_dir("c:\\DATA\\sub", OVERRIDE_ACL) is False
    assert ws.make_dir("c:\\DATA\\sub\\New\\Deeper", OVERRIDE_ACL) is True
    assert sorted(os.listdir(tmp_path / "C")) == ["Data"]
    assert sorted(os.listdir(tmp_path / "C" / "Data" / "Sub")) == ["File.txt", "New"]
    assert events == ["mkdir C:\\DATA\\sub\\New", "mkdir C:\\DATA\\sub\\New\\Deeper"]
    assert ws.acl("C:\\Data\\Sub") is None and ws.acl("C:\\data\\sub\\new") == OVERRIDE_ACL
    assert ws.read("c:\\data\\SUB\\file.TXT") == b"x"
    assert ws.is_dir("C:\\DATA\\SUB\\NEW\\DEEPER") and not ws.exists("C:\\Data\\Sub\\Other")
    assert ws.list_files("c:\\data\\sub") == ["File.txt"]
    assert ws.list_files("C:\\Data\\Missing") == []
    with pytest.raises(FileError, match="not a folder"):
        ws.make_dir("C:\\data\\sub\\file.txt\\Inside", OVERRIDE_ACL)
    ws.write_new("c:\\data\\sub\\NEW\\f.tmp", b"abc", OVERRIDE_ACL)
    assert (tmp_path / "C" / "Data" / "Sub" / "New" / "f.tmp").read_bytes() == b"abc"
    with pytest.raises(FileError, match="exists already"):
        ws.write_new("C:\\Data\\Sub\\New\\F.TMP", b"other", OVERRIDE_ACL)


def test_changes_behind_the_workstations_back_are_seen_at_once(tmp_path: Path) -> None:
    ws = Workstation(tmp_path)
    ws.put("C:\\Data\\a.ini", b"1")
    assert ws.read("c:\\data\\A.INI") == b"1"
    (tmp_path / "C" / "Data").rename(tmp_path / "C" / "DATA")
    (tmp_path / "C" / "DATA" / "a.ini").write_bytes(b"2")
    assert ws.read("c:\\data\\A.INI") == b"2"
    assert ws.host_path("C:\\Data\\a.ini") == tmp_path / "C" / "DATA" / "a.ini"
    (tmp_path / "C" / "DATA" / "a.ini").unlink()
    assert ws.read("C:\\Data\\a.ini") is None and not ws.is_file("C:\\Data\\a.ini")


# --- inspect ----------------------------------------------------------------------------------


def test_inspect_installed_mode(station: Station) -> None:
    ws, alice = station.ws, station.alice
    old = ini("alice by hand")
    ws.put(ALICE_INI, old)
    ws.put(Workstation.state_path(ALICE_INI, "applied"), b"applied base")
    ws.put(f"{PROGRAM_DIR}\\override.ini", b"[Settings]\r\n")
    ws.start_microsip(alice)
    ws.start_microsip(station.bob, "other.exe")
    answer = station.agent.call(inspect_request([("alice", "ACME\\alice"), ("bob", "acme\\BOB")]))
    assert answer["ok"] is True
    assert answer["host"] == {
        "computer": "BER-WS-001",
        "ps_version": "5.1.19041.4648",
        "free_bytes": 51_234_567_890,
    }
    assert answer["install"] == {
        "found": True,
        "mode": "installed",
        "dir": PROGRAM_DIR,
        "exe_path": f"{PROGRAM_DIR}\\microsip.exe",
        "source": "inventory",
    }
    assert answer["override"] == {
        "path": f"{PROGRAM_DIR}\\override.ini",
        "exists": True,
        "sha256": sha(b"[Settings]\r\n"),
        "content_b64": b64(b"[Settings]\r\n"),
        "applied": {"exists": False, "sha256": None, "content_b64": None},
        "error": None,
    }
    first, second = answer["users"]
    assert first == {
        "name": "alice",
        "windows": "ACME\\alice",
        "sid": alice.sid,
        "profile": "C:\\Users\\alice",
        "appdata": "C:\\Users\\alice\\AppData\\Roaming",
        "path": ALICE_INI,
        "exists": True,
        "sha256": sha(old),
        "content_b64": b64(old),
        "applied": {
            "exists": True,
            "sha256": sha(b"applied base"),
            "content_b64": b64(b"applied base"),
        },
        "running": True,
        "error": None,
    }
    assert second["sid"] == station.bob.sid
    assert second["path"] == "C:\\Users\\bob\\AppData\\Roaming\\MicroSIP\\microsip.ini"
    assert (second["exists"], second["sha256"], second["content_b64"]) == (False, None, None)
    assert (second["running"], second["error"]) == (False, None)


def test_inspect_portable_mode_uses_the_ini_next_to_the_renamed_exe(
    lab: Lab, tmp_path: Path
) -> None:
    host = lab.add_host(HostConfig(credentials=CREDS, scheme="https", port=0))
    ws = Workstation(tmp_path, computer="KIOSK-7")
    ws.install_microsip("portable", install_dir="D:\\Tools\\Qphone", exe="Qphone.exe")
    kiosk = ws.add_user(".\\kiosk")
    ws.put("D:\\tools\\qphone\\QPHONE.ini", b"portable")
    host.state = ws
    agent = Agent(lab, host)
    request = inspect_request(
        [("kiosk", ".\\kiosk")], mode="portable", install_dir="D:\\Tools\\Qphone", exe="Qphone.exe"
    )
    answer = agent.call(request)
    agent.close()
    assert answer["install"]["source"] == "inventory"
    assert answer["install"]["mode"] == "portable"
    assert ws.hklm_microsip is None
    [user] = answer["users"]
    assert user["sid"] == kiosk.sid
    assert user["path"] == "D:\\Tools\\Qphone\\Qphone.ini"
    assert user["content_b64"] == b64(b"portable")
    assert answer["override"]["path"] == "D:\\Tools\\Qphone\\override.ini"


def test_inspect_user_errors_do_not_hide_the_others(station: Station) -> None:
    station.ws.add_user("ACME\\carol", logged_on=False)
    answer = station.agent.call(
        inspect_request(
            [("carol", "ACME\\carol"), ("ghost", "ACME\\ghost"), ("alice", "ACME\\alice")]
        )
    )
    carol, ghost, alice = answer["users"]
    assert carol["error"]["code"] == "no-profile"
    assert carol["sid"].startswith(DOMAIN_SID) and carol["profile"] is None
    assert carol["path"] is None and "exists" not in carol and "running" not in carol
    assert ghost["error"]["code"] == "no-account"
    assert ghost["sid"] is None and ghost["path"] is None and "exists" not in ghost
    assert alice["error"] is None and alice["path"] == ALICE_INI


def test_inspect_uses_the_users_own_shell_folders_never_the_winrm_account(
    station: Station,
) -> None:
    ws = station.ws
    ws.add_user(f".\\{ADMIN}")  # the WinRM account has a profile of its own
    ws.add_user("ACME\\dave", shell_appdata="%USERPROFILE%\\Roaming2", hive_loaded=True)
    ws.add_user("ACME\\erin", shell_appdata="H:\\Redirected\\erin", hive_loaded=False)
    ws.add_user("ACME\\fred", profile="C:\\Users\\fred.ACME")
    ws.add_user("ACME\\gina", shell_appdata="%HOMESHARE%\\AppData", hive_loaded=True)
    names = ["dave", "erin", "fred", "gina"]
    answer = station.agent.call(inspect_request([(name, f"ACME\\{name}") for name in names]))
    *resolved, gina = answer["users"]
    assert gina["error"]["code"] == "internal" and "%HOMESHARE%" in gina["error"]["message"]
    paths = [user["path"] for user in resolved]
    assert paths == [
        "C:\\Users\\dave\\Roaming2\\MicroSIP\\microsip.ini",
        "C:\\Users\\erin\\AppData\\Roaming\\MicroSIP\\microsip.ini",
        "C:\\Users\\fred.ACME\\AppData\\Roaming\\MicroSIP\\microsip.ini",
    ]
    assert all(ADMIN not in path for path in paths)


@pytest.mark.parametrize(
    ("registry", "msi", "source"),
    [(True, False, "registry"), (False, True, "msi"), (False, False, None)],
)
def test_inspect_discovery_when_the_inventory_dir_is_wrong(
    station: Station, registry: bool, msi: bool, source: str | None
) -> None:
    ws = station.ws
    ws.uninstall_microsip()
    ws.install_microsip("installed", install_dir="E:\\Apps\\MicroSIP", registry=registry, msi=msi)
    answer = station.agent.call(inspect_request([("alice", "ACME\\alice")], mode="installed"))
    install = answer["install"]
    assert install["source"] == source
    if source is None:
        assert install == {
            "found": False,
            "mode": "installed",
            "dir": None,
            "exe_path": None,
            "source": None,
        }
        assert answer["override"]["path"] is None
        assert answer["override"]["error"]["code"] == "not-installed"
        [alice] = answer["users"]
        assert alice["error"]["code"] == "not-installed"
        assert alice["path"] is None and "exists" not in alice
    else:
        assert install["found"] is True
        assert install["exe_path"] == "E:\\Apps\\MicroSIP\\microsip.exe"
        assert answer["override"]["path"] == "E:\\Apps\\MicroSIP\\override.ini"
        assert answer["users"][0]["path"] == ALICE_INI


def test_not_installed_at_all(station: Station) -> None:
    station.ws.uninstall_microsip()
    answer = station.agent.call(inspect_request([("alice", "ACME\\alice")]))
    assert answer["ok"] is True and answer["install"]["found"] is False
    assert answer["users"][0]["error"]["code"] == "not-installed"


# --- apply ------------------------------------------------------------------------------------


def test_first_write_creates_the_folder_the_file_and_applied_with_acls(station: Station) -> None:
    ws, alice = station.ws, station.alice
    folder = "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP"
    assert not ws.exists(folder)
    content = ini("first")
    result = write(station, alice, content)
    assert result == {
        "path": ALICE_INI,
        "status": "written",
        "old_sha256": None,
        "new_sha256": sha(content),
        "backup": None,
        "stopped": 0,
        "error": None,
    }
    assert ws.read(ALICE_INI) == content
    assert state(ws, ALICE_INI, "applied") == b"applied " + content
    assert state(ws, ALICE_INI, "backup.1") is None
    user_acl = user_file_acl(alice.sid)
    assert user_acl.rights() == {
        alice.sid: "FullControl",
        SYSTEM: "FullControl",
        ADMINISTRATORS: "FullControl",
    }
    assert user_acl.inherit is False
    for path in (
        folder,
        ALICE_INI,
        f"{folder}\\.provisioner\\microsip.ini",
        f"{folder}\\.provisioner\\microsip.ini\\applied",
    ):
        assert ws.acl(path) == user_acl, path
    assert ws.acl("C:\\Users\\alice\\AppData\\Roaming") is None  # existed: not touched
    assert temp_files(ws, folder) == []
    assert ws.listdir(f"{folder}\\.provisioner\\microsip.ini") == ["applied"]


def test_updates_rotate_three_backup_generations(station: Station) -> None:
    ws, alice = station.ws, station.alice
    contents = [ini(f"v{n}") for n in range(6)]
    ws.put(ALICE_INI, contents[0])  # MicroSIP's own file, inherited ACL
    for number, content in enumerate(contents[1:], start=1):
        result = write(station, alice, content)
        assert result["status"] == "written"
        assert result["old_sha256"] == sha(contents[number - 1])
        assert result["backup"] == Workstation.state_path(ALICE_INI, "backup.1")
        assert ws.read(ALICE_INI) == content
        assert state(ws, ALICE_INI, "backup.1") == contents[number - 1]
    assert [state(ws, ALICE_INI, f"backup.{n}") for n in (1, 2, 3)] == contents[4:1:-1]
    items = ws.listdir("C:\\Users\\alice\\AppData\\Roaming\\MicroSIP\\.provisioner\\microsip.ini")
    assert items == ["applied", "backup.1", "backup.2", "backup.3"]
    for item in items:
        assert ws.acl(Workstation.state_path(ALICE_INI, item)) == user_file_acl(alice.sid)


def test_compare_and_swap_conflict_writes_nothing(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini("edited by alice meanwhile"))
    entry = file_entry(ALICE_INI, ini("ours"), expect=sha(ini("what we saw")), user=alice)
    missing = file_entry(
        "C:\\Users\\bob\\AppData\\Roaming\\MicroSIP\\microsip.ini",
        ini("bob"),
        expect=sha(b"bob had a file"),
        user=station.bob,
    )
    first, second = station.agent.call(apply_request([entry, missing]))["files"]
    assert (first["status"], error_code(first)) == ("conflict", "conflict")
    assert first["old_sha256"] == sha(ini("edited by alice meanwhile"))
    assert (second["status"], second["old_sha256"]) == ("conflict", None)
    assert ws.read(ALICE_INI) == ini("edited by alice meanwhile")
    assert state(ws, ALICE_INI, "backup.1") is None
    assert not ws.exists("C:\\Users\\bob\\AppData\\Roaming\\MicroSIP")


def test_running_policy_skip_reports_busy(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini("old"))
    process = ws.start_microsip(alice)
    result = write(station, alice, ini("new"), "skip")
    assert (result["status"], error_code(result), result["stopped"]) == ("busy", "busy", 0)
    assert ws.read(ALICE_INI) == ini("old")
    assert process.running and ws.stopped == []


def test_running_policy_stop_stops_only_that_users_processes(station: Station) -> None:
    ws, alice, bob = station.ws, station.alice, station.bob
    ws.put(ALICE_INI, ini("old"))
    mine = [ws.start_microsip(alice), ws.start_microsip(alice, "MicroSIP")]
    other = ws.start_microsip(bob)
    unrelated = ws.start_microsip(alice, "notepad.exe")
    result = write(station, alice, ini("new"), "stop")
    assert (result["status"], result["stopped"]) == ("written", 2)
    assert ws.stopped == mine
    assert other.running and unrelated.running
    assert ws.running_sids == {alice.sid, bob.sid}
    assert ws.read(ALICE_INI) == ini("new")


def test_running_policy_force_writes_while_running(station: Station) -> None:
    ws, alice = station.ws, station.alice
    process = ws.start_microsip(alice)
    result = write(station, alice, ini("forced"), "force")
    assert (result["status"], result["stopped"]) == ("written", 0)
    assert process.running and ws.read(ALICE_INI) == ini("forced")


def _prepare_history(st: Station) -> list[bytes]:
    """alice's ini written three times: v0 by hand, v1 and v2 by the tool."""
    versions = [ini("v0"), ini("v1"), ini("v2")]
    st.ws.put(ALICE_INI, versions[0])
    for content in versions[1:]:
        assert write(st, st.alice, content)["status"] == "written"
    return versions


def _backups(ws: Workstation, path: str) -> list[bytes | None]:
    return [state(ws, path, f"backup.{n}") for n in (1, 2, 3)]


def test_disk_full_leaves_everything_as_it_was(station: Station) -> None:
    ws = station.ws
    versions = _prepare_history(station)
    ws.faults.disk_full = True
    result = write(station, station.alice, ini("v3"))
    assert (result["status"], error_code(result)) == ("error", "disk-full")
    assert (result["old_sha256"], result["new_sha256"]) == (sha(versions[2]), None)
    assert ws.read(ALICE_INI) == versions[2]
    assert _backups(ws, ALICE_INI) == [versions[1], versions[0], None]
    assert temp_files(ws, "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP") == []


def test_too_little_free_space_is_disk_full(station: Station) -> None:
    station.ws.free_bytes = 10
    result = write(station, station.alice, ini("too big"))
    assert error_code(result) == "disk-full"
    assert not station.ws.exists(ALICE_INI)


@pytest.mark.parametrize("fault", ["locked", "read_only"])
def test_locked_or_read_only_file_keeps_the_old_content(station: Station, fault: str) -> None:
    ws = station.ws
    versions = _prepare_history(station)
    getattr(ws.faults, fault).add(ALICE_INI.upper())
    result = write(station, station.alice, ini("v3"))
    assert (result["status"], error_code(result)) == ("error", fault.replace("_", "-"))
    assert ws.read(ALICE_INI) == versions[2]
    assert _backups(ws, ALICE_INI) == [versions[1], versions[0], None]
    assert temp_files(ws, "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP") == []
    assert state(ws, ALICE_INI, "applied") == b"applied " + versions[2]


def test_read_only_folder_refuses_the_first_write(station: Station) -> None:
    ws = station.ws
    ws.faults.read_only.add("C:\\Users\\bob\\AppData")
    result = write(station, station.bob, ini("bob"))
    assert (result["status"], error_code(result)) == ("error", "read-only")
    assert not ws.exists("C:\\Users\\bob\\AppData\\Roaming\\MicroSIP")


def test_failed_verification_restores_the_old_file(station: Station) -> None:
    ws = station.ws
    versions = _prepare_history(station)
    ws.faults.fail_verify = 1
    result = write(station, station.alice, ini("v3"))
    assert (result["status"], error_code(result)) == ("error", "verify-failed")
    assert (result["new_sha256"], result["backup"]) == (sha(corrupt(ini("v3"))), None)
    assert ws.read(ALICE_INI) == versions[2]
    assert _backups(ws, ALICE_INI) == [versions[1], versions[0], None]
    assert state(ws, ALICE_INI, "applied") == b"applied " + versions[2]
    assert temp_files(ws, "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP") == []
    assert write(station, station.alice, ini("v3"))["status"] == "written"


def test_failed_verification_of_a_first_write_leaves_no_file(station: Station) -> None:
    station.ws.faults.fail_verify = 1
    result = write(station, station.bob, ini("bob"))
    assert error_code(result) == "verify-failed"
    assert not station.ws.exists(station.ws.ini_path(station.bob))


def test_a_wrong_intended_hash_fails_verification(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini("old"))
    entry = file_entry(ALICE_INI, ini("new"), expect=sha(ini("old")), user=alice, sha256="0" * 64)
    [result] = station.agent.call(apply_request([entry]))["files"]
    assert error_code(result) == "verify-failed"
    assert ws.read(ALICE_INI) == ini("old")


def test_crash_after_the_temp_file_leaves_the_old_file(station: Station) -> None:
    ws = station.ws
    versions = _prepare_history(station)
    ws.faults.crash_after_temp = 1
    path = ALICE_INI
    entry = file_entry(path, ini("v3"), expect=sha(versions[2]), user=station.alice)
    out, _, code = station.agent.raw(scripts.make_envelope("apply", apply_request([entry])))
    assert (out, code) == (b"", CRASH_EXIT_CODE)
    assert ws.read(path) == versions[2]
    assert _backups(ws, path) == [versions[1], versions[0], None]
    [leftover] = temp_files(ws, "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP")
    assert leftover.startswith(".microsip.ini.")
    assert ws.read(f"C:\\Users\\alice\\AppData\\Roaming\\MicroSIP\\{leftover}") == ini("v3")
    assert write(station, station.alice, ini("v3"))["status"] == "written"
    # the next apply removed the dead agent's temp file (it may hold a plaintext password)
    assert temp_files(ws, "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP") == []


ALICE_DIR = "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP"
ALICE_STATE = f"{ALICE_DIR}\\.provisioner\\microsip.ini"
PLAINTEXT = ini("password=Plain-Text-Pw-1")
STALE = [
    f"{ALICE_DIR}\\.microsip.ini.0123456789ab.tmp",
    f"{ALICE_STATE}\\.applied.CDEF01234567.tmp",
]
# Files that look alike but are not the agent's temp files of this ini: left alone.
LOOKALIKES = [
    f"{ALICE_DIR}\\.microsip.ini.notes.tmp",
    f"{ALICE_DIR}\\.microsip.ini.0123456789ab.tmp.keep",
    f"{ALICE_DIR}\\.other.ini.0123456789ab.tmp",
    f"{ALICE_DIR}\\microsip.ini.0123456789ab.tmp",
    f"{ALICE_STATE}\\.backup.1.0123456789ab.tmp",
]


def _plant_stale_temps(ws: Workstation) -> None:
    for path in [*STALE, *LOOKALIKES]:
        ws.put(path, PLAINTEXT)


@pytest.mark.parametrize("policy", ["skip", "force"])
def test_apply_removes_stale_temp_files_first(station: Station, policy: str) -> None:
    ws = station.ws
    versions = _prepare_history(station)
    _plant_stale_temps(ws)
    ws.start_microsip(station.alice)
    result = write(station, station.alice, ini("v3"), policy)
    # even an apply that then writes nothing (busy) removes them
    assert result["status"] == ("busy" if policy == "skip" else "written")
    assert ws.read(ALICE_INI) == (versions[2] if policy == "skip" else ini("v3"))
    assert [path for path in STALE if ws.exists(path)] == []
    assert [ws.read(path) for path in LOOKALIKES] == [PLAINTEXT] * len(LOOKALIKES)


def test_rollback_removes_stale_temp_files_first(station: Station) -> None:
    ws = station.ws
    versions = _prepare_history(station)
    _plant_stale_temps(ws)
    [result] = station.agent.call(rollback_request([target(ALICE_INI, station.alice)]))["files"]
    assert result["status"] == "restored" and ws.read(ALICE_INI) == versions[1]
    assert [path for path in STALE if ws.exists(path)] == []
    assert [ws.read(path) for path in LOOKALIKES] == [PLAINTEXT] * len(LOOKALIKES)


def _full_history(st: Station) -> list[bytes]:
    """alice's ini written five times: the file and three backups all hold something."""
    versions = [ini(f"v{n}") for n in range(5)]
    st.ws.put(ALICE_INI, versions[0])
    for content in versions[1:]:
        assert write(st, st.alice, content)["status"] == "written"
    assert _backups(st.ws, ALICE_INI) == [versions[3], versions[2], versions[1]]
    return versions


@pytest.mark.parametrize(
    ("fault", "code"),
    [("locked", "locked"), ("read_only", "read-only"), ("fail_verify", "verify-failed")],
)
def test_a_failed_replace_or_verify_loses_no_backup(
    station: Station, fault: str, code: str
) -> None:
    ws = station.ws
    versions = _full_history(station)
    if fault == "fail_verify":
        ws.faults.fail_verify = 1
    else:
        getattr(ws.faults, fault).add(ALICE_INI)
    result = write(station, station.alice, ini("v5"))
    assert (result["status"], error_code(result), result["backup"]) == ("error", code, None)
    assert ws.read(ALICE_INI) == versions[4]
    assert _backups(ws, ALICE_INI) == [versions[3], versions[2], versions[1]]
    assert ws.listdir(ALICE_STATE) == ["applied", "backup.1", "backup.2", "backup.3"]
    ws.faults = WorkstationFaults()
    assert write(station, station.alice, ini("v5"))["status"] == "written"
    assert _backups(ws, ALICE_INI) == [versions[4], versions[3], versions[2]]


def test_a_rotation_that_fails_after_the_write_is_finished_next_time(station: Station) -> None:
    ws = station.ws
    versions = _full_history(station)
    ws.faults.locked.add(Workstation.state_path(ALICE_INI, "backup.2"))
    result = write(station, station.alice, ini("v5"))
    # the file is written and verified; its old content waits as backup.new
    assert (result["status"], result["backup"]) == (
        "written",
        Workstation.state_path(ALICE_INI, "backup.new"),
    )
    assert ws.read(ALICE_INI) == ini("v5")
    assert state(ws, ALICE_INI, "backup.new") == versions[4]
    assert _backups(ws, ALICE_INI) == [versions[3], versions[2], versions[1]]
    ws.faults = WorkstationFaults()
    assert write(station, station.alice, ini("v6"))["status"] == "written"
    assert _backups(ws, ALICE_INI) == [ini("v5"), versions[4], versions[3]]
    assert state(ws, ALICE_INI, "backup.new") is None


def test_a_backup_new_left_by_a_dead_agent_is_rotated_in_first(station: Station) -> None:
    ws = station.ws
    versions = _full_history(station)
    # an agent died after its replace, in the middle of its rotation: backup.1 has moved
    # down to backup.2 (and backup.2 to backup.3, the oldest gone), backup.new is still there
    for number in (2, 1):
        source = Workstation.state_path(ALICE_INI, f"backup.{number}")
        ws.host_path(source).replace(
            ws.host_path(Workstation.state_path(ALICE_INI, f"backup.{number + 1}"))
        )
    ws.put(Workstation.state_path(ALICE_INI, "backup.new"), ini("before the dead agent"))
    [restored] = station.agent.call(rollback_request([target(ALICE_INI, station.alice)]))["files"]
    assert restored["status"] == "restored"
    assert ws.read(ALICE_INI) == ini("before the dead agent")
    assert _backups(ws, ALICE_INI) == [versions[3], versions[2], None]
    assert write(station, station.alice, ini("v6"))["status"] == "written"
    assert _backups(ws, ALICE_INI) == [ini("before the dead agent"), versions[3], versions[2]]


def test_override_and_per_file_errors_do_not_abort_the_others(station: Station) -> None:
    ws, alice, bob = station.ws, station.alice, station.bob
    override = f"{PROGRAM_DIR}\\override.ini"
    bob_ini = ws.ini_path(bob)
    ws.put(bob_ini, ini("bob"))
    ws.faults.locked.add(bob_ini)
    files = [
        file_entry(ALICE_INI, ini("alice"), expect=sha(b"stale"), user=alice),
        file_entry(bob_ini, ini("bob 2"), expect=sha(ini("bob")), user=bob),
        {**file_entry(override, b"[Settings]\r\n", expect=None), "applied_b64": None},
        {"kind": "microsip", "path": "relative\\microsip.ini", "sid": alice.sid},
    ]
    answer = station.agent.call(apply_request(files))
    assert [(r["status"], error_code(r)) for r in answer["files"]] == [
        ("conflict", "conflict"),
        ("error", "locked"),
        ("written", None),
        ("error", "internal"),
    ]
    assert ws.read(override) == b"[Settings]\r\n"
    assert ws.acl(override) == OVERRIDE_ACL
    assert OVERRIDE_ACL.rights() == {
        SYSTEM: "FullControl",
        ADMINISTRATORS: "FullControl",
        USERS: "ReadAndExecute",
    }
    assert ws.acl(f"{PROGRAM_DIR}\\.provisioner\\override.ini") == OVERRIDE_ACL
    assert state(ws, override, "applied") is None


# --- rollback ---------------------------------------------------------------------------------


def test_rollback_restores_backup_1_and_keeps_rolled_back(station: Station) -> None:
    ws, alice = station.ws, station.alice
    versions = _prepare_history(station)
    answer = station.agent.call(rollback_request([target(ALICE_INI, alice)]))
    [result] = answer["files"]
    assert result == {
        "path": ALICE_INI,
        "status": "restored",
        "old_sha256": sha(versions[2]),
        "new_sha256": sha(versions[1]),
        "backup": Workstation.state_path(ALICE_INI, "rolled-back"),
        "stopped": 0,
        "error": None,
    }
    assert ws.read(ALICE_INI) == versions[1]
    assert state(ws, ALICE_INI, "rolled-back") == versions[2]
    assert _backups(ws, ALICE_INI) == [versions[0], None, None]
    assert state(ws, ALICE_INI, "applied") is None
    for item in ("rolled-back", "backup.1"):
        assert ws.acl(Workstation.state_path(ALICE_INI, item)) == user_file_acl(alice.sid)
    assert ws.acl(ALICE_INI) == user_file_acl(alice.sid)
    [again] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert again["status"] == "restored" and ws.read(ALICE_INI) == versions[0]
    assert state(ws, ALICE_INI, "rolled-back") == versions[1]
    [empty] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert (empty["status"], error_code(empty)) == ("error", "no-backup")
    assert ws.read(ALICE_INI) == versions[0]


def test_rollback_without_backup_and_while_running(station: Station) -> None:
    ws, alice = station.ws, station.alice
    [none] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert (none["status"], error_code(none)) == ("error", "no-backup")
    versions = _prepare_history(station)
    ws.start_microsip(alice)
    [busy] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert (busy["status"], error_code(busy)) == ("busy", "busy")
    [stopped] = station.agent.call(rollback_request([target(ALICE_INI, alice)], "stop"))["files"]
    assert (stopped["status"], stopped["stopped"]) == ("restored", 1)
    assert ws.read(ALICE_INI) == versions[1]


# --- the protocol itself ----------------------------------------------------------------------


def test_a_drifted_script_is_rejected_like_a_failing_powershell(station: Station) -> None:
    ws = station.ws
    request = apply_request([file_entry(ALICE_INI, ini("x"), expect=None, user=station.alice)])
    drifted = {"script": scripts.SCRIPTS["apply"] + "\n", "request": request}
    stdin = base64.b64encode(json.dumps(drifted).encode())
    out, err, code = station.agent.raw(stdin)
    assert (out, code) == (b"", 1)
    assert err.startswith(b"#< CLIXML\r\n")
    assert "not the packaged agent script" in scripts.decode_clixml(err)
    swapped = {"script": scripts.SCRIPTS["inspect"], "request": request}
    out, err, code = station.agent.raw(base64.b64encode(json.dumps(swapped).encode()))
    assert code == 1 and err.startswith(b"#< CLIXML")
    command, arguments = scripts.bootstrap_command()
    other = (command, [*arguments[:-1], base64.b64encode("exit 0".encode("utf-16-le")).decode()])
    out, err, code = station.agent.raw(scripts.make_envelope("apply", request), other)
    assert code == 1 and "bootstrap" in scripts.decode_clixml(err)
    assert not ws.exists(ALICE_INI)


def test_other_protocol_versions_are_refused(station: Station) -> None:
    request = {**inspect_request([("alice", "ACME\\alice")]), "protocol": 2}
    answer = station.agent.call(request)
    assert answer["ok"] is False
    assert answer["error"] == {"code": "internal", "message": "protocol 2 not supported"}


def test_an_unchanged_workstation_costs_six_requests(lab: Lab, station: Station) -> None:
    agent = Agent(lab, station.host)
    station.host.reset_counts()
    agent.call(inspect_request([("alice", "ACME\\alice")]))
    agent.close()
    assert station.host.request_count == 6


# --- fleet ------------------------------------------------------------------------------------


def test_fleet_description_starts_workstations(lab: Lab) -> None:
    specs = [
        WorkstationSpec(users=("ACME\\alice", UserSpec("ACME\\bob", running=True, ini=b"b"))),
        WorkstationSpec(users=(".\\kiosk",), mode="portable", install_dir="C:\\MicroSIP"),
        WorkstationSpec(users=("ACME\\alice",), mode=None),
    ]
    fleet = add_fleet(lab, HostConfig(credentials=CREDS, scheme="https", port=0), specs)
    found = []
    for host, ws in fleet:
        agent = Agent(lab, host)
        windows = ws.users[0].windows
        mode = ws.install.mode if ws.install else "installed"
        install_dir = ws.install.install_dir if ws.install else PROGRAM_DIR
        answer = agent.call(inspect_request([("u", windows)], mode=mode, install_dir=install_dir))
        agent.close()
        found.append((answer["host"]["computer"], answer["install"]["found"]))
        assert answer["host"]["computer"] == host.name.upper()[:15]
    assert [f for _, f in found] == [True, True, False]
    ws = fleet[0][1]
    assert ws.read(ws.ini_path(ws.users[1])) == b"b"
    assert ws.running_sids == {ws.users[1].sid}


# --- the property: old or new, never a mix ----------------------------------------------------


@dataclass
class FileModel:
    """What one managed file and its state folder should hold."""

    path: str
    user: User | None
    current: bytes | None = None
    backups: list[bytes | None] = field(default_factory=lambda: [None, None, None])
    applied: bytes | None = None
    rolled: bytes | None = None
    seen: set[bytes] = field(default_factory=set)


class Crash(Exception):
    """The model's agent dies here."""


@dataclass
class Step:
    """One request's fault plan and what the model expects of it."""

    op: str
    policy: str
    fault: str
    target: str | None
    verify_armed: bool = False
    crash_armed: bool = False
    running: set[str] = field(default_factory=set)


def _expect_apply(model: FileModel, step: Step, stale: bool, new: bytes) -> tuple[str, str | None]:
    if model.user is not None and model.user.sid in step.running:
        if step.policy == "skip":
            return "busy", "busy"
        if step.policy == "stop":
            step.running.discard(model.user.sid)
    if stale:
        return "conflict", "conflict"
    mine = step.target == model.path
    if step.fault == "disk_full":
        return "error", "disk-full"
    if step.fault == "read_only_folder" and mine:
        return "error", "read-only"
    if step.crash_armed:
        raise Crash
    # a failed replace or verify moves no backup: nothing is lost
    if step.verify_armed:
        step.verify_armed = False
        return "error", "verify-failed"
    if step.fault in ("locked", "read_only_file") and mine:
        return "error", "locked" if step.fault == "locked" else "read-only"
    if model.current is not None:
        model.backups = [model.current, *model.backups[:2]]
    model.current = new
    model.applied = b"applied " + new
    return "written", None


def _expect_rollback(model: FileModel, step: Step) -> tuple[str, str | None]:
    if model.backups[0] is None:
        return "error", "no-backup"
    if model.user is not None and model.user.sid in step.running:
        if step.policy == "skip":
            return "busy", "busy"
        if step.policy == "stop":
            step.running.discard(model.user.sid)
    codes = {"locked": "locked", "read_only_file": "read-only", "read_only_folder": "read-only"}
    if step.target == model.path and step.fault in codes:
        if step.fault != "read_only_folder":
            model.rolled = None  # the old rolled-back copy goes before the replace fails
        return "error", codes[step.fault]
    model.rolled = model.current
    model.current = model.backups[0]
    model.backups = [*model.backups[1:], None]
    model.applied = None
    return "restored", None


OUTCOMES: Counter[str] = Counter()


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_random_pushes_and_faults_never_mix_contents(station: Station, seed: int) -> None:
    rng = random.Random(seed)
    ws = station.ws
    override = f"{PROGRAM_DIR}\\override.ini"
    models = [
        FileModel(ALICE_INI, station.alice),
        FileModel(ws.ini_path(station.bob), station.bob),
        FileModel(override, None),
    ]
    ws.put(ALICE_INI, ini("by MicroSIP"))
    models[0].current = ini("by MicroSIP")
    for model in models:
        if model.current is not None:
            model.seen.add(model.current)
    must_exist: set[str] = set()
    violations: list[str] = []

    def observe(event: str) -> None:
        for model in models:
            for path in (
                model.path,
                *(ws.state_path(model.path, f"backup.{n}") for n in (1, 2, 3)),
            ):
                data = ws.read(path)
                if data is None:
                    if path in must_exist:
                        violations.append(f"{event}: {path} vanished")
                elif data not in model.seen:
                    violations.append(f"{event}: {path} holds bytes never written")

    ws.observe(observe)
    tally: Counter[str] = Counter()
    for number in range(60):
        chosen = rng.sample(models, rng.randint(1, len(models)))
        op = "apply" if rng.random() < 0.7 else "rollback"
        fault = rng.choice(
            ["none", "none", "disk_full", "locked", "read_only_file", "read_only_folder",
             "fail_verify", "crash"]
        )  # fmt: skip
        if fault == "crash":
            chosen = chosen[:1]
        target_model = rng.choice(chosen)
        if fault == "locked" and target_model.current is None:
            fault = "none"
        step = Step(op, rng.choice(["skip", "stop", "force"]), fault, target_model.path)
        for user in (station.alice, station.bob):
            if rng.random() < 0.3 and user.sid not in ws.running_sids:
                ws.start_microsip(user)
        step.running = set(ws.running_sids)
        faults = WorkstationFaults()
        if fault == "disk_full":
            faults.disk_full = True
        elif fault == "locked":
            faults.locked.add(target_model.path)
        elif fault == "read_only_file":
            faults.read_only.add(target_model.path)
        elif fault == "read_only_folder":
            faults.read_only.add(target_model.path.rsplit("\\", 1)[0])
        elif fault == "fail_verify":
            faults.fail_verify = 1
            step.verify_armed = True
        elif fault == "crash":
            faults.crash_after_temp = 1
            step.crash_armed = True
        entries: list[dict[str, Any]] = []
        expected: list[tuple[str, str | None, bytes | None]] = []
        must_exist.clear()
        must_exist.update(model.path for model in models if model.current is not None)
        for model in chosen:
            stale = op == "apply" and rng.random() < 0.15
            before = model.current
            if op == "apply":
                new = ini(f"{model.path} step {number}")
                model.seen.update({new, corrupt(new)})
                entry = file_entry(
                    model.path,
                    new,
                    expect=sha(b"stale") if stale else (sha(before) if before else None),
                    user=model.user,
                )
                entries.append(entry)
                try:
                    outcome = _expect_apply(model, step, stale, new)
                except Crash:
                    expected.append(("crash", None, None))
                    break
                if outcome[0] == "written" and before is not None:
                    expected.append((*outcome, before))
                else:
                    expected.append((*outcome, None))
            else:
                entries.append(target(model.path, model.user))
                outcome = _expect_rollback(model, step)
                expected.append((*outcome, None))
        ws.faults = faults
        request = (apply_request if op == "apply" else rollback_request)(entries, step.policy)
        out, err, code = station.agent.raw(scripts.make_envelope(op, request))
        ws.faults = WorkstationFaults()
        context = f"seed {seed} step {number}: {op} {fault} {expected}"
        tally.update(f"{op}:{status}:{code_}" for status, code_, _ in expected)
        assert violations == [], context
        if expected and expected[-1][0] == "crash":
            assert (out, code) == (b"", CRASH_EXIT_CODE), context
            folder = target_model.path.rsplit("\\", 1)[0]
            for name in temp_files(ws, folder):
                ws.host_path(f"{folder}\\{name}").unlink()
        else:
            assert code == 0, (context, err)
            results: list[dict[str, Any]] = scripts.parse_answer(out)["files"]  # type: ignore[assignment]
            got = [(r["status"], error_code(r)) for r in results]
            assert got == [(status, code_) for status, code_, _ in expected], context
            for result, (status, _, before) in zip(results, expected, strict=True):
                if status == "written" and before is not None:
                    # a successful overwrite always leaves the old content as backup.1
                    assert state(ws, result["path"], "backup.1") == before, context
        for model in models:
            assert ws.read(model.path) == model.current, (context, model.path)
            assert _backups(ws, model.path) == model.backups, (context, model.path)
            assert state(ws, model.path, "applied") == model.applied, (context, model.path)
            assert state(ws, model.path, "rolled-back") == model.rolled, (context, model.path)
            folder = model.path.rsplit("\\", 1)[0]
            assert temp_files(ws, folder) == [], (context, folder)
    # the seeds are chosen so that each run meets most outcomes; all of them together are checked
    # by test_the_random_runs_cover_every_outcome
    OUTCOMES.update(tally)


def test_the_random_runs_cover_every_outcome() -> None:
    if len(OUTCOMES) == 0:
        pytest.skip("the random runs did not run in this session")
    wanted = {
        "apply:written:None",
        "apply:busy:busy",
        "apply:conflict:conflict",
        "apply:crash:None",
        "apply:error:disk-full",
        "apply:error:locked",
        "apply:error:read-only",
        "apply:error:verify-failed",
        "rollback:restored:None",
        "rollback:busy:busy",
        "rollback:error:no-backup",
        "rollback:error:locked",
        "rollback:error:read-only",
    }
    assert wanted <= set(OUTCOMES), sorted(wanted - set(OUTCOMES))
