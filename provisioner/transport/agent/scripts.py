"""The PowerShell agent: the fixed scripts a workstation runs, and the envelope around them.

docs/agent-protocol.md is the contract. Per request the controller runs
``powershell.exe ... -EncodedCommand <bootstrap>`` (:func:`bootstrap_command`), sends the
envelope (:func:`make_envelope`) on stdin, and decodes stdout with :func:`parse_answer` and,
on exit code 1, stderr with :func:`decode_clixml`.

What is sent for an op is ``common.ps1`` followed by the operation's script (its entry in
:data:`~provisioner.transport.agent.operations.REGISTRY`): a request carries one script text,
so the helpers the scripts share are put in front of each of them here rather than kept once
per script. :data:`SCRIPTS` holds those exact texts (the lab recognises them, and
``tests/golden/agent/`` keeps copies).

Why the bootstrap is written as it is (its comments cost command-line length):

- It is short: its UTF-16LE base64 must fit cmd.exe's 8,191 characters with room to spare,
  whatever the size of the request, which travels on stdin instead.
- ``$ProgressPreference`` and ``$WarningPreference`` are silenced: with ``-EncodedCommand``
  PowerShell writes such records to stderr as CLIXML, and anything on stdout would corrupt the
  answer.
- Only the last object the agent writes is the answer, so a stray value written by a helper
  cannot corrupt it; it is passed with ``-InputObject`` so that arrays keep their shape, and
  ``-Depth 10`` because the default depth (2) would flatten nested objects into strings.
- stdin and stdout carry base64 only: ASCII is the same in every console code page.
- A terminating error goes to stderr as plain text with the agent line number, and exit 1.
- It parses the envelope with .NET's ``JavaScriptSerializer`` (``MaxJsonLength`` raised), not
  ``ConvertFrom-Json``: PowerShell Module Logging (event 4103) records a cmdlet's parameters,
  and ConvertFrom-Json's input is the whole request, SIP passwords included; a method call is
  not recorded. The request then reaches the script as dictionaries (``Get-Field`` reads both).
- Its first line stops in any language mode but FullLanguage, with a message the controller
  recognises (:data:`LANGUAGE_MODE_ERROR`): under Constrained Language Mode (WDAC or AppLocker)
  the calls that follow would fail with PowerShell's less helpful "Cannot invoke method". A
  ``throw`` outside the ``try`` is what works there: ``[Console]`` is not a core type. Its
  second line does the same below PowerShell 5 (:data:`POWERSHELL_VERSION_ERROR`), where
  ``[type]::new()`` does not exist.
- A request that does not parse is refused with a fixed message
  (:data:`INVALID_REQUEST_ERROR`): ``JavaScriptSerializer``'s own message quotes the whole
  input, SIP passwords included, and stderr reaches reports.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from provisioner.errors import RemoteError
from provisioner.transport.agent.operations import REGISTRY

__all__ = [
    "BOOTSTRAP",
    "BOOTSTRAP_FILE",
    "CMD_LINE_LIMIT",
    "COMMON_FILE",
    "INVALID_REQUEST_ERROR",
    "LANGUAGE_MODE_ERROR",
    "POWERSHELL",
    "POWERSHELL_ARGS",
    "POWERSHELL_VERSION_ERROR",
    "SCRIPTS",
    "bootstrap_command",
    "command_line",
    "decode_clixml",
    "make_envelope",
    "parse_answer",
]

_PACKAGE = "provisioner.transport.agent"

BOOTSTRAP_FILE = "bootstrap.ps1"
COMMON_FILE = "common.ps1"
"""The two scripts that are no operation's: the bootstrap, and the helpers sent before each."""
POWERSHELL = "powershell.exe"
POWERSHELL_ARGS = ("-NoLogo", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass")
CMD_LINE_LIMIT = 8191
"""cmd.exe's limit on a command line, which WinRS commands are subject to."""
LANGUAGE_MODE_ERROR = (
    "constrained-language: PowerShell runs in {mode} mode on this workstation (WDAC or AppLocker "
    "policy); the agent needs FullLanguage mode"
)
"""What the bootstrap throws when PowerShell does not run in FullLanguage mode."""
POWERSHELL_VERSION_ERROR = (
    "powershell-version: PowerShell {version} runs here; the agent needs Windows PowerShell 5.1 "
    "(WMF 5.1)"
)
"""What the bootstrap throws below PowerShell 5."""
INVALID_REQUEST_ERROR = "the request is not valid JSON"
"""What the bootstrap says of a request it cannot parse (never the request itself)."""


def _read_script(name: str) -> str:
    """The exact text of a packaged script: package data, or the file beside this module."""
    try:
        data = resources.files(_PACKAGE).joinpath(name).read_bytes()
    except (ImportError, OSError, TypeError):
        # A layout importlib.resources cannot see into (a zipapp built by hand, a frozen
        # build): the file next to the module is the same text.
        data = Path(__file__).with_name(name).read_bytes()
    # Bytes, not read_text(): text mode would translate line endings, and the exact text
    # matters (the lab and the golden copies compare it).
    return data.decode("utf-8")


BOOTSTRAP = _read_script(BOOTSTRAP_FILE)
_COMMON = _read_script(COMMON_FILE)
SCRIPTS: Mapping[str, str] = MappingProxyType(
    {op.name: _COMMON + _read_script(op.script) for op in REGISTRY}
)
"""The exact text sent for each operation, by name."""


def bootstrap_command() -> tuple[str, list[str]]:
    """The command and arguments for ``Protocol.run_command``: PowerShell running the bootstrap."""
    encoded = base64.b64encode(BOOTSTRAP.encode("utf-16-le")).decode("ascii")
    return POWERSHELL, [*POWERSHELL_ARGS, "-EncodedCommand", encoded]


def command_line() -> str:
    """The command line WinRS builds from :func:`bootstrap_command` (arguments joined by spaces)."""
    command, arguments = bootstrap_command()
    return " ".join([command, *arguments])


def make_envelope(op: str, request: Mapping[str, object]) -> bytes:
    """The stdin of one request: base64 (ASCII) of UTF-8 JSON ``{"script", "request"}``."""
    script = SCRIPTS.get(op)
    if script is None:
        raise ValueError(f"unknown agent op {op!r}; the agent knows {', '.join(SCRIPTS)}")
    named = request.get("op", op)
    if named != op:
        raise ValueError(f"the request is for op {named!r} but would be sent to the {op!r} script")
    payload = json.dumps(
        {"script": script, "request": dict(request)},
        ensure_ascii=False,
        separators=(",", ":"),
        allow_nan=False,
    )
    return base64.b64encode(payload.encode("utf-8"))


_BOM = b"\xef\xbb\xbf"


def parse_answer(stdout: bytes, *, host: str = "") -> dict[str, object]:
    """Decode the agent's stdout (base64 of UTF-8 JSON) into the answer object.

    Raises :class:`RemoteError` when it is not a protocol 1 answer. The message never quotes
    stdout: an answer can carry file contents, and so passwords.
    """
    text = stdout.strip()
    # Harmless if the console ever prefixed a UTF-8 byte order mark.
    text = text.removeprefix(_BOM).strip()
    if not text:
        raise RemoteError("the agent wrote no answer on stdout", host=host)
    try:
        raw = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RemoteError(
            f"the agent's answer is not base64 ({len(stdout)} bytes on stdout): {exc}", host=host
        ) from exc
    try:
        answer = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteError(f"the agent's answer is not UTF-8 JSON: {exc}", host=host) from exc
    if not isinstance(answer, dict):
        raise RemoteError(
            f"the agent's answer is a JSON {type(answer).__name__}, not an object", host=host
        )
    if answer.get("protocol") != 1:
        raise RemoteError(
            f"the agent answered protocol {answer.get('protocol')!r}; this controller speaks 1",
            host=host,
        )
    return answer


_CLIXML_HEADER = "#< CLIXML"
_OBJS = re.compile(r"<Objs\b[^>]*>(.*?)</Objs>", re.DOTALL)
_ERROR_STRING = re.compile(r'<S\s+S="Error"\s*>(.*?)</S>|<S\s+S="Error"\s*/>', re.DOTALL)
_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")
_ENTITY = re.compile(r"&(#x[0-9A-Fa-f]+|#[0-9]+|lt|gt|amp|quot|apos);")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


def _unescape_xml(text: str) -> str:
    def entity(match: re.Match[str]) -> str:
        name = match.group(1)
        if not name.startswith("#"):
            return _NAMED[name]
        code = int(name[2:], 16) if name.startswith("#x") else int(name[1:])
        # Out of Unicode's range: not from PowerShell; keep it as written.
        return chr(code) if code <= 0x10FFFF else match.group(0)

    return _ENTITY.sub(entity, text)


def _unescape_clixml_string(text: str) -> str:
    # PowerShell writes characters XML cannot carry (CR, LF, control characters, and "_x"
    # itself as _x005F_) as _xHHHH_ UTF-16 code units; pairs of them make surrogate pairs.
    decoded = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), _unescape_xml(text))
    return decoded.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def decode_clixml(stderr: bytes) -> str:
    """Readable text from PowerShell's stderr, which may be CLIXML (``#< CLIXML``).

    The ``<S S="Error">`` strings are concatenated (PowerShell splits one error record into one
    string per line, each ending in ``_x000D__x000A_``) and unescaped; progress records and other
    streams are dropped. Text outside the CLIXML passes through. Line endings become ``\\n`` and
    the result is stripped.
    """
    text = stderr.decode("utf-8", "replace")
    plain, _, clixml = text.partition(_CLIXML_HEADER)
    parts = [plain.strip()] if plain.strip() else []
    remainder = clixml
    for block in _OBJS.finditer(clixml):
        strings = [
            _unescape_clixml_string(m.group(1) or "")
            for m in _ERROR_STRING.finditer(block.group(1))
        ]
        joined = "".join(strings).strip()
        if joined:
            parts.append(joined)
        remainder = remainder.replace(block.group(0), "", 1)
    # Whatever is neither header nor a complete <Objs> block (a truncated stream, a second
    # header, plain text after the XML) is kept rather than lost.
    leftover = remainder.replace(_CLIXML_HEADER, "").strip()
    if leftover:
        parts.append(leftover)
    return "\n".join(parts).replace("\r\n", "\n").replace("\r", "\n").strip()
