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
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

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

    An exception raised by ``work`` in a child is raised here. Results must be picklable.
    """
    if len(chunks) <= 1:
        return [work(chunk) for chunk in chunks]
    context = multiprocessing.get_context("fork")
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for chunk in chunks[1:]:
            receiver, sender = context.Pipe(duplex=False)
            child = context.Process(target=_child, args=(work, chunk, sender), daemon=True)
            child.start()
            sender.close()
            children.append((child, receiver))
        results = [work(chunks[0])]
        results.extend(_receive(process, receiver) for process, receiver in children)
        return results
    finally:
        for process, receiver in children:
            receiver.close()
            if process.is_alive():
                process.terminate()
            process.join()


def _receive(process: multiprocessing.process.BaseProcess, receiver: Connection) -> Any:
    try:
        status, payload = receiver.recv()
    except EOFError:
        process.join()
        raise WorkerError(
            f"a worker process ended without a result (exit code {process.exitcode})"
        ) from None
    if status == "error":
        raise payload
    return payload


def _child(
    work: Callable[[Sequence[Item]], Result], chunk: Sequence[Item], sender: Connection
) -> None:
    try:
        message: tuple[str, Any] = ("ok", work(chunk))
    except BaseException as exc:  # every failure must reach the parent
        message = ("error", exc)
    try:
        sender.send(message)
    except Exception as exc:  # the result or the exception would not pickle
        sender.send(
            (
                "error",
                WorkerError(f"a worker's result could not be sent back: {type(exc).__name__}"),
            )
        )
    finally:
        sender.close()
