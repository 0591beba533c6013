"""``push``, ``diff``, ``rollback`` and ``doctor``: one workstation at a time."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from provisioner.cli import running
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
from provisioner.records.report import EXIT_HOSTS_FAILED

if TYPE_CHECKING:
    from provisioner.rollout import engine, push, runner


WorkstationArg = Annotated[str, typer.Argument(help="Workstation name from the inventory.")]
UserOpt = Annotated[
    list[str] | None,
    typer.Option("--user", "-u", metavar="NAME", help="Only this user (repeatable)."),
]


def _one(
    inventory: Path,
    workstation: str,
    options: runner.RolloutOptions,
    *,
    command: str,
    action: str,
    lab: Path | None,
    state_folder: Path | None,
) -> engine.Request:
    """A request for one workstation (``push``, ``diff``, ``rollback``), one attempt."""
    from provisioner.rollout import engine

    return engine.Request(
        inventory,
        options,
        limit=f"ws:{workstation}",
        command=command,
        action=action,
        selection=f"ws:{workstation}",
        workstation=workstation,
        processes=1,
        lab_file=lab,
        state_folder=state_folder,
    )


def _single(
    push: push.PushOptions, *, check: bool = False, rollback: bool = False
) -> runner.RolloutOptions:
    from provisioner.rollout import runner

    return runner.RolloutOptions(
        forks=1, canary="0", max_fail=100.0, retries=0, check=check, push=push, rollback=rollback
    )


def _exit(run: runner.RunResult) -> None:
    if not run.ok:
        raise typer.Exit(EXIT_HOSTS_FAILED)


def push_cmd(
    workstation: WorkstationArg,
    inventory: InventoryOpt = Path("."),
    user: UserOpt = None,
    check: Annotated[bool, typer.Option("--check", help="Change nothing; report.")] = False,
    diff: Annotated[
        bool, typer.Option("--diff", help="Show what changes (passwords masked).")
    ] = False,
    reset: Annotated[
        bool,
        typer.Option(
            "--reset",
            help="Write the render outright (helpdesk repair); the old file is kept as a backup.",
        ),
    ] = False,
    if_running: IfRunningOpt = "skip",
    yes: YesOpt = False,
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
    state_folder: StateOpt = None,
) -> None:
    """Bring one workstation's MicroSIP files to the inventory's state.

    Exit 0 when changed or unchanged, 3 when the workstation failed, was busy or in conflict.
    """
    from provisioner.rollout import push

    options = push.PushOptions(if_running=if_running, reset=reset, users=tuple(user or ()))
    request = _one(
        inventory,
        workstation,
        _single(options, check=check),
        command=f"push {workstation}",
        action="reset" if reset else "push",
        lab=lab,
        state_folder=None if check else state_dir(inventory, state_folder),
    )
    keys = running.Keys(identities, passphrase_file, passphrase_fd)
    _exit(running.run(request, keys, yes=yes, show_diff=diff))


def diff_cmd(
    workstation: WorkstationArg,
    inventory: InventoryOpt = Path("."),
    user: UserOpt = None,
    reset: Annotated[bool, typer.Option("--reset", help="Diff against a full reset.")] = False,
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
) -> None:
    """Show what a push would change: a unified diff per file, passwords masked.

    The same code path as push, through a read-only transport: nothing is written.
    """
    from provisioner.rollout import push

    options = push.PushOptions(if_running="force", reset=reset, users=tuple(user or ()))
    request = _one(
        inventory,
        workstation,
        _single(options, check=True),
        command=f"diff {workstation}",
        action="push",
        lab=lab,
        state_folder=None,
    )
    keys = running.Keys(identities, passphrase_file, passphrase_fd)
    _exit(running.run(request, keys, yes=True, show_diff=True))


def rollback_cmd(
    workstation: WorkstationArg,
    inventory: InventoryOpt = Path("."),
    user: UserOpt = None,
    if_running: IfRunningOpt = "skip",
    yes: YesOpt = False,
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
    state_folder: StateOpt = None,
) -> None:
    """Undo the last run that changed a workstation's files (or one user's file)."""
    from provisioner.rollout import push

    options = push.PushOptions(if_running=if_running, users=tuple(user or ()))
    request = _one(
        inventory,
        workstation,
        _single(options, rollback=True),
        command=f"rollback {workstation}",
        action="rollback",
        lab=lab,
        state_folder=state_dir(inventory, state_folder),
    )
    keys = running.Keys(identities, passphrase_file, passphrase_fd)
    _exit(running.run(request, keys, yes=yes, show_diff=False))


def doctor_cmd(
    workstation: WorkstationArg,
    inventory: InventoryOpt = Path("."),
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
) -> None:
    """Check DNS, port, TLS, auth, encryption, PowerShell, MicroSIP, profiles and disk.

    Needs no SIP password: only the WinRM password's key, and without it the network checks.
    """
    from provisioner.errors import VaultError
    from provisioner.rollout import connections, doctor
    from provisioner.rollout.push import PushOptions
    from provisioner.secrets import vault

    request = _one(
        inventory,
        workstation,
        _single(PushOptions(), check=True),
        command=f"doctor {workstation}",
        action="doctor",
        lab=lab,
        state_folder=None,
    )
    keys = running.Keys(identities, passphrase_file, passphrase_fd, required=False)
    planned = running.plan(replace(request, diagnostic=True), keys)
    station, lab_map = planned.stations[workstation], planned.lab
    try:
        options = connections.winrm_options(station, planned.keyring, lab_map, diagnostic=True)
        no_auth = ""
    except VaultError as exc:
        placeholders = vault.PlaceholderOpener(planned.recipients)
        options = connections.winrm_options(station, placeholders, lab_map, diagnostic=True)
        no_auth = str(exc)
    checks, may_connect = doctor.before_connecting(workstation, options)
    if may_connect and not no_auth:
        transport = planned.transport(station, diagnostic=True)
        checks += doctor.remote_checks(station, planned.files[workstation], transport, options)
    for check in checks:
        mark = "FAIL" if not check.ok else "WARN" if check.warning else "ok  "
        echo(f"{mark} {check.name:<18} {check.detail}")
        if (not check.ok or check.warning) and check.fix:
            echo(f"     fix: {check.fix}")
    if no_auth:
        echo(f"skip auth and the remote checks: the WinRM password cannot be opened ({no_auth})")
    failed = [c for c in checks if not c.ok]
    warned = sum(1 for c in checks if c.ok and c.warning)
    said = f", {warned} warning(s)" if warned else ""
    echo(f"{workstation}: {len(checks) - len(failed)} check(s) passed{said}, {len(failed)} failed")
    if failed:
        raise typer.Exit(EXIT_HOSTS_FAILED)
