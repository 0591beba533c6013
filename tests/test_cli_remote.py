"""push, diff, rollback and doctor from the shell against 'provisioner lab up --detach'."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.inventory.loader import load_inventory
from tests.labkit import copy_example, free_lab_addresses, run_cli


def _run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = run_cli(cwd, *args)
    if check:
        assert result.returncode == 0, (result.stdout, result.stderr)
    return result


@pytest.fixture
def example(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    inventory, identity, passphrase = copy_example(tmp_path)
    keys = ["--identity", str(identity), "--passphrase-file", str(passphrase)]
    # Addresses and a port nothing listens on, given as options.
    count = len(load_inventory(inventory).workstations)
    base, port = free_lab_addresses(count)
    where = ["--base-address", base, "--port", str(port)]
    _run("lab", "up", "-i", "inventory", "--detach", *where, *keys, cwd=tmp_path)
    lab_file = json.loads((inventory / ".lab.json").read_text())
    endpoints = lab_file["hosts"].values()
    first = ipaddress.IPv4Address(base)
    assert sorted(ipaddress.IPv4Address(e["address"]) for e in endpoints) == [
        first + n for n in range(count)
    ]
    assert {e["port"] for e in endpoints} == {port}
    pid, ca_path = lab_file["pid"], Path(lab_file["ca_path"])
    assert ca_path.is_file()
    try:
        yield tmp_path, [*keys, "--lab", "inventory/.lab.json", "-i", "inventory"]
    finally:
        _run("lab", "down", "-i", "inventory", cwd=tmp_path, check=False)
    # lab down returns once the process is gone, leaving neither its file nor its log.
    assert not (inventory / ".lab.json").exists()
    assert not (inventory / ".lab.log").exists()
    # Nor its emulated disks, which hold plaintext passwords.
    [lab_folder] = [p for p in ca_path.parents if p.name.startswith("microsip-lab-")]
    assert not lab_folder.exists()
    try:  # gone, or exited and waiting to be reaped by init
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")


def test_push_diff_doctor_rollback_from_the_shell(example: tuple[Path, list[str]]) -> None:
    cwd, args = example
    diff = _run("diff", "ber-ws-001", *args, cwd=cwd)
    assert "dry run: nothing written" in diff.stdout and "+accountId=1" in diff.stdout
    assert "password=********" in diff.stdout
    first = _run("push", "ber-ws-001", "--yes", *args, cwd=cwd)
    assert "ber-ws-001: changed" in first.stdout
    again = _run("push", "ber-ws-001", *args, "--check", cwd=cwd)
    assert "unchanged" in again.stdout
    doctor = _run("doctor", "ber-ws-001", *args, cwd=cwd)
    assert "check(s) passed, 0 failed" in doctor.stdout
    # Without any key: the network checks still run; no SIP password is needed at all.
    keyless = _run(
        "doctor", "ber-ws-001", "--lab", "inventory/.lab.json", "-i", "inventory", cwd=cwd
    )
    assert "skip auth and the remote checks: the WinRM password cannot be opened" in keyless.stdout
    assert keyless.stdout.count("ok  ") >= 2 and "FAIL" not in keyless.stdout
    reset = _run("push", "ber-ws-001", "--yes", *args, "--reset", "--user", "alice", cwd=cwd)
    assert "changed" in reset.stdout
    back = _run("rollback", "ber-ws-001", "--yes", *args, "--user", "alice", cwd=cwd)
    assert "restored the newest backup" in back.stdout
    busy = _run("push", "nonexistent", "--yes", *args, cwd=cwd, check=False)
    assert busy.returncode == 1 and "no workstation 'nonexistent'" in busy.stderr
    # Every push and rollback that wrote is a run in the state, with audit records; the
    # --check push is not.
    state = ["-i", "inventory"]  # the default state folder, the example realm's
    runs = _run("runs", "list", "--json", *state, cwd=cwd).stdout
    commands = [run["command"] for run in json.loads(runs)]
    assert commands == [
        "rollback ber-ws-001",
        "push ber-ws-001",
        "push ber-ws-001",
    ], runs
    audit = _run("audit", "-w", "ber-ws-001", "--json", *state, cwd=cwd).stdout
    records = json.loads(audit)
    assert [r["action"] for r in records] == ["push", "push", "reset", "reset", "rollback"]
