"""A reply must be as protected as the request: the network does not get to answer.

The lab plays the man in the middle (``Faults(forged_reply=ForgedReply(...))``): it answers in
plaintext on an NTLM-encrypted connection, or relates its answer to another message. pywinrm
0.5 takes both as genuine (pinned below: if that changes, these tests say so); the transport
refuses them. And it plays an agent that answers off the contract (``answer_filter``, a broken
or foreign agent script): the transport reads every answer against the contract, so that is a
protocol error naming the host, the operation and the field, never a traceback.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from winrm.protocol import Protocol

from provisioner import errors
from provisioner.inventory.model import Secret
from provisioner.lab import Faults, ForgedReply, Lab, Trigger
from provisioner.lab.agent import LabAgent
from provisioner.lab.fleet import WorkstationSpec, add_workstation
from provisioner.lab.host import HostConfig, LabHost
from provisioner.records.results import Status
from provisioner.rollout.push import PushOptions, inspect_request
from provisioner.secrets.credscope import Scope
from provisioner.transport.agent import scripts
from provisioner.transport.winrm import WinrmOptions, WinrmTransport, _relates_to
from tests.labkit import INSPECT_NOTHING, lab_kit

INSPECT = {"op": "inspect", "protocol": 1, "users": []}
# What a forger would answer: "nothing to do here".
FORGED = base64.b64encode(json.dumps({"protocol": 1, "op": "inspect", "ok": True}).encode())
LOOPBACK = Scope.build(["127.0.0.0/8"], "encrypted")


def _host(lab: Lab, forged: ForgedReply) -> LabHost:
    config = HostConfig(credentials={"svc": "Pw-1"}, port=0, faults=Faults(forged_reply=forged))
    host, _ = add_workstation(lab, config, WorkstationSpec())
    return host


def _pywinrm_inspect(host: LabHost) -> bytes:
    """One inspect with pywinrm alone (message encryption on), returning the agent's stdout."""
    protocol = Protocol(
        host.url, transport="ntlm", username="svc", password="Pw-1", proxy=None, ca_trust_path=None
    )
    shell = protocol.open_shell(codepage=65001, noprofile=True)
    command, arguments = scripts.bootstrap_command()
    command_id = protocol.run_command(shell, command, arguments)
    protocol.send_command_input(shell, command_id, scripts.make_envelope("inspect", INSPECT), True)
    stdout, _, code = protocol.get_command_output(shell, command_id)
    protocol.cleanup_command(shell, command_id)
    protocol.close_shell(shell)
    assert protocol.transport.encryption is not None  # the session was encrypted throughout
    assert code == 0
    return stdout


def _transport(host: LabHost) -> WinrmTransport:
    options = WinrmOptions(host.address, "svc", Secret("Pw-1"), port=host.port, scope=LOOPBACK)
    return WinrmTransport(host.name, options)


@pytest.mark.parametrize(
    "forged",
    [
        ForgedReply("plaintext", stdout=FORGED),
        ForgedReply("relates_to", Trigger("Receive", times=None)),
    ],
    ids=["plaintext", "relates-to"],
)
def test_pywinrm_takes_a_forged_reply_as_genuine(tmp_path: Path, forged: ForgedReply) -> None:
    with Lab(LabAgent(), folder=tmp_path) as lab:
        stdout = _pywinrm_inspect(_host(lab, forged))
    if forged.stdout is not None:
        assert stdout == FORGED  # the man in the middle's words, taken as the agent's
    else:
        assert stdout  # an answer relating to no message sent, accepted


@pytest.mark.parametrize(
    ("forged", "said"),
    [
        (ForgedReply("plaintext", stdout=FORGED), "in plaintext although message encryption"),
        (ForgedReply("plaintext", Trigger("Command")), "in plaintext although message encryption"),
        (ForgedReply("relates_to"), "the reply answers message"),
        (ForgedReply("relates_to", Trigger("Create")), "the reply answers message"),
    ],
    ids=["plaintext-receive", "plaintext-command", "relates-to-receive", "relates-to-create"],
)
def test_the_transport_refuses_a_forged_reply(
    tmp_path: Path, forged: ForgedReply, said: str
) -> None:
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host = _host(lab, forged)
        transport = _transport(host)
        try:
            with pytest.raises(errors.TransportError) as caught:
                transport.request(INSPECT_NOTHING)
        finally:
            transport.close()
    message = str(caught.value)
    assert said in message and "man in the middle" in message
    assert caught.value.host == host.name and not caught.value.retryable


def test_a_forged_answer_fails_the_push_instead_of_passing_for_done(tmp_path: Path) -> None:
    # Every Receive after the inspect's answered in plaintext: the apply's answer ("written")
    # cannot be trusted, so the push fails with the outcome unknown.
    with lab_kit(tmp_path) as kit:
        host = kit.lab.hosts["ws01"]
        host.set_faults(Faults(forged_reply=ForgedReply("plaintext", Trigger("Receive", nth=2))))
        result = kit.push("ws01", PushOptions())
        assert result.status == Status.FAILED, result.message
        assert "refused a reply" in result.message and "outcome" in result.message
        host.clear_faults()
        assert kit.push("ws01").ok


def test_sealed_replies_are_required_from_the_first_request_on(tmp_path: Path) -> None:
    # Pins what the transport relies on in pywinrm: build_session starts the encryption and
    # keeps it in Transport.encryption, which every reply then goes through.
    with Lab(LabAgent(), folder=tmp_path) as lab:
        host = _host(lab, ForgedReply("plaintext", Trigger("Create", nth=99)))
        transport = _transport(host)
        try:
            assert transport.request(INSPECT_NOTHING).install.found
            assert transport._protocol is not None
            encryption = transport._protocol.transport.encryption
            assert type(encryption).__name__ == "_SealedReplies"
        finally:
            transport.close()
        stats = host.stats()
        assert stats.encrypted_responses == stats.encrypted_requests > 0


def test_https_replies_are_checked_too(tmp_path: Path) -> None:
    with Lab(LabAgent(), folder=tmp_path) as lab:
        config = HostConfig(
            credentials={"svc": "Pw-1"},
            port=0,
            scheme="https",
            faults=Faults(forged_reply=ForgedReply("relates_to")),
        )
        host, _ = add_workstation(lab, config, WorkstationSpec())
        options = WinrmOptions(
            host.address,
            "svc",
            Secret("Pw-1"),
            port=host.port,
            transport="basic",
            ca_trust_path=str(lab.ca_path),
            ca_trusted=True,  # as connections says of a CA file the scope pins
            scope=Scope.build(["127.0.0.0/8"], "tls"),
        )
        transport = WinrmTransport(host.name, options)
        try:
            with pytest.raises(errors.TransportError, match="the reply answers message"):
                transport.request(INSPECT_NOTHING)
        finally:
            transport.close()


@pytest.mark.parametrize(
    ("reply", "found"),
    [
        (b"<s:Envelope xmlns:s='http://www.w3.org/2003/05/soap-envelope' "
         b"xmlns:a='http://schemas.xmlsoap.org/ws/2004/08/addressing'><s:Header>"
         b"<a:RelatesTo>uuid:X</a:RelatesTo></s:Header><s:Body/></s:Envelope>", "uuid:X"),
        # A RelatesTo in the body is not the header's.
        (b"<s:Envelope xmlns:s='http://www.w3.org/2003/05/soap-envelope' "
         b"xmlns:a='http://schemas.xmlsoap.org/ws/2004/08/addressing'><s:Header/>"
         b"<s:Body><a:RelatesTo>uuid:X</a:RelatesTo></s:Body></s:Envelope>", None),
        (b"<Envelope><Header><RelatesTo>uuid:X</RelatesTo></Header></Envelope>", None),
    ],
)  # fmt: skip
def test_relates_to_is_read_from_the_soap_header_only(reply: bytes, found: str | None) -> None:
    assert _relates_to(reply, piece=7) == found


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda answer: answer.pop(key)


def _set(value: object, *path: str | int) -> Callable[[dict[str, Any]], None]:
    def edit(answer: dict[str, Any]) -> None:
        holder: Any = answer
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("op", "edit", "said"),
    [
        ("inspect", _drop("users"), "users is missing"),
        ("inspect", _set([1], "users"), "users[0] is a number, not an object"),
        ("inspect", _set("C:\\", "install"), "install is a string, not an object"),
        (
            "inspect",
            _set(5, "users", 0, "sha256"),
            "users[0].sha256 is a number, not a string or null",
        ),
        ("inspect", _set("%%%", "users", 0, "content_b64"), "users[0].content_b64 is not base64"),
        ("inspect", _set(None, "override", "applied"), "override.applied is null, not an object"),
        ("apply", _set({}, "files", 0), "files[0].path is missing"),
        ("apply", _set("1", "files", 0, "stopped"), "files[0].stopped is a string, not a whole"),
        ("apply", _set("done", "files", 0, "status"), "files[0].status is not one of busy, conf"),
    ],
)
def test_an_answer_off_the_contract_fails_the_host_with_a_protocol_error(
    tmp_path: Path, op: str, edit: Callable[[dict[str, Any]], None], said: str
) -> None:
    def answer_filter(answer: dict[str, Any]) -> dict[str, Any]:
        if answer["op"] == op:
            edit(answer)
        return answer

    with lab_kit(tmp_path) as kit:
        kit.lab.workstations["ws01"].answer_filter = answer_filter
        result = kit.push("ws01", PushOptions())
        assert (result.host, result.status) == ("ws01", Status.FAILED)
        assert result.message.startswith(
            f"the agent's {op} answer breaks the protocol (docs/agent-protocol.md): {said}"
        ), result.message
        if op == "inspect":
            # The same error, raised where the answer is decoded, carries the host.
            with pytest.raises(errors.RemoteError) as caught:
                kit.transport("ws01").request(
                    inspect_request(kit.station("ws01"), kit.files("ws01"))
                )
            assert caught.value.host == "ws01" and str(caught.value) == result.message
        kit.lab.workstations["ws01"].answer_filter = None
        assert kit.push("ws01").ok
