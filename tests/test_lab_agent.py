"""The lab agent on emulated workstations, driven by the real pywinrm over real HTTPS.

Every request goes through the packaged bootstrap and scripts of
``provisioner.transport.agent.scripts`` (the lab checks the script text byte for byte) and
``winrm.protocol.Protocol``; the workstation behind each host is a real folder.
"""

from __future__ import annotations

import base64
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from provisioner.lab import HostConfig, Lab
from provisioner.lab.agent import CRASH_EXIT_CODE
from provisioner.lab.fleet import UserSpec, WorkstationSpec, add_fleet
from provisioner.lab.workstation import (
    ADMINISTRATORS,
    AGENT_ACCOUNT,
    DOMAIN_SID,
    LAB_MICROSIP_VERSION,
    MACHINE_SID,
    OVERRIDE_ACL,
    STATE_ACL,
    STATE_ROOT,
    SYSTEM,
    USERS,
    FileError,
    User,
    Workstation,
    WorkstationFaults,
    corrupt,
    state_folder_acl,
    user_file_acl,
    user_folder_acl,
)
from provisioner.transport.agent import scripts
from tests.agentkit import (
    ADMIN,
    ALICE_INI,
    ALICE_SID,
    CREDS,
    PROGRAM_DIR,
    Agent,
    Station,
    apply_request,
    b64,
    error_code,
    file_entry,
    ini,
    inspect_request,
    open_station,
    rollback_request,
    sha,
    state,
    state_path,
    target,
    temp_files,
    write,
)

pytestmark = pytest.mark.usefixtures("time_budget")

# --- the workstation itself -------------------------------------------------------------------


def test_paths_resolve_case_insensitively_and_accounts_translate(tmp_path: Path) -> None:
    ws = Workstation(tmp_path, computer="ber-ws-002")
    ws.put("C:\\Program Files\\MicroSIP\\MicroSIP.ini", b"x")
    real = ws.host_path("c:\\PROGRAM FILES\\microsip\\microsip.INI")
    assert real == tmp_path / "C" / "Program Files" / "MicroSIP" / "MicroSIP.ini"
    assert ws.read("C:/program files/microsip/MICROSIP.ini") == b"x"
    assert ws.host_path("D:\\Data\\New") == tmp_path / "D" / "Data" / "New"
    alice = ws.add_user("ACME\\alice")
    kiosk = ws.add_user(".\\kiosk", has_profile=False)
    assert (alice.sid, alice.profile) == (f"{DOMAIN_SID}-1104", "C:\\Users\\alice")
    assert (kiosk.windows, kiosk.sid, kiosk.profile) == (
        "BER-WS-002\\kiosk",
        f"{MACHINE_SID}-1001",
        None,
    )
    assert ws.lookup_account("acme\\ALICE") is alice
    assert ws.lookup_account("ber-ws-002\\Kiosk") is kiosk
    assert ws.lookup_account(".\\Kiosk") is None  # NTAccount knows no domain named "."
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
    assert "Data" in os.listdir(tmp_path / "C")
    assert sorted(os.listdir(tmp_path / "C" / "Data" / "Sub")) == ["File.txt", "New"]
    assert events == ["mkdir C:\\DATA\\sub\\New", "mkdir C:\\DATA\\sub\\New\\Deeper"]
    assert ws.acl("C:\\Data\\Sub") is None and ws.acl("C:\\data\\sub\\new") == OVERRIDE_ACL
    assert ws.owner("C:\\data\\sub\\new") == ADMINISTRATORS
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
    ws.put(state_path("applied"), b"applied base")
    ws.put(f"{PROGRAM_DIR}\\override.ini", b"[Settings]\r\n")
    ws.start_microsip(alice)
    ws.start_microsip(station.bob, "other.exe")
    answer = station.agent.call(inspect_request([("alice", "ACME\\alice"), ("bob", "acme\\BOB")]))
    assert answer["ok"] is True
    assert answer["host"] == {
        "computer": "BER-WS-001",
        "ps_version": "5.1.19041.4648",
        "free_bytes": 51_234_567_890,
        "language_mode": "FullLanguage",
    }
    assert answer["install"] == {
        "found": True,
        "dir": PROGRAM_DIR,
        "exe_path": f"{PROGRAM_DIR}\\microsip.exe",
        "source": "inventory",
        "per_user": False,
        "version": LAB_MICROSIP_VERSION,
    }
    assert answer["override"] == {
        "path": f"{PROGRAM_DIR}\\override.ini",
        "exists": True,
        "sha256": sha(b"[Settings]\r\n"),
        "content_b64": b64(b"[Settings]\r\n"),
        "read_only": False,
        "applied": {"exists": False, "sha256": None, "content_b64": None, "legacy": False},
        "error": None,
    }
    first, second = answer["users"]
    assert first == {
        "name": "alice",
        "windows": "ACME\\alice",
        "sid": alice.sid,
        "profile": "C:\\Users\\alice",
        "appdata": "C:\\Users\\alice\\AppData\\Roaming",
        "mode": "installed",
        "mode_rule": "hklm",
        "mode_detail": "HKCU=None HKLM='C:\\\\Program Files\\\\MicroSIP'",
        "path": ALICE_INI,
        "exists": True,
        "sha256": sha(old),
        "content_b64": b64(old),
        "read_only": False,
        "applied": {
            "exists": True,
            "sha256": sha(b"applied base"),
            "content_b64": b64(b"applied base"),
            "legacy": False,
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
    kiosk = ws.add_user(".\\kiosk")  # the agent asks for KIOSK-7\\kiosk: "." does not resolve
    ws.put("D:\\tools\\qphone\\QPHONE.ini", b"portable")
    host.state = ws
    agent = Agent(lab, host)
    request = inspect_request(
        [("kiosk", ".\\kiosk")], mode="portable", install_dir="D:\\Tools\\Qphone", exe="Qphone.exe"
    )
    answer = agent.call(request)
    agent.close()
    assert answer["install"]["source"] == "inventory"
    assert ws.hklm_microsip is None
    [user] = answer["users"]
    assert (user["mode"], user["mode_rule"]) == ("portable", "none")
    assert user["sid"] == kiosk.sid
    assert user["path"] == "D:\\Tools\\Qphone\\Qphone.ini"
    assert user["content_b64"] == b64(b"portable")
    assert answer["override"]["path"] == "D:\\Tools\\Qphone\\override.ini"


def test_inspect_user_errors_do_not_hide_the_others(station: Station) -> None:
    station.ws.add_user("ACME\\carol", has_profile=False)
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
    dave, erin, fred, gina = answer["users"]
    assert gina["error"]["code"] == "internal" and "%HOMESHARE%" in gina["error"]["message"]
    paths = [user["path"] for user in (dave, fred)]
    assert paths == [
        "C:\\Users\\dave\\Roaming2\\MicroSIP\\microsip.ini",
        "C:\\Users\\fred.ACME\\AppData\\Roaming\\MicroSIP\\microsip.ini",
    ]
    assert all(ADMIN not in path for path in paths)
    # erin is logged off: her hive, read from a copy, says H:, outside her profile; the local
    # AppData\\Roaming is a copy her MicroSIP never reads, so nothing is written anywhere.
    assert (
        erin["error"]["code"] == "unsafe-path"
        and "H:\\Redirected\\erin" in erin["error"]["message"]
    )
    assert erin["appdata"] == "H:\\Redirected\\erin" and erin["path"] is None
    assert station.ws.hives_read == [erin["sid"], fred["sid"]]  # the others are logged on


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
            "dir": None,
            "exe_path": None,
            "source": None,
            "per_user": False,
            "version": None,
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
    assert state(ws, "applied") == b"applied " + content
    assert state(ws, "backup.1") is None
    user_acl = user_file_acl(alice.sid)
    assert user_acl.rights() == {
        alice.sid: "FullControl",
        SYSTEM: "FullControl",
        ADMINISTRATORS: "FullControl",
    }
    assert user_acl.protected is True
    assert ws.acl(folder) == user_folder_acl(alice.sid)
    assert ws.acl(ALICE_INI) == user_acl
    assert ws.acl("C:\\Users\\alice\\AppData\\Roaming") is None  # existed: not touched
    assert temp_files(ws, folder) == []
    assert ws.listdir(folder) == ["microsip.ini"]  # the state is not beside the file
    # The merge base is the agent's: SYSTEM and Administrators only, and alice cannot reach it.
    assert ws.listdir(state_path("")) == ["applied", "history"]
    assert ws.acl(state_path("applied")) == STATE_ACL
    assert not ws.allows(alice.sid, "read", state_path("applied"))
    # So is the record of the write: a rollback of this run removes the file.
    assert ws.acl(state_path("history")) == STATE_ACL
    [line] = _history(ws)
    assert line[2:] == ["created", "-", ALICE_INI]
    assert not ws.allows(alice.sid, "write", state_path(""))
    assert ws.allows(alice.sid, "write", ALICE_INI)


def test_updates_rotate_three_backup_generations(station: Station) -> None:
    ws, alice = station.ws, station.alice
    contents = [ini(f"v{n}") for n in range(6)]
    ws.put(ALICE_INI, contents[0])  # MicroSIP's own file, inherited ACL
    for number, content in enumerate(contents[1:], start=1):
        result = write(station, alice, content)
        assert result["status"] == "written"
        assert result["old_sha256"] == sha(contents[number - 1])
        assert result["backup"] == state_path("backup.1")
        assert ws.read(ALICE_INI) == content
        assert state(ws, "backup.1") == contents[number - 1]
    assert [state(ws, f"backup.{n}") for n in (1, 2, 3)] == contents[4:1:-1]
    items = ws.listdir(state_path(""))
    assert items == ["applied", "backup.1", "backup.2", "backup.3", "history"]
    # One line per write the backups can undo, newest first, each with what it replaced.
    assert [(line[2], line[3]) for line in _history(ws)] == [
        ("replaced", sha(contents[n])) for n in (4, 3, 2)
    ]
    for item in items:
        # old passwords: SYSTEM and Administrators only, never the user
        assert ws.acl(state_path(item)) == STATE_ACL
        assert not ws.allows(alice.sid, "read", state_path(item))


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
    assert state(ws, "backup.1") is None
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


def _backups(ws: Workstation, owner: str | None = ALICE_SID) -> list[bytes | None]:
    return [state(ws, f"backup.{n}", owner) for n in (1, 2, 3)]


def _history(ws: Workstation, owner: str | None = ALICE_SID) -> list[list[str]]:
    """The lines of a file's history, newest first, split into their fields."""
    data = state(ws, "history", owner)
    assert data is not None
    return [line.split("\t") for line in data.decode("utf-8").splitlines()]


def test_a_failure_after_the_replace_keeps_the_old_content_as_the_next_backup(
    station: Station,
) -> None:
    # Right after the replace, alice denies Administrators the attributes of her file: the
    # check that follows fails, but the file already holds the new content, and the old one
    # must stay in backup.new until the next request rotates it in.
    ws = station.ws
    versions = _prepare_history(station)

    denied: list[str] = []

    def deny(event: str) -> None:
        if event.startswith("replace ") and event.endswith(ALICE_INI) and not denied:
            denied.append(event)
            ws.faults.attributes_denied.add(ALICE_INI)

    ws.observe(deny)
    result = write(station, station.alice, ini("v3"))
    assert (result["status"], error_code(result)) == ("error", "unsafe-path")
    assert ws.read(ALICE_INI) == ini("v3")
    assert state(ws, "backup.new") == versions[2]
    ws.faults.attributes_denied.clear()
    again = write(station, station.alice, ini("v4"))
    assert again["status"] == "written", again["error"]
    assert _backups(ws) == [ini("v3"), versions[2], versions[1]]


def test_disk_full_leaves_everything_as_it_was(station: Station) -> None:
    ws = station.ws
    versions = _prepare_history(station)
    ws.faults.disk_full = True
    result = write(station, station.alice, ini("v3"))
    assert (result["status"], error_code(result)) == ("error", "disk-full")
    assert (result["old_sha256"], result["new_sha256"]) == (sha(versions[2]), None)
    assert ws.read(ALICE_INI) == versions[2]
    assert _backups(ws) == [versions[1], versions[0], None]
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
    assert _backups(ws) == [versions[1], versions[0], None]
    assert temp_files(ws, "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP") == []
    assert state(ws, "applied") == b"applied " + versions[2]


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
    assert _backups(ws) == [versions[1], versions[0], None]
    assert state(ws, "applied") == b"applied " + versions[2]
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
    assert _backups(ws) == [versions[1], versions[0], None]
    [leftover] = temp_files(ws, "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP")
    assert leftover.startswith(".microsip.ini.")
    assert ws.read(f"C:\\Users\\alice\\AppData\\Roaming\\MicroSIP\\{leftover}") == ini("v3")
    assert write(station, station.alice, ini("v3"))["status"] == "written"
    # the next apply removed the dead agent's temp file (it may hold a plaintext password)
    assert temp_files(ws, "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP") == []


ALICE_DIR = "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP"
ALICE_STATE = state_path("")
PLAINTEXT = ini("password=Plain-Text-Pw-1")
STALE = [
    f"{ALICE_DIR}\\.microsip.ini.0123456789ab.tmp",
    f"{ALICE_DIR}\\.microsip.ini.0123456789ac.old",
    f"{ALICE_STATE}\\.applied.CDEF01234567.tmp",
    # the state folder is the agent's own: a temp file of any of its items goes
    f"{ALICE_STATE}\\.backup.new.0123456789ab.tmp",
    f"{ALICE_STATE}\\.rolled-back.0123456789ab.tmp",
    f"{ALICE_STATE}\\.backup.1.0123456789ab.tmp",
    f"{ALICE_STATE}\\.history.0123456789ab.tmp",
]
# Files that look alike but are not the agent's temp files of this ini: left alone.
LOOKALIKES = [
    f"{ALICE_DIR}\\.microsip.ini.notes.tmp",
    f"{ALICE_DIR}\\.microsip.ini.0123456789ab.tmp.keep",
    f"{ALICE_DIR}\\.other.ini.0123456789ab.tmp",
    f"{ALICE_DIR}\\microsip.ini.0123456789ab.tmp",
    f"{ALICE_DIR}\\.microsip.ini.0123456789ab.old.keep",
    f"{ALICE_STATE}\\.other.0123456789ab.tmp",
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
    assert _backups(st.ws) == [versions[3], versions[2], versions[1]]
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
    history = state(ws, "history")
    if fault == "fail_verify":
        ws.faults.fail_verify = 1
    else:
        getattr(ws.faults, fault).add(ALICE_INI)
    result = write(station, station.alice, ini("v5"))
    assert (result["status"], error_code(result), result["backup"]) == ("error", code, None)
    assert ws.read(ALICE_INI) == versions[4]
    assert _backups(ws) == [versions[3], versions[2], versions[1]]
    assert ws.listdir(ALICE_STATE) == ["applied", "backup.1", "backup.2", "backup.3", "history"]
    assert state(ws, "history") == history  # no record of a write that did not happen
    ws.faults = WorkstationFaults()
    assert write(station, station.alice, ini("v5"))["status"] == "written"
    assert _backups(ws) == [versions[4], versions[3], versions[2]]


def test_a_rotation_that_fails_after_the_write_is_finished_next_time(station: Station) -> None:
    ws = station.ws
    versions = _full_history(station)
    ws.faults.locked.add(state_path("backup.2"))
    result = write(station, station.alice, ini("v5"))
    # the file is written and verified; its old content waits as backup.new
    assert (result["status"], result["backup"]) == (
        "written",
        state_path("backup.new"),
    )
    assert ws.read(ALICE_INI) == ini("v5")
    assert state(ws, "backup.new") == versions[4]
    assert _backups(ws) == [versions[3], versions[2], versions[1]]
    ws.faults = WorkstationFaults()
    assert write(station, station.alice, ini("v6"))["status"] == "written"
    assert _backups(ws) == [ini("v5"), versions[4], versions[3]]
    assert state(ws, "backup.new") is None


def _record(ws: Workstation, run: str, replaced: bytes | None) -> None:
    """Put the line an apply records before its write on top of alice's history."""
    data = state(ws, "history") or b""
    newest = int(data.split(b"\t", 1)[0]) if data else 0
    before = sha(replaced) if replaced is not None else "-"
    action = "replaced" if replaced is not None else "created"
    line = f"{newest + 1}\t{run}\t{action}\t{before}\t{ALICE_INI}\r\n".encode()
    ws.put(state_path("history"), line + data, STATE_ACL, owner=ADMINISTRATORS)


def test_a_backup_new_left_by_a_dead_agent_is_rotated_in_first(station: Station) -> None:
    ws = station.ws
    versions = _full_history(station)
    # an agent died after its replace, in the middle of its rotation: backup.1 has moved
    # down to backup.2 (and backup.2 to backup.3, the oldest gone), backup.new is still there,
    # and so is the record of its write, made before the replace
    for number in (2, 1):
        source = state_path(f"backup.{number}")
        ws.host_path(source).replace(ws.host_path(state_path(f"backup.{number + 1}")))
    ws.put(state_path("backup.new"), ini("before the dead agent"))
    _record(ws, "dead-agent", ini("before the dead agent"))
    [restored] = station.agent.call(rollback_request([target(ALICE_INI, station.alice)]))["files"]
    assert restored["status"] == "restored"
    assert ws.read(ALICE_INI) == ini("before the dead agent")
    assert _backups(ws) == [versions[3], versions[2], None]
    assert write(station, station.alice, ini("v6"))["status"] == "written"
    assert _backups(ws) == [ini("before the dead agent"), versions[3], versions[2]]


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
    assert ws.listdir(PROGRAM_DIR) == ["microsip.exe", "override.ini"]
    assert ws.acl(state_path("", None)) == state_folder_acl()
    assert state(ws, "applied", None) is None


# --- rollback ---------------------------------------------------------------------------------


def test_rollback_restores_backup_1_and_keeps_rolled_back(station: Station) -> None:
    ws, alice = station.ws, station.alice
    versions = _prepare_history(station)
    run = _history(ws)[0][1]
    answer = station.agent.call(rollback_request([target(ALICE_INI, alice)]))
    assert answer["run"] == run  # the agent's own: the requests gave none
    [result] = answer["files"]
    assert result == {
        "path": ALICE_INI,
        "status": "restored",
        "old_sha256": sha(versions[2]),
        "new_sha256": sha(versions[1]),
        "backup": state_path("rolled-back"),
        "stopped": 0,
        "error": None,
    }
    assert ws.read(ALICE_INI) == versions[1]
    assert state(ws, "rolled-back") == versions[2]
    assert _backups(ws) == [versions[0], None, None]
    assert state(ws, "applied") is None
    for item in ("rolled-back", "backup.1"):
        assert ws.acl(state_path(item)) == STATE_ACL
    assert ws.acl(ALICE_INI) == user_file_acl(alice.sid)
    [again] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert again["status"] == "restored" and ws.read(ALICE_INI) == versions[0]
    assert state(ws, "rolled-back") == versions[1]
    # v0 was alice's own: nothing the tool did is left to undo
    nothing = station.agent.call(rollback_request([target(ALICE_INI, alice)]))
    [empty] = nothing["files"]
    assert (nothing["run"], empty["status"], error_code(empty)) == (None, "unchanged", None)
    assert ws.read(ALICE_INI) == versions[0]
    assert state(ws, "rolled-back") == versions[1]


def test_rollback_without_a_write_to_undo_and_while_running(station: Station) -> None:
    ws, alice = station.ws, station.alice
    answer = station.agent.call(rollback_request([target(ALICE_INI, alice)]))
    assert answer["run"] is None
    [none] = answer["files"]
    assert (none["status"], error_code(none)) == ("unchanged", None)
    assert not ws.exists(state_path("")) and not ws.exists(ALICE_INI)
    versions = _prepare_history(station)
    ws.start_microsip(alice)
    [busy] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert (busy["status"], error_code(busy)) == ("busy", "busy")
    [stopped] = station.agent.call(rollback_request([target(ALICE_INI, alice)], "stop"))["files"]
    assert (stopped["status"], stopped["stopped"]) == ("restored", 1)
    assert ws.read(ALICE_INI) == versions[1]


def _apply(station: Station, run: str, *files: tuple[str, bytes, User | None]) -> None:
    """One apply request of ``run`` writing each (path, content, user)."""
    entries = [
        {**file_entry(path, data, expect=station.ws.sha256(path), user=user), "applied_b64": None}
        for path, data, user in files
    ]
    answer = station.agent.call({**apply_request(entries), "run": run})
    assert [r["status"] for r in answer["files"]] == ["written"] * len(files), answer


def test_rollback_removes_what_its_run_created_and_leaves_what_it_did_not_write(
    station: Station,
) -> None:
    ws, alice, bob = station.ws, station.alice, station.bob
    override = f"{PROGRAM_DIR}\\override.ini"
    bob_ini = ws.ini_path(bob)
    _apply(station, "run-a", (ALICE_INI, ini("a1"), alice), (override, b"[Settings]\r\n", None))
    _apply(station, "run-b", (bob_ini, ini("b1"), bob), (override, b"[Settings]\r\nx=1\r\n", None))
    targets = [target(ALICE_INI, alice), target(bob_ini, bob), target(override)]
    # run-b is the newest: bob's file (created) goes, override.ini gets run-a's content back
    answer = station.agent.call(rollback_request(targets))
    assert answer["run"] == "run-b"
    assert [(r["status"], r["error"]) for r in answer["files"]] == [
        ("unchanged", None),
        ("removed", None),
        ("restored", None),
    ]
    removed = answer["files"][1]
    assert (removed["old_sha256"], removed["new_sha256"]) == (sha(ini("b1")), None)
    assert removed["backup"] == state_path("rolled-back", bob)
    assert not ws.exists(bob_ini) and state(ws, "rolled-back", bob.sid) == ini("b1")
    assert ws.read(override) == b"[Settings]\r\n" and ws.read(ALICE_INI) == ini("a1")
    assert ws.exists(bob_ini.rsplit("\\", 1)[0])  # the folder stays: MicroSIP keeps more there
    # then run-a: both files it created go
    again = station.agent.call(rollback_request(targets))
    assert again["run"] == "run-a"
    assert [r["status"] for r in again["files"]] == ["removed", "unchanged", "removed"]
    assert not ws.exists(ALICE_INI) and not ws.exists(override)
    # nothing the tool wrote is left
    last = station.agent.call(rollback_request(targets))
    assert last["run"] is None and [r["status"] for r in last["files"]] == ["unchanged"] * 3


def test_a_file_its_run_created_and_someone_removed_since_is_removed(station: Station) -> None:
    ws, alice = station.ws, station.alice
    _apply(station, "run-a", (ALICE_INI, ini("a1"), alice))
    ws.delete(ALICE_INI)
    [result] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert (result["status"], result["old_sha256"], result["backup"]) == ("removed", None, None)
    assert state(ws, "rolled-back") is None and state(ws, "history") == b""


def test_a_rollback_removes_nothing_while_microsip_runs_unless_told(station: Station) -> None:
    ws, alice = station.ws, station.alice
    _apply(station, "run-a", (ALICE_INI, ini("a1"), alice))
    ws.start_microsip(alice)
    [busy] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert (busy["status"], error_code(busy)) == ("busy", "busy")
    assert ws.read(ALICE_INI) == ini("a1") and _history(ws)[0][1] == "run-a"
    [gone] = station.agent.call(rollback_request([target(ALICE_INI, alice)], "stop"))["files"]
    assert (gone["status"], gone["stopped"]) == ("removed", 1)
    assert not ws.exists(ALICE_INI)


def test_a_run_id_that_could_break_the_history_is_refused(station: Station) -> None:
    entry = file_entry(ALICE_INI, ini("a1"), expect=None, user=station.alice)
    for run in ("run\tcreated", "run\n", "x" * 65, "r\u00e9sum\u00e9"):
        answer = station.agent.call({**apply_request([entry]), "run": run})
        assert answer["ok"] is False, run
        assert answer["error"]["message"] == "the run id must be 1 to 64 letters, digits, - or _"
    assert not station.ws.exists(ALICE_INI)


def test_a_backup_that_is_not_what_the_run_replaced_is_never_restored(station: Station) -> None:
    ws, alice = station.ws, station.alice
    versions = _prepare_history(station)
    ws.put(state_path("backup.1"), ini("not what v2 replaced"), STATE_ACL, owner=ADMINISTRATORS)
    [result] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert (result["status"], error_code(result)) == ("error", "no-backup")
    assert "is not what run" in result["error"]["message"]
    assert ws.read(ALICE_INI) == versions[2]


def test_a_state_an_older_agent_kept_rolls_back_its_backups_as_it_did(station: Station) -> None:
    ws, alice = station.ws, station.alice
    versions = _prepare_history(station)
    ws.delete(state_path("history"))  # as an agent before the history left it
    for expected in (versions[1], versions[0]):
        answer = station.agent.call(rollback_request([target(ALICE_INI, alice)]))
        [result] = answer["files"]
        assert (answer["run"], result["status"]) == (None, "restored")
        assert ws.read(ALICE_INI) == expected
    [empty] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert empty["status"] == "unchanged"
    # A recorded write is newer than any of an older agent's.
    _prepare_history(station)
    ws.delete(state_path("history"))
    bob_ini = ws.ini_path(station.bob)
    _apply(station, "run-b", (bob_ini, ini("b1"), station.bob))
    answer = station.agent.call(
        rollback_request([target(ALICE_INI, alice), target(bob_ini, station.bob)])
    )
    assert [r["status"] for r in answer["files"]] == ["unchanged", "removed"]


def test_a_write_its_agent_did_not_live_to_make_is_not_undone(station: Station) -> None:
    ws, alice = station.ws, station.alice
    versions = _prepare_history(station)
    # The agent records the write, then dies before its replace.
    ws.faults.crash_after_temp = 1
    entry = file_entry(ALICE_INI, ini("v3"), expect=sha(versions[2]), user=alice)
    out, _, code = station.agent.raw(scripts.make_envelope("apply", apply_request([entry])))
    assert (out, code) == (b"", CRASH_EXIT_CODE)
    assert ws.read(ALICE_INI) == versions[2] and state(ws, "backup.new") == versions[2]
    assert len(_history(ws)) == 3  # its record is there
    # The rollback settles it first: the file still holds what that write would have
    # replaced, so it never happened; the write before it is the one undone.
    [result] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert result["status"] == "restored" and ws.read(ALICE_INI) == versions[1]
    assert state(ws, "backup.new") is None and len(_history(ws)) == 1


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
    history: list[tuple[int, str]] = field(default_factory=list)
    """The writes recorded, newest first: (request number, created or replaced)."""
    pending: bool = False
    """A write recorded by an agent that died before its replace: backup.new waits, and the
    next request that settles the file takes the record back."""
    seen: set[bytes] = field(default_factory=set)

    def record(self, number: int, created: bool) -> None:
        """Add-WriteRecord: the write first; a creation ends the history; three replacements."""
        if created:
            self.history = [(number, "created")]
            return
        kept = [(number, "replaced")]
        replaced = 1
        for entry in self.history:
            replaced += entry[1] == "replaced"
            if replaced > 3:
                break
            kept.append(entry)
            if entry[1] == "created":
                break
        self.history = kept

    @property
    def last(self) -> tuple[int, str] | None:
        return self.history[0] if self.history else None


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


def _running(model: FileModel, step: Step) -> tuple[str, str] | None:
    if model.user is not None and model.user.sid in step.running:
        if step.policy == "skip":
            return "busy", "busy"
        if step.policy == "stop":
            step.running.discard(model.user.sid)
    return None


def _write_fault(model: FileModel, step: Step) -> tuple[str, str] | None:
    """Where a managed write fails, in the agent's order: the pending backup or the temp file
    (disk full), the final ACL on the file or the temp file in its folder (read-only), the agent
    dying after its temp file, the replace (locked), the verify."""
    mine = step.target == model.path
    if step.fault == "disk_full":
        return "error", "disk-full"
    if step.fault in ("read_only_folder", "read_only_file") and mine:
        return "error", "read-only"
    if step.crash_armed:
        raise Crash
    if step.fault == "locked" and mine:
        return "error", "locked"
    if step.verify_armed:
        step.verify_armed = False
        return "error", "verify-failed"
    return None


def _locked_out(model: FileModel, step: Step) -> tuple[str, str] | None:
    """The folder lock comes first: a folder that denies writing refuses the lock file."""
    if step.fault == "read_only_folder" and step.target == model.path:
        return "error", "read-only"
    return None


def _settle(model: FileModel, step: Step) -> tuple[str, str] | None:
    """The prelude of apply and rollback: the folder lock, then a write whose agent died before
    its replace is taken back (its record rewritten: a full disk refuses it)."""
    locked_out = _locked_out(model, step)
    if locked_out is not None:
        return locked_out
    if model.pending:
        if step.fault == "disk_full":
            return "error", "disk-full"
        model.history.pop(0)
        model.pending = False
    return None


def _expect_apply(
    model: FileModel, step: Step, stale: bool, new: bytes, number: int
) -> tuple[str, str | None]:
    settled = _settle(model, step)
    if settled is not None:
        return settled
    # The compare-and-swap comes first: a conflict never stops anybody's MicroSIP.
    if stale:
        return "conflict", "conflict"
    busy = _running(model, step)
    if busy is not None:
        return busy
    # A failed write moves no backup and keeps no record: nothing is lost. A crash leaves the
    # record and a backup.new with the current content, which the next request takes back.
    try:
        failed = _write_fault(model, step)
    except Crash:
        model.record(number, model.current is None)
        model.pending = model.current is not None
        raise
    if failed is not None:
        return failed
    if model.current is not None:
        model.backups = [model.current, *model.backups[:2]]
    model.record(number, model.current is None)
    model.current = new
    model.applied = b"applied " + new
    return "written", None


def _find_last_write(model: FileModel, step: Step) -> tuple[int, str] | None:
    """A rollback's first pass: the file settled (best effort), then its last write."""
    if model.pending and _locked_out(model, step) is None and step.fault != "disk_full":
        model.history.pop(0)
        model.pending = False
    return model.last


def _expect_rollback(model: FileModel, step: Step, run: int | None) -> tuple[str, str | None]:
    if run is None or model.last is None or model.last[0] != run:
        return "unchanged", None
    settled = _settle(model, step)
    if settled is not None:
        return settled
    if model.history[0][1] == "created":
        return _expect_removal(model, step)
    if model.backups[0] is None:
        return "error", "no-backup"
    busy = _running(model, step)
    if busy is not None:
        return busy
    # The current content goes to rolled-back first; a failed rollback removes it again.
    try:
        failed = _write_fault(model, step)
    except Crash:
        model.rolled = model.current
        raise
    if failed is not None:
        model.rolled = None
        return failed
    model.rolled = model.current
    model.current = model.backups[0]
    model.backups = [*model.backups[1:], None]
    model.applied = None
    model.history.pop(0)
    return "restored", None


def _expect_removal(model: FileModel, step: Step) -> tuple[str, str | None]:
    """The run created the file: it goes, kept as rolled-back (no managed write: nothing to
    verify, nowhere to crash)."""
    if model.current is not None:
        busy = _running(model, step)
        if busy is not None:
            return busy
        mine = step.target == model.path
        failed = {"disk_full": "disk-full", "locked": "locked", "read_only_file": "read-only"}
        if step.fault in failed and (mine or step.fault == "disk_full"):
            model.rolled = None
            return "error", failed[step.fault]
    model.rolled = model.current
    model.current = None
    model.applied = None
    model.history.pop(0)
    return "removed", None


# Chosen so that each run meets most outcomes, and all of them together meet every one.
SEEDS = (11, 22, 33)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_pushes_and_faults_never_mix_contents(station: Station, seed: int) -> None:
    _random_run(station, seed)


def test_the_random_runs_cover_every_outcome(lab: Lab, tmp_path: Path) -> None:
    outcomes: Counter[str] = Counter()
    for seed in SEEDS:
        with open_station(lab, tmp_path / f"seed-{seed}") as station:
            outcomes.update(_random_run(station, seed))
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
        "rollback:removed:None",
        "rollback:unchanged:None",
        "rollback:busy:busy",
        "rollback:error:locked",
        "rollback:error:read-only",
        "rollback:error:disk-full",
    }
    assert wanted <= set(outcomes), sorted(wanted - set(outcomes))


def _random_run(station: Station, seed: int) -> Counter[str]:
    """Sixty random applies and rollbacks under random faults, each checked against the model;
    how many of each outcome (``op:status:error``) the run met."""
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
            owner = model.user.sid if model.user is not None else None
            for path in (model.path, *(state_path(f"backup.{n}", owner) for n in (1, 2, 3))):
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
        # A rollback first finds each file's last write: the newest of them is undone.
        lasts = [_find_last_write(model, step) for model in chosen] if op == "rollback" else []
        undone = max((last[0] for last in lasts if last is not None), default=None)
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
                    outcome = _expect_apply(model, step, stale, new, number)
                except Crash:
                    expected.append(("crash", None, None))
                    break
                if outcome[0] == "written" and before is not None:
                    expected.append((*outcome, before))
                else:
                    expected.append((*outcome, None))
            else:
                entries.append(target(model.path, model.user))
                try:
                    outcome = _expect_rollback(model, step, undone)
                except Crash:
                    expected.append(("crash", None, None))
                    break
                expected.append((*outcome, None))
        must_exist.difference_update(m.path for m in chosen if m.current is None)  # removed
        ws.faults = faults
        request = (apply_request if op == "apply" else rollback_request)(entries, step.policy)
        if op == "apply":
            request["run"] = f"r{number}"
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
            answer = scripts.parse_answer(out)
            results: list[dict[str, Any]] = answer["files"]  # type: ignore[assignment]
            got = [(r["status"], error_code(r)) for r in results]
            assert got == [(status, code_) for status, code_, _ in expected], context
            if op == "rollback":
                assert answer["run"] == (None if undone is None else f"r{undone}"), context
            owners = {model.path: model.user.sid if model.user else None for model in models}
            for result, (status, _, before) in zip(results, expected, strict=True):
                if status == "written" and before is not None:
                    # a successful overwrite always leaves the old content as backup.1
                    assert state(ws, "backup.1", owners[result["path"]]) == before, context
        for model in models:
            owner = model.user.sid if model.user is not None else None
            assert ws.read(model.path) == model.current, (context, model.path)
            assert _backups(ws, owner) == model.backups, (context, model.path)
            assert state(ws, "applied", owner) == model.applied, (context, model.path)
            assert state(ws, "rolled-back", owner) == model.rolled, (context, model.path)
            recorded = [] if state(ws, "history", owner) is None else _history(ws, owner)
            history = [(f"r{n}", action) for n, action in model.history]
            assert [(line[1], line[2]) for line in recorded] == history, (context, model.path)
            folder = model.path.rsplit("\\", 1)[0]
            assert temp_files(ws, folder) == [], (context, folder)
    return tally


# --- a history only the agent wrote decides a rollback -------------------------------------------

PLANTED = "9000000000000000000\tEVIL\x1b[2Jrun\x0dx\treplaced\t-\t{path}\r\n"


def test_a_history_in_a_state_folder_a_user_made_first_decides_nothing(station: Station) -> None:
    # An administrator created the root before the agent (ProgramData lets users create
    # folders there): alice makes override.ini's state folder first and plants a history that
    # would be the newest write of all, under a run that is no run id.
    ws, bob = station.ws, station.bob
    override = f"{PROGRAM_DIR}\\override.ini"
    ws.remove_tree(STATE_ROOT)
    ws.put_dir(STATE_ROOT, owner=ADMINISTRATORS)
    planted = f"{STATE_ROOT}\\machine\\override.ini"
    ws.put_dir(planted, owner=station.alice.sid)
    ws.put(f"{planted}\\history", PLANTED.format(path=override).encode(), owner=station.alice.sid)
    bob_ini = ws.ini_path(bob)
    _apply(station, "run-b", (bob_ini, ini("b1"), bob))
    answer = station.agent.call(rollback_request([target(bob_ini, bob), target(override)]))
    assert "EVIL" not in json.dumps(answer) and "\x1b" not in json.dumps(answer)
    assert answer["run"] == "run-b"
    mine, theirs = answer["files"]
    assert mine["status"] == "removed" and not ws.exists(bob_ini)
    assert (theirs["status"], error_code(theirs)) == ("error", "unsafe-path")
    assert f"machine is owned by {station.alice.sid}" in theirs["error"]["message"]


@pytest.mark.parametrize(
    "line",
    [
        "{ticks}\tEVIL\x1b[2J\treplaced\t-\t{path}",  # no run id
        "{ticks}\trun-x\tCreated\t-\t{path}",  # an action in another case
        "+{ticks}\trun-x\tcreated\t-\t{path}",  # a sign
        " {ticks}\trun-x\tcreated\t-\t{path}",  # a space
        "\u0661{ticks}\trun-x\tcreated\t-\t{path}",  # a digit, but not an ASCII one
        "9223372036854775808\trun-x\tcreated\t-\t{path}",  # more than a long holds
    ],
    ids=["run", "action-case", "sign", "space", "arabic-digit", "overflow"],
)
def test_a_history_line_the_agent_never_writes_ends_the_history(
    station: Station, line: str
) -> None:
    # Each would make alice's file the newest write, of a run that never was.
    ws, alice, bob = station.ws, station.alice, station.bob
    bob_ini = ws.ini_path(bob)
    _apply(station, "run-a", (ALICE_INI, ini("a1"), alice))
    _apply(station, "run-b", (bob_ini, ini("b1"), bob))
    first = line.format(ticks=int(_history(ws, bob.sid)[0][0]) + 1, path=ALICE_INI)
    data = (first + "\r\n").encode() + (state(ws, "history") or b"")
    ws.put(state_path("history"), data, STATE_ACL, owner=ADMINISTRATORS)
    answer = station.agent.call(rollback_request([target(ALICE_INI, alice), target(bob_ini, bob)]))
    assert answer["run"] == "run-b"
    assert [r["status"] for r in answer["files"]] == ["unchanged", "removed"]
    assert ws.read(ALICE_INI) == ini("a1")


def test_a_run_differing_only_in_case_is_another_run(station: Station) -> None:
    ws, alice, bob = station.ws, station.alice, station.bob
    bob_ini = ws.ini_path(bob)
    _apply(station, "run-a", (ALICE_INI, ini("a1"), alice))
    _apply(station, "RUN-A", (bob_ini, ini("b1"), bob))
    targets = [target(ALICE_INI, alice), target(bob_ini, bob)]
    answer = station.agent.call(rollback_request(targets))
    assert answer["run"] == "RUN-A"
    assert [r["status"] for r in answer["files"]] == ["unchanged", "removed"]
    assert ws.read(ALICE_INI) == ini("a1")


def test_a_file_a_user_made_in_place_of_the_tools_is_never_removed(station: Station) -> None:
    # run-a creates alice's file; she deletes it and makes her own; run-b replaces hers (the
    # replace leaves it owned by Administrators). Undoing run-b gives her content back; nothing
    # older describes her file, so the next rollback leaves it.
    ws, alice = station.ws, station.alice
    _apply(station, "run-a", (ALICE_INI, ini("tool v1"), alice))
    ws.delete(ALICE_INI)
    ws.put(ALICE_INI, ini("alice own"), owner=alice.sid)
    _apply(station, "run-b", (ALICE_INI, ini("tool v2"), alice))
    assert ws.owner(ALICE_INI) == ADMINISTRATORS
    assert [entry[1:3] for entry in _history(ws)] == [["run-b", "replaced"]]
    first = station.agent.call(rollback_request([target(ALICE_INI, alice)]))
    assert (first["run"], first["files"][0]["status"]) == ("run-b", "restored")
    assert ws.read(ALICE_INI) == ini("alice own")
    second = station.agent.call(rollback_request([target(ALICE_INI, alice)]))
    assert (second["run"], second["files"][0]["status"]) == (None, "unchanged")
    assert ws.read(ALICE_INI) == ini("alice own")


def test_what_the_agents_own_account_owns_is_the_agents(station: Station) -> None:
    # Get-TrustedOwners: SYSTEM, Administrators and the account the agent runs as.
    ws, alice = station.ws, station.alice
    _apply(station, "run-a", (ALICE_INI, ini("a1"), alice))
    ws.put(ALICE_INI, ini("a1"), ws.acl(ALICE_INI), owner=AGENT_ACCOUNT)
    ws.put_dir(Workstation.state_path(alice, "microsip.ini"), owner=AGENT_ACCOUNT)
    answer = station.agent.call(rollback_request([target(ALICE_INI, alice)]))
    assert (answer["run"], answer["files"][0]["status"]) == ("run-a", "removed"), answer
    assert not ws.exists(ALICE_INI)
