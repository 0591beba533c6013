"""The lab's agent: runs agent-protocol requests against an emulated :class:`Workstation`.

:class:`LabAgent` is the :class:`~provisioner.lab.handler.CommandHandler` of a lab whose hosts
hold a :class:`Workstation` in their ``state``. It accepts exactly one command line, the
bootstrap of ``provisioner.transport.agent.scripts``, reads the envelope from stdin, checks
that the script text is **exactly** the packaged script of the request's ``op`` (a drifted
script fails like PowerShell does: CLIXML on stderr, exit code 1), and then does what
``docs/agent-protocol.md`` says the script does. It never interprets PowerShell.

Choices where the contract is silent (each keeps the managed file old-or-new at all times):

* the ini path follows the inventory's ``mode``; an install found by registry or MSI is
  reported and treated as ``installed``; registry and MSI candidates count only if
  ``<dir>\\<exe>`` exists;
* backups rotate only when the file exists (a first write makes no backup); a failed replace
  undoes the rotation; a failed verify puts ``backup.1`` back and moves ``backup.2``/``.3``
  up again (the oldest generation, dropped by the rotation, is lost);
* ``busy`` and ``conflict`` carry an error object with the same code; a failure after the file
  was written (the ``applied`` copy) keeps ``status: written`` and sets ``error``;
* ``applied_b64: null`` removes ``applied``; rollback's ``backup`` is the ``rolled-back`` path;
* the ``.provisioner`` folder gets the ACL of the file that created it;
* ``protocol`` other than 1 answers ``ok: false`` with the error in ``"error"``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
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
CRASH_EXIT_CODE = 0xC0000005
"""What WinRS reports for a powershell.exe that died (STATUS_ACCESS_VIOLATION)."""

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
    op = request["op"]
    protocol = request.get("protocol")
    if type(protocol) is not int or protocol != PROTOCOL:
        return {
            "protocol": PROTOCOL,
            "op": op,
            "ok": False,
            "error": _error("internal", f"protocol {json.dumps(protocol)} not supported"),
        }
    if op == "inspect":
        return _inspect(workstation, request)
    if op in ("apply", "rollback"):
        policy = request.get("if_running")
        if policy not in POLICIES:
            raise ScriptFailure(f"if_running must be one of {', '.join(POLICIES)}.")
        files = request.get("files")
        if not isinstance(files, list):
            raise ScriptFailure("The request needs a 'files' list.")
        step = _apply_file if op == "apply" else _rollback_file
        results = [step(workstation, item, policy) for item in files]
        return {"protocol": PROTOCOL, "op": op, "ok": True, "files": results}
    raise ScriptFailure(f"Unknown op '{op}'.")


def _error(code: str, message: str) -> Json:
    return {"code": code, "message": message}


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _text(container: Mapping[str, Any], name: str) -> str:
    value = container.get(name)
    if not isinstance(value, str) or not value:
        raise ScriptFailure(f"'{name}' must be a non-empty string.")
    return value


# --- inspect ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    dir: str
    source: str


def _locate(workstation: Workstation, install_dir: str, exe: str) -> _Found | None:
    candidates = [(install_dir, "inventory")]
    if workstation.hklm_microsip:
        candidates.append((workstation.hklm_microsip, "registry"))
    candidates += [
        (product.install_location, "msi")
        for product in workstation.msi_products
        if product.name.casefold() == "microsip" and product.install_location
    ]
    for folder, source in candidates:
        folder = folder.strip().strip('"').rstrip("\\/")
        try:
            exe_path = join(folder, exe)
            if workstation.exists(exe_path) and not workstation.is_dir(exe_path):
                return _Found(folder, source)
        except FileError:
            continue
    return None


def _file_facts(workstation: Workstation, path: str) -> Json:
    data = workstation.read(path)
    return {"exists": data is not None, "sha256": _sha(data), "content_b64": _b64(data)}


def _managed_facts(workstation: Workstation, path: str) -> Json:
    facts = {"path": path, **_file_facts(workstation, path)}
    facts["applied"] = _file_facts(workstation, Workstation.state_path(path, "applied"))
    return facts


def _inspect(workstation: Workstation, request: Json) -> Json:
    wanted = request.get("install")
    if not isinstance(wanted, dict):
        raise ScriptFailure("The request needs an 'install' object.")
    mode = wanted.get("mode")
    if mode not in ("installed", "portable"):
        raise ScriptFailure("install.mode must be 'installed' or 'portable'.")
    exe = _text(wanted, "exe")
    found = _locate(workstation, _text(wanted, "install_dir"), exe)
    if found is not None and found.source != "inventory":
        mode = "installed"
    users = request.get("users")
    if not isinstance(users, list):
        raise ScriptFailure("The request needs a 'users' list.")
    override = None
    if request.get("override") and found is not None:
        override = _managed_facts(workstation, join(found.dir, "override.ini"))
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
            "found": found is not None,
            "mode": mode,
            "dir": found.dir if found else None,
            "exe_path": join(found.dir, exe) if found else None,
            "source": found.source if found else None,
        },
        "override": override,
        "users": [_inspect_user(workstation, user, mode, exe, found) for user in users],
    }


def _inspect_user(
    workstation: Workstation, wanted: object, mode: str, exe: str, found: _Found | None
) -> Json:
    spec = wanted if isinstance(wanted, dict) else {}
    windows = spec.get("windows")
    entry: Json = {
        "name": spec.get("name"),
        "windows": windows,
        "sid": None,
        "profile": None,
        "appdata": None,
    }
    if not isinstance(windows, str) or not windows:
        entry["error"] = _error("internal", "The user entry needs a 'windows' account name.")
        return entry
    account = workstation.lookup_account(windows)
    if account is None:
        entry["error"] = _error("no-account", f"The account '{windows}' cannot be resolved.")
        return entry
    entry["sid"] = account.sid
    user = workstation.profile_of(account.sid)
    if user is None or user.profile is None or user.appdata is None:
        entry["error"] = _error(
            "no-profile", f"'{windows}' has no profile on {workstation.computer}."
        )
        return entry
    entry["profile"] = user.profile
    entry["appdata"] = user.appdata
    if found is None:
        entry["error"] = _error("not-installed", "MicroSIP was not found on this workstation.")
        return entry
    name = ini_name(exe)
    path = join(found.dir, name) if mode == "portable" else join(user.appdata, "MicroSIP", name)
    try:
        facts = _managed_facts(workstation, path)
    except FileError as failed:
        entry["error"] = _error(failed.code, failed.message)
        return entry
    entry.update(facts)
    entry["running"] = bool(workstation.processes_of(account.sid, exe))
    entry["error"] = None
    return entry


# --- apply and rollback -----------------------------------------------------------------------


@dataclass(frozen=True)
class _FileSpec:
    kind: str
    path: str
    sid: str | None
    process: str | None
    acl: Acl

    @property
    def folder(self) -> str:
        return parent(self.path)

    @property
    def name(self) -> str:
        return leaf(self.path)

    @property
    def state_dir(self) -> str:
        return join(self.folder, ".provisioner", self.name)

    def state(self, item: str) -> str:
        return join(self.state_dir, item)


def _parse_file(item: Mapping[str, Any]) -> _FileSpec:
    kind, path, sid, process = (item.get(key) for key in ("kind", "path", "sid", "process"))
    if kind not in KINDS:
        raise FileError("internal", f"kind must be one of {', '.join(KINDS)}.")
    if not isinstance(path, str) or not path:
        raise FileError("internal", "The file entry needs a 'path'.")
    leaf(path)  # validates
    if kind == "microsip" and (not isinstance(sid, str) or not sid.startswith("S-1-")):
        raise FileError("internal", "A microsip file needs the user's 'sid'.")
    if process is not None and not isinstance(process, str):
        raise FileError("internal", "'process' must be a string or null.")
    acl = user_file_acl(sid) if kind == "microsip" and isinstance(sid, str) else OVERRIDE_ACL
    return _FileSpec(str(kind), path, sid if isinstance(sid, str) else None, process, acl)


def _decode_b64(item: Mapping[str, Any], name: str) -> bytes:
    value = item.get(name)
    if not isinstance(value, str):
        raise FileError("internal", f"'{name}' must be base64 text.")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise FileError("internal", f"'{name}' is not valid base64.") from None


def _hash_field(item: Mapping[str, Any], name: str, *, nullable: bool) -> str | None:
    value = item.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or len(value) != 64:
        raise FileError("internal", f"'{name}' must be a hex SHA-256.")
    return value.lower()


def _new_result(item: Mapping[str, Any]) -> Json:
    return {
        "path": item.get("path"),
        "status": "error",
        "old_sha256": None,
        "new_sha256": None,
        "backup": None,
        "stopped": 0,
        "error": None,
    }


def _current_hash(workstation: Workstation, path: str) -> str | None:
    try:
        return workstation.sha256(path)
    except FileError:
        return None


def _running_check(workstation: Workstation, spec: _FileSpec, policy: str, result: Json) -> bool:
    """Apply the ``if_running`` policy; True when the file must be skipped (busy)."""
    if spec.kind != "microsip" or not spec.process or spec.sid is None:
        return False
    running = workstation.processes_of(spec.sid, spec.process)
    if not running:
        return False
    if policy == "skip":
        pids = ", ".join(str(p.pid) for p in running)
        result["status"] = "busy"
        result["error"] = _error("busy", f"{spec.process} runs for {spec.sid} (pid {pids}).")
        result["old_sha256"] = result["new_sha256"] = _current_hash(workstation, spec.path)
        return True
    if policy == "stop":
        result["stopped"] = workstation.stop(running)
    return False


def _discard(workstation: Workstation, temp: str | None) -> None:
    if temp is None:
        return
    with contextlib.suppress(FileError):
        workstation.delete(temp)


def _temp_name(folder: str, name: str) -> str:
    return join(folder, f".{name}.{secrets.token_hex(4)}.tmp")


def _rotate(workstation: Workstation, spec: _FileSpec) -> list[tuple[str, str]]:
    moved: list[tuple[str, str]] = []
    for newer, older in (("backup.2", "backup.3"), ("backup.1", "backup.2")):
        source, target = spec.state(newer), spec.state(older)
        if workstation.exists(source):
            workstation.move(source, target, overwrite=True)
            moved.append((source, target))
    return moved


def _unrotate(workstation: Workstation, moved: list[tuple[str, str]]) -> None:
    for source, target in reversed(moved):
        try:
            workstation.move(target, source)
        except FileError:
            return


def _move_up(workstation: Workstation, spec: _FileSpec) -> None:
    """``backup.2`` to ``backup.1`` and ``backup.3`` to ``backup.2`` (after backup.1 left)."""
    for older, newer in (("backup.2", "backup.1"), ("backup.3", "backup.2")):
        if workstation.exists(spec.state(older)) and not workstation.exists(spec.state(newer)):
            workstation.move(spec.state(older), spec.state(newer))


def _write_state_file(
    workstation: Workstation, spec: _FileSpec, item: str, data: bytes | None
) -> None:
    target = spec.state(item)
    if data is None:
        workstation.delete(target)
        return
    temp = _temp_name(spec.state_dir, item)
    try:
        workstation.write_new(temp, data, spec.acl)
        if workstation.exists(target):
            workstation.replace(temp, target, None)
        else:
            workstation.move(temp, target)
    except FileError:
        _discard(workstation, temp)
        raise


def _apply_file(workstation: Workstation, item: object, policy: str) -> Json:
    if not isinstance(item, dict):
        return {**_new_result({}), "error": _error("internal", "A file entry is not an object.")}
    result = _new_result(item)
    temp: str | None = None
    written = False
    try:
        spec = _parse_file(item)
        content = _decode_b64(item, "content_b64")
        applied = None if item.get("applied_b64") is None else _decode_b64(item, "applied_b64")
        expect = _hash_field(item, "expect_sha256", nullable=True)
        intended = _hash_field(item, "sha256", nullable=False)
        if _running_check(workstation, spec, policy, result):
            return result
        current = workstation.read(spec.path)
        result["old_sha256"] = result["new_sha256"] = _sha(current)
        if _sha(current) != expect:
            result["status"] = "conflict"
            result["error"] = _error(
                "conflict", f"'{spec.path}' changed since inspect (sha256 {_sha(current)})."
            )
            return result
        workstation.make_dir(spec.folder, spec.acl)
        workstation.make_dir(spec.state_dir, spec.acl)
        temp = _temp_name(spec.folder, spec.name)
        workstation.write_new(temp, content, spec.acl, managed=True)
        backup = spec.state("backup.1")
        if current is not None:
            moved = _rotate(workstation, spec)
            try:
                workstation.replace(temp, spec.path, backup)
            except FileError:
                _unrotate(workstation, moved)
                raise
            workstation.set_acl(backup, spec.acl)
        else:
            workstation.move(temp, spec.path)
        temp = None
        now = workstation.sha256(spec.path)
        if now != intended:
            _undo_write(workstation, spec, had_file=current is not None)
            result["new_sha256"] = _current_hash(workstation, spec.path)
            result["error"] = _error(
                "verify-failed",
                f"'{spec.path}' hashed {now} after the write, not {intended}; the old file "
                "is restored.",
            )
            return result
        written = True
        result.update(status="written", new_sha256=now)
        if current is not None:
            result["backup"] = backup
        _write_state_file(workstation, spec, "applied", applied)
    except FileError as failed:
        _discard(workstation, temp)
        if not written:
            result["status"] = "error"
            result["new_sha256"] = _current_hash(workstation, str(item.get("path")))
        result["error"] = _error(failed.code, failed.message)
    except OSError as failed:
        _discard(workstation, temp)
        result["status"] = "written" if written else "error"
        result["error"] = _error("internal", f"{failed.strerror or failed}.")
    return result


def _undo_write(workstation: Workstation, spec: _FileSpec, *, had_file: bool) -> None:
    try:
        if had_file:
            workstation.replace(spec.state("backup.1"), spec.path, None)
            _move_up(workstation, spec)
        else:
            workstation.delete(spec.path)
    except FileError as failed:
        raise FileError(
            "verify-failed",
            f"The write of '{spec.path}' failed verification and the old "
            f"file could not be restored: {failed.message}",
        ) from None


def _rollback_file(workstation: Workstation, item: object, policy: str) -> Json:
    if not isinstance(item, dict):
        return {**_new_result({}), "error": _error("internal", "A file entry is not an object.")}
    result = _new_result(item)
    restored = False
    try:
        spec = _parse_file(item)
        if _running_check(workstation, spec, policy, result):
            return result
        current = workstation.read(spec.path)
        result["old_sha256"] = result["new_sha256"] = _sha(current)
        backup, rolled = spec.state("backup.1"), spec.state("rolled-back")
        if not workstation.exists(backup):
            result["error"] = _error("no-backup", f"There is no backup of '{spec.path}'.")
            return result
        if current is not None:
            workstation.replace(backup, spec.path, rolled)
            workstation.set_acl(rolled, spec.acl)
            result["backup"] = rolled
        else:
            workstation.move(backup, spec.path)
            workstation.delete(rolled)
        restored = True
        result.update(status="restored", new_sha256=workstation.sha256(spec.path))
        workstation.set_acl(spec.path, spec.acl)
        _move_up(workstation, spec)
        workstation.delete(spec.state("applied"))
    except FileError as failed:
        if not restored:
            result["status"] = "error"
        result["error"] = _error(failed.code, failed.message)
    except OSError as failed:
        result["status"] = "restored" if restored else "error"
        result["error"] = _error("internal", f"{failed.strerror or failed}.")
    return result
