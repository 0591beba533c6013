"""One emulated workstation: its configuration, its request pipeline and its test handle.

Pipeline of a request: count it; ``slow`` sleep; ``http_401``; authenticate (Basic, or the
connection's NTLM context); unseal an encrypted body; parse the SOAP envelope; ``hang`` and
``soap_fault``; the WinRS operation. Once a connection's body arrived sealed every answer on
it is sealed, faults included, so the NTLM sequence numbers of both sides stay in step.

Authentication mirrors a Windows listener: Basic needs TLS unless ``allow_unencrypted``
(otherwise 401 offering only Negotiate); NTLM over HTTP must seal its bodies; an NTLM context
belongs to its TCP connection; over HTTPS the NTLM legs carry the first request's body and
channel binding (``tls-server-end-point``) is verified.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from provisioner.lab import encryption, wsman
from provisioner.lab.auth import (
    AuthFailed,
    NtlmSession,
    check_password,
    decode_basic,
    match_account,
    parse_authorization,
)
from provisioner.lab.certs import ServerCert
from provisioner.lab.faults import Faults, FaultState, ForgedReply
from provisioner.lab.handler import CommandHandler, HostSlot
from provisioner.lab.httpwire import HttpRequest, HttpResponse
from provisioner.lab.pool import WorkerPool
from provisioner.lab.reactor import Action, Connection, Listener, Outcome, Reactor
from provisioner.lab.stats import AUTH, REJECTED, Counters, HostStats
from provisioner.lab.winrs import Endpoint, ResetConnection, WinRS

Scheme = Literal["http", "https"]
AUTH_METHODS = frozenset({"basic", "ntlm"})
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$")
_SOAP = "application/soap+xml;charset=UTF-8"
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True)
class HostConfig:
    """How one emulated host listens and whom it lets in.

    ``credentials`` maps user to password (``DOMAIN\\user`` for a domain account). ``name``
    and ``address`` are chosen by the lab when empty; ``port`` None means 5985 (http) or
    5986 (https), 0 an ephemeral port.
    """

    credentials: Mapping[str, str]
    name: str = ""
    address: str = ""
    port: int | None = None
    scheme: Scheme = "http"
    auth: frozenset[str] = AUTH_METHODS
    allow_unencrypted: bool = False
    receive_chunk: int = 64 * 1024
    max_envelope_kb: int = 500
    remote_shells: bool = True
    """False: remote shell access is disabled by policy (``AllowRemoteShellAccess`` 0)."""
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if not self.credentials:
            raise ValueError("a lab host needs at least one account in credentials")
        if self.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be 'http' or 'https', not {self.scheme!r}")
        if not self.auth or not self.auth <= AUTH_METHODS:
            raise ValueError(f"auth must be a non-empty subset of {sorted(AUTH_METHODS)}")
        if self.name and not _NAME.match(self.name):
            raise ValueError(f"host name {self.name!r}: use letters, digits, '-' and '.'")
        if self.address and ipaddress.ip_address(self.address) not in _LOOPBACK:
            raise ValueError(f"lab hosts listen on 127.0.0.0/8 only, not {self.address}")
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")
        if self.receive_chunk < 1 or self.max_envelope_kb < 1:
            raise ValueError("receive_chunk and max_envelope_kb must be positive")

    @property
    def default_port(self) -> int:
        """5985 for http, 5986 for https."""
        return 5986 if self.scheme == "https" else 5985


@dataclass(frozen=True)
class _Principal:
    account: str
    session: NtlmSession | None


class LabHost:
    """A running emulated host; the handle tests use to inject faults and read counters."""

    def __init__(
        self,
        config: HostConfig,
        *,
        reactor: Reactor,
        handler: CommandHandler,
        handler_pool: WorkerPool,
        stopping: threading.Event,
        cert: ServerCert | None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.address = config.address
        self.scheme: Scheme = config.scheme
        self._reactor = reactor
        self._stopping = stopping
        self._cert = cert
        self._tls: ssl.SSLContext | None = None
        if cert is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls.load_cert_chain(cert.cert_path, cert.key_path)
        self._slot = HostSlot()
        self._faults = FaultState(config.faults)
        self._counters = Counters()
        self._listen_lock = threading.Lock()
        port = config.default_port if config.port is None else config.port
        bound = reactor.bind(config.address, port, self)
        self.port = bound.port
        self.url = f"{self.scheme}://{self.address}:{self.port}/wsman"
        self._winrs = WinRS(
            endpoint=Endpoint(self.name, self.address, self.port, self.url),
            slot=self._slot,
            handler=handler,
            pool=handler_pool,
            faults=self._faults,
            counters=self._counters,
            stopping=stopping,
            receive_chunk=config.receive_chunk,
            remote_shells=config.remote_shells,
        )
        self._listener: Listener | None = None
        if config.faults.refuse:
            bound.sock.close()
        else:
            reactor.activate(bound)
            self._listener = bound

    def __repr__(self) -> str:
        return f"LabHost({self.name} {self.url})"

    # --- the test handle --------------------------------------------------------------------

    @property
    def state(self) -> object:
        """The host's state slot, shared with the handler (``HostContext.state``)."""
        return self._slot.state

    @state.setter
    def state(self, value: object) -> None:
        self._slot.state = value

    @property
    def lock(self) -> threading.Lock:
        """The host's lock (``HostContext.lock``)."""
        return self._slot.lock

    @property
    def faults(self) -> Faults:
        """The fault plan in force."""
        return self._faults.plan

    def set_remote_shells(self, enabled: bool) -> None:
        """Allow or refuse remote shells, as the ``AllowRemoteShellAccess`` policy does."""
        self._winrs.remote_shells = enabled

    def set_faults(self, faults: Faults) -> None:
        """Install a new fault plan (fresh counters); ``refuse`` takes effect on return."""
        with self._listen_lock:
            self._faults.replace(faults)
            if faults.refuse and self._listener is not None:
                self._reactor.close_listener(self._listener)
                self._listener = None
            elif not faults.refuse and self._listener is None and not self._stopping.is_set():
                self._listener = self._reactor.listen(self.address, self.port, self)

    def clear_faults(self) -> None:
        """Back to a host that injects nothing."""
        self.set_faults(Faults())

    @property
    def request_count(self) -> int:
        """HTTP requests received since the last :meth:`reset_counts`."""
        return self._counters.requests

    def stats(self) -> HostStats:
        """Requests per operation, sealed bodies in and out, connections, commands."""
        return self._counters.snapshot()

    def reset_counts(self) -> None:
        """Zero the counters."""
        self._counters.reset()

    @property
    def open_shells(self) -> int:
        """Shells created and not deleted."""
        return self._winrs.open_shells

    @property
    def handler_errors(self) -> list[BaseException]:
        """Exceptions the handler raised (each also answered as a fault)."""
        return list(self._winrs.errors)

    # --- reactor.Service --------------------------------------------------------------------

    def tls(self) -> ssl.SSLContext | None:
        """The server TLS context (https hosts)."""
        return self._tls

    def accepted(self) -> None:
        """Count a connection."""
        self._counters.connection()

    def handle(self, conn: Connection, request: HttpRequest) -> Outcome:
        """Answer one HTTP request."""
        self._counters.request()
        plan = self._faults.plan
        if plan.slow and self._stopping.wait(plan.slow):
            return HttpResponse(503, close=True)
        if plan.http_401:
            self._counters.operation(REJECTED)
            return HttpResponse(401)
        if request.method != "POST" or request.target.split("?")[0].lower() != "/wsman":
            self._counters.operation(REJECTED)
            return HttpResponse(405 if request.method != "POST" else 404)
        principal = self._authenticate(conn, request)
        if isinstance(principal, HttpResponse):
            return principal
        return self._serve(conn, request, principal)

    # --- authentication ---------------------------------------------------------------------

    def _challenge(self) -> HttpResponse:
        headers = []
        if "ntlm" in self.config.auth:
            headers.append(("WWW-Authenticate", "Negotiate"))
        if "basic" in self.config.auth and (
            self.scheme == "https" or self.config.allow_unencrypted
        ):
            headers.append(("WWW-Authenticate", 'Basic realm="WSMAN"'))
        self._counters.operation(AUTH)
        return HttpResponse(401, headers=headers)

    def _authenticate(self, conn: Connection, request: HttpRequest) -> _Principal | HttpResponse:
        scheme, token = parse_authorization(request.header("authorization"))
        if scheme in ("negotiate", "ntlm") and "ntlm" in self.config.auth:
            return self._ntlm(conn, request, "NTLM" if scheme == "ntlm" else "Negotiate", token)
        if scheme == "basic" and "basic" in self.config.auth:
            if self.scheme == "http" and not self.config.allow_unencrypted:
                return self._challenge()
            pair = decode_basic(token)
            account = check_password(self.config.credentials, *pair) if pair else None
            return _Principal(account, None) if account else self._challenge()
        if not scheme and conn.ntlm is not None and conn.ntlm.complete:
            return _Principal(conn.ntlm.user, conn.ntlm)
        return self._challenge()

    def _ntlm(
        self, conn: Connection, request: HttpRequest, scheme: str, token: str
    ) -> _Principal | HttpResponse:
        if conn.ntlm is None:
            conn.ntlm = NtlmSession(self._cert.end_point_hash if self._cert else None)
        session = conn.ntlm
        try:
            answer = session.step(base64.b64decode(token, validate=True))
        except (AuthFailed, binascii.Error):
            conn.ntlm = None
            return self._challenge()
        if not session.complete:
            self._counters.operation(AUTH)
            reply = f"{scheme} {base64.b64encode(answer or b'').decode()}"
            return HttpResponse(401, headers=[("WWW-Authenticate", reply)])
        account = match_account(self.config.credentials, session.user)
        if account is None:
            conn.ntlm = None
            return self._challenge()
        session.user = account
        if not request.body:
            self._counters.operation(AUTH)
            return HttpResponse(200)
        return _Principal(account, session)

    # --- SOAP -------------------------------------------------------------------------------

    def _serve(self, conn: Connection, request: HttpRequest, principal: _Principal) -> Outcome:
        session = principal.session
        sealed = encryption.is_encrypted(request.header("content-type"))
        if sealed:
            if session is None:
                self._counters.operation(REJECTED)
                return HttpResponse(400, close=True)
            try:
                _, signature, data = encryption.unpack(request.body)
                plaintext = session.unseal(signature, data)
            except (encryption.FramingError, AuthFailed):
                conn.ntlm = None
                self._counters.operation(REJECTED)
                return HttpResponse(400, close=True)
            self._counters.encrypted(inbound=True)
        elif self.scheme == "http" and not self.config.allow_unencrypted:
            conn.ntlm = None
            return self._challenge()
        else:
            plaintext = request.body
        seal = session if sealed else None
        try:
            soap = wsman.parse_request(plaintext)
        except wsman.WsmanFault as bad:
            self._counters.operation(REJECTED)
            return self._fault(bad, "", seal)
        self._counters.operation(soap.operation)
        if len(plaintext) > self.config.max_envelope_kb * 1024:
            # Windows answers a request over MaxEnvelopeSizekb with HTTP 413 and no SOAP body
            # (pywinrm: "Bad HTTP response returned from server. Code 413").
            self._counters.operation(REJECTED)
            return HttpResponse(413, close=True)
        if self._faults.hang(soap.operation):
            return Action.PARK
        injected = self._faults.soap_fault(soap.operation)
        if injected is not None:
            planned = wsman.WsmanFault(injected.wsman_code, injected.subcode, injected.reason)
            return self._fault(planned, soap.message_id, seal)
        try:
            answer = self._winrs.dispatch(soap, principal.account, conn.peer)
        except ResetConnection:
            return Action.ABORT
        except wsman.WsmanFault as failed:
            return self._fault(failed, soap.message_id, seal)
        forged = self._faults.forged_reply(soap.operation)
        if forged is not None:
            return self._forged(forged, soap, answer, seal)
        return self._reply(200, answer, seal)

    # --- the man in the middle (faults.ForgedReply) -----------------------------------------

    def _forged(
        self, forged: ForgedReply, soap: wsman.SoapRequest, answer: bytes, seal: NtlmSession | None
    ) -> HttpResponse:
        if forged.kind == "relates_to":
            return self._reply(200, wsman.relating_to(answer, f"uuid:{wsman.new_id()}"), seal)
        if forged.stdout is not None and soap.operation == "Receive":
            command_id = wsman.parse_command_ref(soap.body, "Receive")
            streams = [("stdout", forged.stdout)]
            answer = wsman.receive_response(soap.message_id, command_id, streams, 0)
        # Unsealed: the host's sequence numbers do not move, as the host never sent it.
        return HttpResponse(200, answer, [("Content-Type", _SOAP)])

    def _fault(self, fault: wsman.WsmanFault, relates_to: str, seal: NtlmSession | None) -> Outcome:
        return self._reply(500, wsman.fault_envelope(fault, relates_to, self.name), seal)

    def _reply(self, status: int, xml: bytes, seal: NtlmSession | None) -> HttpResponse:
        if seal is None:
            return HttpResponse(status, xml, [("Content-Type", _SOAP)])
        body = encryption.pack(xml, seal.seal)
        self._counters.encrypted(inbound=False)
        return HttpResponse(status, body, [("Content-Type", encryption.CONTENT_TYPE)])
