"""The WinRS shells and commands of one host: Create, Command, Send, Receive, Signal, Delete.

Commands follow the rule of :mod:`provisioner.lab.handler`. The handler runs on the lab's
handler pool; a Receive waits for it at most the request's ``OperationTimeout`` and answers
``w:TimedOut`` if the command is still running (pywinrm then sends Receive again). Output is
handed out in pieces of at most ``receive_chunk`` bytes (and never more than fits the
client's ``MaxEnvelopeSize``), stdout first, then stderr; the last piece carries
``CommandState/Done`` and the exit code. stdin sent to a command that already finished
(a too-long command line, say) is accepted and discarded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from provisioner.lab import wsman
from provisioner.lab.faults import FaultState
from provisioner.lab.handler import (
    CMD_LINE_LIMIT,
    CMD_LINE_TOO_LONG,
    CommandHandler,
    CommandResult,
    HostContext,
    HostSlot,
)
from provisioner.lab.pool import WorkerPool
from provisioner.lab.stats import Counters
from provisioner.lab.wsman import SoapRequest, WsmanFault

_log = logging.getLogger(__name__)

PROCESS_LINE_LIMIT = 32767
MAX_STDIN_BYTES = 64 * 1024 * 1024
_DEFAULT_WAIT = 60.0
_POLL = 0.1


class ResetConnection(Exception):
    """The fault plan wants this connection reset without an answer."""


@dataclass(frozen=True)
class Endpoint:
    """Who the host is, for answers and handler contexts."""

    name: str
    address: str
    port: int
    url: str


class _Command:
    __slots__ = (
        "done",
        "error",
        "exit_code",
        "id",
        "line",
        "ordinal",
        "output",
        "prepared",
        "result",
        "started",
        "stdin",
        "stdin_closed",
        "stdin_seen",
    )

    def __init__(self, command_id: str, line: str, ordinal: int) -> None:
        self.id = command_id
        self.line = line
        self.ordinal = ordinal
        self.stdin = bytearray()
        self.stdin_seen = False
        self.stdin_closed = False
        self.started = False
        self.done = threading.Event()
        self.result: CommandResult | None = None
        self.error: BaseException | None = None
        self.output: deque[tuple[str, bytes]] = deque()
        self.prepared = False
        self.exit_code = 0

    def finish(self, result: CommandResult) -> None:
        self.started = True
        self.stdin_closed = True
        self.result = result
        self.done.set()


class _Shell:
    __slots__ = ("codepage", "commands", "id", "owner", "spec")

    def __init__(self, shell_id: str, owner: str, codepage: int, spec: wsman.ShellSpec) -> None:
        self.id = shell_id
        self.owner = owner
        self.codepage = codepage
        self.spec = spec
        self.commands: dict[str, _Command] = {}


class WinRS:
    """Shell table and command lifecycle of one host (thread-safe)."""

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        slot: HostSlot,
        handler: CommandHandler,
        pool: WorkerPool,
        faults: FaultState,
        counters: Counters,
        stopping: threading.Event,
        receive_chunk: int,
        remote_shells: bool = True,
    ) -> None:
        self._endpoint = endpoint
        self.remote_shells = remote_shells
        self._slot = slot
        self._handler = handler
        self._pool = pool
        self._faults = faults
        self._counters = counters
        self._stopping = stopping
        self._chunk = receive_chunk
        self._lock = threading.Lock()
        self._shells: dict[str, _Shell] = {}
        self.errors: list[BaseException] = []

    @property
    def open_shells(self) -> int:
        """Shells created and not yet deleted."""
        with self._lock:
            return len(self._shells)

    def dispatch(self, request: SoapRequest, user: str, peer: str) -> bytes:
        """Answer one operation; raises :class:`WsmanFault` or :class:`ResetConnection`."""
        if request.resource_uri != wsman.SHELL_URI:
            raise WsmanFault(
                wsman.CODE_BAD_RESOURCE_URI,
                "w:InvalidResourceURI",
                f"The WS-Management service cannot process the request. The resource URI "
                f"{request.resource_uri!r} is not supported by the lab.",
                receiver=False,
            )
        if request.operation == "Create":
            return self._create(request, user, peer)
        shell = self._shell(request.shell_id, user)
        if request.operation == "Command":
            return self._command(request, shell)
        if request.operation == "Send":
            return self._send(request, shell)
        if request.operation == "Receive":
            return self._receive(request, shell)
        if request.operation == "Signal":
            return self._signal(request, shell)
        return self._delete(request, shell)

    def _shell(self, shell_id: str, user: str) -> _Shell:
        with self._lock:
            shell = self._shells.get(shell_id)
        if shell is None or shell.owner != user:
            raise wsman.shell_not_found(shell_id or "(none)")
        return shell

    def _find(self, shell: _Shell, command_id: str) -> _Command:
        with self._lock:
            command = shell.commands.get(command_id)
        if command is None:
            raise wsman.invalid_parameter(
                f"The Windows Remote Shell received a request to perform an operation on a "
                f"command identifier that does not exist: {command_id}."
            )
        return command

    def _create(self, request: SoapRequest, user: str, peer: str) -> bytes:
        if not self.remote_shells:
            raise wsman.remote_shells_not_allowed()
        spec = wsman.parse_shell(request.body)
        try:
            codepage = int(request.options.get("WINRS_CODEPAGE", "437"))
        except ValueError as err:
            raise wsman.invalid_parameter("WINRS_CODEPAGE must be a number.") from err
        shell = _Shell(wsman.new_id(), user, codepage, spec)
        with self._lock:
            self._shells[shell.id] = shell
        return wsman.create_response(
            request.message_id, shell.id, self._endpoint.url, user, peer, spec
        )

    def _command(self, request: SoapRequest, shell: _Shell) -> bytes:
        line = wsman.parse_command_line(request.body)
        ordinal = self._faults.command_started()
        if self._faults.reset("Command", ordinal):
            raise ResetConnection
        skip_cmd = request.options.get("WINRS_SKIP_CMD_SHELL", "FALSE").upper() == "TRUE"
        if skip_cmd and len(line) > PROCESS_LINE_LIMIT:
            raise WsmanFault(206, "w:InternalError", "The filename or extension is too long.")
        command = _Command(wsman.new_id(), line, ordinal)
        if not skip_cmd and len(line) > CMD_LINE_LIMIT:
            command.finish(CommandResult(stderr=CMD_LINE_TOO_LONG, exit_code=1))
        with self._lock:
            shell.commands[command.id] = command
        self._counters.command()
        return wsman.command_response(request.message_id, command.id)

    def _send(self, request: SoapRequest, shell: _Shell) -> bytes:
        chunks = wsman.parse_send(request.body)
        for chunk in chunks:
            command = self._find(shell, chunk.command_id)
            if self._faults.reset("Send", command.ordinal):
                raise ResetConnection
        for chunk in chunks:
            command = self._find(shell, chunk.command_id)
            with self._lock:
                if command.stdin_closed:
                    continue
                if len(command.stdin) + len(chunk.data) > MAX_STDIN_BYTES:
                    raise wsman.invalid_parameter("The lab keeps at most 64 MiB of stdin.")
                command.stdin += chunk.data
                command.stdin_seen = True
                if not chunk.end:
                    continue
                command.stdin_closed = True
                stdin = bytes(command.stdin)
                command.stdin = bytearray()
            self._start(shell, command, stdin)
        return wsman.send_response(request.message_id)

    def _start(self, shell: _Shell, command: _Command, stdin: bytes) -> None:
        with self._lock:
            if command.started:
                return
            command.started = True
        host = HostContext(
            slot=self._slot,
            name=self._endpoint.name,
            address=self._endpoint.address,
            port=self._endpoint.port,
            user=shell.owner,
            shell_id=shell.id,
            command_id=command.id,
            codepage=shell.codepage,
            working_directory=shell.spec.working_directory,
            environment=dict(shell.spec.environment),
        )
        delay = self._faults.plan.command_delay

        def run() -> None:
            try:
                if delay and self._stopping.wait(delay):
                    raise RuntimeError("the lab stopped before the command ran")
                result = self._handler.run(host, command.line, stdin)
                if not isinstance(result, CommandResult) or not (
                    isinstance(result.stdout, bytes) and isinstance(result.stderr, bytes)
                ):
                    raise TypeError(f"handler returned {result!r}, not CommandResult of bytes")
                command.result = result
            except Exception as err:
                _log.exception("handler failed for %r on %s", command.line[:80], host.name)
                command.error = err
                with self._lock:
                    self.errors.append(err)
            finally:
                command.done.set()

        self._pool.submit(run)

    def _receive(self, request: SoapRequest, shell: _Shell) -> bytes:
        command = self._find(shell, wsman.parse_command_ref(request.body, "Receive"))
        if self._faults.reset("Receive", command.ordinal):
            raise ResetConnection
        with self._lock:
            run_now = not command.started and not command.stdin_seen
        if run_now and not self._handler.reads_stdin(command.line):
            with self._lock:
                command.stdin_closed = True
            self._start(shell, command, b"")
        if self._faults.take_operation_timeout():
            raise wsman.timed_out()
        timeout = request.operation_timeout or _DEFAULT_WAIT
        deadline = time.monotonic() + timeout
        while not command.done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                raise wsman.timed_out()
            command.done.wait(min(remaining, _POLL))
        if command.error is not None:
            raise WsmanFault(
                wsman.CODE_INTERNAL,
                "w:InternalError",
                f"The lab's command handler failed: {command.error!r}",
            )
        budget = max(1024, min(self._chunk, (request.max_envelope - 4096) * 3 // 4))
        with self._lock:
            streams = self._take(command, budget)
            finished = not command.output
        exit_code = command.exit_code if finished else None
        return wsman.receive_response(request.message_id, command.id, streams, exit_code)

    @staticmethod
    def _take(command: _Command, budget: int) -> list[tuple[str, bytes]]:
        if not command.prepared and command.result is not None:
            command.prepared = True
            result = command.result
            command.exit_code = result.exit_code
            command.output.extend(
                (name, data)
                for name, data in (("stdout", result.stdout), ("stderr", result.stderr))
                if data
            )
        streams: list[tuple[str, bytes]] = []
        while command.output and budget > 0:
            name, data = command.output[0]
            piece = data[:budget]
            if len(piece) == len(data):
                command.output.popleft()
            else:
                command.output[0] = (name, data[len(piece) :])
            streams.append((name, piece))
            budget -= len(piece)
        return streams

    def _signal(self, request: SoapRequest, shell: _Shell) -> bytes:
        command_id = wsman.parse_command_ref(request.body, "Signal")
        self._find(shell, command_id)
        with self._lock:
            shell.commands.pop(command_id, None)
        return wsman.signal_response(request.message_id)

    def _delete(self, request: SoapRequest, shell: _Shell) -> bytes:
        with self._lock:
            self._shells.pop(shell.id, None)
        return wsman.delete_response(request.message_id)
