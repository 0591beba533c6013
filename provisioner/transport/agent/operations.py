"""The registry of agent operations: each one declared once, here.

An :class:`Operation` names the request on the wire, whether it only reads, the script that
runs it (sent after ``common.ps1``) and its request and answer types. Everything else follows
from :data:`REGISTRY`: the scripts sent (:mod:`provisioner.transport.agent.scripts`), what a
dry run lets through (:class:`provisioner.transport.base.ReadOnlyTransport`), how an answer is
read (:meth:`Operation.reply_from`), and what the lab runs for it
(``provisioner.lab.agent.IMPLEMENTATIONS``). ``tests/test_operations.py`` fails when any of
those, or a golden copy of the script, is missing for an operation.

An operation writes unless it is declared ``read_only``: a dry run sends only read-only ones,
and answers a writing one with its ``dry_run`` instead (none: the dry run refuses it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from provisioner.transport.agent.messages import (
    AgentReply,
    AgentRequest,
    ApplyReply,
    ApplyRequest,
    FileOutcome,
    InspectReply,
    InspectRequest,
    RollbackReply,
    RollbackRequest,
)
from provisioner.transport.agent.reading import answer_fields

PROTOCOL = 1
Q = TypeVar("Q", bound=AgentRequest[Any])
R = TypeVar("R", bound=AgentReply)


@dataclass(frozen=True)
class Operation(Generic[Q, R]):
    """One agent operation; see the module docstring."""

    name: str
    script: str
    """The file in ``provisioner/transport/agent/`` that runs it."""
    request: type[Q]
    reply: type[R]
    read_only: bool = False
    """True only for an operation that changes nothing on a workstation."""
    dry_run: Callable[[Q], R] | None = field(default=None, compare=False)
    """For an operation that writes: the answer a dry run gives in place of sending it."""

    def wire(self, request: Q) -> dict[str, object]:
        """The request as the script reads it."""
        return {"op": self.name, "protocol": PROTOCOL, **request.body()}

    def reply_from(self, answer: Mapping[str, object], host: str) -> R:
        """The decoded answer, checked against the contract (RemoteError naming the field)."""
        return self.reply.read(answer_fields(answer, self.name, host))


def _pretend_applied(request: ApplyRequest) -> ApplyReply:
    # What --check shows: every file written, its hashes the ones the request expects.
    return ApplyReply(
        tuple(
            FileOutcome(item.path, "written", item.expect_sha256, item.sha256, None, 0, None)
            for item in request.files
        )
    )


def _pretend_rolled_back(request: RollbackRequest) -> RollbackReply:
    return RollbackReply(
        None,
        tuple(
            FileOutcome(item.path, "restored", None, None, None, 0, None) for item in request.files
        ),
    )


INSPECT: Operation[InspectRequest, InspectReply] = Operation(
    "inspect", "inspect.ps1", InspectRequest, InspectReply, read_only=True
)
APPLY: Operation[ApplyRequest, ApplyReply] = Operation(
    "apply", "apply.ps1", ApplyRequest, ApplyReply, dry_run=_pretend_applied
)
ROLLBACK: Operation[RollbackRequest, RollbackReply] = Operation(
    "rollback", "rollback.ps1", RollbackRequest, RollbackReply, dry_run=_pretend_rolled_back
)


class UnknownOperation(LookupError):
    """A request or name that no registered operation declares (a bug, never input)."""


@dataclass(frozen=True)
class Registry:
    """Operations by name and by request type; names and request types are unique."""

    operations: tuple[Operation[Any, Any], ...]

    def __post_init__(self) -> None:
        names = [op.name for op in self.operations]
        types = [op.request for op in self.operations]
        if len(set(names)) != len(names) or len(set(types)) != len(types):
            raise ValueError(f"operations declared twice: {names}")

    def __iter__(self) -> Iterator[Operation[Any, Any]]:
        return iter(self.operations)

    @property
    def names(self) -> tuple[str, ...]:
        """The operations' names, in order."""
        return tuple(op.name for op in self.operations)

    def named(self, name: str) -> Operation[Any, Any]:
        """The operation called ``name``."""
        for op in self.operations:
            if op.name == name:
                return op
        known = ", ".join(self.names)
        raise UnknownOperation(f"unknown agent op {name!r}; the agent knows {known}")

    def of(self, request: AgentRequest[R]) -> Operation[Any, R]:
        """The operation that ``request`` is for."""
        for op in self.operations:
            if type(request) is op.request:
                return op
        raise UnknownOperation(f"no agent operation is declared for {type(request).__name__}")


REGISTRY = Registry((INSPECT, APPLY, ROLLBACK))
"""Every operation the agent runs."""
