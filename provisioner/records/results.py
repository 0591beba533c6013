"""What a push produced: per-file changes, per-host results, and the Reporter protocol."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import PurePath
from typing import Any, Protocol


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


# What a push may do when the user's MicroSIP runs (--if-running): report busy, stop it first,
# or write anyway. Here, with the statuses, so that the CLI can check it without the engine.
IF_RUNNING = ("skip", "stop", "force")
UNRECORDED: Mapping[str, object] = {"recorded": False}
"""Metadata of an options field the run fills in itself: left out of :func:`jsonable`, so a
run's records and reports show the options as they were given."""


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
    microsip_versions: list[str] = field(default_factory=list)
    """The file versions of the MicroSIP exes inspect found (``3.21.6`` or ``unreadable``),
    distinct and sorted; empty when none was read."""
    microsip_outdated: bool = False
    """A version found is below ``microsip.min_version`` or unreadable (a warning says which)."""

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


class RunLike(Protocol):
    """What the run files need from a run (``RunResult`` fits)."""

    @property
    def run_id(self) -> str:
        """Short unique id of the run."""
        ...

    @property
    def started(self) -> datetime:
        """When the run started (UTC)."""
        ...

    @property
    def finished(self) -> datetime | None:
        """When the run ended, if it did."""
        ...

    @property
    def stopped(self) -> str:
        """Why the run stopped early; empty when it ran to the end."""
        ...

    @property
    def options(self) -> object:
        """The rollout options (a dataclass)."""
        ...

    @property
    def results(self) -> Mapping[str, HostResult]:
        """Every workstation's result, by name."""
        ...


def iso_utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z`` suffix; naive datetimes are taken as UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def jsonable(value: object) -> Any:
    """Plain JSON data from options: dataclasses, enums, paths, tuples, datetimes."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("recorded", True)
        }
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    # Anything else (a Secret included) goes through str(), which masks secrets.
    return str(value)


def is_dry_run(run: RunLike) -> bool:
    """True when the run changed nothing on purpose (``--check``)."""
    check = getattr(run.options, "check", None)
    if isinstance(check, bool):
        return check
    return bool(run.results) and all(r.dry_run for r in run.results.values())
