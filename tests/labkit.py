"""Tests against emulated workstations: a small inventory pushed to a lab, the example inventory
in a lab, the CLI from the shell, and a WinRM look-alike that records whatever reaches it."""

from __future__ import annotations

import base64
import ipaddress
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from provisioner.inventory import resolve
from provisioner.inventory.loader import load_inventory
from provisioner.inventory.model import Secret
from provisioner.lab.inventory_lab import InventoryLab, start_inventory_lab
from provisioner.lab.scenario import load_scenario
from provisioner.lab.workstation import Workstation
from provisioner.records.results import HostResult
from provisioner.render import build
from provisioner.rollout import connections, push
from provisioner.secrets import secretstore, vault
from provisioner.secrets.credscope import Scope
from provisioner.transport.agent.messages import InspectRequest, InstallWanted
from provisioner.transport.base import Transport
from tests.phase1kit import EXAMPLE

WINRM_PASSWORD = "Lab-WinRM-Pw-1"
INSPECT_NOTHING = InspectRequest(
    InstallWanted("installed", "C:\\Program Files\\MicroSIP", "microsip.exe")
)
"""An inspect that asks for no user and no override.ini: one round trip to the agent."""
# The workstations are ws01, ws02...: their names are their addresses.
WINRM_SCOPE = Scope.build(["ws*"], "encrypted")

INVENTORY = """\
defaults:
  settings:
    updatesInterval: never
    EC: 1
    audioCodecs: [opus/48000/2, PCMA/8000/1]
  account:
    transport: tls
  enforced:
    settings:
      updatesInterval: never
  winrm:
    transport: {transport}
    scheme: {scheme}
    username: svc-microsip
    password:
  microsip:
    install_dir: C:\\Program Files\\MicroSIP
workstations:
{workstations}
users:
{users}
"""


@dataclass
class Kit:
    """An inventory folder, its keyring, a running lab and the last build."""

    root: Path
    keyring: vault.Keyring
    lab: InventoryLab
    result: build.BuildResult

    def rebuild(self) -> None:
        """Phase 1 again (after editing the inventory)."""
        self.result = build.build(self.root, opener_factory=lambda _: self.keyring)
        assert self.result.ok, [str(f) for f in self.result.findings]

    def station(self, name: str) -> resolve.StationPlan:
        assert self.result.inventory is not None
        return resolve.resolve_station(self.result.inventory, name)

    def files(self, name: str) -> list[build.BuiltFile]:
        return [f for f in self.result.files if f.target.workstation == name]

    def transport(self, name: str, *, timeout: int | None = None) -> Transport:
        return connections.open_transport(
            self.station(name), self.keyring, self.lab.lab_map(), timeout=timeout
        )

    def push(
        self, name: str, options: push.PushOptions | None = None, transport: Transport | None = None
    ) -> HostResult:
        return push.push_host(
            self.station(name),
            self.files(name),
            transport or self.transport(name),
            options or push.PushOptions(),
        )


def write_inventory(
    root: Path, *, transport: str = "ntlm", workstations: int = 2, users_per_ws: int = 1
) -> vault.Keyring:
    """An inventory of N workstations with sealed passwords, and a keyring that opens them."""
    scheme = "https" if transport == "basic" else "http"
    station_lines, user_lines = [], []
    for w in range(1, workstations + 1):
        names = [f"u{w}x{u}" for u in range(1, users_per_ws + 1)]
        station_lines += [f"  ws{w:02d}:", f"    users: [{', '.join(names)}]"]
        for name in names:
            user_lines += [
                f"  {name}:",
                f"    windows: ACME\\{name}",
                "    accounts:",
                "      main:",
                f"        sip_uri: {name}@pbx.example.com",
                "        password:",
            ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "inventory.yaml").write_text(
        INVENTORY.format(
            transport=transport,
            scheme=scheme,
            workstations="\n".join(station_lines),
            users="\n".join(user_lines),
        )
    )
    identity = vault.generate_identity()
    recipients = vault.new_recipients("lab-test", identity.recipient())
    secretstore.write_recipients(root, recipients)
    secretstore.set_secret(
        root, "/defaults/winrm/password", Secret(WINRM_PASSWORD), recipients, WINRM_SCOPE
    )
    for w in range(1, workstations + 1):
        for u in range(1, users_per_ws + 1):
            secretstore.set_secret(
                root,
                f"/users/u{w}x{u}/accounts/main/password",
                Secret(f"Sip-{w}-{u}-pw"),
                recipients,
            )
    return vault.Keyring(recipients, {identity.kid: identity})


@contextmanager
def lab_kit(tmp: Path, *, scenario: str | None = None, **kwargs: object) -> Iterator[Kit]:
    """Write an inventory, build it, start a lab emulating all of its workstations (as the
    scenario ``scenario``, YAML text, describes them)."""
    root = tmp / "inventory"
    keyring = write_inventory(root, **kwargs)  # type: ignore[arg-type]
    result = build.build(root, opener_factory=lambda _: keyring)
    assert result.ok, [str(f) for f in result.findings]
    assert result.inventory is not None
    loaded = None
    if scenario is not None:
        path = tmp / "scenario.yaml"
        path.write_text(scenario, encoding="utf-8")
        loaded = load_scenario(path, result.inventory)
    running = start_inventory_lab(result.inventory, keyring, folder=tmp / "lab", scenario=loaded)
    try:
        yield Kit(root, keyring, running, result)
    finally:
        running.stop()


# --------------------------------------------------------------------------- the example inventory


@dataclass
class ExampleLab:
    """A tmp copy of the example inventory, its demo key (mode 600) and an in-process lab.

    The lab runs in the test process on ephemeral ports, so tests can inject faults and read
    the emulated disks while the real CLI runs in a subprocess with ``--lab lab_file``.
    """

    root: Path
    inventory: Path
    identity: Path
    passphrase: Path
    lab_file: Path
    keyring: vault.Keyring
    lab: InventoryLab
    env: dict[str, str]

    @property
    def keys(self) -> list[str]:
        """The options that open the demo key."""
        return ["--identity", str(self.identity), "--passphrase-file", str(self.passphrase)]

    @property
    def state(self) -> Path:
        """The default state folder (the example realm's, in the user's state directory)."""
        return default_state(self.root)

    def cli(
        self,
        *args: str,
        stdin: str | None = None,
        keys: bool = True,
        lab: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real CLI from the shell (no terminal) with ``-i``, the keys and the lab."""
        extra = ["-i", str(self.inventory)]
        extra += self.keys if keys else []
        extra += ["--lab", str(self.lab_file)] if lab else []
        result = subprocess.run(
            [sys.executable, "-m", "provisioner.cli", *args, *extra],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            cwd=self.root,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        assert "Traceback" not in result.stderr, result.stderr
        assert "internal error" not in result.stderr, result.stderr
        return result

    def machine(self, name: str) -> Workstation:
        """The emulated workstation ``name``."""
        return self.lab.workstations[name]

    def ini_path(self, workstation: str, user: str) -> str:
        """The Windows path of ``user``'s microsip.ini on ``workstation`` (user: inventory name)."""
        assert self.lab is not None
        model = load_inventory(self.inventory)
        ws = self.machine(workstation)
        account = ws.user(model.users[user].windows)
        assert account is not None, user
        return ws.ini_path(account)

    def ini(self, workstation: str, user: str) -> bytes | None:
        """The bytes of ``user``'s microsip.ini on ``workstation`` (None: absent)."""
        return self.machine(workstation).read(self.ini_path(workstation, user))

    def all_files(self) -> dict[tuple[str, str], bytes | None]:
        """Every managed file of the fleet: (workstation, user or '') to its bytes."""
        model = load_inventory(self.inventory)
        files: dict[tuple[str, str], bytes | None] = {}
        for name, station in model.workstations.items():
            ws = self.machine(name)
            for user in station.users:
                files[(name, user)] = self.ini(name, user)
            files[(name, "")] = ws.read(ws.override_path())
        return files


def copy_example(tmp: Path) -> tuple[Path, Path, Path]:
    """The example inventory copied to ``tmp/inventory``, its demo key to ``tmp`` (mode 600)."""
    inventory = tmp / "inventory"
    shutil.copytree(EXAMPLE, inventory, ignore=shutil.ignore_patterns(".lab.json", ".lab.log"))
    identity = tmp / "demo.sipid"
    shutil.copyfile(EXAMPLE / ".demo-key/demo-only.sipid", identity)
    identity.chmod(0o600)
    passphrase = tmp / "demo.passphrase"
    shutil.copyfile(EXAMPLE / ".demo-key/demo-only.passphrase", passphrase)
    passphrase.chmod(0o600)
    return inventory, identity, passphrase


def free_lab_addresses(count: int) -> tuple[str, int]:
    """A base address and a port for a lab of ``count`` workstations: nothing listens on any of
    the ``count`` addresses from the base on, at that port (each is bound to make sure). Chosen
    at random in 127.0.0.0/8 away from the default 127.0.0.2:5985, so that labs of tests running
    side by side, and whatever else listens on this machine, are not in the way."""
    for _ in range(100):
        # The last byte leaves room for every workstation: the lab skips .0 and .255.
        second, third, last = (
            random.randrange(1, 255),
            random.randrange(256),
            random.randrange(1, 255 - count),
        )
        base = ipaddress.IPv4Address(f"127.{second}.{third}.{last}")
        with ExitStack() as held:
            try:
                first = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                first.bind((str(base), 0))
                port: int = first.getsockname()[1]
                for number in range(1, count):
                    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind((str(base + number), port))
            except OSError:
                continue
            return str(base), port
    raise AssertionError(f"no {count} free loopback addresses found")


def default_state(home: Path, realm: str = "example-voip") -> Path:
    """The state folder the CLI uses for ``realm`` when HOME is ``home`` and neither --state,
    PROVISIONER_STATE nor XDG_STATE_HOME says otherwise."""
    return home / ".local" / "state" / "microsip-provisioner" / realm


def clean_env(tmp: Path) -> dict[str, str]:
    """An environment without PROVISIONER_* variables and with no identity directory."""
    config = tmp / "config"
    config.mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "XDG_CONFIG_HOME": str(config),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "COLUMNS": "200",
    }


def run_cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m provisioner.cli ARGS`` in ``cwd``; never a traceback or an internal error."""
    result = subprocess.run(
        [sys.executable, "-m", "provisioner.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    return result


@contextmanager
def example_lab(tmp: Path) -> Iterator[ExampleLab]:
    """Copy the example inventory and start an in-process lab emulating it (ephemeral ports)."""
    inventory, identity, passphrase = copy_example(tmp)
    recipients = vault.load_recipients_file(inventory / "recipients.yaml")
    keyring = vault.Keyring(recipients)
    secret = passphrase.read_bytes().split(b"\n", 1)[0]
    keyring.add(secretstore.unlock(secretstore.read_identity(identity), secret))
    model = load_inventory(inventory)
    running = start_inventory_lab(model, keyring, folder=tmp / "lab", port=0)
    try:
        lab_file = tmp / "lab.json"
        lab_file.write_text(running.lab_map().dump(), encoding="utf-8")
        yield ExampleLab(
            tmp, inventory, identity, passphrase, lab_file, keyring, running, clean_env(tmp)
        )
    finally:
        running.stop()


# --------------------------------------------------------------------------- not the lab

ATTACKER = "127.0.0.1"
"""Where :class:`Listener` listens: an address an inventory edit could point a workstation at."""


class Listener:
    """The attacker's WinRM look-alike: records connections and requests, answers 401.

    With ``tls``, it speaks HTTPS with that context (a certificate from the attacker's CA) and
    records what it decrypted.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.sock = socket.create_server((ATTACKER, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    if self.tls is not None:
                        conn = self.tls.wrap_socket(conn, server_side=True)
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(
                        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Negotiate\r\n"
                        b'WWW-Authenticate: Basic realm="WSMAN"\r\nContent-Length: 0\r\n'
                        b"Connection: close\r\n\r\n"
                    )
                except OSError:
                    pass
                self.received += data

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def saw(self, password: str) -> bool:
        """True if the password, or its Basic form, reached the listener."""
        data = bytes(self.received)
        basic = base64.b64encode(f"svc-microsip:{password}".encode())
        return password.encode() in data or basic in data


@contextmanager
def listener(tls: ssl.SSLContext | None = None) -> Iterator[Listener]:
    running = Listener(tls)
    try:
        yield running
    finally:
        running.close()
