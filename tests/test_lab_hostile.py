"""A workstation's own users against the push, and Windows as it really behaves.

The agent runs as an administrator on every workstation, but a standard user owns their profile
folders and their registry. Each test here plays that user (a junction, a link, a redirected
AppData folder, a folder squatted in ProgramData) or a Windows behaviour the agent must survive
(ReplaceFile's DACL and error codes, MicroSIP's own install-mode rule, large requests, many
sessions), through the real controller or the real agent envelope against the lab.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.lab.ntfs import EVERYONE, Acl, FileError, protected_acl
from provisioner.lab.workstation import (
    ADMINISTRATORS,
    STATE_ROOT,
    SYSTEM,
    MsiProduct,
    User,
    Workstation,
    user_file_acl,
)
from provisioner.microsip import ini
from provisioner.records import state
from provisioner.records.fingerprint import Fingerprints
from provisioner.records.results import Status
from provisioner.rollout import connections, doctor, push
from tests.agentkit import (
    ALICE_INI,
    PROGRAM_DIR,
    Station,
    apply_request,
    error_code,
    file_entry,
    inspect_request,
    rollback_request,
    sha,
    state_path,
    target,
    write,
)
from tests.agentkit import ini as ini_bytes
from tests.labkit import Kit, lab_kit

pytestmark = pytest.mark.usefixtures("time_budget")

U1_INI = "C:\\Users\\u1x1\\AppData\\Roaming\\MicroSIP\\microsip.ini"
U2_INI = "C:\\Users\\u1x2\\AppData\\Roaming\\MicroSIP\\microsip.ini"
TASKS = "C:\\Windows\\System32\\Tasks"


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Kit]:
    """One shared PC (ws01) with two users, u1x1 and u1x2, both pushed once already."""
    with lab_kit(tmp_path, users_per_ws=2) as kit:
        first = kit.push("ws01")
        assert first.status == Status.CHANGED, first.message
        yield kit


def _ws(kit: Kit) -> Workstation:
    return kit.lab.workstations["ws01"]


def _account(ws: Workstation, name: str) -> User:
    user = ws.lookup_account(f"ACME\\{name}")
    assert user is not None
    return user


def _reset(kit: Kit) -> push.PushOptions:
    """A push that rewrites every file (the helpdesk's reset), so that each one is written."""
    return push.PushOptions(reset=True)


def readable_with(ws: Workstation, sid: str, secret: str) -> list[str]:
    """Every file ``sid`` may read that holds ``secret`` (as MicroSIP writes it, UTF-16LE)."""
    needle = secret.encode("utf-16-le")
    found = []
    for path in ws.walk("C:\\"):
        if ws.is_reparse_point(path) or not ws.is_file(path):
            continue
        if needle in (ws.read(path) or b"") and ws.allows(sid, "read", path):
            found.append(path)
    return found


def _doctor(kit: Kit) -> list[doctor.Check]:
    options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
    return doctor.remote_checks(
        kit.station("ws01"), kit.files("ws01"), kit.transport("ws01"), options
    )


def _file(result: object, user: str) -> object:
    return next(f for f in result.files if f.user == user)  # type: ignore[attr-defined]


# --- 1. reparse points and hard links --------------------------------------------------------


def test_a_junction_in_place_of_the_old_state_folder_gives_the_user_nothing(shared: Kit) -> None:
    # The state used to live in <ini folder>\.provisioner\<name>, which the user can replace
    # with a junction to any folder; the agent then set a protected ACL with the user at Full
    # Control on the junction's target and every file in it.
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    ws.put(f"{TASKS}\\backup.xml", b"<Task/>", protected_acl({SYSTEM: "FullControl"}))
    before = ws.acl(TASKS)
    legacy = Workstation.legacy_state_path(U1_INI, "")
    ws.remove_tree(legacy)  # the user's own folder: they may replace whatever is there
    ws.make_link(legacy, TASKS, owner=u1.sid)
    result = shared.push("ws01", _reset(shared))
    assert result.status == Status.CHANGED, result.message
    assert ws.acl(TASKS) == before
    assert not ws.allows(u1.sid, "write", TASKS)
    assert not ws.allows(u1.sid, "read", f"{TASKS}\\backup.xml")
    assert sorted(ws.listdir(TASKS)) == ["backup.xml"]
    assert ws.acl(f"{TASKS}\\backup.xml") == protected_acl({SYSTEM: "FullControl"})


def test_a_junction_on_the_path_to_the_ini_is_refused_and_nothing_is_written(shared: Kit) -> None:
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    folder = U1_INI.rsplit("\\", 1)[0]
    ws.remove_tree(folder)
    ws.make_link(folder, PROGRAM_DIR, owner=u1.sid)
    listing = ws.listdir(PROGRAM_DIR)
    result = shared.push("ws01", _reset(shared))
    assert result.status == Status.FAILED
    mine = _file(result, "u1x1")
    assert mine.status == Status.FAILED and "unsafe-path" in mine.message  # type: ignore[attr-defined]
    assert folder in mine.message  # type: ignore[attr-defined]
    assert _file(result, "u1x2").status == Status.CHANGED  # type: ignore[attr-defined]
    assert ws.listdir(PROGRAM_DIR) == listing  # no microsip.ini, no state beside it
    assert not ws.allows(u1.sid, "create", PROGRAM_DIR)
    assert not ws.allows(u1.sid, "write", f"{PROGRAM_DIR}\\override.ini")


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_link_as_the_ini_never_reaches_another_users_file(shared: Kit, kind: str) -> None:
    ws = _ws(shared)
    u1, u2 = _account(ws, "u1x1"), _account(ws, "u1x2")
    ws.delete(U1_INI)
    ws.make_link(U1_INI, U2_INI, kind, owner=u1.sid)  # type: ignore[arg-type]
    result = shared.push("ws01", _reset(shared))
    mine = _file(result, "u1x1")
    assert mine.status == Status.FAILED and "unsafe-path" in mine.message  # type: ignore[attr-defined]
    assert "link" in mine.message  # type: ignore[attr-defined]
    # u1x2's file is u1x2's: never written with u1x1's content, no right for u1x1 on it. As a
    # hard link it is the very same file under two names, so it is not written either.
    theirs = _file(result, "u1x2")
    assert theirs.status == (Status.FAILED if kind == "hardlink" else Status.CHANGED)  # type: ignore[attr-defined]
    assert "Sip-1-1-pw" not in ini.decode_ini_bytes(ws.read(U2_INI) or b"")
    assert ws.acl(U2_INI) == user_file_acl(u2.sid)
    assert readable_with(ws, u1.sid, "Sip-1-2-pw") == []


def test_a_junction_hidden_from_the_agent_is_refused(shared: Kit) -> None:
    # The user owns their Roaming folder and may deny Administrators its attributes: a link the
    # agent cannot see is a link all the same.
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    folder = U1_INI.rsplit("\\", 1)[0]
    ws.remove_tree(folder)
    ws.make_link(folder, U2_INI.rsplit("\\", 1)[0], owner=u1.sid)
    ws.faults.attributes_denied.add(folder)
    result = shared.push("ws01", push.PushOptions(reset=True, users=("u1x1",)))
    mine = _file(result, "u1x1")
    assert mine.status == Status.FAILED and "unsafe-path" in mine.message  # type: ignore[attr-defined]
    assert "cannot read the attributes" in mine.message  # type: ignore[attr-defined]
    ws.faults.attributes_denied.clear()
    assert readable_with(ws, u1.sid, "Sip-1-2-pw") == []


def _swap_for_junction(ws: Workstation, folder: str, target: str, sid: str) -> int:
    """What the user does with a folder of their own: rename it away and put a junction to
    ``target`` in its place. The Win32 error Windows refused the rename with, or 0."""
    try:
        ws.rename_as_user(folder, folder + ".old")
    except FileError as refused:
        return refused.win32
    ws.make_link(folder, target, owner=sid)
    return 0


def _unswap(ws: Workstation, folder: str) -> None:
    ws.remove_dir(folder)
    ws.rename_as_user(folder + ".old", folder)


def test_a_folder_swapped_for_a_junction_during_the_push_is_refused_by_windows(
    shared: Kit,
) -> None:
    # Between the compare-and-swap and the write (the process query, MicroSIP being stopped)
    # u1x1 tries to rename their MicroSIP folder and put a junction to u1x2's in its place.
    # The agent's lock file, open in that folder, makes Windows refuse the rename.
    ws = _ws(shared)
    u1, u2 = _account(ws, "u1x1"), _account(ws, "u1x2")
    mine_dir, theirs_dir = U1_INI.rsplit("\\", 1)[0], U2_INI.rsplit("\\", 1)[0]
    refused: list[int] = []

    def swap(event: str) -> None:
        pending = event.startswith(f"write {STATE_ROOT}") and ".backup.new." in event
        if pending and u1.sid in event and not refused:
            refused.append(_swap_for_junction(ws, mine_dir, theirs_dir, u1.sid))

    ws.observe(swap)
    result = shared.push("ws01", push.PushOptions(reset=True, users=("u1x1",)))
    assert refused == [5], "the rename was refused with access denied"
    assert _file(result, "u1x1").status == Status.CHANGED
    assert ws.acl(U2_INI) == user_file_acl(u2.sid)
    assert readable_with(ws, u1.sid, "Sip-1-2-pw") == []
    assert ws.held_paths() == []  # every lock went with the request
    assert not [n for n in ws.listdir(mine_dir) if n.endswith(".lock")]


class Race:
    """u1x1 at the step-th step the agent takes in their folders (-1: only counting)."""

    def __init__(self, ws: Workstation, mine: str, theirs: str, sid: str) -> None:
        self.ws, self.mine, self.theirs, self.sid = ws, mine, theirs, sid
        self.step = -1
        self.seen: list[str] = []
        self.swapped: list[int] = []

    def __call__(self, event: str) -> None:
        if "\\u1x1\\" not in event:
            return
        self.seen.append(event)
        if len(self.seen) == self.step + 1:
            self.swapped.append(_swap_for_junction(self.ws, self.mine, self.theirs, self.sid))

    def arm(self, step: int) -> None:
        self.step, self.seen, self.swapped = step, [], []


@pytest.mark.parametrize("level", ["MicroSIP", "Roaming"])
def test_a_user_racing_every_step_of_a_push_gains_nothing(shared: Kit, level: str) -> None:
    # u1x1 waits for each step the agent takes in their folders, each check of a path of
    # theirs and each change (an oplock on their own file wakes them there on Windows), and
    # swaps a folder of theirs for a junction to the same folder of u1x2's at that very
    # moment, one run per step.
    ws = _ws(shared)
    u1, u2 = _account(ws, "u1x1"), _account(ws, "u1x2")
    mine_dir = U1_INI[: U1_INI.index(level) + len(level)]
    theirs_dir = U2_INI[: U2_INI.index(level) + len(level)]
    theirs_before = ws.read(U2_INI)
    race = Race(ws, mine_dir, theirs_dir, u1.sid)
    ws.observe(race)
    assert shared.push("ws01", _reset(shared)).status == Status.CHANGED
    steps = list(race.seen)
    assert sum(e.startswith("check ") for e in steps) >= 4 and len(steps) >= 10, steps
    outcomes: set[str] = set()
    for step in range(len(steps)):
        race.arm(step)
        try:
            result = shared.push("ws01", _reset(shared))
        finally:
            if race.swapped == [0]:
                _unswap(ws, mine_dir)
        mine = _file(result, "u1x1")
        outcomes.add(f"{race.swapped}:{mine.status.value}")  # type: ignore[attr-defined]
        where = (step, race.seen[-1:])
        if race.swapped == [0]:
            # Before the locks: the check that follows finds the junction.
            assert mine.status == Status.FAILED, where  # type: ignore[attr-defined]
            assert "unsafe-path" in mine.message, where  # type: ignore[attr-defined]
        assert ws.read(U2_INI) == theirs_before, where
        assert ws.acl(U2_INI) == user_file_acl(u2.sid), where
        assert readable_with(ws, u1.sid, "Sip-1-2-pw") == [], where
        assert ws.held_paths() == [], where
    # Both sides of the race were played: swaps before the locks, refusals after them.
    assert any(o.startswith("[0]") for o in outcomes), outcomes
    assert any(o.startswith("[5]") for o in outcomes), outcomes


def test_a_per_user_install_is_never_looked_for_through_a_link(station: Station) -> None:
    # alice puts a junction where the inventory's per-user folder is. On Windows it would lead,
    # through an object-manager link, to \\Device\\Mup: opening the exe there would make the
    # agent's account authenticate to her server. The agent must not look through it at all:
    # no install is found there and no mode decided from it.
    ws = station.ws
    ws.uninstall_microsip()
    elsewhere = "C:\\Elsewhere\\MicroSIP"
    ws.put(f"{elsewhere}\\microsip.exe", b"MZ")
    assert station.alice.profile is not None
    ws.make_link(
        f"{station.alice.profile}\\AppData\\Local\\MicroSIP", elsewhere, owner=station.alice.sid
    )
    request = inspect_request(
        [("alice", "ACME\\alice")], mode="portable", install_dir="%LOCALAPPDATA%\\MicroSIP"
    )
    [alice] = station.agent.call(request)["users"]
    assert alice["error"]["code"] == "unsafe-path", alice
    assert "mode" not in alice, alice
    assert ws.held_paths() == []


def test_hkcu_naming_another_users_folder_finds_no_microsip_there(tmp_path: Path) -> None:
    # A portable per-user install: u1x1 sets their own HKCU\Software\MicroSIP to alice's
    # per-user folder (with a trailing backslash MicroSIP itself would run portable there).
    with lab_kit(tmp_path, users_per_ws=1, workstations=1) as kit:
        ws = _ws(kit)
        ws.uninstall_microsip()
        u1 = _account(ws, "u1x1")
        alice = ws.add_user("ACME\\alice")
        theirs = f"{alice.profile}\\AppData\\Local\\MicroSIP"
        ws.put(f"{theirs}\\microsip.exe", b"MZ", owner=alice.sid)
        ws.put(f"{theirs}\\microsip.ini", ini_bytes("alice's call history"), owner=alice.sid)
        u1.hkcu_microsip = theirs + "\\"
        inventory = kit.root / "inventory.yaml"
        text = inventory.read_text().replace(
            "install_dir: C:\\Program Files\\MicroSIP",
            "install_dir: '%LOCALAPPDATA%\\MicroSIP'\n    mode: portable",
        )
        inventory.write_text(text)
        kit.rebuild()
        result = kit.push("ws01")
        mine = _file(result, "u1x1")
        assert mine.status == Status.FAILED, result.message  # type: ignore[attr-defined]
        assert "not-installed" in mine.message  # type: ignore[attr-defined]
        assert ws.read(f"{theirs}\\microsip.ini") == ini_bytes("alice's call history")
        assert not ws.allows(u1.sid, "read", f"{theirs}\\microsip.ini")


def test_an_allowed_root_that_is_a_link_is_refused(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.add_share("\\\\fs01\\redirect$")
    ws.put_dir("\\\\fs01\\redirect$\\bob\\AppData\\MicroSIP")
    ws.make_link("\\\\fs01\\redirect$\\alice", "\\\\fs01\\redirect$\\bob", owner=alice.sid)
    alice.shell_appdata = "\\\\fs01\\redirect$\\alice\\AppData"
    roots = ["\\\\fs01\\redirect$\\%USERNAME%"]
    request = {**inspect_request([("alice", "ACME\\alice")]), "appdata_roots": roots}
    [user] = station.agent.call(request)["users"]
    assert user["error"]["code"] == "unsafe-path", user


# --- 2. the merge base and backups -----------------------------------------------------------


def test_the_merge_base_and_backups_are_out_of_the_users_reach(shared: Kit) -> None:
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    assert shared.push("ws01", _reset(shared)).status == Status.CHANGED
    for item in ("applied", "backup.1"):
        path = state_path(item, u1)
        assert ws.read(path) is not None, item
        assert not ws.allows(u1.sid, "read", path) and not ws.allows(u1.sid, "write", path)
    assert not ws.allows(u1.sid, "create", state_path("", u1))
    assert ws.owner(STATE_ROOT) == ADMINISTRATORS
    assert not ws.allows(u1.sid, "create", STATE_ROOT)
    # Nothing of the tool's is left beside the user's file.
    assert ws.listdir(U1_INI.rsplit("\\", 1)[0]) == ["microsip.ini"]


def test_a_swapped_legacy_merge_base_or_backup_is_never_followed(shared: Kit) -> None:
    # An agent of an earlier version kept its state beside the file. u1x1 makes its merge base
    # and a backup names of u1x2's file (hard links): the agent used to read them, and to give
    # u1x1 Full Control of every file there, u1x2's file included.
    ws = _ws(shared)
    u1, u2 = _account(ws, "u1x1"), _account(ws, "u1x2")
    legacy = Workstation.legacy_state_path(U1_INI, "")
    ws.remove_tree(legacy)
    ws.put(f"{legacy}\\backup.1", ini_bytes("u1x1 by an old agent"), owner=u1.sid)
    ws.make_link(f"{legacy}\\applied", U2_INI, "hardlink", owner=u1.sid)
    ws.make_link(f"{legacy}\\backup.2", U2_INI, "hardlink", owner=u1.sid)
    for item in ("applied", "backup.1", "backup.2", "backup.3"):
        ws.delete(state_path(item, u1))
    # The helpdesk resets u1x1's profile only.
    result = shared.push("ws01", push.PushOptions(reset=True, users=("u1x1",)))
    assert _file(result, "u1x1").status == Status.CHANGED, result.message  # type: ignore[attr-defined]
    assert readable_with(ws, u1.sid, "Sip-1-2-pw") == []
    assert ws.acl(U2_INI) == user_file_acl(u2.sid)
    assert shared.push("ws01", _reset(shared)).status == Status.CHANGED
    # The plain backup was migrated (two pushes later, the oldest), the links were not read,
    # the old folder is gone.
    migrated = [ws.read(state_path(f"backup.{n}", u1)) or b"" for n in (1, 2, 3)]
    assert migrated[2] == ini_bytes("u1x1 by an old agent")
    assert all(b"u\x001\x00x\x002" not in data for data in migrated)
    assert not ws.exists(legacy.rstrip("\\").rsplit("\\", 1)[0])
    assert ws.read(U2_INI) is not None and ws.link_count(U2_INI) == 1


def test_a_state_folder_created_by_a_user_is_refused(shared: Kit) -> None:
    # Users may create folders in C:\ProgramData and own what they create.
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    ws.remove_tree(STATE_ROOT)
    assert ws.allows(u1.sid, "create", "C:\\ProgramData")
    ws.put_dir(STATE_ROOT, owner=u1.sid)
    ws.make_link(f"{STATE_ROOT}\\users", TASKS, owner=u1.sid)
    result = shared.push("ws01", _reset(shared))
    assert result.status == Status.FAILED
    for change in result.files:
        assert change.status == Status.FAILED and "owned by" in change.message, change
    assert ws.listdir(TASKS) == []
    assert not ws.allows(u1.sid, "write", TASKS)


def test_a_state_subfolder_a_user_made_first_is_refused(shared: Kit) -> None:
    # An administrator created the root before the agent, and it inherited ProgramData's rule
    # that lets users create folders: u1x1 makes u1x2's state folder first and owns it.
    ws = _ws(shared)
    u1, u2 = _account(ws, "u1x1"), _account(ws, "u1x2")
    ws.remove_tree(STATE_ROOT)
    ws.put_dir(STATE_ROOT, owner=ADMINISTRATORS)
    assert ws.allows(u1.sid, "create", STATE_ROOT)
    ws.put_dir(f"{STATE_ROOT}\\users\\{u2.sid}", owner=u1.sid)
    result = shared.push("ws01", _reset(shared))
    theirs = _file(result, "u1x2")
    assert theirs.status == Status.FAILED and "owned by" in theirs.message, theirs  # type: ignore[attr-defined]
    assert ws.listdir(f"{STATE_ROOT}\\users\\{u2.sid}") == []
    assert readable_with(ws, u1.sid, "Sip-1-2-pw") == []


def test_inspect_reads_no_merge_base_from_a_state_folder_a_user_made_first(
    station: Station,
) -> None:
    # The root an administrator made before the agent lets alice make her own state folder
    # and put a merge base of her choosing in it: inspect refuses it instead of using it.
    ws, alice = station.ws, station.alice
    ws.remove_tree(STATE_ROOT)
    ws.put_dir(STATE_ROOT, owner=ADMINISTRATORS)
    ws.put_dir(Workstation.state_path(alice, "microsip.ini"), owner=alice.sid)
    ws.put(Workstation.state_path(alice, "microsip.ini", "applied"), b"planted", owner=alice.sid)
    [user] = station.agent.call(inspect_request([("alice", "ACME\\alice")]))["users"]
    assert user["error"]["code"] == "unsafe-path" and "owned by" in user["error"]["message"], user
    assert "applied" not in user


def test_a_state_folder_hidden_from_the_agent_is_refused_not_taken_for_absent(
    shared: Kit,
) -> None:
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    ws.remove_tree(STATE_ROOT)
    ws.put_dir(STATE_ROOT, owner=u1.sid)
    ws.faults.attributes_denied.add(STATE_ROOT)
    result = shared.push("ws01", _reset(shared))
    for change in result.files:
        assert change.status == Status.FAILED, change
        assert "cannot read the attributes" in change.message, change


# --- 3. redirected AppData -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["C:\\Users\\u1x2\\AppData\\Roaming", "%USERPROFILE%\\..\\u1x2\\AppData\\Roaming."]
)
def test_appdata_pointed_at_another_users_profile_is_refused(shared: Kit, value: str) -> None:
    # On a shared PC (or RDS host) u1x1 sets their own User Shell Folders\AppData to u1x2's.
    ws = _ws(shared)
    u1, u2 = _account(ws, "u1x1"), _account(ws, "u1x2")
    theirs = ws.read(U2_INI)
    u1.shell_appdata = value
    u1.hive_loaded = True
    result = shared.push("ws01", _reset(shared))
    mine = _file(result, "u1x1")
    assert mine.status == Status.FAILED and "unsafe-path" in mine.message  # type: ignore[attr-defined]
    assert "C:\\Users\\u1x2\\AppData\\Roaming" in mine.message  # type: ignore[attr-defined]
    after = ws.read(U2_INI)
    assert after is not None and theirs is not None
    assert "Sip-1-1-pw" not in ini.decode_ini_bytes(after)
    assert ws.acl(U2_INI) == user_file_acl(u2.sid)
    assert readable_with(ws, u1.sid, "Sip-1-2-pw") == []


def test_a_logged_off_users_redirected_appdata_is_reported_never_written_locally(
    shared: Kit,
) -> None:
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    ws.remove_tree(U1_INI.rsplit("\\", 1)[0])
    u1.shell_appdata = "\\\\fs01\\redirect$\\%USERNAME%\\AppData"
    u1.hive_loaded = False
    result = shared.push("ws01", _reset(shared))
    mine = _file(result, "u1x1")
    assert mine.status == Status.FAILED and "redirected" in mine.message  # type: ignore[attr-defined]
    assert "\\\\fs01\\redirect$\\u1x1\\AppData" in mine.message  # type: ignore[attr-defined]
    assert u1.sid in ws.hives_read  # read from a copy of NTUSER.DAT, not guessed
    assert not ws.exists(U1_INI.rsplit("\\", 1)[0])  # the local copy MicroSIP would not read


def test_an_inventory_redirection_root_lets_the_push_write_there(shared: Kit) -> None:
    ws = _ws(shared)
    u1, u2 = _account(ws, "u1x1"), _account(ws, "u1x2")
    ws.add_share("\\\\fs01\\redirect$")
    for user in (u1, u2):
        user.shell_appdata = "\\\\fs01\\redirect$\\%USERNAME%\\AppData"
    u2.shell_appdata = "\\\\fs01\\redirect$\\u1x1\\AppData"  # u1x2 aims at u1x1's folder
    inventory = shared.root / "inventory.yaml"
    text = inventory.read_text()
    root = "    appdata_roots: ['\\\\fs01\\redirect$\\%USERNAME%']\n"
    inventory.write_text(text.replace("  microsip:\n", "  microsip:\n" + root, 1))
    shared.rebuild()
    result = shared.push("ws01")
    redirected = "\\\\fs01\\redirect$\\u1x1\\AppData\\MicroSIP\\microsip.ini"
    assert _file(result, "u1x1").status == Status.CHANGED, result.message  # type: ignore[attr-defined]
    assert "Sip-1-1-pw" in ini.decode_ini_bytes(ws.read(redirected) or b"")
    # u1x2's root is \\\\fs01\\redirect$\\u1x2: u1x1's folder is not under it.
    theirs = _file(result, "u1x2")
    assert theirs.status == Status.FAILED and "redirected" in theirs.message  # type: ignore[attr-defined]
    assert "Sip-1-2-pw" not in ini.decode_ini_bytes(ws.read(redirected) or b"")


def test_an_allowed_redirection_root_is_written(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.add_share("\\\\fs01\\redirect$")
    alice.shell_appdata = "\\\\FS01\\Redirect$\\alice\\AppData"
    roots = ["\\\\fs01\\redirect$\\%USERNAME%"]
    answer = station.agent.call(
        {**inspect_request([("alice", "ACME\\alice")]), "appdata_roots": roots}
    )
    [user] = answer["users"]
    assert user["error"] is None, user
    path = "\\\\fs01\\redirect$\\alice\\AppData\\MicroSIP\\microsip.ini"
    assert user["path"] == path
    entry = file_entry(path, ini_bytes("redirected"), expect=None, user=alice)
    [result] = station.agent.call({**apply_request([entry]), "appdata_roots": roots})["files"]
    assert result["status"] == "written", result
    assert ws.read(path) == ini_bytes("redirected")
    # A root that names another user's folder is no root for alice.
    bob_root = ["\\\\fs01\\redirect$\\bob"]
    answer = station.agent.call(
        {**inspect_request([("alice", "ACME\\alice")]), "appdata_roots": bob_root}
    )
    assert answer["users"][0]["error"]["code"] == "redirected"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("no-hive-file", "no-profile"),
        ("hive-in-use", "locked"),
        ("hive-denied", "unsafe-path"),
    ],
)
def test_a_logged_off_hive_that_cannot_be_read_writes_nothing(
    shared: Kit, change: str, code: str
) -> None:
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    if change == "no-hive-file":
        u1.hive_file = False  # a profile disk: not on the machine while logged off
    elif change == "hive-in-use":
        ws.hive_locked.add(u1.sid)  # a logon under way
    else:
        ws.hive_denied.add(u1.sid)  # its owner removed Administrators: no retry helps
    before = ws.read(U1_INI)
    result = shared.push("ws01", _reset(shared))
    mine = _file(result, "u1x1")
    assert mine.status == Status.FAILED and mine.message.startswith(code)  # type: ignore[attr-defined]
    assert ws.read(U1_INI) == before
    assert result.retryable is (code == "locked")


# --- 4. the ACL window -----------------------------------------------------------------------


WIDE = Acl(
    (
        *user_file_acl("S-1-5-21-1000-2000-3000-1104").aces,
        *protected_acl({EVERYONE: "ReadAndExecute"}).aces,
    )
)
"""alice's file readable by everyone (a portable folder's defaults, or the user's own choice)."""


def test_new_content_is_never_readable_under_the_old_files_wider_dacl(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini_bytes("old"), WIDE, owner=alice.sid)
    exposed: list[str] = []

    def watch(event: str) -> None:
        written = event.startswith("replace") and ws.read(ALICE_INI) == ini_bytes("new password")
        if written and ws.allows(EVERYONE, "read", ALICE_INI):
            exposed.append(event)

    ws.observe(watch)
    assert write(station, alice, ini_bytes("new password"))["status"] == "written"
    assert exposed == []
    assert ws.acl(ALICE_INI) == user_file_acl(alice.sid)


def test_a_dacl_that_cannot_be_set_leaves_the_old_content(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini_bytes("old"), WIDE, owner=alice.sid)
    ws.faults.acl_errors[ALICE_INI] = 1
    result = write(station, alice, ini_bytes("new password"))
    assert (result["status"], error_code(result)) == ("error", "read-only")
    assert ws.read(ALICE_INI) == ini_bytes("old")
    assert ws.read(state_path("backup.new")) is None and ws.read(state_path("backup.1")) is None


def test_a_dacl_changed_behind_the_agents_back_is_caught_after_the_replace(
    station: Station,
) -> None:
    # The user owns their file and may change its DACL at any time; here between the agent
    # setting the final one and the replace, and the agent's second attempt fails too.
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini_bytes("old"), owner=alice.sid)

    raced: list[str] = []

    def race(event: str) -> None:
        if event == f"acl {ALICE_INI}" and not raced:
            raced.append(event)
            ws.set_acl(ALICE_INI, WIDE)
            ws.faults.acl_errors[ALICE_INI] = 1

    ws.observe(race)
    result = write(station, alice, ini_bytes("new password"))
    assert (result["status"], error_code(result)) == ("error", "acl-failed")
    assert ws.read(ALICE_INI) == ini_bytes("old")


# --- 5. request size -------------------------------------------------------------------------


def test_a_40_user_rds_host_with_100_kib_files_pushes(tmp_path: Path) -> None:
    with lab_kit(tmp_path, users_per_ws=40, workstations=1) as kit:
        ws = kit.lab.workstations["ws01"]
        history = "".join(
            f"call{n}=2026-12-01 10:{n % 60:02d} +4930{n:07d} 42\r\n" for n in range(1700)
        )
        for number in range(1, 41):
            user = _account(ws, f"u1x{number}")
            text = f"[Settings]\r\naccountId=1\r\n[Calls]\r\n{history}"
            ws.put(ws.ini_path(user), ini.encode_ini(text), owner=user.sid)
        assert all(len(ws.read(ws.ini_path(u)) or b"") > 100 * 1024 for u in ws.users)
        result = kit.push("ws01")
        assert result.status == Status.CHANGED, result.message
        assert sum(f.status == Status.CHANGED for f in result.files) == 41
        host = kit.lab.hosts["ws01"]
        assert host.stats().by_operation["Send"] > 2  # the apply went out in pieces


def test_a_request_over_2_mib_parses(station: Station) -> None:
    # ConvertFrom-Json in PowerShell 4.0 stopped at 2,097,152 characters; the bootstrap's own
    # parser does not.
    big = {**inspect_request([("alice", "ACME\\alice")]), "padding": "x" * 2_200_000}
    assert station.agent.call(big)["ok"] is True


def test_powershell_before_5_is_named_by_push_and_doctor(shared: Kit) -> None:
    # [type]::new() is PowerShell 5; on 4.0 the bootstrap says so before anything else.
    _ws(shared).ps_version = "4.0"
    result = shared.push("ws01")
    assert result.status == Status.FAILED and "PowerShell 4.0" in result.message
    powershell = next(c for c in _doctor(shared) if c.name == "powershell")
    assert not powershell.ok and "needs Windows PowerShell 5.1" in powershell.detail
    assert "Windows Management Framework 5.1" in powershell.fix


def test_a_request_that_does_not_parse_is_never_quoted_back(station: Station) -> None:
    # JavaScriptSerializer's message quotes its whole input, and stderr reaches the reports.
    torn = b'{"script": "x", "request": {"files": [{"content_b64": "Canary-Sip-Pw-1"'
    out, err, code = station.agent.raw(base64.b64encode(torn))
    assert (out, code) == (b"", 1)
    assert b"Canary" not in err and b"the request is not valid JSON" in err


def test_module_logging_never_records_a_password(shared: Kit) -> None:
    ws = _ws(shared)
    ws.module_logging = True
    assert shared.push("ws01", _reset(shared)).status == Status.CHANGED
    assert ws.event_log, "the lab recorded what the bootstrap's cmdlets were given"
    # The apply request carries the rendered files, passwords in them, as content_b64.
    leaked = [e for e in ws.event_log if "content_b64" in e or "Sip-1-" in e]
    assert leaked == []


# --- 6. local accounts -----------------------------------------------------------------------


def test_a_local_account_written_dot_backslash_resolves_on_the_workstation(
    station: Station,
) -> None:
    kiosk = station.ws.add_user(".\\kiosk")
    answer = station.agent.call(inspect_request([("kiosk", ".\\kiosk")]))
    [user] = answer["users"]
    assert user["error"] is None and user["sid"] == kiosk.sid
    assert user["path"] == "C:\\Users\\kiosk\\AppData\\Roaming\\MicroSIP\\microsip.ini"


# --- 7. MicroSIP's own install-mode rule -----------------------------------------------------


def _mode(station: Station, mode: str = "installed") -> dict[str, object]:
    answer = station.agent.call(inspect_request([("alice", "ACME\\alice")], mode=mode))
    return dict(answer["users"][0])


def test_hkcu_decides_first(station: Station) -> None:
    station.ws.hklm_microsip = None
    station.alice.hkcu_microsip = PROGRAM_DIR.upper()  # compared case-insensitively
    user = _mode(station)
    assert (user["mode"], user["mode_rule"], user["error"]) == ("installed", "hkcu", None)
    wrong = _mode(station, "portable")
    assert wrong["error"]["code"] == "mode-mismatch"  # type: ignore[index]
    assert "rule hkcu" in wrong["error"]["message"]  # type: ignore[index]


def test_a_registry_value_with_a_trailing_backslash_means_portable(station: Station) -> None:
    # MicroSIP compares the registry value with the exe's folder exactly: no trim.
    station.ws.hklm_microsip = PROGRAM_DIR + "\\"
    user = _mode(station)
    assert user["error"]["code"] == "mode-mismatch", user  # type: ignore[index]
    assert (user["mode"], user["mode_rule"]) == ("portable", "none")
    assert user["path"] is None  # nothing MicroSIP would not read is written
    portable = _mode(station, "portable")
    assert portable["path"] == f"{PROGRAM_DIR}\\microsip.ini"


def test_an_msi_product_decides_when_the_registry_does_not(station: Station) -> None:
    ws = station.ws
    ws.hklm_microsip = None
    ws.msi_products.append(MsiProduct("MicroSIP", PROGRAM_DIR + "\\"))
    user = _mode(station)
    assert (user["mode"], user["mode_rule"]) == ("installed", "msi")  # its location is trimmed
    ws.msi_products.clear()
    ws.msi_products.append(MsiProduct("microsip", ""))
    user = _mode(station)
    assert (user["mode"], user["mode_rule"]) == ("installed", "msi-any-location")
    ws.msi_products[:] = [MsiProduct("MicroSIP", PROGRAM_DIR, user_sid=station.bob.sid)]
    assert _mode(station)["mode"] == "portable"  # bob's per-user product is not alice's


def test_doctor_reports_which_rule_decided(shared: Kit) -> None:
    checks = _doctor(shared)
    profile = next(c for c in checks if c.name == "profile u1x1")
    assert profile.ok and "installed, decided by hklm" in profile.detail


def test_a_per_user_install_is_found_in_each_users_profile(shared: Kit) -> None:
    ws = _ws(shared)
    ws.uninstall_microsip()
    users = [_account(ws, "u1x1"), _account(ws, "u1x2")]
    for user in users:
        folder = f"{user.profile}\\AppData\\Local\\Programs\\MicroSIP"
        ws.put(f"{folder}\\microsip.exe", b"MZ", owner=user.sid)
        user.hkcu_microsip = folder  # what MicroSIP's installer records when run by the user
    inventory = shared.root / "inventory.yaml"
    text = inventory.read_text().replace(
        "install_dir: C:\\Program Files\\MicroSIP",
        "install_dir: '%LOCALAPPDATA%\\Programs\\MicroSIP'",
    )
    inventory.write_text(text)
    shared.rebuild()
    result = shared.push("ws01", _reset(shared))
    assert result.status == Status.CHANGED, result.message
    override = next(f for f in result.files if f.kind == "override")
    assert override.status == Status.UNCHANGED and "per-user install" in override.message
    for user in users:
        [user_file] = [f for f in result.files if f.user == user.sam]
        assert user_file.path == f"{user.profile}\\AppData\\Roaming\\MicroSIP\\microsip.ini"
    answer = shared.transport("ws01").request(
        push.inspect_request(shared.station("ws01"), shared.files("ws01"))
    )
    rules = {u.name: (u.mode, u.mode_rule) for u in answer.users}
    assert rules == {"u1x1": ("installed", "hkcu"), "u1x2": ("installed", "hkcu")}


def test_a_per_user_install_rolls_back_without_an_override(shared: Kit) -> None:
    ws = _ws(shared)
    ws.uninstall_microsip()
    for user in (_account(ws, "u1x1"), _account(ws, "u1x2")):
        folder = f"{user.profile}\\AppData\\Local\\Programs\\MicroSIP"
        ws.put(f"{folder}\\microsip.exe", b"MZ", owner=user.sid)
        user.hkcu_microsip = folder
    inventory = shared.root / "inventory.yaml"
    inventory.write_text(
        inventory.read_text().replace(
            "install_dir: C:\\Program Files\\MicroSIP",
            "install_dir: '%LOCALAPPDATA%\\Programs\\MicroSIP'",
        )
    )
    shared.rebuild()
    assert shared.push("ws01", _reset(shared)).status == Status.CHANGED
    back = push.rollback_host(
        shared.station("ws01"), shared.files("ws01"), shared.transport("ws01")
    )
    assert back.status == Status.CHANGED, back.message
    assert {f.kind for f in back.files} == {"microsip"}


# --- 8. Windows errors -----------------------------------------------------------------------


@pytest.mark.parametrize("number", [1175, 1176, 1177])
def test_replacefile_errors_leave_the_old_content_and_are_retryable(
    station: Station, number: int
) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini_bytes("old"), owner=alice.sid)
    ws.faults.replace_errors[ALICE_INI] = [number]
    result = write(station, alice, ini_bytes("new"))
    assert (result["status"], error_code(result)) == ("error", "locked")
    assert str(number) in result["error"]["message"]
    assert ws.read(ALICE_INI) == ini_bytes("old")
    folder = ALICE_INI.rsplit("\\", 1)[0]
    assert ws.listdir(folder) == ["microsip.ini"]  # no temp, no .old left beside it
    assert ws.read(state_path("backup.1")) is None and ws.read(state_path("backup.new")) is None
    assert write(station, alice, ini_bytes("new"))["status"] == "written"


def test_a_replace_that_died_half_way_is_put_back_by_the_next_request(
    station: Station,
) -> None:
    # ReplaceFile 1177: the old file is under the backup name, and moving it back fails too.
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini_bytes("old"), owner=alice.sid)
    ws.faults.replace_errors[ALICE_INI] = [1177]
    ws.faults.move_denied.add(ALICE_INI)
    result = write(station, alice, ini_bytes("new"))
    ws.faults.move_denied.clear()
    assert (result["status"], error_code(result)) == ("error", "locked")
    assert not ws.exists(ALICE_INI)
    assert ws.read(state_path("backup.new")) == ini_bytes("old")  # kept: the only copy
    entry = file_entry(ALICE_INI, ini_bytes("new"), expect=sha(ini_bytes("old")), user=alice)
    [again] = station.agent.call(apply_request([entry]))["files"]
    assert again["status"] == "written", again
    assert ws.read(ALICE_INI) == ini_bytes("new")
    assert ws.read(state_path("backup.1")) == ini_bytes("old")
    assert ws.listdir(ALICE_INI.rsplit("\\", 1)[0]) == ["microsip.ini"]


def test_an_antivirus_holding_the_file_for_a_moment_is_waited_for(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini_bytes("old"), owner=alice.sid)
    ws.faults.replace_errors[ALICE_INI] = [32, 32]
    assert write(station, alice, ini_bytes("new"))["status"] == "written"
    ws.faults.replace_errors[ALICE_INI] = [32] * 5
    result = write(station, alice, ini_bytes("newer"))
    assert (result["status"], error_code(result)) == ("error", "locked")
    assert ws.read(ALICE_INI) == ini_bytes("new")


def test_the_read_only_attribute_is_a_clear_status(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini_bytes("locked by an admin"), owner=alice.sid, readonly=True)
    [user] = station.agent.call(inspect_request([("alice", "ACME\\alice")]))["users"]
    assert user["read_only"] is True
    result = write(station, alice, ini_bytes("new"))
    assert (result["status"], error_code(result)) == ("error", "read-only")
    assert "read-only attribute" in result["error"]["message"]
    assert ws.read(ALICE_INI) == ini_bytes("locked by an admin")
    # A rollback that would undo a write to it is refused the same way.
    ws.set_readonly(ALICE_INI, False)
    assert write(station, alice, ini_bytes("new"))["status"] == "written"
    ws.set_readonly(ALICE_INI)
    [back] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert error_code(back) == "read-only"
    assert ws.read(ALICE_INI) == ini_bytes("new")


def test_a_read_only_file_fails_in_the_plan_before_any_write(shared: Kit) -> None:
    ws = _ws(shared)
    ws.set_readonly(U1_INI)
    before = shared.lab.hosts["ws01"].stats().commands
    result = shared.push("ws01", _reset(shared))
    mine = _file(result, "u1x1")
    assert mine.status == Status.FAILED and "read-only attribute" in mine.message  # type: ignore[attr-defined]
    assert shared.lab.hosts["ws01"].stats().commands - before == 2  # inspect, apply for u1x2


# --- 9. stop only when it will write ---------------------------------------------------------


def test_a_conflict_never_stops_the_users_microsip(station: Station) -> None:
    ws, alice = station.ws, station.alice
    ws.put(ALICE_INI, ini_bytes("edited by alice meanwhile"), owner=alice.sid)
    process = ws.start_microsip(alice)
    entry = file_entry(ALICE_INI, ini_bytes("ours"), expect=sha(b"what we saw"), user=alice)
    [result] = station.agent.call(apply_request([entry], "stop"))["files"]
    assert (result["status"], result["stopped"]) == ("conflict", 0)
    assert process.running and ws.stopped == []


def test_a_stop_is_said_in_the_result_and_the_audit_with_who(shared: Kit) -> None:
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    ws.start_microsip(u1)
    result = shared.push("ws01", push.PushOptions(reset=True, if_running="stop"))
    mine = _file(result, "u1x1")
    assert mine.status == Status.CHANGED  # type: ignore[attr-defined]
    assert "MicroSIP was closed" in mine.message  # type: ignore[attr-defined]
    [record] = [
        r
        for r in state.records_for_results(
            [result],
            who="helpdesk-anna",
            action="push",
            run_id="r1",
            fingerprints=Fingerprints(bytes(32)),
        )
        if r.user == "u1x1"
    ]
    assert record.who == "helpdesk-anna" and "MicroSIP was closed" in record.message


# --- 10. many sessions -----------------------------------------------------------------------


def test_one_process_query_per_request_on_an_rds_host(station: Station) -> None:
    ws = station.ws
    names = [f"rds{n:02d}" for n in range(50)]
    users = [ws.add_user(f"ACME\\{name}", hive_loaded=True) for name in names]
    for user in users:
        ws.start_microsip(user)
    answer = station.agent.call(inspect_request([(n, f"ACME\\{n}") for n in names]))
    assert all(u["running"] for u in answer["users"])
    assert (ws.process_queries.queries, ws.process_queries.owner_lookups) == (1, 50)
    entries = [file_entry(ws.ini_path(u), ini_bytes(u.sam), expect=None, user=u) for u in users]
    results = station.agent.call(apply_request(entries))["files"]
    assert {r["status"] for r in results} == {"busy"}
    assert (ws.process_queries.queries, ws.process_queries.owner_lookups) == (2, 100)


# --- 11. Constrained Language Mode and WinRS disabled ----------------------------------------


def test_constrained_language_mode_is_named_by_push_and_doctor(shared: Kit) -> None:
    _ws(shared).language_mode = "ConstrainedLanguage"
    result = shared.push("ws01")
    assert result.status == Status.FAILED and "ConstrainedLanguage" in result.message
    checks = _doctor(shared)
    powershell = next(c for c in checks if c.name == "powershell")
    assert not powershell.ok and "ConstrainedLanguage" in powershell.detail
    assert "WDAC" in powershell.fix


def test_remote_shells_disabled_by_policy_is_named_by_doctor(shared: Kit) -> None:
    shared.lab.hosts["ws01"].set_remote_shells(False)
    checks = _doctor(shared)
    winrs = next(c for c in checks if c.name == "winrs")
    assert not winrs.ok and "AllowRemoteShellAccess" in winrs.fix


# --- 12. a rollback removes only what the tool created ---------------------------------------


@pytest.mark.parametrize("kind", ["junction", "hardlink", "symlink"])
def test_a_rollback_never_removes_another_users_file_through_a_link(
    station: Station, kind: str
) -> None:
    # The tool created both files, so both are owned by Administrators. Alice puts a link to
    # bob's in place of hers (or of her MicroSIP folder): removing "her" file, which the run
    # undone created, would remove bob's.
    ws, alice, bob = station.ws, station.alice, station.bob
    bob_ini = ws.ini_path(bob)
    assert write(station, bob, ini_bytes("bob"))["status"] == "written"
    assert write(station, alice, ini_bytes("alice"))["status"] == "written"
    if kind == "junction":
        folder = ALICE_INI.rsplit("\\", 1)[0]
        ws.remove_tree(folder)
        ws.make_link(folder, bob_ini.rsplit("\\", 1)[0], owner=alice.sid)
    else:
        ws.delete(ALICE_INI)
        ws.make_link(ALICE_INI, bob_ini, kind, owner=alice.sid)  # type: ignore[arg-type]
    [back] = station.agent.call(rollback_request([target(ALICE_INI, alice)]))["files"]
    assert (back["status"], error_code(back)) == ("error", "unsafe-path"), back
    assert ws.read(bob_ini) == ini_bytes("bob") and ws.owner(bob_ini) == ADMINISTRATORS
    assert ws.read(state_path("rolled-back", alice)) is None  # nothing of bob's copied
    assert ws.read(state_path("history", alice)) is not None  # the write is still to undo


def test_a_rollback_never_removes_a_file_the_user_made_in_place_of_the_created_one(
    shared: Kit,
) -> None:
    # The first push created u1x1's microsip.ini; u1x1 deleted it and made one of their own.
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    ws.delete(U1_INI)
    own = ini_bytes("u1x1's own settings")
    ws.put(U1_INI, own, owner=u1.sid)
    back = push.rollback_host(
        shared.station("ws01"), shared.files("ws01"), shared.transport("ws01")
    )
    mine = _file(back, "u1x1")
    assert mine.status == Status.FAILED, back.message  # type: ignore[attr-defined]
    assert "unsafe-path" in mine.message and u1.sid in mine.message  # type: ignore[attr-defined]
    assert "nothing was removed" in mine.message  # type: ignore[attr-defined]
    assert ws.read(U1_INI) == own
    # The rest of the run is undone; the run as a whole is not.
    assert _file(back, "u1x2").status == Status.CHANGED and not ws.exists(U2_INI)  # type: ignore[attr-defined]
    assert not back.ok


def test_a_rollback_removes_nothing_where_the_users_appdata_points_now(shared: Kit) -> None:
    # u1x1 moves their AppData after the push that created their ini there: the file at the new
    # place is not the one the run created.
    ws = _ws(shared)
    u1 = _account(ws, "u1x1")
    moved = f"{u1.profile}\\Elsewhere"
    elsewhere = f"{moved}\\MicroSIP\\microsip.ini"
    ws.put(elsewhere, ini_bytes("u1x1's"), owner=u1.sid)
    u1.shell_appdata = moved
    u1.hive_loaded = True
    back = push.rollback_host(
        shared.station("ws01"),
        shared.files("ws01"),
        shared.transport("ws01"),
        push.PushOptions(users=("u1x1",)),
    )
    [mine] = back.files
    assert mine.status == Status.FAILED and "unsafe-path" in mine.message, back.message
    assert U1_INI in mine.message and elsewhere in mine.message
    assert ws.read(elsewhere) == ini_bytes("u1x1's") and ws.exists(U1_INI)
