"""``rollout``, ``runs`` and ``audit``: the fleet commands."""

from __future__ import annotations

import getpass
import json
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from provisioner.cli.common import (
    IdentityOpt,
    IfRunningOpt,
    PassFdOpt,
    PassFileOpt,
    StateOpt,
    echo,
    keyring_for_keys_in_use,
    make_console,
    state_dir,
)
from provisioner.cli.helpstyle import App
from provisioner.cli.phase1 import finding_lines
from provisioner.errors import ProvisionerError

if TYPE_CHECKING:
    from provisioner import build as phase1
    from provisioner import runner, state, vault
    from provisioner.model import Inventory
    from provisioner.results import HostResult

InventoryOpt = Annotated[
    Path,
    typer.Option(
        "--inventory", "-i", metavar="DIR", envvar="PROVISIONER_INVENTORY", file_okay=False
    ),
]
LabOpt = Annotated[
    Path | None,
    typer.Option(
        "--lab",
        metavar="FILE",
        envvar="PROVISIONER_LAB_FILE",
        help="Lab file from 'provisioner lab up': use the emulated workstations.",
    ),
]

runs_app = App(help="Past rollouts recorded in the state folder.", no_args_is_help=True)


def shown_selection(limit: str, only_failed: str | None = None) -> str:
    """The selection as the user gave it on the command line, for messages."""
    parts = []
    if only_failed is not None:
        run = "" if only_failed in ("", "last") else f" {shlex.quote(only_failed)}"
        parts.append(f"--only-failed{run}")
    if limit:
        parts.append(f"--limit {shlex.quote(limit)}")
    return " ".join(parts) or "(the whole inventory)"


# The signals a record's writes hold back: Ctrl-C, and the polite request to stop.
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    from provisioner import state

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


@contextmanager
def interrupt_to(stop: threading.Event) -> Iterator[None]:
    """First Ctrl-C: stop launching new workstations; the second one aborts at once."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.set()
        print(
            "\ninterrupt: finishing the workstations in flight, starting no new one "
            "(Ctrl-C again to abort)",
            file=sys.stderr,
        )

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _phase1(
    inventory: Path,
    limit: str,
    identities: list[Path] | None,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
) -> tuple[phase1.BuildResult, vault.Opener]:
    from provisioner import build as phase1
    from provisioner import resolve

    opened: list[vault.Opener] = []

    def factory(recipients: vault.Recipients) -> vault.Opener:
        keyring = keyring_for_keys_in_use(recipients, identities, passphrase_file, passphrase_fd)
        opened.append(keyring)
        return keyring

    result = phase1.build(
        inventory,
        selection=resolve.Selection(limit),
        opener_factory=factory,
        process_lifetime=True,
    )
    # Warnings too (a --limit term that matches nothing, a hook MicroSIP will mangle): the
    # admin sees them before anything is pushed.
    for line in finding_lines(result.findings):
        echo(line)
    if not result.ok:
        raise ProvisionerError(
            "Phase 1 found errors; no workstation was contacted (fix them and run again)"
        )
    if not opened:  # nothing selected, so no key was needed: the caller says so
        assert result.recipients is not None  # noqa: S101 - a clean build has recipients
        return result, phase1.placeholder_opener(result.recipients)
    return result, opened[0]


def _pinned_canary(
    model: Inventory, files: Mapping[str, Sequence[phase1.BuiltFile]], expression: str
) -> tuple[str, ...]:
    """The selected workstations that ``--canary-hosts`` names (any of their targets)."""
    from provisioner import resolve

    pick = resolve.Selection(expression, option="--canary-hosts")
    pinned = tuple(
        name
        for name in sorted(files)
        if any(pick.matches(model, name, f.target.user) for f in files[name])
    )
    if not pinned:
        raise ProvisionerError(
            f"--canary-hosts {expression!r} matches none of the selected workstations"
        )
    for warning in pick.unmatched(model):  # a typo next to a good term: a smaller canary
        echo(f"warning: {warning}")
    return pinned


def _canary_said(options: runner.RolloutOptions) -> str:
    hosts = options.canary_hosts
    if not hosts:
        return options.canary
    more = f" and {len(hosts) - 3} more" if len(hosts) > 3 else ""
    return ", ".join(hosts[:3]) + more


def execute(
    *,
    inventory: Path,
    limit: str,
    options: runner.RolloutOptions,
    identities: list[Path] | None,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    lab_file: Path | None,
    state_folder: Path | None,
    timeout: int,
    quiet: bool,
    yes: bool,
    show_diff: bool,
    report_json: Path | None,
    report_junit: Path | None,
    action: str = "push",
    command: str = "rollout",
    selection: str | None = None,
    processes: int = 0,
    canary_hosts: str = "",
    retry: str = "",
) -> runner.RunResult:
    """Phase 1, confirmation, the rollout itself, state, audit and reports.

    ``selection`` says in messages what the user selected (default: ``--limit LIMIT``).
    ``processes``: push lanes (0: automatic, 1: this process only). ``canary_hosts``: the
    canary batch as a ``--limit`` expression. ``retry``: the command that retries this run,
    when not the rollout's ``--only-failed``.
    """
    from provisioner import connections, lanes, report, resolve, revision, runner, state
    from provisioner.cli.progress import PlainReporter, RichReporter, print_summary
    from provisioner.results import Reporter, Status

    console = make_console()
    if not options.check and state_dir(inventory, state_folder).is_dir():
        # Fail fast when another rollout holds the state, or when the run could not be
        # recorded (a damaged fingerprint key): not after Phase 1 and the preview. The lock
        # itself is taken again below, for the run.
        with state.StateStore(state_dir(inventory, state_folder)).lock(
            f"{getpass.getuser()}: {command}"
        ):
            state.load_fingerprints(state_dir(inventory, state_folder))
    inventory_revision = revision.inventory_revision(inventory)  # before the files are read
    built, keyring = _phase1(inventory, limit, identities, passphrase_file, passphrase_fd)
    assert built.inventory is not None  # noqa: S101 - a clean build has an inventory
    model = built.inventory
    files: dict[str, list[phase1.BuiltFile]] = {}
    for item in built.files:
        files.setdefault(item.target.workstation, []).append(item)
    stations = {name: resolve.resolve_station(model, name) for name in files}
    if not stations:
        shown = selection if selection is not None else shown_selection(limit)
        raise ProvisionerError(f"no workstation matches the selection {shown}")
    lab = connections.LabMap.load(lab_file) if lab_file else None
    refused = connections.refused_connections(stations, keyring, lab)
    if refused:
        for line in refused:
            echo(line)
        raise ProvisionerError(
            f"{len(refused)} workstation(s) cannot be reached with their WinRM credential "
            "(see above); nothing was contacted"
        )
    if canary_hosts:
        options = replace(options, canary_hosts=_pinned_canary(model, files, canary_hosts))

    def transport(plan: resolve.StationPlan) -> Any:
        return connections.open_transport(plan, keyring, lab, timeout=timeout)

    groups = {name: list(plan.groups) for name, plan in stations.items()}
    users = sum(len(f) - 1 for f in files.values())
    wanted = lanes.choose_processes(len(stations), options.forks, processes)
    # The lanes fork here, before the progress display or anything else starts a thread; the
    # preview and the real run both use them.
    with runner.open_lanes(stations, files, transport, wanted) as pushers:
        console.print(
            f"{len(stations)} workstation(s), {users} user profile(s) selected; "
            f"batches: canary {_canary_said(options)}, then {options.batch}; "
            f"stop above {options.max_fail:g}% failures{_lanes_said(pushers, options.forks)}"
        )
        if not options.check and not yes:
            if not sys.stdin.isatty():
                raise ProvisionerError("not a terminal: pass --yes to confirm, or --check to look")
            preview = runner.run_fleet(
                stations,
                files,
                transport,
                replace(options, check=True, canary="0", canary_hosts=(), max_fail=100),
                executor=pushers,
            )
            counts = preview.counts()
            print_summary(console, preview, groups, diffs=show_diff)
            if not typer.confirm(
                f"Apply: {counts[Status.CHANGED]} workstation(s) will change, "
                f"{counts[Status.UNCHANGED]} are up to date. Proceed?",
                default=False,
            ):
                raise typer.Exit(1)
        folder = state_dir(inventory, state_folder)
        # A check records nothing: it makes no state folder unless a report needs its key.
        store = state.StateStore(
            folder, create=not options.check or bool(report_json or report_junit)
        )
        stop = threading.Event()
        who = getpass.getuser()
        lock = store.lock(f"{who}: {command}") if not options.check else nullcontext()
        canary = bool(options.canary_hosts) or runner.has_canary(options.canary)
        # Recorded as it goes: a run killed halfway still lists what it wrote (a check is
        # not recorded at all).
        journal = (
            None
            if options.check
            else _Uninterruptible(
                state.RunJournal(
                    store, who=who, command=command, action=action, revision=inventory_revision
                )
            )
        )
        with lock, interrupt_to(stop):
            reporter: Reporter
            if quiet or not console.is_terminal:
                reporter = PlainReporter(console, len(stations), canary=canary)
                run = runner.run_fleet(
                    stations,
                    files,
                    transport,
                    options,
                    reporter=reporter,
                    stop=stop,
                    executor=pushers,
                    journal=journal,
                )
            else:
                with RichReporter(console, len(stations), canary=canary) as rich_reporter:
                    run = runner.run_fleet(
                        stations,
                        files,
                        transport,
                        options,
                        reporter=rich_reporter,
                        stop=stop,
                        executor=pushers,
                        journal=journal,
                    )
    print_summary(console, run, groups, diffs=show_diff, retry=retry)
    if inventory_revision.endswith(revision.DIRTY) and not options.check:
        console.print(
            f"note: recorded as {revision.short(inventory_revision)}: the inventory differs "
            "from its last commit (or git could not compare them)"
        )
    if report_json:
        report.write_run_json(
            run, report_json, fingerprints=store.fingerprints, revision=inventory_revision
        )
    if report_junit:
        report.write_run_junit(run, report_junit, fingerprints=store.fingerprints)
    return run


def _lanes_said(pushers: runner.PushLanes, forks: int) -> str:
    """The header's note on push processes: empty when one process was wanted."""
    if pushers.processes:
        return f"; pushing from {pushers.processes} processes (forks {forks} shared)"
    if pushers.fallback:
        return f"; pushing from this process only: {pushers.fallback}"
    return ""


def check_processes(processes: int, forks: int) -> None:
    """``--processes``: 0 (automatic), 1 (this process) or up to MAX_PROCESSES, at most forks."""
    from provisioner.lanes import MAX_PROCESSES

    if not 0 <= processes <= MAX_PROCESSES:
        raise ProvisionerError(
            f"--processes is 0 (automatic), 1 (this process only) or a number of push "
            f"processes up to {MAX_PROCESSES}, not {processes}"
        )
    if processes > forks:
        raise ProvisionerError(
            f"--processes {processes} needs --forks {processes} or more: each process pushes "
            "at least one workstation at a time"
        )


def rollout(
    inventory: InventoryOpt = Path("."),
    limit: Annotated[
        str, typer.Option("--limit", "-l", metavar="TARGETS", help="Targets (see validate).")
    ] = "",
    check: Annotated[bool, typer.Option("--check", help="Change nothing; report.")] = False,
    diff: Annotated[bool, typer.Option("--diff", help="Show diffs (passwords masked).")] = False,
    detailed_exitcode: Annotated[
        bool,
        typer.Option(
            "--detailed-exitcode",
            help="With --check: exit 4 when a workstation would change (drift), 0 when every "
            "one is up to date.",
        ),
    ] = False,
    forks: Annotated[int, typer.Option("--forks", metavar="N", min=1, max=500)] = 20,
    canary: Annotated[
        str, typer.Option("--canary", metavar="N|P%", help="First batch: N or P%; 0 for none.")
    ] = "1",
    canary_hosts: Annotated[
        str,
        typer.Option(
            "--canary-hosts",
            metavar="TARGETS",
            help="The canary batch by name instead: workstations as in --limit (names, globs, "
            "group:NAME), e.g. the IT department's own.",
        ),
    ] = "",
    batch: Annotated[
        str, typer.Option("--batch", metavar="N|P%", help="Later batches: N or P%.")
    ] = "100%",
    max_fail: Annotated[
        str,
        typer.Option(
            "--max-fail", metavar="P%", help="Stop when more than P% of attempted hosts failed."
        ),
    ] = "10%",
    retries: Annotated[int, typer.Option("--retries", metavar="N", min=0, max=10)] = 2,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            metavar="N",
            help="Push from N processes sharing --forks (0: one per core for large runs; "
            "1: this process only).",
        ),
    ] = 0,
    timeout: Annotated[
        int, typer.Option("--timeout", metavar="SECONDS", min=5, help="Seconds per request.")
    ] = 60,
    if_running: IfRunningOpt = "skip",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    only_failed: Annotated[
        str | None,
        typer.Option(
            "--only-failed",
            metavar="RUN",
            help="Only the hosts that failed, were busy or skipped in RUN (bare: the last run).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Plain lines, no progress bar.")
    ] = False,
    report_json: Annotated[Path | None, typer.Option("--report-json", metavar="FILE")] = None,
    report_junit: Annotated[Path | None, typer.Option("--report-junit", metavar="FILE")] = None,
    state_folder: StateOpt = None,
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
) -> None:
    """Push the inventory to every selected workstation: canary, batches, threshold, retries.

    Exit 0 when every workstation is changed or unchanged, 3 when any failed, was busy or was
    skipped, 1 on input errors (nothing contacted); with --check --detailed-exitcode, 4 when
    nothing failed but a workstation would change.
    """
    from provisioner import report, runner, state
    from provisioner.push import PushOptions

    if detailed_exitcode and not check:
        raise ProvisionerError("--detailed-exitcode reports drift and needs --check")

    try:
        threshold = float(max_fail.rstrip("%"))
        if not 0 <= threshold <= 100:
            raise ValueError
    except ValueError:
        raise ProvisionerError("--max-fail is a percentage such as 10%") from None
    check_processes(processes, forks)
    if canary_hosts and not any(term.strip() for term in canary_hosts.split(",")):
        # "$A,$B" with both empty would otherwise select everything: a canary of the fleet.
        raise ProvisionerError(f"--canary-hosts {canary_hosts!r} names no workstation")
    runner.plan_batches([], canary, batch)  # bad sizes are input errors: fail before Phase 1
    selection = shown_selection(limit, only_failed)
    if only_failed is not None:
        store = state.StateStore(state_dir(inventory, state_folder), create=False)
        asked = None if only_failed in ("", "last") else only_failed
        hosts = store.hosts_to_retry(asked)
        latest = store.latest_run(include_dry_runs=False, fleet_only=True)
        used = store.resolve_run_id(asked) if asked else (latest.id if latest else "?")
        if not hosts:
            echo(f"nothing to retry: every workstation of run {used} succeeded")
            return
        echo(f"retrying the {len(hosts)} workstation(s) of run {used} that did not succeed")
        limit = ",".join(f"ws:{h}" for h in hosts) + (f",&{limit}" if limit else "")
    options = runner.RolloutOptions(
        forks=forks,
        canary=canary,
        batch=batch,
        max_fail=threshold,
        retries=retries,
        check=check,
        push=PushOptions(if_running=if_running),
    )

    run = execute(
        inventory=inventory,
        limit=limit,
        options=options,
        identities=identities,
        passphrase_file=passphrase_file,
        passphrase_fd=passphrase_fd,
        lab_file=lab,
        state_folder=state_folder,
        timeout=timeout,
        quiet=quiet,
        yes=yes,
        show_diff=diff,
        report_json=report_json,
        report_junit=report_junit,
        selection=selection,
        processes=processes,
        canary_hosts=canary_hosts,
    )
    code = report.exit_code(run, detailed=detailed_exitcode)
    if code:
        raise typer.Exit(code)


@runs_app.command("list")
def runs_list(
    inventory: InventoryOpt = Path("."),
    state_folder: StateOpt = None,
    limit: Annotated[int, typer.Option("--last", metavar="N", help="How many runs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The most recent rollouts, newest first."""
    from provisioner import state

    store = state.StateStore(state_dir(inventory, state_folder), create=False)
    summaries = store.runs(limit)
    if as_json:
        echo(json.dumps([s.to_dict() for s in summaries], indent=2, default=str))
        return
    from provisioner.cli.history import run_lines

    for line in run_lines(summaries):
        echo(line)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix will do).")],
    inventory: InventoryOpt = Path("."),
    state_folder: StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every workstation and file of one rollout."""
    from provisioner import state

    store = state.StateStore(state_dir(inventory, state_folder), create=False)
    detail = store.run(run_id)
    if as_json:
        echo(json.dumps(detail.to_dict(), indent=2, default=str))
        return
    echo(str(detail))


def audit(
    inventory: InventoryOpt = Path("."),
    state_folder: StateOpt = None,
    user: Annotated[str | None, typer.Option("--user", "-u", metavar="NAME")] = None,
    workstation: Annotated[str | None, typer.Option("--workstation", "-w", metavar="NAME")] = None,
    since: Annotated[
        str | None, typer.Option("--since", metavar="TIME", help="ISO date or time.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", metavar="TIME", help="ISO date or time.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Who changed which file, when, in which run (never a secret)."""
    from provisioner import state

    log = state.AuditLog(state_dir(inventory, state_folder))
    records = log.query(user=user, workstation=workstation, since=since, until=until)
    if as_json:
        echo(json.dumps([r.to_dict() for r in records], indent=2, default=str))
        return
    from provisioner.cli.history import audit_lines

    for line in audit_lines(records):
        echo(line)
    echo(f"{len(records)} record(s)")
