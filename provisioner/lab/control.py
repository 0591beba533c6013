"""A running ``provisioner lab up``: its private folder, its control socket, its teardown.

Everything a lab process writes lives in one private folder, ``microsip-lab-XXXXXXXX`` in the
system's temporary folder (mode 0700): the emulated disks, whose rendered files hold plaintext
passwords; the test CA and host keys; the NTLM accounts file (NT hashes); and
``control.sock``, a Unix socket (0600) on which the lab answers requests (:class:`ControlServer`).
The lab file names the process and the folder, and is written before anything else is.

``lab show`` asks the socket for a listing of a workstation's files (:func:`describe`): the
owners, DACLs and attributes live in the lab process's memory. ``lab down``
(:func:`take_down`) asks the kernel which process listens on the socket (``SO_PEERCRED``;
elsewhere the lab's own answer), so it never signals a process that is not the lab (a PID in
the lab file can be stale and reused, or edited: the lab file may sit in the inventory folder),
then removes the folder, the lab file and its log, whether the lab stopped or had died.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.atomicfile import create_exclusive, write_atomic
from provisioner.errors import LabError, ProvisionerError
from provisioner.inventory.model import Inventory
from provisioner.inventory.names import did_you_mean
from provisioner.lab import ntlmusers
from provisioner.lab.inventory_lab import InventoryLab, start_inventory_lab
from provisioner.lab.ntfs import Ace, FileError, split
from provisioner.lab.scenario import Scenario
from provisioner.lab.server import DEFAULT_BASE_ADDRESS, NoAddressLeft
from provisioner.lab.workstation import Workstation
from provisioner.rollout.connections import LabMap
from provisioner.secrets import vault

PREFIX = "microsip-lab-"
SOCKET_NAME = "control.sock"
REQUEST_LIMIT = 64 * 1024
ANSWER_LIMIT = 64 * 1024 * 1024
SOCKET_PATH_LIMIT = 107 if sys.platform.startswith("linux") else 103
"""The longest socket path: ``sun_path`` holds 108 bytes on Linux, 104 on BSD and macOS."""
_FOLDER_NAME = re.compile(rf"^{re.escape(PREFIX)}[A-Za-z0-9_]{{8}}$")

Json = dict[str, Any]


# --- the private folder ---------------------------------------------------------------------------


def make_folder() -> Path:
    """A new private folder (0700) in the system's temporary folder."""
    return Path(tempfile.mkdtemp(prefix=PREFIX))


def check_folder(text: str) -> Path:
    """The folder a lab file names, if it can be a lab's private folder of this user.

    A lab file may sit where others can write it (the inventory folder), and ``lab down``
    removes the folder it names: only a ``microsip-lab-XXXXXXXX`` folder that is no link, is
    owned by this user and closed to everyone else qualifies. An absent one is returned as it is.
    """
    path = Path(text)
    if not path.is_absolute() or not _FOLDER_NAME.match(path.name):
        raise LabError(f"the lab file names {text!r}, which is not a lab's folder")
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return path
    mine = found.st_uid == os.geteuid()
    if not stat.S_ISDIR(found.st_mode) or not mine or stat.S_IMODE(found.st_mode) & 0o077:
        raise LabError(
            f"the lab file names {path}, which is not a private folder of yours (a folder, "
            "owned by you, mode 0700): it was not written by 'provisioner lab up'"
        )
    return path


def socket_path(folder: Path) -> Path:
    """Where the lab in ``folder`` listens."""
    return folder / SOCKET_NAME


# --- the log of a detached lab --------------------------------------------------------------------


def log_path(lab_file: Path) -> Path:
    """Where a lab started with ``--detach`` writes its output: beside its lab file."""
    return lab_file.with_suffix(".log")


def create_log(lab_file: Path) -> int:
    """A new log for the lab of ``lab_file``, open for reading and writing.

    The lab file may sit in the inventory folder, where its editors can put files (a link
    committed to git): an existing file or link is never written to, over or through.
    """
    log = log_path(lab_file)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(log, flags, 0o600)
    except FileExistsError:
        raise LabError(
            f"{log} exists, and a lab never writes over a file: remove it ('provisioner lab "
            "down' removes a lab's log while its lab file is there)"
        ) from None
    except OSError as failed:
        raise LabError(f"cannot write {log}: {failed.strerror}") from None


def read_log(fd: int) -> str:
    """What the log open as ``fd`` holds (its file position, shared with the lab, stays)."""
    return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")


def remove_log(lab_file: Path, fd: int) -> None:
    """Remove the log of ``lab_file`` if it is the file open as ``fd``, and nothing else."""
    log = log_path(lab_file)
    with contextlib.suppress(OSError, ValueError):
        found, mine = os.lstat(log), os.fstat(fd)
        if stat.S_ISREG(found.st_mode) and (found.st_dev, found.st_ino) == (
            mine.st_dev,
            mine.st_ino,
        ):
            log.unlink()


# --- the server -----------------------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    answer: Callable[[Json], Json]


class _Handler(socketserver.StreamRequestHandler):
    timeout = 10.0

    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _Server)  # noqa: S101 - only _Server uses this handler
        try:
            line = self.rfile.readline(REQUEST_LIMIT + 1)
        except OSError:
            return
        if len(line) > REQUEST_LIMIT or not line.endswith(b"\n"):
            answer: Json = {"ok": False, "error": "the request is not one line of JSON"}
        else:
            try:
                request = json.loads(line)
            except ValueError:
                request = None
            if isinstance(request, dict):
                answer = server.answer(request)
            else:
                answer = {"ok": False, "error": "the request is not a JSON object"}
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(answer).encode("utf-8") + b"\n")


class ControlServer:
    """The lab's control socket: ``hello`` (pid, ready) and ``show`` (:func:`describe`)."""

    def __init__(self, folder: Path) -> None:
        path = socket_path(folder)
        if len(os.fsencode(path)) > SOCKET_PATH_LIMIT:
            raise LabError(
                f"the lab's control socket {path} would be longer than {SOCKET_PATH_LIMIT} "
                "bytes; set TMPDIR to a shorter folder"
            )
        self._lab: InventoryLab | None = None
        self._server = _Server(str(path), _Handler)
        os.chmod(path, 0o600)  # the folder is 0700 already
        self._server.answer = self.answer
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.2,), name="lab-control", daemon=True
        )
        self._thread.start()

    def attach(self, lab: InventoryLab) -> None:
        """Serve ``show`` for ``lab`` from now on."""
        self._lab = lab

    def close(self) -> None:
        """Stop answering; the socket file goes with the folder."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def answer(self, request: Json) -> Json:
        """The answer to one request."""
        op = request.get("op")
        if op == "hello":
            return {"ok": True, "pid": os.getpid(), "ready": self._lab is not None}
        if op != "show":
            return {"ok": False, "error": f"unknown request {str(op)[:40]!r}"}
        lab = self._lab
        if lab is None:
            return {"ok": False, "error": "the lab is still starting"}
        name = request.get("workstation")
        path = request.get("path")
        if not isinstance(name, str) or not (path is None or isinstance(path, str)):
            return {"ok": False, "error": "show needs a workstation name and an optional path"}
        if name not in lab.workstations:
            more = did_you_mean(name, lab.workstations)
            return {"ok": False, "error": f"the lab has no workstation {name[:80]!r}{more}"}
        ws, host = lab.workstations[name], lab.hosts[name]
        try:
            with host.lock:  # the agent changes the machine under this lock
                entries = describe(ws, path)
        except FileError as failed:
            return {"ok": False, "error": failed.message}
        return {"ok": True, "workstation": name, "computer": ws.computer, "entries": entries}


# --- what show lists ------------------------------------------------------------------------------


def describe(ws: Workstation, path: str | None = None) -> list[Json]:
    """Every object at and below ``path`` (default: every drive and share), as a tree in walk
    order, links listed but not followed: kind, owner, explicit DACL, inherited entries,
    read-only, link count and target. Owners and entries name accounts as ``DOMAIN\\name``
    where the SID is known. File contents and sizes are left out."""
    roots = [ws.on_disk(path)] if path else ws.volumes()
    listed: list[Json] = []
    for root in roots:
        base = len(split(root)[1])
        if not ws.exists(root) and not ws.is_reparse_point(root):
            raise FileError("internal", f"'{root}' does not exist.")
        for item in ws.walk(root):
            entry = ws.entry(item)
            listed.append(
                {
                    "path": entry.path,
                    "depth": len(split(entry.path)[1]) - base,
                    "kind": entry.kind,
                    "owner": _account(ws, entry.owner),
                    "acl": None
                    if entry.acl is None
                    else {
                        "protected": entry.acl.protected,
                        "entries": [_ace(ws, ace) for ace in entry.acl.aces],
                    },
                    "inherited": [_ace(ws, ace) for ace in entry.inherited],
                    "read_only": entry.readonly,
                    "links": entry.links,
                    "target": entry.target,
                }
            )
    return listed


def _account(ws: Workstation, sid: str) -> Json:
    return {"sid": sid, "name": ws.account_name(sid)}


def _ace(ws: Workstation, ace: Ace) -> Json:
    return {**_account(ws, ace.sid), "rights": ace.rights, "scope": ace.scope}


# --- the client -----------------------------------------------------------------------------------


def request(folder: Path, payload: Json, *, timeout: float = 30.0) -> Json:
    """Send one request to the lab in ``folder`` and return its answer."""
    path = socket_path(folder)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(payload).encode("utf-8") + b"\n")
            data = _read_all(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        raise LabError(
            f"no lab answers on {path}: it is not running ('provisioner lab down' removes "
            "what it left, 'provisioner lab up' starts one)"
        ) from None
    except OSError as failed:
        raise LabError(f"the lab's control socket {path}: {failed}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise LabError(f"the lab's control socket {path} gave no answer")
    return answer


def _read_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > ANSWER_LIMIT:
            raise LabError("the lab's answer is larger than 64 MiB; ask for a path")
        chunks.append(chunk)


def listener_pid(folder: Path) -> int | None:
    """The process listening on the lab's control socket in ``folder`` (None: nobody listens).

    On Linux the kernel says (``SO_PEERCRED``: the process that called ``listen``), which works
    even while the lab is too busy to answer; elsewhere the lab's own ``hello`` answers.
    """
    path = socket_path(folder)
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:  # pragma: no cover - Linux has it
        try:
            answer = request(folder, {"op": "hello"}, timeout=5.0)
        except ProvisionerError:
            return None
        pid = answer.get("pid")
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(path))
            raw = sock.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
    except OSError as failed:
        if failed.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
            return None
        raise LabError(f"the lab's control socket {path}: {failed}") from None
    pid, uid, _ = struct.unpack("3i", raw)
    return pid if uid == os.geteuid() else None


# --- lab up ---------------------------------------------------------------------------------------


def lab_file_exists(lab_file: Path) -> LabError:
    """Why ``lab up`` does not start while ``lab_file`` is there."""
    return LabError(
        f"{lab_file} exists: a lab is running, or died without cleaning up; "
        "'provisioner lab down' stops it and removes what it left"
    )


class LabProcess:
    """This process as ``provisioner lab up``: the lab file claimed first (naming this process
    and a new private folder), then the control socket, the lab, and the final lab file.
    Closing stops the lab and removes the folder and the lab file."""

    def __init__(self, lab_file: Path) -> None:
        self.lab_file = lab_file
        self.folder = make_folder()
        self._claimed = False
        self._server: ControlServer | None = None
        self.lab: InventoryLab | None = None
        try:
            self._server = ControlServer(self.folder)
            starting = LabMap("", {}, os.getpid(), str(self.folder), starting=True)
            try:
                create_exclusive(lab_file, starting.dump().encode("utf-8"), mode=0o600)
            except FileExistsError:
                raise lab_file_exists(lab_file) from None
            except OSError as failed:
                raise LabError(f"cannot write {lab_file}: {failed.strerror}") from None
            self._claimed = True
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LabProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        inventory: Inventory,
        opener: vault.Opener,
        *,
        port: int | None = None,
        base_address: str = DEFAULT_BASE_ADDRESS,
        scenario: Scenario | None = None,
    ) -> InventoryLab:
        """Start the emulated workstations, on ``base_address`` and the addresses after it;
        ``show`` answers for them from now on."""
        ntlmusers.use_folder(self.folder)
        try:
            self.lab = start_inventory_lab(
                inventory,
                opener,
                folder=self.folder,
                port=port,
                base_address=base_address,
                scenario=scenario,
            )
        except NoAddressLeft as failed:
            raise LabError(
                f"the lab cannot start: {failed}; choose a lower --base-address"
            ) from None
        except OSError as failed:
            if failed.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                # Another lab, or a real WinRM listener on this machine.
                raise LabError(
                    f"the lab cannot start: {failed.strerror}; is another lab running "
                    "('provisioner lab down')? Or start it elsewhere: --base-address, --port "
                    "(0: a free port for each workstation)"
                ) from None
            # Its text would name the lab's private folder.
            raise LabError(
                f"the lab cannot start: {failed.strerror or type(failed).__name__}"
            ) from None
        finally:
            ntlmusers.use_folder(None)
        assert self._server is not None  # noqa: S101 - __init__ started it
        self._server.attach(self.lab)
        return self.lab

    def publish(self) -> None:
        """Replace the starting lab file with the endpoints: the lab is ready."""
        assert self.lab is not None  # noqa: S101 - start() first
        data = self.lab.lab_map(pid=os.getpid(), folder=str(self.folder)).dump()
        write_atomic(self.lab_file, data.encode("utf-8"), mode=0o600)

    def close(self) -> None:
        """Stop everything and remove what this process wrote."""
        try:
            if self.lab is not None:
                self.lab.stop()
        finally:
            if self._server is not None:
                self._server.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            if self._claimed:
                self.lab_file.unlink(missing_ok=True)
                # A detached lab writes its log on its standard output: that goes too.
                with contextlib.suppress(OSError, ValueError):
                    remove_log(self.lab_file, sys.stdout.fileno())
            self._claimed = False


# --- lab down -------------------------------------------------------------------------------------


@dataclass
class Teardown:
    """What :func:`take_down` did."""

    pid: int
    killed: bool = False
    """It did not stop after SIGTERM and was killed."""
    was_running: bool = False
    not_the_lab: str = ""
    """Why the process the lab file names was not signalled."""
    removed: list[str] = field(default_factory=list)
    """What the lab left behind: its folder and its lab file."""
    log: str = ""
    """The log of a detached lab, when it was left too."""


def take_down(lab_file: Path, *, grace: float = 20.0) -> Teardown:
    """Stop the lab ``lab_file`` names and remove everything it wrote, whatever state it is in.

    The process is signalled only when it is the one listening on the lab's control socket;
    it gets ``grace`` seconds to stop and clean up after SIGTERM, then SIGKILL. The folder,
    the lab file and its log are then removed if they remain.
    """
    lab = LabMap.load(lab_file, starting_ok=True)
    folder = check_folder(lab.folder) if lab.folder else None
    done = Teardown(lab.pid)
    listener = listener_pid(folder) if folder is not None else None
    if listener is None:
        if alive(lab.pid) and folder is None:
            done.not_the_lab = (
                f"{lab_file} names no lab folder (an older version wrote it): process "
                f"{lab.pid} was not signalled; stop it yourself if it is a lab"
            )
        elif alive(lab.pid):
            done.not_the_lab = (
                f"process {lab.pid} is not the lab (nothing listens on the lab's control "
                "socket): not signalled"
            )
    elif listener != lab.pid:
        raise LabError(
            f"{lab_file} names process {lab.pid}, but the lab in {folder} is process "
            f"{listener}: nothing was signalled or removed; check the lab file"
        )
    else:
        assert folder is not None  # noqa: S101 - a listener was found in it
        done.was_running = True
        _signal(lab.pid, signal.SIGTERM)
        if not _wait_gone(lab.pid, grace) and listener_pid(folder) == lab.pid:
            done.killed = _signal(lab.pid, signal.SIGKILL)
            _wait_gone(lab.pid, 5.0)
        if alive(lab.pid):
            raise LabError(f"lab process {lab.pid} did not stop; nothing was removed")
    if folder is not None and os.path.lexists(folder):
        shutil.rmtree(folder)
        done.removed.append(str(folder))
    with contextlib.suppress(FileNotFoundError):
        lab_file.unlink()
        done.removed.append(str(lab_file))
    with contextlib.suppress(FileNotFoundError):
        log_path(lab_file).unlink()
        done.log = str(log_path(lab_file))
    return done


def _signal(pid: int, number: signal.Signals) -> bool:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def alive(pid: int) -> bool:
    """True while process ``pid`` runs (an exited process nobody reaped yet counts as gone)."""
    if pid <= 0:  # 0 and negative numbers name process groups, never one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # Linux: a zombie ("Z") has exited and released its ports.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"
