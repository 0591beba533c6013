"""Push lanes: a fleet's pushes spread over forked processes, each with its own thread pool.

One controller process spends about 3.3 ms of CPU per WinRM request (requests, NTLM sealing,
pywinrm's XML), all under one GIL, so it tops out near 300 requests/s whatever ``forks`` says.
Lanes let the push phase use several cores: the caller forks them right after Phase 1, while
the process is still single-threaded (a child forked while another thread holds a lock can
deadlock), and reuses them for every run (the ``--check`` preview, then the real run).

What crosses the pipes is kept small and harmless. Each child inherits the work function, and
with it the built files and their plaintext passwords, by fork; afterwards only host names and
the run's parameters go down, and only :class:`~provisioner.records.results.HostResult` objects come
back. Messages are pickled with an allow-list: anything else (a ``BuiltFile``, a ``Secret``)
is refused on both sides.

The caller keeps every decision: :class:`Dispatch` starts at most ``limit`` hosts at a time
(split across the lanes) and hands results back as they arrive. A lane that dies turns its
hosts in flight into failed results with a one-line reason; the others carry on, and when
none is left the rest runs on threads of this process. Children ignore Ctrl-C (the parent
decides) and exit when their pipe closes, so also when the parent dies.

This module knows only callables and results, so that it sits below the runner (layer 4).
"""

from __future__ import annotations

import contextlib
import gc
import io
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_readable
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from provisioner import parallel
from provisioner.records.results import FileChange, HostResult, Status

Params = TypeVar("Params")

Work = Callable[[str, Params, threading.Event], HostResult]
"""Push one host with the run's parameters; stop retrying once the event is set."""

Failure = Callable[[str, Params, str], HostResult]
"""A failed result for a host, with a one-line reason."""

# Measured with bench/fleet_bench.py (docs/rollout.md "Push processes"): below a few hundred
# workstations a run is over before a second process pays for itself, and a lane with a
# single fork leaves its process mostly waiting on the network.
MIN_HOSTS = 200
MIN_FORKS_PER_PROCESS = 2
MAX_PROCESSES = 32

# How often a waiting parent looks at the stop event, to tell the lanes to end their retries.
_STOP_POLL_S = 0.2
# Exit code of a lane whose own loop failed (a push that fails is a result, not this).
_CRASHED = 70
# How long a closing parent waits for a lane to exit before ending it.
_CLOSE_GRACE_S = 10.0


def choose_processes(hosts: int, forks: int, requested: int = 0) -> int:
    """Processes to push from: ``requested`` if given, else one per core for a large run.

    1 means the thread pool of this process. The automatic choice needs at least
    :data:`MIN_HOSTS` workstations and :data:`MIN_FORKS_PER_PROCESS` forks per process.
    """
    if requested:
        return requested
    if hosts < MIN_HOSTS:
        return 1
    return max(1, min(parallel.available_cores(), forks // MIN_FORKS_PER_PROCESS, MAX_PROCESSES))


class Dispatch(Protocol):
    """Where one run's pushes go; the caller decides what to start and when."""

    def free(self) -> int:
        """How many more hosts may start now."""
        ...

    @property
    def busy(self) -> bool:
        """True while a started host has not been handed back by :meth:`results`."""
        ...

    def start(self, host: str) -> None:
        """Start pushing ``host`` (only while :meth:`free` is above zero)."""
        ...

    def results(self) -> list[tuple[str, HostResult]]:
        """Wait for at least one started host to end; its (host, result) pairs."""
        ...


class Threads(Generic[Params]):
    """Pushes on a thread pool of this process: the executor when no lane is wanted."""

    def __init__(self, work: Work[Params]) -> None:
        self.work = work

    @property
    def processes(self) -> int:
        """No push process: this one pushes."""
        return 0

    def note(self, forks: int) -> str:
        """How the pushes run, for a run's header: nothing to say."""
        return ""

    def session(
        self, params: Params, stop: threading.Event, limit: int
    ) -> contextlib.AbstractContextManager[Dispatch]:
        """One run's :class:`Dispatch`: a thread pool of ``limit`` threads."""
        return InProcess(self.work, params, stop, limit)

    def __enter__(self) -> Threads[Params]:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class InProcess(Generic[Params]):
    """A :class:`Dispatch` on a thread pool of this process."""

    def __init__(
        self, work: Work[Params], params: Params, stop: threading.Event, limit: int
    ) -> None:
        self._work, self._params, self._stop, self._limit = work, params, stop, limit
        self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="push")
        self._running: dict[Future[HostResult], str] = {}

    def free(self) -> int:
        return self._limit - len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def start(self, host: str) -> None:
        future = self._pool.submit(self._work, host, self._params, self._stop)
        self._running[future] = host

    def results(self) -> list[tuple[str, HostResult]]:
        done, _ = wait(self._running, return_when=FIRST_COMPLETED)
        return [(self._running.pop(future), future.result()) for future in done]

    def close(self) -> None:
        """Wait for the pushes in flight, then end the threads."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> InProcess[Params]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Lane:
    process: multiprocessing.process.BaseProcess
    inbox: Connection  # the parent writes here
    outbox: Connection  # the parent reads here
    alive: bool = True
    share: int = 0
    in_flight: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def free(self) -> int:
        return self.share - len(self.in_flight) if self.alive else 0


class Lanes(Generic[Params]):
    """Forked push processes, opened once, reused by every run, closed at the end.

    ``with Lanes(work, failure, 4) as lanes:`` forks 4 processes (fewer than 2: none), unless
    forking is impossible or unsafe; then :attr:`processes` is 0 and :attr:`fallback` says
    why, and its sessions push from threads of this process. ``sendable`` lists the parameter
    types allowed down the pipes (besides strings, numbers and results).
    """

    def __init__(
        self,
        work: Work[Params],
        failure: Failure[Params],
        processes: int,
        *,
        sendable: tuple[type, ...] = (),
    ) -> None:
        self.work, self.failure, self.requested = work, failure, processes
        self.fallback = ""
        self._types = _Types((HostResult, FileChange, Status, *sendable))
        self._lanes: list[_Lane] = []
        self._session: _LaneSession[Params] | None = None
        self._frozen = False

    @property
    def processes(self) -> int:
        """Lanes alive now (0: this process pushes)."""
        return sum(1 for lane in self._lanes if lane.alive)

    @property
    def pids(self) -> list[int]:
        """Process ids of the lanes alive, in order."""
        return [lane.pid for lane in self._lanes if lane.alive]

    def note(self, forks: int) -> str:
        """How the pushes run, for a run's header: how many processes, or why only this one."""
        if self.processes:
            return f"pushing from {self.processes} processes (forks {forks} shared)"
        if self.fallback:
            return f"pushing from this process only: {self.fallback}"
        return ""

    def open(self) -> Lanes[Params]:
        """Fork the lanes now, if this process may fork."""
        if self.requested < 2 or self._lanes:
            return self
        if reason := parallel.fork_unsafe_reason():
            self.fallback = reason
            return self
        # Objects that exist now stay out of the collector's scans, so that a child's first
        # full collection does not copy every page it shares with the parent. Whoever froze
        # first unfreezes, so close() leaves a freeze made before the lanes alone.
        self._frozen = gc.get_freeze_count() == 0
        gc.freeze()
        # Children are born ignoring Ctrl-C: no window in which it would kill one mid-start.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for number in range(1, self.requested + 1):
                self._lanes.append(self._fork(number))
        except OSError as exc:  # no memory or too many processes: push from here
            self.fallback = f"cannot start push processes ({exc.strerror or exc})"
            self.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self

    def _fork(self, number: int) -> _Lane:
        context = multiprocessing.get_context("fork")
        child_inbox, inbox = context.Pipe(duplex=False)
        outbox, child_outbox = context.Pipe(duplex=False)
        # The parent's ends of the other lanes: a child that kept them would hide the parent's
        # death (or another lane's) from its siblings.
        theirs = [end for lane in self._lanes for end in (lane.inbox, lane.outbox)]
        process = context.Process(
            target=_lane_main,
            args=(self.work, self.failure, child_inbox, child_outbox, [*theirs, inbox, outbox]),
            kwargs={"types": self._types},
            name=f"push-lane-{number}",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_inbox.close()
            child_outbox.close()
        return _Lane(process, inbox, outbox)

    @contextlib.contextmanager
    def session(self, params: Params, stop: threading.Event, limit: int) -> Iterator[Dispatch]:
        """One run's :class:`Dispatch`: at most ``limit`` hosts in flight across the lanes."""
        if self._session is not None:
            raise RuntimeError("the push lanes are already running a session")
        session = _LaneSession(self, params, stop, limit)
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            clean = session.end()
            if not clean:  # left with hosts in flight (an error): the lanes cannot be trusted
                self.close()

    def close(self) -> None:
        """Close the pipes (the lanes exit at EOF), wait for them, end a late one."""
        for lane in self._lanes:
            lane.alive = False
            lane.inbox.close()
            lane.outbox.close()
        for lane in self._lanes:
            parallel.reap(lane.process, _CLOSE_GRACE_S)
        if self._frozen:
            gc.unfreeze()
            self._frozen = False

    def __enter__(self) -> Lanes[Params]:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _LaneSession(Generic[Params]):
    """:class:`Dispatch` over the lanes; threads of this process once every lane is gone."""

    def __init__(
        self, lanes: Lanes[Params], params: Params, stop: threading.Event, limit: int
    ) -> None:
        self._owner, self._params, self._stop, self._limit = lanes, params, stop, limit
        self._ready: list[tuple[str, HostResult]] = []
        self._local: InProcess[Params] | None = None
        self._stop_sent = False
        for lane in self._live():
            # A lane that died between runs: known now, before any host is sent its way.
            if not lane.process.is_alive():
                self._lane_died(lane, "")
            else:
                self._send(lane, ("run", params, limit))
        self._reshare()

    def _live(self) -> list[_Lane]:
        return [lane for lane in self._owner._lanes if lane.alive]

    def _reshare(self) -> None:
        live = self._live()
        if live:
            base, extra = divmod(self._limit, len(live))
            for index, lane in enumerate(live):
                lane.share = base + (1 if index < extra else 0)

    def free(self) -> int:
        if not self._live():
            return self._in_process().free()
        return sum(lane.free() for lane in self._live())

    @property
    def busy(self) -> bool:
        local = self._local is not None and self._local.busy
        return local or bool(self._ready) or any(lane.in_flight for lane in self._live())

    def start(self, host: str) -> None:
        while live := self._live():
            lane = max(live, key=_Lane.free)  # the most room; the first lane on ties
            if self._send(lane, ("push", host)):
                lane.in_flight.append(host)
                return
        self._in_process().start(host)

    def results(self) -> list[tuple[str, HostResult]]:
        while not self._ready:
            live = [lane for lane in self._live() if lane.in_flight]
            if not live:
                local = self._local
                return local.results() if local is not None and local.busy else []
            if self._stop.is_set() and not self._stop_sent:
                self._stop_sent = True
                for lane in self._live():
                    self._send(lane, ("stop",))
            by_reader = {id(lane.outbox): lane for lane in live}
            for readable in wait_readable([lane.outbox for lane in live], timeout=_STOP_POLL_S):
                self._receive(by_reader[id(readable)])
        ready, self._ready = self._ready, []
        return ready

    def _receive(self, lane: _Lane) -> None:
        try:
            self._take_answer(lane)
        except (EOFError, OSError):
            self._lane_died(lane, "")
        except (pickle.UnpicklingError, ValueError, TypeError) as exc:
            self._lane_died(lane, f"sent an unreadable answer: {exc}")

    def _take_answer(self, lane: _Lane) -> None:
        """Read one answer of ``lane``: its host is done. Raises for anything else."""
        kind, host, result = _decode(_read(lane.outbox), self._owner._types)
        if kind != "done" or host not in lane.in_flight or not isinstance(result, HostResult):
            raise pickle.UnpicklingError(f"unexpected message {kind!r}")
        lane.in_flight.remove(host)
        self._ready.append((host, result))

    def _send(self, lane: _Lane, message: tuple[Any, ...]) -> bool:
        try:
            _write(lane.inbox, _encode(message, self._owner._types))
        except OSError:
            self._lane_died(lane, "")
            return False
        return True

    def _lane_died(self, lane: _Lane, why: str) -> None:
        lane.alive = False
        # Answers it sent before it died still count: only the hosts without one failed.
        with contextlib.suppress(EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError):
            while lane.in_flight and lane.outbox.poll(0):
                self._take_answer(lane)
        lane.inbox.close()
        lane.outbox.close()
        code = parallel.reap(lane.process, 1.0)
        reason = f"push process {lane.pid} {why or _ending(code)} while pushing this workstation"
        reason += ": it may be partly written, push it again"
        for host in lane.in_flight:
            self._ready.append((host, self._owner.failure(host, self._params, reason)))
        lane.in_flight.clear()
        self._reshare()

    def _in_process(self) -> InProcess[Params]:
        if self._local is None:
            self._local = InProcess(self._owner.work, self._params, self._stop, self._limit)
        return self._local

    def end(self) -> bool:
        """Close this run's thread pool; False when hosts were left in flight."""
        clean = not any(lane.in_flight for lane in self._live())
        if self._local is not None:
            self._local.close()
        return clean


def _ending(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"ended unexpectedly (exit code {code})"


# --------------------------------------------------------------------------- the child


def _lane_main(
    work: Work[Params],
    failure: Failure[Params],
    inbox: Connection,
    outbox: Connection,
    inherited: list[Connection],
    *,
    types: _Types,
) -> None:
    """A lane: push the hosts it is sent on its own thread pool until its pipe closes."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to decide
        for end in inherited:
            end.close()
        _serve(work, failure, inbox, outbox, types)
    except BaseException:  # a lane never prints; the parent reports its death and exit code
        code = _CRASHED
    finally:
        os._exit(code)  # no atexit handlers or stream flushes inherited from the parent


def _serve(
    work: Work[Params],
    failure: Failure[Params],
    inbox: Connection,
    outbox: Connection,
    types: _Types,
) -> None:
    stop = threading.Event()
    sending = threading.Lock()
    pool: ThreadPoolExecutor | None = None
    pool_size = 0
    params: Any = None

    def push(host: str, params: Params) -> None:
        try:
            result = work(host, params, stop)
        except BaseException as exc:  # a bug: the host fails (no answer would hang the run)
            reason = f"internal error in push process {os.getpid()}: {type(exc).__name__}"
            result = failure(host, params, reason)
        try:
            data = _encode(("done", host, result), types)
        except pickle.PicklingError as exc:
            reason = f"push process {os.getpid()} cannot send the result back: {exc}"
            data = _encode(("done", host, failure(host, params, reason)), types)
        with sending:
            try:
                _write(outbox, data)
            except OSError:  # the parent is gone: finish quietly
                stop.set()

    while True:
        try:
            message = _decode(_read(inbox), types)
        except (EOFError, OSError):
            break
        if message[0] == "run":
            _, params, limit = message
            stop.clear()
            if pool is None or pool_size != limit:
                if pool is not None:
                    pool.shutdown(wait=True)
                pool, pool_size = ThreadPoolExecutor(limit, thread_name_prefix="push"), limit
        elif message[0] == "push":
            # A push before any run is a bug: the lane crashes and its hosts fail, not hang.
            assert pool is not None  # noqa: S101
            pool.submit(push, message[1], params)
        elif message[0] == "stop":
            stop.set()
    stop.set()
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- the wire


class _Types:
    """The classes allowed in messages, by object and by pickled name."""

    def __init__(self, allowed: tuple[type, ...]) -> None:
        self.allowed = frozenset(allowed)
        self.by_name = {(cls.__module__, cls.__qualname__): cls for cls in allowed}


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, types: _Types) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._allowed = types.allowed

    def reducer_override(self, obj: Any) -> Any:
        # Called for everything but plain str, bytes, numbers, None and containers.
        if type(obj) in self._allowed or (isinstance(obj, type) and obj in self._allowed):
            return NotImplemented
        raise pickle.PicklingError(f"a {type(obj).__name__} may not cross to a push process")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, types: _Types) -> None:
        super().__init__(file)
        self._by_name = types.by_name

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._by_name[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} may not cross a push pipe") from None


def _encode(message: tuple[Any, ...], types: _Types) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, types).dump(message)
    return buffer.getvalue()


def _decode(data: bytes, types: _Types) -> tuple[Any, ...]:
    message = _Unpickler(io.BytesIO(data), types).load()
    if not isinstance(message, tuple) or not message:
        raise pickle.UnpicklingError("a message is a tuple")
    return message


def _write(connection: Connection, data: bytes) -> None:
    """Every message to or from a lane goes through here."""
    connection.send_bytes(data)


def _read(connection: Connection) -> bytes:
    return connection.recv_bytes()
