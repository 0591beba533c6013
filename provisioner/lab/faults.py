"""Fault injection: what a host should do wrong, changeable while it serves.

A :class:`Faults` value is an immutable plan. ``LabHost.set_faults`` swaps it atomically and
restarts its counters ("the Nth request" counts from that moment). Operation names are the
WS-Management ones: ``Create``, ``Command``, ``Send``, ``Receive``, ``Signal``, ``Delete``.

* ``refuse``: the host stops listening and drops its idle connections (connection refused);
* ``http_401``: every request is answered 401 without a challenge;
* ``soap_fault``: a 500 ``s:Fault`` (encrypted when the connection is) when its trigger fires;
* ``operation_timeout``: the first K Receives answer ``w:TimedOut`` at once;
* ``slow``: seconds slept before answering each request (per-request latency);
* ``reset_mid_command``: TCP reset, no answer, on an operation of the Nth command;
* ``hang``: the request is read and never answered (the client hits its read timeout);
  like ``soap_fault`` it takes a :class:`Trigger`: ``Trigger()`` hits the first request once,
  ``Trigger("Receive", nth=2, times=None)`` every Receive from the second on;
* ``command_delay``: commands finish this many seconds after their stdin is complete, so a
  Receive waits its OperationTimeout and answers ``w:TimedOut`` meanwhile;
* ``forged_reply``: a man in the middle answers instead of the host (:class:`ForgedReply`):
  in plaintext on an encrypted connection, or with the ``RelatesTo`` of another message.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

OPERATIONS = ("Create", "Command", "Send", "Receive", "Signal", "Delete")

CommandOperation = Literal["Command", "Send", "Receive"]


@dataclass(frozen=True)
class Trigger:
    """Which requests a fault hits: matching ``operation`` (None: any), from the ``nth`` on."""

    operation: str | None = None
    nth: int = 1
    times: int | None = 1
    """How many requests in a row it hits; None: every one from the nth on."""

    def __post_init__(self) -> None:
        if self.operation is not None and self.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {self.operation!r}; use one of {OPERATIONS}")
        if self.nth < 1 or (self.times is not None and self.times < 1):
            raise ValueError("nth and times count from 1")


@dataclass(frozen=True)
class SoapFault:
    """A WSManFault answered with HTTP 500 (pywinrm raises ``WSManFaultError``)."""

    trigger: Trigger = field(default_factory=Trigger)
    wsman_code: int = 2147943418
    subcode: str = "w:InternalError"
    reason: str = "Fault injected by the lab."


@dataclass(frozen=True)
class ResetMidCommand:
    """Reset the connection when ``operation`` of the ``command``-th Command arrives (once)."""

    command: int = 1
    operation: CommandOperation = "Send"


@dataclass(frozen=True)
class ForgedReply:
    """A reply the host did not vouch for, on the requests ``trigger`` hits.

    ``plaintext``: the answer travels unsealed although the connection is encrypted (anyone on
    the path could have written it); with ``stdout``, a Receive is answered with that output
    and exit code 0, as a forger would ("unchanged", "busy"). ``relates_to``: the host's own
    (sealed) answer, relating to a message that was never sent.
    """

    kind: Literal["plaintext", "relates_to"] = "plaintext"
    trigger: Trigger = field(default_factory=lambda: Trigger("Receive"))
    stdout: bytes | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("plaintext", "relates_to"):
            raise ValueError("kind is 'plaintext' or 'relates_to'")


@dataclass(frozen=True)
class Faults:
    """The fault plan of one host; the default plan injects nothing."""

    refuse: bool = False
    http_401: bool = False
    soap_fault: SoapFault | None = None
    operation_timeout: int = 0
    slow: float = 0.0
    reset_mid_command: ResetMidCommand | None = None
    hang: Trigger | None = None
    command_delay: float = 0.0
    forged_reply: ForgedReply | None = None

    def __post_init__(self) -> None:
        if self.operation_timeout < 0 or self.slow < 0 or self.command_delay < 0:
            raise ValueError("operation_timeout, slow and command_delay must not be negative")


class _TriggerState:
    __slots__ = ("fired", "seen", "trigger")

    def __init__(self, trigger: Trigger) -> None:
        self.trigger = trigger
        self.seen = 0
        self.fired = 0

    def hit(self, operation: str) -> bool:
        if self.trigger.operation not in (None, operation):
            return False
        self.seen += 1
        if self.seen < self.trigger.nth:
            return False
        if self.trigger.times is not None and self.fired >= self.trigger.times:
            return False
        self.fired += 1
        return True


class FaultState:
    """The current plan of a host and its counters; every method is thread-safe."""

    def __init__(self, plan: Faults | None = None) -> None:
        self._lock = threading.Lock()
        self._plan = Faults()
        self._soap: _TriggerState | None = None
        self._hang: _TriggerState | None = None
        self._forged: _TriggerState | None = None
        self._timeouts_left = 0
        self._reset_armed = False
        self._commands = 0
        self.replace(plan or Faults())

    @property
    def plan(self) -> Faults:
        """The plan in force."""
        with self._lock:
            return self._plan

    def replace(self, plan: Faults) -> Faults:
        """Install ``plan`` with fresh counters; returns the previous plan."""
        with self._lock:
            previous = self._plan
            self._plan = plan
            self._soap = _TriggerState(plan.soap_fault.trigger) if plan.soap_fault else None
            self._hang = _TriggerState(plan.hang) if plan.hang else None
            forged = plan.forged_reply
            self._forged = _TriggerState(forged.trigger) if forged else None
            self._timeouts_left = plan.operation_timeout
            self._reset_armed = plan.reset_mid_command is not None
            self._commands = 0
            return previous

    def command_started(self) -> int:
        """Count a Command; returns its 1-based ordinal since the plan was installed."""
        with self._lock:
            self._commands += 1
            return self._commands

    def soap_fault(self, operation: str) -> SoapFault | None:
        """The fault to answer for this request, if its trigger fires."""
        with self._lock:
            if self._soap is None or self._plan.soap_fault is None:
                return None
            return self._plan.soap_fault if self._soap.hit(operation) else None

    def hang(self, operation: str) -> bool:
        """True if this request must never be answered."""
        with self._lock:
            return self._hang is not None and self._hang.hit(operation)

    def forged_reply(self, operation: str) -> ForgedReply | None:
        """The forgery to answer this request with, if its trigger fires."""
        with self._lock:
            if self._forged is None or self._plan.forged_reply is None:
                return None
            return self._plan.forged_reply if self._forged.hit(operation) else None

    def take_operation_timeout(self) -> bool:
        """True if this Receive must answer ``w:TimedOut`` (uses one of the K)."""
        with self._lock:
            if self._timeouts_left <= 0:
                return False
            self._timeouts_left -= 1
            return True

    def reset(self, operation: str, command_ordinal: int) -> bool:
        """True (once) if this operation of that command must reset the connection."""
        with self._lock:
            spec = self._plan.reset_mid_command
            if not self._reset_armed or spec is None:
                return False
            if spec.operation != operation or spec.command != command_ordinal:
                return False
            self._reset_armed = False
            return True
