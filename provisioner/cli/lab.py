"""``provisioner lab``: emulated workstations for the inventory, on loopback addresses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from provisioner.cli.common import (
    IdentityOpt,
    InventoryOpt,
    PassFdOpt,
    PassFileOpt,
    echo,
    keyring_for_keys_in_use,
    load_model,
)
from provisioner.cli.helpstyle import App
from provisioner.errors import LabError, ProvisionerError

if TYPE_CHECKING:
    from provisioner.inventory.model import Inventory
    from provisioner.lab.scenario import Scenario

app = App(
    help="Emulated Windows workstations for tests, demos and template CI.", no_args_is_help=True
)

LabFileOpt = Annotated[
    Path | None,
    typer.Option("--file", metavar="FILE", help="The lab file (default: INVENTORY/.lab.json)."),
]
START_TIMEOUT = 60.0
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f]")


def default_lab_file(inventory: Path) -> Path:
    """``.lab.json`` beside the inventory's folder (the loader skips dot files)."""
    return inventory / ".lab.json"


def _check_base_address(value: str | None) -> str | None:
    from provisioner.lab.server import check_base_address

    if value is None:
        return None
    try:
        return check_base_address(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def up(
    inventory: InventoryOpt = Path("."),
    file: Annotated[
        Path | None, typer.Option("--file", metavar="FILE", help="Where to write the lab file.")
    ] = None,
    scenario: Annotated[
        Path | None,
        typer.Option(
            "--scenario",
            metavar="FILE",
            dir_okay=False,
            help="A scenario file: how each workstation differs from what the inventory "
            "implies (docs/lab.md).",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            metavar="PORT",
            min=0,
            max=65535,
            envvar="PROVISIONER_LAB_PORT",
            help="Port of every workstation (0: a free one each). Default 5985, or 5986 for HTTPS.",
        ),
    ] = None,
    base_address: Annotated[
        str | None,
        typer.Option(
            "--base-address",
            metavar="ADDRESS",
            envvar="PROVISIONER_LAB_BASE_ADDRESS",
            callback=_check_base_address,
            help="Address of the first workstation, in 127.0.0.0/8; the others take the "
            "addresses after it. Default 127.0.0.2.",
        ),
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
    from provisioner.lab.control import LabProcess, lab_file_exists

    target = file or default_lab_file(inventory)
    if os.path.lexists(target):
        raise lab_file_exists(target)
    if detach:
        # The lab loads the inventory itself, and what it says when it cannot is shown here;
        # a scenario is checked before anything starts, every problem at its line.
        if scenario is not None:
            _load_scenario(scenario, load_model(inventory))
        _detach(inventory, target, scenario, port, base_address, identities, passphrase_file)
        return
    model = load_model(inventory)
    loaded = _load_scenario(scenario, model) if scenario is not None else None
    from provisioner.lab.scenario import ScenarioErrors
    from provisioner.lab.server import DEFAULT_BASE_ADDRESS
    from provisioner.secrets import secretstore

    recipients = secretstore.load_recipients(inventory)
    keyring = keyring_for_keys_in_use(recipients, identities, passphrase_file, passphrase_fd)
    stop = threading.Event()
    # Every way a lab is told to stop leads to its clean-up (SIGKILL is for 'lab down').
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    with LabProcess(target) as process:
        try:
            running = process.start(
                model,
                keyring,
                port=port,
                base_address=base_address or DEFAULT_BASE_ADDRESS,
                scenario=loaded,
            )
        except ScenarioErrors as exc:
            raise LabError(f"the scenario cannot be set up:\n{exc}") from None
        echo(f"lab up: {len(running.hosts)} workstation(s), lab file {target}")
        for name, host in sorted(running.hosts.items()):
            echo(f"  {name:<16} {host.scheme}://{host.address}:{host.port}/wsman")
        echo(
            f"use --lab {target} with rollout, push, diff, rollback, doctor and user regenerate; "
            "'provisioner lab show' lists a workstation's files; 'provisioner lab down' stops it"
        )
        sys.stdout.flush()
        process.publish()
        while not stop.wait(0.5):
            pass


def _load_scenario(path: Path, model: Inventory) -> Scenario:
    from provisioner.lab.scenario import ScenarioErrors, load_scenario

    try:
        return load_scenario(path, model)
    except ScenarioErrors as exc:
        raise LabError(f"the scenario has problems:\n{exc}") from None


def _detach(
    inventory: Path,
    target: Path,
    scenario: Path | None,
    port: int | None,
    base_address: str | None,
    identities: list[Path] | None,
    passphrase_file: Path | None,
) -> None:
    from provisioner.lab.control import create_log, read_log, remove_log, take_down
    from provisioner.rollout.connections import LabMap

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
    if scenario is not None:
        command += ["--scenario", str(scenario)]
    if port is not None:
        command += ["--port", str(port)]
    if base_address is not None:
        command += ["--base-address", base_address]
    for identity in identities or []:
        command += ["--identity", str(identity)]
    if passphrase_file is not None:
        command += ["--passphrase-file", str(passphrase_file)]
    log = create_log(target)
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                output = read_log(log)
                if os.path.lexists(target):  # it died while starting: what it left goes too
                    take_down(target)
                remove_log(target, log)  # its whole content is in this message
                raise LabError("the lab did not start:\n" + output)
            try:
                LabMap.load(target)
            except ProvisionerError:
                time.sleep(0.1)
                continue
            echo(read_log(log).rstrip())
            return
        if os.path.lexists(target):
            take_down(target)
        else:
            process.kill()
            remove_log(target, log)
        process.wait(10)
        raise LabError(f"the lab did not start within {START_TIMEOUT:.0f} s")
    finally:
        os.close(log)


@app.command()
def down(inventory: InventoryOpt = Path("."), file: LabFileOpt = None) -> None:
    """Stop a lab and remove everything it wrote, even if it died (its emulated disks hold
    rendered files with passwords)."""
    from provisioner.lab.control import take_down

    done = take_down(file or default_lab_file(inventory))
    if done.not_the_lab:
        echo(done.not_the_lab)
    if done.killed:
        echo(f"lab {done.pid} did not stop after SIGTERM: killed")
    elif done.was_running:
        echo("lab down")
    elif done.not_the_lab:
        echo("the lab was not running")
    else:
        echo(f"the lab (process {done.pid}) was not running")
    # A lab that stopped as asked took its folder and lab file: its log alone is no leftover.
    if done.removed:
        echo("removed what it left:")
        for path in filter(None, [*done.removed, done.log]):
            echo(f"  {path}")
    elif not done.was_running:
        echo("it left nothing")


@app.command()
def show(
    workstation: Annotated[str, typer.Argument(help="An inventory workstation of the lab.")],
    path: Annotated[
        str | None,
        typer.Argument(help="A Windows path (default: every drive and share)."),
    ] = None,
    inventory: InventoryOpt = Path("."),
    file: LabFileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """List a lab workstation's files with their owner, ACL and attributes (links not followed)."""
    from provisioner.lab.control import check_folder, request
    from provisioner.rollout.connections import LabMap

    target = file or default_lab_file(inventory)
    lab = LabMap.load(target)
    if not lab.folder:
        raise LabError(
            f"{target} names no lab folder (a lab of an older version): stop it with "
            "'provisioner lab down', then start it again with 'provisioner lab up'"
        )
    answer = request(
        check_folder(lab.folder), {"op": "show", "workstation": workstation, "path": path}
    )
    if answer.get("ok") is not True:
        raise LabError(f"lab show {workstation}: {_printable(answer.get('error'))}")
    if as_json:
        echo(json.dumps(answer, indent=2))  # ASCII: no control character reaches a terminal
        return
    echo(_printable(f"{answer.get('workstation')} ({answer.get('computer')})"))
    for entry in answer.get("entries") or []:
        for line in _entry_lines(entry):
            echo(_printable(line))


def _entry_lines(entry: dict[str, Any]) -> list[str]:
    """One object of ``lab show``: the name (indented by depth), kind, owner, attributes, then
    its explicit DACL and its inherited entries in the scenario's ``WHO:RIGHTS:SCOPE`` form."""
    depth = int(entry.get("depth") or 0)
    indent = "  " * depth
    path = str(entry.get("path"))
    name = path if depth == 0 else path.rsplit("\\", 1)[-1]
    kind = str(entry.get("kind"))
    slash = "\\" if kind == "folder" and depth else ""
    head = f"{indent}{name}{slash}  {kind}"
    if entry.get("target"):
        head += f" -> {entry['target']}"
    head += f"  owner {_who(entry.get('owner'))}"
    if entry.get("read_only"):
        head += "  read-only"
    if int(entry.get("links") or 1) > 1:
        head += f"  {entry['links']} links"
    lines = [head]
    acl = entry.get("acl")
    if isinstance(acl, dict):
        flag = "protected" if acl.get("protected") else "inherits too"
        aces = ", ".join(_ace(ace) for ace in acl.get("entries") or [])
        lines.append(f"{indent}    acl ({flag}): {aces or 'empty'}")
    inherited = entry.get("inherited") or []
    if inherited:
        lines.append(f"{indent}    inherited: {', '.join(_ace(ace) for ace in inherited)}")
    return lines


def _who(account: Any) -> str:
    if not isinstance(account, dict):
        return "?"
    return str(account.get("name") or account.get("sid"))


def _ace(ace: Any) -> str:
    if not isinstance(ace, dict):
        return "?"
    return f"{_who(ace)}:{ace.get('rights')}:{ace.get('scope')}"


def _printable(text: object) -> str:
    """No terminal control sequence from an answer reaches the terminal."""
    return _UNPRINTABLE.sub("?", str(text))
