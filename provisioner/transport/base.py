"""The Transport seam: one agent request in, one answer out; and the read-only wrapper.

A dry run (``--check``, ``diff``) is the same code path as a real push through
:class:`ReadOnlyTransport`, which passes reads through and records writes instead of sending
them (chezmoi's DryRunSystem idea), rather than ``if dry_run:`` branches in the push.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

WRITE_OPS = frozenset({"apply", "rollback"})


class Transport(Protocol):
    """Sends agent requests to one workstation."""

    @property
    def host(self) -> str:
        """The workstation's name."""
        ...

    def request(self, op: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Run one agent operation and return its answer (raises TransportError)."""
        ...

    def close(self) -> None:
        """Release the shell and connections; never raises."""
        ...


@dataclass
class ReadOnlyTransport:
    """Reads go through; writes are recorded and answered as if they had been done."""

    inner: Transport
    recorded: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)

    @property
    def host(self) -> str:
        """The wrapped transport's host."""
        return self.inner.host

    def request(self, op: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Pass reads through; record writes and pretend they succeeded."""
        if op not in WRITE_OPS:
            return self.inner.request(op, request)
        self.recorded.append((op, request))
        status = "written" if op == "apply" else "restored"
        return {
            "protocol": 1,
            "op": op,
            "ok": True,
            "dry_run": True,
            "files": [
                {
                    "path": item.get("path"),
                    "status": status,
                    "old_sha256": item.get("expect_sha256"),
                    "new_sha256": item.get("sha256"),
                    "backup": None,
                    "stopped": 0,
                    "error": None,
                }
                for item in request.get("files", [])
            ],
        }

    def close(self) -> None:
        """Close the wrapped transport."""
        self.inner.close()
