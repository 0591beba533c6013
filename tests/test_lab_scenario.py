"""Lab scenarios: awkward workstations described in YAML, met by the real push.

Every feature of a scenario file (docs/lab.md) is set up by ``start_inventory_lab`` from a
scenario, then pushed to with the real controller over real WS-Management and NTLM; a file
the scenario gets wrong is reported at file:line:column before any machine is built.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from provisioner.errors import ProvisionerError
from provisioner.inventory import resolve
from provisioner.inventory.loader import load_inventory
from provisioner.lab.control import describe
from provisioner.lab.inventory_lab import start_inventory_lab
from provisioner.lab.ntfs import EVERYONE
from provisioner.lab.scenario import ScenarioErrors, load_scenario
from provisioner.lab.workstation import (
    ADMINISTRATORS,
    DOMAIN_SID,
    MACHINE_SID,
    STATE_ROOT,
    SYSTEM,
    USERS,
    FileError,
    Workstation,
    user_file_acl,
)
from provisioner.microsip import ini
from provisioner.records.results import FileChange, HostResult, Status
from provisioner.render import build
from provisioner.rollout import connections, doctor, push
from provisioner.secrets import secretstore, vault
from tests.labkit import Kit, copy_example, lab_kit, write_inventory
from tests.phase1kit import REPO

pytestmark = pytest.mark.usefixtures("time_budget")

U1_INI = "C:\\Users\\u1x1\\AppData\\Roaming\\MicroSIP\\microsip.ini"
U2_INI = "C:\\Users\\u1x2\\AppData\\Roaming\\MicroSIP\\microsip.ini"
PROGRAM_DIR = "C:\\Program Files\\MicroSIP"


def _kit(tmp_path: Path, scenario: str, **kwargs: object):  # type: ignore[no-untyped-def]
    return lab_kit(tmp_path, scenario=scenario, users_per_ws=2, **kwargs)


def _ws(kit: Kit, name: str = "ws01") -> Workstation:
    return kit.lab.workstations[name]


def _file(result: HostResult, user: str) -> FileChange:
    return next(f for f in result.files if f.user == user)


def _sid(ws: Workstation, name: str) -> str:
    user = ws.user(f"ACME\\{name}")
    assert user is not None
    return user.sid


# --- accounts -------------------------------------------------------------------------------


def test_sids_given_as_a_rid_or_a_whole_sid_are_the_ones_the_push_grants(tmp_path: Path) -> None:
    scenario = """\
workstations:
  ws01:
    users:
      u1x1: {sid: 1500}
      u1x2: {sid: S-1-5-21-7-8-9-2001}
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        result = kit.push("ws01")
        assert result.status == Status.CHANGED, result.message
        assert ws.acl(U1_INI) == user_file_acl("S-1-5-21-1000-2000-3000-1500")
        assert ws.acl(U2_INI) == user_file_acl("S-1-5-21-7-8-9-2001")
        assert kit.lab.workstations["ws02"].user("ACME\\u2x1") is not None  # default there


def test_a_local_and_a_domain_account_may_have_the_same_rid(tmp_path: Path) -> None:
    root = tmp_path / "inventory"
    keyring = write_inventory(root, users_per_ws=2)
    inventory_file = root / "inventory.yaml"
    text = inventory_file.read_text(encoding="utf-8")
    inventory_file.write_text(text.replace("windows: ACME\\u1x2", "windows: .\\u1x2"))
    model = load_inventory(root)
    path = tmp_path / "scenario.yaml"
    path.write_text(
        "workstations:\n  ws01:\n    users:\n      u1x1: {sid: 7}\n      u1x2: {sid: 7}\n"
    )
    running = start_inventory_lab(
        model, keyring, folder=tmp_path / "lab", names=["ws01"], scenario=load_scenario(path, model)
    )
    try:
        ws = running.workstations["ws01"]
        domain, local = ws.user("ACME\\u1x1"), ws.user(".\\u1x2")
        assert domain is not None and local is not None
        assert (domain.sid, local.sid) == (f"{DOMAIN_SID}-7", f"{MACHINE_SID}-7")
    finally:
        running.stop()


def test_an_account_the_inventory_puts_elsewhere_can_be_added(tmp_path: Path) -> None:
    # u2x1 lives on ws02 in the inventory; on ws01 it owns the junction that points at its
    # own folder, and the push to ws01 must not write through it.
    scenario = """\
workstations:
  ws01:
    users:
      u2x1: {}
    paths:
      C:\\Users\\u1x1\\AppData\\Roaming\\MicroSIP:
        junction: C:\\Users\\u2x1\\AppData\\Roaming\\MicroSIP
        owner: u2x1
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        assert mine.status == Status.FAILED and "unsafe-path" in mine.message
        link = ws.entry("C:\\Users\\u1x1\\AppData\\Roaming\\MicroSIP")
        assert (link.kind, link.owner) == ("junction", _sid(ws, "u2x1"))
        assert ws.listdir("C:\\Users\\u2x1\\AppData\\Roaming\\MicroSIP") == []


def test_a_profile_elsewhere_is_where_the_push_writes(tmp_path: Path) -> None:
    scenario = """\
workstations:
  ws01:
    users:
      u1x1: {profile: 'D:\\Profiles\\u1x1.ACME'}
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        result = kit.push("ws01")
        assert result.status == Status.CHANGED, result.message
        moved = "D:\\Profiles\\u1x1.ACME\\AppData\\Roaming\\MicroSIP\\microsip.ini"
        assert ws.is_file(moved) and not ws.exists(U1_INI)
        assert ws.acl(moved) == user_file_acl(_sid(ws, "u1x1"))


def test_a_user_without_a_profile_gets_nothing(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    users:\n      u1x1: {profile: null}\n"
    with _kit(tmp_path, scenario) as kit:
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        assert mine.status == Status.FAILED and "no-profile" in mine.message
        assert _file(result, "u1x2").status == Status.CHANGED


@pytest.mark.parametrize(
    ("appdata", "shares", "code"),
    [
        ("D:\\Redirected\\%USERNAME%", "", "unsafe-path"),  # local, outside the profile
        ("C:\\Users\\u1x2\\AppData\\Roaming", "", "unsafe-path"),  # another user's folder
        ("\\\\fs01\\home$\\%USERNAME%\\AppData", "[\\\\fs01\\home$]", "redirected"),  # UNC
        ("%USERPROFILE%\\Documents\\AppData", "", ""),  # inside the profile: written
        # A user's own value that climbs out of the profile: kept raw for the agent to judge.
        ("C:\\Users\\u1x1\\..\\u1x2\\AppData\\Roaming", "", "unsafe-path"),
    ],
    ids=["local", "another-user", "unc", "inside-profile", "dot-dot"],
)
def test_appdata_redirection(tmp_path: Path, appdata: str, shares: str, code: str) -> None:
    scenario = f"""\
workstations:
  ws01:
    shares: {shares or "[]"}
    users:
      u1x1: {{appdata: '{appdata}', logged_on: true}}
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        if code:
            assert mine.status == Status.FAILED and code in mine.message, mine.message
            assert ini.decode_ini_bytes(ws.read(U2_INI) or b"").count("u1x1") == 0
        else:
            assert mine.status == Status.CHANGED, mine.message
            assert ws.is_file("C:\\Users\\u1x1\\Documents\\AppData\\MicroSIP\\microsip.ini")


@pytest.mark.parametrize(
    ("setting", "code"),
    [
        ("ntuser_dat: false", "no-profile"),  # a profile disk, not attached while logged off
        ("hive_in_use: true", "locked"),  # the hive is being loaded: try again
        ("logged_on: true", ""),  # the loaded hive is read, no copy of NTUSER.DAT
    ],
)
def test_the_users_hive(tmp_path: Path, setting: str, code: str) -> None:
    scenario = f"workstations:\n  ws01:\n    users:\n      u1x1: {{{setting}}}\n"
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        u1 = _sid(ws, "u1x1")
        if code:
            assert mine.status == Status.FAILED and code in mine.message, mine.message
            assert not ws.exists(U1_INI)
        else:
            assert mine.status == Status.CHANGED, mine.message
            assert u1 not in ws.hives_read
        assert _sid(ws, "u1x2") in ws.hives_read  # logged off by default: read from a copy


def test_running_microsip_makes_the_user_busy(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    users:\n      u1x1: {running: 2}\n"
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        assert len(ws.processes_of(_sid(ws, "u1x1"), "microsip.exe")) == 2
        result = kit.push("ws01")
        assert _file(result, "u1x1").status == Status.BUSY
        assert _file(result, "u1x2").status == Status.CHANGED


# --- MicroSIP's install facts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("microsip", "users", "written"),
    [
        # No HKLM value, no MSI: MicroSIP runs portable while the inventory says installed.
        ("{hklm: null}", "", set()),
        # An MSI product per machine decides installed for everyone.
        (f"{{hklm: null, msi: [{{location: '{PROGRAM_DIR}\\'}}]}}", "", {"u1x1", "u1x2"}),
        # Installed for u1x2 only (per user): u1x1's MicroSIP runs portable.
        ("{hklm: null, msi: [{location: '', user: u1x2}]}", "", {"u1x2"}),
        # HKCU wins over HKLM: a value that is not the exe's folder, and no MSI, is portable.
        ("{}", "u1x1: {hkcu: 'D:\\Elsewhere'}", {"u1x2"}),
        # The machine runs MicroSIP portable (no registry value written by an installer).
        ("{mode: portable}", "", set()),
    ],
    ids=["no-hklm", "msi-per-machine", "msi-per-user", "hkcu", "portable"],
)
def test_microsips_own_install_rule_decides(
    tmp_path: Path, microsip: str, users: str, written: set[str]
) -> None:
    scenario = f"workstations:\n  ws01:\n    microsip: {microsip}\n"
    if users:
        scenario += f"    users:\n      {users}\n"
    with _kit(tmp_path, scenario) as kit:
        result = kit.push("ws01")
        for user in ("u1x1", "u1x2"):
            mine = _file(result, user)
            if user in written:
                assert mine.status == Status.CHANGED, mine.message
            else:
                assert mine.status == Status.FAILED and "mode-mismatch" in mine.message
                assert "portable" in mine.message


def test_microsip_installed_elsewhere_is_found_by_its_registry_value(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    microsip: {install_dir: 'D:\\Apps\\MicroSIP'}\n"
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        result = kit.push("ws01")
        assert result.status == Status.CHANGED, result.message
        assert ws.is_file("D:\\Apps\\MicroSIP\\override.ini")
        assert not ws.exists(PROGRAM_DIR)


def test_microsip_absent(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    microsip: {mode: absent}\n"
    with _kit(tmp_path, scenario) as kit:
        result = kit.push("ws01")
        assert result.status == Status.FAILED
        assert all("not-installed" in f.message for f in result.files), result.files
        assert kit.push("ws02").status == Status.CHANGED


# --- PowerShell and WinRS -------------------------------------------------------------------


def _checks(kit: Kit, name: str = "ws01") -> dict[str, doctor.Check]:
    options = connections.winrm_options(kit.station(name), kit.keyring, kit.lab.lab_map())
    found = doctor.remote_checks(kit.station(name), kit.files(name), kit.transport(name), options)
    return {check.name: check for check in found}


def test_constrained_language_mode_stops_the_push(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    powershell: {language_mode: ConstrainedLanguage}\n"
    with _kit(tmp_path, scenario) as kit:
        result = kit.push("ws01")
        assert result.status == Status.FAILED and "ConstrainedLanguage" in result.message
        assert not _ws(kit).exists(U1_INI)


def test_an_old_powershell_is_reported_by_doctor(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    powershell: {version: 4.0}\n"
    with _kit(tmp_path, scenario) as kit:
        powershell = _checks(kit)["powershell"]
        assert not powershell.ok and "PowerShell 4.0" in powershell.detail
        result = kit.push("ws01")  # the bootstrap names the version before anything else
        assert result.status == Status.FAILED and "PowerShell 4.0" in result.message
        assert not _ws(kit).exists(U1_INI)


def test_remote_shells_disabled_by_policy(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    remote_shells: false\n"
    with _kit(tmp_path, scenario) as kit:
        result = kit.push("ws01")
        assert result.status == Status.FAILED
        assert not _checks(kit)["winrs"].ok
        assert kit.push("ws02").status == Status.CHANGED


# --- files, owners, DACLs, attributes, links ------------------------------------------------


def test_a_users_own_ini_is_merged_as_a_scenario_gives_it(tmp_path: Path) -> None:
    scenario = f"""\
workstations:
  ws01:
    paths:
      {U1_INI}:
        content: |
          [Settings]
          ringtone=bells.wav
        encoding: utf-16
        owner: u1x1
        acl: [u1x1:FullControl, 'Everyone:ReadAndExecute']
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        before = ws.read(U1_INI) or b""
        assert before.startswith(b"\xff\xfe") and b"\r\x00\n\x00" in before
        assert ws.allows(EVERYONE, "read", U1_INI)
        result = kit.push("ws01")
        assert _file(result, "u1x1").status == Status.CHANGED
        text = ini.decode_ini_bytes(ws.read(U1_INI) or b"")
        assert "ringtone=bells.wav" in text and "Sip-1-1-pw" in text
        # The push's DACL, not the wider one the file had.
        assert ws.acl(U1_INI) == user_file_acl(_sid(ws, "u1x1"))
        assert not ws.allows(EVERYONE, "read", U1_INI)


def test_the_read_only_attribute_is_reported(tmp_path: Path) -> None:
    scenario = f"""\
workstations:
  ws01:
    paths:
      {U1_INI}: {{content: '', read_only: true}}
"""
    with _kit(tmp_path, scenario) as kit:
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        assert mine.status == Status.FAILED and "read-only" in mine.message
        assert _ws(kit).read(U1_INI) == b""


def test_a_state_folder_a_user_created_first_is_refused(tmp_path: Path) -> None:
    scenario = f"""\
workstations:
  ws01:
    paths:
      {STATE_ROOT}:
        folder: true
        owner: u1x1
        acl: ['u1x1:FullControl', 'Users:Modify:all']
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        result = kit.push("ws01")
        assert result.status == Status.FAILED
        assert "owned by" in _file(result, "u1x1").message
        assert ws.owner(STATE_ROOT) == _sid(ws, "u1x1")
        assert ws.listdir(STATE_ROOT) == []


def test_an_existing_objects_owner_and_dacl_can_be_changed(tmp_path: Path) -> None:
    scenario = f"""\
workstations:
  ws01:
    paths:
      {PROGRAM_DIR}:
        owner: u1x1
        acl: ['u1x1:Modify', SYSTEM:FullControl]
        inherit: true
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        u1 = _sid(ws, "u1x1")
        assert ws.owner(PROGRAM_DIR) == u1
        acl = ws.acl(PROGRAM_DIR)
        assert acl is not None and not acl.protected
        assert acl.rights() == {u1: "Modify", SYSTEM: "FullControl"}
        assert ws.allows(u1, "write", PROGRAM_DIR)
        assert ws.allows(USERS, "read", PROGRAM_DIR)  # inherited from C:\Program Files
        result = kit.push("ws01")
        assert result.status == Status.CHANGED  # override.ini gets its own protected DACL
        assert not ws.allows(u1, "write", f"{PROGRAM_DIR}\\override.ini")


@pytest.mark.parametrize("kind", ["junction", "symlink", "hardlink"])
def test_links_a_user_made_are_never_written_through(tmp_path: Path, kind: str) -> None:
    if kind == "junction":
        path, target = "C:\\Users\\u1x1\\AppData\\Roaming\\MicroSIP", PROGRAM_DIR
    else:
        path, target = U1_INI, f"{PROGRAM_DIR}\\microsip.exe"
    owner = "" if kind == "hardlink" else "owner: u1x1"
    scenario = f"""\
workstations:
  ws01:
    paths:
      {path}:
        {kind}: {target}
        {owner}
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        exe = ws.read(f"{PROGRAM_DIR}\\microsip.exe")
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        assert mine.status == Status.FAILED and "unsafe-path" in mine.message, mine.message
        assert ws.read(f"{PROGRAM_DIR}\\microsip.exe") == exe
        assert not ws.exists(f"{PROGRAM_DIR}\\microsip.ini")
        assert _file(result, "u1x2").status == Status.CHANGED


# --- injected faults ------------------------------------------------------------------------


def test_a_locked_file_is_reported_and_kept(tmp_path: Path) -> None:
    scenario = f"""\
workstations:
  ws01:
    paths:
      {U1_INI}: {{content: old}}
    locked: ['{U1_INI.upper()}']
"""
    with _kit(tmp_path, scenario) as kit:
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        assert mine.status == Status.FAILED and "locked" in mine.message, mine.message
        assert _ws(kit).read(U1_INI) == b"old"


@pytest.mark.parametrize(
    ("codes", "status"),
    [("[32, 32]", Status.CHANGED), ("[1176]", Status.FAILED), ("[1177]", Status.FAILED)],
)
def test_replacefile_errors(tmp_path: Path, codes: str, status: Status) -> None:
    scenario = f"""\
workstations:
  ws01:
    paths:
      {U1_INI}: {{content: old}}
    replace_errors:
      {U1_INI.lower()}: {codes}  # in any letter case, as Windows compares paths
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        assert mine.status == status, mine.message
        if status == Status.FAILED:
            assert "locked" in mine.message and ws.read(U1_INI) == b"old"
        else:
            assert "Sip-1-1-pw" in ini.decode_ini_bytes(ws.read(U1_INI) or b"")


# --- what lab show lists --------------------------------------------------------------------


def test_describe_lists_owners_dacls_attributes_and_links_without_following_them(
    tmp_path: Path,
) -> None:
    scenario = f"""\
workstations:
  ws01:
    shares: ['\\\\fs01\\redirect$']
    paths:
      C:\\Data\\notes.txt: {{content: hi, owner: u1x1, read_only: true}}
      C:\\Data\\again.txt: {{hardlink: C:\\Data\\notes.txt}}
      C:\\Data\\tools: {{junction: '{PROGRAM_DIR}', owner: u1x2}}
      \\\\fs01\\redirect$\\u1x1: {{folder: true, owner: u1x1}}
"""
    with _kit(tmp_path, scenario) as kit:
        ws = _ws(kit)
        listed = {e["path"]: e for e in describe(ws)}
        assert "C:\\" in listed and "\\\\fs01\\redirect$\\" in listed
        assert "\\\\fs01\\redirect$\\u1x1" in listed
        assert not any(p.startswith("C:\\Data\\tools\\") for p in listed)  # not followed
        notes = listed["C:\\Data\\notes.txt"]
        assert notes["owner"] == {"sid": _sid(ws, "u1x1"), "name": "ACME\\u1x1"}
        assert (notes["read_only"], notes["links"], notes["kind"]) == (True, 2, "file")
        assert notes["acl"] is None and notes["depth"] == 2
        assert {"sid": ADMINISTRATORS, "name": "BUILTIN\\Administrators"}.items() <= notes[
            "inherited"
        ][1].items()
        tools = listed["C:\\Data\\tools"]
        assert (tools["kind"], tools["target"]) == ("junction", PROGRAM_DIR)
        assert tools["owner"]["name"] == "ACME\\u1x2"
        users = describe(ws, "c:\\users")
        assert users[0]["path"] == "C:\\Users" and users[0]["depth"] == 0
        assert users[0]["acl"]["protected"] is True
        assert {"sid": SYSTEM, "name": "NT AUTHORITY\\SYSTEM", "rights": "FullControl"}.items() <= (
            users[0]["acl"]["entries"][0].items()
        )


# --- bad scenarios --------------------------------------------------------------------------

BAD = [
    ("workstations:\n  ws1:\n    {}\n", 2, 3, "no workstation 'ws1'; did you mean 'ws01'?"),
    (
        "workstations:\n  ws01:\n    user: {}\n",
        3,
        5,
        "unknown key of ws01 'user'; did you mean 'users'?",
    ),
    ("workstations:\n  ws01:\n    users:\n      u1x3: {}\n", 4, 7, "no user 'u1x3'; did you mean"),
    ("workstations:\n  ws01:\n    users:\n      u1x1: {sid: -4}\n", 4, 19, "sid is a RID"),
    ("workstations:\n  ws01:\n    users:\n      u1x1: {sid: S-1-5-18}\n", 4, 19, "sid is a RID"),
    (
        "workstations:\n  ws01:\n    users:\n      u1x1: {sid: 7}\n      u1x2: {sid: 7}\n",
        5,
        7,
        "u1x2 has the same SID as u1x1",
    ),
    (
        "workstations:\n  ws01:\n    users:\n      u1x1: {sid: 7}\n"
        "      u1x2: {sid: S-1-5-21-1000-2000-3000-7}\n",
        5,
        7,
        "u1x2 has the same SID as u1x1",
    ),
    (
        "workstations:\n  ws01:\n    users:\n      u1x1: {appdata: relative}\n",
        4,
        23,
        "appdata is an absolute path (D:\\Redirected\\%USERNAME%, \\\\server\\share\\...) or "
        "starts with a variable",
    ),
    ("workstations:\n  ws01:\n    users:\n      u1x1: {running: 1000}\n", 4, 23, "up to 64"),
    (
        "workstations:\n  ws01:\n    users:\n      u1x1: {profile: null, appdata: x}\n",
        4,
        38,
        "no profile (profile: null): appdata means nothing",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      C:\\a\\..\\b: {folder: true}\n",
        4,
        7,
        "'C:\\a\\..\\b' is not an absolute Windows path",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      relative\\x: {folder: true}\n",
        4,
        7,
        "not an absolute",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      \\\\srv\\s\\x: {folder: true}\n",
        4,
        7,
        "'\\\\srv\\s\\x' is on the share \\\\srv\\s, which this workstation's shares do not list",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      C:\\x: {content: a, folder: true}\n",
        4,
        23,
        "give only one of folder, content, junction, symlink, hardlink (here: folder and content)",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      C:\\x: {hardlink: 'C:\\y', owner: u1x1}\n",
        4,
        39,
        "target's owner",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      C:\\x: {content: a, owner: bob}\n",
        4,
        33,
        "'bob' is neither",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      C:\\x: {content: a, owner: u2x1}\n",
        4,
        33,
        "u2x1 has no account on this workstation",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      C:\\x: {content: a, acl: ['u1x1:Full']}\n",
        4,
        32,
        "unknown right 'Full'",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n      C:\\x: {content: a, acl: ['u1x1']}\n",
        4,
        32,
        "WHO:RIGHTS",
    ),
    ("workstations:\n  ws01:\n    paths:\n      C:\\x: {}\n", 4, 13, "say what C:\\x is"),
    (
        "workstations:\n  ws01:\n    paths:\n      C:\\x: {hardlink: 'D:\\y'}\n",
        4,
        24,
        "a hard link is on the volume of its target",
    ),
    (
        "workstations:\n  ws01:\n    shares: ['\\\\fs\\s']\n    paths:\n"
        "      C:\\x: {junction: '\\\\fs\\s\\y'}\n",
        5,
        24,
        "a junction points to a local folder",
    ),
    (
        "workstations:\n  ws01:\n    paths:\n"
        "      C:\\x: {content: a}\n      c:\\X: {content: b}\n",
        5,
        7,
        "already given at line 4",
    ),
    (
        "workstations:\n  ws01:\n    replace_errors:\n      C:\\x: [32]\n      c:\\X: [5]\n",
        5,
        7,
        "C:\\X is already given at line 4",
    ),
    (
        "workstations:\n  ws01:\n    replace_errors:\n      C:\\x: [32, 2]\n",
        4,
        18,
        "one of 5, 32, 33, 1175, 1176, 1177",
    ),
    (
        "workstations:\n  ws01:\n    powershell: {language_mode: Constrained}\n",
        3,
        33,
        "did you mean 'ConstrainedLanguage'",
    ),
    ("workstations:\n  ws01:\n    microsip: {mode: gone}\n", 3, 22, "unknown value 'gone'"),
    (
        "workstations:\n  ws01:\n    microsip: {exe: 'C:\\x.exe'}\n",
        3,
        21,
        "exe 'C:\\x.exe' is a file name only, without a folder",
    ),
    # The inventory's rule for a file name: no device name, no control character.
    ("workstations:\n  ws01:\n    microsip: {exe: NUL}\n", 3, 21, "is a device name"),
    (
        'workstations:\n  ws01:\n    microsip: {exe: "a\\x85.exe"}\n',
        3,
        21,
        "contains U+0085, which a Windows name cannot hold",
    ),
    ("workstations:\n  ws01:\n    shares: ['\\\\srv']\n", 3, 14, "is not \\\\server\\share"),
    # Ways out of the lab's folder: a device path, a share named '..'.
    (
        "workstations:\n  ws01:\n    paths:\n      '\\\\?\\C:\\x': {folder: true}\n",
        4,
        7,
        "is not an absolute Windows path",
    ),
    ("workstations:\n  ws01:\n    shares: ['\\\\srv\\..']\n", 3, 14, "is not \\\\server\\share"),
    ("workstations:\n  ws01: &a {}\n  ws02: *a\n", 3, 3, "anchors and aliases"),
    ("workstations:\n  ws01:\n    remote_shells: no way\n", 3, 20, "expected true or false"),
    ("workstations:\n  ws01: {}\n  ws01: {}\n", 3, 3, "duplicate"),
    ("workstations: [\n", 2, 1, "invalid YAML"),
]


@pytest.mark.parametrize(("text", "line", "column", "message"), BAD)
def test_a_bad_scenario_is_reported_where_it_is(
    tmp_path: Path, text: str, line: int, column: int, message: str
) -> None:
    root = tmp_path / "inventory"
    write_inventory(root, users_per_ws=2)
    inventory = load_inventory(root)
    path = tmp_path / "scenario.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProvisionerError) as caught:
        load_scenario(path, inventory)
    text_of_error = str(caught.value)
    assert f"{path}:{line}:{column}: " in text_of_error, text_of_error
    assert message in text_of_error, text_of_error


@pytest.mark.slow
def test_a_large_scenario_loads_within_the_time_budget(tmp_path: Path) -> None:
    # Each key's position was looked up again by scanning its mapping: 40,000 paths took
    # minutes. Read once, they take a few seconds, far inside the 30 s of time_budget.
    root = tmp_path / "inventory"
    write_inventory(root, users_per_ws=2)
    count = 40_000
    lines = [f"      C:\\Data\\f{i}.txt: {{content: x, owner: u1x1}}" for i in range(count)]
    path = tmp_path / "scenario.yaml"
    path.write_text("workstations:\n  ws01:\n    paths:\n" + "\n".join(lines) + "\n")
    scenario = load_scenario(path, load_inventory(root))
    paths = scenario.workstations["ws01"].paths
    assert len(paths) == count
    assert (paths[-1].path, paths[-1].where.line) == (f"C:\\Data\\f{count - 1}.txt", count + 3)


# --- the documented example -----------------------------------------------------------------


def test_the_example_scenario_of_the_docs_sets_up_the_example_inventory(tmp_path: Path) -> None:
    text = (REPO / "docs" / "lab.md").read_text(encoding="utf-8")
    example = re.search(r"```yaml\n(# awkward\.yaml.*?)```", text, re.S)
    assert example is not None
    path = tmp_path / "awkward.yaml"
    path.write_text(example.group(1), encoding="utf-8")
    inventory, identity, passphrase = copy_example(tmp_path)
    model = load_inventory(inventory)
    scenario = load_scenario(path, model)
    keyring = vault.Keyring(vault.load_recipients_file(inventory / "recipients.yaml"))
    secret = passphrase.read_bytes().split(b"\n", 1)[0]
    keyring.add(secretstore.unlock(secretstore.read_identity(identity), secret))
    names = ["ber-ws-001", "ham-ws-001"]
    running = start_inventory_lab(
        model, keyring, folder=tmp_path / "lab", names=names, scenario=scenario
    )
    try:
        built = build.build(inventory, opener_factory=lambda _: keyring)
        lab = running.lab_map()
        for name in names:
            station = resolve.resolve_station(model, name)
            files = [f for f in built.files if f.target.workstation == name]
            transport = connections.open_transport(station, keyring, lab)
            result = push.push_host(station, files, transport, push.PushOptions())
            mine = next(f for f in result.files if f.user)
            expected = "unsafe-path" if name == "ber-ws-001" else "read-only"
            assert mine.status == Status.FAILED and expected in mine.message, mine.message
        frank = running.workstations["ham-ws-001"].user("ACME\\frank")
        assert frank is not None
        assert running.workstations["ham-ws-001"].microsip_mode(frank).rule == "msi"
    finally:
        running.stop()


# --- the set-up helpers the scenario uses ---------------------------------------------------


def test_workstation_set_up_helpers(tmp_path: Path) -> None:
    ws = Workstation(tmp_path / "ws", computer="ws-9")
    given = ws.add_user("ACME\\given", sid="S-1-5-21-7-8-9-1104")
    assert given.sid == "S-1-5-21-7-8-9-1104"
    taken = ws.add_user("ACME\\taken", rid=1104)  # the RID the next account would get
    auto = ws.add_user("ACME\\auto")
    assert (taken.sid, auto.sid) == ("S-1-5-21-1000-2000-3000-1104", "S-1-5-21-1000-2000-3000-1105")
    with pytest.raises(ValueError, match="is taken"):
        ws.add_user("ACME\\again", sid=auto.sid)
    assert ws.account_name(auto.sid) == "ACME\\auto"
    assert ws.account_name(ADMINISTRATORS) == "BUILTIN\\Administrators"
    assert ws.account_name("S-1-5-21-1-2-3-4") is None
    ws.put("C:\\Data\\Notes.TXT", b"x")
    ws.set_owner("c:\\data\\notes.txt", given.sid)
    assert ws.owner("C:\\Data\\Notes.TXT") == given.sid
    with pytest.raises(FileError, match="does not exist"):
        ws.set_owner("C:\\Data\\missing", given.sid)
    assert ws.on_disk("c:\\DATA\\notes.txt\\") == "C:\\Data\\Notes.TXT"
    assert ws.on_disk("c:\\data\\New\\x") == "C:\\Data\\New\\x"  # missing parts as given
    assert ws.on_disk("c:") == "C:\\"
    ws.add_share("\\\\FS01\\Home$")
    ws.put("D:\\x", b"")
    assert ws.volumes() == ["C:\\", "D:\\", "\\\\fs01\\home$\\"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("C:\\x: {hardlink: 'C:\\missing.txt'}", "a hard link needs an existing file"),
        ("C:\\Users: {content: a folder is there}", "Is a directory."),
        ("C:\\nothing: {owner: SYSTEM}", "it does not exist (give folder: true or content"),
    ],
)
def test_a_path_that_cannot_be_set_up_stops_the_lab_where_the_scenario_says(
    tmp_path: Path, entry: str, message: str
) -> None:
    scenario = f"workstations:\n  ws02:\n    paths:\n      {entry}\n"
    with pytest.raises(ScenarioErrors) as caught, _kit(tmp_path, scenario):
        pass
    text = str(caught.value)
    path = entry.split(":", 2)[0] + ":" + entry.split(":", 2)[1]
    assert f"{tmp_path / 'scenario.yaml'}:4:7: " in text, text
    assert f"cannot set up {path}: {message}" in text, text
    assert str(tmp_path / "lab") not in text  # the lab's real folders are nobody's business


@pytest.mark.parametrize(
    ("user", "line", "column", "message"),
    [
        # A profile where the default machine has a file.
        ("u1x2: {profile: 'C:\\Users\\u1x1\\NTUSER.DAT'}", 4, 7, "ACME\\u1x2: File exists."),
        # Built first for its SID, u1x2 takes the place of u1x1's NTUSER.DAT: u1x1, whom the
        # scenario does not name, fails at the workstation.
        (
            "u1x2: {sid: 1500, profile: 'C:\\Users\\u1x1\\NTUSER.DAT'}",
            2,
            3,
            "ACME\\u1x1: Is a directory.",
        ),
    ],
    ids=["profile-on-a-file", "default-account"],
)
def test_an_account_that_cannot_be_set_up_stops_the_lab_at_the_users_line(
    tmp_path: Path, user: str, line: int, column: int, message: str
) -> None:
    scenario = f"workstations:\n  ws01:\n    users:\n      {user}\n"
    with pytest.raises(ScenarioErrors) as caught, _kit(tmp_path, scenario):
        pass
    text = str(caught.value)
    assert f"{tmp_path / 'scenario.yaml'}:{line}:{column}: " in text, text
    assert f"cannot set up {message}" in text, text
    assert str(tmp_path / "lab") not in text
