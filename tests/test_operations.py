"""The registry of agent operations: every piece of an operation is there, and only there.

An operation is declared once (provisioner/transport/agent/operations.py); its script, its golden
copy and its lab implementation must exist for it, and none may exist without it. The answer
types read what docs/agent-protocol.md shows, refuse an answer missing a field or with a wrong
type, and never show a file's content (which carries passwords) in a repr.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import RemoteError, TransportError
from provisioner.inventory.model import Secret
from provisioner.lab import Lab
from provisioner.lab.agent import IMPLEMENTATIONS, LabAgent
from provisioner.lab.fleet import WorkstationSpec, add_workstation
from provisioner.lab.host import HostConfig
from provisioner.secrets.credscope import Scope
from provisioner.transport.agent import scripts
from provisioner.transport.agent.messages import (
    AgentReply,
    ApplyFile,
    ApplyRequest,
    InspectReply,
    InspectRequest,
    InstallWanted,
    RollbackFile,
    RollbackRequest,
    UserWanted,
)
from provisioner.transport.agent.operations import (
    APPLY,
    INSPECT,
    REGISTRY,
    ROLLBACK,
    Operation,
    Registry,
)
from provisioner.transport.base import ReadOnlyTransport
from provisioner.transport.winrm import WinrmOptions, WinrmTransport
from tests.agentkit import CONTRACT, contract_json_blocks, json_keys

AGENT = Path(scripts.__file__).parent
GOLDEN = Path(__file__).parent / "golden" / "agent"
NOT_OPERATIONS = {scripts.BOOTSTRAP_FILE, scripts.COMMON_FILE}
"""The agent files that are no operation's script."""
GOLDEN_NOT_OPERATIONS = {scripts.BOOTSTRAP_FILE, "bootstrap_command.txt"}


@dataclasses.dataclass(frozen=True)
class _Unregistered(InspectRequest):
    """A request type the registry does not declare."""


def missing_pieces(
    registry: Registry, implementations: Mapping[Operation[Any, Any], object]
) -> list[str]:
    """What is missing for an operation, or present without one (empty: all is in place)."""
    problems = []
    for op in registry:
        if not (AGENT / op.script).is_file():
            problems.append(f"{op.name}: no script {op.script}")
        if op.name not in scripts.SCRIPTS:
            problems.append(f"{op.name}: not among the scripts sent")
        if not (GOLDEN / f"{op.name}.ps1").is_file():
            problems.append(f"{op.name}: no golden copy")
        if op not in implementations:
            problems.append(f"{op.name}: no lab implementation")
        if not op.read_only and op.dry_run is None:
            problems.append(f"{op.name}: writes, and has no dry run")
    declared = {op.script for op in registry}
    for path in sorted(AGENT.glob("*.ps1")):
        if path.name not in declared | NOT_OPERATIONS:
            problems.append(f"{path.name}: a script of no operation")
    names = {f"{op.name}.ps1" for op in registry}
    for path in sorted(GOLDEN.iterdir()):
        if path.name not in names | GOLDEN_NOT_OPERATIONS:
            problems.append(f"golden {path.name}: a copy of no operation")
    for name in scripts.SCRIPTS:
        if name not in registry.names:
            problems.append(f"{name}: a script sent for no operation")
    for op in implementations:
        if op not in registry.operations:
            problems.append(f"{op.name}: a lab implementation of no operation")
    return problems


def test_every_operation_has_its_script_golden_copy_lab_implementation_and_dry_run() -> None:
    assert missing_pieces(REGISTRY, IMPLEMENTATIONS) == []


def test_the_completeness_check_bites() -> None:
    # An operation declared without its pieces, and pieces left without their operation.
    format_disk = Operation("format-disk", "format-disk.ps1", _Unregistered, InspectReply)
    with_extra = Registry((*REGISTRY.operations, format_disk))
    assert missing_pieces(with_extra, IMPLEMENTATIONS) == [
        "format-disk: no script format-disk.ps1",
        "format-disk: not among the scripts sent",
        "format-disk: no golden copy",
        "format-disk: no lab implementation",
        "format-disk: writes, and has no dry run",
    ]
    without_rollback = Registry((INSPECT, APPLY))
    assert missing_pieces(without_rollback, IMPLEMENTATIONS) == [
        "rollback.ps1: a script of no operation",
        "golden rollback.ps1: a copy of no operation",
        "rollback: a script sent for no operation",
        "rollback: a lab implementation of no operation",
    ]


def test_each_request_type_is_answered_by_its_operations_reply_type() -> None:
    for op in REGISTRY:
        [base] = [b for b in op.request.__orig_bases__ if hasattr(b, "__args__")]
        assert base.__args__ == (op.reply,), op.name


def test_only_inspect_reads_only() -> None:
    assert [op.name for op in REGISTRY if op.read_only] == ["inspect"]
    # The flag's default is "writes": an operation declared without it is no read.
    assert not Operation("x", "x.ps1", InspectRequest, InspectReply).read_only


# --- the read-only wrapper ----------------------------------------------------------------------

WANTED = InstallWanted("installed", "C:\\Program Files\\MicroSIP", "microsip.exe")
LOOPBACK = Scope.build(["127.0.0.0/8"], "encrypted")


@pytest.fixture
def lab_transport(tmp_path: Path) -> Iterator[tuple[WinrmTransport, Any]]:
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host, _ = add_workstation(
            lab, HostConfig(credentials={"svc": "Pw-1"}, port=0), WorkstationSpec()
        )
        options = WinrmOptions(host.address, "svc", Secret("Pw-1"), port=host.port, scope=LOOPBACK)
        transport = WinrmTransport(host.name, options)
        try:
            yield transport, host
        finally:
            transport.close()


def test_a_dry_run_sends_reads_and_answers_writes_itself(
    lab_transport: tuple[WinrmTransport, Any],
) -> None:
    transport, host = lab_transport
    dry = ReadOnlyTransport(transport)
    file = ApplyFile("override", None, None, "C:\\x.ini", "a" * 64, b"a", "b" * 64, b"c", None)
    answer = dry.request(ApplyRequest("skip", (), (file,)))
    assert [(f.path, f.status, f.old_sha256, f.new_sha256) for f in answer.files] == [
        ("C:\\x.ini", "written", "a" * 64, "b" * 64)
    ]
    target = RollbackFile("override", None, None, "C:\\y.ini", None)
    back = dry.request(RollbackRequest("skip", (), (target,)))
    assert [(f.path, f.status) for f in back.files] == [("C:\\y.ini", "restored")]
    assert host.stats().requests == 0  # nothing reached the workstation
    assert dry.request(InspectRequest(WANTED)).install.found
    assert host.stats().requests > 0
    assert [type(r) for r in dry.recorded] == [ApplyRequest, RollbackRequest]


def test_a_dry_run_refuses_what_is_not_declared_read_only(
    lab_transport: tuple[WinrmTransport, Any],
) -> None:
    transport, host = lab_transport
    # inspect, declared without the flag and without a dry run: refused like a write.
    unflagged = Registry((Operation("inspect", "inspect.ps1", InspectRequest, InspectReply),))
    with pytest.raises(TransportError, match="'inspect' is not declared read-only"):
        ReadOnlyTransport(transport, registry=unflagged).request(InspectRequest(WANTED))
    # A request no operation declares.
    with pytest.raises(TransportError, match="no agent operation is declared for _Unregistered"):
        ReadOnlyTransport(transport).request(_Unregistered(WANTED))
    assert host.stats().requests == 0


def test_the_transport_sends_only_registered_requests(
    lab_transport: tuple[WinrmTransport, Any],
) -> None:
    transport, host = lab_transport
    with pytest.raises(LookupError, match="_Unregistered"):
        transport.request(_Unregistered(WANTED))
    assert host.stats().requests == 0


# --- the fields of the contract -----------------------------------------------------------------


def _rollback_request_keys() -> set[str]:
    """The rollback request as the contract's prose gives it (no JSON block)."""
    text = CONTRACT.read_text(encoding="utf-8")
    section = text[text.index("## rollback") :]
    request = section[section.index("Request:") : section.index("For each file")]
    keys = set(re.findall(r'"(\w+)":', request))
    [items] = re.findall(r"\[\{(.*?)\}\]", request)
    return keys | set(re.findall(r'"(\w+)"', items))


def test_requests_carry_exactly_the_contracts_fields() -> None:
    blocks = contract_json_blocks()
    inspect = InspectRequest(WANTED, (UserWanted("alice", "ACME\\alice"),), ("\\\\fs",), True)
    assert json_keys(INSPECT.wire(inspect)) == json_keys(blocks["inspect request"])
    file = ApplyFile("microsip", "alice", "S-1", "C:\\a.ini", None, b"x", "a" * 64, b"y", "m.exe")
    apply = ApplyRequest("skip", ("\\\\fs",), (file,))
    assert json_keys(APPLY.wire(apply)) == json_keys(blocks["apply request"])
    back = RollbackRequest("skip", (), (RollbackFile("microsip", "alice", "S-1", "C:\\a", "m"),))
    assert json_keys(ROLLBACK.wire(back)) == _rollback_request_keys()


def _filled(value: Any, key: str = "") -> Any:
    """A contract example with its "…" placeholders made valid values."""
    if isinstance(value, dict):
        return {k: _filled(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(item) for item in value]
    if value == "…":
        return "a" * 64 if key.endswith("sha256") else base64.b64encode(b"x").decode()
    return value


def _examples() -> list[tuple[Operation[Any, Any], dict[str, Any]]]:
    blocks = contract_json_blocks()
    [inspect] = blocks["inspect answer"]
    [apply] = blocks["apply answer"]
    [rollback] = blocks["rollback answer"]
    return [(INSPECT, _filled(inspect)), (APPLY, _filled(apply)), (ROLLBACK, _filled(rollback))]


def _paths(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The path of every value below the top of an answer."""
    items: list[tuple[str | int, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        yield (*path, key)
        yield from _paths(item, (*path, key))


_DROP = object()


def _edit(answer: dict[str, Any], path: tuple[str | int, ...], new: object) -> dict[str, Any]:
    edited = copy.deepcopy(answer)
    holder: Any = edited
    for key in path[:-1]:
        holder = holder[key]
    if new is _DROP:
        del holder[path[-1]]
    else:
        holder[path[-1]] = new
    return edited


def _read(op: Operation[Any, Any], answer: dict[str, Any]) -> AgentReply:
    reply: AgentReply = op.reply_from(answer, "ws01")
    return reply


def test_the_contracts_example_answers_are_read() -> None:
    for op, answer in _examples():
        reply = _read(op, answer)
        assert isinstance(reply, op.reply)
    inspect = _read(INSPECT, _examples()[0][1])
    assert isinstance(inspect, InspectReply)
    [alice] = inspect.users
    assert alice.file is not None and alice.file.content == b"x" and alice.mode_rule == "hklm"


@pytest.mark.parametrize("case", range(3), ids=["inspect", "apply", "rollback"])
def test_an_answer_missing_a_field_or_with_a_wrong_type_is_refused(case: int) -> None:
    op, answer = _examples()[case]
    checked = 0
    for path in _paths(answer):
        if path in {("protocol",), ("op",), ("ok",)}:
            continue
        value: Any = answer
        for key in path:
            value = value[key]
        # An array is no string, null, number or boolean the contract allows; text no object.
        wrong: object = [] if value is None or isinstance(value, str) else "text!"
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
        for new in (_DROP, wrong):
            if new is _DROP and isinstance(path[-1], int):
                continue  # an array may be shorter
            with pytest.raises(RemoteError) as caught:
                _read(op, _edit(answer, path, new))
            message = str(caught.value)
            assert message.startswith(f"the agent's {op.name} answer breaks the protocol"), message
            assert where in message and caught.value.host == "ws01"
            checked += 1
    assert checked > 10


def test_an_answer_for_another_op_or_a_refusal_is_an_error() -> None:
    op, answer = _examples()[1]
    with pytest.raises(RemoteError, match="op is not 'apply'"):
        _read(op, {**answer, "op": "rollback"})
    refusal = {
        "protocol": 1,
        "op": "apply",
        "ok": False,
        "error": {"code": "internal", "message": "protocol 2 not supported"},
    }
    with pytest.raises(RemoteError) as caught:
        _read(op, refusal)
    assert str(caught.value) == "agent: protocol 2 not supported"


# --- no content in a repr -----------------------------------------------------------------------

CANARY = "Canary-Sip-Pw-7"


def test_no_file_content_shows_in_a_repr() -> None:
    plain = f"[Account1]\r\npassword={CANARY}\r\n".encode()
    utf16 = b"\xff\xfe" + f"[Account1]\r\npassword={CANARY}\r\n".encode("utf-16-le")
    file = ApplyFile("microsip", "alice", "S-1", "C:\\a.ini", None, plain, "a" * 64, utf16, "m.exe")
    request = ApplyRequest("skip", (), (file,))
    op, example = _examples()[0]
    answer = copy.deepcopy(example)
    for data, user in ((plain, answer["users"][0]), (utf16, answer["override"])):
        user["content_b64"] = base64.b64encode(data).decode()
        user["applied"]["content_b64"] = base64.b64encode(data).decode()
    reply = _read(op, answer)
    texts = [repr(request), str(request), repr(file), repr(reply), str(reply)]
    leaks = [
        CANARY,
        repr(plain)[2:-1],
        repr(utf16)[2:-1][20:60],
        base64.b64encode(plain).decode(),
        base64.b64encode(utf16).decode(),
    ]
    assert CANARY in repr(plain) and leaks[2] in repr(utf16)  # the check can see a leak
    for text in texts:
        for leak in leaks:
            assert leak not in text
