"""``provisioner keys``: create a realm, copy an identity for another admin, rotate, retire."""

from __future__ import annotations

import datetime as dt
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
from provisioner.cli.inputs import read_passphrase
from provisioner.errors import IdentityError, RecipientsError

if TYPE_CHECKING:
    from provisioner.secrets import vault

# Passphrase KDFs an identity file can be written with, the default first.
KDFS = ("argon2id", "scrypt")

app = App(help="Manage the realm's keys and identity files.", no_args_is_help=True)

KdfOpt = Annotated[str, typer.Option("--kdf", metavar=choices(KDFS), help="Passphrase KDF.")]
UnprotectedOpt = Annotated[
    bool,
    typer.Option(
        "--unprotected",
        help="Write the private key without a passphrase (unattended rollout host; "
        "protect the file with its permissions).",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", metavar="FILE", help="Identity file to write (must not exist)."),
]


def _protection(kdf: str, unprotected: bool) -> str:
    from provisioner.secrets import vault

    if unprotected:
        return "none"
    if kdf not in KDFS:
        raise IdentityError("--kdf must be argon2id or scrypt")
    if kdf == "argon2id" and not vault.argon2id_available():
        raise IdentityError("this cryptography build has no Argon2id; use --kdf scrypt")
    return kdf


def _new_identity_file(
    realm: str,
    out: Path | None,
    protection: str,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
) -> tuple[vault.Identity, Path]:
    from provisioner.secrets import secretstore, vault

    identity = vault.generate_identity()
    path = out or secretstore.default_identity_dir() / secretstore.identity_file_name(
        realm, identity.kid
    )
    passphrase = (
        None
        if protection == "none"
        else read_passphrase(passphrase_file, passphrase_fd, confirm=True, prompt="New passphrase")
    )
    secretstore.write_identity(
        path, identity, passphrase, protection=protection, note=f"realm {realm}"
    )
    return identity, path


@app.command()
def init(
    realm: Annotated[
        str, typer.Option("--realm", metavar="NAME", help="Realm name, e.g. acme-voip.")
    ],
    inventory: InventoryOpt = Path("."),
    out: OutOpt = None,
    kdf: KdfOpt = "argon2id",
    unprotected: UnprotectedOpt = False,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
) -> None:
    """Create a realm: recipients.yaml in the inventory and a new identity file."""
    from provisioner.inventory.loader import RECIPIENTS_FILE
    from provisioner.secrets import secretstore, vault

    target = inventory / RECIPIENTS_FILE
    if target.exists():
        raise RecipientsError(
            f"{target} already exists; use 'provisioner keys rotate' for a new key"
        )
    inventory.mkdir(parents=True, exist_ok=True)
    vault.new_recipients(realm, vault.generate_identity().recipient())  # validates the name
    protection = _protection(kdf, unprotected)
    identity, path = _new_identity_file(realm, out, protection, passphrase_file, passphrase_fd)
    today = dt.date.today().isoformat()
    recipients = vault.new_recipients(
        realm, identity.recipient(created=today, note="inventory key")
    )
    written = secretstore.write_recipients(inventory, recipients)
    echo(f"created realm {realm} with key {identity.kid}")
    echo(f"  public keys:   {written} (commit it; review every change)")
    echo(f"  identity file: {path} (private: keep it out of git, back it up offline)")


@app.command("add-admin")
def add_admin(
    out: Annotated[
        Path, typer.Option("--out", metavar="FILE", help="The new admin's identity file.")
    ],
    identity: Annotated[
        Path, typer.Option("--identity", metavar="FILE", help="Your identity file.")
    ],
    kdf: KdfOpt = "argon2id",
    unprotected: UnprotectedOpt = False,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    new_passphrase_file: Annotated[
        Path | None,
        typer.Option("--new-passphrase-file", metavar="FILE", help="The new copy's passphrase."),
    ] = None,
    new_passphrase_fd: Annotated[
        int | None,
        typer.Option("--new-passphrase-fd", metavar="FD", help="The new copy's passphrase fd."),
    ] = None,
) -> None:
    """Write another copy of an identity, wrapped under a new passphrase."""
    from provisioner.secrets import secretstore

    identity_file = secretstore.read_identity(identity)
    current = (
        read_passphrase(passphrase_file, passphrase_fd, confirm=False)
        if identity_file.needs_passphrase
        else None
    )
    unlocked = secretstore.unlock(identity_file, current)
    protection = _protection(kdf, unprotected)
    new_passphrase = (
        None
        if protection == "none"
        else read_passphrase(
            new_passphrase_file, new_passphrase_fd, confirm=True, prompt="New admin's passphrase"
        )
    )
    secretstore.write_identity(out, unlocked, new_passphrase, protection=protection)
    echo(f"wrote a copy of key {unlocked.kid} to {out}; hand it over, then delete your copy of it")


@app.command()
def rotate(
    inventory: InventoryOpt = Path("."),
    out: OutOpt = None,
    kdf: KdfOpt = "argon2id",
    unprotected: UnprotectedOpt = False,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
) -> None:
    """Create a new active key; the old active key becomes decrypt-only."""
    from provisioner.secrets import secretstore

    recipients = secretstore.load_recipients(inventory)
    protection = _protection(kdf, unprotected)
    identity, path = _new_identity_file(
        recipients.realm, out, protection, passphrase_file, passphrase_fd
    )
    today = dt.date.today().isoformat()
    updated = recipients.with_key(
        identity.recipient(created=today, note="inventory key"), make_active=True
    )
    secretstore.write_recipients(inventory, updated)
    echo(f"new active key {identity.kid}; {recipients.active} is now decrypt-only")
    echo(f"  identity file: {path}")
    echo(f"next: provisioner secrets rekey --to {identity.kid}")


@app.command()
def retire(
    kid: Annotated[str, typer.Argument(help="The key id to retire.")],
    inventory: InventoryOpt = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Retire even if tokens use it.")] = False,
) -> None:
    """Mark a key retired: tokens sealed to it are rejected from now on."""
    from provisioner.secrets import secretstore

    recipients = secretstore.load_recipients(inventory)
    scan = secretstore.scan_inventory(inventory)
    in_use = secretstore.kids_in_use(scan)[kid]
    if in_use and not force:
        raise RecipientsError(
            f"{in_use} token(s) still use key {kid}; run 'provisioner secrets rekey' first"
        )
    secretstore.write_recipients(inventory, recipients.with_status(kid, "retired"))
    echo(f"key {kid} retired; destroy every identity file that holds it")


@app.command("list")
def list_keys(inventory: InventoryOpt = Path(".")) -> None:
    """Show the realm's keys, their status and how many tokens use each."""
    from provisioner.secrets import secretstore

    recipients = secretstore.load_recipients(inventory)
    scan = secretstore.scan_inventory(inventory)
    usage = secretstore.kids_in_use(scan)
    echo(f"realm {recipients.realm}, active key {recipients.active}")
    for key in recipients.keys:
        echo(f"  {key.kid}  {key.status:<12}  {usage.get(key.kid, 0):>6} tokens  {key.created}")


@app.command()
def check(
    inventory: InventoryOpt = Path("."),
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
) -> None:
    """Unlock the identities for this realm, to test a passphrase or a file."""
    from provisioner.secrets import secretstore

    recipients = secretstore.load_recipients(inventory)
    keyring = open_keyring(
        recipients, identities, [k.kid for k in recipients.keys], passphrase_file, passphrase_fd
    )
    if not keyring.identities:
        raise IdentityError("no identity for this realm was found")
    for kid, unlocked in sorted(keyring.identities.items()):
        echo(f"unlocked {kid} from {unlocked.source}")
