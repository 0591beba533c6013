"""Per-host request counters, so tests can assert how many HTTP requests a push costs."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

AUTH = "auth"
"""Operation name of requests that only authenticate (NTLM legs, rejected credentials)."""

REJECTED = "rejected"
"""Operation name of requests refused by a fault or by HTTP-level checks."""


@dataclass(frozen=True)
class HostStats:
    """A snapshot of one host's counters."""

    requests: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    encrypted_requests: int = 0
    encrypted_responses: int = 0
    connections: int = 0
    commands: int = 0


class Counters:
    """Thread-safe counters of one host."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = 0
        self._ops: Counter[str] = Counter()
        self._enc_in = 0
        self._enc_out = 0
        self._connections = 0
        self._commands = 0

    def request(self) -> None:
        """One HTTP request arrived."""
        with self._lock:
            self._requests += 1

    def operation(self, name: str) -> None:
        """The request just counted turned out to be ``name``."""
        with self._lock:
            self._ops[name] += 1

    def encrypted(self, *, inbound: bool) -> None:
        """A sealed body was received (inbound) or sent."""
        with self._lock:
            if inbound:
                self._enc_in += 1
            else:
                self._enc_out += 1

    def connection(self) -> None:
        """A TCP connection was accepted."""
        with self._lock:
            self._connections += 1

    def command(self) -> None:
        """A Command started."""
        with self._lock:
            self._commands += 1

    @property
    def requests(self) -> int:
        """HTTP requests since the last reset."""
        with self._lock:
            return self._requests

    def snapshot(self) -> HostStats:
        """Copy of every counter."""
        with self._lock:
            return HostStats(
                requests=self._requests,
                by_operation=dict(self._ops),
                encrypted_requests=self._enc_in,
                encrypted_responses=self._enc_out,
                connections=self._connections,
                commands=self._commands,
            )

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._requests = 0
            self._ops.clear()
            self._enc_in = 0
            self._enc_out = 0
            self._connections = 0
            self._commands = 0
