"""From a workstation's resolved ``winrm:`` options to a ready transport (lab-aware)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import vault
from provisioner.errors import AuthError, ProvisionerError
from provisioner.model import Secret
from provisioner.resolve import StationPlan
from provisioner.transport.winrm import WinrmOptions, WinrmTransport


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

    @classmethod
    def load(cls, path: Path) -> LabMap:
        """Read a lab file; a clear error when it is missing or malformed."""
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
            hosts = {
                name: LabEndpoint(str(h["address"]), int(h["port"]), str(h["scheme"]))
                for name, h in data["hosts"].items()
            }
            return cls(str(data["ca_path"]), hosts, int(data.get("pid", 0)))
        except FileNotFoundError:
            raise ProvisionerError(
                f"{path} does not exist; start the lab with 'provisioner lab up'"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProvisionerError(f"{path} is not a lab file: {exc}") from None

    def dump(self) -> str:
        """The JSON text of this lab file."""
        return json.dumps(
            {
                "version": 1,
                "pid": self.pid,
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
    resolved = plan.winrm.get("password")
    if resolved is None or resolved.value is None:
        return None
    secret = opener.open(str(resolved.value), resolved.final.pointer)
    vault.check_policy(secret, where=resolved.final.pointer)
    return secret


def winrm_options(
    plan: StationPlan,
    opener: vault.Opener,
    lab: LabMap | None = None,
    *,
    timeout: int | None = None,
) -> WinrmOptions:
    """Everything needed to connect to one workstation."""
    values: dict[str, Any] = {key: r.value for key, r in plan.winrm.items()}
    name = plan.workstation.name
    address, port, scheme = plan.workstation.address, int(values.get("port") or 0), ""
    scheme = str(values.get("scheme") or "")
    ca_path = values.get("ca_trust_path")
    if lab is not None:
        endpoint = lab.hosts.get(name)
        if endpoint is None:
            raise ProvisionerError(f"the lab does not emulate {name}; restart 'provisioner lab up'")
        address, port, scheme, ca_path = (
            endpoint.address,
            endpoint.port,
            endpoint.scheme,
            (lab.ca_path),
        )
    operation = int(values.get("operation_timeout") or 20)
    read = int(values.get("read_timeout") or max(operation + 10, 30))
    if timeout is not None:
        operation, read = max(1, min(operation, timeout - 1)), timeout
    username = values.get("username")
    if not username:
        raise AuthError(f"no winrm.username for {name}", host=name)
    return WinrmOptions(
        address=address,
        username=str(username),
        password=winrm_password(plan, opener),
        transport=str(values.get("transport") or "ntlm"),
        scheme=scheme,
        port=port,
        ca_trust_path=str(ca_path) if ca_path else None,
        server_cert_validation=str(values.get("server_cert_validation") or "validate"),
        allow_basic_over_http=bool(values.get("allow_basic_over_http")),
        message_encryption=str(values.get("message_encryption") or "auto"),
        operation_timeout=operation,
        read_timeout=read,
    )


def open_transport(
    plan: StationPlan,
    opener: vault.Opener,
    lab: LabMap | None = None,
    *,
    timeout: int | None = None,
) -> WinrmTransport:
    """A WinRM transport to one workstation (no connection is made yet)."""
    return WinrmTransport(plan.workstation.name, winrm_options(plan, opener, lab, timeout=timeout))
