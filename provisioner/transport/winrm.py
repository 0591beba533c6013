"""The WinRM transport: the only pywinrm (and requests) user.

One shell per workstation through ``winrm.protocol.Protocol`` (not ``Session.run_ps``, which
opens a new connection per call and breaks past cmd.exe's line limit), UTF-8 code page, the
short bootstrap of :mod:`provisioner.transport.agent.scripts` with the request on stdin.
pywinrm and requests errors are translated here into the TransportError tree.

CPU per request is the controller's ceiling in a fleet rollout (docs/performance.md): each
requests session stops reading the environment once pywinrm has built it.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import requests.utils
import winrm.exceptions
from winrm.protocol import Protocol

from provisioner.errors import (
    AuthError,
    ConnectError,
    ProvisionerError,
    RemoteError,
    TransportError,
    TransportTimeoutError,
)
from provisioner.model import Secret
from provisioner.transport.agent import scripts

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


@dataclass(frozen=True)
class WinrmOptions:
    """How to reach one workstation; the password stays a Secret until the wire."""

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

    @property
    def effective_scheme(self) -> str:
        """http for NTLM/Kerberos/CredSSP (message encryption), https for basic, unless set."""
        if self.scheme:
            return self.scheme
        return "https" if self.transport == "basic" else "http"

    @property
    def endpoint(self) -> str:
        """The WS-Management URL."""
        scheme = self.effective_scheme
        port = self.port or (5986 if scheme == "https" else 5985)
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{scheme}://{host}:{port}/wsman"


def check_options(options: WinrmOptions) -> None:
    """Refuse unsafe or impossible combinations before any connection."""
    if options.transport not in AUTH_TRANSPORTS:
        raise TransportError(
            f"unknown WinRM transport {options.transport!r}; use one of "
            + ", ".join(AUTH_TRANSPORTS)
        )
    if (
        options.transport == "basic"
        and options.effective_scheme == "http"
        and not options.allow_basic_over_http
    ):
        raise TransportError(
            "basic authentication over plain HTTP sends the password in clear text; use "
            "scheme: https, or transport: ntlm (message encryption), or set "
            "allow_basic_over_http: true for a lab"
        )
    if options.read_timeout <= options.operation_timeout:
        raise TransportError("read_timeout must be longer than operation_timeout")
    if not options.username or options.password is None:
        raise AuthError("no WinRM credentials: set winrm.username and winrm.password")


class WinrmTransport:
    """Agent requests over one WinRM shell, opened on first use."""

    def __init__(self, host: str, options: WinrmOptions) -> None:
        check_options(options)
        self.host = host
        self.options = options
        self.http_requests = 0
        self._protocol: Protocol | None = None
        self._shell: str | None = None

    def _connect(self) -> tuple[Protocol, str]:
        if self._protocol is None or self._shell is None:
            options = self.options
            assert options.password is not None  # noqa: S101 - check_options guarantees it
            protocol = Protocol(
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
            self._shell = self._call(
                lambda: protocol.open_shell(codepage=UTF8_CODEPAGE, noprofile=True)
            )
        return self._protocol, self._shell

    def request(self, op: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Run one agent operation in this workstation's shell."""
        protocol, shell = self._connect()
        command, arguments = scripts.bootstrap_command()
        envelope = scripts.make_envelope(op, request)
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
        answer: dict[str, Any] = scripts.parse_answer(stdout)
        if answer.get("protocol") != 1:
            raise RemoteError("the agent answered with an unknown protocol", host=self.host)
        return answer

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
