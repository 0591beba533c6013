"""The pluggable command execution behind the emulated WinRS shells.

A :class:`CommandHandler` gets the command line (``rsp:Command`` + ``" "`` + ``rsp:Arguments``)
and the complete stdin, and returns stdout, stderr and an exit code.

When a command runs (the one rule of the lab):

* stdin is complete when a ``Send`` carries ``End="true"``; the handler runs then;
* a ``Receive`` that arrives before any ``Send`` closes stdin as empty and runs the handler,
  unless ``handler.reads_stdin(command_line)`` is true: such a command waits for its input
  (``Receive`` answers ``w:TimedOut`` after the OperationTimeout, as Windows does while the
  process blocks on stdin); once a ``Send`` arrived, the command waits for ``End="true"``;
* a command line longer than :data:`CMD_LINE_LIMIT` never reaches the handler: it ends with
  cmd.exe's ``The command line is too long.`` and exit code 1.

Handlers run on a bounded worker pool, so several commands of one host may run at once;
``HostContext.lock`` serialises what must be serialised and ``HostContext.state`` keeps
whatever the handler needs between commands (a virtual file system, for instance).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

CMD_LINE_LIMIT = 8191
"""cmd.exe's longest command line (``WINRS_SKIP_CMD_SHELL=FALSE``)."""

CMD_LINE_TOO_LONG = b"The command line is too long.\r\n"


@dataclass(frozen=True)
class CommandResult:
    """What a command produced."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0


class HostSlot:
    """Per-host storage that outlives commands: a free ``state`` slot and a lock."""

    __slots__ = ("lock", "state")

    def __init__(self) -> None:
        self.state: object = None
        self.lock = threading.Lock()


class HostContext:
    """What a handler knows about the host, the shell and the caller of one command.

    ``state`` and ``lock`` belong to the host (shared by every command and shell of it);
    the other attributes describe this command.
    """

    __slots__ = (
        "_slot",
        "address",
        "codepage",
        "command_id",
        "environment",
        "name",
        "port",
        "shell_id",
        "user",
        "working_directory",
    )

    def __init__(
        self,
        *,
        slot: HostSlot,
        name: str,
        address: str,
        port: int,
        user: str,
        shell_id: str,
        command_id: str,
        codepage: int,
        working_directory: str | None,
        environment: Mapping[str, str],
    ) -> None:
        self._slot = slot
        self.name = name
        self.address = address
        self.port = port
        self.user = user
        self.shell_id = shell_id
        self.command_id = command_id
        self.codepage = codepage
        self.working_directory = working_directory
        self.environment = environment

    @property
    def state(self) -> object:
        """The host's state slot (``None`` until a handler or the lab sets it)."""
        return self._slot.state

    @state.setter
    def state(self, value: object) -> None:
        self._slot.state = value

    @property
    def lock(self) -> threading.Lock:
        """The host's lock; hold it while reading or changing ``state``."""
        return self._slot.lock

    def __repr__(self) -> str:
        return f"HostContext({self.name} {self.address}:{self.port} user={self.user!r})"


class CommandHandler(Protocol):
    """Runs the commands of every emulated host."""

    def reads_stdin(self, command_line: str) -> bool:
        """True if the command waits for stdin (so a Receive before any Send must not run it)."""
        ...

    def run(self, host: HostContext, command_line: str, stdin: bytes) -> CommandResult:
        """Execute one command; exceptions become a ``w:InternalError`` fault on Receive."""
        ...
