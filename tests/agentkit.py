"""Agent requests against emulated workstations, as the controller sends them: shared by the
lab agent tests (docs/agent-protocol.md) and the hostile-workstation tests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from winrm.protocol import Protocol

from provisioner.lab import HostConfig, Lab, LabHost
from provisioner.lab.agent import LabAgent
from provisioner.lab.ntlmusers import ENV_VAR
from provisioner.lab.workstation import DOMAIN_SID, User, Workstation
from provisioner.transport.agent import scripts
from provisioner.transport.agent.operations import REGISTRY
from provisioner.transport.winrm import stdin_pieces

ADMIN = "lab-admin"
PASSWORD = "Corr3ct-h0rse"
CREDS = {ADMIN: PASSWORD}
PROGRAM_DIR = "C:\\Program Files\\MicroSIP"
ALICE_INI = "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP\\microsip.ini"
ALICE_SID = f"{DOMAIN_SID}-1104"
"""alice is the station's first domain account."""
APPLY_KEYS = {"path", "status", "old_sha256", "new_sha256", "backup", "stopped", "error"}
CONTRACT = Path(__file__).parent.parent / "docs" / "agent-protocol.md"


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("test exceeded its time budget")


@pytest.fixture
def time_budget() -> Iterator[None]:
    """The test must finish within 30 s, whatever happens (``usefixtures("time_budget")``)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def lab() -> Iterator[Lab]:
    before = os.environ.get(ENV_VAR)
    lab = Lab(LabAgent(), io_timeout=5.0)
    try:
        yield lab
    finally:
        lab.stop(timeout=5.0)
    assert [t.name for t in threading.enumerate() if t.name.startswith("lab-")] == []
    assert os.environ.get(ENV_VAR) == before


class Agent:
    """One WinRM shell on one lab host, as the controller uses it."""

    def __init__(self, lab: Lab, host: LabHost) -> None:
        self.host = host
        self.protocol = Protocol(
            host.url,
            transport="basic",
            username=ADMIN,
            password=PASSWORD,
            read_timeout_sec=5,
            operation_timeout_sec=3,
            server_cert_validation="validate",
            ca_trust_path=str(lab.ca_path),
            proxy=None,
        )
        self._shell: str | None = None

    def raw(
        self, stdin: bytes, command: tuple[str, list[str]] | None = None
    ) -> tuple[bytes, bytes, int]:
        """Run a command with ``stdin`` in the shared shell."""
        if self._shell is None:
            self._shell = self.protocol.open_shell(codepage=65001)
        line, arguments = command or scripts.bootstrap_command()
        command_id = self.protocol.run_command(self._shell, line, arguments)
        for piece, last in stdin_pieces(stdin):
            self.protocol.send_command_input(self._shell, command_id, piece, end=last)
        result: tuple[bytes, bytes, int] = self.protocol.get_command_output(self._shell, command_id)
        self.protocol.cleanup_command(self._shell, command_id)
        return result

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request; the agent must exit 0 with a protocol-1 answer."""
        out, err, code = self.raw(scripts.make_envelope(request["op"], request))
        assert (code, err) == (0, b"")
        answer: dict[str, Any] = scripts.parse_answer(out)
        assert answer["protocol"] == 1 and answer["op"] == request["op"]
        if answer["ok"]:
            # What the lab answers is what the controller's answer types accept.
            REGISTRY.named(request["op"]).reply_from(answer, self.host.name)
        return answer

    def close(self) -> None:
        if self._shell is not None:
            self.protocol.close_shell(self._shell)
            self._shell = None


@dataclass
class Station:
    host: LabHost
    ws: Workstation
    agent: Agent
    alice: User
    bob: User


@pytest.fixture
def station(lab: Lab, tmp_path: Path) -> Iterator[Station]:
    """An installed-mode workstation with two logged-on domain users."""
    with open_station(lab, tmp_path / "ws") as opened:
        yield opened


@contextmanager
def open_station(lab: Lab, folder: Path) -> Iterator[Station]:
    """The ``station`` fixture's workstation on a new host of ``lab``, its disk in ``folder``."""
    host = lab.add_host(HostConfig(credentials=CREDS, scheme="https", port=0))
    ws = Workstation(folder, computer="BER-WS-001")
    ws.install_microsip("installed")
    alice = ws.add_user("ACME\\alice")
    bob = ws.add_user("ACME\\bob")
    host.state = ws
    agent = Agent(lab, host)
    try:
        yield Station(host, ws, agent, alice, bob)
    finally:
        agent.close()
    assert host.handler_errors == []
    assert host.open_shells == 0


# --- request builders -------------------------------------------------------------------------


def ini(text: str) -> bytes:
    """A MicroSIP ini as written: UTF-16LE with BOM, CRLF."""
    return b"\xff\xfe" + f"[Settings]\r\naccountId=1\r\n; {text}\r\n".encode("utf-16-le")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def inspect_request(
    users: list[tuple[str, str]],
    *,
    mode: str = "installed",
    install_dir: str = PROGRAM_DIR,
    exe: str = "microsip.exe",
    override: bool = True,
) -> dict[str, Any]:
    return {
        "op": "inspect",
        "protocol": 1,
        "install": {"mode": mode, "install_dir": install_dir, "exe": exe},
        "users": [{"name": name, "windows": windows} for name, windows in users],
        "override": override,
    }


def file_entry(
    path: str,
    content: bytes,
    *,
    expect: str | None,
    user: User | None = None,
    applied: bytes | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """An apply entry: a user's microsip.ini when ``user`` is given, else override.ini."""
    return {
        "kind": "microsip" if user else "override",
        "user": user.sam if user else None,
        "sid": user.sid if user else None,
        "path": path,
        "expect_sha256": expect,
        "content_b64": b64(content),
        "sha256": sha256 or sha(content),
        "applied_b64": b64(b"applied " + content if applied is None else applied),
        "process": "microsip.exe" if user else None,
    }


def target(path: str, user: User | None = None) -> dict[str, Any]:
    """A rollback entry."""
    return {
        "kind": "microsip" if user else "override",
        "user": user.sam if user else None,
        "sid": user.sid if user else None,
        "path": path,
        "process": "microsip.exe" if user else None,
    }


def apply_request(files: list[dict[str, Any]], if_running: str = "skip") -> dict[str, Any]:
    return {"op": "apply", "protocol": 1, "if_running": if_running, "files": files}


def rollback_request(files: list[dict[str, Any]], if_running: str = "skip") -> dict[str, Any]:
    return {"op": "rollback", "protocol": 1, "if_running": if_running, "files": files}


def write(st: Station, user: User, content: bytes, if_running: str = "skip") -> dict[str, Any]:
    """Apply ``content`` to the user's ini with the right compare-and-swap hash."""
    path = st.ws.ini_path(user)
    entry = file_entry(path, content, expect=st.ws.sha256(path), user=user)
    [result] = st.agent.call(apply_request([entry], if_running))["files"]
    assert set(result) == APPLY_KEYS
    return dict(result)


def state_path(item: str, owner: User | str | None = ALICE_SID, name: str = "microsip.ini") -> str:
    """A file of the agent's state: alice's microsip.ini unless told (None: override.ini)."""
    return Workstation.state_path(owner, "override.ini" if owner is None else name, item)


def state(ws: Workstation, item: str, owner: User | str | None = ALICE_SID) -> bytes | None:
    return ws.read(state_path(item, owner))


def temp_files(ws: Workstation, folder: str) -> list[str]:
    return [name for name in ws.listdir(folder) if name.endswith(".tmp")]


def error_code(result: dict[str, Any]) -> str | None:
    error = result["error"]
    return None if error is None else str(error["code"])


# --- the contract's examples ------------------------------------------------------------------


def contract_json_blocks() -> dict[str, list[Any]]:
    """The JSON examples of docs/agent-protocol.md, keyed by '<op> request' / '<op> answer'."""
    blocks: dict[str, list[Any]] = {}
    section = ""
    label = ""
    lines = iter(CONTRACT.read_text(encoding="utf-8").splitlines())
    for line in lines:
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.strip() in ("Request:", "Answer:"):
            label = line.strip().rstrip(":").lower()
        elif line.strip() == "```json":
            body = []
            for inner in lines:
                if inner.strip() == "```":
                    break
                body.append(inner)
            blocks.setdefault(f"{section} {label}", []).append(json.loads("\n".join(body)))
    return blocks


def json_keys(value: object) -> set[str]:
    """Every key of every object in a JSON value."""
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in json_keys(item)}
    if isinstance(value, list):
        return {key for item in value for key in json_keys(item)}
    return set()
