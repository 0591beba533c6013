"""doctor against the lab: each failure names the fix to try."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from provisioner import connections, doctor
from provisioner.lab import Faults
from tests.labkit import lab_kit


def test_all_checks_pass_on_a_healthy_workstation(tmp_path: Path) -> None:
    with lab_kit(tmp_path, transport="basic") as kit:
        options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
        checks = doctor.network_checks(options)
        checks += doctor.remote_checks(
            kit.station("ws01"), kit.files("ws01"), kit.transport("ws01"), options
        )
        names = [c.name for c in checks if c.ok]
        assert names[:3] == ["dns", "port", "tls"]
        assert {"auth", "encryption", "powershell", "microsip", "disk"} <= set(names)
        assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_closed_port_tls_and_credentials_failures_carry_fixes(tmp_path: Path) -> None:
    with lab_kit(tmp_path, transport="basic") as kit:
        options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
        untrusted = doctor.network_checks(dataclasses.replace(options, ca_trust_path=None))
        tls = next(c for c in untrusted if c.name == "tls")
        assert not tls.ok and "ca_trust_path" in tls.fix
        kit.lab.hosts["ws01"].set_faults(Faults(http_401=True))
        auth = doctor.remote_checks(
            kit.station("ws01"), kit.files("ws01"), kit.transport("ws01"), options
        )
        assert not auth[0].ok and "winrm.username" in auth[0].fix
        kit.lab.hosts["ws01"].set_faults(Faults(refuse=True))
        closed = doctor.network_checks(options)
        assert [c.name for c in closed] == ["dns", "port"]
        assert not closed[1].ok and "winrm quickconfig" in closed[1].fix


def test_missing_profile_and_install_are_reported_per_user(tmp_path: Path) -> None:
    with lab_kit(tmp_path, users_per_ws=2) as kit:
        ws = kit.lab.workstations["ws01"]
        user = ws.lookup_account("ACME\\u1x2")
        assert user is not None
        ws.users[ws.users.index(user)] = dataclasses.replace(user, profile=None)
        options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
        checks = doctor.remote_checks(
            kit.station("ws01"), kit.files("ws01"), kit.transport("ws01"), options
        )
        failed = {c.name: c for c in checks if not c.ok}
        assert set(failed) == {"profile u1x2"}
        assert "log on once" in failed["profile u1x2"].fix
