"""Options and helpers shared by the command groups.

The command modules import the engine inside their commands, not at the top: ``--help`` and
the offline commands then start without pywinrm, requests or cryptography
(``tests/test_cli_startup.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from provisioner.cli.helpstyle import choices
from provisioner.errors import IdentityError, InventoryError
from provisioner.records.results import IF_RUNNING

if TYPE_CHECKING:
    from rich.console import Console

    from provisioner.inventory.model import Inventory
    from provisioner.secrets import vault

InventoryOpt = Annotated[
    Path,
    typer.Option(
        "--inventory",
        "-i",
        metavar="DIR",
        help="Inventory directory (holds recipients.yaml).",
        envvar="PROVISIONER_INVENTORY",
        file_okay=False,
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
IdentityOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--identity",
        metavar="FILE",
        help="Identity file (repeatable). Default: every *.sipid in the identity directory.",
    ),
]
PassFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        metavar="FILE",
        help="Read the passphrase from the first line of a file.",
    ),
]
PassFdOpt = Annotated[
    int | None,
    typer.Option(
        "--passphrase-fd", metavar="FD", help="Read the passphrase from this file descriptor."
    ),
]


def check_if_running(value: str) -> str:
    """Refuse an unknown --if-running policy on the command line, before anything runs."""
    if value not in IF_RUNNING:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(IF_RUNNING)}")
    return value


StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state",
        metavar="DIR",
        envvar="PROVISIONER_STATE",
        help="State folder for runs, audit and the rollout lock. Default: one per realm in "
        "your state directory ($XDG_STATE_HOME, else ~/.local/state).",
        file_okay=False,
    ),
]
YesOpt = Annotated[
    bool,
    typer.Option("--yes", "-y", help="Do not ask for confirmation (needed without a terminal)."),
]
IfRunningOpt = Annotated[
    str,
    typer.Option(
        "--if-running",
        metavar=choices(IF_RUNNING),
        help="When the user's MicroSIP runs: skip (report busy), stop (stop that user's "
        "MicroSIP first) or force (write anyway).",
        callback=check_if_running,
    ),
]


def state_home() -> Path:
    """``$XDG_STATE_HOME``, else ``~/.local/state`` (a relative value is ignored, as the XDG
    base directory specification asks)."""
    value = os.environ.get("XDG_STATE_HOME", "")
    return Path(value) if os.path.isabs(value) else Path.home() / ".local" / "state"


# The state folder's place before it moved to the user's state directory.
OLD_STATE_FOLDER = ".provisioner-state"
_told_about: set[Path] = set()


def state_dir(inventory: Path, explicit: Path | None) -> Path:
    """The state folder: ``--state`` (or PROVISIONER_STATE), else the inventory realm's folder
    in the user's state directory. Refused (exit 2) when git would commit it."""
    from provisioner.inventory.loader import inventory_realm
    from provisioner.records import state

    if explicit is not None:
        folder = explicit
    else:
        try:
            realm = inventory_realm(inventory)
        except InventoryError as exc:
            raise InventoryError(f"{exc}; or name a state folder with --state") from None
        folder = state.default_directory(state_home(), realm)
        old = inventory.resolve().parent / OLD_STATE_FOLDER
        if old.is_dir() and old not in _told_about:
            _told_about.add(old)
            typer.echo(
                f"note: the state is now kept in {folder}; {old} is no longer read (move its "
                "files there to keep the history)",
                err=True,
            )
    state.check_location(folder)
    return folder


# Width for output that is not a terminal (a file, a pipe, CI logs): wide enough that no
# table column is truncated and no line is folded, so ``> file`` keeps diffs valid.
PIPE_WIDTH = 10_000


def make_console(*, stderr: bool = False) -> Console:
    """A rich console: on a terminal as rich sizes it; otherwise nothing wraps or truncates.

    Plain lines are never wrapped (``soft_wrap``) and tables get a very wide page, so a
    redirected ``rollout --check --diff`` gives whole diff lines and whole table cells.
    """
    from rich.console import Console

    console = Console(highlight=False, stderr=stderr)
    if console.is_terminal:
        return console
    return Console(highlight=False, stderr=stderr, soft_wrap=True, width=PIPE_WIDTH)


def echo(message: str) -> None:
    """Print one line to stdout."""
    typer.echo(message)


def identity_candidates(explicit: list[Path] | None) -> list[Path]:
    """The identity files to consider."""
    from provisioner.secrets import secretstore

    if explicit:
        return list(explicit)
    directory = secretstore.default_identity_dir()
    return sorted(directory.glob(f"*{secretstore.IDENTITY_SUFFIX}")) if directory.is_dir() else []


def open_keyring(
    recipients: vault.Recipients,
    explicit: list[Path] | None,
    needed: Iterable[str],
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    *,
    other_passphrases: Mapping[str, tuple[Path | None, int | None]] | None = None,
) -> vault.Keyring:
    """Unlock the identities whose kids are needed; ask for passphrases only for those.

    ``other_passphrases``: a passphrase file or fd of its own for the identity of a kid (the
    new key of ``secrets rekey``); the others use ``passphrase_file`` or ``passphrase_fd``.
    """
    from provisioner.cli.inputs import read_passphrase
    from provisioner.secrets import secretstore, vault

    wanted = set(needed)
    keyring = vault.Keyring(recipients)
    # An fd can be read once: its passphrase serves every identity that it is given for.
    read_from_fd: dict[int, bytes] = {}
    for path in identity_candidates(explicit):
        identity_file = secretstore.read_identity(path)
        if identity_file.kid not in wanted or identity_file.kid in keyring.identities:
            continue
        passphrase = None
        if identity_file.needs_passphrase:
            file, fd = (other_passphrases or {}).get(
                identity_file.kid, (passphrase_file, passphrase_fd)
            )
            if fd is not None:
                if fd not in read_from_fd:
                    read_from_fd[fd] = read_passphrase(None, fd, confirm=False)
                passphrase = read_from_fd[fd]
            else:
                passphrase = read_passphrase(
                    file, None, confirm=False, prompt=f"Passphrase for {path}"
                )
        keyring.add(secretstore.unlock(identity_file, passphrase))
    if explicit and not keyring.identities and wanted:
        raise IdentityError(
            "none of the given identities holds a key in use here ("
            + ", ".join(sorted(wanted))
            + ")"
        )
    return keyring


def keyring_for_keys_in_use(
    recipients: vault.Recipients,
    identities: list[Path] | None,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    *,
    required: bool = True,
) -> vault.Keyring:
    """The identities of every key not retired, unlocked.

    ``required``: stop once, before any token is opened, when no identity was found at all;
    otherwise every token would fail alone with the same no-identity error.
    """
    from provisioner.secrets import secretstore

    kids = [k.kid for k in recipients.keys if k.status != "retired"]
    keyring = open_keyring(recipients, identities, kids, passphrase_file, passphrase_fd)
    if required and not keyring.identities:
        raise IdentityError(
            f"no identity for key {', '.join(sorted(set(kids)))}: pass --identity FILE, or keep "
            f"the identity file in {secretstore.default_identity_dir()}"
        )
    return keyring


def load_model(inventory: Path) -> Inventory:
    """The inventory, or one error listing every problem (and the command that shows them)."""
    from provisioner.inventory.loader import InventoryErrors, load_inventory

    try:
        return load_inventory(inventory)
    except InventoryErrors as exc:
        raise InventoryError(
            f"the inventory has problems; run 'provisioner validate':\n{exc}"
        ) from None


def env_flag(name: str) -> bool:
    """True when an environment variable is set to a non-empty, non-zero value."""
    return os.environ.get(name, "") not in ("", "0")
