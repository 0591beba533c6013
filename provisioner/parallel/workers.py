"""Work split over forked worker processes, its results pickled back through pipes.

Phase 1 of a large inventory is pure CPU work on data already in memory; forking shares that
data with the workers for free (copy-on-write), so only results travel back, through a pipe
(never a file). Every child speaks one message format, pickled frames:

- ``("ok", result)`` for each result, in the order the child makes them;
- ``("end",)`` once it has made them all;
- ``("error", exception, where, traceback)`` when its work raised (then it stops).

A child whose result or exception cannot be pickled (a ``Secret`` refuses to be) exits with
code 70 instead, and the parent raises a :class:`WorkerError`: an internal error, which
nothing translates and the command line reports as such (exit 70).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO, ClassVar, TypeVar

from provisioner.errors import InternalError
from provisioner.parallel.processes import reap

if sys.platform == "linux":
    import fcntl

Item = TypeVar("Item")
Result = TypeVar("Result")
_Child = tuple[multiprocessing.process.BaseProcess, BinaryIO]
# A child's pipe holds this much: two parts of a build worker's results (about 410 kB for 500
# targets each); 1 MiB is the most Linux gives an unprivileged process by default.
PIPE_BYTES = 1024 * 1024


class WorkerError(InternalError):
    """A worker process failed without an exception that could travel back."""

    code: ClassVar[str] = "worker"


def map_chunks(
    work: Callable[[Sequence[Item]], Iterable[Result]], items: Sequence[Item], workers: int
) -> list[Result]:
    """Every result ``work(chunk)`` yields, for ``items`` cut into ``workers`` contiguous
    chunks, chunk after chunk: the first chunk here, the others in forked children.

    A child sends each result as it is yielded, and a thread here reads it while this process
    works on its own chunk: neither side piles up the other's results, and nothing is left to
    read when this process is done. An exception raised by ``work`` in a child is raised here
    once this process has done its own chunk.
    """
    chunks = _split(items, workers)
    if len(chunks) <= 1:
        return [result for chunk in chunks for result in work(chunk)]
    children: list[_Child] = []
    readers: list[_Reader] = []
    try:
        for chunk in chunks[1:]:
            _start(children, work, chunk)
        # Threads only once every child is forked: a child must not inherit a running thread.
        readers = [_Reader(process, stream) for process, stream in children]
        results = list(work(chunks[0]))
        for reader in readers:
            results.extend(reader.results())
        return results
    finally:
        for reader in readers:
            reader.stop()
        _end(children)


def map_ordered(
    work: Callable[[Item], Result], items: Sequence[Item], workers: int
) -> Iterator[Result]:
    """``work(item)`` for every item, in order, computed by ``workers`` forked children.

    Items are dealt round-robin, so the first results arrive at once and the caller consumes
    them while the children go on. Stopping the iteration early ends the children.
    """
    if workers <= 1 or len(items) <= 1:
        yield from (work(item) for item in items)
        return
    children: list[_Child] = []

    def each(share: Sequence[Item]) -> Iterator[Result]:
        return (work(item) for item in share)

    try:
        for first in range(min(workers, len(items))):
            _start(children, each, items[first::workers])
        for index in range(len(items)):
            process, stream = children[index % len(children)]
            message = _receive(process, stream)
            if message[0] != "ok":
                raise _no_result(process)  # "end" before all of its items: cannot happen
            yield message[1]
    finally:
        _end(children)


def _split(items: Sequence[Item], parts: int) -> list[Sequence[Item]]:
    """``items`` cut into ``parts`` contiguous chunks of nearly equal size, order kept."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    chunks: list[Sequence[Item]] = []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


class _Reader:
    """A thread that reads one child's results as they arrive."""

    def __init__(self, process: multiprocessing.process.BaseProcess, stream: BinaryIO) -> None:
        self.process, self.stream = process, stream
        self.received: list[Any] = []
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (message := _receive(self.process, self.stream))[0] == "ok":
                self.received.append(message[1])
        except BaseException as exc:  # raised in the main thread by results()
            self.failure = exc

    def results(self) -> list[Any]:
        """What the child sent, once it has finished; its failure raised here."""
        self.thread.join()
        # Dropped before raising: the exception's traceback leads back to this reader (a
        # cycle that would keep the results, passwords included, until a collection).
        failure, self.failure = self.failure, None
        if failure is not None:
            self.received = []
            try:
                raise failure
            finally:
                del failure  # this frame, in the traceback, must not hold the exception
        return self.received

    def stop(self) -> None:
        """End the child early (this process failed or was interrupted) and the thread."""
        if self.thread.is_alive():
            # Its end of the pipe closing gives the thread end-of-file; closing the stream
            # under a thread blocked in read() could hang.
            self.process.terminate()
            self.thread.join()
        self.failure, self.received = None, []


def results_pipe() -> tuple[int, int]:
    """A pipe for a child's results: its read and write descriptors, holding ``PIPE_BYTES``
    where the system allows it."""
    read_fd, write_fd = os.pipe()
    if sys.platform == "linux":
        # A child writes each message whole; with the default 64 KiB it waited for this
        # process's reader thread at every 64 KiB, and the thread waited for the interpreter
        # lock, held by this process's own work: 1.21-1.28x the wall time (docs/performance.md).
        with contextlib.suppress(OSError):  # above the system's limit: keep the default
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return read_fd, write_fd


def _start(
    children: list[_Child],
    work: Callable[[Sequence[Any]], Iterable[Any]],
    share: Sequence[Any],
) -> None:
    """Fork a child that sends ``work(share)``'s results; keep it and its pipe's reader."""
    read_fd, write_fd = results_pipe()
    reader: BinaryIO = os.fdopen(read_fd, "rb")
    # The child closes the parent's readers of its older siblings: kept open, they would hide
    # from a sibling that the parent stopped reading (no EPIPE), and it would block until killed.
    siblings = [stream.fileno() for _, stream in children]
    child = multiprocessing.get_context("fork").Process(
        target=_child, args=(work, share, read_fd, write_fd, siblings), daemon=True
    )
    children.append((child, reader))
    try:
        child.start()
    finally:
        os.close(write_fd)


def _end(children: Sequence[_Child]) -> None:
    for process, stream in children:
        stream.close()
        if reap(process, 1.0) is not None:
            process.close()  # its sentinel descriptor, now rather than when collected


def _child(
    work: Callable[[Sequence[Item]], Iterable[Result]],
    share: Sequence[Item],
    read_fd: int,
    write_fd: int,
    siblings: Sequence[int],
) -> None:
    # Ctrl-C is the parent's to handle; no reader of any pipe stays open here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.close(read_fd)
    for fd in siblings:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        with os.fdopen(write_fd, "wb") as stream:
            for message in _messages(work, share):
                pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
    except BrokenPipeError:  # the parent stopped reading (it has what it wanted, or it is gone)
        os._exit(0)
    except BaseException:  # an unpicklable result (a Secret)
        # Part of the message may be in the pipe already: the parent sees a broken stream
        # and reports this exit code.
        os._exit(_UNPICKLABLE)


def _messages(
    work: Callable[[Sequence[Item]], Iterable[Result]], share: Sequence[Item]
) -> Iterator[tuple[Any, ...]]:
    """``("ok", result)`` for each result, then ``("end",)`` or the failure of ``work``."""
    results: Iterator[Result] | None = None
    while True:
        try:
            if results is None:
                results = iter(work(share))
            result = next(results)
        except StopIteration:
            yield ("end",)
            return
        except BaseException as exc:  # every failure must reach the parent
            yield ("error", _sendable(exc), _innermost(exc), traceback.format_exc())
            return
        yield ("ok", result)


def _receive(process: multiprocessing.process.BaseProcess, stream: BinaryIO) -> tuple[Any, ...]:
    """The child's next message; its exception raised, or WorkerError for a broken stream."""
    try:
        message = pickle.load(stream)  # noqa: S301 - our own forked child writes it
    except Exception:  # a broken stream, or an exception class that cannot be rebuilt here
        raise _no_result(process) from None
    if message[0] == "error":
        _, error, where, remote = message
        error.add_note(f"(raised in a worker process at {where})")
        try:
            raise error from _RemoteTraceback(remote)
        finally:
            del error, message  # this frame, in the traceback, must not hold the exception
    return tuple(message)


def _no_result(process: multiprocessing.process.BaseProcess) -> WorkerError:
    # A child may still be writing (its stream could not be read here): it would never end.
    code = reap(process, 1.0)
    return WorkerError(f"a worker process ended without a result (exit code {code})")


class _RemoteTraceback(Exception):
    """The worker's traceback, as text (shown as the cause of its exception)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling both ways, else a WorkerError naming only its type."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes
    except Exception:
        return WorkerError(f"{type(exc).__name__} in a worker process")
    return exc


def _innermost(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


# Exit code of a worker whose result or exception could not be serialised.
_UNPICKLABLE = 70
