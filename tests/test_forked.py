"""Phase 1 split over forked workers gives exactly what one process gives, failures included."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from provisioner import build, forked
from provisioner.model import Secret
from tests.test_build import EXAMPLE, real_opener, secret_for, write_inventory

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _inventory(root: Path, users: int, *, bad_user: int | None = None) -> Path:
    stations = ["workstations:"]
    people = ["users:"]
    for i in range(users):
        stations.append(f"  ws{i:03d}: {{users: [u{i:03d}], groups: [site]}}")
        # A hook with quoted arguments in one user's settings: a lint finding from one chunk.
        extra = "    settings: {cmdIncomingCall: 'crm.exe \"a b\"'}\n" if i == bad_user else ""
        people.append(
            f"  u{i:03d}:\n    windows: ACME\\u{i:03d}\n{extra}"
            f"    accounts:\n      main: {{sip_uri: {1000 + i}@pbx.example.com, password: SEAL}}"
        )
    return write_inventory(
        root,
        {
            "groups.yaml": "groups:\n  site:\n    account: {transport: tls}\n",
            "workstations.yaml": "\n".join(stations) + "\n",
            "users.yaml": "\n".join(people) + "\n",
        },
        dedent=False,
    )


def _summary(result: build.BuildResult) -> tuple[object, ...]:
    return (
        [(f.relative_path, f.data, f.install, f.secret_paths, f.windows) for f in result.files],
        [f.target for f in result.files],
        result.findings,
        result.targets,
    )


def test_workers_build_the_same_files_in_the_same_order(tmp_path: Path) -> None:
    root = _inventory(tmp_path / "inv", 30, bad_user=23)
    serial = build.build(root, opener_factory=real_opener, workers=1)
    parallel = build.build(root, opener_factory=real_opener, workers=3)
    assert serial.workers == 1 and parallel.workers == 3
    assert len(serial.files) == 60
    assert _summary(parallel) == _summary(serial)
    [finding] = parallel.findings
    assert finding.code == "hook-quotes" and finding.file == "ws023/u023/microsip.ini"
    # Real decryption happened in the children: each file holds its own user's password.
    microsip = next(f for f in parallel.files if f.relative_path == "ws029/u029/microsip.ini")
    assert microsip.document.get("Account1", "password") == secret_for(
        "/users/u029/accounts/main/password"
    )
    assert set(parallel.timings) >= {"load", "resolve", "open", "render", "lint"}


def test_example_inventory_is_the_same_with_workers() -> None:
    serial = build.build(EXAMPLE, workers=1)
    parallel = build.build(EXAMPLE, workers=2)
    assert _summary(parallel) == _summary(serial)


def test_small_or_threaded_runs_stay_serial() -> None:
    assert forked.usable_workers(10, per_worker=1000) == 1
    others = threading.active_count() > 1  # a lab thread left by another test, say
    expected = 1 if others else min(forked.available_cores(), forked.MAX_WORKERS)
    assert forked.usable_workers(10**6, per_worker=1) == expected
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert forked.usable_workers(10**6, per_worker=1) == 1
    finally:
        stop.set()
        thread.join()


def _fail_in_second_chunk(chunk: Sequence[int]) -> int:
    if 0 not in chunk:
        raise ValueError(f"bad chunk starting at {chunk[0]}")
    return sum(chunk)


def _die_in_second_chunk(chunk: Sequence[int]) -> int:
    if 0 not in chunk:
        sys.stdout.flush()
        os._exit(7)
    return sum(chunk)


class _NeedsKeyword(Exception):
    def __init__(self, *, host: str) -> None:
        super().__init__(f"failed on {host}")


def _unrebuildable_in_second_chunk(chunk: Sequence[int]) -> int:
    if 0 not in chunk:
        raise _NeedsKeyword(host="ws1")
    return sum(chunk)


def test_map_chunks_keeps_order_and_reports_failures() -> None:
    chunks = forked.split(list(range(10)), 3)
    assert [list(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert forked.map_chunks(sum, chunks) == [6, 15, 24]
    with pytest.raises(ValueError, match="bad chunk starting at 4") as failure:
        forked.map_chunks(_fail_in_second_chunk, chunks)
    # Where the worker failed travels with the exception: a note and the remote traceback.
    [note] = failure.value.__notes__
    assert note.startswith("(raised in a worker process at ") and __file__ in note
    assert "_fail_in_second_chunk" in str(failure.value.__cause__)
    with pytest.raises(forked.WorkerError, match="_NeedsKeyword in a worker process"):
        forked.map_chunks(_unrebuildable_in_second_chunk, chunks)
    with pytest.raises(forked.WorkerError, match="exit code 7"):
        forked.map_chunks(_die_in_second_chunk, chunks)
    assert forked.split([1], 4) == [[1]]


def _secret_in_second_chunk(chunk: Sequence[int]) -> object:
    return Secret("canary-password") if 0 not in chunk else sum(chunk)


def test_a_secret_never_travels_between_processes(capfd: pytest.CaptureFixture[str]) -> None:
    chunks = forked.split(list(range(4)), 2)
    with pytest.raises(forked.WorkerError, match="exit code 70") as failure:
        forked.map_chunks(_secret_in_second_chunk, chunks)
    out, err = capfd.readouterr()
    assert "canary-password" not in str(failure.value) + out + err
