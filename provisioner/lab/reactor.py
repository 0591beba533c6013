"""One selector thread for every listening socket and idle connection, plus a worker pool.

Scaling rule: a host costs one listening socket, not a thread. The selector thread accepts
connections (``TCP_NODELAY`` on each) and watches idle keep-alive connections; when one
becomes readable it is handed to the shared, bounded :class:`WorkerPool`, which reads one
request, lets the host's :class:`Service` answer it, writes the answer in one ``sendall`` and
gives the connection back to the selector. TLS handshakes happen on the workers too.

A service may also ask to reset the connection (RST, no answer) or to park it: a parked
connection is never answered; it is closed when the peer gives up, after ``idle_timeout``,
or at ``stop()``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

from provisioner.lab.httpwire import HttpError, HttpRequest, HttpResponse, RequestReader, pending
from provisioner.lab.pool import WorkerPool

if TYPE_CHECKING:
    from provisioner.lab.auth import NtlmSession

_log = logging.getLogger(__name__)
_TICK = 0.5
_ACCEPT_BURST = 64


class Action(enum.Enum):
    """What to do instead of answering."""

    ABORT = "abort"
    PARK = "park"


Outcome = HttpResponse | Action


class Service(Protocol):
    """The host behind a listening socket."""

    def tls(self) -> ssl.SSLContext | None:
        """The server TLS context, or None for plain HTTP."""
        ...

    def accepted(self) -> None:
        """A connection was accepted."""
        ...

    def handle(self, conn: Connection, request: HttpRequest) -> Outcome:
        """Answer one request (runs on a worker thread)."""
        ...


class Connection:
    """A client connection and what belongs to it (its NTLM context)."""

    __slots__ = ("handshaken", "last_active", "ntlm", "parked", "peer", "reader", "service", "sock")

    def __init__(self, sock: socket.socket, peer: str, service: Service) -> None:
        self.sock = sock
        self.peer = peer
        self.service = service
        self.reader = RequestReader()
        self.handshaken = not isinstance(sock, ssl.SSLSocket)
        self.ntlm: NtlmSession | None = None
        self.parked = False
        self.last_active = time.monotonic()


class Listener:
    """A listening socket of one service."""

    __slots__ = ("address", "port", "service", "sock")

    def __init__(self, sock: socket.socket, service: Service) -> None:
        self.sock = sock
        self.service = service
        self.address, self.port = sock.getsockname()[:2]


_WAKE = object()


class Reactor:
    """The selector thread, the connections it owns, and the worker pool it feeds."""

    def __init__(self, pool: WorkerPool, *, io_timeout: float, idle_timeout: float) -> None:
        self._pool = pool
        self._io_timeout = io_timeout
        self._idle_timeout = idle_timeout
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []
        self._conns: set[Connection] = set()
        self._watched: set[Connection] = set()
        self._listeners: dict[Service, Listener] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lab-reactor", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """Open client connections."""
        with self._lock:
            return len(self._conns)

    # --- thread-safe API -------------------------------------------------------------------

    def listen(self, address: str, port: int, service: Service) -> Listener:
        """Bind ``address:port`` (0: ephemeral) and start accepting for ``service``."""
        listener = self.bind(address, port, service)
        self.activate(listener)
        return listener

    def bind(self, address: str, port: int, service: Service) -> Listener:
        """Bind and listen on ``address:port`` without accepting yet (see :meth:`activate`)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise OSError(err.errno, f"cannot listen on {address}:{port}: {err.strerror}") from err
        return Listener(sock, service)

    def activate(self, listener: Listener) -> None:
        """Start accepting connections on a bound listener."""
        self._call(partial(self._add_listener, listener))

    def close_listener(self, listener: Listener) -> None:
        """Stop listening and close the service's idle connections; effective on return."""
        self._call(partial(self._remove_listener, listener))

    def stop(self, timeout: float) -> list[threading.Thread]:
        """Close everything; returns the threads that did not end within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        leaked = self._pool.shutdown(max(0.0, deadline - time.monotonic()))
        for conn in conns:
            self._close(conn)
        if self._thread.is_alive():
            leaked.append(self._thread)
        else:
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()
        return leaked

    # --- selector thread -------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _call(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the selector thread and wait for it (bounded)."""
        if threading.current_thread() is self._thread:
            call()
            return
        done = threading.Event()

        def wrapped() -> None:
            try:
                call()
            finally:
                done.set()

        if self._queue(wrapped):
            done.wait(5.0)

    def _queue(self, call: Callable[[], None]) -> bool:
        """Queue ``call`` for the selector thread; False once stopping."""
        with self._lock:
            if self._stopping:
                return False
            # One wake per batch: calls queued before the selector thread takes the batch
            # ride on the wake byte that the first of them sent.
            first = not self._calls
            self._calls.append(call)
        if first:
            self._wake()
        return True

    def _run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            for key, _ in self._sel.select(_TICK):
                try:
                    self._event(key.data)
                except Exception:
                    _log.exception("reactor event failed")
            with self._lock:
                calls, self._calls = self._calls, []
                stopping = self._stopping
            for call in calls:
                try:
                    call()
                except Exception:
                    _log.exception("reactor call failed")
            if stopping:
                break
            now = time.monotonic()
            if now - last_sweep >= _TICK:
                last_sweep = now
                self._sweep(now)
        for listener in list(self._listeners.values()):
            self._remove_listener(listener)
        for conn in list(self._watched):
            self._unwatch(conn)
            self._close(conn)

    def _event(self, data: object) -> None:
        if data is _WAKE:
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_r.recv(4096)
        elif isinstance(data, Listener):
            self._accept(data)
        elif isinstance(data, Connection):
            self._readable(data)

    def _add_listener(self, listener: Listener) -> None:
        self._listeners[listener.service] = listener
        self._sel.register(listener.sock, selectors.EVENT_READ, listener)

    def _remove_listener(self, listener: Listener) -> None:
        if self._listeners.get(listener.service) is listener:
            del self._listeners[listener.service]
            self._sel.unregister(listener.sock)
        listener.sock.close()
        for conn in [c for c in self._watched if c.service is listener.service]:
            self._unwatch(conn)
            self._close(conn)

    def _accept(self, listener: Listener) -> None:
        context = listener.service.tls()
        for _ in range(_ACCEPT_BURST):
            try:
                raw, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                _log.exception("accept failed on %s:%s", listener.address, listener.port)
                return
            raw.setblocking(True)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock: socket.socket = raw
            if context is not None:
                try:
                    sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                except OSError:
                    raw.close()
                    continue
            conn = Connection(sock, str(peer[0]), listener.service)
            with self._lock:
                self._conns.add(conn)
            listener.service.accepted()
            self._watch(conn)

    def _watch(self, conn: Connection) -> None:
        if conn.sock.fileno() < 0:
            return
        if conn.service not in self._listeners:
            self._close(conn)
            return
        conn.last_active = time.monotonic()
        self._watched.add(conn)
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _park(self, conn: Connection) -> None:
        if conn.sock.fileno() < 0:
            return
        conn.parked = True
        conn.sock.setblocking(False)
        conn.last_active = time.monotonic()
        self._watched.add(conn)
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _unwatch(self, conn: Connection) -> None:
        if conn in self._watched:
            self._watched.discard(conn)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)

    def _readable(self, conn: Connection) -> None:
        if not conn.parked:
            self._unwatch(conn)
            try:
                self._pool.submit(partial(self._serve, conn))
            except RuntimeError:
                self._close(conn)
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            data = b""
        if not data:
            self._unwatch(conn)
            self._close(conn)

    def _sweep(self, now: float) -> None:
        for conn in [c for c in self._watched if now - c.last_active > self._idle_timeout]:
            self._unwatch(conn)
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _abort(self, conn: Connection) -> None:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._close(conn)

    # --- worker threads --------------------------------------------------------------------

    def _serve(self, conn: Connection) -> None:
        sock = conn.sock
        try:
            if sock.gettimeout() != self._io_timeout:  # settimeout is a syscall every time
                sock.settimeout(self._io_timeout)
            if not conn.handshaken and isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
                conn.handshaken = True
            while True:
                request = conn.reader.read(sock)
                if request is None:
                    self._close(conn)
                    return
                outcome = conn.service.handle(conn, request)
                if outcome is Action.ABORT:
                    self._abort(conn)
                    return
                if outcome is Action.PARK:
                    self._queue(partial(self._park, conn))
                    return
                sock.sendall(outcome.serialize())
                if outcome.close or not request.keep_alive:
                    self._close(conn)
                    return
                if not pending(sock, conn.reader):
                    break
        except HttpError as err:
            with contextlib.suppress(OSError):
                sock.sendall(HttpResponse(err.status, close=True).serialize())
            self._close(conn)
            return
        except (OSError, ssl.SSLError):
            self._close(conn)
            return
        except Exception:
            _log.exception("request handling failed on %s", conn.peer)
            self._abort(conn)
            return
        self._queue(partial(self._watch, conn))
