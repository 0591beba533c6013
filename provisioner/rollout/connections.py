"""From a workstation's resolved ``winrm:`` options to a ready transport (lab-aware).

The WinRM password comes with the scope sealed into its token; with ``--lab`` the connection
goes to the lab's loopback endpoint and the scope is checked against the inventory address, as
the real push would check it (a lab file names loopback addresses only).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner.errors import AuthError, CaFileError, LabError, ProvisionerError
from provisioner.inventory.model import Secret
from provisioner.inventory.resolve import StationPlan
from provisioner.secrets import vault
from provisioner.secrets.credscope import MAX_CA_FILE_BYTES, Scope, ca_fingerprint, is_loopback
from provisioner.transport.winrm import WinrmOptions, WinrmTransport, check_options


@dataclass(frozen=True)
class LabEndpoint:
    """Where the lab serves one emulated workstation."""

    address: str
    port: int
    scheme: str


@dataclass(frozen=True)
class LabMap:
    """The file ``provisioner lab up`` writes: loopback endpoints replacing real addresses."""

    ca_path: str
    hosts: Mapping[str, LabEndpoint]
    pid: int = 0
    folder: str = ""
    """The lab's private temp folder (``lab down`` removes it whatever state the lab died in)."""
    starting: bool = False
    """Written before the lab starts: it names the process and folder, no host yet."""

    @classmethod
    def load(cls, path: Path, *, starting_ok: bool = False) -> LabMap:
        """Read a lab file; a clear error when it is missing or malformed, or (unless
        ``starting_ok``) names a lab that is still starting."""
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
            hosts = {
                name: LabEndpoint(str(h["address"]), int(h["port"]), str(h["scheme"]))
                for name, h in data["hosts"].items()
            }
            mapped = cls(
                str(data["ca_path"]),
                hosts,
                int(data.get("pid", 0)),
                str(data.get("folder", "")),
                data.get("starting") is True,
            )
        except FileNotFoundError:
            raise LabError(
                f"{path} does not exist; start the lab with 'provisioner lab up'"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabError(f"{path} is not a lab file: {exc}") from None
        # A lab file may sit in the inventory folder, where its editors could write one: it
        # must never send a real WinRM password off this machine.
        remote = sorted(name for name, e in mapped.hosts.items() if not is_loopback(e.address))
        if remote:
            raise LabError(
                f"{path} is not a lab file: it sends {', '.join(remote[:3])} to addresses that "
                "are not loopback (127.0.0.0/8, ::1)"
            )
        if mapped.starting and not starting_ok:
            raise LabError(
                f"{path}: the lab is still starting, or died while starting "
                "('provisioner lab down' removes what it left)"
            )
        return mapped

    def dump(self) -> str:
        """The JSON text of this lab file."""
        return json.dumps(
            {
                "version": 1,
                "pid": self.pid,
                "folder": self.folder,
                **({"starting": True} if self.starting else {}),
                "ca_path": self.ca_path,
                "hosts": {
                    name: {"address": e.address, "port": e.port, "scheme": e.scheme}
                    for name, e in sorted(self.hosts.items())
                },
            },
            indent=2,
        )


def winrm_password(plan: StationPlan, opener: vault.Opener) -> Secret | None:
    """The workstation's WinRM password, opened from its sealed token."""
    credential = winrm_credential(plan, opener)
    return credential[0] if credential is not None else None


def winrm_credential(
    plan: StationPlan, opener: vault.Opener
) -> tuple[Secret, Scope | None, str] | None:
    """The WinRM password, the scope sealed with it, and the path of its token.

    Opening authenticates the whole token, so the scope read from it is the sealed one (with
    a key-less placeholder opener it is only claimed, and no real password is involved).
    """
    resolved = plan.winrm.get("password")
    if resolved is None or resolved.value is None:
        return None
    token, pointer = str(resolved.value), resolved.final.pointer
    secret = opener.open(token, pointer)
    vault.check_policy(secret, where=pointer)
    return secret, vault.token_scope(token), pointer


def winrm_options(
    plan: StationPlan,
    opener: vault.Opener,
    lab: LabMap | None = None,
    *,
    timeout: int | None = None,
    diagnostic: bool = False,
) -> WinrmOptions:
    """Everything needed to connect to one workstation (``diagnostic``: for ``doctor``)."""
    values: dict[str, Any] = {key: r.value for key, r in plan.winrm.items()}
    name = plan.workstation.name
    address, port, scheme = plan.workstation.address, int(values.get("port") or 0), ""
    scheme = str(values.get("scheme") or "")
    inventory_ca = values.get("ca_trust_path")
    ca_path = str(inventory_ca) if inventory_ca else None
    lab_for = ""
    if lab is not None:
        lab_for = address
        endpoint = lab.hosts.get(name)
        if endpoint is None:
            raise LabError(
                f"the lab does not emulate {name}: it was started before {name} was in the "
                "inventory. Stop it with 'provisioner lab down', then start it again with "
                "'provisioner lab up' and the options you gave it before"
            )
        address, port, scheme, ca_path = (
            endpoint.address,
            endpoint.port,
            endpoint.scheme,
            lab.ca_path,
        )
    operation = int(values.get("operation_timeout") or 20)
    read = int(values.get("read_timeout") or max(operation + 10, 30))
    if timeout is not None:
        operation, read = max(1, min(operation, timeout - 1)), timeout
    username = values.get("username")
    if not username:
        raise AuthError(f"no winrm.username for {name}", host=name)
    credential = winrm_credential(plan, opener)
    password, scope, password_path = credential if credential else (None, None, "")
    # With --lab the lab's CA stands in for the inventory's, which is checked as a push would.
    ca_trusted = not inventory_ca or bool(
        scope is not None
        and scope.ca
        and ca_file_fingerprint(Path(str(inventory_ca)), f"{name}: winrm.ca_trust_path") == scope.ca
    )
    return WinrmOptions(
        address=address,
        username=str(username),
        password=password,
        scope=scope,
        lab_for=lab_for,
        diagnostic=diagnostic,
        password_path=password_path,
        transport=str(values.get("transport") or "ntlm"),
        scheme=scheme,
        port=port,
        ca_trust_path=ca_path,
        ca_trusted=ca_trusted,
        server_cert_validation=str(values.get("server_cert_validation") or "validate"),
        allow_basic_over_http=bool(values.get("allow_basic_over_http")),
        message_encryption=str(values.get("message_encryption") or "auto"),
        operation_timeout=operation,
        read_timeout=read,
    )


def ca_file_fingerprint(path: Path, where: str) -> str:
    """The :func:`~provisioner.secrets.credscope.ca_fingerprint` of a CA file, read in bounds."""
    try:
        # O_NONBLOCK: a FIFO standing there must not make the open wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise CaFileError(f"{where}: {path} is not a file")
            data = handle.read(MAX_CA_FILE_BYTES + 1)
    except OSError as exc:
        raise CaFileError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CA_FILE_BYTES:
        raise CaFileError(
            f"{where}: {path} is larger than {MAX_CA_FILE_BYTES // 1024} KiB; give the CA file"
        )
    return ca_fingerprint(data)


def open_transport(
    plan: StationPlan,
    opener: vault.Opener,
    lab: LabMap | None = None,
    *,
    timeout: int | None = None,
    diagnostic: bool = False,
) -> WinrmTransport:
    """A WinRM transport to one workstation (no connection is made yet; scope checked)."""
    options = winrm_options(plan, opener, lab, timeout=timeout, diagnostic=diagnostic)
    return WinrmTransport(plan.workstation.name, options)


def refused_connections(
    stations: Mapping[str, StationPlan], opener: vault.Opener, lab: LabMap | None = None
) -> list[str]:
    """``host: why`` for every workstation whose connection would be refused (none is made).

    A fleet run checks this before the first connection, so that one address outside the
    credential's scope stops the run instead of failing one host among many. Each token is
    opened once, however many workstations share it.
    """
    opened: dict[tuple[str, str], Secret] = {}

    class Cached:
        def open(self, token: str, path: str) -> Secret:
            key = (token, path)
            if key not in opened:
                opened[key] = opener.open(token, path)
            return opened[key]

    cached = Cached()
    refused = []
    for name, plan in sorted(stations.items()):
        try:
            options = winrm_options(plan, cached, lab)
            check_options(options, name)
        except ProvisionerError as exc:
            refused.append(f"{name}: {exc}")
    return refused
