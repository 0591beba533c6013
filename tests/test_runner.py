"""The fleet runner: sizes and batches, the failure threshold, retries, Ctrl-C (a stop Event).

The pushes are real (``push_host``, the merge, the lab agent writing real files of emulated
workstations); only the wire is short-circuited: a transport hands each request to the lab
agent in-process, or raises the transport error a test scripts for that host and attempt.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from rich.console import Console

from provisioner.cli.progress import PlainReporter, RichReporter, print_summary
from provisioner.errors import (
    AuthError,
    ConnectError,
    OptionError,
    ProvisionerError,
    RemoteError,
    TransportError,
    TransportTimeoutError,
)
from provisioner.inventory.resolve import StationPlan, resolve_station
from provisioner.lab import agent
from provisioner.lab.fleet import WorkstationSpec, build_workstation
from provisioner.lab.workstation import Workstation
from provisioner.records import state
from provisioner.records.fingerprint import Fingerprints
from provisioner.records.report import exit_code, hosts_to_retry
from provisioner.records.results import HostResult, Status
from provisioner.render import build
from provisioner.rollout import lanes, runner
from provisioner.rollout.runner import RolloutOptions, parse_size, plan_batches, run_fleet
from provisioner.transport.agent.messages import AgentReply, AgentRequest, ApplyRequest
from provisioner.transport.agent.operations import APPLY, REGISTRY
from provisioner.transport.base import Transport
from tests.labkit import write_inventory

R = TypeVar("R", bound=AgentReply)

HOSTS = [f"ws{n:02d}" for n in range(1, 11)]
INTERRUPTED = "interrupted: no new workstation was started"

# --------------------------------------------------------------------------- sizes and batches


@pytest.mark.parametrize(
    ("text", "total", "size"),
    [
        ("5", 20, 5),
        (" 5 ", 20, 5),
        ("50", 20, 20),  # never more than the fleet
        ("10%", 20, 2),
        ("10%", 5, 1),  # a share rounds up: at least one host
        ("33%", 10, 4),
        ("100%", 7, 7),
        ("0.5%", 1000, 5),
        ("1", 0, 0),  # an empty fleet has empty batches
        ("10%", 0, 0),
    ],
)
def test_parse_size(text: str, total: int, size: int) -> None:
    assert parse_size(text, total) == size


@pytest.mark.parametrize("text", ["", "abc", "-1", "5.5", "0%", "150%", "-10%", "%", "nan%", "0"])
def test_bad_sizes_are_clear_errors(text: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_size(text, 10)
    assert "is not a size" in str(caught.value)
    assert "count like 5" in str(caught.value) and "share like 10%" in str(caught.value)


def test_plan_batches_counts_percentages_and_canary() -> None:
    hosts = [f"h{n}" for n in range(10)]
    assert plan_batches(hosts, "1", "3") == [
        ["h0"],
        ["h1", "h2", "h3"],
        ["h4", "h5", "h6"],
        ["h7", "h8", "h9"],
    ]
    # shares are of the whole fleet, the canary included
    assert [len(b) for b in plan_batches(hosts, "10%", "50%")] == [1, 5, 4]
    assert [len(b) for b in plan_batches(hosts, "2", "100%")] == [2, 8]
    assert [len(b) for b in plan_batches(hosts, "0", "4")] == [4, 4, 2]  # no canary
    assert [len(b) for b in plan_batches(hosts, "0%", "100%")] == [10]  # 0% canary: none
    assert [len(b) for b in plan_batches(hosts, "20", "1")] == [10]  # canary takes all
    assert plan_batches([], "1", "10%") == []
    for canary, batch in (("1", "3"), ("30%", "25%"), ("0", "1")):
        flat = [h for b in plan_batches(hosts, canary, batch) for h in b]
        assert flat == hosts  # every host exactly once, in order


def test_a_pinned_canary_goes_first_and_the_rest_follow_in_order() -> None:
    hosts = [f"h{n}" for n in range(10)]
    batches = plan_batches(hosts, "1", "4", pinned=["h7", "h2", "missing"])
    assert batches == [["h2", "h7"], ["h0", "h1", "h3", "h4"], ["h5", "h6", "h8", "h9"]]
    assert plan_batches(hosts, "0", "100%", pinned=["h9"]) == [["h9"], hosts[:9]]
    assert plan_batches(hosts, "1", "100%", pinned=["nowhere"]) == [hosts]  # no empty batch


def test_has_canary() -> None:
    assert not any(runner.has_canary(text) for text in ("0", " 0 ", "00", "0%", "0.0%"))
    assert all(runner.has_canary(text) for text in ("1", "10%", "x", ""))


@pytest.mark.parametrize(("canary", "batch"), [("x", "10%"), ("1", "0"), ("1", "abc"), ("-2", "1")])
def test_plan_batches_refuses_bad_sizes(canary: str, batch: str) -> None:
    with pytest.raises(OptionError, match="is not a size"):
        plan_batches(HOSTS, canary, batch)


# --------------------------------------------------------------------------- a scripted fleet


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> build.BuildResult:
    root = tmp_path_factory.mktemp("inventory")
    keyring = write_inventory(root, workstations=len(HOSTS))
    result = build.build(root, opener_factory=lambda _: keyring)
    assert result.ok, [str(f) for f in result.findings]
    return result


class AgentTransport:
    """The lab agent in-process: the request goes through a JSON round trip, like the wire."""

    def __init__(self, host: str, machine: Workstation, hook: Callable[[str, str], None]) -> None:
        self.host = host
        self.machine = machine
        self.hook = hook
        self.closed = False

    def request(self, request: AgentRequest[R]) -> R:
        operation = REGISTRY.of(request)
        self.hook(self.host, operation.name)
        wire = json.loads(json.dumps(operation.wire(request)))
        answer = json.loads(json.dumps(agent.execute(self.machine, wire)))
        return operation.reply_from(answer, self.host)

    def close(self) -> None:
        self.closed = True


class FailingTransport:
    """Raises a transport error on the first request."""

    def __init__(self, host: str, error: TransportError) -> None:
        self.host = host
        self.error = error

    def request(self, request: AgentRequest[R]) -> R:
        raise self.error

    def close(self) -> None:
        pass


class LosingTransport(AgentTransport):
    """The agent applies the files, then the connection resets: the answer is lost."""

    def request(self, request: AgentRequest[R]) -> R:
        answer = super().request(request)
        if isinstance(request, ApplyRequest):
            raise ConnectError("cannot connect: connection reset by peer", host=self.host)
        return answer


class RacingTransport(AgentTransport):
    """Another push writes the very same files between our inspect and our apply."""

    raced = False

    def request(self, request: AgentRequest[R]) -> R:
        if isinstance(request, ApplyRequest) and not self.raced:
            self.raced = True
            agent.execute(self.machine, json.loads(json.dumps(APPLY.wire(request))))
        return super().request(request)


LOSE_APPLY = "lose the answer of apply"
RACE = "another push gets there first"
Step = TransportError | ProvisionerError | str | None


@dataclass
class Fleet:
    """Stations, files and emulated machines; the transport factory follows a per-host script.

    ``script[host]`` lists what each attempt does: None pushes through the agent, a
    TransportError fails the first request, a ProvisionerError fails the factory itself.
    Attempts past the end of the script push through the agent.
    """

    stations: dict[str, StationPlan]
    files: dict[str, list[build.BuiltFile]]
    machines: dict[str, Workstation]
    script: dict[str, list[Step]] = field(default_factory=dict)
    opened: list[str] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    on_request: Callable[[str, str], None] = lambda host, op: None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def factory(self, plan: StationPlan) -> Transport:
        host = plan.workstation.name
        with self._lock:
            attempt = self.opened.count(host)
            self.opened.append(host)
        steps = self.script.get(host, [])
        step = steps[attempt] if attempt < len(steps) else None
        if isinstance(step, TransportError):
            return FailingTransport(host, step)
        if isinstance(step, ProvisionerError):
            raise step
        if step == LOSE_APPLY:
            return LosingTransport(host, self.machines[host], self._hook)
        if step == RACE:
            return RacingTransport(host, self.machines[host], self._hook)
        return AgentTransport(host, self.machines[host], self._hook)

    def _hook(self, host: str, op: str) -> None:
        with self._lock:
            self.requests.append((host, op))
        self.on_request(host, op)

    def attempts(self, host: str) -> int:
        return self.opened.count(host)

    def ini(self, host: str) -> bytes | None:
        machine = self.machines[host]
        user = machine.users[0]
        return machine.read(machine.ini_path(user))

    def run(
        self,
        options: RolloutOptions,
        *,
        sleep: Callable[[float], None] = time.sleep,
        executor: runner.Executor | None = None,
        **kwargs: Any,
    ) -> runner.RunResult:
        pushes = executor or runner.executor(self.stations, self.files, self.factory, sleep=sleep)
        return run_fleet(sorted(self.stations), pushes, options, **kwargs)


@pytest.fixture
def fleet(built: build.BuildResult, tmp_path: Path) -> Fleet:
    assert built.inventory is not None
    files: dict[str, list[build.BuiltFile]] = {}
    for item in built.files:
        files.setdefault(item.target.workstation, []).append(item)
    stations = {name: resolve_station(built.inventory, name) for name in HOSTS}
    machines = {}
    for number, name in enumerate(HOSTS, start=1):
        spec = WorkstationSpec(users=(f"ACME\\u{number}x1",))
        machines[name] = build_workstation(tmp_path / name, spec, computer=name.upper())
    return Fleet(stations, files, machines)


class Recorder:
    """A Reporter that keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def batch_started(self, index: int, hosts: Sequence[str]) -> None:
        with self._lock:
            self.events.append(("batch", (index, list(hosts))))

    def host_started(self, host: str) -> None:
        with self._lock:
            self.events.append(("start", host))

    def host_done(self, result: HostResult) -> None:
        with self._lock:
            self.events.append(("done", result.host))

    def of(self, kind: str) -> list[Any]:
        return [value for event, value in self.events if event == kind]


@pytest.fixture
def sleeps() -> list[float]:
    return []


FAST = RolloutOptions(forks=4, canary="1", batch="3", max_fail=10.0, retries=2, backoff=0.01)


# --------------------------------------------------------------------------- a clean run


def test_a_clean_run_pushes_every_host_in_planned_batches(fleet: Fleet) -> None:
    reporter = Recorder()
    run = fleet.run(FAST, reporter=reporter)
    assert run.batches == [HOSTS[:1], HOSTS[1:4], HOSTS[4:7], HOSTS[7:]]
    assert {h: r.status for h, r in run.results.items()} == dict.fromkeys(HOSTS, Status.CHANGED)
    assert run.ok and not run.stopped and exit_code(run) == 0 and hosts_to_retry(run) == []
    assert run.finished is not None and run.finished >= run.started
    assert all(r.attempts == 1 for r in run.results.values())
    assert all(fleet.ini(h) is not None for h in HOSTS)
    assert reporter.of("batch") == [(i, b) for i, b in enumerate(run.batches)]
    assert sorted(reporter.of("done")) == HOSTS and sorted(reporter.of("start")) == HOSTS
    # a batch ends before the next one starts
    order = [value for event, value in reporter.events if event in ("batch", "done")]
    assert order.index((1, HOSTS[1:4])) > order.index("ws01")
    assert all(order.index(h) < order.index((2, HOSTS[4:7])) for h in HOSTS[1:4])
    again = fleet.run(FAST)
    assert {r.status for r in again.results.values()} == {Status.UNCHANGED}


def test_check_mode_writes_nothing(fleet: Fleet) -> None:
    run = fleet.run(replace(FAST, check=True))
    assert {r.status for r in run.results.values()} == {Status.CHANGED}
    assert all(r.dry_run for r in run.results.values())
    assert all(fleet.ini(h) is None for h in HOSTS)
    assert {op for _, op in fleet.requests} == {"inspect"}


def test_forks_bound_the_hosts_in_flight(fleet: Fleet) -> None:
    in_flight: set[str] = set()
    peak = 0
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=10)

    def hook(host: str, op: str) -> None:
        nonlocal peak
        if op != "inspect":
            return
        with lock:
            in_flight.add(host)
            peak = max(peak, len(in_flight))
        if host in ("ws01", "ws02"):
            both.wait()  # the first two are in flight together...
            threading.Event().wait(0.1)  # ...and stay, so a third would be seen
        with lock:
            in_flight.discard(host)

    fleet.on_request = hook
    run = fleet.run(replace(FAST, forks=2, canary="0", batch="100%"))
    assert run.ok
    assert peak == 2


def test_options_that_cannot_run_are_refused(fleet: Fleet) -> None:
    with pytest.raises(OptionError, match="forks"):
        fleet.run(replace(FAST, forks=0))
    with pytest.raises(OptionError, match="is not a size"):
        fleet.run(replace(FAST, batch="0"))
    assert fleet.opened == []


# --------------------------------------------------------------------------- the threshold


@pytest.mark.parametrize(
    ("failing", "max_fail", "stopped_after", "failed", "attempted"),
    [
        # batches: [ws01] [ws02 ws03 ws04] [ws05 ws06 ws07] [ws08 ws09 ws10]
        (["ws01"], 10.0, 1, 1, 1),  # the canary fails: nothing else starts
        (["ws03"], 10.0, 2, 1, 4),  # 25% > 10%
        (["ws03"], 25.0, None, 1, 10),  # 25% is not more than 25%; then 1 of 7, 1 of 10
        (["ws03", "ws06"], 25.0, 3, 2, 7),  # 2 of 7 = 28.6% > 25%
        (["ws06", "ws09"], 15.0, 4, 2, 10),  # 1 of 7 = 14.3%, then 2 of 10 in the last batch
        (["ws02", "ws03", "ws04"], 100.0, None, 3, 10),  # 100%: never stops
        (["ws09"], 0.0, 4, 1, 10),  # 0%: the first failure stops the run
    ],
)
def test_threshold_stops_after_the_batch_that_exceeds_it(
    fleet: Fleet,
    failing: list[str],
    max_fail: float,
    stopped_after: int | None,
    failed: int,
    attempted: int,
) -> None:
    for host in failing:
        fleet.script[host] = [AuthError("the credentials were rejected", host=host)]
    reporter = Recorder()
    run = fleet.run(replace(FAST, max_fail=max_fail), reporter=reporter)
    assert len(run.results) == len(HOSTS)
    counts = run.counts()
    assert counts[Status.FAILED] == failed
    if stopped_after is None:
        assert run.stopped == ""
        assert counts[Status.SKIPPED] == 0
        return
    reason = (
        f"failure threshold exceeded after batch {stopped_after}: {failed} of {attempted} "
        f"failed (more than {max_fail:g}%)"
    )
    assert run.stopped == reason
    skipped = [h for batch in run.batches[stopped_after:] for h in batch]
    assert sorted(h for h, r in run.results.items() if r.status == Status.SKIPPED) == skipped
    for host in skipped:
        result = run.results[host]
        assert result.message == reason and result.attempts == 0
        assert fleet.attempts(host) == 0 and fleet.ini(host) is None
    assert len(reporter.of("batch")) == stopped_after
    assert sorted(reporter.of("done")) == HOSTS  # skipped hosts are reported too
    assert not set(reporter.of("start")) & set(skipped)
    assert hosts_to_retry(run) == sorted([*failing, *skipped])
    assert exit_code(run) == 3


def test_busy_hosts_do_not_count_as_failures(fleet: Fleet) -> None:
    for host in ("ws02", "ws03"):
        machine = fleet.machines[host]
        machine.start_microsip(machine.users[0])
    run = fleet.run(replace(FAST, max_fail=0.0))
    assert not run.stopped
    assert run.results["ws02"].status == Status.BUSY
    assert "MicroSIP is running" in run.results["ws02"].message
    assert fleet.ini("ws02") is None and fleet.ini("ws05") is not None
    assert run.counts()[Status.CHANGED] == 8
    assert hosts_to_retry(run) == ["ws02", "ws03"] and exit_code(run) == 3


def test_conflicts_count_as_failures(fleet: Fleet) -> None:
    # ws02's file changes between inspect and apply, twice (MicroSIP writing it): a conflict
    machine = fleet.machines["ws02"]
    path = machine.ini_path(machine.users[0])
    fleet.run(RolloutOptions(canary="0"))

    def meddle(host: str, op: str) -> None:
        if host == "ws02" and op == "apply":
            data = machine.read(path)
            assert data is not None
            machine.put(path, data + "x=1\r\n".encode("utf-16-le"))

    fleet.on_request = meddle
    run = fleet.run(replace(FAST, max_fail=0.0, check=False, push=replace(FAST.push, reset=True)))
    assert run.results["ws02"].status == Status.CONFLICT
    assert run.stopped.startswith("failure threshold exceeded after batch 2: 1 of 4 failed")


# --------------------------------------------------------------------------- retries


@pytest.fixture
def exact_jitter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # jitter multiplies the delay by 0.5 + random()/2: random() = 1.0 gives the full delay
    monkeypatch.setattr("provisioner.rollout.runner.random.random", lambda: 1.0)
    yield


@pytest.mark.usefixtures("exact_jitter")
@pytest.mark.parametrize(
    "error",
    [
        ConnectError("cannot connect: refused", host="ws02"),
        TransportTimeoutError("no answer within 5 s", host="ws02"),
    ],
)
def test_retryable_failures_are_retried_then_succeed(
    fleet: Fleet, sleeps: list[float], error: TransportError
) -> None:
    fleet.script["ws02"] = [error, error]
    options = replace(FAST, retries=2, backoff=1.0, backoff_cap=30.0)
    run = fleet.run(options, sleep=sleeps.append)
    result = run.results["ws02"]
    assert result.status == Status.CHANGED and result.attempts == 3
    assert fleet.attempts("ws02") == 3 and fleet.ini("ws02") is not None
    assert sleeps == [1.0, 2.0]  # exponential
    assert all(run.results[h].attempts == 1 for h in HOSTS if h != "ws02")


@pytest.mark.usefixtures("exact_jitter")
def test_backoff_is_capped_and_retries_are_bounded(fleet: Fleet, sleeps: list[float]) -> None:
    refused = ConnectError("cannot connect: connection refused", host="ws01")
    fleet.script["ws01"] = [refused] * 10
    options = replace(FAST, retries=5, backoff=1.0, backoff_cap=4.0, max_fail=100.0)
    run = fleet.run(options, sleep=sleeps.append)
    result = run.results["ws01"]
    assert result.status == Status.FAILED and result.retryable
    assert result.attempts == 6 and fleet.attempts("ws01") == 6
    assert result.message == "cannot connect: connection refused (after 6 attempts)"
    assert sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_stays_between_half_and_the_full_delay(fleet: Fleet, sleeps: list[float]) -> None:
    fleet.script["ws01"] = [ConnectError("refused", host="ws01")] * 4
    run = fleet.run(replace(FAST, retries=3, backoff=0.5, backoff_cap=1.5), sleep=sleeps.append)
    assert run.results["ws01"].attempts == 4
    assert len(sleeps) == 3
    for delay, full in zip(sleeps, [0.5, 1.0, 1.5], strict=True):
        assert full / 2 <= delay <= full


def test_no_retries_means_one_attempt(fleet: Fleet, sleeps: list[float]) -> None:
    fleet.script["ws01"] = [ConnectError("refused", host="ws01")]
    run = fleet.run(replace(FAST, retries=0), sleep=sleeps.append)
    assert run.results["ws01"].attempts == 1 and sleeps == []
    assert run.results["ws01"].message == "refused"


@pytest.mark.parametrize(
    "error",
    [
        AuthError("the credentials were rejected (ntlm as svc-microsip)", host="ws01"),
        RemoteError("WS-Management fault 2147943418: Fault injected", host="ws01"),
        RemoteError("the agent failed: exit code 1", host="ws01"),
        TransportError("TLS failed: certificate verify failed", host="ws01"),
    ],
)
def test_auth_and_remote_errors_are_never_retried(
    fleet: Fleet, sleeps: list[float], error: TransportError
) -> None:
    fleet.script["ws01"] = [error] * 3
    run = fleet.run(replace(FAST, retries=3, max_fail=100.0), sleep=sleeps.append)
    result = run.results["ws01"]
    assert result.status == Status.FAILED and not result.retryable
    assert result.attempts == 1 and fleet.attempts("ws01") == 1
    assert result.message == str(error)
    assert sleeps == []


def test_an_agent_failure_is_not_retried(fleet: Fleet, sleeps: list[float]) -> None:
    fleet.machines["ws01"].uninstall_microsip()
    fleet.machines["ws02"].faults.disk_full = True
    run = fleet.run(replace(FAST, retries=3, max_fail=100.0), sleep=sleeps.append)
    assert "not installed" in run.results["ws01"].message
    assert "disk-full" in run.results["ws02"].message
    for host in ("ws01", "ws02"):
        assert run.results[host].status == Status.FAILED and run.results[host].attempts == 1
        assert fleet.attempts(host) == 1
    assert fleet.ini("ws02") is None
    assert sleeps == []


def test_a_retry_that_meets_an_auth_error_stops(fleet: Fleet, sleeps: list[float]) -> None:
    fleet.script["ws01"] = [
        ConnectError("refused", host="ws01"),
        AuthError("the credentials were rejected", host="ws01"),
    ]
    run = fleet.run(replace(FAST, retries=5, max_fail=100.0), sleep=sleeps.append)
    result = run.results["ws01"]
    assert result.status == Status.FAILED and result.attempts == 2 and len(sleeps) == 1
    assert result.message == "the credentials were rejected"


def test_a_write_whose_answer_was_lost_counts_as_changed(fleet: Fleet, sleeps: list[float]) -> None:
    fleet.script["ws01"] = [LOSE_APPLY]
    run = fleet.run(FAST, sleep=sleeps.append)
    result = run.results["ws01"]
    assert result.attempts == 2 and len(sleeps) == 1
    assert fleet.requests[:3] == [("ws01", "inspect"), ("ws01", "apply"), ("ws01", "inspect")]
    assert ("ws01", "apply") not in fleet.requests[3:]  # the retry found it all written
    assert result.status == Status.CHANGED and result.message == "2 changed"
    machine = fleet.machines["ws01"]
    for change in result.files:
        assert change.status == Status.CHANGED and change.old_sha256 is None
        assert change.message == "written by an earlier attempt whose answer was lost"
        assert change.new_sha256 == machine.sha256(change.path)
    records = state.records_for_run(run, "tester", fingerprints=Fingerprints(b"k" * 32))
    assert sorted((r.workstation, r.status) for r in records if r.workstation == "ws01") == [
        ("ws01", "changed"),
        ("ws01", "changed"),
    ]


def test_a_file_another_push_brought_up_to_date_is_no_conflict(fleet: Fleet) -> None:
    fleet.script["ws01"] = [RACE]
    run = fleet.run(FAST)
    result = run.results["ws01"]
    # our apply met the file changed since inspect; looking again, it is what we wanted
    assert [op for host, op in fleet.requests if host == "ws01"] == ["inspect", "apply", "inspect"]
    assert result.status == Status.UNCHANGED, result.message
    assert {c.status for c in result.files} == {Status.UNCHANGED}
    assert fleet.ini("ws01") is not None and result.attempts == 1


def test_a_factory_error_fails_the_host_without_retry(fleet: Fleet, sleeps: list[float]) -> None:
    fleet.script["ws01"] = [ProvisionerError("no winrm.username for ws01")]
    run = fleet.run(replace(FAST, max_fail=100.0), sleep=sleeps.append)
    result = run.results["ws01"]
    assert result.status == Status.FAILED and result.attempts == 1
    assert result.message == "no winrm.username for ws01" and sleeps == []
    assert run.counts()[Status.CHANGED] == 9


# --------------------------------------------------------------------------- Ctrl-C: the stop Event


def test_stop_before_the_run_skips_everything(fleet: Fleet) -> None:
    stop = threading.Event()
    stop.set()
    reporter = Recorder()
    run = fleet.run(FAST, stop=stop, reporter=reporter)
    assert run.stopped == INTERRUPTED
    assert {r.status for r in run.results.values()} == {Status.SKIPPED}
    assert {r.message for r in run.results.values()} == {INTERRUPTED}
    assert fleet.opened == [] and reporter.of("start") == [] and reporter.of("batch") == []
    assert sorted(reporter.of("done")) == HOSTS


def test_stop_lets_the_host_in_flight_finish_and_launches_no_other(fleet: Fleet) -> None:
    stop = threading.Event()

    def interrupt(host: str, op: str) -> None:
        if host == "ws01" and op == "inspect":
            stop.set()

    fleet.on_request = interrupt
    run = fleet.run(replace(FAST, forks=1, canary="0", batch="100%"), stop=stop)
    assert fleet.opened == ["ws01"]
    assert run.results["ws01"].status == Status.CHANGED  # finished, apply included
    assert ("ws01", "apply") in fleet.requests
    assert fleet.ini("ws01") is not None
    for host in HOSTS[1:]:
        assert run.results[host].status == Status.SKIPPED
        assert run.results[host].message == INTERRUPTED
        assert fleet.ini(host) is None
    assert run.stopped == INTERRUPTED
    assert hosts_to_retry(run) == HOSTS[1:]


def test_stop_with_several_in_flight(fleet: Fleet) -> None:
    stop = threading.Event()
    # All three are in flight, and stop is set (the barrier's action) before any of them goes
    # on: one that finished before stop was set would let the runner start a fourth.
    started = threading.Barrier(3, action=stop.set, timeout=10)

    def interrupt(host: str, op: str) -> None:
        if op == "inspect" and host in ("ws01", "ws02", "ws03"):
            started.wait()

    fleet.on_request = interrupt
    run = fleet.run(replace(FAST, forks=3, canary="0", batch="100%"), stop=stop)
    assert sorted(fleet.opened) == ["ws01", "ws02", "ws03"]
    for host in ("ws01", "ws02", "ws03"):
        assert run.results[host].status == Status.CHANGED
        assert fleet.ini(host) is not None
    assert {run.results[h].status for h in HOSTS[3:]} == {Status.SKIPPED}


def test_stop_in_the_canary_skips_the_later_batches(fleet: Fleet) -> None:
    stop = threading.Event()
    fleet.on_request = lambda host, op: stop.set()
    reporter = Recorder()
    run = fleet.run(FAST, stop=stop, reporter=reporter)
    assert run.results["ws01"].status == Status.CHANGED
    assert fleet.opened == ["ws01"]
    assert len(reporter.of("batch")) == 1
    assert {run.results[h].message for h in HOSTS[1:]} == {INTERRUPTED}


def test_stop_ends_the_retries_of_a_host(fleet: Fleet, sleeps: list[float]) -> None:
    stop = threading.Event()
    fleet.script["ws01"] = [ConnectError("refused", host="ws01")] * 3

    def sleep(delay: float) -> None:
        sleeps.append(delay)
        stop.set()  # Ctrl-C during the backoff

    run = fleet.run(replace(FAST, retries=5), stop=stop, sleep=sleep)
    result = run.results["ws01"]
    assert result.status == Status.FAILED and result.attempts == 2 and len(sleeps) == 1
    assert result.message.endswith("(after 2 attempts)")
    assert {run.results[h].status for h in HOSTS[1:]} == {Status.SKIPPED}


# --------------------------------------------------------------------------- an aborted run


def _journaled_run(
    fleet: Fleet, tmp_path: Path, error: type[BaseException]
) -> tuple[state.StateStore, state.RunDetail]:
    """Run the fleet one host at a time with a real journal; ``error`` ends it during ws03."""
    store = state.StateStore(tmp_path / "state")
    journal = state.RunJournal(store, who="tester", command="rollout", action="push", revision="")
    with pytest.raises(error):
        fleet.run(replace(FAST, forks=1, canary="0", batch="100%"), journal=journal)
    [summary] = store.runs()
    return store, store.run(summary.id)


def test_a_push_interrupted_mid_run_ends_the_run_aborted_with_what_completed(
    fleet: Fleet, tmp_path: Path
) -> None:
    # A second Ctrl-C while ws03 is pushed: the push raises KeyboardInterrupt.
    def interrupt(host: str, op: str) -> None:
        if host == "ws03" and op == "inspect":
            raise KeyboardInterrupt

    fleet.on_request = interrupt
    store, detail = _journaled_run(fleet, tmp_path, KeyboardInterrupt)
    assert detail.summary.stopped == runner.ABORTED and detail.summary.finished is not None
    by_host = {r.workstation: r for r in detail.results}
    assert sorted(by_host) == HOSTS
    assert {h for h, r in by_host.items() if r.status == Status.CHANGED} == {"ws01", "ws02"}
    # ws03 was being written: failed, its outcome unknown, and audited as such.
    assert by_host["ws03"].status == Status.FAILED
    assert by_host["ws03"].message.startswith("interrupted while the workstation was being written")
    assert {by_host[h].message for h in HOSTS[3:]} == {state.NOT_REPORTED}
    assert detail.to_retry == HOSTS[2:]
    audited = {(r.workstation, r.status) for r in state.AuditLog(store.directory).query()}
    assert {w for w, _ in audited} == {"ws01", "ws02", "ws03"} and ("ws03", "failed") in audited
    assert fleet.opened == ["ws01", "ws02", "ws03"]  # no workstation started after it


def test_a_journal_that_fails_mid_run_ends_the_run_aborted_with_what_completed(
    fleet: Fleet, tmp_path: Path
) -> None:
    # The audit log cannot be appended to once ws03 is pushed (its lock is a folder now).
    def break_the_log(host: str, op: str) -> None:
        if host == "ws03" and op == "inspect":
            (tmp_path / "state" / state.AUDIT_LOCK_NAME).unlink()
            (tmp_path / "state" / state.AUDIT_LOCK_NAME).mkdir()

    fleet.on_request = break_the_log
    _, detail = _journaled_run(fleet, tmp_path, state.StateError)
    assert detail.summary.stopped == runner.ABORTED and detail.summary.finished is not None
    by_host = {r.workstation: r for r in detail.results}
    assert {h for h, r in by_host.items() if r.status == Status.CHANGED} == {"ws01", "ws02"}
    # ws03 was written, but its records were not: it stays "not reported", to be retried.
    assert fleet.ini("ws03") is not None
    assert by_host["ws03"].message == state.NOT_REPORTED
    assert detail.to_retry == HOSTS[2:]
    assert fleet.opened == ["ws01", "ws02", "ws03"]


# --------------------------------------------------------------------------- push lanes


def test_lanes_of_one_process_are_this_process_thread_pool(
    fleet: Fleet, sleeps: list[float]
) -> None:
    # (tests/test_lanes.py runs forked lanes against the lab)
    fleet.script["ws02"] = [ConnectError("refused", host="ws02")]
    pushers = runner.executor(fleet.stations, fleet.files, fleet.factory, 1, sleep=sleeps.append)
    with pushers:
        assert isinstance(pushers, lanes.Threads) and pushers.note(FAST.forks) == ""
        reporter = Recorder()
        run = fleet.run(FAST, reporter=reporter, executor=pushers)
    assert {h: r.status for h, r in run.results.items()} == dict.fromkeys(HOSTS, Status.CHANGED)
    assert run.results["ws02"].attempts == 2 and len(sleeps) == 1  # the run's own sleep
    assert reporter.of("batch") == [(i, b) for i, b in enumerate(run.batches)]


# --------------------------------------------------------------------------- progress and summary


def test_plain_progress_is_one_line_per_host(fleet: Fleet, sleeps: list[float]) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    fleet.script["ws03"] = [ConnectError("cannot connect: refused", host="ws03")] * 3
    reporter = PlainReporter(console, len(HOSTS), canary=True)
    run = fleet.run(replace(FAST, max_fail=100.0), reporter=reporter, sleep=sleeps.append)
    lines = buffer.getvalue().splitlines()
    assert [line for line in lines if line.startswith("--")] == [
        "-- canary batch: 1 workstation(s)",
        "-- batch 2: 3 workstation(s)",
        "-- batch 3: 3 workstation(s)",
        "-- batch 4: 3 workstation(s)",
    ]
    done = [line for line in lines if line.startswith("[")]
    assert [line.split("]")[0] for line in done] == [f"[{n}/10" for n in range(1, 11)]
    assert done[0] == f"[1/10] ws01: changed - 2 changed ({fleet_duration(done[0])})"
    [failed] = [line for line in done if " ws03: " in line]
    assert (
        f"ws03: failed after 3 attempts - cannot connect: refused ({fleet_duration(failed)})"
        in failed
    )
    assert failed.count("attempts") == 1  # said once, though the runner's message says it too
    assert run.results["ws03"].message == "cannot connect: refused (after 3 attempts)"
    buffer = io.StringIO()
    PlainReporter(Console(file=buffer), 1, canary=False).batch_started(0, ["ws01"])
    assert buffer.getvalue() == "-- batch 1: 1 workstation(s)\n"


def fleet_duration(line: str) -> str:
    found = re.search(r"\((\d+\.\ds)\)$", line)
    assert found is not None, line
    return found[1]


def test_rich_progress_and_the_final_summary(fleet: Fleet) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=150, color_system=None)
    fleet.script["ws03"] = [AuthError("the credentials were rejected", host="ws03")]
    machine = fleet.machines["ws05"]
    machine.start_microsip(machine.users[0])
    with RichReporter(console, len(HOSTS), canary=True) as reporter:
        run = fleet.run(replace(FAST, max_fail=100.0), reporter=reporter)
    assert reporter.counts == Counter({Status.CHANGED: 8, Status.FAILED: 1, Status.BUSY: 1})
    assert reporter.batch == "batch 4"
    live = buffer.getvalue()
    assert "ws03: failed the credentials were rejected" in live  # printed as it happens
    assert "10/10" in live and "changed 8" in live and "failed 1" in live and "busy 1" in live
    buffer.truncate(0)
    groups = {h: ["berlin" if h < "ws06" else "hamburg"] for h in HOSTS}
    print_summary(console, run, groups, diffs=False)
    summary = buffer.getvalue()
    for title in (f"Run {run.run_id}", "Per group", "Slowest workstations"):
        assert title in summary
    assert re.search(r"berlin\s.*\s3\s.*\s1\s.*\s1\s", summary)  # changed, busy, failed
    assert "2 workstation(s) need attention:" in summary
    lines = summary.splitlines()
    first = lines.index("  ws03: failed - the credentials were rejected")
    assert lines[first + 1].startswith("  ws05: busy - ")  # worst first


# --------------------------------------------------------------------------- the executor seam


def test_an_executor_elsewhere_gets_only_names_and_options_and_the_runner_keeps_the_batches(
    fleet: Fleet,
) -> None:
    # A further executor (workers of another engine) sees what crosses as bytes: a host's
    # name and the run's options go, a result comes back. A Secret or a BuiltFile would not
    # pickle (Secret refuses) or would show among the types that crossed.
    here = runner.executor(fleet.stations, fleet.files, fleet.factory)
    assert isinstance(here, lanes.Threads)
    crossed: list[type] = []

    def elsewhere(host: str, options: RolloutOptions, stop: threading.Event) -> HostResult:
        host, options = pickle.loads(pickle.dumps((host, options)))  # noqa: S301 - our own bytes
        crossed.extend({type(host), type(options)})
        result = here.work(host, options, stop)
        crossed.append(type(result))
        return pickle.loads(pickle.dumps(result))  # type: ignore[no-any-return]  # noqa: S301

    fleet.script["ws03"] = [AuthError("the credentials were rejected", host="ws03")]
    run = fleet.run(replace(FAST, max_fail=20.0), executor=lanes.Threads(elsewhere))
    assert set(crossed) == {str, RolloutOptions, HostResult}
    # The runner's decisions stand: canary, batches of 3, the threshold after batch 2.
    assert run.batches == [HOSTS[:1], HOSTS[1:4], HOSTS[4:7], HOSTS[7:]]
    assert run.results["ws03"].status == Status.FAILED
    assert run.stopped.startswith("failure threshold exceeded after batch 2: 1 of 4 failed")
    assert {run.results[h].status for h in HOSTS[4:]} == {Status.SKIPPED}
