"""A lab that emulates every workstation of an inventory, on loopback addresses.

Each inventory workstation becomes a lab host listening on its own 127.0.0.N address, with the
inventory's Windows users (profiles created), MicroSIP installed as the inventory says, and the
WinRM account and password the inventory's ``winrm:`` options name. A scenario
(:mod:`provisioner.lab.scenario`) changes what a workstation has beyond that. The returned
:class:`LabMap` replaces the real addresses when passed to push, rollout or doctor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import LabError
from provisioner.inventory.model import Inventory
from provisioner.inventory.resolve import resolve_station
from provisioner.lab.agent import LabAgent
from provisioner.lab.fleet import UserSpec, WorkstationSpec, add_workstation
from provisioner.lab.host import HostConfig, LabHost
from provisioner.lab.scenario import Scenario
from provisioner.lab.server import DEFAULT_BASE_ADDRESS, Lab
from provisioner.lab.workstation import Workstation
from provisioner.rollout.connections import LabEndpoint, LabMap, winrm_password
from provisioner.secrets import vault


@dataclass
class InventoryLab:
    """A running lab and, per inventory workstation, its host and emulated machine."""

    lab: Lab
    hosts: dict[str, LabHost]
    workstations: dict[str, Workstation]

    def lab_map(self, pid: int = 0, folder: str = "") -> LabMap:
        """Endpoints for push, rollout and doctor."""
        return LabMap(
            ca_path=str(self.lab.ca_path),
            hosts={
                name: LabEndpoint(host.address, host.port, host.scheme)
                for name, host in self.hosts.items()
            },
            pid=pid,
            folder=folder,
        )

    def stop(self) -> None:
        """Stop every host."""
        self.lab.stop()


def start_inventory_lab(
    inventory: Inventory,
    opener: vault.Opener,
    *,
    folder: Path | None = None,
    names: list[str] | None = None,
    port: int | None = 0,
    base_address: str = DEFAULT_BASE_ADDRESS,
    scenario: Scenario | None = None,
) -> InventoryLab:
    """Start one emulated workstation per inventory workstation (or per name in ``names``),
    each as ``scenario`` describes it (:class:`~provisioner.lab.scenario.ScenarioErrors` when
    a path cannot be set up), on ``base_address`` and the addresses after it."""
    lab = Lab(LabAgent(), folder=folder, base_address=base_address)
    hosts: dict[str, LabHost] = {}
    machines: dict[str, Workstation] = {}
    try:
        for name in names or sorted(inventory.workstations):
            plan = resolve_station(inventory, name)
            winrm = {key: r.value for key, r in plan.winrm.items()}
            username = str(winrm.get("username") or "")
            password = winrm_password(plan, opener)
            if not username or password is None:
                raise LabError(f"{name}: the lab needs winrm.username and winrm.password")
            transport = str(winrm.get("transport") or "ntlm")
            scheme = str(winrm.get("scheme") or ("https" if transport == "basic" else "http"))
            config = HostConfig(
                # The emulated host must accept exactly the inventory's credentials.
                credentials={username: password.reveal()},
                name=name,
                port=port,
                scheme="https" if scheme == "https" else "http",
                auth=frozenset({"basic"} if transport == "basic" else {"ntlm"}),
                allow_unencrypted=bool(winrm.get("allow_basic_over_http")),
            )
            users = tuple(UserSpec(inventory.users[u].windows) for u in plan.workstation.users)
            spec = WorkstationSpec(
                users=users,
                mode="portable" if plan.install.mode == "portable" else "installed",
                install_dir=plan.install.install_dir,
                exe=plan.install.exe,
            )
            setup = scenario.workstations.get(name) if scenario is not None else None
            if setup is None:
                host, machine = add_workstation(lab, config, spec)
            else:
                host, machine = setup.build(lab, config, spec, inventory)
            hosts[name], machines[name] = host, machine
    except BaseException:
        lab.stop()
        raise
    return InventoryLab(lab, hosts, machines)
