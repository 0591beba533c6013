"""Hand-built rollout results: one workstation per interesting outcome, for the reports and
the run records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from provisioner.records.fingerprint import Fingerprints
from provisioner.records.results import FileChange, HostResult, Status
from provisioner.rollout.push import PushOptions
from provisioner.rollout.runner import RolloutOptions, RunResult

CANARY = "Canary-Pa55word-7f3e9b"
STARTED = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
FP = Fingerprints(b"k" * 32)
THRESHOLD = "failure threshold exceeded after batch 2: 3 of 7 failed (more than 10%)"


def ini_change(user: str, status: Status, **kwargs: object) -> FileChange:
    """A change of ``user``'s microsip.ini."""
    path = f"C:\\Users\\{user}\\AppData\\Roaming\\MicroSIP\\microsip.ini"
    return FileChange("microsip", user, path, status, **kwargs)  # type: ignore[arg-type]


def override_change(status: Status, **kwargs: object) -> FileChange:
    """A change of the workstation's override.ini."""
    path = "C:\\Program Files\\MicroSIP\\override.ini"
    return FileChange("override", None, path, status, **kwargs)  # type: ignore[arg-type]


def make_run(*, run_id: str = "a1b2c3d4e5f6", started: datetime = STARTED) -> RunResult:
    """A hand-built rollout with one workstation per interesting outcome."""
    canary_diff = f"-password={CANARY}\n+password=***\n[Account1] password: changed"
    hosts = [
        HostResult(
            "ws-changed",
            Status.CHANGED,
            "1 unchanged, 1 changed",
            [
                ini_change(
                    "alice", Status.CHANGED, old_sha256=SHA_A, new_sha256=SHA_B, diff=canary_diff
                ),
                override_change(Status.UNCHANGED, old_sha256=SHA_C, new_sha256=SHA_C),
            ],
            duration=1.5,
        ),
        HostResult(
            "ws-unchanged",
            Status.UNCHANGED,
            "2 unchanged",
            [
                ini_change("bob", Status.UNCHANGED, old_sha256=SHA_A, new_sha256=SHA_A),
                override_change(Status.UNCHANGED, old_sha256=SHA_C, new_sha256=SHA_C),
            ],
            duration=0.4,
        ),
        HostResult(
            "ws-busy",
            Status.BUSY,
            "1 unchanged, 1 busy",
            [
                ini_change(
                    "carol",
                    Status.BUSY,
                    message="MicroSIP is running for carol; nothing written "
                    "(use --if-running stop to stop it first)",
                    old_sha256=SHA_A,
                    new_sha256=SHA_A,
                    diff=canary_diff,
                ),
                override_change(Status.UNCHANGED, old_sha256=SHA_C, new_sha256=SHA_C),
            ],
            duration=0.6,
        ),
        HostResult("ws-skipped", Status.SKIPPED, THRESHOLD, attempts=0),
        HostResult(
            "ws-down",
            Status.FAILED,
            "cannot connect to ws-down:5986: connection refused (after 3 attempts)",
            retryable=True,
            attempts=3,
            duration=6.0,
        ),
        HostResult(
            "ws-auth",
            Status.FAILED,
            "ws-auth: the credentials were rejected\n(check the account)",
            duration=0.2,
        ),
        HostResult(
            "ws-conflict",
            Status.CONFLICT,
            "1 changed, 1 conflict",
            [
                ini_change(
                    "dave",
                    Status.CONFLICT,
                    message="the file changed while it was being written, twice",
                    old_sha256=SHA_A,
                    new_sha256=SHA_A,
                    conflicts=("[Settings] ringtone",),
                ),
                override_change(
                    Status.CHANGED, old_sha256=SHA_B, new_sha256=SHA_C, diff=canary_diff
                ),
            ],
            duration=2.0,
            warnings=["MicroSIP was running: some settings may be lost"],
        ),
        HostResult(
            "ws-partial",
            Status.FAILED,
            "1 changed, 1 failed",
            [
                ini_change("erin", Status.FAILED, message="E_ACCESS: access denied"),
                ini_change(
                    "frank", Status.CHANGED, old_sha256=None, new_sha256=SHA_B, diff=canary_diff
                ),
            ],
            duration=1.0,
        ),
    ]
    options = RolloutOptions(canary="1", batch="50%", push=PushOptions(users=("alice",)))
    run = RunResult(run_id, started, options, {h.host: h for h in hosts})
    run.batches = [["ws-auth"], ["ws-busy", "ws-changed", "ws-conflict"], ["ws-down"]]
    run.finished = started + timedelta(seconds=12.5)
    run.stopped = THRESHOLD
    return run


def make_check_run() -> RunResult:
    """A dry run in which one workstation would change."""
    hosts = [
        HostResult(
            "ws1",
            Status.CHANGED,
            "1 changed",
            [ini_change("alice", Status.CHANGED, old_sha256=SHA_A, new_sha256=SHA_B, diff=CANARY)],
            duration=0.3,
            dry_run=True,
        ),
        HostResult(
            "ws2", Status.UNCHANGED, "", [ini_change("bob", Status.UNCHANGED)], dry_run=True
        ),
    ]
    run = RunResult("c0ffee000001", STARTED, RolloutOptions(check=True), {h.host: h for h in hosts})
    run.finished = STARTED + timedelta(seconds=1)
    return run
