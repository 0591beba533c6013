"""What every command that writes to workstations does around the engine: find the keys, show
the plan, ask, show progress, print the outcome.

``rollout`` and ``user regenerate`` show a fleet (a header, batches, a summary); ``push`` and
``rollback`` show one workstation file by file. Both ask before writing unless ``--yes``,
and refuse to run without a terminal to ask on.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer

from provisioner.cli.common import echo, keyring_for_keys_in_use, make_console
from provisioner.cli.phase1 import finding_lines
from provisioner.errors import ConfirmationError

if TYPE_CHECKING:
    from rich.console import Console

    from provisioner.records.results import HostResult, Reporter
    from provisioner.rollout import engine, runner
    from provisioner.secrets import vault


@dataclass(frozen=True)
class Keys:
    """Where the private keys come from (``--identity``, ``--passphrase-file``/``-fd``)."""

    identities: list[Path] | None = None
    passphrase_file: Path | None = None
    passphrase_fd: int | None = None
    required: bool = True  # False: a missing identity only leaves secrets unopened (doctor)

    def opener(self, recipients: vault.Recipients) -> vault.Opener:
        """The keys in use for these recipients, unlocked."""
        return keyring_for_keys_in_use(
            recipients,
            self.identities,
            self.passphrase_file,
            self.passphrase_fd,
            required=self.required,
        )


def plan(request: engine.Request, keys: Keys) -> engine.Plan:
    """The engine's plan, its findings printed (warnings too: before anything is pushed)."""
    from provisioner.rollout import engine

    try:
        planned = engine.plan(request, keys.opener)
    except engine.PlanError as exc:
        for line in [*finding_lines(exc.findings), *exc.lines]:
            echo(line)
        raise
    for line in finding_lines(planned.warnings):
        echo(line)
    for warning in engine.canary_warnings(planned):
        echo(f"warning: {warning}")
    return planned


@dataclass
class _Terminal:
    """The engine's frontend on a terminal (or a pipe, with ``--yes``)."""

    console: Console
    single: bool  # one workstation: no header and no progress; its files at the end
    show_diff: bool
    quiet: bool
    stop: threading.Event = field(default_factory=threading.Event)

    def announce(self, plan: engine.Plan, note: str) -> None:
        if self.single:
            return
        options = plan.options
        self.console.print(
            f"{len(plan.stations)} workstation(s), {plan.users} user profile(s) selected; "
            f"batches: canary {_canary_said(options)}, then {options.batch}; "
            f"stop above {options.max_fail:g}% failures" + (f"; {note}" if note else "")
        )

    def approve(self, plan: engine.Plan, preview: runner.RunResult | None) -> bool:
        from provisioner.cli.progress import print_summary
        from provisioner.records.results import Status

        if not sys.stdin.isatty():
            raise ConfirmationError("not a terminal: pass --yes to confirm, or --check to look")
        if preview is None:  # a rollback: the agent decides what the last run was
            names = ", ".join(sorted(plan.stations))
            question = (
                f"Undo the last run that changed the selected files on {names} (remove what it "
                "created, restore what it replaced)?"
            )
        elif self.single:
            for result in preview.results.values():
                print_result(result, show_diff=True)
            counts = preview.counts()
            question = "Apply these changes?" if counts[Status.CHANGED] else "Push anyway?"
        else:
            counts = preview.counts()
            print_summary(self.console, preview, plan.groups, diffs=self.show_diff)
            question = (
                f"Apply: {counts[Status.CHANGED]} workstation(s) will change, "
                f"{counts[Status.UNCHANGED]} are up to date. Proceed?"
            )
        return typer.confirm(question, default=False)

    @contextmanager
    def progress(self, plan: engine.Plan) -> Iterator[Reporter]:
        from provisioner.cli.progress import PlainReporter, RichReporter
        from provisioner.rollout.runner import has_canary

        canary = bool(plan.options.canary_hosts) or has_canary(plan.options.canary)
        total = len(plan.stations)
        with interrupt_to(self.stop):
            if self.single:
                yield _Silent()
            elif self.quiet or not self.console.is_terminal:
                yield PlainReporter(self.console, total, canary=canary)
            else:
                with RichReporter(self.console, total, canary=canary) as reporter:
                    yield reporter


class _Silent:
    """One workstation: its result is printed whole at the end."""

    def host_started(self, host: str) -> None:
        pass

    def host_done(self, result: HostResult) -> None:
        pass


def run(
    request: engine.Request,
    keys: Keys,
    *,
    yes: bool,
    show_diff: bool,
    quiet: bool = False,
    retry: str = "",
) -> runner.RunResult:
    """Plan, announce, ask (unless ``yes`` or a check), run and print the outcome.

    Exit code 3 when a workstation failed; the caller picks other codes (``--check`` drift).
    """
    from provisioner.records import revision
    from provisioner.rollout import engine, runner

    planned = plan(request, keys)
    console = make_console()
    single = bool(request.workstation)
    frontend = _Terminal(console, single, show_diff, quiet)
    try:
        result = engine.execute(
            planned, frontend, ask=not (request.options.check or yes), stop=frontend.stop
        )
    except runner.Aborted as exc:
        result = exc.run
    if single:
        for host in result.results.values():
            print_result(host, show_diff=show_diff)
        if not request.options.check:
            echo(f"recorded as run {result.run_id} in {request.state}")
    else:
        from provisioner.cli.progress import print_summary

        print_summary(console, result, planned.groups, diffs=show_diff, retry=retry)
    if planned.revision.endswith(revision.DIRTY) and not request.options.check:
        console.print(
            f"note: recorded as {revision.short(planned.revision)}: the inventory differs "
            "from its last commit (or git could not compare them)"
        )
    return result


def _canary_said(options: runner.RolloutOptions) -> str:
    hosts = options.canary_hosts
    if not hosts:
        return options.canary
    more = f" and {len(hosts) - 3} more" if len(hosts) > 3 else ""
    return ", ".join(hosts[:3]) + more


def print_result(result: HostResult, *, show_diff: bool) -> None:
    """One line per host, one per file, diffs on request."""
    mode = " (dry run: nothing written)" if result.dry_run else ""
    echo(f"{result.host}: {result.status.value}{mode} - {result.message}  [{result.duration:.2f}s]")
    for change in result.files:
        note = f"  {change.message}" if change.message else ""
        echo(f"  {change.status.value:<10} {change.label}{note}")
        for conflict in change.conflicts:
            echo(f"    conflict: {conflict} changed on the workstation too; the inventory won")
        if show_diff and change.diff:
            for line in change.diff.splitlines():
                echo(f"    {line}")
    for warning in result.warnings:
        echo(f"  warning: {warning}")


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
