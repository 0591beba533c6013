"""``provisioner secrets``: set, verify, rekey, rebind and lint sealed values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from provisioner.cli.common import (
    IdentityOpt,
    InventoryOpt,
    PassFdOpt,
    PassFileOpt,
    echo,
    open_keyring,
)
from provisioner.cli.helpstyle import App, choices
from provisioner.cli.inputs import read_new_password
from provisioner.cli.phase1 import finding_lines
from provisioner.errors import VaultError
from provisioner.secrets.credscope import SECURITY_LEVELS

if TYPE_CHECKING:
    from provisioner.secrets.credscope import Scope

LINT_FORMATS = ("text", "json", "github")

app = App(help="Set and check the sealed passwords of an inventory.", no_args_is_help=True)

ScopeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--scope",
        metavar="PATTERN",
        help="WinRM passwords: an address pattern it may be sent to, e.g. '*.corp.example.com', "
        "'ber-ws-*', 10.20.0.0/16 (repeatable).",
    ),
]
MinSecurityOpt = Annotated[
    str | None,
    typer.Option(
        "--min-security",
        metavar=choices(SECURITY_LEVELS),
        help="With --scope: the least transport security it may travel over: tls (HTTPS with "
        "certificate validation), encrypted (the default: or NTLM/Kerberos message "
        "encryption) or none.",
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        metavar="FILE",
        help="With --scope: the CA file (winrm.ca_trust_path) that, besides the system's CAs, "
        "may verify the workstations' HTTPS certificates.",
    ),
]


@app.command("set")
def set_value(
    path: Annotated[
        str | None,
        typer.Option(
            "--path",
            metavar="POINTER",
            help="JSON Pointer of the value, e.g. /users/ann/accounts/a1/password",
        ),
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", metavar="NAME", help="Instead of --path: the user...")
    ] = None,
    account: Annotated[
        str | None,
        typer.Option("--account", metavar="ID", help="...and the account id (default: active)."),
    ] = None,
    inventory: InventoryOpt = Path("."),
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the password from stdin.")] = False,
    scope: ScopeOpt = None,
    min_security: MinSecurityOpt = None,
    ca: CaOpt = None,
) -> None:
    """Seal a new password with the public key and patch it into its YAML file."""
    from provisioner.secrets import secretstore

    if (path is None) == (user is None):
        raise VaultError("give either --path or --user (with an optional --account)")
    if user is not None:
        path = _account_path(inventory, user, account)
    assert path is not None  # noqa: S101 - one of the two was given
    recipients = secretstore.load_recipients(inventory)
    sealed_scope = _scope(scope, min_security, ca)
    secretstore.check_scope_fits(path, sealed_scope)  # before the password is asked for
    secret = read_new_password(from_stdin=stdin)
    written = secretstore.set_secret(inventory, path, secret, recipients, sealed_scope)
    echo(f"updated {written.pointer} in {written.file}:{written.line} (key {written.kid})")
    if sealed_scope is not None:
        echo(f"  scope: {sealed_scope}")


@app.command("scope")
def scope_cmd(
    path: Annotated[
        str,
        typer.Option(
            "--path", metavar="POINTER", help="The WinRM password, e.g. /defaults/winrm/password"
        ),
    ],
    inventory: InventoryOpt = Path("."),
    scope: ScopeOpt = None,
    min_security: MinSecurityOpt = None,
    ca: CaOpt = None,
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
) -> None:
    """Show a WinRM password's scope, or seal it again with a new one (--scope; admin key).

    The scope is where the password may be sent and over what: the inventory cannot widen it.
    """
    from provisioner.secrets import secretstore, vault

    new_scope = _scope(scope, min_security, ca)
    if new_scope is not None:
        secretstore.check_scope_fits(path, new_scope)  # before any passphrase is asked for
    recipients = secretstore.load_recipients(inventory)
    scan = secretstore.scan_inventory(inventory)
    site = secretstore.token_at(scan, path)
    if new_scope is None:
        current = vault.token_scope(site.ref.value)
        shown = str(current) if current is not None else "none (sealed without a scope)"
        echo(f"{path} ({site.where}): scope {shown}")
        return
    kid = vault.parse_token(site.ref.value).kid
    keyring = open_keyring(
        recipients, identities, {kid, recipients.active}, passphrase_file, passphrase_fd
    )
    written = secretstore.rescope(scan, keyring, path, new_scope)
    echo(
        f"sealed {written.pointer} again in {written.file}:{written.line} (key {written.kid}), "
        f"scope {new_scope}"
    )


@app.command()
def verify(
    inventory: InventoryOpt = Path("."),
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
) -> None:
    """Open every token with the identity and check each value; print counts only."""
    from provisioner.secrets import secretstore

    recipients = secretstore.load_recipients(inventory)
    scan = secretstore.scan_inventory(inventory)
    kids = set(secretstore.kids_in_use(scan))
    keyring = open_keyring(recipients, identities, kids, passphrase_file, passphrase_fd)
    report = secretstore.verify_secrets(scan, keyring)
    for failure in report.failures:
        echo(str(failure))
    total_ok = sum(report.ok_by_kid.values())
    echo(f"{total_ok} value(s) opened and checked, {len(report.failures)} failed")
    for kid, count in sorted(report.ok_by_kid.items()):
        echo(f"  key {kid}: {count} ok")
    for code, count in sorted(report.errors_by_class.items()):
        echo(f"  {code}: {count}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def rekey(
    to: Annotated[
        str | None, typer.Option("--to", metavar="KID", help="Key id to seal to (default: active).")
    ] = None,
    from_kids: Annotated[
        list[str] | None,
        typer.Option("--from", metavar="KID", help="Only tokens of this key id (repeatable)."),
    ] = None,
    inventory: InventoryOpt = Path("."),
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    new_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--new-passphrase-file",
            metavar="FILE",
            help="The passphrase of the new key's identity, when it differs from the old one's.",
        ),
    ] = None,
    new_passphrase_fd: Annotated[
        int | None,
        typer.Option(
            "--new-passphrase-fd", metavar="FD", help="The same, from this file descriptor."
        ),
    ] = None,
) -> None:
    """Re-seal every token of other keys to the new key; only token text changes."""
    from provisioner.secrets import secretstore

    if new_passphrase_file is not None and new_passphrase_fd is not None:
        raise VaultError("give --new-passphrase-file or --new-passphrase-fd, not both")
    recipients = secretstore.load_recipients(inventory)
    target = to or recipients.active
    scan = secretstore.scan_inventory(inventory)
    kids = set(secretstore.kids_in_use(scan))
    own = new_passphrase_file is not None or new_passphrase_fd is not None
    keyring = open_keyring(
        recipients,
        identities,
        kids | {target},
        passphrase_file,
        passphrase_fd,
        other_passphrases={target: (new_passphrase_file, new_passphrase_fd)} if own else None,
    )
    report = secretstore.rekey(scan, keyring, target, from_kids or ())
    how = "each checked by opening it" if report.verified_by_opening else "structure checked"
    echo(f"re-sealed {report.resealed} value(s) to {target} in {len(report.files)} file(s) ({how})")
    if report.resealed and not report.verified_by_opening:
        echo(
            f"note: the new tokens were not opened again, as no identity for {target} was "
            f"given; check them with 'provisioner secrets verify' and the identity of {target}"
        )
    for path in report.files:
        echo(f"  {path}")


@app.command()
def rebind(
    old_path: Annotated[str, typer.Argument(help="Where the value was sealed for.")],
    new_path: Annotated[str, typer.Argument(help="Where it stands now.")],
    inventory: InventoryOpt = Path("."),
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
) -> None:
    """Re-seal a value after its user or list entry moved in the YAML."""
    from provisioner.secrets import secretstore

    recipients = secretstore.load_recipients(inventory)
    scan = secretstore.scan_inventory(inventory)
    kids = {k.kid for k in recipients.keys if k.status != "retired"}
    keyring = open_keyring(recipients, identities, kids, passphrase_file, passphrase_fd)
    written = secretstore.rebind(scan, keyring, old_path, new_path)
    echo(f"rebound {old_path} -> {new_path} in {written.file}:{written.line} (key {written.kid})")


@app.command()
def lint(
    inventory: InventoryOpt = Path("."),
    output: Annotated[
        str,
        typer.Option(
            "--format",
            metavar=choices(LINT_FORMATS),
            help="Report format (github: workflow annotations).",
        ),
    ] = "text",
) -> None:
    """Key-less CI check of every token and secret field. Exit 1 on any error."""
    from provisioner.secrets import secretstore

    if output not in LINT_FORMATS:
        raise VaultError("--format must be text, json or github")
    recipients = secretstore.load_recipients(inventory)
    scan = secretstore.scan_inventory(inventory)
    findings = secretstore.lint_secrets(scan, recipients)
    errors = [f for f in findings if f.severity == "error"]
    if output == "json":
        echo(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        for line in finding_lines(findings, github=output == "github"):
            echo(line)
        tokens = sum(1 for _ in scan.tokens())
        echo(
            f"{tokens} token(s) checked, {len(errors)} error(s), "
            f"{len(findings) - len(errors)} warning(s)"
        )
    if errors:
        raise typer.Exit(1)


def _scope(patterns: list[str] | None, min_security: str | None, ca: Path | None) -> Scope | None:
    from provisioner.rollout.connections import ca_file_fingerprint
    from provisioner.secrets.credscope import DEFAULT_MIN_SECURITY, SECURITY_LEVELS, Scope

    if not patterns:
        if min_security is not None or ca is not None:
            raise VaultError("--min-security and --ca belong to a scope: give --scope too")
        return None
    level = min_security or DEFAULT_MIN_SECURITY
    if level not in SECURITY_LEVELS:
        raise VaultError(f"--min-security: one of {', '.join(SECURITY_LEVELS)}, not {level!r}")
    pin = ca_file_fingerprint(ca, "--ca") if ca is not None else ""
    try:
        return Scope.build(patterns, level, pin)
    except ValueError as exc:
        raise VaultError(f"--scope: {exc}") from None


def _account_path(inventory: Path, user: str, account: str | None) -> str:
    from provisioner.inventory.loader import InventoryErrors, load_inventory

    try:
        model = load_inventory(inventory)
    except InventoryErrors as exc:
        raise VaultError(f"the inventory has problems; fix them or use --path:\n{exc}") from None
    entry = model.users.get(user)
    if entry is None:
        raise VaultError(f"no user {user!r} in {inventory}")
    ids = [a.id for a in entry.accounts]
    chosen = account or next((a.id for a in entry.accounts if a.active), ids[0])
    if chosen not in ids:
        raise VaultError(f"{user} has no account {chosen!r} (accounts: {', '.join(ids)})")
    return f"/users/{user}/accounts/{chosen}/password"


__all__ = ["app"]
