"""Phase 2 for a fleet: canary and batches, at most ``forks`` pushes at a time, retries, a
failure threshold.

``run_fleet`` never raises for a host's failure: every workstation ends with a HostResult.
Reporting hangs off the :class:`~provisioner.results.Reporter` hooks; the runner never prints.
Pushes run on a thread pool of this process, or on push lanes (forked processes, see
:mod:`provisioner.lanes`) opened with :func:`open_lanes` and passed as ``executor``; the
batches, the threshold and Ctrl-C are decided here either way.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from provisioner import lanes
from provisioner.build import BuiltFile
from provisioner.errors import ProvisionerError
from provisioner.push import PushOptions, _summary, push_host
from provisioner.resolve import StationPlan
from provisioner.results import HostResult, Reporter, Status
from provisioner.transport.base import ReadOnlyTransport, Transport

FAILURES = (Status.FAILED, Status.CONFLICT)


@dataclass(frozen=True)
class RolloutOptions:
    """How a rollout proceeds. Sizes are a count (``5``) or a share of the fleet (``10%``)."""

    forks: int = 20
    canary: str = "1"
    batch: str = "100%"
    max_fail: float = 10.0
    retries: int = 2
    backoff: float = 1.0
    backoff_cap: float = 30.0
    check: bool = False
    push: PushOptions = field(default_factory=PushOptions)
    # The canary batch by name (``--canary-hosts``), in place of the first ``canary`` hosts.
    canary_hosts: tuple[str, ...] = ()


@dataclass
class RunResult:
    """Every workstation's result, and how the run ended."""

    run_id: str
    started: datetime
    options: RolloutOptions
    results: dict[str, HostResult] = field(default_factory=dict)
    batches: list[list[str]] = field(default_factory=list)
    finished: datetime | None = None
    stopped: str = ""

    def counts(self) -> dict[Status, int]:
        """Results per status."""
        counts = dict.fromkeys(Status, 0)
        for result in self.results.values():
            counts[result.status] += 1
        return counts

    @property
    def failed(self) -> list[HostResult]:
        """Hosts that failed or ended in conflict."""
        return [r for r in self.results.values() if r.status in FAILURES]

    @property
    def ok(self) -> bool:
        """True when every host is changed or unchanged."""
        return all(r.ok for r in self.results.values())


def parse_size(text: str, total: int) -> int:
    """``5`` → 5, ``10%`` → ceil(10% of total); at least 1 when total > 0."""
    text = text.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            size = math.ceil(total * share / 100)
        else:
            size = int(text)
            if size < 1:
                raise ValueError
    except ValueError:
        raise ProvisionerError(
            f"{text!r} is not a size: use a count like 5 or a share like 10%"
        ) from None
    return min(total, max(size, 1 if total else 0))


def plan_batches(
    hosts: Sequence[str], canary: str, batch: str, pinned: Sequence[str] = ()
) -> list[list[str]]:
    """The canary batch first, then batches of ``batch`` size.

    The canary batch is the ``pinned`` hosts (in ``hosts`` order) when given, else the first
    ``canary`` hosts (``0`` for none).
    """
    remaining = list(hosts)
    batches: list[list[str]] = []
    if pinned:
        chosen = set(pinned)
        if first_batch := [h for h in remaining if h in chosen]:
            batches.append(first_batch)
            remaining = [h for h in remaining if h not in chosen]
    elif has_canary(canary) and (first := parse_size(canary, len(remaining))):
        batches.append(remaining[:first])
        remaining = remaining[first:]
    size = parse_size(batch, len(hosts))
    while remaining:
        batches.append(remaining[:size])
        remaining = remaining[size:]
    return batches


def has_canary(canary: str) -> bool:
    """False for ``0``, ``00`` or ``0%``: no canary batch."""
    try:
        return float(canary.strip().removesuffix("%")) != 0
    except ValueError:
        return True  # not a number: parse_size says why


class _NullReporter:
    def host_started(self, host: str) -> None:
        pass

    def host_done(self, result: HostResult) -> None:
        pass

    def batch_started(self, index: int, hosts: Sequence[str]) -> None:
        pass


class Journal(Protocol):
    """Records a run as it goes (:class:`provisioner.state.RunJournal`)."""

    def begin(self, run: RunResult, hosts: Sequence[str]) -> None:
        """The run starts with these workstations, in order."""
        ...

    def host_done(self, result: HostResult) -> None:
        """A workstation ended (before the reporter hears of it)."""
        ...

    def finish(self, run: RunResult) -> None:
        """The run ended; ``run.stopped`` says why it stopped early, if it did."""
        ...


ABORTED = (
    "interrupted: aborted while workstations were being pushed; those are marked "
    "'not reported' and may or may not have been written"
)


class _Journaled:
    """The reporter, with each result journaled first."""

    def __init__(self, inner: Reporter, journal: Journal) -> None:
        self.inner, self.journal = inner, journal

    def host_started(self, host: str) -> None:
        self.inner.host_started(host)

    def host_done(self, result: HostResult) -> None:
        self.journal.host_done(result)
        self.inner.host_done(result)

    def batch_started(self, index: int, hosts: Sequence[str]) -> None:
        getattr(self.inner, "batch_started", lambda *_: None)(index, hosts)


TransportFactory = Callable[[StationPlan], Transport]
PushLanes = lanes.Lanes[RolloutOptions]


def open_lanes(
    stations: Mapping[str, StationPlan],
    files: Mapping[str, Sequence[BuiltFile]],
    transport_factory: TransportFactory,
    processes: int,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> PushLanes:
    """Push lanes for ``run_fleet(..., executor=)`` with these stations, files and factory.

    Enter it while this process has no other thread (before a progress display starts): the
    lanes fork then. With ``processes`` below 2, or where forking is unsafe, there are none
    and ``run_fleet`` pushes from threads of this process.
    """
    return lanes.Lanes(
        _work(stations, files, transport_factory, sleep),
        _failed,
        processes,
        sendable=(RolloutOptions, PushOptions),
        origin=(stations, files, transport_factory),
    )


def run_fleet(
    stations: Mapping[str, StationPlan],
    files: Mapping[str, Sequence[BuiltFile]],
    transport_factory: TransportFactory,
    options: RolloutOptions = RolloutOptions(),
    *,
    reporter: Reporter | None = None,
    stop: threading.Event | None = None,
    sleep: Callable[[float], None] = time.sleep,
    executor: PushLanes | None = None,
    journal: Journal | None = None,
) -> RunResult:
    """Push every station in batches; stop launching on ``stop`` or past the threshold.

    ``executor``: lanes from :func:`open_lanes` with the same stations, files and factory
    (their retries sleep with the ``sleep`` given there). ``journal``: told of the run's
    start, of each result as it arrives and of the end, also when an exception (a second
    Ctrl-C) aborts the run.
    """
    if options.forks < 1:
        raise ProvisionerError(f"forks must be at least 1, not {options.forks}")
    if executor is not None and not executor.made_for(stations, files, transport_factory):
        raise ValueError("the push lanes were opened for other stations, files or factory")
    report = reporter or _NullReporter()
    stop = stop or threading.Event()
    run = RunResult(uuid.uuid4().hex[:12], datetime.now(UTC), options)
    run.batches = plan_batches(
        sorted(stations), options.canary, options.batch, options.canary_hosts
    )
    if journal is not None:
        journal.begin(run, [host for batch in run.batches for host in batch])
        report = _Journaled(report, journal)
    try:
        _run_batches(run, stations, files, transport_factory, report, stop, sleep, executor)
    except BaseException:
        if journal is not None:
            run.stopped, run.finished = ABORTED, datetime.now(UTC)
            journal.finish(run)
        raise
    run.finished = datetime.now(UTC)
    if journal is not None:
        journal.finish(run)
    return run


def _run_batches(
    run: RunResult,
    stations: Mapping[str, StationPlan],
    files: Mapping[str, Sequence[BuiltFile]],
    transport_factory: TransportFactory,
    report: Reporter,
    stop: threading.Event,
    sleep: Callable[[float], None],
    executor: PushLanes | None,
) -> None:
    options = run.options
    attempted = 0
    failures = 0
    with _dispatch(stations, files, transport_factory, options, stop, sleep, executor) as pushes:
        for index, batch in enumerate(run.batches):
            if run.stopped or stop.is_set():
                run.stopped = run.stopped or "interrupted: no new workstation was started"
                _skip(run, batch, report, run.stopped)
                continue
            getattr(report, "batch_started", lambda *_: None)(index, batch)
            _run_batch(run, batch, pushes, report, stop)
            attempted += len(batch)
            failures += sum(1 for h in batch if run.results[h].status in FAILURES)
            if attempted and failures * 100 / attempted > options.max_fail:
                run.stopped = (
                    f"failure threshold exceeded after batch {index + 1}: {failures} of "
                    f"{attempted} failed (more than {options.max_fail:g}%)"
                )
            if stop.is_set() and not run.stopped:
                run.stopped = "interrupted: no new workstation was started"


def _dispatch(
    stations: Mapping[str, StationPlan],
    files: Mapping[str, Sequence[BuiltFile]],
    factory: TransportFactory,
    options: RolloutOptions,
    stop: threading.Event,
    sleep: Callable[[float], None],
    executor: PushLanes | None,
) -> AbstractContextManager[lanes.Dispatch]:
    """The lanes' session for this run, or a thread pool of this process."""
    if executor is not None and executor.processes:
        return executor.session(options, stop, options.forks)
    return lanes.InProcess(_work(stations, files, factory, sleep), options, stop, options.forks)


def _work(
    stations: Mapping[str, StationPlan],
    files: Mapping[str, Sequence[BuiltFile]],
    factory: TransportFactory,
    sleep: Callable[[float], None],
) -> lanes.Work[RolloutOptions]:
    """Push one host by name: what a lane (or a thread of this process) runs."""

    def work(host: str, options: RolloutOptions, stop: threading.Event) -> HostResult:
        return _push_with_retries(
            stations[host], files.get(host, ()), factory, options, stop, sleep
        )

    return work


def _failed(host: str, options: RolloutOptions, reason: str) -> HostResult:
    return HostResult(host, Status.FAILED, reason, dry_run=options.check)


def _skip(run: RunResult, hosts: Sequence[str], report: Reporter, reason: str) -> None:
    for host in hosts:
        if host not in run.results:
            result = HostResult(host, Status.SKIPPED, reason, attempts=0, dry_run=run.options.check)
            run.results[host] = result
            report.host_done(result)


def _run_batch(
    run: RunResult,
    batch: Sequence[str],
    pushes: lanes.Dispatch,
    report: Reporter,
    stop: threading.Event,
) -> None:
    pending = list(batch)
    while pending or pushes.busy:
        while pending and pushes.free() > 0 and not stop.is_set():
            host = pending.pop(0)
            report.host_started(host)
            pushes.start(host)
        if stop.is_set() and pending:
            _skip(run, pending, report, "interrupted: no new workstation was started")
            pending = []
        if not pushes.busy:
            break
        for host, result in pushes.results():
            run.results[host] = result
            report.host_done(result)


def _push_with_retries(
    station: StationPlan,
    files: Sequence[BuiltFile],
    factory: TransportFactory,
    options: RolloutOptions,
    stop: threading.Event,
    sleep: Callable[[float], None],
) -> HostResult:
    """Retry only retryable failures (connect, timeout), with capped exponential backoff.

    The result's duration is the host's whole time: every attempt and the waits between them.
    """
    started = time.monotonic()
    attempt = 0
    sent: dict[str, tuple[str | None, str]] = {}
    while True:
        attempt += 1
        try:
            transport: Transport = _SentFiles(factory(station), sent)
        except ProvisionerError as exc:
            return HostResult(
                station.workstation.name,
                Status.FAILED,
                str(exc),
                attempts=attempt,
                dry_run=options.check,
                duration=time.monotonic() - started,
            )
        if options.check:
            transport = ReadOnlyTransport(transport)
        result = push_host(station, files, transport, options.push, dry_run=options.check)
        result.attempts = attempt
        result.duration = time.monotonic() - started
        if attempt > 1:
            _count_lost_writes(result, sent)
        if not (result.retryable and result.status == Status.FAILED):
            return result
        if attempt > options.retries or stop.is_set():
            if attempt > 1:
                result.message += f" (after {attempt} attempts)"
            return result
        delay = min(options.backoff_cap, options.backoff * 2 ** (attempt - 1))
        sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not security


class _SentFiles:
    """Remembers, per path, the hash before the first apply sent and the hash last sent."""

    def __init__(self, inner: Transport, sent: dict[str, tuple[str | None, str]]) -> None:
        self.inner = inner
        self.sent = sent

    @property
    def host(self) -> str:
        return self.inner.host

    def request(self, op: str, request: Mapping[str, Any]) -> dict[str, Any]:
        if op == "apply":
            for item in request.get("files") or []:
                path, expect = str(item.get("path")), item.get("expect_sha256")
                first = self.sent.get(path, (expect, ""))[0]
                self.sent[path] = (first, str(item.get("sha256")))
        return self.inner.request(op, request)

    def close(self) -> None:
        self.inner.close()


def _count_lost_writes(result: HostResult, sent: Mapping[str, tuple[str | None, str]]) -> None:
    """A file an earlier attempt wrote (its answer lost in a reset) was changed by this run.

    The retry finds it up to date; without this the run would call it unchanged and the
    audit log would miss the change.
    """
    lost = False
    for index, change in enumerate(result.files):
        before, written = sent.get(change.path, (None, ""))
        if change.status == Status.UNCHANGED and written == change.new_sha256 != before:
            lost = True
            result.files[index] = replace(
                change,
                status=Status.CHANGED,
                old_sha256=before,
                message="written by an earlier attempt whose answer was lost",
            )
    if lost:
        result.status = max(result.status, Status.CHANGED, key=lambda s: s.rank)
        result.message = _summary(result.files)
