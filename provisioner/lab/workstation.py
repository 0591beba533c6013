"""An emulated Windows workstation backed by a real folder: accounts, MicroSIP, files, faults.

Drive ``X:`` is the folder ``<root>/X/``. Paths are Windows paths (``C:\\Users\\alice``) and
resolve case-insensitively against what exists, as on NTFS; missing components keep the case
they were given. Every write is real: the agent (``provisioner.lab.agent``) writes a temp file
in the target folder and moves or replaces it with ``os.replace``, so a managed file is at every
moment either its old or its new content, byte for byte. Nothing is fsynced (see
:meth:`Workstation.write_new`), and nothing under a drive's folder is cached: the disk is looked
at on every call, so a change made behind the workstation's back is seen at once.

What the agent may learn about the machine goes through the same few facts a PowerShell script
can query: accounts (``NTAccount.Translate``), ``ProfileList``, the user's shell folders, the
default value of ``HKLM\\Software\\MicroSIP``, the MSI products, the processes and the files.

Typical use::

    ws = Workstation(tmp_path / "ws1", computer="BER-WS-001")
    alice = ws.add_user("ACME\\alice")
    ws.add_user("ACME\\bob", logged_on=False)          # account, but no profile
    ws.install_microsip("installed")                    # registry value set, exe created
    ws.start_microsip(alice)
    ws.faults.locked.add(ws.ini_path(alice))
    host.state = ws                                     # a Lab host running LabAgent
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Mode = Literal["installed", "portable"]
Rights = Literal["FullControl", "ReadAndExecute"]

SYSTEM = "S-1-5-18"
ADMINISTRATORS = "S-1-5-32-544"
USERS = "S-1-5-32-545"
DOMAIN_SID = "S-1-5-21-1000-2000-3000"
"""The domain's SID prefix; domain accounts get ``<prefix>-<rid>``."""
MACHINE_SID = "S-1-5-21-4000-5000-6000"
"""This machine's SID prefix; local accounts get ``<prefix>-<rid>``."""

SYSTEM_VARIABLES = {
    "SystemDrive": "C:",
    "SystemRoot": "C:\\Windows",
    "windir": "C:\\Windows",
    "ProgramData": "C:\\ProgramData",
    "ALLUSERSPROFILE": "C:\\ProgramData",
    "PUBLIC": "C:\\Users\\Public",
}
"""Machine-wide environment variables a shell folder value may use."""

_DRIVE = re.compile(r"^([A-Za-z]):(?:[\\/](.*))?$")
_BAD_NAME = re.compile(r'[<>:"|?*\x00-\x1f]')
_SEPARATOR = re.compile(r"[\\/]")
_EXE_IMAGE = b"MZ\x90\x00lab MicroSIP stand-in\r\n"


# --- ACLs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ace:
    """One allow entry: ``sid`` gets ``rights``."""

    sid: str
    rights: Rights


@dataclass(frozen=True)
class Acl:
    """The explicit ACL of a file or folder (what ``Set-Acl`` left)."""

    aces: tuple[Ace, ...]
    inherit: bool = False

    def rights(self) -> dict[str, Rights]:
        """SID to rights, for assertions."""
        return {ace.sid: ace.rights for ace in self.aces}


def user_file_acl(sid: str) -> Acl:
    """``microsip.ini``: full control for the user, SYSTEM and Administrators; no inheritance."""
    return Acl(
        (Ace(sid, "FullControl"), Ace(SYSTEM, "FullControl"), Ace(ADMINISTRATORS, "FullControl"))
    )


OVERRIDE_ACL = Acl(
    (Ace(SYSTEM, "FullControl"), Ace(ADMINISTRATORS, "FullControl"), Ace(USERS, "ReadAndExecute"))
)
"""``override.ini``: full control for SYSTEM and Administrators, read (and execute) for Users."""


# --- errors -----------------------------------------------------------------------------------


class FileError(Exception):
    """A file operation failed; ``code`` is the agent protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Crashed(Exception):
    """The agent process died (``crash_after_temp``); nothing after this point runs."""


# --- accounts, install facts, processes -------------------------------------------------------


@dataclass(frozen=True)
class User:
    """A Windows account known to the workstation.

    ``profile`` is ``ProfileList\\<SID>\\ProfileImagePath`` (None: never logged on here).
    ``shell_appdata`` is the raw ``User Shell Folders\\AppData`` value of the user's hive, used
    only while ``hive_loaded``; otherwise the agent falls back to ``<profile>\\AppData\\Roaming``.
    """

    domain: str
    sam: str
    sid: str
    profile: str | None
    shell_appdata: str | None = None
    hive_loaded: bool = False

    @property
    def windows(self) -> str:
        """``DOMAIN\\sam``."""
        return f"{self.domain}\\{self.sam}"

    @property
    def appdata(self) -> str | None:
        """The roaming AppData folder the agent resolves (None without a profile).

        With the hive loaded, the raw shell folder value is expanded with the *user's*
        variables; one that stays unexpanded (``%FOO%``) is left in place.
        """
        if self.profile is None:
            return None
        if not (self.hive_loaded and self.shell_appdata):
            return f"{self.profile}\\AppData\\Roaming"
        variables = {
            "USERPROFILE": self.profile,
            "USERDOMAIN": self.domain,
            "USERNAME": self.sam,
            **SYSTEM_VARIABLES,
        }
        return re.sub(
            r"%([^%\\]+)%",
            lambda m: next(
                (v for k, v in variables.items() if k.casefold() == m.group(1).casefold()),
                m.group(0),
            ),
            self.shell_appdata,
        )


@dataclass(frozen=True)
class Install:
    """How MicroSIP was put on the machine (the truth a fleet description starts from)."""

    mode: Mode
    install_dir: str
    exe: str

    @property
    def exe_path(self) -> str:
        """``<install_dir>\\<exe>``."""
        return f"{self.install_dir}\\{self.exe}"

    @property
    def ini_name(self) -> str:
        """``<exe base name>.ini``."""
        return ini_name(self.exe)


@dataclass(frozen=True)
class MsiProduct:
    """An installed MSI product (``Win32_Product``-like: name and InstallLocation)."""

    name: str
    install_location: str


@dataclass
class Process:
    """A running process: image name and owner SID."""

    pid: int
    name: str
    sid: str
    running: bool = True


# --- faults -----------------------------------------------------------------------------------


@dataclass
class WorkstationFaults:
    """What goes wrong on the file system; change it between commands.

    * ``disk_full``: every file write fails (``disk-full``) after writing half of its bytes;
    * ``locked``: paths held open by another process with read sharing: they can be read but
      not written, replaced, renamed or deleted (``locked``);
    * ``read_only``: paths (and everything under them) that deny writing (``read-only``);
    * ``fail_verify``: how many of the next managed-file temp writes get corrupted bytes;
    * ``crash_after_temp``: the agent dies right after the Nth next managed-file temp write,
      before it replaces anything (0: off; 1: the next one).
    """

    disk_full: bool = False
    locked: set[str] = field(default_factory=set)
    read_only: set[str] = field(default_factory=set)
    fail_verify: int = 0
    crash_after_temp: int = 0


def corrupt(data: bytes) -> bytes:
    """The bytes a ``fail_verify`` write lands on disk instead of ``data``."""
    return data[:-1] + bytes([data[-1] ^ 0xFF]) if data else b"\x00"


# --- paths ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _split(path: str) -> tuple[str, tuple[str, ...]]:
    # A pure function of the text, asked for the same few paths dozens of times per command.
    match = _DRIVE.match(path)
    if match is None:
        raise FileError("internal", f"'{path}' is not an absolute local path.")
    parts = tuple(part for part in _SEPARATOR.split(match.group(2) or "") if part)
    for part in parts:
        if part in (".", "..") or _BAD_NAME.search(part):
            raise FileError("internal", f"'{path}' contains an invalid path component.")
    return match.group(1).upper(), parts


@functools.lru_cache(maxsize=4096)
def path_key(path: str) -> str:
    """A canonical, case-folded form of a Windows path (for ACLs and fault sets)."""
    drive, parts = _split(path)
    return f"{drive}:\\" + "\\".join(part.casefold() for part in parts)


def parent(path: str) -> str:
    """The folder of ``path``."""
    drive, parts = _split(path)
    return f"{drive}:\\" + "\\".join(parts[:-1])


def leaf(path: str) -> str:
    """The last component of ``path``."""
    return _split(path)[1][-1]


def join(folder: str, *names: str) -> str:
    """``folder\\name\\...`` without doubled separators."""
    return "\\".join([folder.rstrip("\\/"), *names])


def ini_name(exe: str) -> str:
    """MicroSIP's ini name: the exe base name without its extension, plus ``.ini``."""
    base, dot, _ = exe.rpartition(".")
    return f"{base if dot else exe}.ini"


def _same_image(process: str, wanted: str) -> bool:
    def stem(name: str) -> str:
        name = name.casefold()
        return name[:-4] if name.endswith(".exe") else name

    return stem(process) == stem(wanted)


# --- the workstation --------------------------------------------------------------------------


class Workstation:
    """One emulated Windows machine on a real folder; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        computer: str = "WS-001",
        domain: str = "ACME",
        ps_version: str = "5.1.19041.4648",
        free_bytes: int = 51_234_567_890,
    ) -> None:
        self.root = root
        self.computer = computer.upper()
        self.domain = domain.upper()
        self.ps_version = ps_version
        self.free_bytes = free_bytes
        self.users: list[User] = []
        self.install: Install | None = None
        self.hklm_microsip: str | None = None
        """Default value of ``HKLM\\Software\\MicroSIP`` (None: absent)."""
        self.msi_products: list[MsiProduct] = []
        self.processes: list[Process] = []
        self.stopped: list[Process] = []
        """Processes the agent stopped, in order."""
        self.faults = WorkstationFaults()
        self._acls: dict[str, Acl] = {}
        self._observers: list[Callable[[str], None]] = []
        self._next_rid = {"domain": 1104, "local": 1001}
        self._next_pid = 4100
        (root / "C").mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Workstation({self.computer} at {self.root})"

    # --- set-up ---------------------------------------------------------------------------

    def add_user(
        self,
        windows: str,
        *,
        rid: int | None = None,
        logged_on: bool = True,
        profile: str | None = None,
        shell_appdata: str | None = None,
        hive_loaded: bool = False,
    ) -> User:
        """Create an account (``ACME\\alice`` or ``.\\kiosk``) and, if ``logged_on``, its profile.

        The profile defaults to ``C:\\Users\\<sam>``; the profile folder and its roaming AppData
        are created (with inherited ACLs) when the user has logged on.
        """
        domain, sep, sam = windows.rpartition("\\")
        if not sep or not sam or not domain:
            raise ValueError(f"{windows!r}: use DOMAIN\\name or .\\name")
        local = domain == "." or domain.upper() == self.computer
        domain = self.computer if local else domain.upper()
        if self.lookup_account(f"{domain}\\{sam}") is not None:
            raise ValueError(f"{windows!r} exists already")
        kind = "local" if local else "domain"
        if rid is None:
            rid = self._next_rid[kind]
            self._next_rid[kind] += 1
        sid = f"{MACHINE_SID if local else DOMAIN_SID}-{rid}"
        if any(user.sid == sid for user in self.users):
            raise ValueError(f"SID {sid} is taken")
        home = (profile or f"C:\\Users\\{sam}") if logged_on else None
        user = User(domain, sam, sid, home, shell_appdata, hive_loaded)
        self.users.append(user)
        if user.profile is not None:
            self.host_path(user.profile).mkdir(parents=True, exist_ok=True)
            # an unexpandable shell folder (the agent reports it) has no folder to create
            with contextlib.suppress(FileError):
                self.host_path(user.appdata or "").mkdir(parents=True, exist_ok=True)
        return user

    def install_microsip(
        self,
        mode: Mode = "installed",
        *,
        install_dir: str = "C:\\Program Files\\MicroSIP",
        exe: str = "microsip.exe",
        registry: bool | None = None,
        msi: bool = False,
    ) -> Install:
        """Put the exe in ``install_dir``; the HKLM default value defaults to installed mode."""
        install = Install(mode, install_dir.rstrip("\\/"), exe)
        folder = self.host_path(install.install_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.host_path(install.exe_path).write_bytes(_EXE_IMAGE)
        self.install = install
        if registry if registry is not None else mode == "installed":
            self.hklm_microsip = install.install_dir
        if msi:
            self.msi_products.append(MsiProduct("MicroSIP", install.install_dir))
        return install

    def uninstall_microsip(self) -> None:
        """Remove the install folder, the registry value and the MSI product."""
        if self.install is not None:
            shutil.rmtree(self.host_path(self.install.install_dir), ignore_errors=True)
        self.install = None
        self.hklm_microsip = None
        self.msi_products = [p for p in self.msi_products if p.name.casefold() != "microsip"]

    def start_microsip(self, user: User | str, name: str | None = None) -> Process:
        """Start a MicroSIP process owned by ``user`` (a User or a SID)."""
        sid = user.sid if isinstance(user, User) else user
        image = name or (self.install.exe if self.install else "microsip.exe")
        process = Process(self._next_pid, image, sid)
        self._next_pid += 4
        self.processes.append(process)
        return process

    @property
    def running_sids(self) -> set[str]:
        """SIDs that own a running MicroSIP-like process (any image name)."""
        return {p.sid for p in self.processes if p.running}

    def ini_path(self, user: User) -> str:
        """Where this user's MicroSIP reads its ini, given the install facts."""
        if self.install is None:
            raise ValueError("MicroSIP is not installed")
        if self.install.mode == "portable":
            return join(self.install.install_dir, self.install.ini_name)
        if user.appdata is None:
            raise ValueError(f"{user.windows} has no profile")
        return join(user.appdata, "MicroSIP", self.install.ini_name)

    def override_path(self) -> str:
        """``<install dir>\\override.ini``."""
        if self.install is None:
            raise ValueError("MicroSIP is not installed")
        return join(self.install.install_dir, "override.ini")

    @staticmethod
    def state_path(path: str, item: str) -> str:
        """``<folder>\\.provisioner\\<name>\\<item>`` for the managed file ``path``."""
        return join(parent(path), ".provisioner", leaf(path), item)

    def observe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(event)`` after every change the agent makes on disk."""
        self._observers.append(callback)

    # --- queries the agent makes ----------------------------------------------------------

    def lookup_account(self, name: str) -> User | None:
        """``NTAccount.Translate``: ``DOMAIN\\sam``, ``.\\sam`` or a bare ``sam``."""
        domain, sep, sam = name.rpartition("\\")
        if domain == ".":
            domain = self.computer
        candidates = [u for u in self.users if u.sam.casefold() == sam.casefold()]
        if sep:
            candidates = [u for u in candidates if u.domain.casefold() == domain.casefold()]
        # like LookupAccountName: local accounts before the domain's
        candidates.sort(key=lambda u: u.domain != self.computer)
        return candidates[0] if candidates else None

    def profile_of(self, sid: str) -> User | None:
        """The user whose ``ProfileList`` entry exists for ``sid``."""
        for user in self.users:
            if user.sid == sid and user.profile is not None:
                return user
        return None

    def processes_of(self, sid: str, image: str) -> list[Process]:
        """Running processes named like ``image`` (with or without ``.exe``) owned by ``sid``."""
        return [
            p for p in self.processes if p.running and p.sid == sid and _same_image(p.name, image)
        ]

    def stop(self, processes: Iterable[Process]) -> int:
        """``Stop-Process``: stop them, record them in ``stopped``; returns how many."""
        count = 0
        for process in processes:
            if process.running:
                process.running = False
                self.stopped.append(process)
                count += 1
        return count

    # --- the file system ------------------------------------------------------------------

    def host_path(self, path: str) -> Path:
        """The real path of a Windows path, matching existing names case-insensitively."""
        return Path(self._resolve(path)[0])

    def exists(self, path: str) -> bool:
        """True if the file or folder exists."""
        return self._resolve(path)[1] is not None

    def is_dir(self, path: str) -> bool:
        """True if ``path`` is a folder."""
        return _is_dir(self._resolve(path)[1])

    def is_file(self, path: str) -> bool:
        """True if ``path`` is a file."""
        return _is_file(self._resolve(path)[1])

    def read(self, path: str) -> bytes | None:
        """The file's bytes, None if absent; a folder is an ``internal`` error."""
        real, found = self._resolve(path)
        if _is_dir(found):
            raise FileError("internal", f"'{path}' is a folder, not a file.")
        try:
            with open(real, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as failed:
            raise FileError("internal", f"Cannot read '{path}': {failed.strerror}.") from None

    def sha256(self, path: str) -> str | None:
        """Lower-case hex SHA-256 of the file's bytes, None if absent."""
        data = self.read(path)
        return None if data is None else hashlib.sha256(data).hexdigest()

    def acl(self, path: str) -> Acl | None:
        """The explicit ACL recorded for ``path`` (None: inherited, never set)."""
        return self._acls.get(path_key(path))

    def listdir(self, path: str) -> list[str]:
        """Names in a folder (empty if it does not exist)."""
        real, found = self._resolve(path)
        return sorted(os.listdir(real)) if _is_dir(found) else []

    def list_files(self, path: str) -> list[str]:
        """Names of the files (not folders) in a folder, sorted (empty if it does not exist)."""
        real, found = self._resolve(path)
        if not _is_dir(found):
            return []
        with os.scandir(real) as entries:
            return sorted(entry.name for entry in entries if entry.is_file())

    def put(self, path: str, data: bytes, acl: Acl | None = None) -> None:
        """Test set-up: write a file directly (no faults, no events), creating folders."""
        real = self.host_path(path)
        real.parent.mkdir(parents=True, exist_ok=True)
        real.write_bytes(data)
        if acl is not None:
            self._acls[path_key(path)] = acl

    # --- the file system, as the agent changes it -----------------------------------------

    def make_dir(self, path: str, acl: Acl) -> bool:
        """Create ``path`` and missing parents, each new folder with ``acl``; True if created."""
        drive, parts = _split(path)
        base = self._drive_root(drive)
        if _is_dir(_stat("/".join((base, *parts)))):
            return False  # every parent exists too
        created = False
        current, current_is_dir = base, _is_dir(_stat(base))
        for depth, name in enumerate(parts, start=1):
            real, found = self._child(current, current_is_dir, name)
            current, current_is_dir = real, True
            if _is_dir(found):
                continue
            folder = f"{drive}:\\" + "\\".join(parts[:depth])
            if found is not None:
                raise FileError("internal", f"'{folder}' exists and is not a folder.")
            self._check_writable(folder)
            os.mkdir(real)
            self._acls[path_key(folder)] = acl
            created = True
            self._notify(f"mkdir {folder}")
        return created

    def write_new(self, path: str, data: bytes, acl: Acl, *, managed: bool = False) -> None:
        """Create ``path`` (must not exist), write ``data``, set ``acl``.

        ``managed`` marks the temp file of a managed file: ``fail_verify`` and
        ``crash_after_temp`` apply to those writes only.

        The agent flushes its temp file to disk (``Flush($true)``) before it replaces anything,
        for power-loss durability on the real machine. The lab does not fsync: nothing in it can
        observe durability (there is no power loss to emulate, and the folder is thrown away),
        while atomicity, which the tests do observe through the protocol and on the emulated disk,
        comes from the write-then-``os.replace`` order alone. An fsync cost about 0.15 ms of CPU
        and 1.4 ms of waiting per write (ext4), four writes per first push, under the host's lock.
        """
        self._check_writable(path)
        real, _ = self._resolve(path)
        if managed and self.faults.fail_verify > 0:
            self.faults.fail_verify -= 1
            data = corrupt(data)
        full = self.faults.disk_full or len(data) > self.free_bytes
        try:
            fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise FileError("internal", f"'{path}' exists already.") from None
        except FileNotFoundError:
            raise FileError("internal", f"The folder of '{path}' does not exist.") from None
        self._acls[path_key(path)] = acl
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data[: len(data) // 2] if full else data)
        except OSError as failed:
            if failed.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise FileError("internal", f"Cannot write '{path}': {failed.strerror}.") from None
            full = True
        self._notify(f"write {path}")
        if full:
            raise FileError(
                "disk-full", f"There is not enough space on the disk to write '{path}'."
            )
        if managed and self.faults.crash_after_temp > 0:
            self.faults.crash_after_temp -= 1
            if self.faults.crash_after_temp == 0:
                raise Crashed(f"the agent died after writing '{path}'")

    def replace(self, source: str, target: str, backup: str | None) -> None:
        """``[IO.File]::Replace``: ``source`` becomes ``target``; the old ``target`` goes to
        ``backup`` (overwritten) or away. ``target`` is never missing in between."""
        real_source, source_found = self._resolve(source)
        real_target, target_found = self._resolve(target)
        if not _is_file(source_found) or not _is_file(target_found):
            raise FileError("internal", f"Cannot replace '{target}': a file is missing.")
        for path in (source, target, *([backup] if backup else [])):
            self._check_unlocked(path)
            self._check_writable(path)
        if backup is not None:
            real_backup, backup_found = self._resolve(backup)
            if _is_dir(backup_found):
                raise FileError("internal", f"'{backup}' is a folder.")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(real_backup)
            try:
                os.link(real_target, real_backup)
            except OSError:  # file systems without hard links: a copy is as good here
                shutil.copyfile(real_target, real_backup)
            self._move_acl(target, backup)
            self._notify(f"backup {target} -> {backup}")
        os.replace(real_source, real_target)
        self._move_acl(source, target)
        self._notify(f"replace {source} -> {target}")

    def move(self, source: str, target: str, *, overwrite: bool = False) -> None:
        """``[IO.File]::Move`` (``overwrite``: delete the target first, as ``Move-Item -Force``)."""
        real_source, source_found = self._resolve(source)
        real_target, target_found = self._resolve(target)
        if not _is_file(source_found):
            raise FileError("internal", f"Cannot move '{source}': it does not exist.")
        for path in (source, target):
            self._check_unlocked(path)
            self._check_writable(path)
        if target_found is not None and not overwrite:
            raise FileError("internal", f"Cannot move to '{target}': it exists.")
        if _is_dir(target_found):
            raise FileError("internal", f"'{target}' is a folder.")
        os.replace(real_source, real_target)
        self._move_acl(source, target)
        self._notify(f"move {source} -> {target}")

    def delete(self, path: str) -> bool:
        """Delete a file; False if it did not exist."""
        real, found = self._resolve(path)
        if not _is_file(found):
            return False
        self._check_unlocked(path)
        self._check_writable(path)
        os.unlink(real)
        self._acls.pop(path_key(path), None)
        self._notify(f"delete {path}")
        return True

    def set_acl(self, path: str, acl: Acl) -> None:
        """``Set-Acl`` on an existing file or folder."""
        if not self.exists(path):
            raise FileError("internal", f"Cannot set the ACL of '{path}': it does not exist.")
        self._check_writable(path)
        self._acls[path_key(path)] = acl

    # --- internals ------------------------------------------------------------------------

    def _drive_root(self, drive: str) -> str:
        # A drive's folder under ``root``. Everything below it is looked up on disk every
        # time, since tests (and the agent) change the disk between and during commands.
        return os.path.join(self.root, drive)

    def _resolve(self, path: str) -> tuple[str, os.stat_result | None]:
        """The real path of a Windows path and its ``stat`` (None: it does not exist).

        As on NTFS, each component matches an existing name case-insensitively; a missing
        component keeps the case it was given. An exact match (one ``stat`` of the whole path,
        the usual case) is taken as it is.
        """
        drive, parts = _split(path)
        return self._walk(self._drive_root(drive), parts)

    def _walk(self, base: str, parts: tuple[str, ...]) -> tuple[str, os.stat_result | None]:
        # "/".join is os.path.join here: no part is empty or contains a separator
        exact = "/".join((base, *parts))
        found = _stat(exact)
        if found is not None or not parts:
            return exact, found
        folder, folder_found = self._walk(base, parts[:-1])
        return self._child(folder, _is_dir(folder_found), parts[-1], missing=exact)

    @staticmethod
    def _child(
        folder: str, folder_is_dir: bool, name: str, *, missing: str = ""
    ) -> tuple[str, os.stat_result | None]:
        """``name`` in the real ``folder``: as given if it exists, else any case of it."""
        candidate = f"{folder}/{name}"
        if not folder_is_dir:
            return candidate, None
        if candidate != missing:
            found = _stat(candidate)
            if found is not None:
                return candidate, found
        wanted = name.casefold()
        for entry in os.listdir(folder):
            if entry.casefold() == wanted:
                real = f"{folder}/{entry}"
                return real, _stat(real)
        return candidate, None

    def _check_writable(self, path: str) -> None:
        if not self.faults.read_only:
            return
        key = path_key(path)
        for denied in self.faults.read_only:
            other = path_key(denied)
            if key == other or key.startswith(other.rstrip("\\") + "\\"):
                raise FileError("read-only", f"Access to the path '{path}' is denied.")

    def _check_unlocked(self, path: str) -> None:
        if not self.faults.locked:
            return
        key = path_key(path)
        if any(path_key(locked) == key for locked in self.faults.locked):
            raise FileError(
                "locked",
                f"The process cannot access the file '{path}' because it is being used by "
                "another process.",
            )

    def _move_acl(self, source: str, target: str) -> None:
        acl = self._acls.pop(path_key(source), None)
        if acl is None:
            self._acls.pop(path_key(target), None)
        else:
            self._acls[path_key(target)] = acl

    def _notify(self, event: str) -> None:
        for callback in self._observers:
            callback(event)


# pathlib's ``exists()`` treats these as "does not exist" and raises on any other error.
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def _stat(real: str) -> os.stat_result | None:
    """``os.stat``, None where ``Path.exists()`` would say False."""
    try:
        return os.stat(real)
    except OSError as failed:
        if failed.errno in _MISSING:
            return None
        raise
    except ValueError:  # a name the file system cannot encode
        return None


def _is_dir(found: os.stat_result | None) -> bool:
    return found is not None and stat.S_ISDIR(found.st_mode)


def _is_file(found: os.stat_result | None) -> bool:
    return found is not None and stat.S_ISREG(found.st_mode)
