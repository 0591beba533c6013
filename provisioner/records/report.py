"""Run files of a rollout: a JSON document, a JUnit XML file, and the exit code.

Pure functions over a finished run. They take any object shaped like
:class:`~provisioner.rollout.runner.RunResult` (see :class:`RunLike`), so this module does not
depend on the runner. Nothing here ever includes a diff: diffs may show settings, and a
run file ends up in CI artefacts that many people can read. For the same reason files are
named by fingerprints (:mod:`provisioner.records.fingerprint`), never by their SHA-256, and run
files are written readable by their owner only.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from provisioner.atomicfile import write_atomic
from provisioner.microsip.version import version_order
from provisioner.records.fingerprint import Fingerprints
from provisioner.records.results import (
    FileChange,
    HostResult,
    RunLike,
    Status,
    is_dry_run,
    iso_utc,
    jsonable,
)

# 2: old_sha256 and new_sha256 hold fingerprints, no longer the files' SHA-256.
REPORT_VERSION = 2
EXIT_OK = 0
EXIT_HOSTS_FAILED = 3
EXIT_DRIFT = 4
RETRY_STATUSES = (Status.FAILED, Status.CONFLICT, Status.BUSY, Status.SKIPPED)
CONNECTION_CASE = "connection"
FILE_MODE = 0o600

# XML 1.0 forbids these; a remote error message could carry one and break every CI parser.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def counts(run: RunLike) -> dict[Status, int]:
    """Workstations per status, every status present."""
    found = dict.fromkeys(Status, 0)
    for result in run.results.values():
        found[result.status] += 1
    return found


def hosts_to_retry(run: RunLike) -> list[str]:
    """Workstations that failed, conflicted, were busy or skipped, sorted."""
    return sorted(h for h, r in run.results.items() if r.status in RETRY_STATUSES)


def exit_code(run: RunLike, *, detailed: bool = False) -> int:
    """The process exit code for a finished run.

    * 0: every workstation ended changed or unchanged (in a dry run: would change, or
      is up to date); also for a run with no workstation.
    * 3: at least one workstation failed, ended in conflict, was busy (MicroSIP running)
      or was skipped (threshold exceeded, interrupted).
    * 4, only when ``detailed`` (``--check --detailed-exitcode``): none of the above, but at
      least one workstation is not up to date (drift).

    Input and configuration errors (exit 1) stop the command before any run exists.
    """
    if not all(r.ok for r in run.results.values()):
        return EXIT_HOSTS_FAILED
    if detailed and any(r.status is Status.CHANGED for r in run.results.values()):
        return EXIT_DRIFT
    return EXIT_OK


def _duration(run: RunLike) -> float | None:
    if run.finished is None:
        return None
    return round((run.finished - run.started).total_seconds(), 3)


def _batches(run: RunLike) -> dict[str, int]:
    batches = getattr(run, "batches", None)
    index: dict[str, int] = {}
    if isinstance(batches, Sequence):
        for number, batch in enumerate(batches, start=1):
            for host in batch:
                index[str(host)] = number
    return index


def _file_json(change: FileChange, fingerprints: Fingerprints) -> dict[str, Any]:
    return {
        "kind": change.kind,
        "user": change.user,
        "path": change.path,
        "name": change.label,
        "status": change.status.value,
        "message": change.message,
        "old_sha256": fingerprints.of(change.old_sha256),
        "new_sha256": fingerprints.of(change.new_sha256),
        "conflicts": list(change.conflicts),
    }


def run_json(run: RunLike, *, fingerprints: Fingerprints, revision: str = "") -> dict[str, Any]:
    """The run as JSON data: options, counts and every workstation with its files.

    File entries carry fingerprints, statuses and messages, never the diff text nor a
    SHA-256. ``revision``: the inventory's git commit (``+dirty`` when its files differed),
    ``""`` when unknown.
    """
    batch_of = _batches(run)
    hosts = []
    for name in sorted(run.results):
        result = run.results[name]
        hosts.append(
            {
                "workstation": name,
                "status": result.status.value,
                "message": result.message,
                "attempts": result.attempts,
                "duration": round(result.duration, 3),
                "retryable": result.retryable,
                "dry_run": result.dry_run,
                "batch": batch_of.get(name),
                "warnings": list(result.warnings),
                "microsip_versions": list(result.microsip_versions),
                "microsip_outdated": result.microsip_outdated,
                "files": [_file_json(change, fingerprints) for change in result.files],
            }
        )
    return {
        "report_version": REPORT_VERSION,
        "run_id": run.run_id,
        "started": iso_utc(run.started),
        "finished": iso_utc(run.finished),
        "duration": _duration(run),
        "dry_run": is_dry_run(run),
        "options": jsonable(run.options),
        "revision": revision,
        "stopped": run.stopped,
        "ok": exit_code(run) == EXIT_OK,
        "exit_code": exit_code(run),
        "counts": {status.value: n for status, n in counts(run).items()},
        "retry": hosts_to_retry(run),
        "microsip_versions": fleet_versions(run),
        "microsip_outdated": sorted(h for h, r in run.results.items() if r.microsip_outdated),
        "hosts": hosts,
    }


def fleet_versions(run: RunLike) -> dict[str, int]:
    """How many workstations run each MicroSIP version, oldest first, ``unreadable`` last;
    workstations never inspected are left out."""
    found: dict[str, int] = {}
    for result in run.results.values():
        for version in result.microsip_versions:
            found[version] = found.get(version, 0) + 1
    return {version: found[version] for version in sorted(found, key=version_order)}


def write_run_json(
    run: RunLike, path: Path, *, fingerprints: Fingerprints, revision: str = ""
) -> None:
    """Write :func:`run_json` to ``path`` atomically, readable by its owner only."""
    data = run_json(run, fingerprints=fingerprints, revision=revision)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    _write(path, text.encode("utf-8"))


def _clean(text: str) -> str:
    return _XML_INVALID.sub("\ufffd", text)


def _one_line(text: str) -> str:
    return " ".join(_clean(text).split())


def _attr(value: object) -> str:
    return quoteattr(_clean(str(value)))


@dataclasses.dataclass
class _Case:
    classname: str
    name: str
    time: float
    status: Status
    reason: str
    details: list[str]
    output: list[str]


def _file_details(change: FileChange, result: HostResult, fingerprints: Fingerprints) -> list[str]:
    lines = [f"status: {change.status.value}", f"path: {change.path}"]
    if change.message:
        lines.append(f"reason: {change.message}")
    if change.conflicts:
        lines.append("conflicting keys: " + ", ".join(change.conflicts))
    old, new = fingerprints.of(change.old_sha256), fingerprints.of(change.new_sha256)
    if old and old == new:
        lines.append(f"fingerprint: {old}")
    elif old or new:
        lines.append(f"fingerprint: {old or '-'} -> {new or '-'}")
    if result.message and result.message != change.message:
        lines.append(f"workstation: {result.message}")
    lines.append(f"attempts: {result.attempts}")
    return lines


def _host_details(result: HostResult) -> list[str]:
    lines = [f"status: {result.status.value}"]
    if result.message:
        lines.append(f"reason: {result.message}")
    lines.append(f"attempts: {result.attempts}")
    if result.retryable:
        lines.append("retryable: yes (connection or timeout)")
    return lines


def _default_reason(status: Status, dry_run: bool) -> str:
    if status == Status.CHANGED:
        return "would change" if dry_run else "changed"
    if status == Status.BUSY:
        return "MicroSIP was running; nothing written"
    return status.value


def _cases(run: RunLike, fingerprints: Fingerprints) -> list[_Case]:
    cases: list[_Case] = []
    for host in sorted(run.results):
        result = run.results[host]
        output = [f"warning: {w}" for w in result.warnings]
        worst_file = max((c.status for c in result.files), key=lambda s: s.rank, default=None)
        # A host worse than all its files failed outside them (unreachable, auth, agent).
        host_case = worst_file is None or result.status.rank > worst_file.rank
        share = len(result.files) + (1 if host_case else 0)
        time = result.duration / share
        if host_case:
            reason = result.message or _default_reason(result.status, result.dry_run)
            cases.append(
                _Case(
                    host,
                    CONNECTION_CASE,
                    time,
                    result.status,
                    reason,
                    _host_details(result),
                    output,
                )
            )
        for change in result.files:
            reason = change.message or _default_reason(change.status, result.dry_run)
            cases.append(
                _Case(
                    host,
                    change.label,
                    time,
                    change.status,
                    reason,
                    _file_details(change, result, fingerprints),
                    output,
                )
            )
    return cases


def run_junit(run: RunLike, *, fingerprints: Fingerprints) -> str:
    """The run as JUnit XML: one test case per workstation and file.

    ``classname`` is the workstation, ``name`` is ``user/microsip.ini`` or ``override.ini``.
    A workstation that failed outside its files (unreachable, credentials, agent error,
    skipped before it started) gets one case named ``connection``. Failed and conflict
    cases carry ``<failure>`` with the one-line reason; busy and skipped ones ``<skipped>``
    with why. A case's time is its workstation's time shared among its cases, since one
    round trip handles all files of a workstation.
    """
    cases = _cases(run, fingerprints)
    failures = sum(1 for c in cases if c.status in (Status.FAILED, Status.CONFLICT))
    skipped = sum(1 for c in cases if c.status in (Status.BUSY, Status.SKIPPED))
    duration = _duration(run)
    if duration is None:
        duration = round(sum(r.duration for r in run.results.values()), 3)
    suite = "provisioner " + ("check" if is_dry_run(run) else "rollout")
    started = run.started if run.started.tzinfo else run.started.replace(tzinfo=UTC)
    # The JUnit schema wants a timestamp without a zone; it is UTC.
    stamp = started.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    totals = (
        f'tests="{len(cases)}" failures="{failures}" errors="0" skipped="{skipped}" '
        f'time="{duration:.3f}"'
    )
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f"<testsuites name={_attr(suite)} {totals}>",
        f"  <testsuite name={_attr(suite + ' ' + run.run_id)} id={_attr(run.run_id)} "
        f'{totals} timestamp="{stamp}">',
        "    <properties>",
    ]
    properties = {
        "run_id": run.run_id,
        "started": iso_utc(run.started),
        "finished": iso_utc(run.finished) or "",
        "dry_run": "true" if is_dry_run(run) else "false",
        "stopped": run.stopped,
        "exit_code": str(exit_code(run)),
    }
    for key, value in properties.items():
        lines.append(f"      <property name={_attr(key)} value={_attr(value)}/>")
    lines.append("    </properties>")
    for case in cases:
        head = (
            f"    <testcase classname={_attr(case.classname)} name={_attr(case.name)} "
            f'time="{case.time:.3f}"'
        )
        body: list[str] = []
        if case.status in (Status.FAILED, Status.CONFLICT):
            text = escape(_clean("\n".join(case.details)))
            body.append(
                f"      <failure message={_attr(_one_line(case.reason))} "
                f"type={_attr(case.status.value)}>{text}</failure>"
            )
        elif case.status in (Status.BUSY, Status.SKIPPED):
            body.append(f"      <skipped message={_attr(_one_line(case.reason))}/>")
        else:
            out = [_one_line(case.reason), *case.details[1:]]
            body.append(f"      <system-out>{escape(_clean(chr(10).join(out)))}</system-out>")
        if case.output:
            body.append(
                f"      <system-err>{escape(_clean(chr(10).join(case.output)))}</system-err>"
            )
        lines += [head + ">", *body, "    </testcase>"]
    lines += ["  </testsuite>", "</testsuites>"]
    return "\n".join(lines) + "\n"


def write_run_junit(run: RunLike, path: Path, *, fingerprints: Fingerprints) -> None:
    """Write :func:`run_junit` to ``path`` atomically, readable by its owner only."""
    _write(path, run_junit(run, fingerprints=fingerprints).encode("utf-8"))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run file written earlier with a looser mode is tightened too.
    write_atomic(path, data, mode=FILE_MODE, force_mode=True)
