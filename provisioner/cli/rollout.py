"""``rollout``, ``runs`` and ``audit``: the fleet commands."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from provisioner.cli.common import (
    IdentityOpt,
    IfRunningOpt,
    InventoryOpt,
    LabOpt,
    PassFdOpt,
    PassFileOpt,
    StateOpt,
    YesOpt,
    echo,
    state_dir,
)
from provisioner.cli.helpstyle import App
from provisioner.errors import OptionError

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


def check_processes(processes: int, forks: int) -> None:
    """``--processes``: 0 (automatic), 1 (this process) or up to MAX_PROCESSES, at most forks."""
    from provisioner.rollout.lanes import MAX_PROCESSES

    if not 0 <= processes <= MAX_PROCESSES:
        raise OptionError(
            f"--processes is 0 (automatic), 1 (this process only) or a number of push "
            f"processes up to {MAX_PROCESSES}, not {processes}"
        )
    if processes > forks:
        raise OptionError(
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
    yes: YesOpt = False,
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
    from provisioner.cli import running
    from provisioner.records import report, state
    from provisioner.rollout import engine, runner
    from provisioner.rollout.push import PushOptions

    if detailed_exitcode and not check:
        raise OptionError("--detailed-exitcode reports drift and needs --check")

    try:
        threshold = float(max_fail.rstrip("%"))
        if not 0 <= threshold <= 100:
            raise ValueError
    except ValueError:
        raise OptionError("--max-fail is a percentage such as 10%") from None
    check_processes(processes, forks)
    if canary_hosts and not any(term.strip() for term in canary_hosts.split(",")):
        # "$A,$B" with both empty would otherwise select everything: a canary of the fleet.
        raise OptionError(f"--canary-hosts {canary_hosts!r} names no workstation")
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

    request = engine.Request(
        inventory,
        options,
        limit=limit,
        command="rollout",
        selection=selection,
        canary_hosts=canary_hosts,
        processes=processes,
        timeout=timeout,
        lab_file=lab,
        state_folder=state_dir(inventory, state_folder),
        report_json=report_json,
        report_junit=report_junit,
    )
    keys = running.Keys(identities, passphrase_file, passphrase_fd)
    run = running.run(request, keys, yes=yes, show_diff=diff, quiet=quiet)
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
    from provisioner.records import state

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
    from provisioner.records import state

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
    from provisioner.records import state

    log = state.AuditLog(state_dir(inventory, state_folder))
    records = log.query(user=user, workstation=workstation, since=since, until=until)
    if as_json:
        echo(json.dumps([r.to_dict() for r in records], indent=2, default=str))
        return
    from provisioner.cli.history import audit_lines

    for line in audit_lines(records):
        echo(line)
    echo(f"{len(records)} record(s)")
