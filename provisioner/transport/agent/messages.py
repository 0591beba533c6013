"""The requests the controller sends to the agent and the answers it reads back, typed.

docs/agent-protocol.md is the contract; these classes are its fields. A request becomes the
JSON the scripts read through :meth:`AgentRequest.body` (``op`` and ``protocol`` are added from
the operation's registry entry, :mod:`provisioner.transport.agent.operations`); an answer is
read, checked field by field, through :meth:`AgentReply.read` at the transport edge, so that the
rest of the controller never meets a dict.

MicroSIP's file version (``version``, ``exe_version``) is text from whoever controls the exe:
it is parsed here, strictly, and only its parsed form or ``unreadable`` goes further.

File contents travel as base64 on the wire (``content_b64``, ``applied_b64``) and are bytes
here. They may hold SIP passwords: those fields are left out of every ``repr``.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Self, TypeVar

from provisioner.microsip.version import parse_exe_version, shown
from provisioner.transport.agent.reading import Fields

R = TypeVar("R", bound="AgentReply")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AgentReply(ABC):
    """An answer of the agent, as the contract describes it for ``ok: true``."""

    @classmethod
    @abstractmethod
    def read(cls, fields: Fields) -> Self:
        """Read and check the answer's fields (raises RemoteError naming the field)."""


class AgentRequest(ABC, Generic[R]):
    """A request, answered by an ``R``; its operation is found in the registry by its type."""

    @abstractmethod
    def body(self) -> dict[str, object]:
        """The request's fields on the wire, but ``op`` and ``protocol``."""


@dataclass(frozen=True)
class AgentError:
    """An error object of the contract: a code from its table and one sentence."""

    code: str
    message: str

    @classmethod
    def read(cls, fields: Fields) -> AgentError:
        """Read an error object."""
        return cls(fields.text("code"), fields.text("message"))

    @classmethod
    def read_or_none(cls, fields: Fields, key: str = "error") -> AgentError | None:
        """The error at ``key``, or None when it is null."""
        found = fields.object_or_none(key)
        return None if found is None else cls.read(found)


# --- inspect ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallWanted:
    """Where the inventory says MicroSIP is, and how it runs."""

    mode: str
    install_dir: str
    exe: str


@dataclass(frozen=True)
class UserWanted:
    """A user to inspect: the inventory's name and the Windows account."""

    name: str
    windows: str


@dataclass(frozen=True)
class HostFacts:
    """The workstation as the agent sees it."""

    computer: str
    ps_version: str
    free_bytes: int | None
    language_mode: str

    @classmethod
    def read(cls, fields: Fields) -> HostFacts:
        """Read the ``host`` object."""
        return cls(
            fields.text("computer"),
            fields.text("ps_version"),
            fields.count_or_none("free_bytes"),
            fields.text("language_mode"),
        )


@dataclass(frozen=True)
class InstallFacts:
    """Where the agent found MicroSIP (``source``: inventory, registry or msi).

    ``version``: the machine-wide exe's file version, strictly parsed (``3.21.6``), or
    ``unreadable``; None when there is no machine-wide exe (not found, per user).
    """

    found: bool
    dir: str | None
    exe_path: str | None
    source: str | None
    per_user: bool
    version: str | None = None

    @classmethod
    def read(cls, fields: Fields) -> InstallFacts:
        """Read the ``install`` object."""
        found, per_user = fields.flag("found"), fields.flag("per_user")
        raw = fields.text_or_none("version")
        return cls(
            found,
            fields.text_or_none("dir"),
            fields.text_or_none("exe_path"),
            fields.text_or_none("source"),
            per_user,
            shown(parse_exe_version(raw)) if found and not per_user else None,
        )


@dataclass(frozen=True)
class AppliedCopy:
    """The last content the tool applied (passwords replaced by markers): the merge base."""

    exists: bool
    sha256: str | None
    content: bytes | None = field(repr=False)
    legacy: bool

    @classmethod
    def read(cls, fields: Fields) -> AppliedCopy:
        """Read an ``applied`` object."""
        exists = fields.flag("exists")
        content = fields.base64_or_none("content_b64")
        return cls(
            exists,
            fields.sha256_or_none("sha256"),
            content if exists else None,
            fields.flag("legacy"),
        )


@dataclass(frozen=True)
class FileFacts:
    """What inspect read of one file: its content (None: no file yet) and its merge base."""

    exists: bool
    sha256: str | None
    content: bytes | None = field(repr=False)
    read_only: bool
    applied: AppliedCopy

    @classmethod
    def read(cls, fields: Fields) -> FileFacts:
        """Read the file fields of a user or of ``override``."""
        exists = fields.flag("exists")
        content = fields.base64_or_none("content_b64")
        return cls(
            exists,
            fields.sha256_or_none("sha256"),
            content if exists else None,
            fields.flag("read_only"),
            AppliedCopy.read(fields.object("applied")),
        )


@dataclass(frozen=True)
class OverrideState:
    """The workstation's ``override.ini``.

    ``file`` is None when the agent could not look at it (``error``) and for a per-user install,
    which has no machine-wide folder (``per_user``).
    """

    path: str | None
    per_user: bool
    file: FileFacts | None
    error: AgentError | None

    @classmethod
    def read(cls, fields: Fields) -> OverrideState:
        """Read the ``override`` object."""
        path = fields.text_or_none("path")
        per_user = fields.has("per_user") and fields.flag("per_user")
        error = AgentError.read_or_none(fields)
        file = None if per_user or error is not None else FileFacts.read(fields)
        return cls(path, per_user, file, error)


@dataclass(frozen=True)
class UserState:
    """One user's ini: where MicroSIP reads it for them (``mode``, decided by ``mode_rule``)
    and what it holds.

    A user the agent could not resolve has ``error`` and no ``file``; ``appdata`` and the mode
    fields are kept when they were read, so that an error can show where things point.
    ``exe_version``: for a per-user install, the file version of the exe this user runs
    (like :attr:`InstallFacts.version`); None when not read.
    """

    name: str
    windows: str
    sid: str | None
    profile: str | None
    appdata: str | None
    path: str | None
    mode: str | None
    mode_rule: str | None
    mode_detail: str | None
    file: FileFacts | None
    running: bool
    error: AgentError | None
    exe_version: str | None = None

    @classmethod
    def read(cls, fields: Fields) -> UserState:
        """Read one item of ``users``."""
        error = AgentError.read_or_none(fields)
        decided = error is None or fields.has("mode")
        return cls(
            fields.text("name"),
            fields.text("windows"),
            fields.text_or_none("sid"),
            fields.text_or_none("profile"),
            fields.text_or_none("appdata"),
            fields.text_or_none("path"),
            fields.text("mode") if decided else None,
            fields.text("mode_rule") if decided else None,
            fields.text("mode_detail") if decided else None,
            FileFacts.read(fields) if error is None else None,
            fields.flag("running") if error is None else False,
            error,
            shown(parse_exe_version(fields.text_or_none("exe_version")))
            if fields.has("exe_version")
            else None,
        )


@dataclass(frozen=True)
class InspectReply(AgentReply):
    """The answer to :class:`InspectRequest`; ``override`` is None when it was not asked for."""

    host: HostFacts
    install: InstallFacts
    override: OverrideState | None
    users: tuple[UserState, ...]

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read an inspect answer."""
        override = fields.object_or_none("override")
        return cls(
            HostFacts.read(fields.object("host")),
            InstallFacts.read(fields.object("install")),
            None if override is None else OverrideState.read(override),
            tuple(UserState.read(user) for user in fields.objects("users")),
        )


@dataclass(frozen=True)
class InspectRequest(AgentRequest[InspectReply]):
    """Where MicroSIP and each user's ini are, and what they hold. Reads only."""

    install: InstallWanted
    users: tuple[UserWanted, ...] = ()
    appdata_roots: tuple[str, ...] = ()
    override: bool = False

    def body(self) -> dict[str, object]:
        """The request's fields on the wire."""
        wanted = self.install
        return {
            "install": {"mode": wanted.mode, "install_dir": wanted.install_dir, "exe": wanted.exe},
            "users": [{"name": user.name, "windows": user.windows} for user in self.users],
            "appdata_roots": list(self.appdata_roots),
            "override": self.override,
        }


# --- apply and rollback ---------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyFile:
    """One file to write: its new content, compared-and-swapped against ``expect_sha256``.

    ``kind`` is ``microsip`` (a user's ini: ``user``, ``sid`` and ``process`` set) or
    ``override``; ``applied`` is the copy kept as the next merge base.
    """

    kind: str
    user: str | None
    sid: str | None
    path: str
    expect_sha256: str | None
    content: bytes = field(repr=False)
    sha256: str
    applied: bytes = field(repr=False)
    process: str | None

    def body(self) -> dict[str, object]:
        """The file's entry on the wire."""
        return {
            "kind": self.kind,
            "user": self.user,
            "sid": self.sid,
            "path": self.path,
            "expect_sha256": self.expect_sha256,
            "content_b64": _b64(self.content),
            "sha256": self.sha256,
            "applied_b64": _b64(self.applied),
            "process": self.process,
        }


@dataclass(frozen=True)
class RollbackFile:
    """One file whose last write of the tool to undo (if the run undone wrote it)."""

    kind: str
    user: str | None
    sid: str | None
    path: str
    process: str | None

    def body(self) -> dict[str, object]:
        """The file's entry on the wire."""
        return {
            "kind": self.kind,
            "user": self.user,
            "sid": self.sid,
            "path": self.path,
            "process": self.process,
        }


@dataclass(frozen=True)
class FileOutcome:
    """What apply or rollback did to one file (``stopped``: MicroSIP processes it closed)."""

    path: str
    status: str
    old_sha256: str | None
    new_sha256: str | None
    backup: str | None
    stopped: int
    error: AgentError | None

    @classmethod
    def read(cls, fields: Fields, statuses: tuple[str, ...]) -> FileOutcome:
        """Read one item of ``files``; ``statuses`` are the ones the operation may report."""
        return cls(
            fields.text("path"),
            fields.choice("status", statuses),
            fields.sha256_or_none("old_sha256"),
            fields.sha256_or_none("new_sha256"),
            fields.text_or_none("backup"),
            fields.count("stopped"),
            AgentError.read_or_none(fields),
        )


@dataclass(frozen=True)
class ApplyReply(AgentReply):
    """The answer to :class:`ApplyRequest`: one outcome per file, in order."""

    STATUSES: ClassVar[tuple[str, ...]] = ("written", "busy", "conflict", "error")

    files: tuple[FileOutcome, ...]

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read an apply answer."""
        return cls(tuple(FileOutcome.read(f, cls.STATUSES) for f in fields.objects("files")))


@dataclass(frozen=True)
class RollbackReply(AgentReply):
    """The answer to :class:`RollbackRequest`: the run undone and one outcome per file, in
    order (``removed``: the run created it; ``restored``: it replaced it; ``unchanged``: the run
    did not write it).

    ``run`` is None when no file had a write to undo, or its write was recorded by an agent
    before the history (whose run nobody knows).
    """

    STATUSES: ClassVar[tuple[str, ...]] = ("restored", "removed", "unchanged", "busy", "error")

    run: str | None
    files: tuple[FileOutcome, ...]

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read a rollback answer."""
        return cls(
            fields.run_id_or_none("run"),
            tuple(FileOutcome.read(f, cls.STATUSES) for f in fields.objects("files")),
        )


@dataclass(frozen=True)
class ApplyRequest(AgentRequest[ApplyReply]):
    """Write files, each compared-and-swapped, backed up, verified and recorded in its history
    under ``run`` (the controller's run; empty: the agent makes one for this request)."""

    if_running: str
    appdata_roots: tuple[str, ...]
    files: tuple[ApplyFile, ...]
    run: str = ""

    def body(self) -> dict[str, object]:
        """The request's fields on the wire."""
        return {
            "if_running": self.if_running,
            "run": self.run,
            "appdata_roots": list(self.appdata_roots),
            "files": [item.body() for item in self.files],
        }


@dataclass(frozen=True)
class RollbackRequest(AgentRequest[RollbackReply]):
    """Undo the last run that wrote any of these files: what it created goes, what it replaced
    gets its newest backup back, the others are left as they are."""

    if_running: str
    appdata_roots: tuple[str, ...]
    files: tuple[RollbackFile, ...]

    def body(self) -> dict[str, object]:
        """The request's fields on the wire."""
        return {
            "if_running": self.if_running,
            "appdata_roots": list(self.appdata_roots),
            "files": [item.body() for item in self.files],
        }
