"""The lab's agent: runs agent-protocol requests against an emulated :class:`Workstation`.

:class:`LabAgent` is the :class:`~provisioner.lab.handler.CommandHandler` of a lab whose hosts
hold a :class:`Workstation` in their ``state``. It accepts exactly one command line, the
bootstrap of ``provisioner.transport.agent.scripts``, reads the envelope from stdin, checks
that the script text is **exactly** the packaged script of the request's ``op`` (a drifted
script fails like PowerShell does: CLIXML on stderr, exit code 1), and then does what
``docs/agent-protocol.md`` says the script does. It never interprets PowerShell.

Where the contract is silent the lab does what the packaged scripts do (``apply.ps1`` and
friends), so that the controller meets the same answers in the lab as on Windows:

* the ini path follows the inventory's ``mode``; an install found by registry or MSI is
  ``installed``; every candidate counts only if ``<dir>\\<exe>`` exists; ``exe`` defaults to
  ``microsip.exe``, ``mode`` to ``installed``, ``if_running`` to ``skip``;
* ``not-installed`` is reported for every user (and the override) before accounts are resolved;
  a user in error keeps ``path: null``; the override entry has an ``error`` field too;
* apply and rollback first delete the file's stale ``.<name>.<12 hex>.tmp`` (and those of
  ``applied`` in the state folder), quietly, even when they then report ``busy`` or
  ``conflict``, and rotate in a ``backup.new`` left by an agent that died after its replace;
* the replaced content waits as ``backup.new`` and the backups rotate only after the verify, down
  to the first free slot; a failed replace or verify moves no backup (a failed verify puts
  ``backup.new`` back) and answers ``new_sha256`` = the hash read back; a rotation that fails
  after the verify leaves ``backup.new``, named in ``backup``, and the file ``written``;
* ``busy`` and ``conflict`` carry an error object with the same code; a failure to write
  ``applied`` after the file was written is ``status: error`` with a message that says so;
  ``applied_b64: null`` leaves ``applied`` alone; rollback checks ``no-backup`` before the
  running policy, drops the old ``rolled-back`` first, and answers ``backup`` = ``rolled-back``;
* a refused ``protocol`` or ``if_running`` is ``ok: false`` with the error in ``"error"``;
* a terminating error of the bootstrap (bad envelope) is plain text on stderr, exit code 1;
  a command line or script text the lab does not recognise is CLIXML on stderr, exit code 1;
  a ``crash_after_temp`` is no output at all and exit code ``0xC0000005``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from provisioner.lab.handler import CommandResult, HostContext
from provisioner.lab.workstation import (
    OVERRIDE_ACL,
    Acl,
    Crashed,
    FileError,
    Workstation,
    ini_name,
    join,
    leaf,
    parent,
    user_file_acl,
)
from provisioner.transport.agent import scripts

PROTOCOL = 1
POLICIES = ("skip", "stop", "force")
KINDS = ("microsip", "override")
PENDING = "backup.new"
"""Where apply keeps the replaced content until the new file is verified."""
CRASH_EXIT_CODE = 0xC0000005
"""What WinRS reports for a powershell.exe that died (STATUS_ACCESS_VIOLATION)."""

Json = dict[str, Any]
_UNEXPANDED = re.compile(r"%[^%\\]+%")
_SID = re.compile(r"^S-1-\d+(-\d+)+$")


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
            script, request = decode_envelope(stdin)
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
                workstation = host.state
                if not isinstance(workstation, Workstation):
                    raise AgentFailure(f"Host {host.name} has no emulated workstation.")
                answer = execute(workstation, request)
        except AgentFailure as failed:
            return CommandResult(stderr=clixml_error(str(failed)), exit_code=1)
        except ScriptFailure as failed:
            return CommandResult(stderr=script_error(str(failed)), exit_code=1)
        except Crashed:
            return CommandResult(exit_code=CRASH_EXIT_CODE)
        return CommandResult(stdout=encode_answer(answer))


# --- wire formats -----------------------------------------------------------------------------


def decode_envelope(stdin: bytes) -> tuple[str, Json]:
    """stdin (base64 ASCII of UTF-8 JSON) to ``(script, request)``."""
    try:
        raw = base64.b64decode(b"".join(stdin.split()), validate=True)
        envelope = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as bad:
        raise ScriptFailure(f"The envelope is not base64 of UTF-8 JSON: {bad}") from None
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


def execute(workstation: Workstation, request: Json) -> Json:
    """Run one request (already matched to its script) and return the answer."""
    op = str(request["op"])
    protocol = request.get("protocol")
    if not _is_one(protocol):
        return _refusal(op, f"protocol {_ps_text(protocol)} not supported")
    if op == "inspect":
        return _inspect(workstation, request)
    policy = _ps_text(request.get("if_running")) or "skip"
    if policy not in POLICIES:
        return _refusal(op, f"if_running '{policy}' not supported")
    step = _apply_file if op == "apply" else _rollback_file
    results = [step(workstation, item, policy) for item in _items(request.get("files"))]
    return {"protocol": PROTOCOL, "op": op, "ok": True, "files": results}


def _refusal(op: str, message: str) -> Json:
    return {"protocol": PROTOCOL, "op": op, "ok": False, "error": _error("internal", message)}


def _is_one(value: object) -> bool:
    # PowerShell's -ne compares loosely: 1, 1.0 and "1" are all protocol 1.
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == PROTOCOL
    return isinstance(value, str) and value.strip() == str(PROTOCOL)


def _ps_text(value: object) -> str:
    """``[string]$value`` in PowerShell: null is empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _items(value: object) -> list[Json]:
    """``@($list)`` without nulls; a non-object item reads as an object with no fields."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [item if isinstance(item, dict) else {} for item in values if item is not None]


def _error(code: str, message: str) -> Json:
    return {"code": code, "message": message}


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _file_facts(workstation: Workstation, path: str) -> Json:
    data = workstation.read(path)
    return {"exists": data is not None, "sha256": _sha(data), "content_b64": _b64(data)}


# --- inspect ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Install:
    found: bool
    mode: str
    dir: str | None
    exe_path: str | None
    source: str | None
    exe: str


def _locate(workstation: Workstation, wanted: Json) -> _Install:
    exe = _ps_text(wanted.get("exe")) or "microsip.exe"
    mode = _ps_text(wanted.get("mode")) or "installed"
    candidates: list[tuple[str, str]] = []
    if _ps_text(wanted.get("install_dir")):
        candidates.append(("inventory", _ps_text(wanted.get("install_dir"))))
    if workstation.hklm_microsip:
        candidates.append(("registry", workstation.hklm_microsip))
    candidates += [
        ("msi", product.install_location)
        for product in workstation.msi_products
        if product.name.casefold() == "microsip" and product.install_location
    ]
    for source, raw in candidates:
        folder = raw.strip().strip('"')
        try:
            exe_path = join(folder, exe)
            if not workstation.is_file(exe_path):
                continue
        except FileError:
            continue
        # installer markers mean installed mode, whatever the inventory says (MicroSIP's rule)
        return _Install(
            True, "installed" if source != "inventory" else mode, folder, exe_path, source, exe
        )
    return _Install(False, mode, None, None, None, exe)


def _inspect(workstation: Workstation, request: Json) -> Json:
    wanted = request.get("install")
    install = _locate(workstation, wanted if isinstance(wanted, dict) else {})
    override = _inspect_override(workstation, install) if request.get("override") else None
    users = [_inspect_user(workstation, user, install) for user in _items(request.get("users"))]
    return {
        "protocol": PROTOCOL,
        "op": "inspect",
        "ok": True,
        "host": {
            "computer": workstation.computer,
            "ps_version": workstation.ps_version,
            "free_bytes": workstation.free_bytes,
        },
        "install": {
            "found": install.found,
            "mode": install.mode,
            "dir": install.dir,
            "exe_path": install.exe_path,
            "source": install.source,
        },
        "override": override,
        "users": users,
    }


def _not_installed() -> FileError:
    return FileError(
        "not-installed", "MicroSIP was not found where the inventory says, nor by registry or MSI."
    )


def _inspect_override(workstation: Workstation, install: _Install) -> Json:
    entry: Json = {"path": None}
    try:
        if install.dir is None:
            raise _not_installed()
        path = join(install.dir, "override.ini")
        entry["path"] = path
        facts = _file_facts(workstation, path)
        facts["applied"] = _file_facts(workstation, Workstation.state_path(path, "applied"))
        entry.update(facts)
        entry["error"] = None
    except FileError as failed:
        entry["error"] = _error(failed.code, failed.message)
    return entry


def _inspect_user(workstation: Workstation, wanted: Json, install: _Install) -> Json:
    entry: Json = {
        "name": wanted.get("name"),
        "windows": wanted.get("windows"),
        "sid": None,
        "profile": None,
        "appdata": None,
        "path": None,
    }
    try:
        if install.dir is None:
            raise _not_installed()
        account = _ps_text(entry["windows"])
        if not account:
            raise FileError("no-account", "no Windows account is given for this user.")
        user = workstation.lookup_account(account)
        if user is None:
            raise FileError("no-account", f"the Windows account {account} cannot be resolved.")
        entry["sid"] = user.sid
        if user.profile is None or not workstation.is_dir(user.profile):
            raise FileError(
                "no-profile", f"{account} has no profile on this workstation (never logged on)."
            )
        entry["profile"] = user.profile
        appdata = user.appdata or ""
        if _UNEXPANDED.search(appdata):
            raise FileError(
                "internal",
                f"cannot expand the AppData folder '{user.shell_appdata}' for this user.",
            )
        entry["appdata"] = appdata
        name = ini_name(install.exe)
        if install.mode == "portable":
            path = join(install.dir, name)
        else:
            path = join(appdata, "MicroSIP", name)
        entry["path"] = path
        facts = _file_facts(workstation, path)
        facts["applied"] = _file_facts(workstation, Workstation.state_path(path, "applied"))
        facts["running"] = bool(workstation.processes_of(user.sid, install.exe))
        entry.update(facts)
        entry["error"] = None
    except FileError as failed:
        entry["error"] = _error(failed.code, failed.message)
    return entry


# --- apply and rollback -----------------------------------------------------------------------


@dataclass(frozen=True)
class _FileSpec:
    kind: str
    path: str
    sid: str
    process: str
    acl: Acl

    @functools.cached_property
    def folder(self) -> str:
        return parent(self.path)

    @functools.cached_property
    def name(self) -> str:
        return leaf(self.path)

    @functools.cached_property
    def state_dir(self) -> str:
        return join(self.folder, ".provisioner", self.name)

    def state(self, item: str) -> str:
        return join(self.state_dir, item)


def _parse_file(item: Json) -> _FileSpec:
    kind, path, sid = (_ps_text(item.get(key)) for key in ("kind", "path", "sid"))
    if kind not in KINDS:
        raise FileError("internal", f"unknown file kind '{kind}'.")
    try:
        leaf(path)
    except FileError:
        raise FileError("internal", f"the path '{path}' is not absolute.") from None
    if kind == "microsip":
        # without the SID the ACL would lock the user out of their own file
        if not sid:
            raise FileError("internal", "a microsip file needs the user's SID.")
        if not _SID.match(sid):
            raise FileError("internal", f"'{sid}' is not a valid SID.")
    acl = user_file_acl(sid) if kind == "microsip" else OVERRIDE_ACL
    return _FileSpec(kind, path, sid, _ps_text(item.get("process")), acl)


def _new_result(item: Json) -> Json:
    return {
        "path": item.get("path"),
        "status": "error",
        "old_sha256": None,
        "new_sha256": None,
        "backup": None,
        "stopped": 0,
        "error": None,
    }


def _may_write(workstation: Workstation, spec: _FileSpec, policy: str, result: Json) -> bool:
    """The ``if_running`` policy; False (and ``busy``) when the file must be left alone."""
    if spec.kind != "microsip" or not spec.process:
        return True
    running = workstation.processes_of(spec.sid, spec.process)
    if not running or policy == "force":
        return True
    if policy == "stop":
        result["stopped"] = workstation.stop(running)
        return True
    result["status"] = "busy"
    result["error"] = _error(
        "busy", f"{spec.process} is running for this user ({len(running)} process(es))."
    )
    return False


def _discard(workstation: Workstation, temp: str | None) -> None:
    if temp is not None:
        with contextlib.suppress(FileError):
            workstation.delete(temp)


def _temp_name(folder: str, name: str) -> str:
    return join(folder, f".{name}.{secrets.token_hex(6)}.tmp")


def _remove_stale_temps(workstation: Workstation, folder: str, name: str) -> None:
    """``Remove-StaleTempFiles``: ``.<name>.<12 hex>.tmp`` of a dead agent, best effort."""
    stale = re.compile(rf"^\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp$", re.IGNORECASE)
    for entry in workstation.listdir(folder):
        if stale.match(entry):
            _discard(workstation, join(folder, entry))


def _remove_stale_temps_of(workstation: Workstation, spec: _FileSpec) -> None:
    _remove_stale_temps(workstation, spec.folder, spec.name)
    _remove_stale_temps(workstation, spec.state_dir, "applied")


def _move_over(workstation: Workstation, source: str, target: str) -> None:
    """.NET Framework's File.Move cannot overwrite; File.Replace can."""
    if workstation.exists(target):
        workstation.replace(source, target, None)
    else:
        workstation.move(source, target)


def _backups_down(workstation: Workstation, spec: _FileSpec) -> None:
    """``backup.new`` becomes ``backup.1``, the others moving down to the first free slot."""
    pending = spec.state(PENDING)
    if not workstation.exists(pending):
        return
    backup1, backup2 = spec.state("backup.1"), spec.state("backup.2")
    free = 3
    if not workstation.exists(backup1):
        free = 1
    elif not workstation.exists(backup2):
        free = 2
    if free >= 3:
        _move_over(workstation, backup2, spec.state("backup.3"))
    if free >= 2:
        _move_over(workstation, backup1, backup2)
    _move_over(workstation, pending, backup1)


def _backups_up(workstation: Workstation, spec: _FileSpec) -> None:
    for number in (2, 3):
        source = spec.state(f"backup.{number}")
        if workstation.exists(source):
            _move_over(workstation, source, spec.state(f"backup.{number - 1}"))


def _set_state_acl(workstation: Workstation, spec: _FileSpec) -> None:
    workstation.set_acl(spec.state_dir, spec.acl)
    for name in workstation.list_files(spec.state_dir):
        workstation.set_acl(join(spec.state_dir, name), spec.acl)


def _write_state_file(workstation: Workstation, spec: _FileSpec, item: str, data: bytes) -> None:
    temp = _temp_name(spec.state_dir, item)
    try:
        workstation.write_new(temp, data, spec.acl)
        _move_over(workstation, temp, spec.state(item))
    finally:
        _discard(workstation, temp)


def _decode(item: Json, name: str) -> bytes:
    try:
        return base64.b64decode(_ps_text(item.get(name)), validate=True)
    except binascii.Error:
        raise FileError("internal", f"'{name}' is not valid base64.") from None


def _apply_file(workstation: Workstation, item: Json, policy: str) -> Json:
    result = _new_result(item)
    temp: str | None = None
    try:
        spec = _parse_file(item)
        _remove_stale_temps_of(workstation, spec)
        intended = _ps_text(item.get("sha256")).lower()
        # refused rather than guessed: a missing content would truncate the user's file
        if item.get("content_b64") is None or not intended:
            raise FileError(
                "internal", "the request gives no content_b64 or no sha256 for this file."
            )
        content = _decode(item, "content_b64")
        if not _may_write(workstation, spec, policy, result):
            return result
        current = _sha(workstation.read(spec.path))
        result["old_sha256"] = current
        expected = item.get("expect_sha256")
        if current != (expected.lower() if isinstance(expected, str) else expected):
            result["status"] = "conflict"
            result["error"] = _error("conflict", "the file changed since inspect.")
            return result
        if not workstation.is_dir(spec.folder):
            # override.ini lives in the install folder: creating that would fake an install
            if spec.kind != "microsip":
                raise FileError(
                    "not-installed", f"the MicroSIP folder {spec.folder} does not exist."
                )
            workstation.make_dir(spec.folder, spec.acl)
        temp = _temp_name(spec.folder, spec.name)
        workstation.write_new(temp, content, spec.acl, managed=True)
        workstation.make_dir(spec.state_dir, spec.acl)
        # a backup.new left by an agent that died after its replace is the newest generation
        _backups_down(workstation, spec)
        pending = spec.state(PENDING)
        had_file = workstation.exists(spec.path)
        if had_file:
            # no backup moves until the new file is verified
            workstation.replace(temp, spec.path, pending)
        else:
            workstation.move(temp, spec.path)
        temp = None
        workstation.set_acl(spec.path, spec.acl)
        written = workstation.sha256(spec.path)
        result["new_sha256"] = written
        if written != intended:
            if had_file:
                _move_over(workstation, pending, spec.path)
                undone = "the previous file was put back"
            else:
                workstation.delete(spec.path)
                undone = "the new file was removed"
            raise FileError(
                "verify-failed",
                f"the file read back differs from the intended content; {undone}.",
            )
        if had_file:
            # written and verified: a failed rotation leaves backup.new for the next request
            try:
                _backups_down(workstation, spec)
                result["backup"] = spec.state("backup.1")
            except FileError:
                result["backup"] = pending
        _set_state_acl(workstation, spec)
        if item.get("applied_b64") is not None:
            try:
                _write_state_file(workstation, spec, "applied", _decode(item, "applied_b64"))
                _set_state_acl(workstation, spec)
            except FileError as failed:
                # the file itself is written: say so, or nothing would seem to have changed
                raise FileError(
                    failed.code,
                    f"the file was written, but not its applied copy: {failed.message}",
                ) from None
        result["status"] = "written"
    except Crashed:
        temp = None  # the agent died: nothing removes its temp file
        raise
    except FileError as failed:
        result["status"] = "error"
        result["error"] = _error(failed.code, failed.message)
    except OSError as failed:
        result["status"] = "error"
        result["error"] = _error("internal", f"{failed.strerror or failed}.")
    finally:
        _discard(workstation, temp)
    return result


def _rollback_file(workstation: Workstation, item: Json, policy: str) -> Json:
    result = _new_result(item)
    try:
        spec = _parse_file(item)
        _remove_stale_temps_of(workstation, spec)
        _backups_down(workstation, spec)
        backup, rolled = spec.state("backup.1"), spec.state("rolled-back")
        if not workstation.exists(backup):
            raise FileError("no-backup", f"there is no backup of {spec.path} to restore.")
        if not _may_write(workstation, spec, policy, result):
            return result
        # the previous rolled-back copy is superseded either way
        workstation.delete(rolled)
        if workstation.exists(spec.path):
            result["old_sha256"] = workstation.sha256(spec.path)
            workstation.replace(backup, spec.path, rolled)
            result["backup"] = rolled
        else:
            workstation.move(backup, spec.path)
        workstation.set_acl(spec.path, spec.acl)
        _backups_up(workstation, spec)
        # without a merge base the next push treats the restored file as new
        workstation.delete(spec.state("applied"))
        _set_state_acl(workstation, spec)
        result["new_sha256"] = workstation.sha256(spec.path)
        result["status"] = "restored"
    except FileError as failed:
        result["status"] = "error"
        result["error"] = _error(failed.code, failed.message)
    except OSError as failed:
        result["status"] = "error"
        result["error"] = _error("internal", f"{failed.strerror or failed}.")
    return result
