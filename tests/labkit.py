"""A small inventory pushed to emulated workstations: shared by the push and rollout tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from provisioner import build, connections, push, resolve, secretstore, vault
from provisioner.lab.inventory_lab import InventoryLab, start_inventory_lab
from provisioner.model import Secret
from provisioner.results import HostResult
from provisioner.transport.base import Transport

WINRM_PASSWORD = "Lab-WinRM-Pw-1"

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
    secretstore.set_secret(root, "/defaults/winrm/password", Secret(WINRM_PASSWORD), recipients)
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
def lab_kit(tmp: Path, **kwargs: object) -> Iterator[Kit]:
    """Write an inventory, build it, start a lab emulating all of its workstations."""
    root = tmp / "inventory"
    keyring = write_inventory(root, **kwargs)  # type: ignore[arg-type]
    result = build.build(root, opener_factory=lambda _: keyring)
    assert result.ok, [str(f) for f in result.findings]
    assert result.inventory is not None
    running = start_inventory_lab(result.inventory, keyring, folder=tmp / "lab")
    try:
        yield Kit(root, keyring, running, result)
    finally:
        running.stop()
