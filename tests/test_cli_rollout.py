"""``rollout``, ``runs`` and ``audit`` from the shell, against the lab emulating the example.

The first test drives a lab started with ``provisioner lab up --detach``, as an admin would.
The others start the lab in the test process (ephemeral ports) and hand it to the CLI with
``--lab FILE``, so that faults can be injected and the emulated disks read.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.cli import fill_optional_values
from provisioner.cli.rollout import shown_selection
from provisioner.errors import OptionError
from provisioner.inventory import resolve
from provisioner.lab import Faults
from provisioner.microsip import ini
from provisioner.records import state
from provisioner.records.results import Status
from provisioner.render import build
from provisioner.rollout import runner
from provisioner.rollout.engine import uninterrupted
from provisioner.secrets import vault
from tests.labkit import (
    ExampleLab,
    clean_env,
    copy_example,
    default_state,
    example_lab,
    free_lab_addresses,
    run_cli,
)

HOSTS = [
    "ber-rds-01",
    "ber-ws-001",
    "ber-ws-002",
    "ber-ws-003",
    "ber-ws-004",
    "ham-kiosk-01",
    "ham-ws-001",
    "ham-ws-002",
    "ham-ws-003",
]
USERS = 12  # user profiles over the nine workstations


def cli(
    cwd: Path, env: dict[str, str], *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return run_cli(cwd, *args, env=env, stdin=stdin)


# The headers of the tables of `runs list` and `audit`.
RUN_HEADER = "run  started  by  command  inventory  workstations  ended"
AUDIT_HEADER = (
    "time  by  action  workstation  user  status  fingerprint before -> after  run  file  message"
)


def host_lines(stdout: str) -> dict[str, str]:
    """``[n/9] host: status ...`` lines (plain output: not a terminal) by host."""
    found = re.findall(r"^\[\d+/\d+\] (\S+): (\w+)", stdout, flags=re.MULTILINE)
    return dict(found)


def junit_root(path: Path) -> ET.Element:
    return ET.fromstring(path.read_text(encoding="utf-8"))  # noqa: S314 - our own report


def change_defaults(inventory: Path) -> None:
    """A settings change that reaches every user's microsip.ini."""
    path = inventory / "defaults.yaml"
    text = path.read_text(encoding="utf-8")
    assert "    EC: 1\n" in text
    path.write_text(text.replace("    EC: 1\n", "    EC: 0\n"), encoding="utf-8")


# --------------------------------------------------------------------------- a detached lab


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], list[str]]]:
    inventory, identity, passphrase = copy_example(tmp_path)
    env = clean_env(tmp_path)
    keys = ["--identity", str(identity), "--passphrase-file", str(passphrase)]
    # Addresses and a port nothing listens on, given as the environment variables.
    base, port = free_lab_addresses(len(HOSTS))
    up_env = {**env, "PROVISIONER_LAB_BASE_ADDRESS": base, "PROVISIONER_LAB_PORT": str(port)}
    up = cli(tmp_path, up_env, "lab", "up", "-i", "inventory", "--detach", *keys)
    assert up.returncode == 0, (up.stdout, up.stderr)
    assert f"http://{base}:{port}/wsman" in up.stdout
    try:
        yield tmp_path, env, [*keys, "--lab", "inventory/.lab.json", "-i", "inventory"]
    finally:
        cli(tmp_path, env, "lab", "down", "-i", "inventory")
    assert not (inventory / ".lab.json").exists()


def test_rollout_runs_and_audit_against_a_detached_lab(
    detached: tuple[Path, dict[str, str], list[str]],
) -> None:
    cwd, env, args = detached
    report_json, report_junit = cwd / "out/run.json", cwd / "out/run.xml"

    # ---- first rollout: canary then batches of half the fleet, plain lines, run files
    first = cli(
        cwd,
        env,
        "rollout",
        "--yes",
        "--canary",
        "1",
        "--batch",
        "50%",
        "--report-json",
        str(report_json),
        "--report-junit",
        str(report_junit),
        *args,
    )
    assert first.returncode == 0, (first.stdout, first.stderr)
    out = first.stdout
    assert f"9 workstation(s), {USERS} user profile(s) selected" in out
    assert "-- canary batch: 1 workstation(s)" in out
    assert "-- batch 2: 5 workstation(s)" in out and "-- batch 3: 3 workstation(s)" in out
    assert out.index("-- canary batch") < out.index("ber-rds-01: changed") < out.index("-- batch 2")
    assert host_lines(out) == dict.fromkeys(HOSTS, "changed")
    assert "need attention" not in out
    data = json.loads(report_json.read_text(encoding="utf-8"))
    assert data["exit_code"] == 0 and data["ok"] is True and data["dry_run"] is False
    assert data["counts"]["changed"] == 9 and data["retry"] == [] and data["stopped"] == ""
    assert data["options"]["canary"] == "1" and data["options"]["batch"] == "50%"
    batches = {h["workstation"]: h["batch"] for h in data["hosts"]}
    assert batches["ber-rds-01"] == 1
    assert sorted(batches.values()) == [1, 2, 2, 2, 2, 2, 3, 3, 3]
    files = [f for h in data["hosts"] for f in h["files"]]
    assert len(files) == USERS + 9  # every microsip.ini and every override.ini
    assert all(f["status"] == "changed" and len(f["new_sha256"]) == 32 for f in files)
    suite = junit_root(report_junit)
    assert suite.tag == "testsuites"
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("21", "0", "0")
    cases = suite.findall(".//testcase")
    assert {c.get("classname") for c in cases} == set(HOSTS)
    assert {c.get("name") for c in cases if c.get("classname") == "ham-ws-002"} == {
        "ivan/microsip.ini",
        "judy/microsip.ini",
        "override.ini",
    }
    run_id = data["run_id"]

    # ---- the same again: nothing to do
    second = cli(cwd, env, "rollout", "--yes", "--quiet", *args)
    assert second.returncode == 0, second.stderr
    assert host_lines(second.stdout) == dict.fromkeys(HOSTS, "unchanged")

    # ---- --check on a changed inventory reports, writes and records nothing
    change_defaults(cwd / "inventory")
    check = cli(cwd, env, "rollout", "--check", "--report-json", str(cwd / "check.json"), *args)
    assert check.returncode == 0, check.stderr
    assert "(dry run)" in check.stdout
    assert host_lines(check.stdout) == dict.fromkeys(HOSTS, "changed")
    checked = json.loads((cwd / "check.json").read_text(encoding="utf-8"))
    assert checked["dry_run"] is True and checked["counts"]["changed"] == 9
    third = cli(cwd, env, "rollout", "--yes", "--canary", "0", *args)
    assert third.returncode == 0, third.stderr
    assert host_lines(third.stdout) == dict.fromkeys(HOSTS, "changed")  # check wrote nothing

    # ---- runs list / show, text and JSON
    listed = cli(cwd, env, "runs", "list", "-i", "inventory")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split() == RUN_HEADER.split()
    assert len(lines) == 3  # the check run is not recorded
    assert lines[2].startswith(run_id) and "9 changed" in lines[2]
    assert "9 unchanged" in lines[1] and "9 changed" in lines[0]
    as_json = json.loads(cli(cwd, env, "runs", "list", "-i", "inventory", "--json").stdout)
    assert [r["id"] for r in as_json][2] == run_id
    assert as_json[2]["counts"]["changed"] == 9 and as_json[2]["dry_run"] is False
    assert as_json[2]["command"] == "rollout" and as_json[2]["total"] == 9
    shown = cli(cwd, env, "runs", "show", run_id[:5], "-i", "inventory")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(run_id)
    assert all(f"{h}  changed" in shown.stdout for h in HOSTS)
    assert "alice/microsip.ini  changed  - -> " in shown.stdout
    detail = json.loads(
        cli(cwd, env, "runs", "show", run_id[:5], "-i", "inventory", "--json").stdout
    )
    assert detail["summary"]["id"] == run_id and detail["to_retry"] == []
    assert sorted(r["workstation"] for r in detail["results"]) == HOSTS
    by_host = {r["workstation"]: r for r in detail["results"]}
    stored = {f["path"]: f["new_sha256"] for r in detail["results"] for f in r["files"]}
    reported = {f["path"]: f["new_sha256"] for h in data["hosts"] for f in h["files"] if f["user"]}
    assert all(stored[p] == digest for p, digest in reported.items())
    assert [f["user"] for f in by_host["ber-rds-01"]["files"] if f["user"]] == [
        "carol",
        "dave",
        "erin",
    ]

    # ---- audit: one record per changed file, queried by user, workstation and date
    inv = ["-i", "inventory"]
    audit = cli(cwd, env, "audit", "--user", "alice", "-i", "inventory")
    assert audit.returncode == 0, audit.stderr
    header, *rows = audit.stdout.splitlines()
    assert header.split() == AUDIT_HEADER.split()
    records = [r.split() for r in rows if r.split()[4:6] == ["ber-ws-001", "alice"]]
    assert len(records) == 2 and all(r[3] == "push" and r[6] == "changed" for r in records)
    assert audit.stdout.rstrip().endswith("2 record(s)")
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    audited = json.loads(
        cli(
            cwd, env, "audit", "-u", "alice", "-w", "ber-ws-001", "--since", since, "--json", *inv
        ).stdout
    )
    assert audited[0]["run_id"] == run_id
    assert {(r["action"], r["workstation"], r["user"], r["status"]) for r in audited} == {
        ("push", "ber-ws-001", "alice", "changed")
    }
    assert audited[1]["sha256_before"] == audited[0]["sha256_after"]
    assert audited[0]["sha256_after"] == stored[audited[0]["file"]]

    # ---- no confirmation without a terminal and without --yes
    refused = cli(cwd, env, "rollout", *args)
    assert refused.returncode == 1
    assert "error: not a terminal: pass --yes to confirm, or --check to look" in refused.stderr

    # ---- a second rollout on the same state is refused with the holder's details
    store = state.StateStore(default_state(cwd))
    with store.lock("held by the test: rollout") as held:
        locked = cli(cwd, env, "rollout", "--yes", *args)
    assert locked.returncode == 1
    assert "another rollout is using the state" in locked.stderr
    assert "'held by the test: rollout'" in locked.stderr and f"pid {held.pid}" in locked.stderr
    assert "selected" not in locked.stdout  # refused before Phase 1, not after it
    assert len(cli(cwd, env, "runs", "list", "-i", "inventory").stdout.splitlines()) == 1 + 3


# --------------------------------------------------------------------------- an in-process lab


@pytest.fixture
def example(tmp_path: Path) -> Iterator[ExampleLab]:
    with example_lab(tmp_path) as running:
        yield running


def test_failures_exit_3_then_only_failed_converges(example: ExampleLab) -> None:
    hosts = example.lab.hosts
    hosts["ber-ws-002"].set_faults(Faults(refuse=True))
    hosts["ber-ws-003"].set_faults(Faults(http_401=True))
    alice_ws = example.machine("ber-ws-001")
    alice = alice_ws.lookup_account("ACME\\alice")
    assert alice is not None
    alice_ws.start_microsip(alice)
    report = example.root / "run.json"
    junit = example.root / "run.xml"

    # batches: [ber-rds-01] [ber-ws-001 .. ham-kiosk-01] [ham-ws-001 .. ham-ws-003]
    run = example.cli(
        "rollout",
        "--yes",
        "--canary",
        "1",
        "--batch",
        "50%",
        "--retries",
        "1",
        "--report-json",
        str(report),
        "--report-junit",
        str(junit),
    )
    assert run.returncode == 3, (run.stdout, run.stderr)
    out = run.stdout
    assert "6 workstation(s) need attention:" in out
    assert "  ber-ws-002: failed - cannot connect" in out
    assert "(after 2 attempts)" in out
    assert "  ber-ws-003: failed - the credentials were rejected (ntlm as svc-microsip)" in out
    assert "  ber-ws-001: busy - 1 changed, 1 busy (alice/microsip.ini: MicroSIP is running" in out
    reason = "failure threshold exceeded after batch 2: 2 of 6 failed (more than 10%)"
    assert f"stopped: {reason}" in out
    for host in ("ham-ws-001", "ham-ws-002", "ham-ws-003"):
        assert f"  {host}: skipped - {reason}" in out
    data = json.loads(report.read_text(encoding="utf-8"))
    retry = ["ber-ws-001", "ber-ws-002", "ber-ws-003", "ham-ws-001", "ham-ws-002", "ham-ws-003"]
    assert data["exit_code"] == 3 and data["retry"] == retry and data["stopped"] == reason
    attempts = {h["workstation"]: h["attempts"] for h in data["hosts"]}
    assert attempts["ber-ws-002"] == 2 and attempts["ber-ws-003"] == 1
    assert attempts["ham-ws-001"] == 0
    suite = junit_root(junit)
    failures = {
        str(c.get("classname")): str(c.find("failure").get("message"))  # type: ignore[union-attr]
        for c in suite.iter("testcase")
        if c.find("failure") is not None
    }
    assert sorted(failures) == ["ber-ws-002", "ber-ws-003"]
    assert failures["ber-ws-003"].startswith("the credentials were rejected")
    skipped = [
        (c.get("classname"), c.get("name"))
        for c in suite.iter("testcase")
        if c.find("skipped") is not None
    ]
    assert ("ber-ws-001", "alice/microsip.ini") in skipped
    assert ("ham-ws-003", "connection") in skipped
    assert example.ini("ber-ws-001", "alice") is None  # busy: nothing written
    assert example.ini("ham-ws-001", "frank") is None  # skipped: never contacted

    # ---- the faults go away; --only-failed retries exactly the hosts of that run
    for lab_host in hosts.values():
        lab_host.clear_faults()
        lab_host.reset_counts()
    alice_ws.stop(alice_ws.processes)
    failed_run = state.StateStore(example.state).runs()[0].id
    again = example.cli("rollout", "--yes", "--only-failed", "--report-json", str(report))
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert f"of run {failed_run} that did not succeed" in again.stdout
    data = json.loads(report.read_text(encoding="utf-8"))
    assert sorted(h["workstation"] for h in data["hosts"]) == retry
    assert {h["status"] for h in data["hosts"]} == {"changed"}
    assert {name for name, host in hosts.items() if host.request_count} == set(retry)
    assert all(data is not None for data in example.all_files().values())
    nothing = example.cli("rollout", "--yes", "--only-failed")
    assert nothing.returncode == 0
    retry_run = state.StateStore(example.state).runs()[0].id
    assert f"nothing to retry: every workstation of run {retry_run} succeeded" in nothing.stdout
    # an older run can still be named
    first_id = state.StateStore(example.state).runs()[-1].id
    named = example.cli("rollout", "--yes", "--only-failed", first_id[:6], "--check")
    assert named.returncode == 0, named.stderr
    assert set(host_lines(named.stdout)) == set(retry)
    assert set(host_lines(named.stdout).values()) == {"unchanged"}


def _start_cli(example: ExampleLab, *args: str) -> subprocess.Popen[str]:
    """The real CLI started from the shell with the example's inventory, keys and lab."""
    command = [sys.executable, "-m", "provisioner.cli", *args, "-i", str(example.inventory)]
    command += [*example.keys, "--lab", str(example.lab_file)]
    return subprocess.Popen(
        command,
        cwd=example.root,
        env=example.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_finishes_the_host_in_flight_and_records_the_run(example: ExampleLab) -> None:
    for host in example.lab.hosts.values():
        host.set_faults(Faults(slow=0.1))
    process = _start_cli(example, "rollout", "--yes", "--canary", "0", "--forks", "1")
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("[1/9]"):
                process.send_signal(signal.SIGINT)
                break
        rest, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    out = "".join(lines) + rest
    assert process.returncode == 3, (out, err)
    assert "interrupt: finishing the workstations in flight, starting no new one" in err
    assert "Traceback" not in err
    done = host_lines(out)
    changed = [h for h, s in done.items() if s == "changed"]
    assert 1 <= len(changed) <= 2 and changed == HOSTS[: len(changed)]
    assert "stopped: interrupted: no new workstation was started" in out
    assert "-- batch 1: 9 workstation(s)" in out and "canary batch" not in out  # --canary 0
    assert sum(1 for s in done.values() if s == "skipped") == 9 - len(changed)
    runs = state.StateStore(example.state).runs()
    assert len(runs) == 1 and runs[0].stopped == "interrupted: no new workstation was started"
    assert runs[0].counts[Status.SKIPPED] == 9 - len(changed)
    retry = state.StateStore(example.state).hosts_to_retry()
    assert retry == HOSTS[len(changed) :]
    files = example.all_files()
    for name in HOSTS[len(changed) :]:
        assert all(data is None for (ws, _), data in files.items() if ws == name)


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_run_records_the_inventory_commit(example: ExampleLab) -> None:
    # The repository holds the inventory, not the HOME where the state is kept by default.
    _git(example.inventory, "init", "-q")
    _git(example.inventory, "add", ".")
    _git(example.inventory, "commit", "-q", "-m", "inventory")
    commit = _git(example.inventory, "rev-parse", "HEAD")
    report = example.root / "run.json"
    run = example.cli("rollout", "--yes", "--report-json", str(report))
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert "differs from its last commit" not in run.stdout
    assert json.loads(report.read_text(encoding="utf-8"))["revision"] == commit
    listed = example.cli("runs", "list", keys=False, lab=False)
    assert re.search(f"  rollout +{commit[:12]}  ", listed.stdout), listed.stdout
    change_defaults(example.inventory)  # not committed
    again = example.cli("rollout", "--yes", "--limit", "ber-ws-001")
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert f"note: recorded as {commit[:12]}+dirty: the inventory differs" in again.stdout
    check = example.cli("rollout", "--check", "--limit", "ber-ws-001")
    assert "recorded as" not in check.stdout  # a check is not recorded
    pushed = example.cli("push", "ber-ws-002", "--yes")
    assert pushed.returncode == 0, (pushed.stdout, pushed.stderr)
    newest, second, _ = state.StateStore(example.state).runs()
    assert newest.revision == second.revision == commit + "+dirty"


def _push_interrupted(example: ExampleLab, signals: int) -> tuple[int, str, str]:
    """``push ber-ws-001`` on a slow host, sent ``signals`` Ctrl-C once it is being written."""
    host = example.lab.hosts["ber-ws-001"]
    host.set_faults(Faults(slow=0.3))
    host.reset_counts()
    process = _start_cli(example, "push", "ber-ws-001", "--yes")
    try:
        deadline = time.monotonic() + 60
        while host.request_count < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(signals):
            process.send_signal(signal.SIGINT)
            time.sleep(0.2)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out, err


def test_ctrl_c_during_a_push_lets_it_finish_and_records_it(example: ExampleLab) -> None:
    code, out, err = _push_interrupted(example, signals=1)
    assert code == 0, (out, err)
    assert "interrupt: finishing the workstations in flight" in err and "Traceback" not in err
    [run] = state.StateStore(example.state).runs()
    assert run.stopped == "interrupted: no new workstation was started"
    assert run.counts[Status.CHANGED] == 1
    assert example.ini("ber-ws-001", "alice") is not None
    audit = example.cli("audit", "--json", keys=False, lab=False)
    assert {r["workstation"] for r in json.loads(audit.stdout)} == {"ber-ws-001"}


def test_a_second_ctrl_c_abandons_the_push_and_records_that(example: ExampleLab) -> None:
    code, out, err = _push_interrupted(example, signals=2)
    assert code == 3, (out, err)
    assert "Traceback" not in err
    assert "interrupted while the workstation was being written" in out
    [run] = state.StateStore(example.state).runs()
    assert run.stopped.startswith("interrupted: aborted") and run.counts[Status.FAILED] == 1
    [record] = json.loads(example.cli("audit", "--json", keys=False, lab=False).stdout)
    assert (record["run_id"], record["status"]) == (run.id, "failed")


# --------------------------------------------------------------------------- a canary password


CANARY = "Canary-Pw-7f3a9c1e5b"


def _leaks(data: bytes) -> bool:
    encodings = (CANARY.encode("utf-8"), CANARY.encode("utf-16-le"))
    return any(form in data for form in encodings)


def test_a_canary_password_never_leaks_from_a_rollout(example: ExampleLab) -> None:
    outputs = [example.cli("rollout", "--yes", "--limit", "ws:ber-ws-002")]
    assert outputs[-1].returncode == 0, outputs[-1].stdout
    # the helpdesk rotates bob's password: the canary
    outputs.append(example.cli("user", "set-password", "bob", "--stdin", stdin=CANARY + "\n"))
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    # one host fails, so that error paths are printed and recorded too
    example.lab.hosts["ham-ws-003"].set_faults(Faults(http_401=True))
    report, junit = example.root / "r.json", example.root / "r.xml"
    outputs.append(
        example.cli(
            "rollout",
            "--yes",
            "--diff",
            "--max-fail",
            "100%",
            "--report-json",
            str(report),
            "--report-junit",
            str(junit),
        )
    )
    assert outputs[-1].returncode == 3, outputs[-1].stdout
    assert "[Account1] password: changed" in outputs[-1].stdout  # the diff names it, masked
    assert json.loads(report.read_text(encoding="utf-8"))["counts"]["changed"] == 8
    example.lab.hosts["ham-ws-003"].clear_faults()
    outputs.append(example.cli("user", "regenerate", "bob", "--yes", "--reset"))
    assert outputs[-1].returncode == 0, outputs[-1].stderr

    # the canary did reach bob's workstation: the test can see it if it leaks
    bob_ini = example.ini("ber-ws-002", "bob")
    assert bob_ini is not None
    assert f"password={CANARY}" in ini.decode_ini_bytes(bob_ini)
    for output in outputs:
        assert CANARY not in output.stdout and CANARY not in output.stderr, output.args
    for path in (report, junit):
        assert not _leaks(path.read_bytes()), path
    state_files = [p for p in example.state.rglob("*") if p.is_file()]
    assert {p.name for p in state_files} >= {"state.sqlite3", "audit.jsonl"}
    for path in state_files:
        assert not _leaks(path.read_bytes()), path
    for path in example.inventory.rglob("*"):
        if path.is_file():
            assert not _leaks(path.read_bytes()), path
    # the applied copy kept on the workstation for the next merge has no password either
    bob_ws = example.machine("ber-ws-002")
    applied = bob_ws.read(bob_ws.state_for(example.ini_path("ber-ws-002", "bob"), "applied"))
    assert applied is not None and not _leaks(applied)


def test_the_canary_can_be_named(example: ExampleLab) -> None:
    for host in example.lab.hosts.values():
        host.reset_counts()
    nothing = example.cli("rollout", "--yes", "--canary-hosts", "ws:nowhere-*")
    assert nothing.returncode == 1
    assert "--canary-hosts 'ws:nowhere-*' matches none of the selected workstations" in (
        nothing.stderr
    )
    empty = example.cli("rollout", "--yes", "--canary-hosts", " , ")
    assert empty.returncode == 1 and "--canary-hosts ' , ' names no workstation" in empty.stderr
    assert all(host.request_count == 0 for host in example.lab.hosts.values())
    run = example.cli("rollout", "--yes", "--canary-hosts", "ham-ws-002,ber-ws-003,ber-ws-0009")
    assert run.returncode == 0, (run.stdout, run.stderr)
    out = run.stdout
    assert "batches: canary ber-ws-003, ham-ws-002, then 100%" in out
    assert "warning: --canary-hosts term 'ber-ws-0009' matches nothing; did you mean" in out
    assert "-- canary batch: 2 workstation(s)" in out
    first = list(host_lines(out))
    assert sorted(first[:2]) == ["ber-ws-003", "ham-ws-002"] and len(first) == 9
    assert out.index("-- batch 2") > out.index("ham-ws-002: changed")
    [recorded] = state.StateStore(example.state).runs()
    assert recorded.options["canary_hosts"] == ["ber-ws-003", "ham-ws-002"]


def test_check_with_detailed_exitcode_tells_drift_from_failure(example: ExampleLab) -> None:
    # Nothing pushed yet: every workstation would change.
    assert example.cli("rollout", "--check", "--detailed-exitcode").returncode == 4
    assert example.cli("rollout", "--yes").returncode == 0
    in_sync = example.cli("rollout", "--check", "--detailed-exitcode")
    assert in_sync.returncode == 0, (in_sync.stdout, in_sync.stderr)
    # Alice's own change to a key that is not enforced is kept by a push: not drift.
    ws, path = example.machine("ber-ws-001"), example.ini_path("ber-ws-001", "alice")
    text = ini.decode_ini_bytes(ws.read(path) or b"")
    assert "\r\nEC=1\r\n" in text
    ws.put(path, ini.encode_ini(text.replace("\r\nEC=1\r\n", "\r\nEC=0\r\n")))
    kept = example.cli("rollout", "--check", "--detailed-exitcode", "--limit", "ber-ws-001")
    assert kept.returncode == 0, (kept.stdout, kept.stderr)
    # An enforced key changed on the workstation is drift.
    ws.put(path, ini.encode_ini(text.replace("updatesInterval=never", "updatesInterval=daily")))
    enforced = example.cli("rollout", "--check", "--detailed-exitcode", "--limit", "ber-ws-001")
    assert enforced.returncode == 4, (enforced.stdout, enforced.stderr)
    ws.put(path, ini.encode_ini(text))
    change_defaults(example.inventory)
    drift = example.cli("rollout", "--check", "--detailed-exitcode", "--limit", "ber-ws-001")
    assert drift.returncode == 4, (drift.stdout, drift.stderr)
    assert host_lines(drift.stdout) == {"ber-ws-001": "changed"}
    # Without the flag a check that finds drift succeeds, as before.
    assert example.cli("rollout", "--check", "--limit", "ber-ws-001").returncode == 0
    # A workstation that cannot be checked outranks drift.
    example.lab.hosts["ber-ws-002"].set_faults(Faults(refuse=True))
    failed = example.cli("rollout", "--check", "--detailed-exitcode", "--retries", "0")
    assert failed.returncode == 3, (failed.stdout, failed.stderr)
    refused = example.cli("rollout", "--yes", "--detailed-exitcode")
    assert refused.returncode == 1
    assert "--detailed-exitcode reports drift and needs --check" in refused.stderr
    assert len(state.StateStore(example.state).runs()) == 1  # the push; checks are not runs


def test_bad_input_exits_1_before_any_connection(example: ExampleLab) -> None:
    for host in example.lab.hosts.values():
        host.reset_counts()
    cases: list[tuple[tuple[str, ...], str]] = [
        (("--canary", "ten"), "error: 'ten' is not a size: use a count like 5 or a share like 10%"),
        (("--batch", "0"), "error: '0' is not a size"),
        (("--max-fail", "-5%"), "error: --max-fail is a percentage such as 10%"),
        (("--canary-hosts", " "), "error: --canary-hosts ' ' names no workstation"),
    ]
    for extra, message in cases:
        result = example.cli("rollout", "--yes", *extra)
        assert result.returncode == 1, (extra, result.stdout, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
        assert "selected" not in result.stdout  # refused before Phase 1
    assert all(host.request_count == 0 for host in example.lab.hosts.values())
    assert not example.state.exists()


def test_checks_and_diffs_create_no_state_folder(example: ExampleLab) -> None:
    for command in (
        ("rollout", "--check"),
        ("rollout", "--check", "--diff", "--limit", "ber-ws-001"),
        ("rollout", "--yes", "--only-failed"),
        ("push", "ber-ws-001", "--check"),
        ("diff", "ber-ws-001"),
    ):
        done = example.cli(*command)
        assert "Traceback" not in done.stderr, (command, done.stderr)
        assert not example.state.exists(), command
    assert not example.state.parent.exists()


def test_a_signal_while_a_run_is_recorded_is_delivered_when_the_record_is_written() -> None:
    # Ctrl-C during a journal write was ignored: thrown away, not merely put off.
    seen: list[str] = []

    def prior(signum: int, frame: object) -> None:
        seen.append(signal.Signals(signum).name)

    saved = {number: signal.signal(number, prior) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with uninterrupted():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            seen.append("written")
        assert seen == ["written", "SIGINT", "SIGTERM", "SIGINT"]
        assert all(signal.getsignal(number) is prior for number in saved)
        seen.clear()
        with pytest.raises(ValueError), uninterrupted():  # a failed write: delivered too
            signal.raise_signal(signal.SIGINT)
            raise ValueError
        assert seen == ["SIGINT"]
        # Elsewhere than the main thread nothing is held (no handler can be set there).
        done: list[bool] = []

        def in_a_thread() -> None:
            with uninterrupted():
                done.append(True)

        worker = threading.Thread(target=in_a_thread)
        worker.start()
        worker.join()
        assert done == [True]
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_only_failed_takes_an_optional_run() -> None:
    def filled(*argv: str) -> list[str]:
        return fill_optional_values(list(argv))

    assert filled("rollout", "--only-failed") == ["rollout", "--only-failed", "last"]
    assert filled("rollout", "--only-failed", "--yes") == [
        "rollout",
        "--only-failed",
        "last",
        "--yes",
    ]
    assert filled("rollout", "--only-failed", "9f70d0", "-y") == [
        "rollout",
        "--only-failed",
        "9f70d0",
        "-y",
    ]
    assert filled("rollout", "--", "--only-failed") == ["rollout", "--", "--only-failed"]
    assert filled("audit", "--user", "alice") == ["audit", "--user", "alice"]


def test_an_empty_selection_repeats_the_limit_given(tmp_path: Path) -> None:
    copy_example(tmp_path)
    env = clean_env(tmp_path)
    result = cli(tmp_path, env, "rollout", "-i", "inventory", "--yes", "--limit", "ber-ws-9*")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr == "error: no workstation matches the selection --limit 'ber-ws-9*'\n"
    assert not default_state(tmp_path).exists()


def test_the_selection_is_shown_as_typed() -> None:
    assert shown_selection("ber-ws-9*") == "--limit 'ber-ws-9*'"
    assert shown_selection("group:sales,!bob") == "--limit 'group:sales,!bob'"
    assert shown_selection("alice") == "--limit alice"
    assert shown_selection("", "last") == "--only-failed"
    assert shown_selection("ham-*", "9f70d0") == "--only-failed 9f70d0 --limit 'ham-*'"
    assert shown_selection("") == "(the whole inventory)"


ROLLOUT_DOC = Path(__file__).resolve().parent.parent / "docs" / "rollout.md"


def test_the_documented_sizes_are_what_the_code_does() -> None:
    doc = " ".join(ROLLOUT_DOC.read_text(encoding="utf-8").split())
    hosts = [f"ws{n}" for n in range(10)]
    for bad in ("0", "0%", "-1", "2.5", "150%", "ten"):
        with pytest.raises(OptionError, match="is not a size"):
            runner.plan_batches(hosts, "1", bad)
    assert "`--batch 0`, `--batch 0%`, negative numbers, fractions (`2.5`), `150%`" in doc
    for none in ("0", "0%", "00", "0.0%"):
        assert runner.plan_batches(hosts, none, "3") == runner.plan_batches(hosts, "3", "3")
        assert not runner.has_canary(none)
    assert "`--canary 0` means **no canary**, and so do `0%`, `00` and `0.0%`" in doc
    with pytest.raises(OptionError, match="is not a size"):
        runner.plan_batches(hosts, "-1", "3")
    assert [len(b) for b in runner.plan_batches(hosts, "1", "1%")] == [1] * 10
    assert "`--batch 1%` of 10 workstations is batches of 1" in doc
    assert [len(b) for b in runner.plan_batches(hosts, "50", "100%")] == [10]
    assert "a number above the selection means all of it" in doc


# --------------------------------------------------------------------------- what records give away

GUESSES = ["123456", "Password1", "Welcome2024!", "Summer2024!", "letmein", "Bob-1002"]


def _recorded_values(example: ExampleLab, *paths: Path) -> set[str]:
    """Every hex string of 32 characters or more in the reports, the audit log and the state."""
    found: set[str] = set()
    files = [*paths, *(p for p in example.state.rglob("*") if p.is_file())]
    for path in files:
        if path.name == "fingerprint.key":
            continue
        text = path.read_bytes().decode("latin-1")
        found.update(re.findall(r"[0-9a-f]{32,64}", text))
    return found


def test_records_do_not_let_a_reader_test_password_guesses(example: ExampleLab) -> None:
    # The helpdesk sets bob's password (a weak one); an admin rolls it out with reports.
    chosen = "Summer2024!"
    done = example.cli("user", "set-password", "bob", "--stdin", stdin=chosen + "\n", keys=False)
    assert done.returncode == 0, done.stderr
    report_json, report_junit = example.root / "run.json", example.root / "run.xml"
    run = example.cli(
        "rollout",
        "--yes",
        "--limit",
        "ws:ber-ws-002",
        "--report-json",
        str(report_json),
        "--report-junit",
        str(report_junit),
    )
    assert run.returncode == 0, (run.stdout, run.stderr)
    recorded = _recorded_values(example, report_json, report_junit)
    assert recorded  # the records still tell one version of a file from another

    # Someone who reads a report (a CI artefact, a shipped audit log) and the inventory (no
    # key) renders bob's file with each guess in place of the placeholder, and hashes it.
    built = build.build(example.inventory, selection=resolve.Selection("ws:ber-ws-002"))
    assert built.ok and built.recipients is not None
    [bob] = [f for f in built.files if f.target.user == "bob"]
    placeholder = vault.placeholder_for(built.recipients.realm, "/users/bob/accounts/main/password")
    text = ini.decode_ini_bytes(bob.data)
    assert text.count(placeholder) == 1
    matches = [
        guess
        for guess in GUESSES
        if hashlib.sha256(ini.encode_ini(text.replace(placeholder, guess))).hexdigest() in recorded
    ]
    # The same dictionary finds the password when it holds the file's SHA-256 (the check of
    # the method itself: the file on the workstation is exactly that render).
    on_disk = example.ini("ber-ws-002", "bob")
    assert on_disk is not None
    assert (
        hashlib.sha256(on_disk).hexdigest()
        == hashlib.sha256(ini.encode_ini(text.replace(placeholder, chosen))).hexdigest()
    )
    assert matches == [], "a reader of the records found the password offline"
    # And the reports are the owner's only.
    assert stat.S_IMODE(report_json.stat().st_mode) == 0o600
    assert stat.S_IMODE(report_junit.stat().st_mode) == 0o600


@pytest.mark.parametrize("damage", ["truncated", "a folder"])
def test_a_damaged_fingerprint_key_stops_a_rollout_and_a_push_before_any_workstation(
    example: ExampleLab, damage: str
) -> None:
    # It made every command that opens the state folder fail, runs list included, with a
    # message about creating the folder; and the key was not needed to read the history.
    key = example.state / state.KEY_NAME
    example.state.mkdir(parents=True)
    if damage == "a folder":
        key.mkdir()
    else:
        key.write_bytes(b"abc")
    for host in example.lab.hosts.values():
        host.reset_counts()
    for command in (("rollout", "--yes"), ("push", "ber-ws-001")):
        refused = example.cli(*command)
        assert refused.returncode == 1, (command, refused.stdout, refused.stderr)
        assert refused.stderr == (
            f"error: {key} is damaged: restore it from a backup, or remove it (new "
            "fingerprints will then not match recorded ones)\n"
        )
    assert all(host.request_count == 0 for host in example.lab.hosts.values())
    assert all(data is None for data in example.all_files().values())
    listed = example.cli("runs", "list", keys=False, lab=False)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "", "")


# --------------------------------------------------------------------------- a killed rollout


def _journaled(example: ExampleLab) -> dict[str, Status]:
    """The workstations the running rollout's journal lists, with their status (none yet: {})."""
    if not (example.state / state.DB_NAME).exists():
        return {}
    runs = state.StateStore(example.state).runs()
    if not runs:
        return {}
    return {
        r.workstation: r.status for r in state.StateStore(example.state).run(runs[0].id).results
    }


def test_a_killed_rollout_leaves_every_write_in_the_runs_and_the_audit_log(
    example: ExampleLab,
) -> None:
    # The third workstation answers nothing for two minutes: when the rollout is killed, the
    # first two are written and reported, and no other was written.
    stuck = HOSTS[2]
    example.lab.hosts[stuck].set_faults(Faults(slow=120))
    process = _start_cli(example, "rollout", "--yes", "--canary", "0", "--forks", "1", "--quiet")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            listed = _journaled(example)
            if sum(1 for s in listed.values() if s == Status.CHANGED) >= 2:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError(f"the journal never showed two workstations: {listed}")
        process.kill()  # SIGKILL: no handler, no finally, nothing runs after this
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    example.lab.hosts[stuck].clear_faults()

    written = {key for key, data in example.all_files().items() if data is not None}
    assert {ws for ws, _ in written} == set(HOSTS[:2])  # what the kill left on the fleet
    [run] = state.StateStore(example.state).runs()
    assert run.stopped.startswith("interrupted: the run did not finish") and run.finished is None
    detail = state.StateStore(example.state).run(run.id)
    by_host = {r.workstation: r for r in detail.results}
    assert sorted(by_host) == HOSTS  # every workstation of the run is listed
    assert {h for h, r in by_host.items() if r.status == Status.CHANGED} == set(HOSTS[:2])
    for host in HOSTS[2:]:
        assert by_host[host].status == Status.SKIPPED
        assert by_host[host].message.startswith("not reported:")
    assert detail.to_retry == HOSTS[2:]
    # The audit log has one record per file written, in this run.
    audit = json.loads(example.cli("audit", "--json", keys=False, lab=False).stdout)
    assert {(r["workstation"], r["user"] or "") for r in audit} == written
    assert {(r["run_id"], r["status"], r["action"]) for r in audit} == {(run.id, "changed", "push")}
    listed = example.cli("runs", "list", keys=False, lab=False).stdout
    assert re.search("  2 changed, 7 skipped +stopped: interrupted", listed), listed

    # --only-failed finishes the job: exactly the workstations that were not reported.
    again = example.cli("rollout", "--yes", "--only-failed", "--quiet")
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert set(host_lines(again.stdout)) == set(HOSTS[2:])
    assert all(data is not None for data in example.all_files().values())


FINDING_LINE = re.compile(r"^\S+:\d+: (?:warning|error)\[[a-z-]+\]: ")


def finding_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if FINDING_LINE.match(line)]


def test_the_rollout_shows_microsip_pitfalls_as_validate_does(example: ExampleLab) -> None:
    groups = example.inventory / "groups.yaml"
    text = groups.read_text(encoding="utf-8")
    # Put back what the example avoids: a dialingPrefix, a batch-file hook, Desktop recordings.
    text = re.sub(r"# no dialingPrefix:.*", 'dialingPrefix: "0"', text)
    text = re.sub(r"cmdIncomingCall: .*", r"cmdIncomingCall: C:\\Scripts\\crm-popup.bat", text)
    text = re.sub(r"\n +recordingPath: .*", "", text)
    groups.write_text(text, encoding="utf-8")
    validate = example.cli("validate", lab=False)
    assert validate.returncode == 0, validate.stdout
    expected = finding_lines(validate.stdout)
    assert {re.findall(r"\[([a-z-]+)\]", line)[0] for line in expected} == {
        "dialing-prefix",
        "hook-batch",
        "recording-path",
        "inactive-account",
    }
    check = example.cli("rollout", "--check")
    assert check.returncode == 0, (check.stdout, check.stderr)
    assert finding_lines(check.stdout) == expected
    # An error stops the rollout in Phase 1, before any workstation, with the same lines.
    groups.write_text(
        text.replace(
            "      autoRecording: 1\n",
            "      autoRecording: 1\n      cmdOutgoingCall: C:\\Tools\\dial.exe {md5_password}\n",
        ),
        encoding="utf-8",
    )
    validate = example.cli("validate", lab=False)
    assert validate.returncode == 1
    expected = finding_lines(validate.stdout)
    assert "error[password-expansion]: [Settings] cmdOutgoingCall: " in expected[0]
    for host in example.lab.hosts.values():
        host.reset_counts()
    refused = example.cli("rollout", "--yes")
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert finding_lines(refused.stdout) == expected
    assert all(host.request_count == 0 for host in example.lab.hosts.values())
