"""A WS-Management (WinRS) endpoint emulator that the real pywinrm client can drive.

Hosts listen on loopback addresses (127.0.0.0/8) over real HTTP or HTTPS, authenticate with
Basic (TLS) or NTLM (with MS-WSMV message encryption), and hand each command to a pluggable
:class:`CommandHandler`. Faults (refused connections, 401, SOAP faults, timeouts, latency,
resets, hangs) can be injected per host while it runs.

The package imports only the standard library, ``cryptography`` and ``spnego``.
"""

from __future__ import annotations

from provisioner.lab.faults import Faults, ForgedReply, ResetMidCommand, SoapFault, Trigger
from provisioner.lab.handler import (
    CMD_LINE_LIMIT,
    CMD_LINE_TOO_LONG,
    CommandHandler,
    CommandResult,
    HostContext,
)
from provisioner.lab.host import HostConfig, LabHost
from provisioner.lab.server import Lab
from provisioner.lab.stats import HostStats

__all__ = [
    "CMD_LINE_LIMIT",
    "CMD_LINE_TOO_LONG",
    "CommandHandler",
    "CommandResult",
    "Faults",
    "ForgedReply",
    "HostConfig",
    "HostContext",
    "HostStats",
    "Lab",
    "LabHost",
    "ResetMidCommand",
    "SoapFault",
    "Trigger",
]
