"""The state directory: run history in SQLite, the rollout lock, and the audit log.

One per realm and user by default (:func:`default_directory`), outside any repository; a
folder that git would commit is refused (:func:`check_location`).

::

    <state>/               mode 0700
      state.sqlite3        runs, per-workstation results, per-file fingerprints (WAL mode)
      fingerprint.key      the key of the files' fingerprints (provisioner.records.fingerprint),
                           0600, made when a first fingerprint is needed
      rollout.lock         OS lock held by the running rollout; its text says who holds it
      audit.jsonl          append-only, one JSON record per change
      audit.lock           short lock serialising appends to audit.jsonl

Only fingerprints, statuses, names and messages are stored: never a diff, never a secret,
never a file's SHA-256 (it would let a reader test password guesses offline). The columns
and fields keep their names (``old_sha256``, ``sha256_before`` ...) for the tools that read
them; since schema 3 they hold fingerprints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import os
import re
import socket
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from provisioner.atomicfile import UnsafeTreeError, create_once, make_private_folder
from provisioner.errors import StateError, UsageError
from provisioner.records import revision
from provisioner.records.fingerprint import KEY_BYTES, Fingerprints, is_legacy_hash
from provisioner.records.results import HostResult, RunLike, Status, is_dry_run, jsonable

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

SCHEMA_VERSION = 3
APP_FOLDER = "microsip-provisioner"
_SAFE_FOLDER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DB_NAME = "state.sqlite3"
LOCK_NAME = "rollout.lock"
AUDIT_NAME = "audit.jsonl"
AUDIT_LOCK_NAME = "audit.lock"
KEY_NAME = "fingerprint.key"
ACTIONS = ("push", "rollback", "reset", "set-password", "regenerate")
# Commands recorded as runs that act on one user or workstation, not on a fleet selection.
ONE_TARGET_COMMANDS = ("user", "push", "rollback")
RETRY_STATUSES = (Status.FAILED, Status.CONFLICT, Status.BUSY, Status.SKIPPED)
_FAILURES = (Status.FAILED, Status.CONFLICT)
_BUSY_TIMEOUT = 10.0
# msvcrt locks are mandatory: lock one byte far past the text so readers can still read it.
_WINDOWS_LOCK_OFFSET = 1 << 30
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class StateLockedError(StateError):
    """Another rollout holds the state directory (or the audit log stayed locked)."""

    code: ClassVar[str] = "state-locked"

    def __init__(self, message: str, *, holder: LockInfo | None = None) -> None:
        self.holder = holder
        super().__init__(message)


def current_user() -> str:
    """The login name of whoever runs the provisioner."""
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):
        return "unknown"


def controller_name() -> str:
    """This machine's host name (the controller)."""
    return socket.gethostname() or "unknown"


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def _short(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _hash(value: str | None) -> str:
    return value[:12] if value else "-"


def _parse_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _status(value: str) -> Status:
    try:
        return Status(value)
    except ValueError:
        return Status.FAILED


def folder_name(realm: str) -> str:
    """The name of a realm's state folder: the realm when it is a plain name (as
    ``keys init`` makes them), else its safe characters and a hash that keeps realms apart."""
    if _SAFE_FOLDER_NAME.match(realm):
        return realm
    kept = re.sub(r"[^A-Za-z0-9._-]+", "_", realm).lstrip(".")[:40] or "realm"
    return f"{kept}-{hashlib.sha256(realm.encode('utf-8')).hexdigest()[:12]}"


def default_directory(state_home: Path, realm: str) -> Path:
    """Where a realm's state lives unless told otherwise: ``STATE_HOME/microsip-provisioner/
    REALM``, per user and outside any repository."""
    return state_home / APP_FOLDER / folder_name(realm)


def check_location(directory: Path) -> None:
    """Refuse a state folder that ``git add -A`` would commit (its audit log, its lock): one
    inside a git working tree that git does not ignore."""
    top = revision.work_tree(directory)
    if top is None:
        return
    probes = [directory / name for name in (DB_NAME, AUDIT_NAME, LOCK_NAME)]
    if revision.not_ignored(top, probes):
        raise UsageError(
            f"the state folder {directory} is inside the git working tree {top}, and git does "
            "not ignore it: 'git add -A' would commit the audit log and the lock. Add it to "
            ".gitignore, or choose a folder outside the repository (--state or "
            "PROVISIONER_STATE; by default the state is kept in your own state directory)"
        )


def _make_directory(directory: Path) -> None:
    """Create the state folder, private to its owner; a link in its place is refused."""
    try:
        make_private_folder(directory, mode=0o700)
    except UnsafeTreeError as exc:
        raise StateError(f"cannot use the state folder: {exc}") from None


def load_fingerprints(directory: Path) -> Fingerprints:
    """The fingerprint key of a state folder, created on first use."""
    path = directory / KEY_NAME
    try:
        if not path.exists():
            create_once(path, os.urandom(KEY_BYTES))
        key = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        raise StateError(f"cannot read the fingerprint key {path}: {exc.strerror or exc}") from exc
    if len(key) != KEY_BYTES:
        raise StateError(
            f"{path} is damaged: restore it from a backup, or remove it (new fingerprints will "
            "then not match recorded ones)"
        )
    return Fingerprints(key)


def _touch_private(path: Path) -> None:
    """Create ``path`` with mode 0600 unless it exists (sqlite would use 0644)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


# --------------------------------------------------------------------------- OS file locks


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when someone holds it."""
    if sys.platform == "win32":
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _open_lock_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """Who holds the rollout lock; written into the lock file for the next one to read."""

    owner: str
    user: str
    controller: str
    pid: int
    since: datetime

    def describe(self) -> str:
        """One line: what, who, where, since when."""
        what = f"{self.owner!r} " if self.owner else ""
        return (
            f"{what}run by {self.user} on {self.controller} (pid {self.pid}) "
            f"since {_iso(self.since)}"
        )

    def to_json(self) -> str:
        """The lock file's text."""
        data = {
            "owner": self.owner,
            "user": self.user,
            "controller": self.controller,
            "pid": self.pid,
            "since": _iso(self.since),
        }
        return json.dumps(data, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LockInfo | None:
        """Parse a lock file's text; None when it is empty or being written."""
        try:
            data = json.loads(text)
            return cls(
                str(data["owner"]),
                str(data["user"]),
                str(data["controller"]),
                int(data["pid"]),
                _parse_iso(str(data["since"])),
            )
        except (ValueError, KeyError, TypeError):
            return None


# --------------------------------------------------------------------------- stored rows


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One recorded run, without its per-workstation results."""

    id: str
    started: datetime
    finished: datetime | None
    user: str
    controller: str
    command: str
    dry_run: bool
    stopped: str
    counts: dict[Status, int]
    options: dict[str, Any]
    revision: str = ""
    # Still going: its rollout holds the state folder's lock now (``stopped`` is then empty).
    running: bool = False

    @property
    def total(self) -> int:
        """Number of workstations in the run."""
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        """True when every workstation ended changed or unchanged."""
        return all(self.counts[s] == 0 for s in RETRY_STATUSES)

    def to_dict(self) -> dict[str, Any]:
        """JSON data (times in ISO 8601 UTC)."""
        data: dict[str, Any] = jsonable(self)
        data.update(total=self.total, ok=self.ok)
        return data

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {s.value}" for s, n in self.counts.items() if n) or "no host"
        line = f"{self.id}  {_short(self.started)}  {self.user}@{self.controller}  {counts}"
        if self.dry_run:
            line += "  (check)"
        if self.running:
            line += "  running"
        elif self.stopped:
            line += f"  stopped: {self.stopped}"
        if self.revision:
            line += f"  inventory {revision.short(self.revision)}"
        return line + (f"  [{self.command}]" if self.command else "")


@dataclasses.dataclass(frozen=True)
class StoredFile:
    """One file of one workstation in a recorded run."""

    workstation: str
    user: str | None
    kind: str
    path: str
    status: Status
    message: str
    old_sha256: str | None
    new_sha256: str | None
    conflicts: tuple[str, ...]

    @property
    def label(self) -> str:
        """``user/microsip.ini`` or ``override.ini``."""
        name = self.path.replace("\\", "/").rsplit("/", 1)[-1]
        return f"{self.user}/{name}" if self.user else name


@dataclasses.dataclass(frozen=True)
class StoredResult:
    """One workstation in a recorded run."""

    workstation: str
    status: Status
    message: str
    attempts: int
    duration: float
    retryable: bool
    warnings: tuple[str, ...]
    files: tuple[StoredFile, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON data."""
        data: dict[str, Any] = jsonable(self)
        return data

    def __str__(self) -> str:
        lines = [f"{self.workstation}  {self.status.value}  {self.message}".rstrip()]
        for f in self.files:
            line = f"  {f.label}  {f.status.value}  {_hash(f.old_sha256)} -> {_hash(f.new_sha256)}"
            lines.append(line + (f"  {f.message}" if f.message else ""))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RunDetail:
    """A recorded run with every workstation and file."""

    summary: RunSummary
    results: tuple[StoredResult, ...]

    @property
    def to_retry(self) -> list[str]:
        """Workstations that failed, conflicted, were busy or skipped."""
        return [r.workstation for r in self.results if r.status in RETRY_STATUSES]

    def to_dict(self) -> dict[str, Any]:
        """JSON data: the summary, every result with its files, the hosts to retry."""
        return {
            "summary": self.summary.to_dict(),
            "results": [r.to_dict() for r in self.results],
            "to_retry": self.to_retry,
        }

    def __str__(self) -> str:
        return "\n".join([str(self.summary), *(str(r) for r in self.results)])


@dataclasses.dataclass(frozen=True)
class LastResult:
    """The latest recorded outcome for one workstation and user (user None: override.ini).

    ``kind`` and ``path`` are None when that run failed before reaching any file; the
    status and message are then the workstation's.
    """

    workstation: str
    user: str | None
    kind: str | None
    path: str | None
    status: Status
    message: str
    run_id: str
    time: datetime
    dry_run: bool
    old_sha256: str | None
    new_sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON data."""
        data: dict[str, Any] = jsonable(self)
        return data

    def __str__(self) -> str:
        who = self.user or "override.ini"
        check = " (check)" if self.dry_run else ""
        line = f"{self.workstation}  {who}  {self.status.value}{check}  {_short(self.time)}"
        return f"{line}  run {self.run_id}" + (f"  {self.message}" if self.message else "")


# --------------------------------------------------------------------------- schema

_SCHEMA_V1 = (
    """CREATE TABLE runs (
        id        TEXT PRIMARY KEY,
        started   TEXT NOT NULL,
        finished  TEXT,
        user      TEXT NOT NULL,
        host      TEXT NOT NULL,
        command   TEXT NOT NULL DEFAULT '',
        dry_run   INTEGER NOT NULL DEFAULT 0,
        options   TEXT NOT NULL DEFAULT '{}',
        stopped   TEXT NOT NULL DEFAULT '',
        counts    TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX runs_by_start ON runs (started)",
    """CREATE TABLE results (
        run_id       TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        workstation  TEXT NOT NULL,
        status       TEXT NOT NULL,
        message      TEXT NOT NULL DEFAULT '',
        attempts     INTEGER NOT NULL DEFAULT 0,
        duration     REAL NOT NULL DEFAULT 0,
        retryable    INTEGER NOT NULL DEFAULT 0,
        warnings     TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (run_id, workstation)
    )""",
    "CREATE INDEX results_by_workstation ON results (workstation)",
    """CREATE TABLE files (
        run_id       TEXT NOT NULL,
        workstation  TEXT NOT NULL,
        user         TEXT,
        kind         TEXT NOT NULL,
        path         TEXT NOT NULL,
        status       TEXT NOT NULL,
        old_sha256   TEXT,
        new_sha256   TEXT,
        message      TEXT NOT NULL DEFAULT '',
        conflicts    TEXT NOT NULL DEFAULT '[]',
        FOREIGN KEY (run_id, workstation)
            REFERENCES results (run_id, workstation) ON DELETE CASCADE
    )""",
    "CREATE INDEX files_by_run ON files (run_id, workstation)",
    "CREATE INDEX files_by_target ON files (workstation, user)",
    "CREATE INDEX files_by_user ON files (user)",
)
# The inventory's git commit a run used (provisioner.records.revision); '' for runs before it.
_SCHEMA_V2 = ("ALTER TABLE runs ADD COLUMN revision TEXT NOT NULL DEFAULT ''",)
# Files' SHA-256 recorded before schema 3 become fingerprints (the function is the store's
# key, registered on the connection); the freed pages are then wiped (see _migrate).
_SCHEMA_V3 = (
    "UPDATE files SET old_sha256 = fingerprint(old_sha256) WHERE length(old_sha256) = 64",
    "UPDATE files SET new_sha256 = fingerprint(new_sha256) WHERE length(new_sha256) = 64",
)
# MIGRATIONS[n] takes a database from schema version n to n + 1 (0: empty database).
MIGRATIONS: dict[int, tuple[str, ...]] = {0: _SCHEMA_V1, 1: _SCHEMA_V2, 2: _SCHEMA_V3}

_LAST_RESULTS = """
WITH pairs AS (
    SELECT DISTINCT workstation, user FROM files
    UNION
    SELECT DISTINCT workstation, NULL FROM results
    WHERE workstation NOT IN (SELECT workstation FROM files)
),
candidates AS (
    SELECT f.workstation AS workstation, f.user AS user, f.kind AS kind, f.path AS path,
           f.status AS status, f.message AS message, f.old_sha256 AS old_sha256,
           f.new_sha256 AS new_sha256, r.id AS run_id, r.started AS started,
           r.dry_run AS dry_run
    FROM files f JOIN runs r ON r.id = f.run_id
    UNION ALL
    -- a run that failed before any file (unreachable, credentials) counts for every user
    SELECT p.workstation, p.user, NULL, NULL, res.status, res.message, NULL, NULL,
           r.id, r.started, r.dry_run
    FROM results res
    JOIN runs r ON r.id = res.run_id
    JOIN pairs p ON p.workstation = res.workstation
    WHERE NOT EXISTS (
        SELECT 1 FROM files f2 WHERE f2.run_id = res.run_id AND f2.workstation = res.workstation
    )
)
SELECT workstation, user, kind, path, status, message, run_id, started, dry_run,
       old_sha256, new_sha256
FROM (
    SELECT c.*, ROW_NUMBER() OVER (
        PARTITION BY workstation, user ORDER BY started DESC, run_id DESC
    ) AS rank
    FROM candidates c
    WHERE (:workstation IS NULL OR workstation = :workstation COLLATE NOCASE)
      AND (:user IS NULL OR user = :user COLLATE NOCASE)
      AND (:dry OR dry_run = 0)
)
WHERE rank = 1
ORDER BY workstation, user
"""

_INSERT_RESULT = "INSERT INTO results VALUES (?,?,?,?,?,?,?,?)"
_INSERT_FILE = (
    "INSERT INTO files (run_id, workstation, user, kind, path, status, old_sha256, "
    "new_sha256, message, conflicts) VALUES (?,?,?,?,?,?,?,?,?,?)"
)


def _result_row(run_id: str, name: str, result: HostResult) -> tuple[Any, ...]:
    return (
        run_id,
        name,
        result.status.value,
        result.message,
        result.attempts,
        float(result.duration),
        int(result.retryable),
        json.dumps(list(result.warnings), ensure_ascii=False),
    )


_SELECT_RUNS = (
    "SELECT id, started, finished, user, host, command, dry_run, stopped, counts, options, "
    "revision FROM runs"
)


# --------------------------------------------------------------------------- the store


def _empty_database() -> sqlite3.Connection:
    """An empty history in memory, for reading a state folder that does not exist."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.create_function("fingerprint", 1, lambda value: value, deterministic=True)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for version in range(SCHEMA_VERSION):
        for statement in MIGRATIONS[version]:
            db.execute(statement)
    db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    return db


class StateStore:
    """Run history of one state directory, in ``<directory>/state.sqlite3``.

    Each method opens and closes its own connection, so a store can be shared between
    threads and processes; SQLite's WAL mode and busy timeout handle concurrent readers
    and writers.

    ``create=False`` (the commands that only read): a state folder that does not exist is
    not created; the store then reads as an empty history and refuses to record.
    """

    def __init__(
        self, directory: Path, *, busy_timeout: float = _BUSY_TIMEOUT, create: bool = True
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.lock_path = self.directory / LOCK_NAME
        self.busy_timeout = busy_timeout
        self._fingerprints: Fingerprints | None = None
        self.exists = create or self.directory.is_dir()
        if not self.exists:
            return
        try:
            _make_directory(self.directory)
            _touch_private(self.path)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {self.directory}: {exc}") from exc
        self._migrate()

    @property
    def fingerprints(self) -> Fingerprints:
        """The key of the files' fingerprints, read (made, the first time) when first needed.

        Raises :class:`StateError` when the key file is damaged; reading the history never
        needs it.
        """
        if self._fingerprints is None:
            self._fingerprints = load_fingerprints(self.directory)
        return self._fingerprints

    def _fingerprint(self, sha256: str | None) -> str | None:
        return self.fingerprints.of(sha256)

    # -- connections

    @contextlib.contextmanager
    def _connect(self, held: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """A new connection, closed at the end; or ``held`` (a journal's), left open."""
        if not self.exists:
            with contextlib.closing(_empty_database()) as empty:
                yield empty
            return
        try:
            db = held or sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state database {self.path}: {exc}") from exc
        try:
            if held is None:
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                db.execute("PRAGMA foreign_keys = ON")
            yield db
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StateError(
                    f"the state database {self.path} stayed busy for {self.busy_timeout:g} s "
                    "(another provisioner is writing it); try again"
                ) from exc
            raise StateError(f"state database {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"state database {self.path} is unreadable ({exc}); move it aside to start "
                "a new history"
            ) from exc
        finally:
            if held is None:
                db.close()

    def open_held(self) -> sqlite3.Connection:
        """A connection kept open for many small commits (:class:`RunJournal`).

        Commits on it do not wait for the disk (``synchronous = NORMAL`` in WAL mode): they
        survive the process being killed; the last ones may be lost with a power cut. Closing
        the only connection checkpoints the log, which is why one is kept.
        """
        if not self.exists:
            raise StateError(f"the state folder {self.directory} does not exist: nothing to change")
        try:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state database {self.path}: {exc}") from exc
        return db

    @contextlib.contextmanager
    def _transaction(self, held: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        if not self.exists:
            raise StateError(f"the state folder {self.directory} does not exist: nothing to change")
        with self._connect(held) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                # SQLite has already rolled back after some errors (disk full, I/O).
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _version(self, db: sqlite3.Connection) -> int:
        has_meta = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:
            return 0
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        try:
            return int(row[0]) if row else 0
        except ValueError:
            raise StateError(
                f"state database {self.path} has an invalid schema_version {row[0]!r}"
            ) from None

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state database {self.path} has schema version {version}, newer than this "
                f"provisioner supports ({SCHEMA_VERSION}); upgrade microsip-provisioner, or "
                "use another --state directory"
            )

    def _migrate(self) -> None:
        with self._connect() as db:
            version = self._version(db)
            self._refuse_newer(version)
            if version == SCHEMA_VERSION:
                return
            # WAL cannot be switched on inside a transaction; the setting persists in the file.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA secure_delete = ON")
            # Hashes of earlier schemas become fingerprints: their key is read first, so that a
            # damaged one is said as such, not as a failed SQL function. A new database has no
            # hash and needs no key yet.
            of = self.fingerprints.of if version else self._fingerprint
            db.create_function("fingerprint", 1, of, deterministic=True)
            db.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have migrated while we waited for the write lock.
                version = from_version = self._version(db)
                self._refuse_newer(version)
                db.execute(
                    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
                while version < SCHEMA_VERSION:
                    for statement in MIGRATIONS[version]:
                        db.execute(statement)
                    version += 1
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(version),),
                )
            except BaseException:
                # SQLite has already rolled back after some errors (disk full, I/O).
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            if 0 < from_version <= 2:
                # The hashes replaced by fingerprints may linger in free pages and in the
                # write-ahead log: rewrite the file and empty the log.
                db.execute("VACUUM")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def schema_version(self) -> int:
        """The schema version of the database file."""
        with self._connect() as db:
            return self._version(db)

    # -- writing

    def record_run(
        self, run: RunLike, *, who: str | None = None, command: str = "", revision: str = ""
    ) -> None:
        """Store a run with every workstation and file, in one transaction.

        ``revision``: the inventory's git commit
        (:func:`provisioner.records.revision.inventory_revision`).

        Recording the same run id again replaces it (a run recorded when interrupted,
        then once finished).
        """
        counts = dict.fromkeys((s.value for s in Status), 0)
        results = []
        files = []
        for name in sorted(run.results):
            result = run.results[name]
            counts[result.status.value] += 1
            results.append(_result_row(run.run_id, name, result))
            files += self._file_rows(run.run_id, name, result)
        row = (
            run.run_id,
            _iso(run.started),
            _iso(run.finished) if run.finished else None,
            who or current_user(),
            controller_name(),
            command,
            int(is_dry_run(run)),
            json.dumps(jsonable(run.options), ensure_ascii=False, sort_keys=True),
            run.stopped,
            json.dumps(counts),
            revision,
        )
        with self._transaction() as db:
            # Its results and their files go with it (ON DELETE CASCADE).
            db.execute("DELETE FROM runs WHERE id = ?", (run.run_id,))
            db.execute(
                "INSERT INTO runs (id, started, finished, user, host, command, dry_run, options, "
                "stopped, counts, revision) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            db.executemany(_INSERT_RESULT, results)
            db.executemany(_INSERT_FILE, files)

    def _file_rows(self, run_id: str, name: str, result: HostResult) -> list[tuple[Any, ...]]:
        return [
            (
                run_id,
                name,
                change.user,
                change.kind,
                change.path,
                change.status.value,
                self.fingerprints.of(change.old_sha256),
                self.fingerprints.of(change.new_sha256),
                change.message,
                json.dumps(list(change.conflicts), ensure_ascii=False),
            )
            for change in result.files
        ]

    def record_host(
        self, run_id: str, result: HostResult, *, held: sqlite3.Connection | None = None
    ) -> None:
        """Store (or replace) one workstation's result in a recorded run, counts updated.

        What :class:`RunJournal` writes as each workstation completes, on its ``held``
        connection (:meth:`open_held`).
        """
        with self._transaction(held) as db:
            before = db.execute(
                "SELECT status FROM results WHERE run_id = ? AND workstation = ?",
                (run_id, result.host),
            ).fetchone()
            # Its files go with the old result (ON DELETE CASCADE).
            db.execute(
                "DELETE FROM results WHERE run_id = ? AND workstation = ?", (run_id, result.host)
            )
            db.execute(_INSERT_RESULT, _result_row(run_id, result.host, result))
            db.executemany(_INSERT_FILE, self._file_rows(run_id, result.host, result))
            row = db.execute("SELECT counts FROM runs WHERE id = ?", (run_id,)).fetchone()
            counts = dict.fromkeys((s.value for s in Status), 0)
            counts.update(json.loads(row[0] or "{}") if row else {})
            if before is not None:
                counts[_status(before[0]).value] -= 1
            counts[result.status.value] += 1
            db.execute("UPDATE runs SET counts = ? WHERE id = ?", (json.dumps(counts), run_id))

    def finish_run(self, run_id: str, stopped: str) -> None:
        """Mark a journaled run finished, with why it stopped (empty: it ran to the end).

        Its counts are those :meth:`record_host` kept up to date. Committed with a full sync,
        which also makes the journal's earlier commits durable.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET stopped = ?, finished = ? WHERE id = ?",
                (stopped, _iso(_now()), run_id),
            )

    # -- reading

    @staticmethod
    def _summary(row: Sequence[Any]) -> RunSummary:
        raw_counts = json.loads(row[8] or "{}")
        counts = dict.fromkeys(Status, 0)
        for key, value in raw_counts.items():
            with contextlib.suppress(ValueError):
                counts[Status(key)] = int(value)
        return RunSummary(
            id=row[0],
            started=_parse_iso(row[1]),
            finished=_parse_iso(row[2]) if row[2] else None,
            user=row[3],
            controller=row[4],
            command=row[5],
            dry_run=bool(row[6]),
            stopped=row[7],
            counts=counts,
            options=json.loads(row[9] or "{}"),
            revision=row[10],
        )

    def runs(self, limit: int | None = 20) -> list[RunSummary]:
        """The most recent runs first; ``limit=None`` for all."""
        with self._connect() as db:
            rows = db.execute(
                _SELECT_RUNS + " ORDER BY started DESC, rowid DESC LIMIT ?",
                (-1 if limit is None else max(0, limit),),
            ).fetchall()
        return self._as_live([self._summary(row) for row in rows])

    def _as_live(self, summaries: list[RunSummary]) -> list[RunSummary]:
        """The summaries, the one of a rollout still going marked running.

        A journaled run stays marked "did not finish" until it ends: what a killed run leaves.
        The run that the rollout lock's holder started since it took the lock is still going.
        """
        if not any(s.finished is None and s.stopped == JOURNAL_STOPPED for s in summaries):
            return summaries
        holder = self.lock_holder()
        if holder is None:
            return summaries
        return [
            dataclasses.replace(s, stopped="", running=True)
            if s.finished is None
            and s.stopped == JOURNAL_STOPPED
            and s.controller == holder.controller
            and s.started >= holder.since
            else s
            for s in summaries
        ]

    def latest_run(
        self, *, include_dry_runs: bool = True, fleet_only: bool = False
    ) -> RunSummary | None:
        """The most recent run, or None.

        ``include_dry_runs=False``: the most recent that could change things; ``fleet_only``:
        leave out the helpdesk's and single-workstation commands (:data:`ONE_TARGET_COMMANDS`).
        """
        one_target = " AND ".join("command NOT LIKE ?" for _ in ONE_TARGET_COMMANDS)
        with self._connect() as db:
            row = db.execute(
                _SELECT_RUNS + f" WHERE (? OR dry_run = 0) AND (? OR ({one_target})) "
                "ORDER BY started DESC, rowid DESC LIMIT 1",
                (
                    int(include_dry_runs),
                    int(not fleet_only),
                    *(f"{prefix} %" for prefix in ONE_TARGET_COMMANDS),
                ),
            ).fetchone()
        return self._summary(row) if row else None

    def resolve_run_id(self, run_id: str) -> str:
        """The full id of the run that ``run_id`` (a full id or unique prefix) names."""
        wanted = run_id.strip()
        if not wanted:
            raise StateError(
                "give a run id or a unique prefix of one (see `provisioner runs list`)"
            )
        with self._connect() as db:
            if db.execute("SELECT 1 FROM runs WHERE id = ?", (wanted,)).fetchone():
                return wanted
            rows = db.execute(
                "SELECT id FROM runs WHERE substr(id, 1, ?) = ? ORDER BY started DESC LIMIT 6",
                (len(wanted), wanted),
            ).fetchall()
        if not rows:
            raise StateError(
                f"no run {wanted!r} in {self.path}; `provisioner runs list` shows the recorded runs"
            )
        if len(rows) > 1:
            shown = ", ".join(r[0] for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            raise StateError(
                f"run id prefix {wanted!r} is ambiguous: it matches {shown}; give more characters"
            )
        return str(rows[0][0])

    def run(self, run_id: str) -> RunDetail:
        """A recorded run with all results and files; ``run_id`` may be a unique prefix."""
        full = self.resolve_run_id(run_id)
        with self._connect() as db:
            row = db.execute(_SELECT_RUNS + " WHERE id = ?", (full,)).fetchone()
            result_rows = db.execute(
                "SELECT workstation, status, message, attempts, duration, retryable, warnings "
                "FROM results WHERE run_id = ? ORDER BY workstation",
                (full,),
            ).fetchall()
            file_rows = db.execute(
                "SELECT workstation, user, kind, path, status, message, old_sha256, new_sha256, "
                "conflicts FROM files WHERE run_id = ? ORDER BY workstation, rowid",
                (full,),
            ).fetchall()
        if row is None:
            raise StateError(f"run {full!r} disappeared from {self.path} while being read")
        by_host: dict[str, list[StoredFile]] = {}
        for f in file_rows:
            by_host.setdefault(f[0], []).append(
                StoredFile(
                    workstation=f[0],
                    user=f[1],
                    kind=f[2],
                    path=f[3],
                    status=_status(f[4]),
                    message=f[5],
                    old_sha256=f[6],
                    new_sha256=f[7],
                    conflicts=tuple(json.loads(f[8] or "[]")),
                )
            )
        [summary] = self._as_live([self._summary(row)])
        results = tuple(
            StoredResult(
                workstation=r[0],
                status=_status(r[1]),
                message=NOT_REPORTED_YET if summary.running and r[2] == NOT_REPORTED else r[2],
                attempts=int(r[3]),
                duration=float(r[4]),
                retryable=bool(r[5]),
                warnings=tuple(json.loads(r[6] or "[]")),
                files=tuple(by_host.get(r[0], ())),
            )
            for r in result_rows
        )
        return RunDetail(summary, results)

    def hosts_to_retry(self, run_id: str | None = None) -> list[str]:
        """Workstations that failed, conflicted, were busy or skipped in a run, sorted.

        Without ``run_id``: the latest rollout that was not a dry run (a ``--check`` run
        reports what would change, which says nothing about what a real run left behind; a
        helpdesk push of one workstation must not hide a fleet rollout's failures).
        """
        if run_id is None:
            latest = self.latest_run(include_dry_runs=False, fleet_only=True)
            if latest is None:
                raise StateError(f"no rollout is recorded in {self.path} yet: nothing to retry")
            full = latest.id
        else:
            full = self.resolve_run_id(run_id)
        with self._connect() as db:
            rows = db.execute(
                "SELECT workstation FROM results WHERE run_id = ? AND status IN (?, ?, ?, ?) "
                "ORDER BY workstation",
                (full, *(s.value for s in RETRY_STATUSES)),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def last_results(
        self,
        workstation: str | None = None,
        user: str | None = None,
        *,
        include_dry_runs: bool = False,
    ) -> list[LastResult]:
        """The latest recorded status per workstation and user, optionally filtered.

        Names match case-insensitively, as Windows does. Dry runs are left out unless
        asked for: they tell what would change, not what the workstation holds.
        A run that failed before reaching any file (unreachable, credentials) counts as
        the latest result for every user known on that workstation.
        """
        with self._connect() as db:
            rows = db.execute(
                _LAST_RESULTS,
                {"workstation": workstation, "user": user, "dry": int(include_dry_runs)},
            ).fetchall()
        return [
            LastResult(
                workstation=r[0],
                user=r[1],
                kind=r[2],
                path=r[3],
                status=_status(r[4]),
                message=r[5],
                run_id=r[6],
                time=_parse_iso(r[7]),
                dry_run=bool(r[8]),
                old_sha256=r[9],
                new_sha256=r[10],
            )
            for r in rows
        ]

    # -- the rollout lock

    def read_lock(self) -> LockInfo | None:
        """What the lock file says about its last holder (informative only)."""
        try:
            text = self.lock_path.read_text(encoding="utf-8")
        except OSError:
            return None
        return LockInfo.from_json(text)

    def lock_holder(self) -> LockInfo | None:
        """Who holds the rollout lock now; None when no process does.

        The lock file's text alone cannot tell: a killed holder leaves it. A lock that can be
        taken is free; it is let go at once (a rollout starting in that instant is told the
        state is in use, as it is).
        """
        try:
            fd = os.open(self.lock_path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except OSError:
            return None
        try:
            holder = _read_fd(fd)
            if holder is None or not _try_lock(fd):
                return holder
            _unlock(fd)
            return None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, owner: str, *, who: str | None = None) -> Iterator[LockInfo]:
        """Hold the rollout lock of this state directory, or fail at once.

        An OS lock (flock on POSIX, msvcrt on Windows) on ``rollout.lock``: the OS releases
        it when the holder exits, even when killed, so a leftover file never blocks. The
        holder's details are written into the file for whoever finds it locked.

        Raises :class:`StateLockedError` naming the holder when another process holds it.
        """
        try:
            fd = _open_lock_file(self.lock_path)
        except OSError as exc:
            raise StateError(f"cannot open the lock file {self.lock_path}: {exc}") from exc
        try:
            if not _try_lock(fd):
                holder = _read_fd(fd)
                about = holder.describe() if holder else "a process that is still starting"
                raise StateLockedError(
                    f"another rollout is using the state in {self.directory}: {about}; wait "
                    "for it to end (the lock is released when that process exits)",
                    holder=holder,
                )
            info = LockInfo(owner, who or current_user(), controller_name(), os.getpid(), _now())
            try:
                _rewrite_fd(fd, info.to_json().encode("utf-8"))
                yield info
            finally:
                with contextlib.suppress(OSError):
                    # Leave the file (removing it would race with the next locker): empty it.
                    os.ftruncate(fd, 0)
                _unlock(fd)
        finally:
            os.close(fd)


def _now() -> datetime:
    return datetime.now(UTC)


def _read_fd(fd: int) -> LockInfo | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
    except OSError:
        return None
    return LockInfo.from_json(data.decode("utf-8", "replace"))


def _rewrite_fd(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    _write_all(fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --------------------------------------------------------------------------- audit log


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    """One change (or failed attempt) on one file, as stored in ``audit.jsonl``.

    Holds hashes, statuses and names only, never file content or a secret.
    """

    time: datetime
    who: str
    controller: str
    run_id: str
    action: str
    workstation: str
    user: str | None
    file: str | None
    sha256_before: str | None
    sha256_after: str | None
    status: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of one line, keys in a fixed order."""
        return {
            "time": _iso(self.time),
            "who": self.who,
            "controller": self.controller,
            "run_id": self.run_id,
            "action": self.action,
            "workstation": self.workstation,
            "user": self.user,
            "file": self.file,
            "sha256_before": self.sha256_before,
            "sha256_after": self.sha256_after,
            "status": self.status,
            "message": self.message,
        }

    @classmethod
    def now(
        cls,
        *,
        who: str,
        action: str,
        status: str,
        workstation: str = "",
        user: str | None = None,
        file: str | None = None,
        sha256_before: str | None = None,
        sha256_after: str | None = None,
        message: str = "",
        run_id: str = "",
        controller: str | None = None,
    ) -> AuditRecord:
        """A record stamped now, on this controller (for helpdesk actions)."""
        return cls(
            _now(),
            who,
            controller or controller_name(),
            run_id,
            action,
            workstation,
            user,
            file,
            sha256_before,
            sha256_after,
            status,
            message,
        )

    def __str__(self) -> str:
        where = " ".join(p for p in (self.workstation, self.user or "", self.file or "") if p)
        line = f"{_short(self.time)}  {self.who}@{self.controller}  {self.action}  {where}"
        line += f"  {self.status}"
        if self.sha256_before or self.sha256_after:
            line += f"  {_hash(self.sha256_before)} -> {_hash(self.sha256_after)}"
        if self.run_id:
            line += f"  run {self.run_id}"
        return line + (f"  {self.message}" if self.message else "")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """Parse one line's object; raises ValueError, KeyError or TypeError if malformed."""

        def optional(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        return cls(
            time=_parse_iso(str(data["time"])),
            who=str(data.get("who", "")),
            controller=str(data.get("controller", "")),
            run_id=str(data.get("run_id", "")),
            action=str(data["action"]),
            workstation=str(data.get("workstation", "")),
            user=optional("user"),
            file=optional("file"),
            sha256_before=optional("sha256_before"),
            sha256_after=optional("sha256_after"),
            status=str(data.get("status", "")),
            message=str(data.get("message", "")),
        )


def _moment(value: datetime | date | str | None, *, end: bool) -> datetime | None:
    """A bound for :meth:`AuditLog.query`; a bare date as ``until`` includes that day."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value + timedelta(days=1 if end else 0), datetime.min.time())
    else:
        text = value.strip()
        try:
            if len(text) == 10:
                return _moment(date.fromisoformat(text), end=end)
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise StateError(
                f"{value!r} is not a date or time: use 2024-05-31 or 2024-05-31T14:00Z"
            ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class AuditLog:
    """The append-only audit log ``<directory>/audit.jsonl``: one JSON object per line."""

    def __init__(self, directory: Path, *, lock_timeout: float = _BUSY_TIMEOUT) -> None:
        self.directory = Path(directory)
        self.path = self.directory / AUDIT_NAME
        self.lock_path = self.directory / AUDIT_LOCK_NAME
        self.lock_timeout = lock_timeout
        self._fingerprints: Fingerprints | None = None

    def _legacy(self, record: AuditRecord) -> AuditRecord:
        """A record written before fingerprints, shown with fingerprints like the others.

        Its line keeps the full SHA-256 (the log is never rewritten): see docs/rollout.md.
        """
        if not (is_legacy_hash(record.sha256_before) or is_legacy_hash(record.sha256_after)):
            return record
        if self._fingerprints is None:
            self._fingerprints = load_fingerprints(self.directory)
        return dataclasses.replace(
            record,
            sha256_before=self._fingerprints.of_legacy(record.sha256_before),
            sha256_after=self._fingerprints.of_legacy(record.sha256_after),
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = _open_lock_file(self.lock_path)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise StateLockedError(
                        f"the audit log {self.path} stayed locked for {self.lock_timeout:g} s "
                        "(another provisioner is writing it); try again"
                    )
                time.sleep(0.02)
            try:
                yield
            finally:
                _unlock(fd)
        finally:
            os.close(fd)

    def append(self, records: Iterable[AuditRecord], *, durable: bool = True) -> int:
        """Append records (fsynced, under a short lock); returns how many were written.

        The file is only ever opened for appending: existing lines are never rewritten.
        ``durable=False`` leaves the flush to disk to the system (or to :meth:`sync`): the
        lines then survive the process being killed, not a power cut.
        """
        lines = []
        for record in records:
            if record.action not in ACTIONS:
                raise StateError(
                    f"unknown audit action {record.action!r}; one of {', '.join(ACTIONS)}"
                )
            lines.append(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        if not lines:
            return 0
        data = "".join(lines).encode("utf-8")
        try:
            _make_directory(self.directory)
            with self._locked():
                created = not self.path.exists()
                flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
                fd = os.open(self.path, flags, 0o600)
                try:
                    size = os.fstat(fd).st_size
                    if size:
                        os.lseek(fd, size - 1, os.SEEK_SET)
                        # A writer died mid-line: start on a fresh line, keep the torn one.
                        if os.read(fd, 1) != b"\n":
                            data = b"\n" + data
                    _write_all(fd, data)
                    if durable:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                if created:
                    _fsync_directory(self.directory)
        except OSError as exc:
            raise StateError(f"cannot append to the audit log {self.path}: {exc}") from exc
        return len(lines)

    def sync(self) -> None:
        """Flush what was appended with ``durable=False`` to disk."""
        # Opened for appending, like every write: Windows flushes only a handle that may write.
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot sync the audit log {self.path}: {exc}") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise StateError(f"cannot sync the audit log {self.path}: {exc}") from exc
        finally:
            os.close(fd)

    def records(self) -> Iterator[AuditRecord]:
        """Every readable record in file order; torn or malformed lines are skipped."""
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot read the audit log {self.path}: {exc}") from exc
        with handle:
            for raw in handle:
                try:
                    data = json.loads(raw.decode("utf-8"))
                    if not isinstance(data, dict):
                        continue
                    record = AuditRecord.from_dict(data)
                except (ValueError, KeyError, TypeError):
                    continue
                yield self._legacy(record)

    def query(
        self,
        user: str | None = None,
        workstation: str | None = None,
        since: datetime | date | str | None = None,
        until: datetime | date | str | None = None,
        action: str | None = None,
        run_id: str | None = None,
    ) -> list[AuditRecord]:
        """Records matching every filter given, oldest first.

        Names match case-insensitively. ``since`` is inclusive, ``until`` exclusive; a bare
        date (``2024-05-31``) as ``until`` includes that whole day. Times without a zone
        are UTC, like every time the provisioner writes. ``run_id`` may be a prefix.
        """
        start = _moment(since, end=False)
        stop = _moment(until, end=True)
        wanted_user = user.casefold() if user is not None else None
        wanted_host = workstation.casefold() if workstation is not None else None
        found = []
        for record in self.records():
            if wanted_user is not None and (record.user or "").casefold() != wanted_user:
                continue
            if wanted_host is not None and record.workstation.casefold() != wanted_host:
                continue
            if action is not None and record.action != action:
                continue
            if run_id is not None and not record.run_id.startswith(run_id):
                continue
            if start is not None and record.time < start:
                continue
            if stop is not None and record.time >= stop:
                continue
            found.append(record)
        return found


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def records_for_results(
    results: Iterable[HostResult],
    *,
    who: str,
    action: str,
    run_id: str,
    fingerprints: Fingerprints,
    when: datetime | None = None,
    controller: str | None = None,
) -> list[AuditRecord]:
    """Audit records for workstation results: one per changed file, one per failed file.

    A workstation that failed outside its files (unreachable, credentials) gets one record
    with ``file`` None. Dry-run results change nothing and give no record. Files' hashes are
    recorded as ``fingerprints`` (those of the state folder the log is in).
    """
    blank = AuditRecord(
        time=when or _now(),
        who=who,
        controller=controller or controller_name(),
        run_id=run_id,
        action=action,
        workstation="",
        user=None,
        file=None,
        sha256_before=None,
        sha256_after=None,
        status="",
        message="",
    )
    records: list[AuditRecord] = []
    for result in sorted(results, key=lambda r: r.host):
        if result.dry_run:
            continue
        worst = max((c.status for c in result.files), key=lambda s: s.rank, default=None)
        if result.status in _FAILURES and (worst is None or result.status.rank > worst.rank):
            records.append(
                dataclasses.replace(
                    blank,
                    workstation=result.host,
                    status=result.status.value,
                    message=result.message,
                )
            )
        records += [
            dataclasses.replace(
                blank,
                workstation=result.host,
                user=change.user,
                file=change.path,
                sha256_before=fingerprints.of(change.old_sha256),
                sha256_after=fingerprints.of(change.new_sha256),
                status=change.status.value,
                message=change.message,
            )
            for change in result.files
            if change.status == Status.CHANGED or change.status in _FAILURES
        ]
    return records


def records_for_run(
    run: RunLike, who: str, action: str = "push", *, fingerprints: Fingerprints
) -> list[AuditRecord]:
    """Audit records for a run (see :func:`records_for_results`); none for a dry run."""
    if is_dry_run(run):
        return []
    return records_for_results(
        run.results.values(),
        who=who,
        action=action,
        run_id=run.run_id,
        fingerprints=fingerprints,
        when=run.finished or run.started,
    )


# Until the run ends, its row says it did not: what a killed run leaves.
JOURNAL_STOPPED = (
    "interrupted: the run did not finish (the controller was stopped or killed); "
    "workstations marked 'not reported' may or may not have been written"
)
NOT_REPORTED = (
    "not reported: the run ended before this workstation's result came back; it may or may "
    "not have been written (see 'provisioner diff')"
)
# What a workstation marked NOT_REPORTED is shown with while its run is still going.
NOT_REPORTED_YET = "not reported yet: the run is still going"


class RunJournal:
    """A run recorded as it goes, so that a run killed halfway leaves what it did.

    :meth:`begin` records the run, marked interrupted, with every workstation ``skipped``
    and "not reported"; :meth:`host_done` appends a workstation's audit records (first: the
    log must not miss a change the history shows) and stores its result as it completes;
    :meth:`finish` records how the run ended. Until then, the run reads as running while its
    rollout holds the lock (:meth:`StateStore.runs`). A run killed before :meth:`finish` stays
    marked interrupted, lists every workstation that completed, and offers the others to
    ``rollout --only-failed``.
    """

    def __init__(
        self, store: StateStore, *, who: str, command: str, action: str, revision: str
    ) -> None:
        self.store = store
        self.log = AuditLog(store.directory)
        self.who, self.command, self.action, self.revision = who, command, action, revision
        self.run_id = ""
        self._db: sqlite3.Connection | None = None

    def begin(self, run: RunLike, hosts: Iterable[str]) -> None:
        """Record the run as interrupted, with ``hosts`` not reported yet.

        Raises :class:`StateError` before recording anything when the fingerprint key is
        damaged: results could not be recorded, so no workstation should be pushed.
        """
        self._fingerprints = self.store.fingerprints
        self.run_id = run.run_id
        pending = _PendingRun(run, hosts)
        self.store.record_run(pending, who=self.who, command=self.command, revision=self.revision)
        self._db = self.store.open_held()

    def host_done(self, result: HostResult) -> None:
        """One workstation ended: its audit records, then its result in the run."""
        if result.dry_run:
            return
        records = records_for_results(
            [result],
            who=self.who,
            action=self.action,
            run_id=self.run_id,
            fingerprints=self._fingerprints,
        )
        # Written through to the system at once (a killed process loses nothing); flushed to
        # disk with the run's end, so that a fleet's worth of fsyncs does not slow the run.
        self.log.append(records, durable=False)
        self.store.record_host(self.run_id, result, held=self._db)

    def finish(self, run: RunLike) -> None:
        """The run ended (normally, or aborted: ``run.stopped`` says how).

        The run's end is recorded and its connection closed even when the audit log cannot
        be flushed (that error is raised afterwards).
        """
        try:
            self.log.sync()
        finally:
            try:
                self.store.finish_run(self.run_id, run.stopped)
            finally:
                if self._db is not None:
                    self._db.close()
                    self._db = None


class _PendingRun:
    """A run as :meth:`RunJournal.begin` records it."""

    def __init__(self, run: RunLike, hosts: Iterable[str]) -> None:
        self.run_id, self.started, self.options = run.run_id, run.started, run.options
        self.finished: datetime | None = None
        self.stopped = JOURNAL_STOPPED
        self.results = {
            host: HostResult(host, Status.SKIPPED, NOT_REPORTED, attempts=0) for host in hosts
        }
