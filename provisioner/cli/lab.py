"""``provisioner lab``: emulated workstations for the inventory, on loopback addresses."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from provisioner.cli.common import (
    IdentityOpt,
    PassFdOpt,
    PassFileOpt,
    echo,
    keyring_for_keys_in_use,
)
from provisioner.errors import ProvisionerError

app = typer.Typer(
    help="Emulated Windows workstations for tests, demos and template CI.", no_args_is_help=True
)

InventoryOpt = Annotated[
    Path, typer.Option("--inventory", "-i", envvar="PROVISIONER_INVENTORY", file_okay=False)
]
LabFileOpt = Annotated[
    Path, typer.Option("--file", help="The lab file that push, rollout and doctor take with --lab.")
]


def default_lab_file(inventory: Path) -> Path:
    """``.lab.json`` beside the inventory's folder (the loader skips dot files)."""
    return inventory / ".lab.json"


@app.command()
def up(
    inventory: InventoryOpt = Path("."),
    file: Annotated[
        Path | None, typer.Option("--file", help="Where to write the lab file.")
    ] = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach", help="Run in the background; stop it with 'provisioner lab down'."
        ),
    ] = False,
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
) -> None:
    """Start one emulated workstation per inventory workstation and write the lab file."""
    target = file or default_lab_file(inventory)
    if detach:
        _detach(inventory, target, identities, passphrase_file)
        return
    from provisioner import build as phase1
    from provisioner.atomicfile import write_atomic
    from provisioner.inventory import InventoryErrors, load_inventory
    from provisioner.lab.inventory_lab import start_inventory_lab
    from provisioner.vault import load_recipients_file

    try:
        model = load_inventory(inventory)
    except InventoryErrors as exc:
        raise ProvisionerError(f"the inventory has problems:\n{exc}") from None
    recipients = load_recipients_file(inventory / phase1.RECIPIENTS_FILE)
    keyring = keyring_for_keys_in_use(recipients, identities, passphrase_file, passphrase_fd)
    # The emulated disks hold rendered files with plaintext passwords: removed on every exit.
    folder = Path(tempfile.mkdtemp(prefix="microsip-lab-"))
    try:
        running = start_inventory_lab(model, keyring, folder=folder, port=None)
    except OSError as exc:  # an address in use: another lab, or a real WinRM listener
        shutil.rmtree(folder, ignore_errors=True)
        raise ProvisionerError(
            f"the lab cannot start: {exc}; is another lab running ('provisioner lab down')?"
        ) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        write_atomic(target, running.lab_map(pid=os.getpid()).dump().encode(), mode=0o600)
        echo(f"lab up: {len(running.hosts)} workstation(s), lab file {target}")
        for name, host in sorted(running.hosts.items()):
            echo(f"  {name:<16} {host.scheme}://{host.address}:{host.port}/wsman")
        echo(
            f"use --lab {target} with rollout, push, diff, rollback, doctor and user regenerate; "
            "'provisioner lab down' stops it"
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        try:
            running.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                target.unlink()


def _detach(
    inventory: Path, target: Path, identities: list[Path] | None, passphrase_file: Path | None
) -> None:
    if target.exists():
        raise ProvisionerError(f"{target} exists: a lab may be running ('provisioner lab down')")
    command = [
        sys.executable,
        "-m",
        "provisioner.cli",
        "lab",
        "up",
        "-i",
        str(inventory),
        "--file",
        str(target),
    ]
    for identity in identities or []:
        command += ["--identity", str(identity)]
    if passphrase_file is not None:
        command += ["--passphrase-file", str(passphrase_file)]
    log = target.with_suffix(".log")
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if target.exists():
            echo(log.read_text(encoding="utf-8", errors="replace").rstrip())
            return
        if process.poll() is not None:
            output = log.read_text(encoding="utf-8", errors="replace")
            log.unlink(missing_ok=True)  # its whole content is in this message
            raise ProvisionerError("the lab did not start:\n" + output)
        time.sleep(0.1)
    process.terminate()
    raise ProvisionerError("the lab did not start within 60 s")


@app.command()
def down(
    inventory: InventoryOpt = Path("."),
    file: Annotated[Path | None, typer.Option("--file", help="The lab file.")] = None,
) -> None:
    """Stop a lab started with 'lab up --detach'."""
    from provisioner.connections import LabMap

    target = file or default_lab_file(inventory)
    lab = LabMap.load(target)
    if not lab.pid:
        raise ProvisionerError(f"{target} names no process")
    try:
        os.kill(lab.pid, signal.SIGTERM)
    except ProcessLookupError:
        target.unlink(missing_ok=True)
        echo("the lab was not running; removed its file")
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (target.exists() or _alive(lab.pid)):
        time.sleep(0.1)
    if target.exists() or _alive(lab.pid):
        echo(f"lab {lab.pid} did not stop in time; its log is {target.with_suffix('.log')}")
        return
    # The log only matters when the lab misbehaves; a clean stop leaves nothing behind.
    target.with_suffix(".log").unlink(missing_ok=True)
    echo("lab down")


def _alive(pid: int) -> bool:
    """True while process ``pid`` runs (an exited lab that nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # Linux: a zombie ("Z") has exited and released its ports.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"
