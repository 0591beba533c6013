"""The WinRS lab driven by the real pywinrm client over real HTTP(S) on loopback."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import requests
from winrm.exceptions import (
    InvalidCredentialsError,
    WinRMOperationTimeoutError,
    WinRMTransportError,
    WSManFaultError,
)
from winrm.protocol import Protocol

from provisioner.lab import (
    CMD_LINE_LIMIT,
    CommandResult,
    Faults,
    HostConfig,
    HostContext,
    Lab,
    LabHost,
    ResetMidCommand,
    SoapFault,
    Trigger,
)
from provisioner.lab.ntlmusers import ENV_VAR
from provisioner.lab.server import NoAddressLeft

USER = "lab-admin"
PASSWORD = "Corr3ct-h0rse"
CREDS = {USER: PASSWORD}
NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "x": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
}


@dataclass(frozen=True)
class Call:
    """What the echo handler saw."""

    command_line: str
    stdin: bytes
    user: str
    codepage: int


class EchoHandler:
    """Echoes stdin for ``read-stdin``; ``big N`` prints N bytes; ``exit N``; ``boom`` raises."""

    def reads_stdin(self, command_line: str) -> bool:
        return command_line.startswith("read-stdin")

    def run(self, host: HostContext, command_line: str, stdin: bytes) -> CommandResult:
        with host.lock:
            if host.state is None:
                host.state = []
            calls = host.state
            assert isinstance(calls, list)
            calls.append(Call(command_line, stdin, host.user, host.codepage))
        verb, _, rest = command_line.partition(" ")
        if verb == "read-stdin":
            return CommandResult(stdout=stdin)
        if verb == "big":
            size = int(rest)
            return CommandResult(stdout=pattern(size), stderr=b"done\r\n")
        if verb == "exit":
            return CommandResult(exit_code=int(rest))
        if verb == "boom":
            raise RuntimeError("handler exploded")
        return CommandResult(stdout=f"{command_line}|{host.name}".encode("cp437"))


def pattern(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(size))


def parse_xml(data: bytes) -> ET.Element:
    """Parse XML that this test's own lab or pywinrm produced."""
    return ET.fromstring(data)  # noqa: S314


def calls_of(host: LabHost) -> list[Call]:
    with host.lock:
        state = host.state
    return list(state) if isinstance(state, list) else []


pytestmark = pytest.mark.usefixtures("time_budget")  # tests/agentkit.py: 30 s each


@pytest.fixture
def lab() -> Iterator[Lab]:
    before = os.environ.get(ENV_VAR)
    lab = Lab(EchoHandler(), io_timeout=5.0)
    try:
        yield lab
    finally:
        lab.stop(timeout=5.0)
    leftovers = [t.name for t in threading.enumerate() if t.name.startswith("lab-")]
    assert leftovers == []
    assert os.environ.get(ENV_VAR) == before


def https_host(lab: Lab, **changes: Any) -> LabHost:
    return lab.add_host(HostConfig(credentials=CREDS, scheme="https", port=0, **changes))


def http_host(lab: Lab, **changes: Any) -> LabHost:
    return lab.add_host(HostConfig(credentials=CREDS, scheme="http", port=0, **changes))


def client(lab: Lab, host: LabHost, transport: str, **changes: Any) -> Protocol:
    options: dict[str, Any] = {
        "transport": transport,
        "username": USER,
        "password": PASSWORD,
        "read_timeout_sec": 5,
        "operation_timeout_sec": 3,
        "server_cert_validation": "validate",
        "ca_trust_path": str(lab.ca_path),
        "proxy": None,
    }
    options.update(changes)
    return Protocol(host.url, **options)


def run(
    protocol: Protocol,
    command: str,
    args: tuple[str, ...] = (),
    stdin: bytes | None = None,
    chunk: int = 96 * 1024,
    codepage: int = 437,
) -> tuple[bytes, bytes, int]:
    shell = protocol.open_shell(codepage=codepage)
    command_id = protocol.run_command(shell, command, args)
    if stdin is not None:
        pieces = [stdin[i : i + chunk] for i in range(0, len(stdin), chunk)] or [b""]
        for index, piece in enumerate(pieces):
            protocol.send_command_input(shell, command_id, piece, end=index == len(pieces) - 1)
    result = protocol.get_command_output(shell, command_id)
    protocol.cleanup_command(shell, command_id)
    protocol.close_shell(shell)
    return result


def record_messages(protocol: Protocol) -> list[tuple[bytes, bytes]]:
    """Wrap pywinrm's send_message to keep (request, response) SOAP pairs."""
    seen: list[tuple[bytes, bytes]] = []
    original: Callable[[str], bytes] = protocol.send_message

    def spy(message: str) -> bytes:
        answer = original(message)
        seen.append((message.encode() if isinstance(message, str) else message, answer))
        return answer

    protocol.send_message = spy  # type: ignore[method-assign]
    return seen


def record_wire(protocol: Protocol) -> list[requests.Response]:
    """Keep every HTTP response (and so its request) the requests session sees."""
    seen: list[requests.Response] = []
    session = protocol.transport.build_session()
    session.hooks["response"].append(lambda response, **kw: seen.append(response))
    return seen


# --- authentication and TLS ----------------------------------------------------------------


def test_basic_over_https_validates_against_the_lab_ca(lab: Lab) -> None:
    host = https_host(lab)
    out, err, code = run(client(lab, host, "basic"), "hello", ("world",))
    assert (out, err, code) == (f"hello world|{host.name}".encode(), b"", 0)
    assert host.url.startswith("https://127.0.0.")
    assert lab.ca_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_basic_over_https_fails_with_the_system_store(lab: Lab) -> None:
    host = https_host(lab)
    with pytest.raises(requests.exceptions.SSLError):
        client(lab, host, "basic", ca_trust_path=None).open_shell()
    assert host.request_count == 0


def test_basic_request_count_for_one_command_with_stdin_is_six(lab: Lab) -> None:
    host = https_host(lab)
    out, _, code = run(client(lab, host, "basic"), "read-stdin", stdin=b"abc")
    assert (out, code) == (b"abc", 0)
    stats = host.stats()
    assert stats.by_operation == {
        "Create": 1,
        "Command": 1,
        "Send": 1,
        "Receive": 1,
        "Signal": 1,
        "Delete": 1,
    }
    assert host.request_count == 6
    assert stats.encrypted_requests == stats.encrypted_responses == 0
    host.reset_counts()
    assert host.request_count == 0
    assert host.stats().by_operation == {}


def test_ntlm_over_http_encrypts_every_message_both_ways(lab: Lab) -> None:
    host = http_host(lab)
    protocol = client(lab, host, "ntlm")
    wire = record_wire(protocol)
    out, _, code = run(protocol, "read-stdin", stdin=b"sealed payload")
    assert (out, code) == (b"sealed payload", 0)
    stats = host.stats()
    assert stats.by_operation["auth"] == 3
    assert host.request_count == 9
    assert stats.encrypted_requests == stats.encrypted_responses == 6
    soap = [r for r in wire if r.status_code == 200 and r.content]
    assert len(soap) == 6
    for response in soap:
        assert response.headers["Content-Type"].startswith("multipart/encrypted;")
        assert b"Envelope" not in response.content
        sent = response.request.body
        assert isinstance(sent, bytes)
        assert b"Envelope" not in sent and b"sealed payload" not in sent


def test_ntlm_context_is_kept_per_connection(lab: Lab) -> None:
    host = http_host(lab)
    protocol = client(lab, host, "ntlm")
    shell = protocol.open_shell()
    for index in range(3):
        command_id = protocol.run_command(shell, "exit", [str(index)])
        assert protocol.get_command_output(shell, command_id)[2] == index
        protocol.cleanup_command(shell, command_id)
    protocol.close_shell(shell)
    stats = host.stats()
    assert stats.by_operation["auth"] == 3
    assert stats.connections == 1


def test_ntlm_over_https_without_encryption(lab: Lab) -> None:
    host = https_host(lab)
    out, _, code = run(client(lab, host, "ntlm"), "read-stdin", stdin=b"tls")
    assert (out, code) == (b"tls", 0)
    stats = host.stats()
    assert stats.by_operation["auth"] == 2
    assert stats.encrypted_requests == 0
    assert host.request_count == 8


@pytest.mark.parametrize("transport", ["basic", "ntlm"])
def test_wrong_password_is_401(lab: Lab, transport: str) -> None:
    host = https_host(lab) if transport == "basic" else http_host(lab)
    with pytest.raises(InvalidCredentialsError):
        client(lab, host, transport, password="wrong").open_shell()
    with pytest.raises(InvalidCredentialsError):
        client(lab, host, transport, username="nobody").open_shell()
    assert host.stats().by_operation.get("Create", 0) == 0


def test_ntlm_account_of_another_host_is_rejected(lab: Lab) -> None:
    mine = http_host(lab)
    lab.add_host(HostConfig(credentials={"other": "Other-pw1"}, port=0))
    with pytest.raises(InvalidCredentialsError):
        client(lab, mine, "ntlm", username="other", password="Other-pw1").open_shell()


def test_basic_over_plain_http_is_refused_unless_allowed(lab: Lab) -> None:
    strict = http_host(lab)
    with pytest.raises(InvalidCredentialsError):
        client(lab, strict, "basic").open_shell()
    lax = http_host(lab, allow_unencrypted=True)
    assert run(client(lab, lax, "basic"), "exit", ("4",))[2] == 4


# --- commands, stdin, output ----------------------------------------------------------------


def test_stdin_in_several_sends_reaches_the_handler_byte_exact(lab: Lab) -> None:
    host = http_host(lab)
    payload = os.urandom(300 * 1024)
    out, err, code = run(client(lab, host, "ntlm"), "read-stdin", stdin=payload, chunk=96 * 1024)
    assert code == 0 and err == b""
    assert out == payload
    [call] = calls_of(host)
    assert call.stdin == payload
    assert host.stats().by_operation["Send"] == 4
    assert host.stats().by_operation["Receive"] == 5  # 300 KiB in 64 KiB pieces


def test_output_larger_than_one_receive_chunk(lab: Lab) -> None:
    host = https_host(lab, receive_chunk=1000)
    out, err, code = run(client(lab, host, "basic"), "big", ("4500",))
    assert out == pattern(4500)
    assert err == b"done\r\n"
    assert code == 0
    assert host.stats().by_operation["Receive"] == 5


def test_receive_before_send_runs_commands_that_do_not_read_stdin(lab: Lab) -> None:
    host = https_host(lab)
    protocol = client(lab, host, "basic", read_timeout_sec=3, operation_timeout_sec=1)
    shell = protocol.open_shell()
    quick = protocol.run_command(shell, "exit", ["7"])
    assert protocol.get_command_output(shell, quick)[2] == 7
    waiting = protocol.run_command(shell, "read-stdin")
    started = time.monotonic()
    with pytest.raises(WinRMOperationTimeoutError):
        protocol.get_command_output_raw(shell, waiting)
    assert time.monotonic() - started >= 0.9
    protocol.send_command_input(shell, waiting, b"late", end=True)
    assert protocol.get_command_output(shell, waiting)[0] == b"late"
    protocol.close_shell(shell)


def test_codepage_and_user_reach_the_handler(lab: Lab) -> None:
    host = https_host(lab)
    run(client(lab, host, "basic"), "chcp", codepage=65001)
    [call] = calls_of(host)
    assert (call.user, call.codepage, call.command_line) == (USER, 65001, "chcp")


def test_cmd_exe_line_limit(lab: Lab) -> None:
    host = https_host(lab)
    protocol = client(lab, host, "basic")
    at_limit = "x" * (CMD_LINE_LIMIT - len("ok "))
    assert run(protocol, "ok", (at_limit,))[2] == 0
    out, err, code = run(protocol, "ok", (at_limit + "y",), stdin=b"discarded")
    assert (out, err, code) == (b"", b"The command line is too long.\r\n", 1)
    assert [len(call.command_line) for call in calls_of(host)] == [CMD_LINE_LIMIT]


def test_handler_exception_becomes_a_fault(lab: Lab) -> None:
    host = https_host(lab)
    with pytest.raises(WSManFaultError) as caught:
        run(client(lab, host, "basic"), "boom")
    assert "handler exploded" in caught.value.reason
    assert [str(err) for err in host.handler_errors] == ["handler exploded"]


def test_answers_carry_both_shell_ids_and_relates_to(lab: Lab) -> None:
    host = https_host(lab)
    protocol = client(lab, host, "basic")
    seen = record_messages(protocol)
    run(protocol, "exit", ("0",))
    create = parse_xml(seen[0][1])
    selector = create.find(".//x:ResourceCreated//w:Selector[@Name='ShellId']", NS)
    shell_id = create.find(".//rsp:Shell/rsp:ShellId", NS)
    assert selector is not None and shell_id is not None
    assert selector.text == shell_id.text and len(selector.text or "") == 36
    for sent, answer in seen:
        asked = parse_xml(sent).findtext(".//a:MessageID", namespaces=NS)
        assert parse_xml(answer).findtext(".//a:RelatesTo", namespaces=NS) == asked


def test_unknown_shell_is_a_wsman_fault(lab: Lab) -> None:
    host = https_host(lab)
    protocol = client(lab, host, "basic")
    with pytest.raises(WSManFaultError) as caught:
        protocol.run_command("00000000-0000-0000-0000-000000000000", "exit", ["0"])
    assert caught.value.wsman_fault_code == 2150858843
    assert caught.value.code == 500


# --- faults ---------------------------------------------------------------------------------


def test_refuse_closes_the_port_and_comes_back(lab: Lab) -> None:
    host = https_host(lab)
    protocol = client(lab, host, "basic")
    shell = protocol.open_shell()
    host.set_faults(Faults(refuse=True))
    with pytest.raises(requests.exceptions.ConnectionError):
        protocol.run_command(shell, "exit", ["0"])
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host.address, host.port)):
        pass
    host.clear_faults()
    assert run(client(lab, host, "basic"), "exit", ("2",))[2] == 2


@pytest.mark.parametrize("transport", ["basic", "ntlm"])
def test_http_401_fault(lab: Lab, transport: str) -> None:
    host = https_host(lab, faults=Faults(http_401=True))
    with pytest.raises(InvalidCredentialsError):
        client(lab, host, transport).open_shell()
    assert host.stats().by_operation == {"rejected": 1}


def test_soap_fault_on_a_named_operation_is_encrypted_under_ntlm(lab: Lab) -> None:
    host = http_host(lab)
    fault = SoapFault(Trigger("Command"), wsman_code=5, subcode="w:AccessDenied", reason="nope")
    host.set_faults(Faults(soap_fault=fault))
    protocol = client(lab, host, "ntlm")
    shell = protocol.open_shell()
    with pytest.raises(WSManFaultError) as caught:
        protocol.run_command(shell, "exit", ["0"])
    assert (caught.value.code, caught.value.wsman_fault_code) == (500, 5)
    assert caught.value.fault_subcode == "w:AccessDenied"
    assert caught.value.reason == "nope"
    stats = host.stats()
    assert stats.encrypted_requests == stats.encrypted_responses == 2
    command_id = protocol.run_command(shell, "exit", ["3"])  # fired once; context intact
    assert protocol.get_command_output(shell, command_id)[2] == 3


def test_soap_fault_on_the_nth_request(lab: Lab) -> None:
    host = https_host(lab, faults=Faults(soap_fault=SoapFault(Trigger(nth=3))))
    protocol = client(lab, host, "basic")
    shell = protocol.open_shell()
    command_id = protocol.run_command(shell, "exit", ["0"])
    with pytest.raises(WSManFaultError) as caught:
        protocol.get_command_output(shell, command_id)
    assert caught.value.code == 500
    assert caught.value.fault_subcode == "w:InternalError"
    assert host.stats().by_operation == {"Create": 1, "Command": 1, "Receive": 1}


def test_non_soap_error_is_a_transport_error(lab: Lab) -> None:
    host = https_host(lab)
    protocol = client(lab, host, "basic")
    protocol.transport.endpoint = host.url.replace("/wsman", "/elsewhere")
    with pytest.raises(WinRMTransportError) as caught:
        protocol.open_shell()
    assert not isinstance(caught.value, WSManFaultError)
    assert caught.value.code == 404


def test_operation_timeout_fault_is_retried_transparently(lab: Lab) -> None:
    host = https_host(lab, faults=Faults(operation_timeout=2))
    assert run(client(lab, host, "basic"), "exit", ("5",))[2] == 5
    assert host.stats().by_operation["Receive"] == 3


def test_slow_command_answers_timed_out_after_the_operation_timeout(lab: Lab) -> None:
    host = http_host(lab, faults=Faults(command_delay=1.3))
    protocol = client(lab, host, "ntlm", read_timeout_sec=3, operation_timeout_sec=1)
    started = time.monotonic()
    assert run(protocol, "exit", ("6",))[2] == 6
    assert time.monotonic() - started >= 1.3
    assert host.stats().by_operation["Receive"] == 2


def test_slow_adds_latency_to_every_request(lab: Lab) -> None:
    host = https_host(lab, faults=Faults(slow=0.05))
    started = time.monotonic()
    run(client(lab, host, "basic"), "exit", ("0",))
    assert time.monotonic() - started >= 5 * 0.05


@pytest.mark.parametrize("operation", ["Command", "Send", "Receive"])
def test_reset_mid_command(lab: Lab, operation: str) -> None:
    spec = ResetMidCommand(command=2, operation=operation)  # type: ignore[arg-type]
    host = https_host(lab, faults=Faults(reset_mid_command=spec))
    assert run(client(lab, host, "basic"), "read-stdin", stdin=b"one")[0] == b"one"
    with pytest.raises(requests.exceptions.ConnectionError):
        run(client(lab, host, "basic"), "read-stdin", stdin=b"two")
    assert run(client(lab, host, "basic"), "read-stdin", stdin=b"three")[0] == b"three"


def test_hang_runs_into_the_read_timeout(lab: Lab) -> None:
    host = https_host(lab, faults=Faults(hang=Trigger("Create")))
    protocol = client(lab, host, "basic", read_timeout_sec=2, operation_timeout_sec=1)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        protocol.open_shell()
    assert 1.9 <= time.monotonic() - started < 5
    assert run(client(lab, host, "basic"), "exit", ("1",))[2] == 1


def test_faults_can_change_while_serving(lab: Lab) -> None:
    host = https_host(lab)
    protocol = client(lab, host, "basic")
    shell = protocol.open_shell()
    host.set_faults(replace(host.faults, soap_fault=SoapFault(Trigger("Command", times=None))))
    for _ in range(2):
        with pytest.raises(WSManFaultError):
            protocol.run_command(shell, "exit", ["0"])
    host.clear_faults()
    command_id = protocol.run_command(shell, "exit", ["0"])
    assert protocol.get_command_output(shell, command_id)[2] == 0


# --- fleet and lifecycle --------------------------------------------------------------------


def test_twenty_hosts_pushed_concurrently_by_eight_threads(lab: Lab) -> None:
    hosts = lab.add_hosts(20, HostConfig(credentials=CREDS, port=0))
    assert [h.address for h in hosts] == [f"127.0.0.{n}" for n in range(2, 22)]

    def push(host: LabHost) -> bytes:
        payload = host.name.encode() * 500
        return run(client(lab, host, "ntlm"), "read-stdin", stdin=payload)[0]

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(push, hosts, timeout=15))
    for host, output in zip(hosts, outputs, strict=True):
        assert output == host.name.encode() * 500
        assert [call.stdin for call in calls_of(host)] == [output]
        assert host.request_count == 9
        assert host.open_shells == 0


def test_many_keep_alive_connections_at_once_each_get_every_answer(lab: Lab) -> None:
    # Connections go back to the selector thread in batches; none may be forgotten.
    host = lab.add_host(HostConfig(credentials=CREDS, port=0))
    request = b"POST /wsman HTTP/1.1\r\nHost: lab\r\nContent-Length: 0\r\n\r\n"

    def talk(_: int) -> list[bytes]:
        lines = []
        with socket.create_connection((host.address, host.port), timeout=10) as sock:
            stream = sock.makefile("rb")
            for _ in range(25):
                sock.sendall(request)
                lines.append(stream.readline())
                while stream.readline() not in (b"\r\n", b""):
                    pass  # headers; a 401 challenge has no body
        return lines

    with ThreadPoolExecutor(32) as pool:
        answers = [line for lines in pool.map(talk, range(32), timeout=60) for line in lines]
    assert answers == [b"HTTP/1.1 401 Unauthorized\r\n"] * 800
    assert host.request_count == 800
    assert host.stats().connections == 32


def test_stop_closes_every_port_and_thread() -> None:
    lab = Lab(EchoHandler())
    hosts = [
        lab.add_host(HostConfig(credentials=CREDS, port=0)),
        lab.add_host(HostConfig(credentials=CREDS, port=0, scheme="https")),
    ]
    run(client(lab, hosts[0], "ntlm"), "exit", ("0",))
    assert os.environ.get(ENV_VAR)
    folder = lab.folder
    lab.stop(timeout=3.0)
    for host in hosts:
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection((host.address, host.port), timeout=1),
        ):
            pass
    assert not folder.exists()
    assert [t.name for t in threading.enumerate() if t.name.startswith("lab-")] == []
    with pytest.raises(RuntimeError):
        lab.add_host(HostConfig(credentials=CREDS, port=0))


def test_the_lab_chooses_addresses_from_its_base_address_on() -> None:
    with Lab(EchoHandler()) as lab:
        [host] = lab.add_hosts(1, HostConfig(credentials=CREDS, port=0))
        assert host.address == "127.0.0.2"  # the default
    # A base near the end of a /24: the addresses ending in .255 and .0 are skipped.
    with Lab(EchoHandler(), base_address="127.3.0.254") as lab:
        hosts = lab.add_hosts(3, HostConfig(credentials=CREDS, port=0))
        assert [h.address for h in hosts] == ["127.3.0.254", "127.3.1.1", "127.3.1.2"]
        for host in hosts:
            socket.create_connection((host.address, host.port), timeout=5).close()
    with Lab(EchoHandler(), base_address="127.255.255.254") as lab:
        lab.add_host(HostConfig(credentials=CREDS, port=0))
        with pytest.raises(NoAddressLeft):
            lab.add_host(HostConfig(credentials=CREDS, port=0))
    for wrong in ("10.0.0.1", "::1", "127.0.0", "127.255.255.255"):
        with pytest.raises(ValueError, match=r"not an IPv4|outside 127\.0\.0\.0/8|broadcast"):
            Lab(EchoHandler(), base_address=wrong)


def test_host_config_validation() -> None:
    assert HostConfig(credentials=CREDS).default_port == 5985
    assert HostConfig(credentials=CREDS, scheme="https").default_port == 5986
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        HostConfig(credentials=CREDS, address="10.0.0.1")
    with pytest.raises(ValueError, match="account"):
        HostConfig(credentials={})
    with pytest.raises(ValueError, match="operation"):
        Trigger("Execute")


def test_the_ntlm_user_file_holds_the_nt_hash_only(tmp_path: Path) -> None:
    # Whoever reads the temp folder of a lab that died must find no password and no LM hash
    # (which falls to a dictionary in minutes): the NT hash is what NTLMv2 needs.
    from spnego._ntlm_raw.crypto import lmowfv1, ntowfv1

    from provisioner.lab import ntlmusers

    ntlmusers.use_folder(tmp_path)
    lab = Lab(EchoHandler(), io_timeout=5.0)
    try:
        try:
            host = http_host(lab)  # the first NTLM account creates the folder
        finally:
            ntlmusers.use_folder(None)
        out, _, code = run(client(lab, host, "ntlm"), "read-stdin", stdin=b"hash only")
        assert (out, code) == (b"hash only", 0)
        users = Path(os.environ[ENV_VAR])
        assert users == ntlmusers.current_file()
        assert users.parent.parent == tmp_path  # where lab up asked for it
        assert stat.S_IMODE(users.stat().st_mode) == 0o600
        assert stat.S_IMODE(users.parent.stat().st_mode) == 0o700
        text = users.read_text(encoding="utf-8")
        [line] = text.splitlines()
        name, _, lm_field, nt_field, *_ = line.split(":")
        assert name == USER
        assert lm_field == "0" * 32
        assert nt_field == ntowfv1(PASSWORD).hex().upper()
        assert PASSWORD not in text
        assert lmowfv1(PASSWORD).hex() not in text.lower()
    finally:
        lab.stop(timeout=5.0)
    assert not users.parent.exists()


def test_without_pyspnegos_hash_function_no_password_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # pyspnego also reads DOMAIN:USER:PASSWORD lines; the lab refuses to write one.
    from provisioner.lab import ntlmusers

    monkeypatch.setattr(ntlmusers, "_crypto", None)
    ntlmusers.use_folder(tmp_path)
    lab = Lab(EchoHandler(), io_timeout=5.0)
    try:
        with pytest.raises(RuntimeError, match="will not write NTLM passwords"):
            http_host(lab)
    finally:
        ntlmusers.use_folder(None)
        lab.stop(timeout=5.0)
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or PASSWORD.encode() not in path.read_bytes()
