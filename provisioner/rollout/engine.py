"""A change to workstations, planned then executed: what ``push``, ``rollback``, ``user
regenerate`` and ``rollout`` share.

:func:`plan` runs Phase 1 for the selection, checks that the state folder is free and every
workstation's WinRM credential may go where it would be sent, and groups the files by
workstation; nothing is contacted. :func:`execute` opens the executor (forked lanes before
any thread starts), runs the preview and asks the :class:`Frontend` when asked to, takes
the rollout lock, runs the fleet with a journal in the state folder, and writes the reports.
The command line keeps its options, its questions and its printing (the frontend).
"""

from __future__ import annotations

import getpass
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Protocol

from provisioner.errors import ConfirmationError, ProvisionerError, StateError
from provisioner.inventory import resolve
from provisioner.inventory.model import Finding, Inventory
from provisioner.records import report, revision, state
from provisioner.records.results import HostResult, Reporter
from provisioner.render import build
from provisioner.rollout import connections, lanes, runner
from provisioner.secrets import vault
from provisioner.transport.base import Transport

# The signals a record's writes hold back: Ctrl-C, and the polite request to stop.
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)

OpenerFactory = Callable[[vault.Recipients], vault.Opener]
"""The keys in use, opened for these recipients (the caller finds and unlocks them)."""


class PlanError(ProvisionerError):
    """Phase 1 or a check before the run refused it: ``findings`` (Phase 1's) and ``lines``
    (one per other problem) say why."""

    code: ClassVar[str] = "plan"

    def __init__(
        self, message: str, lines: Sequence[str] = (), findings: Sequence[Finding] = ()
    ) -> None:
        super().__init__(message)
        self.lines, self.findings = tuple(lines), tuple(findings)


@dataclass(frozen=True)
class Request:
    """What to change: the selection, how the run proceeds, where it is recorded."""

    inventory: Path
    options: runner.RolloutOptions
    limit: str = ""
    command: str = "rollout"  # recorded with the run, as the user would type it
    action: str = "push"  # the audit records' action: push, reset, regenerate, rollback
    selection: str = ""  # the selection as the user gave it, for messages
    workstation: str = ""  # one named workstation (push, rollback): unknown names are errors
    canary_hosts: str = ""  # the canary batch as a --limit expression
    processes: int = 0  # push processes: 0 automatic, 1 this process only
    timeout: int | None = None  # seconds per WinRM request (None: the inventory's)
    lab_file: Path | None = None
    state_folder: Path | None = None  # where runs are recorded (needed unless a plain check)
    report_json: Path | None = None
    report_junit: Path | None = None
    # doctor: files carry placeholders (it needs only their names), no lock is probed, and a
    # credential outside its scope is for the checks to report, not a refusal.
    diagnostic: bool = False

    @property
    def state(self) -> Path:
        """The state folder this request records in."""
        if self.state_folder is None:
            raise StateError(f"{self.command} records in a state folder, and none was given")
        return self.state_folder


@dataclass
class Plan:
    """Phase 1 done for a request: the files per workstation and how to reach each one."""

    request: Request
    options: runner.RolloutOptions  # the request's, with the canary hosts named
    inventory: Inventory
    revision: str  # the inventory's git commit, read before its files were
    stations: dict[str, resolve.StationPlan]
    files: dict[str, list[build.BuiltFile]]
    keyring: vault.Opener  # opens the WinRM passwords
    recipients: vault.Recipients  # the inventory's keys
    lab: connections.LabMap | None
    warnings: tuple[Finding, ...]

    @property
    def users(self) -> int:
        """User profiles selected (every workstation has one override.ini besides)."""
        return sum(1 for files in self.files.values() for f in files if f.target.user)

    @property
    def groups(self) -> dict[str, list[str]]:
        """Each workstation's groups, for summaries."""
        return {name: list(plan.groups) for name, plan in self.stations.items()}

    def transport(self, station: resolve.StationPlan, *, diagnostic: bool = False) -> Transport:
        """A fresh transport to one of the plan's workstations."""
        return connections.open_transport(
            station, self.keyring, self.lab, timeout=self.request.timeout, diagnostic=diagnostic
        )


class Frontend(Protocol):
    """Whoever drives a run: the command line shows, asks and reports progress."""

    def announce(self, plan: Plan, note: str) -> None:
        """The run is about to start; ``note`` says how it pushes (processes), if anything."""
        ...

    def approve(self, plan: Plan, preview: runner.RunResult | None) -> bool:
        """Go ahead? ``preview``: what a dry run found (None where there is none: rollback)."""
        ...

    def progress(self, plan: Plan) -> AbstractContextManager[Reporter]:
        """A reporter for the run, entered once the executor is open."""
        ...


def plan(request: Request, keys: OpenerFactory) -> Plan:
    """Phase 1 and the checks before any workstation is contacted; raises :class:`PlanError`.

    ``keys`` is called once, with the inventory's recipients, when a selected file needs a
    secret; its opener also opens the WinRM passwords.
    """
    options = request.options
    writes = not (options.check or request.diagnostic)
    if writes and request.state.is_dir():
        # Fail fast when another run holds the state, or when the run could not be recorded
        # (a damaged fingerprint key): not after Phase 1 and the preview. The lock itself is
        # taken again for the run.
        with state.StateStore(request.state).lock(f"{getpass.getuser()}: {request.command}"):
            state.load_fingerprints(request.state)
    inventory_revision = revision.inventory_revision(request.inventory)  # before the files
    built, keyring = _phase1(request, keys)
    assert built.inventory is not None  # noqa: S101 - a clean build has an inventory
    model = built.inventory
    files: dict[str, list[build.BuiltFile]] = {}
    for item in built.files:
        files.setdefault(item.target.workstation, []).append(item)
    stations = {name: resolve.resolve_station(model, name) for name in files}
    if request.workstation:
        _check_workstation(request, model, stations)
    if not stations:
        raise PlanError(f"no workstation matches the selection {request.selection}")
    lab = connections.LabMap.load(request.lab_file) if request.lab_file else None
    refused = [] if request.diagnostic else connections.refused_connections(stations, keyring, lab)
    if refused and request.workstation:  # one workstation: its refusal is the error
        raise PlanError(refused[0])
    if refused:
        raise PlanError(
            f"{len(refused)} workstation(s) cannot be reached with their WinRM credential "
            "(see above); nothing was contacted",
            refused,
        )
    if request.canary_hosts:
        options = replace(options, canary_hosts=_pinned_canary(model, files, request))
    warnings = tuple(f for f in built.findings if f.severity != "error")
    assert built.recipients is not None  # noqa: S101 - a clean build has recipients
    return Plan(
        request,
        options,
        model,
        inventory_revision,
        stations,
        files,
        keyring,
        built.recipients,
        lab,
        warnings,
    )


def _phase1(request: Request, keys: OpenerFactory) -> tuple[build.BuildResult, vault.Opener]:
    opened: list[vault.Opener] = []

    def factory(recipients: vault.Recipients) -> vault.Opener:
        keyring = keys(recipients)
        opened.append(keyring)
        return build.placeholder_opener(recipients) if request.diagnostic else keyring

    result = build.build(
        request.inventory,
        selection=resolve.Selection(request.limit),
        opener_factory=factory,
    )
    model = result.inventory
    if model is not None and request.workstation and request.workstation not in model.workstations:
        raise PlanError(f"no workstation {request.workstation!r} in {request.inventory}")
    if not result.ok:
        raise PlanError(
            "Phase 1 found errors; no workstation was contacted (fix them and run again)",
            findings=result.findings,
        )
    if not opened:  # nothing selected, so no key was needed
        assert result.recipients is not None  # noqa: S101 - a clean build has recipients
        return result, build.placeholder_opener(result.recipients)
    return result, opened[0]


def _check_workstation(
    request: Request, model: Inventory, stations: Mapping[str, resolve.StationPlan]
) -> None:
    """``push WS --user U``: every named user must be on that workstation."""
    name = request.workstation
    users = request.options.push.users
    known = model.workstations[name].users
    unknown = [u for u in users if u not in known]
    if unknown:
        raise PlanError(f"{', '.join(unknown)} not on {name}")


def _pinned_canary(
    model: Inventory, files: Mapping[str, Sequence[build.BuiltFile]], request: Request
) -> tuple[str, ...]:
    """The selected workstations that ``--canary-hosts`` names (any of their targets)."""
    expression = request.canary_hosts
    pick = resolve.Selection(expression, option="--canary-hosts")
    pinned = tuple(
        name
        for name in sorted(files)
        if any(pick.matches(model, name, f.target.user) for f in files[name])
    )
    if not pinned:
        raise PlanError(f"--canary-hosts {expression!r} matches none of the selected workstations")
    return pinned


def canary_warnings(plan: Plan) -> list[str]:
    """``--canary-hosts`` terms that matched nothing (a typo next to a good term)."""
    if not plan.request.canary_hosts:
        return []
    pick = resolve.Selection(plan.request.canary_hosts, option="--canary-hosts")
    return list(pick.unmatched(plan.inventory))


def execute(
    plan: Plan, frontend: Frontend, *, ask: bool, stop: threading.Event | None = None
) -> runner.RunResult:
    """Run the plan: preview and approval when ``ask``, then the run under the lock,
    recorded as it goes (a check is not recorded), then the reports.

    ``stop`` set (the first Ctrl-C): no new workstation starts. A second Ctrl-C raises
    :class:`runner.Aborted` once the run is recorded. A refused approval raises
    :class:`Declined`.
    """
    request, options = plan.request, plan.options
    stop = stop or threading.Event()
    wanted = lanes.choose_processes(len(plan.stations), options.forks, request.processes)
    pushes = runner.executor(plan.stations, plan.files, _transport_factory(plan), wanted)
    # The lanes fork here, before the progress display or anything else starts a thread; the
    # preview and the real run both use them.
    with pushes:
        frontend.announce(plan, pushes.note(options.forks))
        if ask:
            preview = None
            if not options.rollback:
                preview = runner.run_fleet(
                    sorted(plan.stations),
                    pushes,
                    replace(options, check=True, canary="0", canary_hosts=(), max_fail=100),
                )
            if not frontend.approve(plan, preview):
                raise Declined
        who = getpass.getuser()
        # A check records nothing: it makes no state folder unless a report needs its key.
        reports = bool(request.report_json or request.report_junit)
        store = None
        if not options.check or reports:
            store = state.StateStore(request.state, create=not options.check or reports)
        lock = (
            nullcontext()
            if store is None or options.check
            else store.lock(f"{who}: {request.command}")
        )
        # Recorded as it goes: a run killed halfway still lists what it wrote.
        journal = None
        if store is not None and not options.check:
            journal = _Uninterruptible(
                state.RunJournal(
                    store,
                    who=who,
                    command=request.command,
                    action=request.action,
                    revision=plan.revision,
                )
            )
        with lock, frontend.progress(plan) as reporter:
            run = runner.run_fleet(
                sorted(plan.stations),
                pushes,
                options,
                reporter=reporter,
                stop=stop,
                journal=journal,
            )
    if store is not None and request.report_json:
        report.write_run_json(
            run, request.report_json, fingerprints=store.fingerprints, revision=plan.revision
        )
    if store is not None and request.report_junit:
        report.write_run_junit(run, request.report_junit, fingerprints=store.fingerprints)
    return run


class Declined(ConfirmationError):
    """The frontend did not approve the run: nothing was written."""

    code: ClassVar[str] = "declined"

    def __init__(self) -> None:
        super().__init__("not confirmed: nothing was written")


def _transport_factory(plan: Plan) -> runner.TransportFactory:
    def transport(station: resolve.StationPlan) -> Transport:
        return plan.transport(station)

    return transport


def record(
    store: state.StateStore,
    run: runner.RunResult,
    *,
    who: str,
    command: str,
    action: str,
    revision: str,
) -> None:
    """A run and its audit records, written with Ctrl-C held back until both are: a run
    recorded without its audit records would hide a change (recording takes milliseconds)."""
    with uninterrupted():
        store.record_run(run, who=who, command=command, revision=revision)
        records = state.records_for_run(run, who, action=action, fingerprints=store.fingerprints)
        state.AuditLog(store.directory).append(records)


class _Uninterruptible:
    """A run journal whose writes Ctrl-C cannot cut in two (see :func:`record`)."""

    def __init__(self, journal: state.RunJournal) -> None:
        self.journal = journal

    def begin(self, run: runner.RunResult, hosts: Sequence[str]) -> None:
        with uninterrupted():
            self.journal.begin(run, hosts)

    def host_done(self, result: HostResult) -> None:
        with uninterrupted():
            self.journal.host_done(result)

    def finish(self, run: runner.RunResult) -> None:
        with uninterrupted():
            self.journal.finish(run)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back for the block, then delivered (see :func:`record`).

    Only the main thread receives signals and may set their handlers; elsewhere the block runs
    as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)  # each one: a second Ctrl-C means abort

    previous: dict[signal.Signals, Any] = {}
    try:
        for held_signal in HELD_SIGNALS:
            # None: a handler set outside Python, which could not be put back.
            if signal.getsignal(held_signal) is not None:
                previous[held_signal] = signal.signal(held_signal, hold)
        yield
    finally:
        for held_signal, handler in previous.items():
            signal.signal(held_signal, handler)
        for caught in held:
            signal.raise_signal(caught)
