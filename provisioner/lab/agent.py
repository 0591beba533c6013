"""The lab's agent: runs agent-protocol requests against an emulated :class:`Workstation`.

:class:`LabAgent` is the :class:`~provisioner.lab.handler.CommandHandler` of a lab whose hosts
hold a :class:`Workstation` in their ``state``. It accepts exactly one command line, the
bootstrap of ``provisioner.transport.agent.scripts``, reads the envelope from stdin, checks
that the script text is **exactly** the packaged script of the request's ``op`` (a drifted
script fails like PowerShell does: CLIXML on stderr, exit code 1), and then does what
``docs/agent-protocol.md`` says the script does. It never interprets PowerShell.

What each request does is in :mod:`provisioner.lab.agentops`, which follows the packaged
scripts step for step; :data:`IMPLEMENTATIONS` maps each operation of the registry
(:mod:`provisioner.transport.agent.operations`) to it. Before the script runs, the lab plays
what powershell.exe and the bootstrap do with the workstation's PowerShell:

* a language mode other than FullLanguage (Constrained Language Mode under WDAC or AppLocker)
  stops the bootstrap at its first line: CLIXML on stderr, exit code 1, with the bootstrap's own
  message when it checks the mode, else PowerShell's "Cannot invoke method" error;
* PowerShell before 5.0 cannot parse a request of more than 2,097,152 characters with
  ``ConvertFrom-Json`` (it kept ``JavaScriptSerializer``'s default ``MaxJsonLength``; 5.0 and
  later raise it to ``Int32.MaxValue``), a bootstrap that raises it itself can;
* with Module Logging on (``Workstation.module_logging``), the cmdlets the bootstrap calls
  leave event 4103 in ``Workstation.event_log`` with their parameters: ConvertFrom-Json's
  input is the whole request (a string is logged as it is), ConvertTo-Json's an object (logged
  by its type name);
* a terminating error of the bootstrap (bad envelope) is plain text on stderr, exit code 1;
  a command line or script text the lab does not recognise is CLIXML on stderr, exit code 1;
  a ``crash_after_temp`` is no output at all and exit code ``0xC0000005``;
* a refused ``protocol`` or ``if_running`` is ``ok: false`` with the error in ``"error"``;
* a workstation with an ``answer_filter`` (a broken or foreign agent) answers what it returns.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from xml.sax.saxutils import escape

from provisioner.lab import agentops
from provisioner.lab.handler import CommandResult, HostContext
from provisioner.lab.workstation import Crashed, Workstation
from provisioner.transport.agent import scripts
from provisioner.transport.agent.operations import (
    APPLY,
    INSPECT,
    REGISTRY,
    ROLLBACK,
    Operation,
    UnknownOperation,
)

PROTOCOL = 1
CRASH_EXIT_CODE = 0xC0000005
"""What WinRS reports for a powershell.exe that died (STATUS_ACCESS_VIOLATION)."""
NO_NEW_METHOD = (
    "Method invocation failed because [Web.Script.Serialization.JavaScriptSerializer] does not "
    "contain a method named 'new'."
)
"""What PowerShell before 5.0 says of ``[type]::new()``."""
CLM_METHOD_ERROR = (
    "Cannot invoke method. Method invocation is supported only on core types in this language mode."
)

Json = dict[str, Any]


class AgentFailure(Exception):
    """powershell.exe fails before the agent script runs: CLIXML on stderr, exit code 1."""


class ScriptFailure(Exception):
    """A terminating error in the agent script: the bootstrap's catch prints it, exit code 1."""


class LabAgent:
    """Executes the packaged agent scripts' requests on the host's :class:`Workstation`."""

    def __init__(self) -> None:
        command, arguments = scripts.bootstrap_command()
        self.command_line = " ".join([command, *arguments])

    def reads_stdin(self, command_line: str) -> bool:
        """Only the bootstrap waits for its envelope on stdin."""
        return command_line == self.command_line

    def run(self, host: HostContext, command_line: str, stdin: bytes) -> CommandResult:
        """Check the command line and script, execute the request, answer base64 JSON."""
        try:
            if command_line != self.command_line:
                raise AgentFailure(
                    "The lab agent runs only the packaged bootstrap; the command line differs."
                )
            workstation = host.state
            if not isinstance(workstation, Workstation):
                raise AgentFailure(f"Host {host.name} has no emulated workstation.")
            if workstation.language_mode != "FullLanguage":
                raise AgentFailure(language_mode_error(workstation.language_mode))
            if _major(workstation.ps_version) < 5:
                if "PSVersionTable" not in scripts.BOOTSTRAP:
                    raise ScriptFailure(NO_NEW_METHOD)
                raise AgentFailure(
                    scripts.POWERSHELL_VERSION_ERROR.format(version=workstation.ps_version)
                )
            script, request = decode_envelope(stdin, log=_module_log(workstation))
            op = request.get("op")
            expected = scripts.SCRIPTS.get(op) if isinstance(op, str) else None
            if expected is None:
                raise AgentFailure(f"No packaged agent script for op {json.dumps(op)}.")
            if script != expected:
                digest = hashlib.sha256(script.encode("utf-8")).hexdigest()[:16]
                raise AgentFailure(
                    f"The script sent for op '{op}' (sha256 {digest}...) is not the packaged "
                    "agent script."
                )
            with host.lock:
                answer = execute(workstation, request)
                if workstation.answer_filter is not None:
                    answer = workstation.answer_filter(answer)
        except AgentFailure as failed:
            return CommandResult(stderr=clixml_error(str(failed)), exit_code=1)
        except ScriptFailure as failed:
            return CommandResult(stderr=script_error(str(failed)), exit_code=1)
        except Crashed:
            return CommandResult(exit_code=CRASH_EXIT_CODE)
        return CommandResult(stdout=encode_answer(answer))


def language_mode_error(mode: str) -> str:
    """What powershell.exe prints when the bootstrap starts in ``mode``."""
    if "LanguageMode" not in scripts.BOOTSTRAP:
        return CLM_METHOD_ERROR
    return scripts.LANGUAGE_MODE_ERROR.format(mode=mode)


def _major(ps_version: str) -> int:
    major = ps_version.split(".", 1)[0]
    return int(major) if major.isdigit() else 0


def _module_log(workstation: Workstation) -> list[str] | None:
    """Where event 4103 goes while Module Logging is on (None: off)."""
    if not workstation.module_logging:
        return None
    for cmdlet, value in (
        ("Add-Type", "System.Web.Extensions"),
        ("ConvertTo-Json", "System.Collections.Specialized.OrderedDictionary"),
    ):
        if cmdlet in scripts.BOOTSTRAP:
            workstation.event_log.append(
                f'4103 ParameterBinding({cmdlet}): name="InputObject"; value="{value}"'
            )
    return workstation.event_log


# --- wire formats -----------------------------------------------------------------------------


def decode_envelope(stdin: bytes, *, log: list[str] | None = None) -> tuple[str, Json]:
    """stdin (base64 ASCII of UTF-8 JSON) to ``(script, request)``; ``log``: Module Logging's
    events. A request that does not parse fails as the bootstrap makes it fail: with
    ``JavaScriptSerializer``'s own message, which quotes the whole input, unless the bootstrap
    replaces it."""
    try:
        raw = base64.b64decode(b"".join(stdin.split()), validate=True)
    except binascii.Error as bad:
        raise ScriptFailure(f"The input is not a valid Base-64 string: {bad}") from None
    text = raw.decode("utf-8", errors="replace")
    if log is not None and "ConvertFrom-Json" in scripts.BOOTSTRAP:
        log.append(f'4103 ParameterBinding(ConvertFrom-Json): name="InputObject"; value="{text}"')
    try:
        envelope = json.loads(text)
    except ValueError as bad:
        if scripts.INVALID_REQUEST_ERROR in scripts.BOOTSTRAP:
            raise ScriptFailure(scripts.INVALID_REQUEST_ERROR) from None
        position = getattr(bad, "pos", 0)
        raise ScriptFailure(f"Invalid JSON primitive: . ({position}): {text}") from None
    if not isinstance(envelope, dict):
        raise ScriptFailure("The envelope is not a JSON object.")
    script, request = envelope.get("script"), envelope.get("request")
    if not isinstance(script, str) or not isinstance(request, dict):
        raise ScriptFailure("The envelope needs a 'script' string and a 'request' object.")
    return script, request


def encode_answer(answer: Mapping[str, Any]) -> bytes:
    """The answer as the bootstrap writes it: base64 (ASCII) of compact UTF-8 JSON, no newline."""
    data = json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return base64.b64encode(data)


def script_error(message: str) -> bytes:
    """stderr of the bootstrap's ``catch``: the message and the script line, as plain text."""
    return f"{message} (line 1)\r\n".encode()


def _clixml_text(text: str) -> str:
    out = []
    for index, char in enumerate(text):
        if char == "_" and text[index + 1 : index + 2] in ("x", "X"):
            out.append("_x005F_")
        elif ord(char) < 0x20:
            out.append(f"_x{ord(char):04X}_")
        else:
            out.append(char)
    return escape("".join(out))


def clixml_error(message: str) -> bytes:
    """stderr of powershell.exe after a terminating error, serialised as CLIXML."""
    lines = [
        f"{message}\r\n",
        "    + CategoryInfo          : NotSpecified: (:) [], RuntimeException\r\n",
        "    + FullyQualifiedErrorId : RuntimeException\r\n",
        " \r\n",
    ]
    progress = (
        '<Obj S="progress" RefId="0"><TN RefId="0"><T>System.Management.Automation.PSCustomObject'
        '</T><T>System.Object</T></TN><MS><I64 N="SourceId">1</I64><PR N="Record"><AV>Preparing '
        "modules for first use.</AV><AI>0</AI><Nil /><PI>-1</PI><PC>-1</PC><T>Completed</T>"
        "<SR>-1</SR><SD> </SD></PR></MS></Obj>"
    )
    errors = "".join(f'<S S="Error">{_clixml_text(line)}</S>' for line in lines)
    body = (
        '<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        f"{progress}{errors}</Objs>"
    )
    return f"#< CLIXML\r\n{body}".encode()


# --- requests ---------------------------------------------------------------------------------


Implementation = Callable[[Workstation, Json], Json]


FileOperation = Callable[[Workstation, Json, str], Json]
"""An operation on files, once its running policy is checked: the answer's own fields."""


def _files(op: str, operation: FileOperation) -> Implementation:
    """An operation on files (apply, rollback): the running policy checked, then the files."""

    def run(workstation: Workstation, request: Json) -> Json:
        policy = agentops.ps_text(request.get("if_running")) or "skip"
        if policy not in agentops.POLICIES:
            return _refusal(op, f"if_running '{policy}' not supported")
        try:
            fields = operation(workstation, request, policy)
        except agentops.Refused as refused:
            return _refusal(op, str(refused))
        return {"protocol": PROTOCOL, "op": op, "ok": True, **fields}

    return run


IMPLEMENTATIONS: Mapping[Operation[Any, Any], Implementation] = MappingProxyType(
    {
        INSPECT: agentops.inspect,
        APPLY: _files(APPLY.name, agentops.apply_files),
        ROLLBACK: _files(ROLLBACK.name, agentops.rollback_files),
    }
)
"""What the lab runs for each operation of the registry, in place of its script."""


def execute(workstation: Workstation, request: Json) -> Json:
    """Run one request (already matched to its script) and return the answer."""
    op = str(request["op"])
    protocol = request.get("protocol")
    if not _is_one(protocol):
        return _refusal(op, f"protocol {agentops.ps_text(protocol)} not supported")
    try:
        implementation = IMPLEMENTATIONS[REGISTRY.named(op)]
    except (UnknownOperation, KeyError):
        return _refusal(op, f"no agent script runs '{op}'")
    return implementation(workstation, request)


def _refusal(op: str, message: str) -> Json:
    return {
        "protocol": PROTOCOL,
        "op": op,
        "ok": False,
        "error": agentops.error("internal", message),
    }


def _is_one(value: object) -> bool:
    # PowerShell's -ne compares loosely: 1, 1.0 and "1" are all protocol 1.
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == PROTOCOL
    return isinstance(value, str) and value.strip() == str(PROTOCOL)
