"""The WinRM transport: the only pywinrm (and requests) user.

One shell per workstation through ``winrm.protocol.Protocol`` (not ``Session.run_ps``, which
opens a new connection per call and breaks past cmd.exe's line limit), UTF-8 code page, the
short bootstrap of :mod:`provisioner.transport.agent.scripts` with the request on stdin.
pywinrm and requests errors are translated here into the TransportError tree.

Before any connection, the options must fit the credential's scope (sealed with the WinRM
password, :mod:`provisioner.secrets.credscope`) and, outside ``doctor``, the push policy (no basic
auth without verified TLS, no ``server_cert_validation: ignore``, no
``message_encryption: never``). On the wire, two checks pywinrm 0.5 does not make: a reply
must be sealed when message encryption is on (pywinrm takes a plaintext reply as genuine), and
every reply's ``RelatesTo`` must be the request's ``MessageID``.

CPU per request is the controller's ceiling in a fleet rollout (docs/performance.md): each
requests session stops reading the environment once pywinrm has built it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import requests.utils
import winrm.exceptions
import yarl
from winrm.encryption import Encryption
from winrm.protocol import Protocol

from provisioner.errors import (
    AuthError,
    ConnectError,
    ProvisionerError,
    RemoteError,
    TransportError,
    TransportTimeoutError,
)
from provisioner.inventory.model import Secret
from provisioner.secrets.credscope import (
    Scope,
    address_problem,
    at_least,
    is_loopback,
    security_level,
)
from provisioner.transport.agent import scripts
from provisioner.transport.agent.messages import AgentReply, AgentRequest
from provisioner.transport.agent.operations import REGISTRY

# With proxy=None pywinrm passes proxies={"no_proxy": "*"}; requests then sets and deletes
# os.environ["no_proxy"] around every request without a lock (psf/requests#4997), which races
# between concurrent pushes (KeyError, or the variable left set). Serialize it.
_ENVIRON_LOCK = threading.Lock()
_set_environ = requests.utils.set_environ


@contextlib.contextmanager
def _locked_set_environ(env_name: str, value: str | None) -> Iterator[None]:
    if value is None:
        yield
        return
    with _ENVIRON_LOCK, _set_environ(env_name, value):
        yield


requests.utils.set_environ = _locked_set_environ

UTF8_CODEPAGE = 65001
STDIN_CHUNK = 200_000
"""Bytes of stdin per WS-Management Send. Windows refuses an envelope larger than
``MaxEnvelopeSizekb`` (500 KB by default) and pywinrm does not split; Ansible sends stdin in
pieces of this size, whose base64 with the SOAP around it stays near 270 KB."""
AUTH_TRANSPORTS = ("ntlm", "basic", "kerberos", "credssp")
T = TypeVar("T")
R = TypeVar("R", bound=AgentReply)


@dataclass(frozen=True)
class WinrmOptions:
    """How to reach one workstation; the password stays a Secret until the wire.

    ``scope`` is the one sealed with the password (None: sealed without one, never sent).
    ``lab_for``: this is a lab's loopback stand-in for the inventory address given, which the
    scope is checked against. ``diagnostic``: ``doctor``'s connection, which may use settings
    a push refuses in order to report them. ``password_path`` names the token in messages.
    ``ca_trusted``: the certificate is checked with a CA the scope trusts: the system's, or
    the CA file it pins (with ``lab_for``: the lab's CA stands in for the inventory's, which
    is). Without it, only ``ca_trust_path`` None (the system's CAs) counts as verified TLS.
    """

    address: str
    username: str
    password: Secret | None
    transport: str = "ntlm"
    scheme: str = ""
    port: int = 0
    ca_trust_path: str | None = None
    server_cert_validation: str = "validate"
    allow_basic_over_http: bool = False
    message_encryption: str = "auto"
    operation_timeout: int = 20
    read_timeout: int = 30
    scope: Scope | None = None
    lab_for: str = ""
    diagnostic: bool = False
    password_path: str = ""
    ca_trusted: bool = False

    @property
    def effective_scheme(self) -> str:
        """http for NTLM/Kerberos/CredSSP (message encryption), https for basic, unless set."""
        if self.scheme:
            return self.scheme
        return "https" if self.transport == "basic" else "http"

    @property
    def url(self) -> yarl.URL:
        """The WS-Management URL, built from its parts (ValueError for an impossible host)."""
        scheme = self.effective_scheme
        port = self.port or (5986 if scheme == "https" else 5985)
        return yarl.URL.build(scheme=scheme, host=self.address, port=port, path="/wsman")

    @property
    def endpoint(self) -> str:
        """The WS-Management URL as text."""
        return str(self.url)

    @property
    def connect_to(self) -> tuple[str, int]:
        """The host and port the connection goes to, read back from :attr:`url`."""
        url = self.url
        assert url.raw_host is not None and url.port is not None  # noqa: S101 - built with both
        return url.raw_host, url.port

    @property
    def security(self) -> str:
        """The transport security these options give the credential (credscope levels)."""
        return security_level(
            scheme=self.effective_scheme,
            transport=self.transport,
            cert_validation=self.server_cert_validation,
            message_encryption=self.message_encryption,
            trusted_ca=self.ca_trust_path is None or self.ca_trusted,
        )

    @property
    def untrusted_ca(self) -> bool:
        """True when the certificate would be checked with a CA file the scope does not pin."""
        return (
            self.effective_scheme == "https"
            and self.server_cert_validation == "validate"
            and self.ca_trust_path is not None
            and not self.ca_trusted
        )

    @property
    def message_encrypted(self) -> bool:
        """True when pywinrm must seal every message (NTLM/Kerberos/CredSSP over HTTP)."""
        return self.transport != "basic" and (
            self.message_encryption == "always"
            or (self.message_encryption == "auto" and self.effective_scheme == "http")
        )


def scope_problem(host: str, options: WinrmOptions) -> str | None:
    """Why the credential may not be used with these options, or None (checked first)."""
    where = f" ({options.password_path})" if options.password_path else ""
    if options.scope is None:
        command = f"provisioner secrets scope --path {options.password_path or 'PATH'}"
        return (
            f"the WinRM password{where} was sealed without a scope, so it is not sent to "
            f"{host} or anywhere: an admin seals it again with the addresses it may go to "
            f"('{command} --scope PATTERN'; docs/secrets.md)"
        )
    target = options.lab_for or options.address
    if options.lab_for and not is_loopback(options.address):
        return f"the lab's endpoint for {host} is {options.address}, not a loopback address"
    if not options.scope.allows(target):
        return (
            f"refused to send the WinRM password{where} for {host} to {target}: outside its "
            f"scope {options.scope}; the inventory cannot widen a scope, only sealing the "
            "password again can (provisioner secrets scope)"
        )
    if not at_least(options.security, options.scope.min_security):
        unpinned = (
            "; its certificate would be checked with winrm.ca_trust_path, a CA file the scope "
            "does not pin: seal the password again with that file ('provisioner secrets scope "
            "--ca FILE'; docs/secrets.md)"
            if options.untrusted_ca
            else ""
        )
        return (
            f"refused to send the WinRM password{where} for {host} to {target} over "
            f"{_SECURITY_SAID[options.security]}: its scope {options.scope} asks for more"
            + unpinned
        )
    return None


_SECURITY_SAID = {
    "none": "a connection that does not protect it",
    "encrypted": "message encryption without verified TLS",
    "tls": "verified TLS",
}


def policy_problems(options: WinrmOptions) -> list[str]:
    """Settings that push and rollout refuse (``doctor`` connects anyway and reports them)."""
    problems = []
    if options.server_cert_validation == "ignore":
        problems.append(
            "server_cert_validation: ignore lets anyone on the path pose as the workstation; "
            "give the CA in ca_trust_path instead"
        )
    if options.message_encryption == "never":
        problems.append("message_encryption: never sends every message in clear text; remove it")
    if options.transport == "basic" and options.effective_scheme != "https":
        problems.append(
            "basic authentication sends the password itself: only over https (scheme: https) "
            "with certificate validation"
        )
    return problems


def check_options(options: WinrmOptions, host: str = "") -> None:
    """Refuse unsafe or impossible combinations, and anything outside the scope, up front."""
    host = host or options.address
    if options.transport not in AUTH_TRANSPORTS:
        raise TransportError(
            f"unknown WinRM transport {options.transport!r}; use one of "
            + ", ".join(AUTH_TRANSPORTS),
            host=host,
        )
    problem = address_problem(options.address)
    if problem is not None:
        raise TransportError(f"{host}: address: {problem}", host=host)
    if not options.username or options.password is None:
        raise AuthError("no WinRM credentials: set winrm.username and winrm.password", host=host)
    problem = scope_problem(host, options)
    if problem is not None:
        raise TransportError(problem, host=host)
    if not options.diagnostic:
        problems = policy_problems(options)
        if problems:
            raise TransportError(
                f"{host}: push and rollout refuse these winrm settings: " + "; ".join(problems),
                host=host,
            )
    elif (
        options.transport == "basic"
        and options.effective_scheme == "http"
        and not options.allow_basic_over_http
    ):
        raise TransportError(
            "basic authentication over plain HTTP sends the password in clear text; use "
            "scheme: https, or transport: ntlm (message encryption), or set "
            "allow_basic_over_http: true for a lab",
            host=host,
        )
    if options.read_timeout <= options.operation_timeout:
        raise TransportError("read_timeout must be longer than operation_timeout", host=host)


class WinrmTransport:
    """Agent requests over one WinRM shell, opened on first use."""

    def __init__(self, host: str, options: WinrmOptions) -> None:
        check_options(options, host)
        self.host = host
        self.options = options
        self.http_requests = 0
        self._protocol: Protocol | None = None
        self._shell: str | None = None

    def _connect(self) -> tuple[Protocol, str]:
        if self._protocol is None or self._shell is None:
            options = self.options
            assert options.password is not None  # noqa: S101 - check_options guarantees it
            protocol = _CheckedProtocol(
                options.endpoint,
                transport="basic" if options.transport == "basic" else options.transport,  # type: ignore[arg-type]
                username=options.username,
                password=options.password.reveal(),
                # None: requests' own CA bundle, without pywinrm's deprecated env lookup.
                ca_trust_path=options.ca_trust_path,  # type: ignore[arg-type]
                server_cert_validation=options.server_cert_validation,  # type: ignore[arg-type]
                read_timeout_sec=options.read_timeout,
                operation_timeout_sec=options.operation_timeout,
                message_encryption=options.message_encryption,  # type: ignore[arg-type]
                proxy=None,
            )
            self._protocol = protocol
            session = self._call(protocol.transport.build_session)
            # build_session has just merged the environment's proxy and CA settings (proxy=None:
            # no proxy); requests would otherwise scan os.environ again on every request.
            session.trust_env = False
            # build_session also started message encryption where it applies: from now on a
            # reply must be sealed too.
            started = protocol.transport.encryption
            if started is not None:
                protocol.transport.encryption = _SealedReplies(session, started.protocol)
            elif options.message_encrypted:
                raise TransportError("message encryption did not start", host=self.host)
            self._shell = self._call(
                lambda: protocol.open_shell(codepage=UTF8_CODEPAGE, noprofile=True)
            )
        return self._protocol, self._shell

    def request(self, request: AgentRequest[R]) -> R:
        """Run one agent operation in this workstation's shell; its answer checked and typed."""
        operation = REGISTRY.of(request)
        protocol, shell = self._connect()
        command, arguments = scripts.bootstrap_command()
        envelope = scripts.make_envelope(operation.name, operation.wire(request))
        command_id = self._call(lambda: protocol.run_command(shell, command, arguments))
        try:
            for piece, last in stdin_pieces(envelope):
                self._call(
                    functools.partial(protocol.send_command_input, shell, command_id, piece, last)
                )
            stdout, stderr, code = self._call(
                lambda: protocol.get_command_output(shell, command_id)
            )
        finally:
            with contextlib.suppress(TransportError):
                self._call(lambda: protocol.cleanup_command(shell, command_id))
        if code != 0:
            detail = scripts.decode_clixml(stderr).strip() or f"exit code {code}"
            raise RemoteError(f"the agent failed: {detail}", host=self.host)
        # The transport edge: from here on the answer is typed, or a RemoteError.
        answer = scripts.parse_answer(stdout, host=self.host)
        return operation.reply_from(answer, self.host)

    def close(self) -> None:
        """Close the shell and the HTTP session; errors are ignored."""
        protocol, shell = self._protocol, self._shell
        self._protocol = self._shell = None
        if protocol is None:
            return
        # Closing is best effort: the push result is already decided.
        with contextlib.suppress(Exception):
            if shell is not None:
                protocol.close_shell(shell)
        with contextlib.suppress(Exception):
            protocol.transport.close_session()

    def _call(self, action: Callable[[], T]) -> T:
        """Run a pywinrm call, translating its errors; never lets a password through."""
        try:
            return action()
        except _UnprovenReply as exc:
            raise TransportError(
                f"refused a reply: {exc}; a man in the middle may have answered. The outcome "
                "of the request is unknown (see 'provisioner diff')",
                host=self.host,
            ) from None
        except winrm.exceptions.InvalidCredentialsError:
            raise AuthError(
                f"the credentials were rejected ({self.options.transport} as "
                f"{self.options.username})",
                host=self.host,
            ) from None
        except winrm.exceptions.BasicAuthDisabledError:
            raise AuthError(
                "basic authentication is disabled on the workstation", host=self.host
            ) from None
        except winrm.exceptions.WSManFaultError as exc:
            reason = (exc.reason or "").strip() or f"HTTP {exc.code}"
            raise RemoteError(
                f"WS-Management fault {exc.wsman_fault_code or exc.fault_code}: {reason}",
                host=self.host,
            ) from None
        except winrm.exceptions.WinRMTransportError as exc:
            if exc.code == 413:
                raise RemoteError(
                    "WinRM refused a request larger than the workstation's MaxEnvelopeSizekb "
                    "(HTTP 413)",
                    host=self.host,
                ) from None
            raise RemoteError(f"WinRM transport error: HTTP {exc.code}", host=self.host) from None
        except requests.exceptions.SSLError as exc:
            raise TransportError(
                f"TLS failed: {_short(exc)}; check the certificate and ca_trust_path",
                host=self.host,
            ) from None
        except requests.exceptions.ConnectTimeout:
            raise ConnectError("connection timed out", host=self.host) from None
        except requests.exceptions.ReadTimeout:
            raise TransportTimeoutError(
                f"no answer within {self.options.read_timeout} s", host=self.host
            ) from None
        except requests.exceptions.ConnectionError as exc:
            raise ConnectError(_connection_message(exc, self.options), host=self.host) from None
        except requests.exceptions.RequestException as exc:
            raise ConnectError(f"HTTP error: {_short(exc)}", host=self.host) from None
        except winrm.exceptions.WinRMError as exc:
            raise RemoteError(f"WinRM error: {_short(exc)}", host=self.host) from None
        except ProvisionerError:
            raise
        except Exception as exc:
            if "credential" in str(exc).lower() or "auth" in type(exc).__name__.lower():
                raise AuthError(
                    f"authentication failed: {type(exc).__name__}", host=self.host
                ) from None
            raise TransportError(f"{type(exc).__name__}: {_short(exc)}", host=self.host) from None


class _UnprovenReply(Exception):
    """A reply that does not prove it comes from the workstation and answers this request."""


class _SealedReplies(Encryption):
    """pywinrm's message encryption, refusing replies that are not sealed.

    ``Encryption.parse_encrypted_response`` returns the body as is when the Content-Type does
    not announce an encrypted one, so anyone in the middle could answer in plaintext
    (tests/test_transport_winrm.py pins that pywinrm still does).
    """

    def parse_encrypted_response(self, response: requests.Response) -> bytes:
        """Decrypt a sealed reply; refuse any other."""
        announced = f'protocol="{self.protocol_string.decode()}"'
        if announced not in response.headers.get("Content-Type", ""):
            raise _UnprovenReply(
                f"HTTP {response.status_code} in plaintext although message encryption is on"
            )
        return super().parse_encrypted_response(response)


_MESSAGE_ID = re.compile(r"<a:MessageID>uuid:([0-9A-Fa-f-]{36})</a:MessageID>")
_NS_S = "http://www.w3.org/2003/05/soap-envelope"
_RELATES_TO = "{http://schemas.xmlsoap.org/ws/2004/08/addressing}RelatesTo"


class _CheckedProtocol(Protocol):
    """pywinrm's Protocol, checking that every reply relates to the request it answers.

    pywinrm checks ``RelatesTo`` only for Signal and Delete (with ``assert``); every
    WS-Management operation goes through ``send_message``, so the check sits there.
    """

    def send_message(self, message: str) -> bytes:
        """Send one envelope; its reply (or fault) must name this request's MessageID."""
        found = _MESSAGE_ID.search(message)
        if found is None:
            raise _UnprovenReply("the request has no MessageID to check the reply against")
        sent = uuid.UUID(found.group(1))
        try:
            reply = super().send_message(message)
        except winrm.exceptions.WSManFaultError as fault:
            _check_relates_to(fault.response or "", sent)
            raise
        _check_relates_to(reply, sent)
        return reply


def _check_relates_to(reply: str | bytes, sent: uuid.UUID) -> None:
    relates_to = _relates_to(reply.encode() if isinstance(reply, str) else reply)
    if relates_to is None:
        raise _UnprovenReply("the reply has no RelatesTo header")
    try:
        answered = uuid.UUID(relates_to.removeprefix("uuid:"))
    except ValueError:
        raise _UnprovenReply("the reply's RelatesTo is not a message id") from None
    if answered != sent:
        raise _UnprovenReply(f"the reply answers message {answered}, not {sent}")


def _relates_to(reply: bytes, piece: int = 4096) -> str | None:
    """``s:Envelope/s:Header/a:RelatesTo`` of a reply; parses no further than the header."""
    if b"<!DOCTYPE" in reply:
        raise _UnprovenReply("the reply declares a DTD")
    parser: ET.XMLPullParser[Any] = ET.XMLPullParser(events=("start", "end"))
    path: list[str] = []
    for offset in range(0, len(reply), piece):
        try:
            parser.feed(reply[offset : offset + piece])
            events = list(parser.read_events())
        except ET.ParseError:
            raise _UnprovenReply("the reply is not well-formed XML") from None
        for item in events:
            event, element = item[0], item[-1]
            if not isinstance(element, ET.Element):
                continue
            if event == "start":
                path.append(element.tag)
                if path == [f"{{{_NS_S}}}Envelope", f"{{{_NS_S}}}Body"]:
                    return None  # the header is over
                continue
            if path == [f"{{{_NS_S}}}Envelope", f"{{{_NS_S}}}Header", _RELATES_TO]:
                return (element.text or "").strip()
            path.pop()
    return None


def stdin_pieces(data: bytes, size: int = STDIN_CHUNK) -> Iterator[tuple[bytes, bool]]:
    """``data`` in Sends of at most ``size`` bytes, the last one flagged (one Send when empty)."""
    if size < 1:
        raise ValueError("size must be positive")
    count = max(1, -(-len(data) // size))
    for index in range(count):
        yield data[index * size : (index + 1) * size], index == count - 1


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (requests -> urllib3 -> socket), each once."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [*current.args, getattr(current, "reason", None)]
        wrapped += [current.__cause__, current.__context__]
        pending += [w for w in wrapped if isinstance(w, BaseException)]


def _connection_message(exc: BaseException, options: WinrmOptions) -> str:
    """A short reason for a failed connection, without urllib3's nested reprs."""
    causes = list(_causes(exc))
    if any(
        isinstance(c, socket.gaierror) or type(c).__name__ == "NameResolutionError" for c in causes
    ):
        return f"cannot resolve host name {options.address}"
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"cannot connect: connection refused by {options.endpoint} (is WinRM listening?)"
    return f"cannot connect: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    for marker in ("Caused by ", "Max retries exceeded"):
        if marker in text:
            text = text.split(marker, 1)[-1]
    return text[:200]
