"""SOAP envelopes of the WinRS operations: parsing requests, building answers and faults.

Answers mirror what Windows sends (and what pywinrm's recorded fixtures show): ``a:RelatesTo``
is always the request's ``a:MessageID``; Create returns both
``x:ResourceCreated/a:ReferenceParameters/w:SelectorSet/w:Selector Name="ShellId"`` and
``rsp:Shell/rsp:ShellId``. Fault codes marked "unverified" were not checked against Windows.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

NS_S = "http://www.w3.org/2003/05/soap-envelope"
NS_A = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
NS_W = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
NS_X = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
NS_P = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd"
NS_RSP = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
NS_F = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault"

SHELL_URI = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd"
ANONYMOUS = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous"
STATE_DONE = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done"
STATE_RUNNING = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Running"

ACTIONS = {
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create": "Create",
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete": "Delete",
    f"{NS_RSP}/Command": "Command",
    f"{NS_RSP}/Send": "Send",
    f"{NS_RSP}/Receive": "Receive",
    f"{NS_RSP}/Signal": "Signal",
}
_RESPONSE_ACTIONS = {
    "Create": "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse",
    "Delete": "http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse",
    "Command": f"{NS_RSP}/CommandResponse",
    "Send": f"{NS_RSP}/SendResponse",
    "Receive": f"{NS_RSP}/ReceiveResponse",
    "Signal": f"{NS_RSP}/SignalResponse",
}

CODE_TIMED_OUT = 2150858793
CODE_SHELL_NOT_FOUND = 2150858843
CODE_BAD_RESOURCE_URI = 2150858770  # unverified
CODE_INVALID_PARAMETER = 87  # unverified: ERROR_INVALID_PARAMETER as the WSManFault code
CODE_REMOTESHELLS_NOT_ALLOWED = 2150859180
"""ERROR_WSMAN_REMOTESHELLS_NOT_ALLOWED (0x803381AC, wsmerror.h): AllowRemoteShellAccess is 0."""
CODE_INTERNAL = 2147943418  # seen on Windows with w:InternalError

_DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


class WsmanFault(Exception):
    """A SOAP fault to answer with HTTP 500."""

    def __init__(
        self, code: int, subcode: str, reason: str, *, receiver: bool = True, machine: str = ""
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.subcode = subcode
        self.reason = reason
        self.receiver = receiver
        self.machine = machine


def remote_shells_not_allowed() -> WsmanFault:
    """Create of a shell where a policy disabled remote shells (subcode unverified)."""
    return WsmanFault(
        CODE_REMOTESHELLS_NOT_ALLOWED,
        "w:AccessDenied",
        "The WS-Management service cannot process the request. The service is configured to "
        "not accept any remote shell requests.",
    )


def timed_out() -> WsmanFault:
    """The Receive fault pywinrm turns into ``WinRMOperationTimeoutError`` and retries."""
    return WsmanFault(
        CODE_TIMED_OUT,
        "w:TimedOut",
        "The WS-Management service cannot complete the operation within the time specified "
        "in OperationTimeout.",
    )


def shell_not_found(shell_id: str) -> WsmanFault:
    """The fault Windows answers for an unknown or foreign ShellId."""
    return WsmanFault(
        CODE_SHELL_NOT_FOUND,
        "w:InvalidSelectors",
        f"The request for the Windows Remote Shell with ShellId {shell_id} failed because the "
        "shell was not found on the server. Possible causes are: the specified ShellId is "
        "incorrect or the shell no longer exists on the server. Provide the correct ShellId or "
        "create a new shell and retry the operation.",
        receiver=False,
    )


def invalid_parameter(reason: str = "The parameter is incorrect.") -> WsmanFault:
    """A malformed or inconsistent request."""
    return WsmanFault(CODE_INVALID_PARAMETER, "w:InvalidParameter", reason, receiver=False)


@dataclass(frozen=True)
class SoapRequest:
    """The parts of a WinRS request the lab uses."""

    operation: str
    message_id: str
    resource_uri: str
    shell_id: str
    operation_timeout: float | None
    max_envelope: int
    options: dict[str, str]
    body: ET.Element


def _text(node: ET.Element | None) -> str:
    return (node.text or "").strip() if node is not None else ""


def parse_duration(value: str) -> float | None:
    """Seconds of an ``xs:duration`` like ``PT20S`` or ``PT1M30.5S``; None if unparsable."""
    match = _DURATION.match(value.strip())
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


def parse_request(data: bytes) -> SoapRequest:
    """Parse a SOAP envelope; raises :class:`WsmanFault` when it is not a WinRS request."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise invalid_parameter("DTDs are not accepted.")
    try:
        # Safe: DTDs and entities were refused above, so no expansion can happen.
        root = ET.fromstring(data)  # noqa: S314
    except ET.ParseError as err:
        raise invalid_parameter(f"The request is not well-formed XML: {err}.") from err
    header = root.find(f"{{{NS_S}}}Header")
    body = root.find(f"{{{NS_S}}}Body")
    if root.tag != f"{{{NS_S}}}Envelope" or header is None or body is None:
        raise invalid_parameter("The request is not a SOAP 1.2 envelope.")
    action = _text(header.find(f"{{{NS_A}}}Action"))
    operation = ACTIONS.get(action)
    if operation is None:
        raise WsmanFault(
            CODE_INVALID_PARAMETER,
            "a:ActionNotSupported",
            f"The action {action!r} is not supported by the lab.",
            receiver=False,
        )
    shell_id = ""
    for selector in header.iter(f"{{{NS_W}}}Selector"):
        if selector.get("Name") == "ShellId":
            shell_id = _text(selector)
    options = {
        str(option.get("Name")): _text(option)
        for option in header.iter(f"{{{NS_W}}}Option")
        if option.get("Name")
    }
    timeout = parse_duration(_text(header.find(f"{{{NS_W}}}OperationTimeout")))
    try:
        max_envelope = int(_text(header.find(f"{{{NS_W}}}MaxEnvelopeSize")) or "153600")
    except ValueError:
        max_envelope = 153600
    return SoapRequest(
        operation=operation,
        message_id=_text(header.find(f"{{{NS_A}}}MessageID")),
        resource_uri=_text(header.find(f"{{{NS_W}}}ResourceURI")),
        shell_id=shell_id,
        operation_timeout=timeout,
        max_envelope=max_envelope,
        options=options,
        body=body,
    )


@dataclass(frozen=True)
class ShellSpec:
    """What a Create asks for."""

    working_directory: str | None
    environment: dict[str, str]
    input_streams: str
    output_streams: str


def parse_shell(body: ET.Element) -> ShellSpec:
    """The ``rsp:Shell`` of a Create body."""
    shell = body.find(f"{{{NS_RSP}}}Shell")
    if shell is None:
        raise invalid_parameter("Create needs an rsp:Shell element.")
    env = {
        str(var.get("Name")): var.text or ""
        for var in shell.iter(f"{{{NS_RSP}}}Variable")
        if var.get("Name")
    }
    workdir = _text(shell.find(f"{{{NS_RSP}}}WorkingDirectory")) or None
    return ShellSpec(
        working_directory=workdir,
        environment=env,
        input_streams=_text(shell.find(f"{{{NS_RSP}}}InputStreams")) or "stdin",
        output_streams=_text(shell.find(f"{{{NS_RSP}}}OutputStreams")) or "stdout stderr",
    )


def parse_command_line(body: ET.Element) -> str:
    """``rsp:Command`` and, space-separated, each ``rsp:Arguments``, exactly as sent."""
    line = body.find(f"{{{NS_RSP}}}CommandLine")
    if line is None:
        raise invalid_parameter("Command needs an rsp:CommandLine element.")
    command = line.findtext(f"{{{NS_RSP}}}Command") or ""
    arguments = [node.text or "" for node in line.findall(f"{{{NS_RSP}}}Arguments")]
    return " ".join([command, *arguments]) if arguments else command


@dataclass(frozen=True)
class StdinChunk:
    """One ``rsp:Stream`` of a Send."""

    command_id: str
    data: bytes
    end: bool


def parse_send(body: ET.Element) -> list[StdinChunk]:
    """The stdin chunks of a Send body."""
    send = body.find(f"{{{NS_RSP}}}Send")
    if send is None:
        raise invalid_parameter("Send needs an rsp:Send element.")
    chunks = []
    for stream in send.findall(f"{{{NS_RSP}}}Stream"):
        if stream.get("Name", "stdin") != "stdin":
            raise invalid_parameter(f"Unknown input stream {stream.get('Name')!r}.")
        try:
            data = base64.b64decode((stream.text or "").strip(), validate=True)
        except binascii.Error as err:
            raise invalid_parameter("Send data is not valid base64.") from err
        end = stream.get("End", "false").strip().lower() in ("true", "1")
        chunks.append(StdinChunk(stream.get("CommandId", ""), data, end))
    return chunks


def parse_command_ref(body: ET.Element, element: str) -> str:
    """The ``CommandId`` attribute of ``rsp:Signal`` or ``rsp:Receive/rsp:DesiredStream``."""
    node = body.find(f"{{{NS_RSP}}}{element}")
    if node is not None and element == "Receive":
        node = node.find(f"{{{NS_RSP}}}DesiredStream")
    command_id = node.get("CommandId", "") if node is not None else ""
    if not command_id:
        raise invalid_parameter(f"{element} needs a CommandId.")
    return command_id


def parse_signal_code(body: ET.Element) -> str:
    """The ``rsp:Code`` of a Signal."""
    return _text(body.find(f"{{{NS_RSP}}}Signal/{{{NS_RSP}}}Code"))


def new_id() -> str:
    """A fresh upper-case uuid, as Windows writes ShellIds and CommandIds."""
    return str(uuid.uuid4()).upper()


def _envelope(action: str, relates_to: str, body: str) -> bytes:
    relates = f"<a:RelatesTo>{escape(relates_to)}</a:RelatesTo>" if relates_to else ""
    return (
        f'<s:Envelope xml:lang="en-US" xmlns:s="{NS_S}" xmlns:a="{NS_A}" xmlns:x="{NS_X}" '
        f'xmlns:w="{NS_W}" xmlns:rsp="{NS_RSP}" xmlns:p="{NS_P}">'
        f"<s:Header><a:Action>{action}</a:Action>"
        f"<a:MessageID>uuid:{new_id()}</a:MessageID><a:To>{ANONYMOUS}</a:To>{relates}"
        f"</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def relating_to(envelope: bytes, relates_to: str) -> bytes:
    """The same answer, relating to another message (a forgery the lab can inject)."""
    return re.sub(
        rb"<a:RelatesTo>[^<]*</a:RelatesTo>",
        f"<a:RelatesTo>{escape(relates_to)}</a:RelatesTo>".encode(),
        envelope,
        count=1,
    )


def create_response(
    relates_to: str, shell_id: str, address: str, owner: str, client_ip: str, spec: ShellSpec
) -> bytes:
    """CreateResponse with the Selector and the ``rsp:Shell`` description."""
    sid = escape(shell_id)
    body = (
        f"<x:ResourceCreated><a:Address>{escape(address)}</a:Address><a:ReferenceParameters>"
        f"<w:ResourceURI>{SHELL_URI}</w:ResourceURI><w:SelectorSet>"
        f'<w:Selector Name="ShellId">{sid}</w:Selector></w:SelectorSet>'
        f"</a:ReferenceParameters></x:ResourceCreated>"
        f"<rsp:Shell><rsp:ShellId>{sid}</rsp:ShellId><rsp:ResourceUri>{SHELL_URI}</rsp:ResourceUri>"
        f"<rsp:Owner>{escape(owner)}</rsp:Owner><rsp:ClientIP>{escape(client_ip)}</rsp:ClientIP>"
        f"<rsp:IdleTimeOut>PT7200.000S</rsp:IdleTimeOut>"
        f"<rsp:InputStreams>{escape(spec.input_streams)}</rsp:InputStreams>"
        f"<rsp:OutputStreams>{escape(spec.output_streams)}</rsp:OutputStreams>"
        f"<rsp:ShellRunTime>P0DT0H0M0S</rsp:ShellRunTime>"
        f"<rsp:ShellInactivity>P0DT0H0M0S</rsp:ShellInactivity></rsp:Shell>"
    )
    return _envelope(_RESPONSE_ACTIONS["Create"], relates_to, body)


def command_response(relates_to: str, command_id: str) -> bytes:
    """CommandResponse carrying the new CommandId."""
    body = (
        f"<rsp:CommandResponse><rsp:CommandId>{escape(command_id)}</rsp:CommandId>"
        "</rsp:CommandResponse>"
    )
    return _envelope(_RESPONSE_ACTIONS["Command"], relates_to, body)


def send_response(relates_to: str) -> bytes:
    """SendResponse (pywinrm only checks the status)."""
    return _envelope(_RESPONSE_ACTIONS["Send"], relates_to, "<rsp:SendResponse/>")


def receive_response(
    relates_to: str,
    command_id: str,
    streams: list[tuple[str, bytes]],
    exit_code: int | None,
) -> bytes:
    """ReceiveResponse: base64 streams, then Running, or Done with the exit code."""
    cid = quoteattr(command_id)
    parts = ["<rsp:ReceiveResponse>"]
    for name, data in streams:
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<rsp:Stream Name="{name}" CommandId={cid}>{encoded}</rsp:Stream>')
    if exit_code is None:
        parts.append(f'<rsp:CommandState CommandId={cid} State="{STATE_RUNNING}"/>')
    else:
        parts.append(f'<rsp:Stream Name="stdout" CommandId={cid} End="true"/>')
        parts.append(f'<rsp:Stream Name="stderr" CommandId={cid} End="true"/>')
        parts.append(
            f'<rsp:CommandState CommandId={cid} State="{STATE_DONE}">'
            f"<rsp:ExitCode>{exit_code}</rsp:ExitCode></rsp:CommandState>"
        )
    parts.append("</rsp:ReceiveResponse>")
    return _envelope(_RESPONSE_ACTIONS["Receive"], relates_to, "".join(parts))


def signal_response(relates_to: str) -> bytes:
    """SignalResponse; pywinrm checks RelatesTo."""
    return _envelope(_RESPONSE_ACTIONS["Signal"], relates_to, "<rsp:SignalResponse/>")


def delete_response(relates_to: str) -> bytes:
    """DeleteResponse; pywinrm checks RelatesTo."""
    return _envelope(_RESPONSE_ACTIONS["Delete"], relates_to, "")


def fault_envelope(fault: WsmanFault, relates_to: str, machine: str) -> bytes:
    """An ``s:Fault`` with a ``f:WSManFault`` detail, as Windows writes it."""
    side = "s:Receiver" if fault.receiver else "s:Sender"
    reason = escape(fault.reason)
    body = (
        f"<s:Fault><s:Code><s:Value>{side}</s:Value><s:Subcode><s:Value>{escape(fault.subcode)}"
        f'</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">{reason}</s:Text>'
        f'</s:Reason><s:Detail><f:WSManFault xmlns:f="{NS_F}" Code="{fault.code}" '
        f"Machine={quoteattr(fault.machine or machine)}><f:Message>{reason}</f:Message>"
        f"</f:WSManFault></s:Detail></s:Fault>"
    )
    return _envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to, body)
