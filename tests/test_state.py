"""The state directory: run history, the rollout lock, the audit log."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from provisioner.errors import ProvisionerError
from provisioner.records import state
from provisioner.records.results import FileChange, HostResult, Status
from provisioner.records.state import (
    AuditLog,
    AuditRecord,
    StateError,
    StateLockedError,
    StateStore,
    records_for_run,
)
from provisioner.rollout.runner import RolloutOptions, RunResult
from tests.labkit import run_cli
from tests.runkit import CANARY, FP, SHA_A, SHA_B, STARTED, make_check_run, make_run

REPO = Path(__file__).resolve().parent.parent
POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and signals")


def _simple_run(
    run_id: str,
    started: datetime,
    statuses: dict[str, Status],
    *,
    check: bool = False,
    users: dict[str, list[str]] | None = None,
) -> RunResult:
    results = {}
    for host, status in statuses.items():
        files = [
            FileChange(
                "microsip",
                user,
                f"C:\\Users\\{user}\\AppData\\Roaming\\MicroSIP\\microsip.ini",
                status,
                old_sha256=SHA_A,
                new_sha256=SHA_B if status == Status.CHANGED else SHA_A,
                diff=CANARY,
            )
            for user in (users or {}).get(host, [])
        ]
        results[host] = HostResult(host, status, f"{host} {status.value}", files, dry_run=check)
    run = RunResult(run_id, started, RolloutOptions(check=check), results)
    run.finished = started + timedelta(seconds=5)
    return run


# --------------------------------------------------------------------------- store


@POSIX_ONLY
def test_state_directory_and_database_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "state"
    store = StateStore(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.schema_version() == state.SCHEMA_VERSION == 3
    assert not (directory / "fingerprint.key").exists()  # made when first needed
    assert store.fingerprints.of(SHA_A)
    assert stat.S_IMODE((directory / "fingerprint.key").stat().st_mode) == 0o600
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "runs", "results", "files"} <= tables


def test_record_and_read_back_a_run(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    run = make_run()
    store.record_run(run, who="admin1", command="provisioner rollout --canary 1 --batch 50%")
    [summary] = store.runs()
    assert summary.id == "a1b2c3d4e5f6"
    assert summary.started == STARTED
    assert summary.finished == STARTED + timedelta(seconds=12.5)
    assert summary.user == "admin1"
    assert summary.controller == state.controller_name()
    assert summary.command == "provisioner rollout --canary 1 --batch 50%"
    assert summary.dry_run is False
    assert summary.stopped == run.stopped
    assert summary.counts == run.counts()
    assert summary.total == 8 and not summary.ok
    assert summary.options["batch"] == "50%"
    assert summary.options["push"]["users"] == ["alice"]
    assert store.latest_run() == summary

    detail = store.run("a1b2c3d4e5f6")
    assert detail.summary == summary
    by_host = {r.workstation: r for r in detail.results}
    assert sorted(by_host) == sorted(run.results)
    down = by_host["ws-down"]
    assert (down.status, down.attempts, down.retryable, down.duration) == (
        Status.FAILED,
        3,
        True,
        6.0,
    )
    assert down.message == run.results["ws-down"].message
    assert down.files == ()
    conflict = by_host["ws-conflict"]
    assert conflict.warnings == ("MicroSIP was running: some settings may be lost",)
    dave = conflict.files[0]
    assert (dave.user, dave.kind, dave.status) == ("dave", "microsip", Status.CONFLICT)
    assert dave.conflicts == ("[Settings] ringtone",)
    assert dave.path.endswith("dave\\AppData\\Roaming\\MicroSIP\\microsip.ini")
    changed = by_host["ws-changed"].files
    fp = store.fingerprints.of
    assert [(f.user, f.old_sha256, f.new_sha256) for f in changed] == [
        ("alice", fp(SHA_A), fp(SHA_B)),
        (None, fp("c" * 64), fp("c" * 64)),
    ]
    assert detail.to_retry == [
        "ws-auth",
        "ws-busy",
        "ws-conflict",
        "ws-down",
        "ws-partial",
        "ws-skipped",
    ]


def test_recording_a_run_again_replaces_it(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    run = _simple_run("r1", STARTED, {"ws1": Status.SKIPPED, "ws2": Status.SKIPPED})
    store.record_run(run, who="a")
    run.results["ws1"] = HostResult("ws1", Status.CHANGED)
    store.record_run(run, who="a")
    assert len(store.runs()) == 1
    assert {r.workstation: r.status for r in store.run("r1").results} == {
        "ws1": Status.CHANGED,
        "ws2": Status.SKIPPED,
    }


def test_replacing_a_workstation_or_a_run_leaves_no_file_of_the_old_one(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    users = {"ws1": ["alice", "bob"], "ws2": ["carol"]}
    run = _simple_run("r1", STARTED, {"ws1": Status.SKIPPED, "ws2": Status.SKIPPED}, users=users)
    store.record_run(run, who="a")
    store.record_host("r1", _changed("ws1", "dave"))
    store.record_host("r1", _changed("ws1", "erin"))  # reported again: replaced
    [summary] = store.runs()
    assert {s: n for s, n in summary.counts.items() if n} == {
        Status.CHANGED: 1,
        Status.SKIPPED: 1,
    }
    by_host = {r.workstation: r for r in store.run("r1").results}
    assert [f.user for f in by_host["ws1"].files] == ["erin"]
    store.record_run(_simple_run("r1", STARTED, {"ws3": Status.CHANGED}), who="a")
    with sqlite3.connect(store.path) as db:
        files = db.execute("SELECT workstation, user FROM files").fetchall()
        results = db.execute("SELECT workstation FROM results").fetchall()
    db.close()
    assert (files, results) == ([], [("ws3",)])


def test_runs_are_listed_newest_first_with_a_limit(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for i in range(5):
        run = _simple_run(f"run{i}", STARTED + timedelta(hours=i), {"ws": Status.UNCHANGED})
        store.record_run(run, who="a")
    assert [r.id for r in store.runs()] == ["run4", "run3", "run2", "run1", "run0"]
    assert [r.id for r in store.runs(limit=2)] == ["run4", "run3"]
    assert len(store.runs(limit=None)) == 5


def test_run_accepts_a_unique_prefix(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_run(_simple_run("abc123000000", STARTED, {"ws": Status.CHANGED}), who="a")
    store.record_run(_simple_run("abc999000000", STARTED, {"ws": Status.CHANGED}), who="a")
    store.record_run(_simple_run("abc", STARTED, {"ws": Status.CHANGED}), who="a")
    assert store.run("abc1").summary.id == "abc123000000"
    assert store.run("abc9990").summary.id == "abc999000000"
    assert store.run(" abc123000000 ").summary.id == "abc123000000"
    # An exact id wins even when it is also a prefix of others.
    assert store.run("abc").summary.id == "abc"
    with pytest.raises(StateError, match="ambiguous: it matches"):
        store.run("ab")
    with pytest.raises(StateError, match="no run 'zzz'"):
        store.run("zzz")
    with pytest.raises(StateError, match="give a run id"):
        store.run("  ")
    # The prefix is data, not a pattern.
    with pytest.raises(StateError, match="no run"):
        store.run("a%")


def test_hosts_to_retry(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with pytest.raises(StateError, match="nothing to retry"):
        store.hosts_to_retry()
    first = {
        "ws1": Status.CHANGED,
        "ws2": Status.UNCHANGED,
        "ws3": Status.FAILED,
        "ws4": Status.CONFLICT,
        "ws5": Status.BUSY,
        "ws6": Status.SKIPPED,
    }
    store.record_run(_simple_run("first0000000", STARTED, first), who="a")
    assert store.hosts_to_retry() == ["ws3", "ws4", "ws5", "ws6"]
    # --only-failed: the retry covers exactly those; ws5 is still busy.
    retry = {
        "ws3": Status.CHANGED,
        "ws4": Status.CHANGED,
        "ws5": Status.BUSY,
        "ws6": Status.CHANGED,
    }
    store.record_run(_simple_run("second000000", STARTED + timedelta(hours=1), retry), who="a")
    assert store.hosts_to_retry() == ["ws5"]
    # A dry run afterwards does not change what is left to retry...
    check = {"ws5": Status.FAILED, "ws1": Status.CHANGED}
    later = STARTED + timedelta(hours=2)
    store.record_run(_simple_run("check0000000", later, check, check=True), who="a")
    assert store.latest_run() is not None and store.latest_run().id == "check0000000"  # type: ignore[union-attr]
    assert store.hosts_to_retry() == ["ws5"]
    # ...unless it is asked for by id.
    assert store.hosts_to_retry("check") == ["ws5"]
    assert store.hosts_to_retry("first") == ["ws3", "ws4", "ws5", "ws6"]
    # Neither a helpdesk action nor a one-workstation push or rollback hides the fleet run.
    for number, command in enumerate(("user regenerate alice", "push ws1", "rollback ws1")):
        when = STARTED + timedelta(hours=2, minutes=number + 1)
        one = _simple_run(f"one{number}00000000", when, {"ws1": Status.CHANGED})
        store.record_run(one, who="helpdesk", command=command)
    assert store.latest_run().command == "rollback ws1"  # type: ignore[union-attr]
    assert store.hosts_to_retry() == ["ws5"]
    store.record_run(
        _simple_run("third0000000", STARTED + timedelta(hours=3), {"ws5": Status.CHANGED}), who="a"
    )
    assert store.hosts_to_retry() == []


def test_last_results_per_workstation_and_user(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    users = {"ws1": ["alice", "bob"], "ws2": ["alice"]}
    t = STARTED
    store.record_run(
        _simple_run("r1", t, {"ws1": Status.CHANGED, "ws2": Status.CHANGED}, users=users),
        who="a",
    )
    # A helpdesk push for alice only, on ws1.
    store.record_run(
        _simple_run("r2", t + timedelta(hours=1), {"ws1": Status.BUSY}, users={"ws1": ["alice"]}),
        who="a",
    )
    # A dry run is not what the workstation holds.
    store.record_run(
        _simple_run("r3", t + timedelta(hours=2), {"ws2": Status.FAILED}, check=True), who="a"
    )
    rows = {(r.workstation, r.user): r for r in store.last_results()}
    assert set(rows) == {("ws1", "alice"), ("ws1", "bob"), ("ws2", "alice")}
    assert (rows[("ws1", "alice")].status, rows[("ws1", "alice")].run_id) == (Status.BUSY, "r2")
    assert (rows[("ws1", "bob")].status, rows[("ws1", "bob")].run_id) == (Status.CHANGED, "r1")
    assert rows[("ws1", "bob")].new_sha256 == store.fingerprints.of(SHA_B)
    assert rows[("ws1", "bob")].time == t
    assert rows[("ws2", "alice")].run_id == "r1"
    with_dry = {(r.workstation, r.user): r for r in store.last_results(include_dry_runs=True)}
    assert with_dry[("ws2", "alice")].run_id == "r3"
    assert with_dry[("ws2", "alice")].dry_run is True

    # ws1 unreachable later: the latest result of every user on it is that failure.
    store.record_run(_simple_run("r4", t + timedelta(hours=3), {"ws1": Status.FAILED}), who="a")
    alice = store.last_results(user="ALICE")
    assert [(r.workstation, r.status, r.run_id) for r in alice] == [
        ("ws1", Status.FAILED, "r4"),
        ("ws2", Status.CHANGED, "r1"),
    ]
    assert alice[0].kind is None and alice[0].path is None
    assert alice[0].message == "ws1 failed"
    assert [r.user for r in store.last_results(workstation="WS1")] == ["alice", "bob"]
    assert store.last_results(user="nobody") == []


def test_a_workstation_that_never_got_a_file_still_shows(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_run(_simple_run("r1", STARTED, {"ws9": Status.FAILED}), who="a")
    [row] = store.last_results(workstation="ws9")
    assert (row.user, row.status) == (None, Status.FAILED)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(StateError, match=r"schema version 99, newer than .* supports \(3\)"):
        StateStore(tmp_path)


def test_an_old_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / state.DB_NAME
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '0')")
    db.close()
    store = StateStore(tmp_path)
    assert store.schema_version() == 3
    store.record_run(make_run(), who="a")
    assert len(store.run("a1b2").results) == 8


def test_runs_of_schema_1_are_kept_and_get_no_revision(tmp_path: Path) -> None:
    path = tmp_path / state.DB_NAME
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        for statement in state.MIGRATIONS[0]:
            db.execute(statement)
        db.execute(
            "INSERT INTO runs (id, started, user, host) VALUES ('old1', ?, 'a', 'c')",
            (STARTED.isoformat(),),
        )
    db.close()
    store = StateStore(tmp_path)
    assert store.schema_version() == 3
    [old] = store.runs()
    assert (old.id, old.revision) == ("old1", "")
    commit = "0123456789abcdef0123456789abcdef01234567"
    store.record_run(make_run(), who="a", revision=commit + "+dirty")
    newest = store.runs()[0]
    assert newest.revision == commit + "+dirty"
    assert "inventory 0123456789ab+dirty" in str(newest)
    assert store.run(newest.id).to_dict()["summary"]["revision"] == commit + "+dirty"


def test_a_garbage_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / state.DB_NAME).write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StateError, match="unreadable"):
        StateStore(tmp_path)


def test_state_errors_are_provisioner_errors() -> None:
    assert issubclass(StateLockedError, StateError)
    assert issubclass(StateError, ProvisionerError)


# --------------------------------------------------------------------------- the lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from provisioner.records.state import StateStore

    with StateStore(Path(sys.argv[1])).lock(sys.argv[2], who="ops-bob"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[3]))
    """
)


def _start_holder(directory: Path, owner: str, hold: float = 60.0) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), owner, str(hold)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_process_fails_fast_with_the_holders_details(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    holder = _start_holder(tmp_path, "provisioner rollout --limit web")
    try:
        begin = time.monotonic()
        with pytest.raises(StateLockedError) as caught, store.lock("provisioner rollout"):
            pytest.fail("the lock was taken twice")
        assert time.monotonic() - begin < 1.0
        message = str(caught.value)
        assert "'provisioner rollout --limit web'" in message
        assert "ops-bob" in message
        assert f"pid {holder.pid}" in message
        assert state.controller_name() in message
        assert caught.value.holder is not None
        assert caught.value.holder.pid == holder.pid
        assert abs(caught.value.holder.since - datetime.now(UTC)) < timedelta(minutes=1)
    finally:
        holder.kill()
        holder.wait()


@POSIX_ONLY
def test_the_lock_is_free_after_the_holder_is_killed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    holder = _start_holder(tmp_path, "provisioner rollout")
    holder.kill()  # SIGKILL: no cleanup runs
    holder.wait()
    # The stale text is still there, but it does not block.
    stale = store.read_lock()
    assert stale is not None and stale.pid == holder.pid
    with store.lock("provisioner rollout --only-failed", who="ops-amy") as info:
        assert info.pid == os.getpid()
        assert store.read_lock() == info
    assert store.read_lock() is None


def test_the_lock_is_free_after_the_holder_exits(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    holder = _start_holder(tmp_path, "provisioner rollout", hold=0.1)
    assert holder.wait(timeout=30) == 0
    with store.lock("next"):
        pass


def test_the_lock_is_not_reentrant_within_a_process(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with (
        store.lock("first", who="me"),
        pytest.raises(StateLockedError, match="'first' run by me"),
        store.lock("second"),
    ):
        pass
    with store.lock("third"):
        pass


def test_a_leftover_lock_file_does_not_block(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.lock_path.write_text('{"owner": "ghost", "pid": 1, "since": "garbage"}')
    with store.lock("mine") as info:
        assert info.owner == "mine"


# --------------------------------------------------------------------------- audit log


def _record(when: str, **overrides: str | None) -> AuditRecord:
    fields: dict[str, str | None] = {
        "who": "ops-amy",
        "controller": "ctl1",
        "run_id": "r1",
        "action": "push",
        "workstation": "ws1",
        "user": "alice",
        "file": "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP\\microsip.ini",
        "sha256_before": "a" * 32,  # fingerprints, as records hold them
        "sha256_after": "b" * 32,
        "status": "changed",
        "message": "",
    }
    fields.update(overrides)
    return AuditRecord(time=datetime.fromisoformat(when), **fields)  # type: ignore[arg-type]


def _sample_log(directory: Path) -> AuditLog:
    log = AuditLog(directory)
    log.append(
        [
            _record("2024-05-01T09:00:00+00:00"),
            _record("2024-05-01T23:30:00+00:00", user="bob", workstation="ws2"),
            _record("2024-05-02T08:00:00+00:00", action="regenerate", run_id="h7"),
            _record("2024-05-03T12:00:00+00:00", action="rollback", workstation="WS2"),
            _record(
                "2024-05-04T00:00:00+00:00",
                action="set-password",
                workstation="",
                file="inventory/users/alice.yaml",
                sha256_before=None,
                sha256_after=None,
            ),
        ]
    )
    return log


def test_audit_records_round_trip(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    records = log.query()
    assert len(records) == 5
    assert records[0] == _record("2024-05-01T09:00:00+00:00")
    lines = log.path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert list(first) == [
        "time",
        "who",
        "controller",
        "run_id",
        "action",
        "workstation",
        "user",
        "file",
        "sha256_before",
        "sha256_after",
        "status",
        "message",
    ]
    assert first["time"] == "2024-05-01T09:00:00.000000Z"


@POSIX_ONLY
def test_audit_log_is_private(tmp_path: Path) -> None:
    log = _sample_log(tmp_path / "new")
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.directory.stat().st_mode) == 0o700


def test_audit_query_filters(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)

    def times(records: list[AuditRecord]) -> list[int]:
        return [r.time.day * 100 + r.time.hour for r in records]

    assert times(log.query(user="alice")) == [109, 208, 312, 400]
    assert times(log.query(user="BOB")) == [123]
    assert times(log.query(workstation="ws2")) == [123, 312]
    assert times(log.query(action="rollback")) == [312]
    assert times(log.query(action="set-password")) == [400]
    assert times(log.query(run_id="h")) == [208]
    assert times(log.query(since="2024-05-02")) == [208, 312, 400]
    assert times(log.query(until="2024-05-01")) == [109, 123]
    assert times(log.query(since="2024-05-01T12:00Z", until="2024-05-03T12:00:00Z")) == [123, 208]
    assert times(log.query(since=date(2024, 5, 3))) == [312, 400]
    assert times(log.query(until=date(2024, 5, 2))) == [109, 123, 208]
    assert times(log.query(since=datetime(2024, 5, 2, 10, 0, tzinfo=UTC))) == [312, 400]
    assert times(log.query(since="2024-05-02T09:00:00+01:00")) == [208, 312, 400]
    assert times(log.query(user="alice", workstation="ws1", action="push")) == [109]
    with pytest.raises(StateError, match="not a date"):
        log.query(since="yesterday")


def test_audit_query_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    assert AuditLog(tmp_path / "nothing").query() == []


def test_audit_appends_never_rewrite_existing_bytes(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    before = log.path.read_bytes()
    inode = log.path.stat().st_ino
    assert log.append([_record("2024-06-01T00:00:00+00:00")]) == 1
    assert log.append([]) == 0
    after = log.path.read_bytes()
    assert after.startswith(before)
    assert after[len(before) :].count(b"\n") == 1
    assert log.path.stat().st_ino == inode
    assert len(log.query()) == 6


def test_audit_log_is_opened_append_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _sample_log(tmp_path)
    opened: list[int] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if Path(path) == log.path:
            opened.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    log.append([_record("2024-06-01T00:00:00+00:00")])
    assert opened, "the audit log was not opened through os.open"
    for flags in opened:
        assert flags & os.O_APPEND
        assert not flags & os.O_TRUNC


def test_a_torn_last_line_is_skipped_and_the_next_append_starts_a_new_line(
    tmp_path: Path,
) -> None:
    log = _sample_log(tmp_path)
    torn = b'{"time": "2024-05-05T00:00:00Z", "who": "ops-a'
    with log.path.open("ab") as handle:
        handle.write(torn)
    assert len(log.query()) == 5
    before = log.path.read_bytes()
    log.append([_record("2024-05-06T00:00:00+00:00", user="carol")])
    after = log.path.read_bytes()
    assert after.startswith(before)
    assert after.count(torn + b"\n") == 1
    records = log.query()
    assert len(records) == 6
    assert records[-1].user == "carol"
    # Other damage is skipped too: a blank line, a JSON list, a record without a time.
    with log.path.open("ab") as handle:
        handle.write(b'\n[1, 2]\n{"action": "push"}\n\xff\xfe\n')
    assert len(log.query()) == 6


def test_unknown_audit_action_is_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    with pytest.raises(StateError, match="unknown audit action 'deploy'"):
        log.append([_record("2024-05-01T00:00:00+00:00", action="deploy")])
    assert not log.path.exists()


@POSIX_ONLY
def test_audit_append_waits_for_the_lock_then_gives_up(tmp_path: Path) -> None:
    import fcntl

    log = AuditLog(tmp_path, lock_timeout=0.3)
    fd = os.open(tmp_path / state.AUDIT_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        begin = time.monotonic()
        with pytest.raises(StateLockedError, match="stayed locked"):
            log.append([_record("2024-05-01T00:00:00+00:00")])
        assert 0.25 < time.monotonic() - begin < 3
    finally:
        os.close(fd)
    assert log.append([_record("2024-05-01T00:00:00+00:00")]) == 1


WRITER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from pathlib import Path
    from provisioner.records.state import AuditLog, AuditRecord

    log = AuditLog(Path(sys.argv[1]))
    for i in range(40):
        log.append([
            AuditRecord(datetime.now(UTC), sys.argv[2], "ctl", "r", "push", f"ws{i}", "u",
                        "f" * 200, "a" * 64, "b" * 64, "changed", "x" * 300)
            for _ in range(3)
        ])
    """
)


def test_concurrent_appends_from_several_processes_keep_every_line_whole(
    tmp_path: Path,
) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"w{n}"], cwd=REPO)
        for n in range(4)
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0, 0]
    log = AuditLog(tmp_path)
    lines = log.path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert all(json.loads(line) for line in lines[:-1])
    records = log.query()
    assert len(records) == 4 * 40 * 3
    assert {r.who for r in records} == {"w0", "w1", "w2", "w3"}


def test_records_for_run(tmp_path: Path) -> None:
    run = make_run()
    records = records_for_run(run, "ops-amy", fingerprints=FP)
    summary = [(r.workstation, r.user, r.status, r.file is not None) for r in records]
    assert summary == [
        ("ws-auth", None, "failed", False),
        ("ws-changed", "alice", "changed", True),
        ("ws-conflict", "dave", "conflict", True),
        ("ws-conflict", None, "changed", True),
        ("ws-down", None, "failed", False),
        ("ws-partial", "erin", "failed", True),
        ("ws-partial", "frank", "changed", True),
    ]
    alice = records[1]
    assert alice.sha256_before == FP.of(SHA_A) and alice.sha256_after == FP.of(SHA_B)
    assert alice.file == "C:\\Users\\alice\\AppData\\Roaming\\MicroSIP\\microsip.ini"
    assert alice.run_id == run.run_id
    assert alice.time == run.finished
    assert alice.who == "ops-amy" and alice.action == "push"
    assert alice.controller == state.controller_name()
    assert records[0].message == run.results["ws-auth"].message
    assert records_for_run(run, "x", action="rollback", fingerprints=FP)[0].action == "rollback"
    assert records_for_run(make_check_run(), "ops-amy", fingerprints=FP) == []


# --------------------------------------------------------------------------- no secrets


def test_state_and_audit_never_hold_the_diff(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for run in (make_run(), make_check_run()):
        assert CANARY in json.dumps([c.diff for r in run.results.values() for c in r.files])
        store.record_run(run, who="ops-amy", command="provisioner rollout --diff")
        AuditLog(tmp_path).append(records_for_run(run, "ops-amy", fingerprints=FP))
    store.last_results()
    with sqlite3.connect(store.path) as db:
        dump = "\n".join(db.iterdump())
    db.close()
    assert "a1b2c3d4e5f6" in dump
    assert CANARY not in dump
    for path in tmp_path.iterdir():
        assert CANARY.encode() not in path.read_bytes(), path
    assert "diff" not in (tmp_path / state.AUDIT_NAME).read_text(encoding="utf-8")


def test_stored_rows_as_json_and_text(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_run(make_run(), who="admin1", command="provisioner rollout")
    [summary] = store.runs()
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["id"] == "a1b2c3d4e5f6"
    assert data["started"] == "2024-05-01T10:00:00.000000Z"
    assert data["counts"]["failed"] == 3
    assert data["total"] == 8 and data["ok"] is False
    text = str(summary)
    assert text.startswith("a1b2c3d4e5f6  2024-05-01 10:00:00Z  admin1@")
    assert "3 failed" in text and "[provisioner rollout]" in text
    detail = store.run("a1b2")
    as_json = json.loads(json.dumps(detail.to_dict()))
    assert as_json["to_retry"] == detail.to_retry
    assert as_json["results"][0]["workstation"] == "ws-auth"
    shown = str(detail)
    assert "ws-conflict  conflict" in shown
    dave = store.fingerprints.of(SHA_A)
    assert dave is not None
    assert f"  dave/microsip.ini  conflict  {dave[:12]} -> {dave[:12]}" in shown
    b, c = (store.fingerprints.of(x * 64) or "" for x in "bc")
    assert f"  override.ini  changed  {b[:12]} -> {c[:12]}" in shown
    assert "  warning: MicroSIP was running" in shown
    last = store.last_results(user="alice")
    assert json.loads(json.dumps(last[0].to_dict()))["status"] == "changed"
    assert str(last[0]).startswith("ws-changed  alice  changed  2024-05-01 10:00:00Z  run a1b2")
    assert CANARY not in shown + text + json.dumps(as_json)


def test_audit_record_now_for_helpdesk_actions(tmp_path: Path) -> None:
    record = AuditRecord.now(
        who="helpdesk1",
        action="set-password",
        user="alice",
        file="inventory/users.yaml",
        status="changed",
        message="sealed /users/alice/accounts/1/password to key k1",
    )
    assert abs(record.time - datetime.now(UTC)) < timedelta(minutes=1)
    assert record.controller == state.controller_name()
    assert (record.workstation, record.run_id, record.sha256_before) == ("", "", None)
    log = AuditLog(tmp_path)
    log.append([record])
    [back] = log.query(action="set-password", user="alice")
    assert back == record
    assert str(back).endswith(
        "set-password  alice inventory/users.yaml  changed  "
        "sealed /users/alice/accounts/1/password to key k1"
    )


# --------------------------------------------------------------------------- fingerprints


def test_a_schema_2_history_loses_its_full_hashes(tmp_path: Path) -> None:
    # A state folder written before fingerprints: full SHA-256 in the files table.
    path = tmp_path / state.DB_NAME
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        for statement in (*state.MIGRATIONS[0], *state.MIGRATIONS[1]):
            db.execute(statement)
        db.execute(
            "INSERT INTO runs (id, started, user, host) VALUES ('old1', ?, 'a', 'c')",
            (STARTED.isoformat(),),
        )
        db.execute("INSERT INTO results (run_id, workstation, status) VALUES ('old1', 'ws', 'x')")
        db.execute(
            "INSERT INTO files (run_id, workstation, user, kind, path, status, old_sha256, "
            "new_sha256) VALUES ('old1', 'ws', 'alice', 'microsip', 'p', 'changed', NULL, ?)",
            (SHA_B,),
        )
    db.close()
    store = StateStore(tmp_path)
    assert store.schema_version() == 3
    [stored] = store.run("old1").results[0].files
    assert stored.new_sha256 == store.fingerprints.of(SHA_B) and stored.old_sha256 is None
    # Nothing of the old value is left in the database file or its log, not even in free pages.
    for leftover in tmp_path.glob(f"{state.DB_NAME}*"):
        assert SHA_B.encode() not in leftover.read_bytes(), leftover
    # Opening again changes nothing (the migration ran once).
    assert StateStore(tmp_path).run("old1").results[0].files[0].new_sha256 == stored.new_sha256


def test_audit_lines_written_before_fingerprints_are_shown_as_fingerprints(
    tmp_path: Path,
) -> None:
    log = AuditLog(tmp_path)
    log.append([_record("2024-05-01T09:00:00+00:00", sha256_before=SHA_A, sha256_after=None)])
    store = StateStore(tmp_path)
    [record] = log.query()
    assert record.sha256_before == store.fingerprints.of(SHA_A) and record.sha256_after is None
    assert SHA_A not in str(record) and SHA_A not in json.dumps(record.to_dict())


def test_fingerprints_compare_like_hashes_but_differ_per_state_folder(tmp_path: Path) -> None:
    one = StateStore(tmp_path / "one").fingerprints
    again = StateStore(tmp_path / "one").fingerprints
    other = StateStore(tmp_path / "two").fingerprints
    assert one.of(SHA_A) == again.of(SHA_A) != one.of(SHA_B)
    assert one.of(SHA_A) != other.of(SHA_A)
    assert len(one.of(SHA_A) or "") == 32 and one.of(None) is None
    assert repr(one) == "Fingerprints(***)"


# --------------------------------------------------------------------------- the run journal


def _journal(store: StateStore) -> state.RunJournal:
    return state.RunJournal(store, who="ops-amy", command="rollout", action="push", revision="")


def _changed(host: str, user: str = "alice") -> HostResult:
    change = FileChange(
        "microsip",
        user,
        f"C:\\Users\\{user}\\AppData\\Roaming\\MicroSIP\\microsip.ini",
        Status.CHANGED,
        old_sha256=SHA_A,
        new_sha256=SHA_B,
    )
    return HostResult(host, Status.CHANGED, "1 file changed", [change])


def test_a_journal_records_the_run_as_it_goes(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    journal = _journal(store)
    run = RunResult("r1", STARTED, RolloutOptions())
    journal.begin(run, ["ws1", "ws2", "ws3"])
    # Begun: what a run killed now would leave.
    [summary] = store.runs()
    assert (summary.finished, summary.stopped) == (None, state.JOURNAL_STOPPED)
    assert summary.counts[Status.SKIPPED] == 3 and summary.total == 3
    assert {(r.status, r.message) for r in store.run("r1").results} == {
        (Status.SKIPPED, state.NOT_REPORTED)
    }
    assert AuditLog(tmp_path).query() == []
    # Each workstation as it completes: its audit records, then its result and the counts.
    journal.host_done(_changed("ws2"))
    journal.host_done(HostResult("ws3", Status.FAILED, "unreachable", attempts=3))
    journal.host_done(HostResult("ws1", Status.CHANGED, "would change", dry_run=True))
    [summary] = store.runs()
    assert {s: n for s, n in summary.counts.items() if n} == {
        Status.CHANGED: 1,
        Status.SKIPPED: 1,
        Status.FAILED: 1,
    }
    by_host = {r.workstation: r for r in store.run("r1").results}
    assert by_host["ws1"].message == state.NOT_REPORTED  # a dry-run result records nothing
    assert by_host["ws3"].attempts == 3
    [file] = by_host["ws2"].files
    assert file.new_sha256 == store.fingerprints.of(SHA_B)
    records = AuditLog(tmp_path).query(run_id="r1")
    assert [(r.workstation, r.status, r.sha256_after) for r in records] == [
        ("ws2", "changed", store.fingerprints.of(SHA_B)),
        ("ws3", "failed", None),
    ]
    assert {r.who for r in records} == {"ops-amy"}
    # The end: how it ended, the counts as kept.
    run.stopped = "failure threshold exceeded after batch 1"
    journal.finish(run)
    [finished] = store.runs()
    assert finished.finished is not None and finished.stopped == run.stopped
    assert finished.counts == summary.counts
    assert store.hosts_to_retry("r1") == ["ws1", "ws3"]


@POSIX_ONLY
def test_the_audit_log_is_synced_through_a_handle_that_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows flushes a file to disk only through a handle opened for writing.
    import fcntl

    log = _sample_log(tmp_path)
    modes: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        modes.append(fcntl.fcntl(fd, fcntl.F_GETFL))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    log.sync()
    assert modes, "the audit log was not synced"
    for flags in modes:
        assert flags & os.O_ACCMODE == os.O_WRONLY and flags & os.O_APPEND


@POSIX_ONLY
def test_a_journal_whose_audit_log_cannot_be_synced_still_records_the_end(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    journal = _journal(store)
    run = RunResult("r1", STARTED, RolloutOptions())
    journal.begin(run, ["ws1", "ws2"])
    journal.host_done(_changed("ws1"))
    log = AuditLog(tmp_path)
    log.path.rename(tmp_path / "audit.saved")
    log.path.symlink_to(log.path.name)  # a link to itself: every open of it fails
    with pytest.raises(StateError, match="cannot sync the audit log"):
        journal.finish(run)
    [summary] = store.runs()
    assert summary.finished is not None and summary.stopped == ""
    # The journal's connection is closed: the last one to close empties the write-ahead log.
    assert not (tmp_path / f"{state.DB_NAME}-wal").exists()


JOURNALED = textwrap.dedent(
    """
    import sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from provisioner.rollout.runner import RolloutOptions, RunResult
    from provisioner.records.state import RunJournal, StateStore

    store = StateStore(Path(sys.argv[1]))
    with store.lock("ops-bob: rollout", who="ops-bob"):
        journal = RunJournal(store, who="ops-bob", command="rollout", action="push", revision="")
        journal.begin(RunResult("live1", datetime.now(UTC), RolloutOptions()), ["ws1", "ws2"])
        print("begun", flush=True)
        time.sleep(60)
    """
)


@POSIX_ONLY
def test_a_rollout_still_going_is_shown_running_and_a_killed_one_as_not_finished(
    tmp_path: Path,
) -> None:
    # runs list from another shell while a rollout ran said it had been killed.
    store = StateStore(tmp_path)
    # What a rollout killed long ago left: begun, never finished.
    earlier = RunResult("dead0", STARTED, RolloutOptions(), stopped=state.JOURNAL_STOPPED)
    earlier.results["ws1"] = HostResult("ws1", Status.SKIPPED, state.NOT_REPORTED, attempts=0)
    store.record_run(earlier, who="ops-bob", command="rollout")
    process = subprocess.Popen(
        [sys.executable, "-c", JOURNALED, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "begun"
        live, dead = store.runs()
        assert (live.id, live.running, live.stopped) == ("live1", True, "")
        assert str(live).endswith("2 skipped  running  [rollout]")
        assert (dead.id, dead.running, dead.stopped) == ("dead0", False, state.JOURNAL_STOPPED)
        detail = store.run("live1")
        assert detail.summary == live and detail.to_dict()["summary"]["running"] is True
        assert {r.message for r in detail.results} == {state.NOT_REPORTED_YET}
        listed = run_cli(tmp_path, "runs", "list", "--state", str(tmp_path))
        newest = listed.stdout.splitlines()[1]  # under the header
        assert newest.startswith("live1") and newest.endswith("running"), listed.stdout
        assert "did not finish" not in newest
    finally:
        process.kill()  # SIGKILL: the lock file keeps the holder's text
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    assert store.read_lock() is not None
    live, dead = store.runs()
    assert (live.running, live.stopped) == (False, state.JOURNAL_STOPPED)
    assert {r.message for r in store.run("live1").results} == {state.NOT_REPORTED}
    with store.lock("next"):  # and the lock was let go by the look
        pass


DAMAGED = "is damaged: restore it from a backup, or remove it (new fingerprints will then not match"


@pytest.mark.parametrize("damage", ["truncated", "a folder", "empty"])
def test_a_damaged_fingerprint_key_stops_only_what_needs_it(tmp_path: Path, damage: str) -> None:
    store = StateStore(tmp_path)
    store.record_run(make_run(), who="ops-amy", command="rollout")
    log = AuditLog(tmp_path)
    log.append([_record("2024-05-01T09:00:00+00:00", sha256_before=None, sha256_after=None)])
    key = tmp_path / state.KEY_NAME
    if damage == "a folder":
        key.unlink()
        key.mkdir()
    else:
        key.write_bytes(key.read_bytes()[:3] if damage == "truncated" else b"")
    # Reading the history needs no key.
    again = StateStore(tmp_path)
    assert [s.id for s in again.runs()] == ["a1b2c3d4e5f6"]
    assert again.run("a1b2").results
    assert len(AuditLog(tmp_path).query()) == 1
    listed = run_cli(tmp_path, "runs", "list", "--state", str(tmp_path))
    assert listed.returncode == 0 and "a1b2c3d4e5f6" in listed.stdout, listed.stderr
    # Whatever records a fingerprint says what to do, and records nothing.
    with pytest.raises(StateError) as caught:
        _journal(again).begin(RunResult("r2", STARTED, RolloutOptions()), ["ws1"])
    assert str(caught.value) == f"{key} {DAMAGED} recorded ones)"
    assert [s.id for s in again.runs()] == ["a1b2c3d4e5f6"]
    log.append([_record("2024-05-02T09:00:00+00:00", sha256_before=SHA_A)])  # before fingerprints
    shown = run_cli(tmp_path, "audit", "--state", str(tmp_path))
    assert shown.returncode == 1
    assert shown.stderr == f"error: {key} {DAMAGED} recorded ones)\n"
