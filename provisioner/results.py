"""What a push produced: per-file changes, per-host results, and the Reporter protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Status(StrEnum):
    """Outcome of one workstation (or one file), worst last."""

    UNCHANGED = "unchanged"
    CHANGED = "changed"
    BUSY = "busy"
    SKIPPED = "skipped"
    CONFLICT = "conflict"
    FAILED = "failed"

    @property
    def rank(self) -> int:
        """Higher is worse; a host takes the worst status of its files."""
        return list(Status).index(self)


@dataclass(frozen=True)
class FileChange:
    """One managed file of a push. ``diff`` never contains a password."""

    kind: str
    user: str | None
    path: str
    status: Status
    message: str = ""
    old_sha256: str | None = None
    new_sha256: str | None = None
    diff: str = ""
    conflicts: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``user/microsip.ini`` or ``override.ini``."""
        name = self.path.replace("\\", "/").rsplit("/", 1)[-1]
        return f"{self.user}/{name}" if self.user else name


@dataclass
class HostResult:
    """The outcome of one workstation; failures are data, not exceptions."""

    host: str
    status: Status
    message: str = ""
    files: list[FileChange] = field(default_factory=list)
    retryable: bool = False
    attempts: int = 1
    duration: float = 0.0
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True for changed or unchanged."""
        return self.status in (Status.CHANGED, Status.UNCHANGED)


class Reporter(Protocol):
    """Event hooks for progress and reports; runners never print."""

    def host_started(self, host: str) -> None:
        """A workstation's push starts."""
        ...

    def host_done(self, result: HostResult) -> None:
        """A workstation's push ended (whatever the outcome)."""
        ...
