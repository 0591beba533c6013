"""Push one workstation through the real pywinrm client to the lab: merge, safety, faults."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from provisioner.lab import Faults, ResetMidCommand, Trigger
from provisioner.lab.workstation import Workstation
from provisioner.microsip import ini
from provisioner.records.results import Status
from provisioner.rollout.push import PushOptions
from provisioner.secrets.credscope import Scope
from provisioner.transport.agent.messages import AgentReply, AgentRequest, InspectRequest
from provisioner.transport.base import ReadOnlyTransport, Transport
from tests.labkit import Kit, lab_kit

R = TypeVar("R", bound=AgentReply)

INI = "C:\\Users\\u1x1\\AppData\\Roaming\\MicroSIP\\microsip.ini"


@pytest.fixture
def kit(tmp_path: Path) -> Any:
    with lab_kit(tmp_path) as running:
        yield running


def machine(kit: Kit, name: str = "ws01") -> Workstation:
    ws = kit.lab.workstations[name]
    return ws


def text(data: bytes | None) -> str:
    assert data is not None
    return ini.decode_ini_bytes(data)


@pytest.mark.parametrize("transport", ["basic", "ntlm"])
def test_first_push_then_unchanged_with_request_counts(tmp_path: Path, transport: str) -> None:
    with lab_kit(tmp_path, transport=transport) as kit:
        host = kit.lab.hosts["ws01"]
        first = kit.push("ws01")
        assert first.status == Status.CHANGED, first.message
        changed_requests = host.request_count
        data = machine(kit).read(INI)
        assert data is not None and data.startswith(b"\xff\xfe")
        assert b"\n" not in data.replace(b"\r\x00\n\x00", b"")  # CRLF only
        assert "password=Sip-1-1-pw" in text(data)
        applied = machine(kit).read(machine(kit).state_for(INI, "applied"))
        assert applied is not None and "Sip-1-1-pw" not in text(applied)
        host.reset_counts()
        again = kit.push("ws01")
        assert again.status == Status.UNCHANGED, again.message
        auth_legs = 3 if transport == "ntlm" else 0
        assert host.request_count <= 6 + auth_legs  # one command
        assert changed_requests <= 11 + auth_legs  # two commands


def test_acl_and_backups(kit: Kit) -> None:
    kit.push("ws01")
    ws = machine(kit)
    user = ws.lookup_account("ACME\\u1x1")
    assert user is not None
    acl = ws.acl(INI)
    assert acl is not None
    assert set(acl.rights()) == {user.sid, "S-1-5-18", "S-1-5-32-544"}
    kit.push("ws01", PushOptions(reset=True))
    assert ws.read(ws.state_for(INI, "backup.1")) is not None


def _edit(ws: Workstation, path: str, change: Mapping[tuple[str, str], str | None]) -> None:
    """Change keys as MicroSIP or the user would (UTF-16LE kept); new keys go into their section."""
    lines = text(ws.read(path)).replace("\r\n", "\n").rstrip("\n").split("\n")
    pending = dict(change)
    out: list[str] = []
    section = ""
    for line in lines:
        if line.startswith("["):
            section = line.strip("[]")
            out.append(line)
            for (name, key), value in list(pending.items()):
                if name == section and not any(
                    existing.split("=", 1)[0] == key for existing in lines
                ):
                    if value is not None:
                        out.append(f"{key}={value}")
                    del pending[(name, key)]
            continue
        key = line.split("=", 1)[0]
        if (section, key) in pending:
            value = pending.pop((section, key))
            if value is not None:
                out.append(f"{key}={value}")
            continue
        out.append(line)
    for (name, key), value in pending.items():
        out += [f"[{name}]", f"{key}={value}"]
    ws.put(path, ini.encode_ini("\n".join(out) + "\n"))


def test_merge_keeps_user_and_runtime_changes_and_enforces(kit: Kit) -> None:
    kit.push("ws01")
    ws = machine(kit)
    _edit(
        ws,
        INI,
        {
            ("Settings", "EC"): "0",
            ("Settings", "updatesInterval"): "daily",
            ("Settings", "volumeOutput"): "55",
            ("Calls", "0"): "1002;Bob;1;1;2;",
        },
    )
    result = kit.push("ws01")
    assert result.status == Status.CHANGED
    doc = ini.parse_ini(text(ws.read(INI)))
    assert doc.get("Settings", "EC") == "0"  # the user's choice survives
    assert doc.get("Settings", "updatesInterval") == "never"  # enforced wins
    assert doc.get("Settings", "volumeOutput") == "55"  # MicroSIP's runtime key kept
    assert doc.section("Calls") is not None  # history kept
    assert kit.push("ws01").status == Status.UNCHANGED


def test_password_encrypted_by_microsip_is_not_rewritten(kit: Kit) -> None:
    kit.push("ws01")
    ws = machine(kit)
    _edit(ws, INI, {("Account1", "password"): "0a1b2c3d4e5f60718293a4b5c6d7e8f9"})
    assert kit.push("ws01").status == Status.UNCHANGED


def test_inventory_change_reaches_the_file(kit: Kit) -> None:
    kit.push("ws01")
    path = kit.root / "inventory.yaml"
    path.write_text(path.read_text().replace("    EC: 1\n", "    EC: 0\n    VAD: 1\n"))
    kit.rebuild()
    result = kit.push("ws01")
    assert result.status == Status.CHANGED
    change = next(c for c in result.files if c.kind == "microsip")
    assert "+VAD=1" in change.diff and "********" not in change.diff.replace("password", "")
    doc = ini.parse_ini(text(machine(kit).read(INI)))
    assert doc.get("Settings", "VAD") == "1"


def test_password_change_is_named_but_never_shown(kit: Kit) -> None:
    kit.push("ws01")
    from provisioner.inventory.model import Secret
    from provisioner.secrets import secretstore

    secretstore.set_secret(
        kit.root,
        "/users/u1x1/accounts/main/password",
        Secret("Brand-New-Pw-9"),
        kit.keyring.recipients,
    )
    kit.rebuild()
    dry = kit.push("ws01", transport=ReadOnlyTransport(kit.transport("ws01")))
    change = next(c for c in dry.files if c.kind == "microsip")
    assert "[Account1] password: changed" in change.diff
    assert "Brand-New-Pw-9" not in change.diff and "Sip-1-1-pw" not in change.diff
    assert "Sip-1-1-pw" in text(machine(kit).read(INI))  # dry run wrote nothing


@pytest.mark.parametrize(
    ("policy", "status", "stopped"),
    [("skip", Status.BUSY, 0), ("stop", Status.CHANGED, 1), ("force", Status.CHANGED, 0)],
)
def test_running_microsip_policies(kit: Kit, policy: str, status: Status, stopped: int) -> None:
    ws = machine(kit)
    user = ws.lookup_account("ACME\\u1x1")
    assert user is not None
    ws.start_microsip(user)
    result = kit.push("ws01", PushOptions(if_running=policy))
    assert result.status == status, result.message
    assert len(ws.stopped) == stopped
    if policy == "skip":
        assert ws.read(INI) is None
        assert "running" in result.message
    if policy == "force":
        assert any("rewrites every [Settings]" in w for w in result.warnings)


class _Meddler:
    """The real transport, but the file changes under us right after inspect."""

    def __init__(self, inner: Transport, ws: Workstation, times: int) -> None:
        self.inner, self.ws, self.times = inner, ws, times

    @property
    def host(self) -> str:
        return self.inner.host

    def request(self, request: AgentRequest[R]) -> R:
        answer = self.inner.request(request)
        if isinstance(request, InspectRequest) and self.times > 0:
            self.times -= 1
            _edit(self.ws, INI, {("Settings", "volumeInput"): str(10 + self.times)})
        return answer

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize(("changes", "status"), [(1, Status.CHANGED), (2, Status.CONFLICT)])
def test_file_changed_during_push(kit: Kit, changes: int, status: Status) -> None:
    kit.push("ws01")
    path = kit.root / "inventory.yaml"
    path.write_text(path.read_text().replace("    EC: 1\n", "    EC: 0\n"))
    kit.rebuild()
    ws = machine(kit)
    result = kit.push("ws01", transport=_Meddler(kit.transport("ws01"), ws, changes))
    assert result.status == status, result.message
    doc = ini.parse_ini(text(ws.read(INI)))
    assert doc.get("Settings", "volumeInput") is not None  # MicroSIP's write was not lost


def test_reset_and_rollback(kit: Kit) -> None:
    kit.push("ws01")
    ws = machine(kit)
    _edit(ws, INI, {("Settings", "EC"): "0"})
    edited = ws.read(INI)
    reset = kit.push("ws01", PushOptions(reset=True))
    assert reset.status == Status.CHANGED
    assert ini.parse_ini(text(ws.read(INI))).get("Settings", "EC") == "1"
    from provisioner.rollout.push import rollback_host

    back = rollback_host(
        kit.station("ws01"), kit.files("ws01"), kit.transport("ws01"), PushOptions(users=("u1x1",))
    )
    assert back.status == Status.CHANGED, back.message
    assert ws.read(INI) == edited


def test_a_rollback_that_cannot_look_at_a_file_fails_it(kit: Kit) -> None:
    # u1x1 denies Administrators the attributes of their MicroSIP folder: inspect cannot look
    # at the file, and the rollback must say so rather than report nothing to do.
    kit.push("ws01")
    ws = machine(kit)
    ws.faults.attributes_denied.add(INI.rsplit("\\", 1)[0])
    from provisioner.rollout.push import rollback_host

    back = rollback_host(
        kit.station("ws01"), kit.files("ws01"), kit.transport("ws01"), PushOptions(users=("u1x1",))
    )
    assert back.status == Status.FAILED, back.message
    [change] = back.files
    assert change.user == "u1x1" and change.message.startswith("unsafe-path: ")


def test_unreachable_host_is_retryable(kit: Kit) -> None:
    kit.lab.hosts["ws01"].set_faults(Faults(refuse=True))
    result = kit.push("ws01")
    assert result.status == Status.FAILED and result.retryable
    assert "cannot connect" in result.message


def test_wrong_credentials_are_fatal(kit: Kit) -> None:
    kit.lab.hosts["ws01"].set_faults(Faults(http_401=True))
    result = kit.push("ws01")
    assert result.status == Status.FAILED and not result.retryable
    assert "credentials were rejected" in result.message


def test_timeout_is_retryable(kit: Kit) -> None:
    kit.lab.hosts["ws01"].set_faults(Faults(hang=Trigger(operation="Receive")))
    result = kit.push("ws01", transport=kit.transport("ws01", timeout=5))
    assert result.status == Status.FAILED and result.retryable
    assert "no answer" in result.message


def test_soap_fault_is_fatal(kit: Kit) -> None:
    from provisioner.lab import SoapFault

    kit.lab.hosts["ws01"].set_faults(Faults(soap_fault=SoapFault(Trigger(operation="Command"))))
    result = kit.push("ws01")
    assert result.status == Status.FAILED and not result.retryable
    assert "WS-Management fault" in result.message


def test_reset_mid_apply_leaves_old_or_new_and_converges(kit: Kit) -> None:
    kit.push("ws01")
    ws = machine(kit)
    old = ws.read(INI)
    path = kit.root / "inventory.yaml"
    path.write_text(path.read_text().replace("    EC: 1\n", "    EC: 0\n"))
    kit.rebuild()
    kit.lab.hosts["ws01"].set_faults(
        Faults(reset_mid_command=ResetMidCommand(command=2, operation="Receive"))
    )
    result = kit.push("ws01")
    assert result.status == Status.FAILED and result.retryable
    current = ws.read(INI)
    kit.lab.hosts["ws01"].clear_faults()
    again = kit.push("ws01")
    assert again.ok, again.message
    final = ws.read(INI)
    assert current in (old, final)  # never a mix
    assert ini.parse_ini(text(final)).get("Settings", "EC") == "0"


@pytest.mark.parametrize("fault", ["disk_full", "locked", "read_only"])
def test_file_system_faults_fail_cleanly(kit: Kit, fault: str) -> None:
    kit.push("ws01")
    ws = machine(kit)
    old = ws.read(INI)
    path = kit.root / "inventory.yaml"
    path.write_text(path.read_text().replace("    EC: 1\n", "    EC: 0\n"))
    kit.rebuild()
    if fault == "disk_full":
        ws.faults.disk_full = True
    else:
        getattr(ws.faults, fault).add(INI)
    result = kit.push("ws01")
    assert result.status == Status.FAILED
    code = {"disk_full": "disk-full", "locked": "locked", "read_only": "read-only"}[fault]
    assert code in result.message
    assert ws.read(INI) == old
    folder = ws.listdir("C:\\Users\\u1x1\\AppData\\Roaming\\MicroSIP")
    assert not [name for name in folder if name.endswith(".tmp")]


def test_user_without_profile_and_missing_install(tmp_path: Path) -> None:
    with lab_kit(tmp_path, users_per_ws=2) as kit:
        ws = machine(kit)
        user = ws.lookup_account("ACME\\u1x2")
        assert user is not None
        ws.users[ws.users.index(user)] = dataclasses.replace(user, profile=None)
        result = kit.push("ws01")
        assert result.status == Status.FAILED
        statuses = {c.label: c.status for c in result.files}
        assert statuses["u1x1/microsip.ini"] == Status.CHANGED
        assert "no-profile" in result.message
        ws.uninstall_microsip()
        gone = kit.push("ws01")
        assert gone.status == Status.FAILED and "not installed" in gone.message


def test_tls_failure_is_fatal_and_names_the_certificate(tmp_path: Path) -> None:
    from provisioner.rollout import connections
    from provisioner.transport.winrm import WinrmTransport

    with lab_kit(tmp_path, transport="basic") as kit:
        options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
        # The system store does not know the lab's CA: validation must fail, not be skipped.
        untrusted = dataclasses.replace(options, ca_trust_path=None)
        result = kit.push("ws01", transport=WinrmTransport("ws01", untrusted))
        assert result.status == Status.FAILED and not result.retryable
        assert "TLS failed" in result.message and "ca_trust_path" in result.message
        assert machine(kit).read(INI) is None


def test_basic_over_plain_http_is_refused_before_connecting(tmp_path: Path) -> None:
    from provisioner.errors import TransportError
    from provisioner.rollout import connections
    from provisioner.transport.winrm import WinrmTransport

    with lab_kit(tmp_path, transport="basic") as kit:
        options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
        with pytest.raises(TransportError, match="does not protect it"):
            WinrmTransport("ws01", dataclasses.replace(options, scheme="http"))
        # A scope that asks for nothing still does not let a push send it in clear text.
        weak = Scope.build(["ws*"], "none")
        with pytest.raises(TransportError, match="basic authentication sends the password"):
            WinrmTransport("ws01", dataclasses.replace(options, scheme="http", scope=weak))
        assert kit.lab.hosts["ws01"].request_count == 0
