"""Live progress and the final summary of a rollout: rich on a terminal, plain lines otherwise."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from provisioner.records.report import fleet_versions
from provisioner.records.results import HostResult, Status
from provisioner.rollout.runner import RunResult

STYLES = {
    Status.CHANGED: "green",
    Status.UNCHANGED: "dim",
    Status.BUSY: "yellow",
    Status.SKIPPED: "yellow",
    Status.CONFLICT: "red",
    Status.FAILED: "bold red",
}


def batch_label(index: int, canary: bool) -> str:
    """``canary batch`` for the first batch of a run with a canary, else ``batch N``."""
    return "canary batch" if canary and index == 0 else f"batch {index + 1}"


class PlainReporter:
    """One line per workstation, for logs and pipes."""

    def __init__(self, console: Console, total: int, *, canary: bool = True) -> None:
        self.console = console
        self.total = total
        self.canary = canary
        self.done = 0
        self._lock = threading.Lock()

    def batch_started(self, index: int, hosts: Sequence[str]) -> None:
        """Announce a batch."""
        label = batch_label(index, self.canary)
        self.console.print(f"-- {label}: {len(hosts)} workstation(s)", highlight=False)

    def host_started(self, host: str) -> None:
        """Nothing to show until the host is done."""

    def host_done(self, result: HostResult) -> None:
        """Print the host's outcome."""
        with self._lock:
            self.done += 1
            tries = f" after {result.attempts} attempts" if result.attempts > 1 else ""
            # The runner ends the message of a host that ran out of retries with the same
            # words: said once, after the status.
            message = result.message.removesuffix(f" (after {result.attempts} attempts)")
            self.console.print(
                f"[{self.done}/{self.total}] {result.host}: {result.status.value}{tries} "
                f"- {message} ({result.duration:.1f}s)",
                highlight=False,
                markup=False,
            )


class RichReporter:
    """A progress bar with counts per status and the current batch."""

    def __init__(self, console: Console, total: int, *, canary: bool = True) -> None:
        self.canary = canary
        self.counts: Counter[Status] = Counter()
        self.batch = ""
        self._lock = threading.Lock()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[counts]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("rollout", total=total, counts="")

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _refresh(self) -> None:
        counts = "  ".join(
            f"[{STYLES[s]}]{s.value} {self.counts[s]}[/]" for s in Status if self.counts[s]
        )
        self.progress.update(self.task, description=self.batch, counts=counts)

    def batch_started(self, index: int, hosts: Sequence[str]) -> None:
        """Show which batch runs."""
        with self._lock:
            self.batch = batch_label(index, self.canary).removesuffix(" batch")
            self._refresh()

    def host_started(self, host: str) -> None:
        """Nothing: the bar advances when hosts finish."""

    def host_done(self, result: HostResult) -> None:
        """Count the outcome and advance the bar; failures are printed as they happen."""
        with self._lock:
            self.counts[result.status] += 1
            self.progress.advance(self.task)
            if result.status in (Status.FAILED, Status.CONFLICT):
                self.progress.console.print(
                    f"[red]{result.host}: {result.status.value}[/] {result.message}",
                    highlight=False,
                )
            self._refresh()


def print_summary(
    console: Console,
    run: RunResult,
    groups: Mapping[str, Sequence[str]],
    *,
    diffs: bool,
    retry: str = "",
) -> None:
    """Diffs, then per status, per group, the slowest hosts, every failure and what next.

    ``retry``: the command that retries this run (default: the rollout's ``--only-failed``).
    """
    # Diffs first: on a large fleet the tables and the list of problems must end the output.
    if diffs:
        for result in sorted(run.results.values(), key=lambda r: r.host):
            for change in result.files:
                if change.diff:
                    console.print(
                        f"--- {result.host} {change.label}", highlight=False, markup=False
                    )
                    console.print(change.diff, highlight=False, markup=False)
    counts = run.counts()
    # A dry run is not recorded in the state folder: no id that 'runs show' would not know.
    title = (
        "Check (dry run): nothing written, not recorded"
        if run.options.check
        else f"Run {run.run_id}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("status")
    table.add_column("workstations", justify="right")
    for status in Status:
        if counts[status]:
            table.add_row(f"[{STYLES[status]}]{status.value}[/]", str(counts[status]))
    console.print(table)
    per_group: dict[str, Counter[Status]] = {}
    for host, result in run.results.items():
        for group in groups.get(host, ()) or ("(no group)",):
            per_group.setdefault(group, Counter())[result.status] += 1
    if len(per_group) > 1:
        by_group = Table(title="Per group", title_justify="left")
        by_group.add_column("group")
        for status in Status:
            by_group.add_column(status.value, justify="right")
        for group, group_counts in sorted(per_group.items()):
            by_group.add_row(group, *(str(group_counts[s] or "") for s in Status))
        console.print(by_group)
    versions = fleet_versions(run)
    if versions:
        # Parsed on the controller (digits and dots) or "unreadable": never the raw text.
        by_version = Table(title="MicroSIP versions", title_justify="left")
        by_version.add_column("version")
        by_version.add_column("workstations", justify="right")
        for version, count in versions.items():
            by_version.add_row(version, str(count))
        console.print(by_version)
    outdated = sorted(r.host for r in run.results.values() if r.microsip_outdated)
    if outdated:
        more = f" and {len(outdated) - 10} more" if len(outdated) > 10 else ""
        console.print(
            f"warning: {len(outdated)} workstation(s) run MicroSIP below microsip.min_version "
            f"(or unreadable): {', '.join(outdated[:10])}{more}",
            highlight=False,
            markup=False,
        )
    timed = sorted((r for r in run.results.values() if r.attempts), key=lambda r: -r.duration)
    if timed:
        slow = Table(title="Slowest workstations", title_justify="left")
        slow.add_column("workstation")
        slow.add_column("seconds", justify="right")
        slow.add_column("attempts", justify="right")
        for result in timed[:5]:
            slow.add_row(result.host, f"{result.duration:.2f}", str(result.attempts))
        console.print(slow)
    problems = [r for r in run.results.values() if not r.ok]
    if problems:
        console.print(f"[bold]{len(problems)} workstation(s) need attention:[/]")
        for result in sorted(problems, key=lambda r: (r.status.rank, r.host), reverse=True):
            console.print(
                f"  {result.host}: {result.status.value} - {result.message}",
                highlight=False,
                markup=False,
            )
    if run.stopped:
        console.print(f"[bold yellow]stopped:[/] {run.stopped}", highlight=False)
    if problems and not run.options.check:
        for line in next_steps(run, problems, retry):
            console.print(line, highlight=False, markup=False)


def next_steps(run: RunResult, problems: Sequence[HostResult], retry: str = "") -> list[str]:
    """What to run next about the workstations that need attention."""
    statuses = {r.status for r in problems}
    retry = retry or f"provisioner rollout --only-failed {run.run_id}"
    lines = ["Next:", f"  retry exactly these: {retry} (with the same -i, keys and --lab)"]
    failed = sorted(r.host for r in problems if r.status == Status.FAILED)
    if failed:
        lines.append(f"  diagnose a failed one: provisioner doctor {failed[0]} -i INVENTORY")
    if Status.BUSY in statuses:
        lines.append(
            "  busy: the user's MicroSIP was running; retry later, or add --if-running stop "
            "to close it first"
        )
    if Status.CONFLICT in statuses:
        lines.append(
            "  conflict: the file changed on the workstation while it was written; nothing was "
            "overwritten, a retry starts from the new file"
        )
    return lines
