"""``provisioner user show / regenerate / set-password`` from the shell, against the lab.

The lab emulating the example inventory runs in the test process, so the tests can read
every user's microsip.ini on the emulated disks and count which workstations were contacted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.inventory import resolve, yamldoc
from provisioner.microsip import ini
from provisioner.records import state
from provisioner.records.results import Status
from provisioner.render import build
from provisioner.rollout import connections
from provisioner.rollout.runner import RolloutOptions, executor, run_fleet
from tests.labkit import ExampleLab, example_lab

ALICE_TOKEN_POINTER = "/users/alice/accounts/main/password"
NEW_PASSWORD = "Helpdesk-New-Pw-4c2e8a"
HOTLINE_PASSWORD = "Hotline-New-Pw-9b1d7f"


@pytest.fixture
def example(tmp_path: Path) -> Iterator[ExampleLab]:
    with example_lab(tmp_path) as running:
        yield running


def push_all(example: ExampleLab) -> None:
    """Bring every workstation up to date in-process (the tests' starting point)."""
    result = build.build(example.inventory, opener_factory=lambda _: example.keyring)
    assert result.ok and result.inventory is not None
    files: dict[str, list[build.BuiltFile]] = {}
    for item in result.files:
        files.setdefault(item.target.workstation, []).append(item)
    stations = {name: resolve.resolve_station(result.inventory, name) for name in files}
    lab = example.lab.lab_map()
    run = run_fleet(
        sorted(stations),
        executor(
            stations, files, lambda plan: connections.open_transport(plan, example.keyring, lab)
        ),
        RolloutOptions(canary="0"),
    )
    assert {r.status for r in run.results.values()} == {Status.CHANGED}


def change_defaults(example: ExampleLab) -> None:
    """A settings change that reaches every user's microsip.ini."""
    path = example.inventory / "defaults.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("    EC: 1\n", "    EC: 0\n"))


def contacted(example: ExampleLab) -> set[str]:
    return {name for name, host in example.lab.hosts.items() if host.request_count}


def reset_counts(example: ExampleLab) -> None:
    for host in example.lab.hosts.values():
        host.reset_counts()


def sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def recorded(example: ExampleLab, data: bytes | None) -> str | None:
    """What the state folder's records hold for a file: its fingerprint, not its SHA-256."""
    return state.StateStore(example.state).fingerprints.of(sha(data))


def test_user_show_before_and_after_a_rollout(example: ExampleLab) -> None:
    never = example.cli("user", "show", "alice", keys=False, lab=False)
    assert never.returncode == 0, never.stderr
    assert "last push:    never" in never.stdout
    rollout = example.cli("rollout", "--yes", "--canary", "0", "--limit", "ws:ber-*")
    assert rollout.returncode == 0, rollout.stderr

    shown = example.cli("user", "show", "alice", keys=False, lab=False)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "alice (Alice Müller), Windows account ACME\\alice"
    assert "  groups:       sales" in lines
    assert "  workstations: ber-ws-001" in lines
    assert (
        "  account main (active): 1001@pbx.example.com  password (sealed, key k54bgbx6f)" in lines
    )
    assert "  account hotline: 1901@pbx.example.com  password (sealed, key k54bgbx6f)" in lines
    assert any(line.startswith("  last push:    ber-ws-001: changed") for line in lines)

    as_json = example.cli("user", "show", "alice", "--json", keys=False, lab=False)
    data = json.loads(as_json.stdout)
    assert data["user"] == "alice" and data["windows"] == "ACME\\alice"
    assert data["groups"] == ["sales"] and data["workstations"] == ["ber-ws-001"]
    assert [(a["id"], a["active"], a["sip"]) for a in data["accounts"]] == [
        ("main", True, "1001@pbx.example.com"),
        ("hotline", False, "1901@pbx.example.com"),
    ]
    assert {a["password"] for a in data["accounts"]} == {"(sealed, key k54bgbx6f)"}
    [last] = data["last_push"]
    assert (last["workstation"], last["user"], last["status"]) == ("ber-ws-001", "alice", "changed")
    assert last["new_sha256"] == recorded(example, example.ini("ber-ws-001", "alice"))
    # masked: neither the token nor the password is shown
    token = yamldoc.load_data(example.inventory / "users/berlin.yaml")["users"]["alice"]
    sealed = token["accounts"]["main"]["password"]
    plain = example.keyring.open(sealed, ALICE_TOKEN_POINTER).reveal()
    for output in (never, shown, as_json):
        assert sealed not in output.stdout and plain not in output.stdout


def test_regenerate_writes_only_that_users_file(example: ExampleLab) -> None:
    push_all(example)
    change_defaults(example)  # every user's file would change
    before = example.all_files()
    reset_counts(example)

    alice = example.cli("user", "regenerate", "alice", "--yes")
    assert alice.returncode == 0, (alice.stdout, alice.stderr)
    assert "-EC=1" in alice.stdout and "+EC=0" in alice.stdout  # the diff first
    after = example.all_files()
    assert [key for key in before if before[key] != after[key]] == [("ber-ws-001", "alice")]
    assert contacted(example) == {"ber-ws-001"}
    assert "EC=0" in ini.decode_ini_bytes(after[("ber-ws-001", "alice")] or b"")

    # on a shared desk, only judy's file: ivan's stays as it was, byte for byte
    reset_counts(example)
    judy = example.cli("user", "regenerate", "judy", "--yes")
    assert judy.returncode == 0, (judy.stdout, judy.stderr)
    final = example.all_files()
    assert [key for key in after if after[key] != final[key]] == [("ham-ws-002", "judy")]
    assert final[("ham-ws-002", "ivan")] == before[("ham-ws-002", "ivan")]
    assert contacted(example) == {"ham-ws-002"}

    # --check shows the diff and writes nothing
    check = example.cli("user", "regenerate", "ivan", "--check")
    assert check.returncode == 0, check.stderr
    assert "(dry run)" in check.stdout and "ham-ws-002: changed" in check.stdout
    assert example.all_files() == final

    log = state.AuditLog(example.state)
    [record] = log.query(user="alice")
    assert (record.action, record.workstation, record.status) == (
        "regenerate",
        "ber-ws-001",
        "changed",
    )
    assert record.sha256_before == recorded(example, before[("ber-ws-001", "alice")])
    assert record.sha256_after == recorded(example, after[("ber-ws-001", "alice")])
    assert record.file == example.ini_path("ber-ws-001", "alice")
    assert [r.action for r in log.query(user="judy")] == ["regenerate"]
    assert log.query(user="ivan") == []  # a check changes nothing and is not audited
    runs = state.StateStore(example.state).runs()
    assert [r.command for r in runs] == ["user regenerate judy", "user regenerate alice"]


def test_regenerate_reset_repairs_a_broken_file(example: ExampleLab) -> None:
    push_all(example)
    rendered = example.ini("ber-ws-001", "alice")
    assert rendered is not None
    ws = example.machine("ber-ws-001")
    path = example.ini_path("ber-ws-001", "alice")
    # saved by Notepad as UTF-8, the account section mangled
    broken = b"[Settings]\r\nEC=0\r\n[Account1]\r\nserver=\xc3\xa4wrong\r\n"
    ws.put(path, broken)

    repaired = example.cli("user", "regenerate", "alice", "--reset", "--yes")
    assert repaired.returncode == 0, (repaired.stdout, repaired.stderr)
    assert example.ini("ber-ws-001", "alice") == rendered  # the render, outright
    assert ws.read(ws.state_for(path, "backup.1")) == broken  # the old file is kept
    [record] = state.AuditLog(example.state).query(user="alice")
    assert (record.action, record.status) == ("reset", "changed")
    assert record.sha256_before == recorded(example, broken)
    assert record.sha256_after == recorded(example, rendered)


def test_set_password_seals_with_the_public_key_and_pushes_on_request(
    example: ExampleLab,
) -> None:
    berlin = example.inventory / "users/berlin.yaml"
    old_text = berlin.read_text(encoding="utf-8")
    reset_counts(example)

    # no identity anywhere: sealing needs the public key only
    assert not any(Path(example.env["XDG_CONFIG_HOME"]).iterdir())
    hotline = example.cli(
        "user",
        "set-password",
        "alice",
        "--account",
        "hotline",
        "--stdin",
        stdin=HOTLINE_PASSWORD + "\n",
        keys=False,
        lab=False,
    )
    assert hotline.returncode == 0, hotline.stderr
    assert "updated /users/alice/accounts/hotline/password in " in hotline.stdout
    assert "(key k54bgbx6f)" in hotline.stdout and "user regenerate alice" in hotline.stdout
    new_text = berlin.read_text(encoding="utf-8")
    changed = [
        (old, new)
        for old, new in zip(old_text.splitlines(), new_text.splitlines(), strict=True)
        if old != new
    ]
    assert len(changed) == 1  # the one token, patched in place
    assert changed[0][1].strip().startswith("password: sipvault:v1:k54bgbx6f:")
    token = changed[0][1].split("password:", 1)[1].strip()
    pointer = "/users/alice/accounts/hotline/password"
    assert example.keyring.open(token, pointer).reveal() == HOTLINE_PASSWORD
    assert contacted(example) == set()

    # --push without any identity: refused before the inventory is touched
    keyless = example.cli(
        "user", "set-password", "alice", "--stdin", "--push", stdin=NEW_PASSWORD, keys=False
    )
    assert keyless.returncode == 1
    assert "needs an identity for one of the keys k54bgbx6f" in keyless.stderr
    assert "Nothing was written" in keyless.stderr
    assert berlin.read_text(encoding="utf-8") == new_text and contacted(example) == set()

    # --push from a script without --yes: it could not ask, so nothing is written
    unasked = example.cli("user", "set-password", "alice", "--stdin", "--push", stdin=NEW_PASSWORD)
    assert unasked.returncode == 1 and "pass --yes as well; nothing was written" in unasked.stderr
    assert berlin.read_text(encoding="utf-8") == new_text and contacted(example) == set()

    # now the active account, pushed at once (this needs the identity)
    pushed = example.cli(
        "user", "set-password", "alice", "--stdin", "--push", "--yes", stdin=NEW_PASSWORD
    )
    assert pushed.returncode == 0, (pushed.stdout, pushed.stderr)
    assert f"updated {ALICE_TOKEN_POINTER} in " in pushed.stdout
    assert contacted(example) == {"ber-ws-001"}
    text = ini.decode_ini_bytes(example.ini("ber-ws-001", "alice") or b"")
    doc = ini.parse_ini(text)
    assert doc.get("Account1", "password") == NEW_PASSWORD
    assert doc.get("Account2", "password") == HOTLINE_PASSWORD

    wrong = example.cli(
        "user", "set-password", "alice", "--account", "nope", "--stdin", stdin="x", keys=False
    )
    assert wrong.returncode == 1
    assert "alice has no account 'nope' (accounts: main, hotline)" in wrong.stderr

    log = state.AuditLog(example.state)
    records = log.query(user="alice")
    assert [(r.action, r.status) for r in records] == [
        ("set-password", "changed"),
        ("set-password", "changed"),
        ("regenerate", "changed"),
    ]
    assert records[0].message == "sealed /users/alice/accounts/hotline/password to key k54bgbx6f"
    assert records[1].file == str(berlin) and records[1].workstation == ""
    assert records[2].workstation == "ber-ws-001"

    # the passwords never show: not in any output, not in the state folder
    for output in (hotline, pushed, wrong):
        for secret in (NEW_PASSWORD, HOTLINE_PASSWORD):
            assert secret not in output.stdout and secret not in output.stderr
    for item in example.state.rglob("*"):
        if item.is_file():
            data = item.read_bytes()
            for secret in (NEW_PASSWORD, HOTLINE_PASSWORD):
                assert secret.encode() not in data and secret.encode("utf-16-le") not in data
