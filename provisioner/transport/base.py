"""The Transport seam: one typed agent request in, its typed answer out; and the read-only wrapper.

A dry run (``--check``, ``diff``) is the same code path as a real push through
:class:`ReadOnlyTransport`, which passes read-only operations through and answers the others
itself (chezmoi's DryRunSystem idea), rather than ``if dry_run:`` branches in the push. What is
read-only is what the operations registry declares so
(:mod:`provisioner.transport.agent.operations`); anything else never reaches the workstation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from provisioner.errors import TransportError
from provisioner.transport.agent.messages import AgentReply, AgentRequest
from provisioner.transport.agent.operations import REGISTRY, Registry, UnknownOperation

R = TypeVar("R", bound=AgentReply)


class Transport(Protocol):
    """Sends agent requests to one workstation."""

    @property
    def host(self) -> str:
        """The workstation's name."""
        ...

    def request(self, request: AgentRequest[R]) -> R:
        """Run one agent operation and return its checked answer (raises TransportError)."""
        ...

    def close(self) -> None:
        """Release the shell and connections; never raises."""
        ...


@dataclass
class ReadOnlyTransport:
    """Read-only operations go through; the others are recorded and answered by their dry run.

    Default deny: an operation not declared ``read_only`` (the flag's default), without a dry
    run, or not in ``registry`` at all is refused, never sent. ``recorded`` holds the requests
    answered in place of the workstation, in order.
    """

    inner: Transport
    recorded: list[AgentRequest[Any]] = field(default_factory=list)
    registry: Registry = REGISTRY

    @property
    def host(self) -> str:
        """The wrapped transport's host."""
        return self.inner.host

    def request(self, request: AgentRequest[R]) -> R:
        """Pass read-only operations through; record the others and answer as if done."""
        try:
            operation = self.registry.of(request)
        except UnknownOperation as exc:
            raise TransportError(f"refused in a dry run: {exc}", host=self.host) from None
        if operation.read_only:
            return self.inner.request(request)
        if operation.dry_run is None:
            raise TransportError(
                f"refused in a dry run: agent op {operation.name!r} is not declared read-only "
                "and has no dry run",
                host=self.host,
            )
        self.recorded.append(request)
        answer: R = operation.dry_run(request)
        return answer

    def close(self) -> None:
        """Close the wrapped transport."""
        self.inner.close()
