"""What checking a reply costs: the RelatesTo check beside pywinrm's own parse of the reply.

Every WS-Management reply now goes through ``transport.winrm._check_relates_to`` (a pull parser
that stops at the end of the SOAP header) after pywinrm has parsed it once with
``ElementTree.fromstring``; the sealed-reply check is a Content-Type comparison. This measures
both parses on the lab's own replies, side by side in one run: a SendResponse (small) and
ReceiveResponses carrying 2 KB and 300 KB of agent output.

The agent's answer is then read into its answer type, field by field
(``Operation.reply_from``); this measures that beside the JSON decode of the same answer: the
lab agent's inspect answers for a workstation with 1 and 50 users, each with a microsip.ini
and its applied copy. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from provisioner.lab import agent, wsman
from provisioner.lab.workstation import Workstation
from provisioner.transport.agent.messages import InspectRequest, InstallWanted, UserWanted
from provisioner.transport.agent.operations import INSPECT
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


def _inspect_answer(folder: Path, users: int) -> bytes:
    """The lab agent's inspect answer (JSON) for ``users`` users with a file each."""
    ws = Workstation(folder)
    ws.install_microsip("installed")
    wanted = []
    ini = b"\xff\xfe" + "[Settings]\r\nEC=1\r\n".encode("utf-16-le") * 40
    for index in range(users):
        user = ws.add_user(f"ACME\\u{index}")
        ws.put(ws.ini_path(user), ini, owner=user.sid)
        ws.put(Workstation.state_path(user, "microsip.ini", "applied"), ini)
        wanted.append(UserWanted(f"u{index}", f"ACME\\u{index}"))
    request = InspectRequest(
        InstallWanted("installed", "C:\\Program Files\\MicroSIP", "microsip.exe"),
        tuple(wanted),
        (),
        True,
    )
    return json.dumps(agent.execute(ws, INSPECT.wire(request))).encode()


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
    header = f"{'inspect answer':<16} {'bytes':>8} {'JSON decode':>14} {'answer type':>16}"
    print(f"\n{header} {'ratio':>6}")
    for users in (1, 50):
        with tempfile.TemporaryDirectory() as folder:
            text = _inspect_answer(Path(folder), users)
        answer = json.loads(text)
        repeats = max(10, args.repeats // users)
        decode = _per_call(lambda t=text: json.loads(t), repeats)
        read = _per_call(lambda a=answer: INSPECT.reply_from(a, "ws01"), repeats)
        print(
            f"{f'{users} user(s)':<16} {len(text):>8} {decode * 1e6:>11.1f} µs "
            f"{read * 1e6:>13.1f} µs {read / decode:>6.2f}"
        )


if __name__ == "__main__":
    main()
