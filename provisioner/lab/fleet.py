"""Start lab hosts that are emulated workstations, from a short description.

Typical use::

    with Lab(LabAgent()) as lab:
        spec = WorkstationSpec(users=("ACME\\alice", UserSpec("ACME\\bob", running=True)))
        host, ws = add_workstation(lab, HostConfig(credentials={"admin": "pw"}, port=0), spec)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.lab.host import HostConfig, LabHost
from provisioner.lab.server import Lab
from provisioner.lab.workstation import Mode, User, Workstation


@dataclass(frozen=True)
class UserSpec:
    """One account: ``has_profile`` False means it never logged on here (``hive_loaded`` is
    whether it is logged on now); ``ini`` pre-creates its ini; ``running`` is how many MicroSIP
    processes it runs (True: one). The other fields are :meth:`Workstation.add_user`'s (None:
    its default)."""

    windows: str
    has_profile: bool = True
    running: bool | int = False
    ini: bytes | None = None
    rid: int | None = None
    sid: str | None = None
    profile: str | None = None
    shell_appdata: str | None = None
    hive_loaded: bool = False
    hkcu_microsip: str | None = None
    hive_file: bool = True


@dataclass(frozen=True)
class WorkstationSpec:
    """One workstation; ``mode`` None means MicroSIP is not installed."""

    users: tuple[UserSpec | str, ...] = ()
    computer: str = ""
    mode: Mode | None = "installed"
    install_dir: str = "C:\\Program Files\\MicroSIP"
    exe: str = "microsip.exe"
    registry: bool | None = None
    msi: bool = False
    files: Mapping[str, bytes] = field(default_factory=dict)
    """Other files present from the start: Windows path to content."""


def build_workstation(root: Path, spec: WorkstationSpec, *, computer: str) -> Workstation:
    """A :class:`Workstation` on ``root`` as ``spec`` describes it."""
    ws = Workstation(root, computer=spec.computer or computer)
    if spec.mode is not None:
        ws.install_microsip(
            spec.mode,
            install_dir=spec.install_dir,
            exe=spec.exe,
            registry=spec.registry,
            msi=spec.msi,
        )
    for item in spec.users:
        add_account(ws, UserSpec(item) if isinstance(item, str) else item, spec.exe)
    for path, data in spec.files.items():
        ws.put(path, data)
    return ws


def add_account(ws: Workstation, spec: UserSpec, exe: str) -> User:
    """The account ``spec`` describes, its ini and its MicroSIP processes (image ``exe``)."""
    user = ws.add_user(
        spec.windows,
        rid=spec.rid,
        sid=spec.sid,
        has_profile=spec.has_profile,
        profile=spec.profile,
        shell_appdata=spec.shell_appdata,
        hive_loaded=spec.hive_loaded,
        hkcu_microsip=spec.hkcu_microsip,
        hive_file=spec.hive_file,
    )
    for _ in range(int(spec.running)):
        ws.start_microsip(user, exe)
    if spec.ini is not None and user.profile is not None and ws.install is not None:
        ws.put(ws.ini_path(user), spec.ini)
    return user


def add_workstation(
    lab: Lab, config: HostConfig, spec: WorkstationSpec
) -> tuple[LabHost, Workstation]:
    """Start one host (its handler must be a ``LabAgent``) holding a new workstation."""
    host = lab.add_host(config)
    computer = (spec.computer or host.name).upper()[:15]
    ws = build_workstation(lab.folder / "workstations" / host.name, spec, computer=computer)
    with host.lock:
        host.state = ws
    return host, ws


def add_fleet(
    lab: Lab, config: HostConfig, specs: Iterable[WorkstationSpec]
) -> list[tuple[LabHost, Workstation]]:
    """One host per spec; names and addresses are chosen by the lab."""
    if config.name or config.address:
        raise ValueError("add_fleet chooses names and addresses; leave them empty")
    return [add_workstation(lab, config, spec) for spec in specs]
