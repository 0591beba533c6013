"""The final summary of a run says what to do next about the workstations that need it."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime

from rich.console import Console

from provisioner.cli.progress import next_steps, print_summary
from provisioner.records.results import HostResult, Status
from provisioner.rollout.runner import RolloutOptions, RunResult


def _summary(run: RunResult) -> str:
    buffer = io.StringIO()
    print_summary(Console(file=buffer, width=200, color_system=None), run, {}, diffs=False)
    return buffer.getvalue()


def _run(*results: HostResult, check: bool = False) -> RunResult:
    run = RunResult("abc123def456", datetime.now(UTC), RolloutOptions(check=check))
    run.results = {r.host: r for r in results}
    return run


def test_next_steps_name_the_run_a_failed_host_and_each_kind_of_trouble() -> None:
    run = _run(
        HostResult("ws1", Status.CHANGED, "1 changed"),
        HostResult("ws3", Status.FAILED, "connection refused"),
        HostResult("ws2", Status.FAILED, "timed out"),
        HostResult("ws4", Status.BUSY, "alice runs MicroSIP"),
    )
    lines = _summary(run).splitlines()
    steps = lines[lines.index("Next:") :]
    assert steps == [
        "Next:",
        "  retry exactly these: provisioner rollout --only-failed abc123def456 (with the same "
        "-i, keys and --lab)",
        "  diagnose a failed one: provisioner doctor ws2 -i INVENTORY",
        "  busy: the user's MicroSIP was running; retry later, or add --if-running stop to "
        "close it first",
    ]
    helpdesk = next_steps(run, [run.results["ws3"]], "provisioner user regenerate alice")
    assert helpdesk[1] == (
        "  retry exactly these: provisioner user regenerate alice (with the same -i, keys and "
        "--lab)"
    )
    conflict = _run(HostResult("ws1", Status.CONFLICT, "changed while written"))
    assert "  conflict: the file changed on the workstation" in _summary(conflict)
    assert "doctor" not in _summary(conflict)


def test_no_next_steps_when_all_went_well_or_nothing_was_written() -> None:
    assert "Next:" not in _summary(_run(HostResult("ws1", Status.UNCHANGED)))
    failed = HostResult("ws1", Status.FAILED, "refused", dry_run=True)
    assert "Next:" not in _summary(_run(failed, check=True))
    assert "Next:" in _summary(_run(replace(failed, dry_run=False)))
