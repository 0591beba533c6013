"""Phase 2 for one workstation: inspect, merge, plan, apply. ``push_host`` never raises.

An unchanged workstation costs one agent command (inspect); a changed one two (inspect and
apply). Dry runs go through :class:`~provisioner.transport.base.ReadOnlyTransport`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from provisioner.errors import OptionError, ProvisionerError, RemoteError, TransportError
from provisioner.inventory.resolve import StationPlan
from provisioner.microsip import ini
from provisioner.microsip.inidoc import IniDocument
from provisioner.microsip.keytable import load_key_table
from provisioner.microsip.version import parse_version, version_order
from provisioner.records.results import (
    IF_RUNNING,
    UNRECORDED,
    FileChange,
    HostResult,
    Status,
)
from provisioner.render.build import BuiltFile
from provisioner.rollout import plan
from provisioner.transport.agent.messages import (
    AgentError,
    ApplyFile,
    ApplyReply,
    ApplyRequest,
    FileOutcome,
    InspectReply,
    InspectRequest,
    InstallWanted,
    OverrideState,
    RollbackFile,
    RollbackRequest,
    UserState,
    UserWanted,
)
from provisioner.transport.base import Transport

RETRYABLE_CODES = frozenset({"locked"})
"""Agent error codes that a later attempt may not meet: another program held a file or the
user's registry hive for a moment."""

READ_ONLY_MESSAGE = (
    "read-only: the file has the read-only attribute (set to keep it from changing?); clear it "
    "to let the push write; nothing written"
)
FORCE_WARNING = (
    "MicroSIP was running: it rewrites every [Settings] key from memory when it exits, so "
    "some new settings may be lost until the next push"
)


@dataclass(frozen=True)
class PushOptions:
    """How to push: running-MicroSIP policy, helpdesk reset, which users, and the run the
    writes belong to (each workstation records it with them: a rollback undoes a run)."""

    if_running: str = "skip"
    reset: bool = False
    users: tuple[str, ...] = ()
    run: str = field(default="", metadata=UNRECORDED)


@dataclass
class _Planned:
    built: BuiltFile
    path: str
    sid: str | None
    expect: str | None
    data: bytes = field(repr=False)
    applied: bytes = field(repr=False)
    status: Status
    message: str = ""
    diff: str = ""
    conflicts: tuple[str, ...] = ()
    running: bool = False
    retryable: bool = False
    extra: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def push_host(
    station: StationPlan,
    files: Sequence[BuiltFile],
    transport: Transport,
    options: PushOptions = PushOptions(),
    *,
    dry_run: bool = False,
) -> HostResult:
    """Bring one workstation's MicroSIP files to the rendered state. Never raises."""
    result = _on_host(station, transport, lambda: _push(station, files, transport, options))
    result.dry_run = dry_run
    return result


def _on_host(
    station: StationPlan, transport: Transport, work: Callable[[], HostResult]
) -> HostResult:
    """``work()`` on one workstation, timed; its errors become a failed result, and the
    transport is closed whatever happens."""
    start = time.monotonic()
    name = station.workstation.name
    try:
        result = work()
    except TransportError as exc:
        result = HostResult(name, Status.FAILED, str(exc), retryable=exc.retryable)
    except ProvisionerError as exc:
        result = HostResult(name, Status.FAILED, str(exc))
    finally:
        transport.close()
    result.duration = time.monotonic() - start
    return result


def _push(
    station: StationPlan,
    files: Sequence[BuiltFile],
    transport: Transport,
    options: PushOptions,
) -> HostResult:
    name = station.workstation.name
    if options.if_running not in IF_RUNNING:
        raise OptionError(f"--if-running must be one of {', '.join(IF_RUNNING)}")
    wanted = [
        f
        for f in files
        if f.target.kind == "override" or not options.users or f.target.user in options.users
    ]
    roots = station.install.appdata_roots
    answer = transport.request(inspect_request(station, wanted))
    planned = _plan(station, wanted, answer, options)
    if isinstance(planned, HostResult):
        return with_versions(planned, answer, station)
    to_write = [p for p in planned if p.status == Status.CHANGED]
    if to_write:
        reply = transport.request(_apply_request(to_write, options, roots))
        conflicts = _absorb_apply(to_write, reply)
        if conflicts:
            # The file moved between inspect and apply: look again, once.
            answer = transport.request(inspect_request(station, wanted))
            replanned = _plan(station, wanted, answer, options)
            if isinstance(replanned, HostResult):
                return with_versions(replanned, answer, station)
            retry = [p for p in replanned if p.status == Status.CHANGED and p.path in conflicts]
            if retry:
                reply = transport.request(_apply_request(retry, options, roots))
                for still in _absorb_apply(retry, reply):
                    for p in retry:
                        if p.path == still:
                            p.status = Status.CONFLICT
                            p.message = "the file changed while it was being written, twice"
            # What the second look found wins: a file already as wanted is no conflict.
            by_path = {p.path: p for p in replanned if p.path in conflicts}
            planned = [by_path.get(p.path, p) for p in planned]
    changes = [_change(p) for p in planned]
    worst = max((c.status for c in changes), key=lambda s: s.rank, default=Status.UNCHANGED)
    warnings = sorted({w for p in planned for w in p.extra})
    message = _summary(changes)
    failed = [p for p in planned if p.status == Status.FAILED]
    retryable = bool(failed) and all(p.retryable for p in failed)
    result = HostResult(name, worst, message, changes, retryable=retryable, warnings=warnings)
    return with_versions(result, answer, station)


def microsip_versions(answer: InspectReply) -> list[str]:
    """The file versions of the MicroSIP exes an inspect found: the machine-wide one, or each
    user's own for a per-user install (each parsed, or ``unreadable``), distinct and sorted."""
    found = {answer.install.version} | {user.exe_version for user in answer.users}
    return sorted((v for v in found if v is not None), key=version_order)


def below_minimum(versions: Sequence[str], minimum: str | None) -> str | None:
    """A warning when a version found is older than ``microsip.min_version`` or unreadable
    (None when all are recent enough, or no minimum is set)."""
    wanted = parse_version(minimum)
    if wanted is None:
        return None
    old = [v for v in versions if (parsed := parse_version(v)) is not None and parsed.below(wanted)]
    if old:
        return f"MicroSIP {', '.join(old)} is below microsip.min_version {wanted}: update it"
    if any(parse_version(v) is None for v in versions):
        return f"MicroSIP's version is unreadable: microsip.min_version {wanted} cannot be checked"
    return None


def with_versions(result: HostResult, answer: InspectReply, station: StationPlan) -> HostResult:
    """``result`` with the MicroSIP versions ``answer`` found, and a warning below the minimum."""
    result.microsip_versions = microsip_versions(answer)
    warning = below_minimum(result.microsip_versions, station.install.min_version)
    if warning is not None:
        result.microsip_outdated = True
        result.warnings = sorted({*result.warnings, warning})
    return result


def inspect_request(station: StationPlan, files: Sequence[BuiltFile]) -> InspectRequest:
    """What to inspect for these files: their users, and ``override.ini`` if among them."""
    install = station.install
    return InspectRequest(
        install=InstallWanted(install.mode, install.install_dir, install.exe),
        users=tuple(
            UserWanted(built.target.user, built.windows)
            for built in files
            if built.target.kind == "microsip" and built.target.user is not None
        ),
        appdata_roots=install.appdata_roots,
        override=any(f.target.kind == "override" for f in files),
    )


def _plan(
    station: StationPlan,
    files: Sequence[BuiltFile],
    answer: InspectReply,
    options: PushOptions,
) -> list[_Planned] | HostResult:
    name = station.workstation.name
    if not answer.install.found:
        return HostResult(
            name,
            Status.FAILED,
            f"MicroSIP is not installed in {station.install.install_dir} (nor found by registry "
            "or MSI); install it or fix microsip.install_dir",
        )
    override_built = next((f for f in files if f.target.kind == "override"), None)
    enforced = override_built.document if override_built is not None else None
    users = {u.name: u for u in answer.users}
    table = load_key_table()
    planned: list[_Planned] = []
    for built in files:
        if built.target.kind == "override":
            if answer.override is None:
                raise RemoteError("the agent did not report override.ini")
            planned.append(_plan_override(built, answer.override, options))
            continue
        item = users.get(str(built.target.user))
        if item is None:
            raise RemoteError(f"the agent did not report user {built.target.user}")
        planned.append(
            _plan_microsip(
                built, item, enforced, options, table.runtime_keys(), table.runtime_sections()
            )
        )
    return planned


def _error_text(error: AgentError | None, code: str = "error") -> str:
    """``code: message`` of an agent error (``code`` alone when there is none)."""
    if error is None:
        return f"{code}:"
    return f"{error.code}: {error.message}".strip()


def _failed(built: BuiltFile, path: str, error: AgentError | None) -> _Planned:
    """A file the agent could not even look at: its error code and message."""
    failed = _Planned(built, path, None, None, b"", b"", Status.FAILED, _error_text(error))
    failed.retryable = error is not None and error.code in RETRYABLE_CODES
    return failed


def _plan_override(built: BuiltFile, item: OverrideState, options: PushOptions) -> _Planned:
    path = item.path or built.relative_path
    if item.per_user:
        # MicroSIP installed per user has no machine-wide folder; the enforced keys still reach
        # every user's file through the merge.
        step = _Planned(built, path, None, None, b"", b"", Status.UNCHANGED)
        step.message = "per-user install: no machine-wide override.ini"
        return step
    if item.file is None:
        return _failed(built, path, item.error)
    theirs = item.file.content
    step = _Planned(built, path, None, item.file.sha256, built.data, built.data, Status.UNCHANGED)
    if theirs == built.data and not options.reset:
        return step
    step.status = Status.CHANGED
    old_text = ini.decode_ini_bytes(theirs) if theirs is not None else None
    step.diff = plan.masked_diff(old_text, ini.decode_ini_bytes(built.data), step.built.target.name)
    if item.file.read_only:
        step.status = Status.FAILED
        step.message = READ_ONLY_MESSAGE
    return step


def _plan_microsip(
    built: BuiltFile,
    item: UserState,
    enforced: IniDocument | None,
    options: PushOptions,
    runtime_keys: frozenset[tuple[str, str]],
    runtime_sections: frozenset[str],
) -> _Planned:
    path = item.path or ""
    file = item.file
    if file is None:
        return _failed(built, path, item.error)
    theirs_bytes = file.content
    base_bytes = file.applied.content
    theirs = ini.parse_ini(ini.decode_ini_bytes(theirs_bytes)) if theirs_bytes else None
    base = ini.parse_ini(ini.decode_ini_bytes(base_bytes)) if base_bytes else None
    ours = built.document
    if options.reset:
        merged_doc = ini.reset_ini(ours, enforced)
        changed = True
        conflicts: tuple[str, ...] = ()
    else:
        ours_kept = plan.keep_unchanged_passwords(ours, base, theirs)
        merged = ini.merge_ini(
            base=base,
            ours=ours_kept,
            theirs=theirs,
            enforced=enforced,
            runtime_keys=runtime_keys,
            runtime_sections=runtime_sections,
        )
        merged_doc = merged.document
        changed = theirs is None or bool(merged.changed_keys)
        conflicts = tuple(f"[{c.section}] {c.key}" for c in merged.conflicts)
    text = ini.serialize_ini(merged_doc)
    data = ini.encode_ini(text)
    applied_bytes = ini.encode_ini(ini.serialize_ini(plan.redact(ours)))
    step = _Planned(
        built,
        path,
        item.sid,
        file.sha256,
        data,
        applied_bytes,
        Status.CHANGED if changed else Status.UNCHANGED,
        conflicts=conflicts,
        running=item.running,
    )
    if not changed:
        return step
    old_text = ini.serialize_ini(theirs) if theirs is not None else None
    lines = [plan.masked_diff(old_text, text, built.target.name)]
    lines += plan.password_changes(theirs, merged_doc)
    step.diff = "\n".join(line for line in lines if line)
    if file.read_only:
        step.status = Status.FAILED
        step.message = READ_ONLY_MESSAGE
        return step
    if step.running:
        if options.if_running == "skip":
            step.status = Status.BUSY
            step.message = (
                f"MicroSIP is running for {built.target.user}; nothing written "
                "(use --if-running stop to stop it first)"
            )
        elif options.if_running == "force":
            step.extra.append(FORCE_WARNING)
    return step


def _apply_request(
    steps: Sequence[_Planned], options: PushOptions, appdata_roots: tuple[str, ...]
) -> ApplyRequest:
    return ApplyRequest(
        if_running=options.if_running,
        run=options.run,
        appdata_roots=appdata_roots,
        files=tuple(
            ApplyFile(
                kind=s.built.target.kind,
                user=s.built.target.user,
                sid=s.sid,
                path=s.path,
                expect_sha256=s.expect,
                content=s.data,
                sha256=s.sha256,
                applied=s.applied,
                process=s.built.install.exe if s.built.target.kind == "microsip" else None,
            )
            for s in steps
        ),
    )


def _absorb_apply(steps: Sequence[_Planned], reply: ApplyReply) -> set[str]:
    """Record the agent's per-file statuses; return the paths that hit a conflict."""
    results = {r.path: r for r in reply.files}
    conflicts: set[str] = set()
    for step in steps:
        item = results.get(step.path)
        if item is None:
            step.status = Status.FAILED
            step.message = "the agent did not report this file"
            continue
        status = item.status
        error = item.error
        if status == "written":
            if item.stopped:
                # In the result and so in the audit record, with who ran the push.
                step.message = f"MicroSIP was closed ({item.stopped} process(es)) to write"
                step.extra.append(f"closed MicroSIP of {step.built.target.user} to write its file")
            continue
        if status == "conflict":
            conflicts.add(step.path)
            step.status = Status.CONFLICT
            step.message = "the file changed between inspect and apply"
        elif status == "busy":
            step.status = Status.BUSY
            step.message = f"MicroSIP is running for {step.built.target.user}; nothing written"
        else:
            step.status = Status.FAILED
            step.message = _error_text(error)
            step.retryable = error is not None and error.code in RETRYABLE_CODES
    return conflicts


def _change(step: _Planned) -> FileChange:
    return FileChange(
        kind=step.built.target.kind,
        user=step.built.target.user,
        path=step.path,
        status=step.status,
        message=step.message,
        old_sha256=step.expect,
        new_sha256=step.sha256 if step.status == Status.CHANGED else step.expect,
        diff=step.diff if step.status in (Status.CHANGED, Status.BUSY) else "",
        conflicts=step.conflicts,
    )


def _summary(changes: Sequence[FileChange]) -> str:
    parts = []
    for status in Status:
        count = sum(1 for c in changes if c.status == status)
        if count:
            parts.append(f"{count} {status.value}")
    failures = [
        f"{c.label}: {c.message}" for c in changes if c.message and c.status != Status.CHANGED
    ]
    return ", ".join(parts) + (f" ({'; '.join(failures)})" if failures else "")


_NOT_FOUND = AgentError("not-found", "inspect found no such file")


def _unreachable(built: BuiltFile, item: OverrideState | UserState | None) -> FileChange:
    return FileChange(
        kind=built.target.kind,
        user=built.target.user,
        path=(item.path if item is not None else None) or built.relative_path,
        status=Status.FAILED,
        message=_error_text((item.error if item is not None else None) or _NOT_FOUND),
    )


def rollback_host(
    station: StationPlan,
    files: Sequence[BuiltFile],
    transport: Transport,
    options: PushOptions = PushOptions(),
) -> HostResult:
    """Undo the last run that changed any of the selected files. Never raises."""
    return _on_host(station, transport, lambda: _rollback(station, files, transport, options))


def _rollback(
    station: StationPlan, files: Sequence[BuiltFile], transport: Transport, options: PushOptions
) -> HostResult:
    wanted = [
        f
        for f in files
        if f.target.kind == "microsip" and (not options.users or f.target.user in options.users)
    ]
    if not options.users:
        wanted += [f for f in files if f.target.kind == "override"]
    answer = transport.request(inspect_request(station, wanted))
    users = {u.name: u for u in answer.users}
    items: list[RollbackFile] = []
    # A file inspect could not look at is a failure of the rollback, never a silent skip.
    unreachable: list[FileChange] = []
    for built in wanted:
        if built.target.kind == "override":
            override = answer.override
            if override is not None and override.per_user:
                continue  # no machine-wide override.ini: a per-user install
            if override is None or override.error or not override.path:
                unreachable.append(_unreachable(built, override))
                continue
            items.append(RollbackFile("override", None, None, override.path, None))
            continue
        user = users.get(str(built.target.user))
        if user is None or user.error or not user.path:
            unreachable.append(_unreachable(built, user))
            continue
        items.append(
            RollbackFile("microsip", built.target.user, user.sid, user.path, built.install.exe)
        )
    reply = transport.request(
        RollbackRequest(options.if_running, station.install.appdata_roots, tuple(items))
    )
    changes = list(unreachable)
    for item, outcome in zip(items, reply.files, strict=False):
        status = _ROLLBACK_STATUS.get(outcome.status, Status.FAILED)
        changes.append(
            FileChange(
                kind=item.kind,
                user=item.user,
                path=item.path,
                status=status,
                message=_rollback_message(outcome, reply.run),
                old_sha256=outcome.old_sha256,
                new_sha256=outcome.new_sha256,
            )
        )
    worst = max((c.status for c in changes), key=lambda s: s.rank, default=Status.UNCHANGED)
    return HostResult(station.workstation.name, worst, _summary(changes), changes)


_ROLLBACK_STATUS = {
    "restored": Status.CHANGED,
    "removed": Status.CHANGED,
    "unchanged": Status.UNCHANGED,
    "busy": Status.BUSY,
}


def _rollback_message(outcome: FileOutcome, run: str | None) -> str:
    undone = f"run {run}" if run else ""
    if outcome.status == "restored":
        return "restored the newest backup" + (f": what {undone} replaced" if undone else "")
    if outcome.status == "removed":
        return f"removed: {undone or 'the last push'} created it"
    if outcome.status == "unchanged":
        if undone:
            return f"not written by {undone}"
        return "nothing to undo"
    return _error_text(outcome.error, outcome.status)
