"""A bounded pool of daemon worker threads that can be stopped within a deadline.

``concurrent.futures.ThreadPoolExecutor`` cannot join its threads with a timeout; this pool
can, which keeps ``Lab.stop()`` bounded even when a handler misbehaves.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

_log = logging.getLogger(__name__)

Task = Callable[[], None]


class WorkerPool:
    """Runs submitted callables on at most ``max_workers`` threads, started on demand."""

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._queued = 0
        self._closed = False

    @property
    def size(self) -> int:
        """Threads started so far."""
        with self._lock:
            return len(self._threads)

    def submit(self, task: Task) -> None:
        """Queue ``task``; raises RuntimeError once the pool is shut down."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} pool is shut down")
            self._queued += 1
            if self._queued > self._idle and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._queue.put(task)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            task = self._queue.get()
            with self._lock:
                self._idle -= 1
                if task is not None:
                    self._queued -= 1
            if task is None:
                return
            try:
                task()
            except Exception:
                _log.exception("%s task failed", self._name)

    def shutdown(self, timeout: float) -> list[threading.Thread]:
        """Stop taking tasks, let queued ones finish, join threads; returns those still alive."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread for thread in threads if thread.is_alive()]
