"""Phase 1 split over forked workers gives exactly what one process gives, failures included."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from provisioner import parallel
from provisioner.inventory.model import Secret
from provisioner.parallel.processes import MAX_WORKERS
from provisioner.render import build
from tests.phase1kit import EXAMPLE, real_opener, secret_for, write_inventory

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


@pytest.mark.parametrize("per_part", [500, 7])
def test_workers_build_the_same_files_in_the_same_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_part: int
) -> None:
    monkeypatch.setattr(build, "TARGETS_PER_PART", per_part)  # 7: each worker sends 3 parts
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
    assert parallel.workers_for(10, per_worker=1000) == 1
    others = threading.active_count() > 1  # a lab thread left by another test, say
    expected = 1 if others else min(parallel.available_cores(), MAX_WORKERS)
    assert parallel.workers_for(10**6, per_worker=1) == expected
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert parallel.workers_for(10**6, per_worker=1) == 1
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


def _per_chunk(work: Callable[[Sequence[int]], object]) -> Callable[[Sequence[int]], list[object]]:
    """``work`` giving one result per chunk, as map_chunks takes it."""
    return lambda chunk: [work(chunk)]


def test_map_chunks_keeps_order_and_reports_failures() -> None:
    items = list(range(10))
    chunks = parallel.map_chunks(_per_chunk(list), items, 3)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert parallel.map_chunks(_per_chunk(sum), items, 3) == [6, 15, 24]
    with pytest.raises(ValueError, match="bad chunk starting at 4") as failure:
        parallel.map_chunks(_per_chunk(_fail_in_second_chunk), items, 3)
    # Where the worker failed travels with the exception: a note and the remote traceback.
    [note] = failure.value.__notes__
    assert note.startswith("(raised in a worker process at ") and __file__ in note
    assert "_fail_in_second_chunk" in str(failure.value.__cause__)
    with pytest.raises(parallel.WorkerError, match="_NeedsKeyword in a worker process"):
        parallel.map_chunks(_per_chunk(_unrebuildable_in_second_chunk), items, 3)
    with pytest.raises(parallel.WorkerError, match="exit code 7"):
        parallel.map_chunks(_per_chunk(_die_in_second_chunk), items, 3)
    assert parallel.map_chunks(_per_chunk(list), [1], 4) == [[1]]


def _secret_in_second_chunk(chunk: Sequence[int]) -> object:
    return Secret("canary-password") if 0 not in chunk else sum(chunk)


def test_a_secret_never_travels_between_processes(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(parallel.WorkerError, match="exit code 70") as failure:
        parallel.map_chunks(_per_chunk(_secret_in_second_chunk), list(range(4)), 2)
    out, err = capfd.readouterr()
    assert "canary-password" not in str(failure.value) + out + err


def _encode_or_fail(item: int) -> bytes:
    if item == 5:
        raise ValueError(f"bad item {item}")
    if item == 7:
        os._exit(9)
    return str(item * item).encode()


def test_map_ordered_keeps_order_while_children_stream() -> None:
    items = list(range(5))
    for workers in (1, 2, 3, 8):
        assert [int(b) for b in parallel.map_ordered(_encode_or_fail, items, workers)] == [
            0,
            1,
            4,
            9,
            16,
        ]
    results = parallel.map_ordered(_encode_or_fail, list(range(7)), 2)
    # Every result before the failing item arrives; then its exception, with where it came from.
    assert [int(next(results)) for _ in range(5)] == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="bad item 5") as failure:
        next(results)
    assert failure.value.__notes__[0].startswith("(raised in a worker process at ")
    with pytest.raises(parallel.WorkerError, match="exit code 9"):
        list(parallel.map_ordered(_encode_or_fail, [6, 7, 8, 9], 2))


def test_inventory_files_composed_by_workers_give_the_same_trees(tmp_path: Path) -> None:
    from provisioner.inventory import loader

    root = write_inventory(
        tmp_path / "inv",
        {
            "a.yaml": "groups:\n  site:\n    account: {transport: tls, transport: udp}\n",
            "b.yaml": 'users:\n  u1:\n    display_name: "a\\ud800b \\U0001f600 \\t"\n',
            "c.yaml": "workstations:\n  ws1: {users: [u1]\n",  # not YAML
            "d.yaml": "defaults:\n  settings: " + "[" * 600 + "]" * 600 + "\n",
            "e.yaml": "defaults: &d {settings: {EC: 1, n: .nan, i: 0x1f, f: 1.5e3, o: ~}}\nx: *d\n",
        },
        dedent=False,
    )
    files = loader.inventory_files(root)
    serial = list(loader._trees(files, 1))
    forked_trees = list(loader._trees(files, 2))
    assert [p for p, _ in forked_trees] == [p for p, _ in serial] == files
    for (_, one), (_, other) in zip(serial, forked_trees, strict=True):
        if isinstance(one, Exception):
            assert type(other) is type(one) and str(other) == str(one)
            assert (other.line, other.column) == (one.line, one.column)  # type: ignore[union-attr]
        else:
            assert repr(other) == repr(one)  # NaN != NaN, so compare the whole repr
    errors = [str(e) for _, e in serial if isinstance(e, Exception)]
    assert any("c.yaml:" in e and "invalid YAML" in e for e in errors)
    assert any("nested too deeply" in e for e in errors)
    problems = [t[1] for _, t in serial if not isinstance(t, Exception) and t[1]]
    assert problems and "transport" in problems[0][0].message
    composed = forked_trees[1][1]  # composed in the second worker
    assert not isinstance(composed, Exception)
    tree, _ = composed
    users = tree.get("users") if tree is not None else None
    user = users.get("u1") if users is not None else None
    name = user.get("display_name") if user is not None else None
    assert name is not None and name.value == "a\ud800b \U0001f600 \t"


def test_a_tree_nested_as_deep_as_allowed_travels_between_processes(tmp_path: Path) -> None:
    from provisioner.inventory import yamldoc

    levels = yamldoc.MAX_DEPTH - 2  # between the top-level mapping and the innermost one
    path = tmp_path / "a.yaml"
    path.write_text("a: " + "[" * levels + "{k: 1}" + "]" * levels + "\n")
    expected = yamldoc.load_tree(path)
    assert list(parallel.map_ordered(yamldoc.load_tree, [path, path], 2)) == [expected] * 2


def _big(item: int) -> bytes:
    return bytes([item % 256]) * 200_000  # more than a pipe holds


def _parts(chunk: Sequence[int]) -> list[bytes]:
    if 0 in chunk:
        time.sleep(0.3)  # this process is busy while the children fill their pipes
    return [_big(item) for item in chunk]


def _fail_after_two(chunk: Sequence[int]) -> Iterator[int]:
    yield from chunk[:2]
    if 0 not in chunk:
        raise ValueError(f"bad item {chunk[2]}")
    yield from chunk[2:]


def _busy_forever(chunk: Sequence[int]) -> Iterator[bytes]:
    if 0 in chunk:
        raise KeyError("this process failed first")
    while True:
        yield _big(1)


def test_map_chunks_keeps_order_and_ends_children_on_failure() -> None:
    items = list(range(12))
    # 200 kB results, 4 per child: far more than a pipe holds while this process sleeps.
    assert parallel.map_chunks(_parts, items, 3) == [_big(i) for i in range(12)]
    with pytest.raises(ValueError, match="bad item 6"):
        parallel.map_chunks(_fail_after_two, items, 3)
    assert threading.active_count() == 1  # no reader left: push lanes may fork after this
    start = time.monotonic()
    with pytest.raises(KeyError, match="this process failed first"):
        parallel.map_chunks(_busy_forever, items, 3)
    assert time.monotonic() - start < 10  # the endless children were ended, not waited for
    assert threading.active_count() == 1


def test_a_failure_leaves_no_reference_cycle_behind() -> None:
    # A cycle through the exception would keep every result (rendered files, passwords
    # included) until a collection, and for good once frozen (the push lanes freeze what exists).
    gc.collect()
    gc.disable()
    try:
        with contextlib.suppress(ValueError):
            parallel.map_chunks(_fail_after_two, list(range(12)), 3)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = sorted({type(o).__name__ for o in gc.garbage} & {"frame", "_Reader", "list"})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []


def test_stopping_early_ends_the_workers_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    results = parallel.map_ordered(_big, list(range(8)), 4)
    assert next(results) == _big(0)
    results.close()  # the workers are blocked writing: each must see the pipe close
    _, err = capfd.readouterr()
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes are Linux's")
def test_a_childs_results_pipe_holds_whole_parts() -> None:
    # With the default 64 KiB a child waited for this process at every 64 KiB of a part
    # (about 410 kB): 1.21-1.28x the wall time of Phase 1 (docs/performance.md).
    import fcntl

    from provisioner.parallel import workers

    allowed = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    read_fd, write_fd = workers.results_pipe()
    try:
        size = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert size >= min(workers.PIPE_BYTES, allowed)
    assert workers.PIPE_BYTES >= 2 * 410_000
