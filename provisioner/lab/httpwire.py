"""Just enough HTTP/1.1 for WS-Management: requests with Content-Length, keep-alive.

Responses are serialised into one buffer and written with one ``sendall`` so that headers
and body leave in the same segment (with ``TCP_NODELAY`` on the socket, no Nagle delay).
"""

from __future__ import annotations

import http
import socket
import ssl
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024
_RECV = 256 * 1024
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


class HttpError(Exception):
    """The request cannot be parsed; answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class HttpRequest:
    """One parsed request; header names are lower case, repeated headers joined by ", "."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str:
        """The header's value, or an empty string."""
        return self.headers.get(name.lower(), "")

    @property
    def keep_alive(self) -> bool:
        """Whether the client expects the connection to stay open."""
        connection = self.header("connection").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


@dataclass
class HttpResponse:
    """A response to serialise; ``close`` ends the connection after it is sent."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False

    def serialize(self) -> bytes:
        """Status line, headers (with Content-Length) and body in one buffer."""
        phrase = _PHRASES.get(self.status, "Unknown")
        lines = [f"HTTP/1.1 {self.status} {phrase}", "Server: Microsoft-HTTPAPI/2.0"]
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        lines.append(f"Content-Length: {len(self.body)}")
        if self.close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + self.body


class RequestReader:
    """Reads requests from one socket, keeping bytes that arrived early for the next one."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def buffered(self) -> bool:
        """True if bytes of a next request are already here."""
        return bool(self._buffer)

    def _fill(self, sock: socket.socket) -> bool:
        chunk = sock.recv(_RECV)
        if not chunk:
            return False
        self._buffer += chunk
        return True

    def read(self, sock: socket.socket) -> HttpRequest | None:
        """The next request, or None if the peer closed cleanly between requests.

        Raises ``OSError`` (including timeouts) and :class:`HttpError`.
        """
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise HttpError(431, "request header too large")
            if not self._fill(sock):
                if self._buffer:
                    raise HttpError(400, "connection closed inside a request header")
                return None
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, "malformed request line")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HttpError(400, "malformed header line")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise HttpError(501, "chunked request bodies are not supported")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise HttpError(413, "request body too large")
        while len(self._buffer) < length:
            if not self._fill(sock):
                raise HttpError(400, "connection closed inside a request body")
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return HttpRequest(parts[0], parts[1], parts[2], headers, body)


def pending(sock: socket.socket, reader: RequestReader) -> bool:
    """True if a next request can be read without waiting for the network."""
    if reader.buffered:
        return True
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
