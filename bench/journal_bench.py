"""Benchmark of recording a rollout: once at the end (before) against the journal (now).

For N workstations with one changed microsip.ini and one changed override.ini each (two
audit records per workstation, the most a normal push writes), in a fresh state folder:

* "at the end": ``record_run`` of the whole run, then one audit append of every record (what
  the rollout did before it recorded as it went);
* "journal": ``RunJournal.begin``, ``host_done`` for each workstation (its audit append,
  written through to the system without an fsync, then its SQLite commit, which does not
  wait for the disk either), ``finish`` (one fsync of the audit log, one full-sync commit).

Both run in this one process, alternately, several times; the figures are the median wall
time, the cost per workstation, and the ratio. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from provisioner.records import state
from provisioner.records.results import FileChange, HostResult, Status
from provisioner.rollout.runner import RolloutOptions, RunResult


def _result(index: int) -> HostResult:
    host = f"ws{index:05d}"
    digest = hashlib.sha256(host.encode()).hexdigest()
    files = [
        FileChange(
            "microsip",
            f"u{index}",
            f"C:\\Users\\u{index}\\AppData\\Roaming\\MicroSIP\\microsip.ini",
            Status.CHANGED,
            old_sha256=None,
            new_sha256=digest,
        ),
        FileChange(
            "override",
            None,
            "C:\\Program Files\\MicroSIP\\override.ini",
            Status.CHANGED,
            old_sha256=digest,
            new_sha256=digest[::-1],
        ),
    ]
    return HostResult(host, Status.CHANGED, "2 changed", files, duration=0.1)


def _run(hosts: int) -> RunResult:
    run = RunResult("bench0000001", datetime.now(UTC), RolloutOptions())
    run.results = {r.host: r for r in (_result(i) for i in range(hosts))}
    run.batches = [sorted(run.results)]
    return run


def at_the_end(folder: Path, run: RunResult) -> float:
    start = time.perf_counter()
    store = state.StateStore(folder)
    store.record_run(run, who="bench", command="rollout")
    records = state.records_for_run(run, "bench", fingerprints=store.fingerprints)
    state.AuditLog(folder).append(records)
    return time.perf_counter() - start


def journal(folder: Path, run: RunResult) -> float:
    start = time.perf_counter()
    store = state.StateStore(folder)
    book = state.RunJournal(store, who="bench", command="rollout", action="push", revision="")
    book.begin(run, run.batches[0])
    for result in run.results.values():
        book.host_done(result)
    book.finish(run)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="Where to write (default: TMPDIR).")
    args = parser.parse_args()
    run = _run(args.hosts)
    figures: dict[str, list[float]] = {"at the end": [], "journal": []}
    for _ in range(args.repeat):
        for name, how in (("at the end", at_the_end), ("journal", journal)):
            with tempfile.TemporaryDirectory(dir=args.dir) as folder:
                figures[name].append(how(Path(folder) / "state", run))
    end, book = (statistics.median(figures[k]) for k in ("at the end", "journal"))
    print(f"{args.hosts} workstations, 2 changed files each, median of {args.repeat}:")
    print(f"  at the end: {end:8.3f} s  ({end / args.hosts * 1000:.2f} ms per workstation)")
    print(f"  journal:    {book:8.3f} s  ({book / args.hosts * 1000:.2f} ms per workstation)")
    print(f"  ratio journal / at the end: {book / end:.1f}x")


if __name__ == "__main__":
    main()
