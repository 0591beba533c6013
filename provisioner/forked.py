"""CPU-bound work split over forked worker processes (POSIX), or run serially.

Phase 1 of a large inventory is pure CPU work on data already in memory; forking after the
load shares that data with the workers for free (copy-on-write), so only each chunk's results
travel back, pickled through a pipe (never a file). Forking is used only where it is safe:
a platform with ``fork`` and a process with a single thread (a forked child inherits locks held
by other threads, which could deadlock it).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_workers(items: int, *, per_worker: int) -> int:
    """How many processes are worth using for ``items`` items (1: stay serial)."""
    if not hasattr(os, "fork") or threading.active_count() > 1:
        return 1
    return max(1, min(available_cores(), items // max(1, per_worker)))


def split(items: Sequence[Item], parts: int) -> list[Sequence[Item]]:
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


class WorkerError(RuntimeError):
    """A worker process failed without an exception that could travel back."""


def map_chunks(
    work: Callable[[Sequence[Item]], Result], chunks: Sequence[Sequence[Item]]
) -> list[Result]:
    """``work(chunk)`` for every chunk, in order: the first here, the others in forked children.

    An exception raised by ``work`` in a child is raised here. Results must be picklable; they
    are streamed through a pipe (pickle frames), so neither side holds a second, serialised
    copy of a large result.
    """
    if len(chunks) <= 1:
        return [work(chunk) for chunk in chunks]
    context = multiprocessing.get_context("fork")
    children: list[tuple[multiprocessing.process.BaseProcess, BinaryIO]] = []
    try:
        for chunk in chunks[1:]:
            read_fd, write_fd = os.pipe()
            child = context.Process(
                target=_child, args=(work, chunk, read_fd, write_fd), daemon=True
            )
            child.start()
            os.close(write_fd)
            children.append((child, os.fdopen(read_fd, "rb")))
        results = [work(chunks[0])]
        results.extend(_receive(process, stream) for process, stream in children)
        return results
    finally:
        for process, stream in children:
            stream.close()
            if process.is_alive():
                process.terminate()
            process.join()


def _receive(process: multiprocessing.process.BaseProcess, stream: BinaryIO) -> Any:
    try:
        status, payload = pickle.load(stream)  # noqa: S301 - our own forked child writes it
    except (EOFError, pickle.UnpicklingError):
        process.join()
        raise WorkerError(
            f"a worker process ended without a result (exit code {process.exitcode})"
        ) from None
    if status == "error":
        raise payload
    return payload


def _child(
    work: Callable[[Sequence[Item]], Result], chunk: Sequence[Item], read_fd: int, write_fd: int
) -> None:
    os.close(read_fd)
    try:
        message: tuple[str, Any] = ("ok", work(chunk))
    except BaseException as exc:  # every failure must reach the parent
        message = ("error", exc)
    with os.fdopen(write_fd, "wb") as stream:
        try:
            pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            # Part of the message may be in the pipe already: the parent sees a broken stream
            # and reports this exit code.
            os._exit(_UNPICKLABLE)


# Exit code of a worker whose result or exception could not be serialised.
_UNPICKLABLE = 70
