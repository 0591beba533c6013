"""What checking a reply costs: the RelatesTo check beside pywinrm's own parse of the reply.

Every WS-Management reply now goes through ``transport.winrm._check_relates_to`` (a pull parser
that stops at the end of the SOAP header) after pywinrm has parsed it once with
``ElementTree.fromstring``; the sealed-reply check is a Content-Type comparison. This measures
both parses on the lab's own replies, side by side in one run: a SendResponse (small) and
ReceiveResponses carrying 2 KB and 300 KB of agent output. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable

from provisioner.lab import wsman
from provisioner.transport.winrm import _check_relates_to


def _replies(message_id: str) -> dict[str, bytes]:
    command = wsman.new_id()
    return {
        "SendResponse": wsman.send_response(message_id),
        "Receive, 2 KB": wsman.receive_response(message_id, command, [("stdout", b"x" * 2048)], 0),
        "Receive, 300 KB": wsman.receive_response(
            message_id, command, [("stdout", b"x" * 300_000)], 0
        ),
    }


def _per_call(action: Callable[[], object], repeats: int) -> float:
    """Median seconds per call over 5 rounds of ``repeats`` calls."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            action()
        rounds.append((time.perf_counter() - start) / repeats)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    sent = uuid.uuid4()
    print(f"python {sys.version.split()[0]}; median of 5 rounds of {args.repeats} calls")
    print(f"{'reply':<16} {'bytes':>8} {'pywinrm parse':>14} {'RelatesTo check':>16} {'ratio':>6}")
    for name, reply in _replies(f"uuid:{sent}").items():
        repeats = max(10, args.repeats // (1 + len(reply) // 10_000))
        parse = _per_call(lambda r=reply: ET.fromstring(r), repeats)  # noqa: S314 - our own XML
        check = _per_call(lambda r=reply: _check_relates_to(r, sent), repeats)
        print(
            f"{name:<16} {len(reply):>8} {parse * 1e6:>11.1f} µs {check * 1e6:>13.1f} µs "
            f"{check / parse:>6.2f}"
        )


if __name__ == "__main__":
    main()
