"""Push lanes: the fleet's pushes from forked processes, against the lab on loopback.

Lanes fork only while the process has a single thread, and the lab runs threads in this
process; so each test forks its lanes first, then starts the lab. The lanes reach it over
loopback like a real controller: their transport factory reads the lab file when it is first
called (after the lab is up), and tests inject faults into the lab and read its emulated disks
here. Every wait is bounded: a run that does not end within :data:`BOUND` seconds fails.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from provisioner import parallel
from provisioner.inventory import resolve
from provisioner.inventory.model import Secret
from provisioner.lab import Faults
from provisioner.lab.inventory_lab import InventoryLab, start_inventory_lab
from provisioner.records.results import HostResult, Status
from provisioner.render import build
from provisioner.rollout import connections, lanes, runner
from provisioner.rollout.runner import RolloutOptions, RunResult, run_fleet
from provisioner.secrets import secretstore
from provisioner.transport.base import Transport
from tests.labkit import WINRM_PASSWORD, example_lab, write_inventory

HOSTS = [f"ws{n:02d}" for n in range(1, 13)]
OPTIONS = RolloutOptions(forks=4, canary="0", batch="100%", max_fail=100.0, retries=0)
INTERRUPTED = "interrupted: no new workstation was started"
BOUND = 60.0  # seconds for any run; the runs here take about one
CANARY = "Canary-Lane-Pw-4e1d"
T = TypeVar("T")


@dataclass
class Fleet:
    """A built inventory and its transport factory; labs started on demand, stopped at the end."""

    tmp: Path
    keyring: Any
    result: build.BuildResult
    stations: dict[str, resolve.StationPlan] = field(default_factory=dict)
    files: dict[str, list[build.BuiltFile]] = field(default_factory=dict)
    labs: list[InventoryLab] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.result.inventory is not None
        for item in self.result.files:
            self.files.setdefault(item.target.workstation, []).append(item)
        self.stations = {n: resolve.resolve_station(self.result.inventory, n) for n in self.files}
        self.factory = self.factory_for(self.tmp / "lab.json")

    def factory_for(self, lab_file: Path) -> Callable[[resolve.StationPlan], Transport]:
        """A factory that reads ``lab_file`` when first called (in whichever process)."""
        loaded: dict[int, connections.LabMap] = {}

        def factory(plan: resolve.StationPlan) -> Transport:
            lab = loaded.get(os.getpid()) or loaded.setdefault(
                os.getpid(), connections.LabMap.load(lab_file)
            )
            return connections.open_transport(plan, self.keyring, lab, timeout=10)

        return factory

    def start_lab(self, lab_file: Path | None = None) -> InventoryLab:
        """A lab emulating every workstation; its map in ``lab_file`` (default: the factory's)."""
        assert self.result.inventory is not None
        folder = self.tmp / f"lab{len(self.labs)}"
        lab = start_inventory_lab(self.result.inventory, self.keyring, folder=folder, port=0)
        self.labs.append(lab)
        (lab_file or self.tmp / "lab.json").write_text(lab.lab_map().dump(), encoding="utf-8")
        return lab

    def lanes(self, processes: int = 2) -> lanes.Lanes[RolloutOptions]:
        pushes = runner.executor(self.stations, self.files, self.factory, processes)
        assert isinstance(pushes, lanes.Lanes)
        return pushes

    def run(
        self,
        options: RolloutOptions = OPTIONS,
        *,
        executor: runner.Executor | None = None,
        **kwargs: Any,
    ) -> RunResult:
        pushes = executor or runner.executor(self.stations, self.files, self.factory)
        return bounded(lambda: run_fleet(sorted(self.stations), pushes, options, **kwargs))


def bounded(call: Callable[[], T], seconds: float = BOUND) -> T:
    """``call()`` on a thread; fails the test if it has not returned within ``seconds``."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("ok", call()))
        except BaseException as exc:
            outcome.append(("error", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds:g} s: a hang"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def only_thread() -> None:
    """Lanes fork only while this is the process's single thread."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    assert not others, f"threads left by an earlier test keep the lanes from forking: {others}"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    keyring = write_inventory(tmp_path / "inventory", workstations=len(HOSTS))
    result = build.build(tmp_path / "inventory", opener_factory=lambda _: keyring)
    assert result.ok, [str(f) for f in result.findings]
    made = Fleet(tmp_path, keyring, result)
    try:
        yield made
    finally:
        for lab in made.labs:
            lab.stop()


class Recorder:
    """Reporter hooks as the runner calls them: in order, with the process they ran in."""

    def __init__(self, on_done: Callable[[HostResult], None] = lambda _: None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.pids: set[int] = set()
        self.peak = 0
        self.on_done = on_done

    def batch_started(self, index: int, hosts: list[str]) -> None:
        self.events.append(("batch", index))

    def host_started(self, host: str) -> None:
        self._event("start", host)

    def host_done(self, result: HostResult) -> None:
        self._event("done", result.host)
        self.on_done(result)

    def _event(self, kind: str, host: str) -> None:
        self.pids.add(os.getpid())
        self.events.append((kind, host))
        self.peak = max(self.peak, len(self.of("start")) - len(self.of("done")))

    def of(self, kind: str) -> list[Any]:
        return [value for event, value in self.events if event == kind]


def managed(lab: InventoryLab) -> dict[tuple[str, str], bytes | None]:
    """Every managed file of the fleet: (host, path) to its bytes."""
    files: dict[tuple[str, str], bytes | None] = {}
    for number, host in enumerate(HOSTS, start=1):
        machine = lab.workstations[host]
        user = machine.lookup_account(f"ACME\\u{number}x1")
        assert user is not None
        for path in (machine.ini_path(user), machine.override_path()):
            files[(host, path)] = machine.read(path)
    return files


def outcome(run: RunResult) -> dict[str, Any]:
    """What must not depend on where the pushes ran: statuses, messages, files and hashes."""
    return {
        host: (
            result.status,
            result.message,
            result.attempts,
            result.dry_run,
            [(c.path, c.status, c.old_sha256, c.new_sha256, c.diff) for c in result.files],
        )
        for host, result in run.results.items()
    }


def wait_until_dead(pid: int) -> None:
    """Until every thread of ``pid`` has exited (so its pipes are closed), at most BOUND s.

    The main thread turns zombie before the others are gone, and the pipes close with the last.
    """
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            return  # reaped
        states = set()
        for task in tasks:
            try:
                states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                # A thread that went while being looked at: the others may still run (this
                # returned early before, and the next run met a lane still holding its pipes).
                states.add("?")
        if states <= {"Z", "X"}:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still runs {BOUND:g} s after SIGKILL")


# --------------------------------------------------------------------------- same results


def test_two_lanes_push_exactly_what_the_thread_pool_pushes(fleet: Fleet) -> None:
    only_thread()
    with fleet.lanes(2) as pushers:
        assert pushers.processes == 2 and pushers.fallback == "", pushers.fallback
        assert len(set(pushers.pids)) == 2 and os.getpid() not in pushers.pids
        in_lanes = fleet.start_lab()
        threads = fleet.start_lab(fleet.tmp / "threads.json")
        by_threads = fleet.factory_for(fleet.tmp / "threads.json")
        options = replace(OPTIONS, canary="1", batch="5")
        for check, expected in ((True, Status.CHANGED), (False, Status.CHANGED), (False, None)):
            reporter = Recorder()
            mine = fleet.run(replace(options, check=check), reporter=reporter, executor=pushers)
            theirs = bounded(
                lambda check=check: run_fleet(
                    sorted(fleet.stations),
                    runner.executor(fleet.stations, fleet.files, by_threads),
                    replace(options, check=check),
                )
            )
            assert outcome(mine) == outcome(theirs)
            assert (
                mine.batches == theirs.batches == [HOSTS[:1], HOSTS[1:6], HOSTS[6:11], HOSTS[11:]]
            )
            statuses = {r.status for r in mine.results.values()}
            assert statuses == {expected or Status.UNCHANGED}, mine.results
            assert managed(in_lanes) == managed(threads)  # byte for byte, both labs
            # the hooks ran here, in order, never more than forks hosts in flight
            assert reporter.pids == {os.getpid()}
            assert sorted(reporter.of("start")) == sorted(reporter.of("done")) == HOSTS
            assert reporter.of("batch") == [0, 1, 2, 3] and 1 < reporter.peak <= options.forks
        assert all(data is not None for data in managed(in_lanes).values())
        assert pushers.processes == 2  # preview, push and second push: the same two lanes
    assert pushers.processes == 0
    # closing the pipes ended them: they exited by themselves at EOF, nobody killed them
    assert [lane.process.exitcode for lane in pushers._lanes] == [0, 0]


def test_the_threshold_stops_after_the_same_batch_in_lanes(fleet: Fleet) -> None:
    only_thread()
    with fleet.lanes(2) as pushers:
        lab = fleet.start_lab()
        lab.hosts["ws03"].set_faults(Faults(http_401=True))
        reporter = Recorder()
        options = replace(OPTIONS, canary="1", batch="4", max_fail=10.0)
        run = fleet.run(options, reporter=reporter, executor=pushers)
    # batches [ws01] [ws02..ws05] [ws06..ws09] [ws10..ws12]: 1 of 5 failed after batch 2
    reason = "failure threshold exceeded after batch 2: 1 of 5 failed (more than 10%)"
    assert run.stopped == reason
    assert run.results["ws03"].status == Status.FAILED
    assert "credentials" in run.results["ws03"].message
    skipped = HOSTS[5:]
    assert sorted(h for h, r in run.results.items() if r.status == Status.SKIPPED) == skipped
    assert {run.results[h].message for h in skipped} == {reason}
    assert all(lab.hosts[h].request_count == 0 for h in skipped)
    assert reporter.of("batch") == [0, 1] and sorted(reporter.of("start")) == HOSTS[:5]


# --------------------------------------------------------------------------- Ctrl-C


def test_stop_lets_the_lanes_finish_what_is_in_flight_and_starts_nothing(fleet: Fleet) -> None:
    only_thread()
    stop = threading.Event()
    with fleet.lanes(2) as pushers:
        lab = fleet.start_lab()

        def ctrl_c(result: HostResult) -> None:
            # the terminal sends SIGINT to the whole process group: the lanes ignore it
            for pid in pushers.pids:
                os.kill(pid, signal.SIGINT)
            stop.set()  # what the CLI's handler does in the parent

        reporter = Recorder(on_done=ctrl_c)
        run = fleet.run(OPTIONS, reporter=reporter, stop=stop, executor=pushers)
        disks = managed(lab)
        assert pushers.processes == 2
    started = reporter.of("start")
    assert started == HOSTS[: OPTIONS.forks]  # forks hosts in flight, then nothing new
    for host in started:
        assert run.results[host].status == Status.CHANGED  # finished, not abandoned
        assert all(disks[key] is not None for key in disks if key[0] == host)
    for host in HOSTS[OPTIONS.forks :]:
        assert (run.results[host].status, run.results[host].message) == (
            Status.SKIPPED,
            INTERRUPTED,
        )
        assert lab.hosts[host].request_count == 0
    assert run.stopped == INTERRUPTED and sorted(reporter.of("done")) == HOSTS


def test_stop_ends_the_retries_inside_a_lane(fleet: Fleet) -> None:
    only_thread()
    stop = threading.Event()
    with fleet.lanes(2) as pushers:
        lab = fleet.start_lab()
        lab.hosts["ws01"].set_faults(Faults(refuse=True))
        reporter = Recorder()
        reporter.host_started = lambda host: stop.set()  # type: ignore[method-assign]
        # Without the stop reaching the lane, ws01 would try 1,001 times.
        options = replace(OPTIONS, forks=2, retries=1000, backoff=0.01, backoff_cap=0.01)
        run = fleet.run(options, reporter=reporter, stop=stop, executor=pushers)
    result = run.results["ws01"]
    assert result.status == Status.FAILED and result.retryable
    assert result.attempts <= 20, result.attempts
    assert {run.results[h].status for h in HOSTS[1:]} == {Status.SKIPPED}


def test_closing_the_lanes_keeps_a_freeze_made_before_them(fleet: Fleet) -> None:
    only_thread()
    gc.freeze()  # made by whoever embeds the engine, before the lanes open
    try:
        frozen = gc.get_freeze_count()
        with fleet.lanes(2) as pushers:
            assert pushers.processes == 2
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()


# --------------------------------------------------------------------------- a lane dies


def test_a_killed_lane_fails_its_hosts_in_flight_and_the_run_goes_on(fleet: Fleet) -> None:
    only_thread()
    with fleet.lanes(2) as pushers:
        first, second = pushers.pids
        lab = fleet.start_lab()
        killed: list[int] = []

        def kill_while_writing(event: str) -> None:
            # ws01 is the first host dispatched, so it runs on the first lane: kill that lane
            # while the lab writes ws01's files, before the answer reaches it.
            if not killed:
                killed.append(first)
                os.kill(first, signal.SIGKILL)

        lab.workstations["ws01"].observe(kill_while_writing)
        run = fleet.run(OPTIONS, executor=pushers)
        assert killed == [first]
        reason = (
            f"push process {first} was killed by SIGKILL while pushing this workstation: "
            "it may be partly written, push it again"
        )
        failed = sorted(h for h, r in run.results.items() if r.status == Status.FAILED)
        assert "ws01" in failed and len(failed) <= 2  # the first lane's share of forks 4
        assert {run.results[h].message for h in failed} == {reason}
        assert all(not run.results[h].retryable for h in failed)
        assert sorted(run.results) == HOSTS
        assert all(r.status == Status.CHANGED for h, r in run.results.items() if h not in failed)
        assert pushers.processes == 1 and pushers.pids == [second]

        # the next run uses the lane left; once that one is gone too, this process pushes
        again = fleet.run(OPTIONS, executor=pushers)
        assert all(r.ok for r in again.results.values()), again.results
        os.kill(second, signal.SIGKILL)
        wait_until_dead(second)
        last = fleet.run(replace(OPTIONS, check=True), executor=pushers)
        assert {r.status for r in last.results.values()} == {Status.UNCHANGED}, last.results
        assert pushers.processes == 0


# --------------------------------------------------------------------------- no fork, no lanes


def test_lanes_fall_back_to_threads_when_a_thread_is_running(fleet: Fleet) -> None:
    lab = fleet.start_lab()  # the lab's threads run in this process now
    with fleet.lanes(2) as pushers:
        assert pushers.processes == 0 and pushers.pids == []
        assert pushers.fallback == "another thread is running (forking now could deadlock a child)"
        reporter = Recorder()
        run = fleet.run(OPTIONS, reporter=reporter, executor=pushers)
    assert {r.status for r in run.results.values()} == {Status.CHANGED}
    assert all(data is not None for data in managed(lab).values())
    assert sorted(reporter.of("done")) == HOSTS


def test_one_process_wanted_means_no_lanes_and_auto_needs_a_large_run(fleet: Fleet) -> None:
    with runner.executor(fleet.stations, fleet.files, fleet.factory, 1) as pushers:
        assert isinstance(pushers, lanes.Threads)
        assert pushers.processes == 0 and pushers.note(20) == ""
    assert lanes.choose_processes(lanes.MIN_HOSTS - 1, 20) == 1
    cores = parallel.available_cores()
    assert lanes.choose_processes(lanes.MIN_HOSTS, 20) == max(1, min(cores, 10))
    assert lanes.choose_processes(10_000, 3) == 1  # one fork per process would not pay
    assert lanes.choose_processes(5, 20, requested=3) == 3


def test_a_host_the_executor_was_not_made_for_fails_alone(fleet: Fleet) -> None:
    fleet.start_lab()
    fewer = {host: fleet.stations[host] for host in HOSTS[:3]}
    pushes = runner.executor(fewer, fleet.files, fleet.factory)
    run = bounded(
        lambda: run_fleet([*HOSTS[:3], "ws-unknown"], pushes, replace(OPTIONS, max_fail=100))
    )
    assert run.results["ws-unknown"].status == Status.FAILED
    assert "not among the workstations" in run.results["ws-unknown"].message
    assert {run.results[h].status for h in HOSTS[:3]} == {Status.CHANGED}


# --------------------------------------------------------------------------- no secret crosses


def test_no_secret_crosses_a_lane_pipe(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ws01's user gets the canary password; rebuild so that the built files hold it
    recipients = secretstore.load_recipients(fleet.tmp / "inventory")
    pointer = "/users/u1x1/accounts/main/password"
    secretstore.set_secret(fleet.tmp / "inventory", pointer, Secret(CANARY), recipients)
    result = build.build(fleet.tmp / "inventory", opener_factory=lambda _: fleet.keyring)
    assert result.ok
    canary_fleet = Fleet(fleet.tmp, fleet.keyring, result)
    # every message written to or from a lane, in the parent and in the children, lands here
    wire = tmp_path / "wire.bin"
    write = lanes._write

    def recording(connection: Any, data: bytes) -> None:
        descriptor = os.open(wire, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(descriptor, len(data).to_bytes(4, "big") + data)
        finally:
            os.close(descriptor)
        write(connection, data)

    monkeypatch.setattr(lanes, "_write", recording)
    only_thread()
    with canary_fleet.lanes(2) as pushers:
        assert pushers.processes == 2
        lab = canary_fleet.start_lab()
        fleet.labs.append(lab)
        run = canary_fleet.run(OPTIONS, executor=pushers)
    assert {r.status for r in run.results.values()} == {Status.CHANGED}
    # the canary did reach ws01 (so a leak would show), and the wire did record both ways
    assert any(CANARY.encode("utf-16-le") in (d or b"") for d in managed(lab).values())
    data = wire.read_bytes()
    assert b"ws01" in data and b"done" in data and b"HostResult" in data
    assert b"RolloutOptions" in data
    for secret in (CANARY, WINRM_PASSWORD):
        for form in (secret.encode(), secret.encode("utf-16-le"), secret.lower().encode()):
            assert form not in data, f"{secret} crossed a pipe"


def test_only_allowed_types_are_pickled_across() -> None:
    types = lanes._Types((HostResult, Status, RolloutOptions))
    result = HostResult("ws01", Status.CHANGED, "2 changed")
    again = lanes._decode(lanes._encode(("done", "ws01", result), types), types)
    assert again == ("done", "ws01", result)
    for value in (Secret(CANARY), Path("/x"), object()):
        with pytest.raises(pickle.PicklingError, match="may not cross to a push process"):
            lanes._encode(("push", value), types)
    smuggled = pickle.dumps(("done", "ws01", Path("/x")))
    with pytest.raises(pickle.UnpicklingError, match="may not cross a push pipe"):
        lanes._decode(smuggled, types)


# --------------------------------------------------------------------------- the CLI


def test_rollout_pushes_from_processes_and_validates_the_option(tmp_path: Path) -> None:
    with example_lab(tmp_path) as example:
        for extra, message in (
            (("--processes", "3", "--forks", "2"), "--processes 3 needs --forks 3 or more"),
            (("--processes", "-1"), "--processes is 0 (automatic), 1 (this process only)"),
            (("--processes", "33"), "or a number of push processes up to 32, not 33"),
        ):
            refused = example.cli("rollout", "--yes", *extra)
            assert refused.returncode == 1, (extra, refused.stdout, refused.stderr)
            assert message in refused.stderr and "selected" not in refused.stdout
        assert all(host.request_count == 0 for host in example.lab.hosts.values())
        pushed = example.cli("rollout", "--yes", "--processes", "2", "--forks", "4")
        assert pushed.returncode == 0, (pushed.stdout, pushed.stderr)
        assert "; pushing from 2 processes (forks 4 shared)" in pushed.stdout
        assert pushed.stdout.count(": changed") == 9
        assert all(data is not None for data in example.all_files().values())
        again = example.cli("rollout", "--yes", "--check")  # 9 hosts: automatic, no lanes
        assert again.returncode == 0 and "pushing from" not in again.stdout
        assert again.stdout.count(": unchanged") == 9


def _quick_or_fatal(host: str, params: object, stop: threading.Event) -> HostResult:
    if host == "dies":
        time.sleep(0.2)  # after the other host's answer is in the pipe
        os._exit(3)  # the whole lane goes
    return HostResult(host, Status.CHANGED, "written")


def _failed(host: str, params: object, reason: str) -> HostResult:
    return HostResult(host, Status.FAILED, reason)


def test_answers_a_dead_lane_sent_before_dying_still_count() -> None:
    only_thread()
    with lanes.Lanes(_quick_or_fatal, _failed, 2) as pushers:
        assert pushers.processes == 2
        first = pushers._lanes[0]
        with pushers.session(None, threading.Event(), 3) as dispatch:
            dispatch.start("written-first")  # shares 2 and 1: both go to the first lane
            dispatch.start("dies")
            assert first.in_flight == ["written-first", "dies"]
            first.process.join(BOUND)
            assert first.process.exitcode == 3
            # Found dead on a send: what it answered before is read, not thrown away.
            assert not dispatch._send(first, ("push", "next"))  # type: ignore[attr-defined]
            results = dict(bounded(dispatch.results))
    assert results["written-first"].status == Status.CHANGED
    assert results["dies"].status == Status.FAILED
    assert "ended unexpectedly (exit code 3)" in results["dies"].message
