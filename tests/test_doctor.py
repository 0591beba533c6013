"""doctor against the lab: each failure names the fix to try."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from provisioner.inventory.model import Secret
from provisioner.lab import Faults
from provisioner.rollout import connections, doctor
from provisioner.secrets.credscope import Scope
from provisioner.transport.winrm import WinrmOptions
from tests.labkit import lab_kit, listener


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


def test_the_engine_decides_how_far_doctor_goes(tmp_path: Path) -> None:
    scope = Scope.build(["127.0.0.0/8"], "none")
    with listener() as target:
        options = WinrmOptions("127.0.0.1", "svc", Secret("pw"), port=target.port, scope=scope)
        # Outside the scope: no further check, no connection.
        outside = dataclasses.replace(options, scope=Scope.build(["10.0.0.0/8"], "none"))
        checks, may_connect = doctor.before_connecting("ws01", outside)
        assert [(c.name, c.ok) for c in checks] == [("scope", False)] and not may_connect
        assert target.connections == 0
        # Settings a push refuses are reported; doctor still connects, to diagnose.
        weak = dataclasses.replace(options, message_encryption="never")
        checks, may_connect = doctor.before_connecting("ws01", weak)
        assert [(c.name, c.ok) for c in checks] == [
            ("scope", True),
            ("winrm settings", False),
            ("dns", True),
            ("port", True),
        ]
        assert may_connect
    # A closed port stops doctor before it connects.
    checks, may_connect = doctor.before_connecting("ws01", weak)
    assert [(c.name, c.ok) for c in checks][-1] == ("port", False) and not may_connect
