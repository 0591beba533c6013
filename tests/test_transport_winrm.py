"""The WinRM transport against the lab: what one NTLM push costs on the wire."""

from __future__ import annotations

from pathlib import Path

from provisioner.lab import Lab
from provisioner.lab.agent import LabAgent
from provisioner.lab.fleet import WorkstationSpec, add_workstation
from provisioner.lab.host import HostConfig
from provisioner.model import Secret
from provisioner.transport.winrm import WinrmOptions, WinrmTransport


def test_ntlm_push_uses_one_connection(tmp_path: Path) -> None:
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host, _ = add_workstation(
            lab, HostConfig(credentials={"svc": "Pw-1"}, port=0), WorkstationSpec()
        )
        options = WinrmOptions(host.address, "svc", Secret("Pw-1"), port=host.port)
        transport = WinrmTransport("ws01", options)
        try:
            answer = transport.request("inspect", {"op": "inspect", "protocol": 1, "users": []})
        finally:
            transport.close()
        assert answer["protocol"] == 1
        stats = host.stats()
        assert stats.connections == 1
        assert stats.requests == 9
        assert stats.encrypted_requests == stats.encrypted_responses == 6
        assert host.open_shells == 0
