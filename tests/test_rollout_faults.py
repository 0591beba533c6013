"""A rollout across a lab fleet with faults spread over it, then retry until it converges.

Twelve emulated workstations speak WS-Management on 127.0.0.N to the real pywinrm client.
Some are unreachable, some reject the credentials, one times out once, two reset the
connection in the middle of the push, one user runs MicroSIP, one answers a SOAP fault, one
disk is full. Every host must end with the right status, reason and number of attempts, the
threshold must stop the run after the right batch, no managed file may ever hold anything but
its old or its new content, and the state store must agree with what the emulated disks hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from provisioner.inventory.resolve import StationPlan
from provisioner.lab import Faults, ResetMidCommand, SoapFault, Trigger
from provisioner.lab.workstation import Workstation
from provisioner.microsip import ini
from provisioner.records import state
from provisioner.records.report import exit_code, hosts_to_retry
from provisioner.records.results import Status
from provisioner.rollout.push import PushOptions
from provisioner.rollout.runner import RolloutOptions, RunResult, executor, run_fleet
from provisioner.transport.base import Transport
from tests.labkit import Kit, lab_kit

HOSTS = [f"ws{n:02d}" for n in range(1, 13)]
OPTIONS = RolloutOptions(
    forks=6,
    canary="1",
    batch="4",  # [ws01] [ws02..ws05] [ws06..ws09] [ws10..ws12]
    max_fail=40.0,
    retries=2,
    backoff=0.01,
    push=PushOptions(if_running="skip"),
)
TIMEOUT = 5  # seconds per request for every host; only the hanging one ever waits for it


def sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


@dataclass
class Fleet:
    """The kit, every managed path per host, and what the transport factory saw."""

    kit: Kit
    paths: dict[str, list[str]]
    opened: dict[str, int] = field(default_factory=dict)
    sleeps: list[float] = field(default_factory=list)
    seen: dict[tuple[str, str], set[bytes | None]] = field(default_factory=dict)

    def machine(self, host: str) -> Workstation:
        return self.kit.lab.workstations[host]

    def factory(self, plan: StationPlan) -> Transport:
        name = plan.workstation.name
        self.opened[name] = self.opened.get(name, 0) + 1
        return self.kit.transport(name, timeout=TIMEOUT)

    def run(self, hosts: list[str] | None = None, options: RolloutOptions = OPTIONS) -> RunResult:
        self.opened.clear()
        self.sleeps.clear()
        stations = {h: self.kit.station(h) for h in hosts or HOSTS}
        files = {h: self.kit.files(h) for h in stations}
        pushes = executor(stations, files, self.factory, sleep=self.sleeps.append)
        return run_fleet(sorted(stations), pushes, options)

    def contents(self) -> dict[tuple[str, str], bytes | None]:
        return {(h, p): self.machine(h).read(p) for h, paths in self.paths.items() for p in paths}

    def watch(self) -> None:
        """Record every managed file's bytes after every change an agent makes on a disk."""
        for host, paths in self.paths.items():
            machine = self.machine(host)

            def look(event: str, host: str = host, paths: list[str] = paths) -> None:
                for path in paths:
                    self.seen.setdefault((host, path), set()).add(self.machine(host).read(path))

            machine.observe(look)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with lab_kit(tmp_path, workstations=len(HOSTS)) as kit:
        paths = {}
        for number, host in enumerate(HOSTS, start=1):
            machine = kit.lab.workstations[host]
            user = machine.lookup_account(f"ACME\\u{number}x1")
            assert user is not None
            paths[host] = [machine.ini_path(user), machine.override_path()]
        yield Fleet(kit, paths)


def change_inventory(kit: Kit) -> None:
    """A change that reaches every user's microsip.ini (override.ini stays as it is)."""
    path = kit.root / "inventory.yaml"
    path.write_text(path.read_text().replace("    EC: 1\n", "    EC: 0\n"))
    kit.rebuild()


def inject_faults(fleet: Fleet) -> None:
    hosts = fleet.kit.lab.hosts
    hosts["ws02"].set_faults(Faults(refuse=True))
    hosts["ws03"].set_faults(Faults(http_401=True))
    hosts["ws04"].set_faults(Faults(hang=Trigger(operation="Receive")))  # once
    # reset while the apply's stdin arrives: the agent never ran it
    hosts["ws05"].set_faults(Faults(reset_mid_command=ResetMidCommand(2, "Send")))
    ws06 = fleet.machine("ws06")
    user = ws06.lookup_account("ACME\\u6x1")
    assert user is not None
    ws06.start_microsip(user)
    # reset while fetching the apply's answer: the agent did write, the answer was lost
    hosts["ws07"].set_faults(Faults(reset_mid_command=ResetMidCommand(2, "Receive")))
    hosts["ws08"].set_faults(Faults(soap_fault=SoapFault(Trigger(operation="Command"))))
    fleet.machine("ws09").faults.disk_full = True


def clear_faults(fleet: Fleet) -> None:
    for host in fleet.kit.lab.hosts.values():
        host.clear_faults()
    ws06 = fleet.machine("ws06")
    ws06.stop(ws06.processes)  # the user closed MicroSIP
    fleet.machine("ws09").faults.disk_full = False


def test_faults_across_a_fleet_then_retry_converges(fleet: Fleet, tmp_path: Path) -> None:
    kit = fleet.kit
    first = fleet.run()
    assert {r.status for r in first.results.values()} == {Status.CHANGED}, {
        h: r.message for h, r in first.results.items()
    }
    before = fleet.contents()
    assert all(data is not None for data in before.values())
    change_inventory(kit)
    inject_faults(fleet)
    fleet.watch()
    store = state.StateStore(tmp_path / "state")
    audit = state.AuditLog(tmp_path / "state")
    fp = store.fingerprints.of  # what records hold instead of a file's SHA-256

    run = fleet.run()
    store.record_run(run, who="tester", command="rollout")
    audit.append(state.records_for_run(run, "tester", fingerprints=store.fingerprints))
    results = run.results

    # ---- every host: status, reason and attempts
    expected = {
        "ws01": (Status.CHANGED, 1),
        "ws02": (Status.FAILED, 3),
        "ws03": (Status.FAILED, 1),
        "ws04": (Status.CHANGED, 2),
        "ws05": (Status.CHANGED, 2),
        "ws06": (Status.BUSY, 1),
        "ws07": (Status.CHANGED, 2),
        "ws08": (Status.FAILED, 1),
        "ws09": (Status.FAILED, 1),
        "ws10": (Status.SKIPPED, 0),
        "ws11": (Status.SKIPPED, 0),
        "ws12": (Status.SKIPPED, 0),
    }
    assert {h: (r.status, r.attempts) for h, r in results.items()} == expected, {
        h: r.message for h, r in results.items()
    }
    assert "cannot connect" in results["ws02"].message
    assert results["ws02"].message.endswith("(after 3 attempts)") and results["ws02"].retryable
    assert results["ws03"].message.startswith("the credentials were rejected")
    assert not results["ws03"].retryable
    assert "MicroSIP is running for u6x1" in results["ws06"].message
    assert results["ws08"].message.startswith("WS-Management fault")
    assert "disk-full" in results["ws09"].message
    ws07 = next(c for c in results["ws07"].files if c.kind == "microsip")
    assert "answer was lost" in ws07.message
    reason = "failure threshold exceeded after batch 3: 4 of 9 failed (more than 40%)"
    assert run.stopped == reason
    assert all(results[h].message == reason for h in ("ws10", "ws11", "ws12"))

    # ---- retries happened only for retryable failures, each with one backoff sleep
    assert fleet.opened == {h: n for h, (_, n) in expected.items() if n}
    assert len(fleet.sleeps) == 2 + 1 + 1 + 1  # ws02 twice, ws04, ws05, ws07 once
    assert kit.lab.hosts["ws03"].request_count > 0  # contacted, and it rejected us
    assert exit_code(run) == 3

    # ---- no managed file ever held anything but its old or its new content
    after = fleet.contents()
    for key, contents in fleet.seen.items():
        assert contents <= {before[key], after[key]}, key
    for host in ("ws01", "ws04", "ws05", "ws07"):  # the watch saw the writes happen
        written = (host, fleet.paths[host][0])
        assert fleet.seen[written] == {before[written], after[written]}
    for host in HOSTS:
        for folder in {p.rsplit("\\", 1)[0] for p in fleet.paths[host]}:
            assert not [n for n in fleet.machine(host).listdir(folder) if n.endswith(".tmp")]

    # ---- files changed exactly where the run says so; backups hold the old bytes
    for host, result in results.items():
        ini_path, override = fleet.paths[host]
        was_written = result.status == Status.CHANGED
        assert (after[(host, ini_path)] != before[(host, ini_path)]) == was_written, host
        assert after[(host, override)] == before[(host, override)]
        if was_written:
            doc = ini.parse_ini(ini.decode_ini_bytes(after[(host, ini_path)] or b""))
            assert doc.get("Settings", "EC") == "0"
            backup = fleet.machine(host).read(fleet.machine(host).state_for(ini_path, "backup.1"))
            assert backup == before[(host, ini_path)], host

    # ---- the state store agrees with the emulated disks
    detail = store.run(run.run_id[:6])
    assert detail.summary.stopped == reason
    assert {r.workstation: (r.status, r.attempts) for r in detail.results} == expected
    for stored in detail.results:
        if stored.status in (Status.FAILED, Status.SKIPPED) and stored.workstation != "ws09":
            assert stored.files == ()  # failed before reaching any file
        for item in stored.files:
            on_disk = fp(sha(after[(stored.workstation, item.path)]))
            old = fp(sha(before[(stored.workstation, item.path)]))
            assert item.old_sha256 == old, (stored.workstation, item)
            if item.status in (Status.CHANGED, Status.UNCHANGED):
                assert item.new_sha256 == on_disk, (stored.workstation, item)
            else:
                assert on_disk == old, (stored.workstation, item)
    assert store.hosts_to_retry() == hosts_to_retry(run)
    records = audit.query(run_id=run.run_id)
    changed = {(r.workstation, str(r.file)): r for r in records if r.status == "changed"}
    assert sorted(h for h, _ in changed) == ["ws01", "ws04", "ws05", "ws07"]
    for (host, path), record in changed.items():
        assert record.sha256_before == fp(sha(before[(host, path)]))
        assert record.sha256_after == fp(sha(after[(host, path)]))
    failed = {r.workstation for r in records if r.status == "failed"}
    assert failed == {"ws02", "ws03", "ws08", "ws09"}

    # ---- retry exactly the hosts to retry, with the faults gone: all succeed
    retry = hosts_to_retry(run)
    assert retry == ["ws02", "ws03", "ws06", "ws08", "ws09", "ws10", "ws11", "ws12"]
    clear_faults(fleet)
    second = fleet.run(retry)
    store.record_run(second, who="tester", command="rollout --only-failed")
    assert sorted(second.results) == retry
    assert {h: r.status for h, r in second.results.items()} == dict.fromkeys(retry, Status.CHANGED)
    assert sorted(fleet.opened) == retry and fleet.sleeps == []
    assert store.hosts_to_retry() == []

    # ---- and the whole fleet is now up to date, matching what the state recorded
    third = fleet.run(options=replace(OPTIONS, canary="0"))
    assert {r.status for r in third.results.values()} == {Status.UNCHANGED}
    final = fleet.contents()
    latest = {
        (r.workstation, r.path): r.new_sha256
        for r in store.last_results()
        if r.path is not None and r.user is not None
    }
    assert len(latest) == len(HOSTS)
    for (host, path), digest in latest.items():
        assert fp(sha(final[(host, path)])) == digest
    for key, contents in fleet.seen.items():
        assert contents <= {before[key], final[key]}, key
