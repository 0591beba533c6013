"""The recorded history as tables with a header: ``runs list`` and ``audit``.

Plain text, columns two spaces apart and never cut, so that a line can be searched with
``grep`` and a long message only lengthens its own line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from provisioner.records.state import AuditRecord, RunSummary

RUN_COLUMNS = ("run", "started", "by", "command", "inventory", "workstations", "ended")
AUDIT_COLUMNS = (
    "time",
    "by",
    "action",
    "workstation",
    "user",
    "status",
    "fingerprint before -> after",
    "run",
    "file",
    "message",
)


def aligned(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The header and the rows, each column as wide as its widest cell (the last unpadded)."""
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _fingerprint(value: str | None) -> str:
    return value[:12] if value else "-"


def run_lines(summaries: Sequence[RunSummary]) -> list[str]:
    """``runs list``: one line per run under a header; nothing when no run is recorded."""
    from provisioner.records import revision

    if not summaries:
        return []
    rows = []
    for run in summaries:
        counts = ", ".join(f"{n} {s.value}" for s, n in run.counts.items() if n) or "none"
        if run.running:
            ended = "running"
        elif run.stopped:
            ended = f"stopped: {run.stopped}"
        else:
            ended = "finished"
        rows.append(
            [
                run.id,
                _when(run.started),
                f"{run.user}@{run.controller}",
                run.command + (" --check" if run.dry_run else "") or "-",
                revision.short(run.revision) if run.revision else "-",
                counts,
                ended,
            ]
        )
    return aligned(RUN_COLUMNS, rows)


def audit_lines(records: Sequence[AuditRecord]) -> list[str]:
    """``audit``: one line per record under a header; nothing when no record matches."""
    if not records:
        return []
    rows = [
        [
            _when(record.time),
            f"{record.who}@{record.controller}",
            record.action,
            record.workstation or "-",
            record.user or "-",
            record.status,
            f"{_fingerprint(record.sha256_before)} -> {_fingerprint(record.sha256_after)}"
            if record.sha256_before or record.sha256_after
            else "-",
            record.run_id or "-",
            record.file or "-",
            record.message or "-",
        ]
        for record in records
    ]
    return aligned(AUDIT_COLUMNS, rows)
