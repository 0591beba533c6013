"""``provisioner user``: the helpdesk's one-user commands."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    load_model,
    state_dir,
)
from provisioner.cli.helpstyle import App
from provisioner.errors import (
    ConfirmationError,
    IdentityError,
    InternalError,
    NotFoundError,
    ProvisionerError,
    SavedNotPushedError,
)
from provisioner.inventory.names import closest

if TYPE_CHECKING:
    from provisioner.inventory.model import Inventory, User
    from provisioner.secrets import vault

app = App(help="Helpdesk tasks for one user.", no_args_is_help=True)

UserArg = Annotated[str, typer.Argument(help="User name as in the inventory.")]


def _user(inventory: Path, name: str) -> tuple[Inventory, User]:
    model = load_model(inventory)
    if name not in model.users:
        close = closest(name, model.users)
        hint = f"; did you mean {close!r}?" if close else ""
        raise NotFoundError(f"no user {name!r} in {inventory}{hint}")
    return model, model.users[name]


@app.command()
def show(
    user: UserArg,
    inventory: InventoryOpt = Path("."),
    state_folder: StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Workstations, accounts (passwords masked), groups and the last push per workstation."""
    from provisioner.inventory.schema import token_kid
    from provisioner.records import state

    model, entry = _user(inventory, user)
    stations = sorted(s.name for s in model.workstations.values() if user in s.users)
    accounts: list[dict[str, Any]] = []
    for sip in entry.accounts:
        keys = sip.keys
        password = keys.get("password")
        kid = token_kid(password.value) if password and isinstance(password.value, str) else ""
        accounts.append(
            {
                "id": sip.id,
                "active": sip.active,
                "sip": f"{keys['username'].value}@{keys['domain'].value}"
                if "username" in keys and "domain" in keys
                else "",
                "password": f"(sealed, key {kid})" if kid else "(not set)",
            }
        )
    last: list[dict[str, Any]] = []
    folder = state_dir(inventory, state_folder)
    if (folder / "state.sqlite3").exists():
        last = [r.to_dict() for r in state.StateStore(folder).last_results(user=user)]
    data = {
        "user": user,
        "windows": entry.windows,
        "display_name": entry.display_name,
        "groups": list(entry.groups),
        "workstations": stations,
        "accounts": accounts,
        "last_push": last,
    }
    if as_json:
        echo(json.dumps(data, indent=2, default=str))
        return
    echo(f"{user} ({entry.display_name or '-'}), Windows account {entry.windows}")
    echo(f"  groups:       {', '.join(entry.groups) or '-'}")
    echo(f"  workstations: {', '.join(stations) or '-'}")
    for account in accounts:
        flag = " (active)" if account["active"] else ""
        echo(f"  account {account['id']}{flag}: {account['sip']}  password {account['password']}")
    if not last:
        echo("  last push:    never (no rollout recorded in the state folder)")
    for item in last:
        echo(
            f"  last push:    {item.get('workstation')}: {item.get('status')} "
            f"{item.get('message', '')} ({item.get('time', item.get('started', ''))})"
        )


@app.command()
def regenerate(
    user: UserArg,
    inventory: InventoryOpt = Path("."),
    reset: Annotated[
        bool,
        typer.Option(
            "--reset",
            help="Write the render outright, keeping "
            "the old file as a backup (repairs a broken file).",
        ),
    ] = False,
    check: Annotated[bool, typer.Option("--check", help="Only show what would change.")] = False,
    diff: Annotated[
        bool, typer.Option("--diff/--no-diff", help="Show the diff (passwords masked).")
    ] = True,
    yes: YesOpt = False,
    if_running: IfRunningOpt = "stop",
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
    state_folder: StateOpt = None,
) -> None:
    """Render and push this user's profile to every workstation they use, diff first."""
    from provisioner.cli import running
    from provisioner.records.report import exit_code
    from provisioner.rollout import engine, runner
    from provisioner.rollout.push import PushOptions

    _user(inventory, user)
    options = runner.RolloutOptions(
        forks=8,
        canary="0",
        batch="100%",
        max_fail=100.0,
        retries=1,
        check=check,
        push=PushOptions(if_running=if_running, reset=reset, users=(user,)),
    )
    request = engine.Request(
        inventory,
        options,
        limit=f"user:{user}",
        command=f"user regenerate {user}",
        action="reset" if reset else "regenerate",
        selection=f"(user {user})",
        timeout=30,
        lab_file=lab,
        state_folder=None if check else state_dir(inventory, state_folder),
    )
    keys = running.Keys(identities, passphrase_file, passphrase_fd)
    run = running.run(
        request,
        keys,
        yes=yes,
        show_diff=diff,
        quiet=True,
        retry=f"provisioner user regenerate {user}",
    )
    code = exit_code(run)
    if code:
        raise typer.Exit(code)


def _identity_for_push(recipients: vault.Recipients, explicit: list[Path] | None) -> None:
    """``--push`` needs a private key: say so before anything is written, not after."""
    from provisioner.cli.common import identity_candidates
    from provisioner.secrets import secretstore

    usable = {k.kid for k in recipients.keys if k.status != "retired"}
    for path in identity_candidates(explicit):
        try:
            if secretstore.read_identity(path).kid in usable:
                return
        except ProvisionerError:
            continue  # a broken identity file is reported where it is used
    where = "the given --identity files" if explicit else str(secretstore.default_identity_dir())
    raise IdentityError(
        f"--push decrypts the user's profile and needs an identity for one of the keys "
        f"{', '.join(sorted(usable))}; none found in {where}. Nothing was written: pass "
        "--identity FILE, or set the password without --push"
    )


@app.command("set-password")
def set_password(
    user: UserArg,
    inventory: InventoryOpt = Path("."),
    account: Annotated[
        str | None,
        typer.Option("--account", metavar="ID", help="Account id (default: the active one)."),
    ] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the password from stdin.")] = False,
    push_now: Annotated[
        bool, typer.Option("--push", help="Push the user's profile right away (needs an identity).")
    ] = False,
    yes: YesOpt = False,
    if_running: IfRunningOpt = "skip",
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    lab: LabOpt = None,
    state_folder: StateOpt = None,
) -> None:
    """Seal a new SIP password with the public key and write it into the inventory.

    With --push, the user's profile is pushed next, once confirmed (--yes: without asking).
    """
    from provisioner.cli.inputs import read_new_password
    from provisioner.records import state
    from provisioner.secrets import secretstore

    _, entry = _user(inventory, user)
    ids = [a.id for a in entry.accounts]
    chosen = account or next((a.id for a in entry.accounts if a.active), ids[0])
    if chosen not in ids:
        raise NotFoundError(f"{user} has no account {chosen!r} (accounts: {', '.join(ids)})")
    pointer = f"/users/{user}/accounts/{chosen}/password"
    # Where the change is audited, settled before anything is written.
    folder = state_dir(inventory, state_folder)
    recipients = secretstore.load_recipients(inventory)
    if push_now:
        _identity_for_push(recipients, identities)
        if not yes and not sys.stdin.isatty():  # --stdin: the push could not ask
            raise ConfirmationError(
                "--push asks before writing to workstations, and there is no terminal to ask "
                "on: pass --yes as well; nothing was written"
            )
    secret = read_new_password(from_stdin=stdin)
    written = secretstore.set_secret(inventory, pointer, secret, recipients)
    echo(f"updated {pointer} in {written.file}:{written.line} (key {written.kid})")
    who = getpass.getuser()
    state.AuditLog(folder).append(
        [
            state.AuditRecord.now(
                who=who,
                action="set-password",
                user=user,
                file=str(written.file),
                status="changed",
                message=f"sealed {pointer} to key {written.kid}",
            )
        ]
    )
    if push_now:
        saved = (
            f"the new password is saved in {written.file}; push it later with "
            f"'provisioner user regenerate {user}'"
        )
        try:
            regenerate(
                user,
                inventory,
                reset=False,
                check=False,
                diff=False,
                yes=yes,
                if_running=if_running,
                identities=identities,
                passphrase_file=passphrase_file,
                passphrase_fd=passphrase_fd,
                lab=lab,
                state_folder=state_folder,
            )
        except InternalError:
            raise  # a bug stays one (exit 70)
        except ProvisionerError as exc:
            raise SavedNotPushedError(f"{exc}; {saved}") from None
        except typer.Exit as exc:
            if exc.exit_code:
                echo(f"not every workstation took it: {saved}")
            raise
    else:
        echo(
            "commit and push the inventory change; it reaches the workstations with the next "
            f"rollout or 'provisioner user regenerate {user}'"
        )
