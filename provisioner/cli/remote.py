"""``push``, ``diff``, ``rollback`` and ``doctor``: one workstation at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from provisioner.cli.common import (
    IdentityOpt,
    IfRunningOpt,
    PassFdOpt,
    PassFileOpt,
    StateOpt,
    echo,
    keyring_for_keys_in_use,
)
from provisioner.errors import ProvisionerError

if TYPE_CHECKING:
    from provisioner import build as phase1
    from provisioner import connections, push, resolve, vault
    from provisioner.results import HostResult
    from provisioner.transport.base import Transport

EXIT_HOSTS_FAILED = 3

WorkstationArg = Annotated[str, typer.Argument(help="Workstation name from the inventory.")]
InventoryOpt = Annotated[
    Path,
    typer.Option(
        "--inventory", "-i", metavar="DIR", envvar="PROVISIONER_INVENTORY", file_okay=False
    ),
]
UserOpt = Annotated[
    list[str] | None,
    typer.Option("--user", "-u", metavar="NAME", help="Only this user (repeatable)."),
]
LabOpt = Annotated[
    Path | None,
    typer.Option(
        "--lab",
        metavar="FILE",
        envvar="PROVISIONER_LAB_FILE",
        help="Lab file from 'provisioner lab up': connect to the emulated workstations.",
    ),
]


@dataclass
class Remote:
    """Phase 1 for one workstation, its keyring, and how to reach it."""

    station: resolve.StationPlan
    files: list[phase1.BuiltFile]
    keyring: vault.Keyring
    lab: connections.LabMap | None

    def transport(self) -> Transport:
        """A fresh transport to the workstation."""
        from provisioner import connections

        return connections.open_transport(self.station, self.keyring, self.lab)


def prepare(
    inventory: Path,
    workstation: str,
    users: list[str] | None,
    identities: list[Path] | None,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    lab_file: Path | None,
    *,
    sip_passwords: bool = True,
) -> Remote:
    """Phase 1 with real keys for one workstation; any finding stops here.

    ``sip_passwords=False``: the files carry placeholders (for checks that need only their
    names); the keyring is still opened where an identity is found, for the WinRM password.
    """
    from provisioner import build as phase1
    from provisioner import connections, resolve

    opened: list[vault.Keyring] = []

    def factory(recipients: vault.Recipients) -> vault.Opener:
        keyring = keyring_for_keys_in_use(
            recipients, identities, passphrase_file, passphrase_fd, required=sip_passwords
        )
        opened.append(keyring)
        return keyring if sip_passwords else phase1.placeholder_opener(recipients)

    limit = f"ws:{workstation}"
    result = phase1.build(inventory, selection=resolve.Selection(limit), opener_factory=factory)
    if result.inventory is not None and workstation not in result.inventory.workstations:
        raise ProvisionerError(f"no workstation {workstation!r} in {inventory}")
    if not result.ok:
        for finding in result.findings:
            echo(str(finding))
        raise ProvisionerError("the inventory has errors; nothing was sent (see above)")
    assert result.inventory is not None  # noqa: S101 - a clean build has an inventory
    station = resolve.resolve_station(result.inventory, workstation)
    if users:
        unknown = [u for u in users if u not in station.workstation.users]
        if unknown:
            raise ProvisionerError(f"{', '.join(unknown)} not on {workstation}")
    lab = connections.LabMap.load(lab_file) if lab_file else None
    return Remote(station, result.files, opened[0], lab)


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


def _exit(result: HostResult) -> None:
    if not result.ok:
        raise typer.Exit(EXIT_HOSTS_FAILED)


def _run(
    action: Callable[[Remote], HostResult],
    remote: Remote,
    show_diff: bool,
) -> None:
    result = action(remote)
    print_result(result, show_diff=show_diff)
    _exit(result)


def _run_recorded(
    action: Callable[[Remote], HostResult],
    remote: Remote,
    *,
    inventory: Path,
    state_folder: Path | None,
    command: str,
    audit_action: str,
    options: push.PushOptions,
    show_diff: bool,
) -> None:
    """``_run`` under the state lock, recorded as a run (``runs list``) with audit records."""
    import getpass
    import uuid
    from datetime import UTC, datetime

    from provisioner import revision, runner, state
    from provisioner.cli.common import state_dir
    from provisioner.cli.rollout import interrupt_to, record
    from provisioner.results import HostResult, Status

    folder = state_dir(inventory, state_folder)
    store = state.StateStore(folder)
    who = getpass.getuser()
    name = remote.station.workstation.name
    interrupted = threading.Event()
    inventory_revision = revision.inventory_revision(inventory)
    with store.lock(f"{who}: {command}"):
        # A damaged fingerprint key stops the command here, before the workstation is touched:
        # its result could not be recorded.
        state.load_fingerprints(folder)
        started = datetime.now(UTC)
        try:
            # First Ctrl-C: the workstation in flight finishes and is recorded as usual.
            with interrupt_to(interrupted):
                result = action(remote)
        except KeyboardInterrupt:  # the second one: recorded, as its outcome is unknown
            result = HostResult(
                name,
                Status.FAILED,
                "interrupted while the workstation was being written: its files may or may "
                f"not have changed; see 'provisioner diff {name}'",
            )
        run = runner.RunResult(
            uuid.uuid4().hex[:12],
            started,
            runner.RolloutOptions(forks=1, canary="0", retries=0, push=options),
            results={result.host: result},
            batches=[[result.host]],
            finished=datetime.now(UTC),
            stopped="interrupted" if interrupted.is_set() else "",
        )
        record(
            store, run, who=who, command=command, action=audit_action, revision=inventory_revision
        )
    print_result(result, show_diff=show_diff)
    echo(f"recorded as run {run.run_id} in {folder}")
    _exit(result)


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
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
    state_folder: StateOpt = None,
) -> None:
    """Bring one workstation's MicroSIP files to the inventory's state.

    Exit 0 when changed or unchanged, 3 when the workstation failed, was busy or in conflict.
    """
    from provisioner import push
    from provisioner.transport.base import ReadOnlyTransport

    remote = prepare(inventory, workstation, user, identities, passphrase_file, passphrase_fd, lab)
    options = push.PushOptions(if_running=if_running, reset=reset, users=tuple(user or ()))

    def action(r: Remote) -> HostResult:
        transport = r.transport()
        wrapped: Transport = ReadOnlyTransport(transport) if check else transport
        return push.push_host(r.station, r.files, wrapped, options, dry_run=check)

    if check:
        _run(action, remote, diff)
        return
    _run_recorded(
        action,
        remote,
        inventory=inventory,
        state_folder=state_folder,
        command=f"push {workstation}",
        audit_action="reset" if reset else "push",
        options=options,
        show_diff=diff,
    )


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
    from provisioner import push
    from provisioner.transport.base import ReadOnlyTransport

    remote = prepare(inventory, workstation, user, identities, passphrase_file, passphrase_fd, lab)
    options = push.PushOptions(if_running="force", reset=reset, users=tuple(user or ()))

    def action(r: Remote) -> HostResult:
        return push.push_host(
            r.station, r.files, ReadOnlyTransport(r.transport()), options, dry_run=True
        )

    _run(action, remote, True)


def rollback_cmd(
    workstation: WorkstationArg,
    inventory: InventoryOpt = Path("."),
    user: UserOpt = None,
    if_running: IfRunningOpt = "skip",
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
    state_folder: StateOpt = None,
) -> None:
    """Restore the newest backup of a workstation's files (or of one user's file)."""
    from provisioner import push

    remote = prepare(inventory, workstation, user, identities, passphrase_file, passphrase_fd, lab)
    options = push.PushOptions(if_running=if_running, users=tuple(user or ()))

    def action(r: Remote) -> HostResult:
        return push.rollback_host(r.station, r.files, r.transport(), options)

    _run_recorded(
        action,
        remote,
        inventory=inventory,
        state_folder=state_folder,
        command=f"rollback {workstation}",
        audit_action="rollback",
        options=options,
        show_diff=False,
    )


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
    from provisioner import connections, doctor, vault
    from provisioner.errors import VaultError

    remote = prepare(
        inventory,
        workstation,
        None,
        identities,
        passphrase_file,
        passphrase_fd,
        lab,
        sip_passwords=False,
    )
    station, lab_map = remote.station, remote.lab
    try:
        options = connections.winrm_options(station, remote.keyring, lab_map, diagnostic=True)
        no_auth = ""
    except VaultError as exc:
        placeholders = vault.PlaceholderOpener(remote.keyring.recipients)
        options = connections.winrm_options(station, placeholders, lab_map, diagnostic=True)
        no_auth = str(exc)
    checks, may_connect = doctor.before_connecting(workstation, options)
    if may_connect and not no_auth:
        transport = connections.open_transport(station, remote.keyring, lab_map, diagnostic=True)
        checks += doctor.remote_checks(station, remote.files, transport, options)
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        echo(f"{mark} {check.name:<18} {check.detail}")
        if not check.ok and check.fix:
            echo(f"     fix: {check.fix}")
    if no_auth:
        echo(f"skip auth and the remote checks: the WinRM password cannot be opened ({no_auth})")
    failed = [c for c in checks if not c.ok]
    echo(f"{workstation}: {len(checks) - len(failed)} check(s) passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(EXIT_HOSTS_FAILED)
