"""Rollback undoes a workstation's last run: through the real pywinrm client to the lab.

A file that run created is removed, a file it replaced gets its previous content back, a file
it did not touch is left alone and reported unchanged. The workstation's own state says what
each run wrote (docs/rollout.md, "Roll back").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.lab.workstation import ADMINISTRATORS, Workstation
from provisioner.microsip import ini
from provisioner.records.results import HostResult, Status
from provisioner.rollout import push
from tests.labkit import Kit, example_lab, lab_kit

pytestmark = pytest.mark.usefixtures("time_budget")

INI = "C:\\Users\\u1x1\\AppData\\Roaming\\MicroSIP\\microsip.ini"
OVERRIDE = "C:\\Program Files\\MicroSIP\\override.ini"


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    with lab_kit(tmp_path, workstations=1) as running:
        yield running


def _ws(kit: Kit) -> Workstation:
    return kit.lab.workstations["ws01"]


def _rollback(kit: Kit, options: push.PushOptions | None = None) -> HostResult:
    return push.rollback_host(
        kit.station("ws01"),
        kit.files("ws01"),
        kit.transport("ws01"),
        options or push.PushOptions(),
    )


def _statuses(result: HostResult) -> dict[str, Status]:
    return {f.kind: f.status for f in result.files}


def edit_in_place(ws: Workstation, path: str, key: str, value: str) -> None:
    """Set ``[Settings] key`` as MicroSIP does on exit: ``WritePrivateProfileString`` rewrites
    the file in place, so it keeps its owner and its DACL."""
    data = ws.read(path)
    assert data is not None
    lines = ini.decode_ini_bytes(data).replace("\r\n", "\n").rstrip("\n").split("\n")
    lines = [line for line in lines if not line.startswith(f"{key}=")]
    lines.insert(lines.index("[Settings]") + 1, f"{key}={value}")
    ws.put(path, ini.encode_ini("\n".join(lines) + "\n"), ws.acl(path), owner=ws.owner(path))


# --- what the last run did, and only that ------------------------------------------------------


def test_a_rollback_after_the_first_push_removes_the_files_it_created(kit: Kit) -> None:
    ws = _ws(kit)
    first = kit.push("ws01")
    assert _statuses(first) == {"microsip": Status.CHANGED, "override": Status.CHANGED}
    pushed = ws.read(INI)
    assert ws.owner(INI) == ADMINISTRATORS  # the agent created it
    edit_in_place(ws, INI, "volumeOutput", "55")  # MicroSIP ran and saved its settings
    used = ws.read(INI)

    back = _rollback(kit)
    assert back.ok and back.status == Status.CHANGED, back.message
    assert _statuses(back) == {"microsip": Status.CHANGED, "override": Status.CHANGED}
    assert all(f.message.startswith("removed") for f in back.files), back.message
    assert not ws.exists(INI) and not ws.exists(OVERRIDE)
    # What was removed waits in the state (SYSTEM and Administrators only); no merge base.
    assert ws.read(ws.state_for(INI, "rolled-back")) == used
    assert ws.read(ws.state_for(INI, "applied")) is None
    # The next push creates them again, as the first one did.
    again = kit.push("ws01")
    assert _statuses(again) == {"microsip": Status.CHANGED, "override": Status.CHANGED}
    assert ws.read(INI) == pushed


def test_a_file_the_last_run_did_not_change_is_left_unchanged(kit: Kit) -> None:
    ws = _ws(kit)
    kit.push("ws01")
    override = ws.read(OVERRIDE)
    # The user changes an enforced key: the next push sets it back, in microsip.ini alone.
    edit_in_place(ws, INI, "updatesInterval", "daily")
    edited = ws.read(INI)
    second = kit.push("ws01")
    assert _statuses(second) == {"microsip": Status.CHANGED, "override": Status.UNCHANGED}

    back = _rollback(kit)
    assert back.ok and back.status == Status.CHANGED, back.message
    assert _statuses(back) == {"microsip": Status.CHANGED, "override": Status.UNCHANGED}
    assert ws.read(INI) == edited
    assert ws.read(OVERRIDE) == override


def test_each_rollback_undoes_the_run_before_the_last_one_undone(kit: Kit) -> None:
    ws = _ws(kit)
    kit.push("ws01")  # creates both files
    edit_in_place(ws, INI, "updatesInterval", "daily")
    edited = ws.read(INI)
    kit.push("ws01")  # changes microsip.ini only

    first = _rollback(kit)
    assert _statuses(first) == {"microsip": Status.CHANGED, "override": Status.UNCHANGED}
    assert ws.read(INI) == edited
    second = _rollback(kit)  # the first push, which created both
    assert _statuses(second) == {"microsip": Status.CHANGED, "override": Status.CHANGED}
    assert not ws.exists(INI) and not ws.exists(OVERRIDE)
    third = _rollback(kit)  # nothing the tool did is left to undo
    assert third.ok and third.status == Status.UNCHANGED, third.message
    assert all("nothing to undo" in f.message for f in third.files), third.message


def test_one_users_rollback_undoes_the_last_run_that_changed_their_file(tmp_path: Path) -> None:
    with lab_kit(tmp_path, workstations=1, users_per_ws=2) as kit:
        ws = _ws(kit)
        u2 = "C:\\Users\\u1x2\\AppData\\Roaming\\MicroSIP\\microsip.ini"
        kit.push("ws01")
        edit_in_place(ws, u2, "updatesInterval", "daily")
        kit.push("ws01")  # u1x2's file only
        pushed = ws.read(INI)
        back = push.rollback_host(
            kit.station("ws01"),
            kit.files("ws01"),
            kit.transport("ws01"),
            push.PushOptions(users=("u1x1",)),
        )
        # u1x1's file was last changed by the first push, which created it.
        assert [(f.user, f.status) for f in back.files] == [("u1x1", Status.CHANGED)]
        assert not ws.exists(INI) and ws.exists(u2) and ws.exists(OVERRIDE)
        assert pushed is not None


def test_rollback_from_the_shell_exits_0_when_the_last_run_is_undone(tmp_path: Path) -> None:
    with example_lab(tmp_path) as example:
        ws = example.machine("ber-ws-001")
        first = example.cli("push", "ber-ws-001", "--yes")
        assert first.returncode == 0, first.stdout + first.stderr
        files = {path for path in example.all_files() if path[0] == "ber-ws-001"}
        assert all(example.all_files()[path] is not None for path in files)
        runs = example.cli("runs", "list", "--json", keys=False, lab=False)
        [pushed] = json.loads(runs.stdout)
        back = example.cli("rollback", "ber-ws-001", "--yes")
        assert back.returncode == 0, back.stdout + back.stderr
        # Each file names the run undone: the push, as the controller recorded it.
        assert back.stdout.count(f"removed: run {pushed['id']} created it") == len(files)
        assert all(example.all_files()[path] is None for path in files)
        assert not ws.exists(ws.override_path())
        again = example.cli("rollback", "ber-ws-001", "--yes")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("nothing to undo") >= len(files), again.stdout


# --- what the controller takes from a rollback answer ------------------------------------------

PLANTED_RUN = "EVIL\x1b[2J\r\nrun"


def _plant_run(answer: dict[str, Any]) -> dict[str, Any]:
    if answer["op"] == "rollback":
        answer["run"] = PLANTED_RUN
    return answer


@pytest.mark.parametrize("run", [PLANTED_RUN, "a" * 65, "r\u0661n", ""])
def test_a_rollback_answer_naming_no_run_id_fails_the_host(kit: Kit, run: str) -> None:
    assert kit.push("ws01").ok

    def answer_filter(answer: dict[str, Any]) -> dict[str, Any]:
        if answer["op"] == "rollback":
            answer["run"] = run
        return answer

    _ws(kit).answer_filter = answer_filter
    result = _rollback(kit)
    assert result.status == Status.FAILED
    assert result.message == (
        "the agent's rollback answer breaks the protocol (docs/agent-protocol.md): run is not a "
        "run id (1 to 64 letters, digits, - or _)"
    )


def test_a_planted_run_reaches_neither_the_terminal_nor_the_records(tmp_path: Path) -> None:
    with example_lab(tmp_path) as example:
        first = example.cli("push", "ber-ws-001", "--yes")
        assert first.returncode == 0, first.stdout + first.stderr
        example.machine("ber-ws-001").answer_filter = _plant_run
        back = example.cli("rollback", "ber-ws-001", "--yes")
        assert back.returncode != 0, back.stdout + back.stderr
        assert "run is not a run id" in back.stdout + back.stderr
        assert "EVIL" not in back.stdout + back.stderr and "\x1b" not in back.stdout + back.stderr
        kept = [p for p in tmp_path.rglob("*") if p.is_file() and b"EVIL" in p.read_bytes()]
        assert kept == []
