"""Phase 2 for a fleet: canary and batches, at most ``forks`` pushes at a time, retries, a
failure threshold.

``run_fleet`` never raises for a host's failure: every workstation ends with a HostResult.
Reporting hangs off the :class:`~provisioner.records.results.Reporter` hooks; the runner never
prints.
Pushes run on an :class:`Executor` (a thread pool of this process, or push lanes: forked
processes, see :mod:`provisioner.rollout.lanes`), made by :func:`executor`; the batches, the
threshold and Ctrl-C are decided here whichever runs them.
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
from typing import Protocol, TypeVar

from provisioner.errors import OptionError, ProvisionerError
from provisioner.inventory.resolve import StationPlan
from provisioner.records.results import HostResult, Reporter, Status
from provisioner.render.build import BuiltFile
from provisioner.rollout import lanes
from provisioner.rollout.push import PushOptions, _summary, push_host, rollback_host
from provisioner.transport.agent.messages import AgentReply, AgentRequest, ApplyRequest
from provisioner.transport.base import ReadOnlyTransport, Transport

R = TypeVar("R", bound=AgentReply)
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
    # Undo each workstation's last run instead of pushing the inventory's files.
    rollback: bool = False


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
        raise OptionError(
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
    """Records a run as it goes (:class:`provisioner.records.state.RunJournal`)."""

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
    "interrupted: aborted while workstations were being pushed; those are marked failed "
    "and may or may not have been written"
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


class Executor(Protocol):
    """Where a run's pushes execute: threads of this process, forked lanes, or workers of a
    distributed engine.

    Only plain data crosses it: host names and :class:`RolloutOptions` go in, one
    :class:`~provisioner.records.results.HostResult` per host comes out. Each executor is made with
    what it needs to push a host by name (:func:`executor` here); the batches, the canary,
    the threshold and Ctrl-C stay with :func:`run_fleet`. Retries of one host run inside the
    executor, beside its push.
    """

    @property
    def processes(self) -> int:
        """Push processes alive besides this one (0: this process pushes)."""
        ...

    def note(self, forks: int) -> str:
        """How the pushes run, for a run's header ("" when there is nothing to say)."""
        ...

    def session(
        self, params: RolloutOptions, stop: threading.Event, limit: int
    ) -> AbstractContextManager[lanes.Dispatch]:
        """One run: at most ``limit`` hosts in flight; ``stop`` ends retries early."""
        ...


def executor(
    stations: Mapping[str, StationPlan],
    files: Mapping[str, Sequence[BuiltFile]],
    transport_factory: TransportFactory,
    processes: int = 1,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> lanes.Threads[RolloutOptions] | lanes.Lanes[RolloutOptions]:
    """An executor that pushes these stations' files through ``transport_factory``.

    ``processes`` below 2: threads of this process. Else push lanes: enter the result while
    this process has no other thread (before a progress display starts), for they fork then;
    where forking is unsafe they push from threads too and say why (``note``).
    """
    work = _work(stations, files, transport_factory, sleep)
    if processes < 2:
        return lanes.Threads(work)
    return lanes.Lanes(work, _failed, processes, sendable=(RolloutOptions, PushOptions))


class Aborted(KeyboardInterrupt):
    """The run was aborted (a second Ctrl-C) after being recorded; ``run`` says how far it got.

    The workstations that were being pushed are failed results: their files may or may not
    have changed.
    """

    def __init__(self, run: RunResult) -> None:
        super().__init__()
        self.run = run


def run_fleet(
    hosts: Sequence[str],
    pushes: Executor,
    options: RolloutOptions = RolloutOptions(),
    *,
    reporter: Reporter | None = None,
    stop: threading.Event | None = None,
    journal: Journal | None = None,
) -> RunResult:
    """Push every host in batches through ``pushes``; stop launching on ``stop`` or past the
    threshold.

    ``journal``: told of the run's start, of each result as it arrives and of the end, also
    when a second Ctrl-C aborts the run (raised as :class:`Aborted`, after the hosts in
    flight are recorded as failed).
    """
    if options.forks < 1:
        raise OptionError(f"forks must be at least 1, not {options.forks}")
    report = reporter or _NullReporter()
    stop = stop or threading.Event()
    run = RunResult(uuid.uuid4().hex[:12], datetime.now(UTC), options)
    run.batches = plan_batches(sorted(hosts), options.canary, options.batch, options.canary_hosts)
    if journal is not None:
        journal.begin(run, [host for batch in run.batches for host in batch])
        report = _Journaled(report, journal)
    in_flight: set[str] = set()
    try:
        _run_batches(run, pushes, report, stop, in_flight)
    except KeyboardInterrupt:
        run.stopped, run.finished = ABORTED, datetime.now(UTC)
        for host in sorted(in_flight - run.results.keys()):
            result = HostResult(host, Status.FAILED, _interrupted(host), dry_run=options.check)
            run.results[host] = result
            report.host_done(result)
        if journal is not None:
            journal.finish(run)
        raise Aborted(run) from None
    except BaseException:
        if journal is not None:
            run.stopped, run.finished = ABORTED, datetime.now(UTC)
            journal.finish(run)
        raise
    run.finished = datetime.now(UTC)
    if journal is not None:
        journal.finish(run)
    return run


def _interrupted(host: str) -> str:
    return (
        "interrupted while the workstation was being written: its files may or may not have "
        f"changed; see 'provisioner diff {host}'"
    )


def _run_batches(
    run: RunResult,
    pushes: Executor,
    report: Reporter,
    stop: threading.Event,
    in_flight: set[str],
) -> None:
    options = run.options
    attempted = 0
    failures = 0
    # Each workstation records its writes with the run: a rollback there undoes one run.
    tagged = replace(options, push=replace(options.push, run=run.run_id))
    with pushes.session(tagged, stop, options.forks) as dispatch:
        for index, batch in enumerate(run.batches):
            if run.stopped or stop.is_set():
                run.stopped = run.stopped or "interrupted: no new workstation was started"
                _skip(run, batch, report, run.stopped)
                continue
            getattr(report, "batch_started", lambda *_: None)(index, batch)
            _run_batch(run, batch, dispatch, report, stop, in_flight)
            attempted += len(batch)
            failures += sum(1 for h in batch if run.results[h].status in FAILURES)
            if attempted and failures * 100 / attempted > options.max_fail:
                run.stopped = (
                    f"failure threshold exceeded after batch {index + 1}: {failures} of "
                    f"{attempted} failed (more than {options.max_fail:g}%)"
                )
            if stop.is_set() and not run.stopped:
                run.stopped = "interrupted: no new workstation was started"


def _work(
    stations: Mapping[str, StationPlan],
    files: Mapping[str, Sequence[BuiltFile]],
    factory: TransportFactory,
    sleep: Callable[[float], None],
) -> lanes.Work[RolloutOptions]:
    """Push one host by name: what a lane (or a thread of this process) runs."""

    def work(host: str, options: RolloutOptions, stop: threading.Event) -> HostResult:
        station = stations.get(host)
        if station is None:
            return _failed(host, options, "not among the workstations this executor was made for")
        return _push_with_retries(station, files.get(host, ()), factory, options, stop, sleep)

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
    in_flight: set[str],
) -> None:
    pending = list(batch)
    while pending or pushes.busy:
        while pending and pushes.free() > 0 and not stop.is_set():
            host = pending.pop(0)
            report.host_started(host)
            in_flight.add(host)
            pushes.start(host)
        if stop.is_set() and pending:
            _skip(run, pending, report, "interrupted: no new workstation was started")
            pending = []
        if not pushes.busy:
            break
        for host, result in pushes.results():
            in_flight.discard(host)
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
        if options.rollback:
            result = rollback_host(station, files, transport, options.push)
        else:
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

    def request(self, request: AgentRequest[R]) -> R:
        if isinstance(request, ApplyRequest):
            for item in request.files:
                first = self.sent.get(item.path, (item.expect_sha256, ""))[0]
                self.sent[item.path] = (first, item.sha256)
        return self.inner.request(request)

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
