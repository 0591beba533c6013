"""An emulated NTFS on a real folder: Windows paths, owners, DACLs, attributes, links, faults.

Drive ``X:`` is the folder ``<root>/X/``; a share ``\\\\server\\share`` is
``<root>/UNC/<server>/<share>/``. Paths are Windows paths and resolve case-insensitively against
what exists, as on NTFS; missing components keep the case they were given; trailing dots and
spaces of a component are dropped, as Win32 does. Every write is real, and nothing under a
volume's folder is cached, so a change made behind the lab's back is seen at once.

What Windows keeps per file object (not per name) is kept per object here too, keyed by the
real file's device and inode: its owner, its explicit DACL (with the protected flag) and its
read-only attribute. A rename keeps them, a hard link shares them, and anything done *through*
a junction or symbolic link acts on the target, as on Windows:

* junctions and symbolic links are real symbolic links to a path inside the root
  (:meth:`FileSystem.make_link`); hard links are real hard links;
* an object's effective access is its explicit entries plus, unless its DACL is protected, the
  inheritable entries of its parent (``CREATOR OWNER`` becomes the owner), evaluated on the real
  parent chain of the target: :meth:`FileSystem.allows`;
* :meth:`FileSystem.replace` is ``ReplaceFile``: the result keeps the replaced file's DACL, the
  replaced file goes to the backup name with its own, and the injected errors 1175, 1176 and
  1177 leave exactly the partial states Microsoft documents for a call with a backup name.

The administrator the agent runs as is never denied by a DACL here; ``faults.read_only`` injects
"access denied" where a test needs it.
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

Rights = Literal["FullControl", "Modify", "ReadAndExecute", "Write"]
Scope = Literal["object", "all", "children", "folders"]
"""Where an entry applies: this object only; this object and everything below; only below
(inherit-only); this folder and the folders below."""
Access = Literal["read", "write", "delete", "create", "change_acl"]
LinkKind = Literal["junction", "symlink", "hardlink"]

SYSTEM = "S-1-5-18"
ADMINISTRATORS = "S-1-5-32-544"
USERS = "S-1-5-32-545"
EVERYONE = "S-1-1-0"
AUTHENTICATED_USERS = "S-1-5-11"
CREATOR_OWNER = "S-1-3-0"

RIGHTS: dict[str, frozenset[str]] = {
    "FullControl": frozenset({"read", "write", "delete", "create", "change_acl"}),
    "Modify": frozenset({"read", "write", "delete", "create"}),
    "ReadAndExecute": frozenset({"read"}),
    "Write": frozenset({"write", "create"}),
}

ERROR_ACCESS_DENIED = 5
ERROR_SHARING_VIOLATION = 32
ERROR_LOCK_VIOLATION = 33
ERROR_UNABLE_TO_REMOVE_REPLACED = 1175
ERROR_UNABLE_TO_MOVE_REPLACEMENT = 1176
ERROR_UNABLE_TO_MOVE_REPLACEMENT_2 = 1177
WIN32_MESSAGES = {
    ERROR_ACCESS_DENIED: "Access to the path '{path}' is denied.",
    ERROR_SHARING_VIOLATION: (
        "The process cannot access the file '{path}' because it is being used by another process."
    ),
    ERROR_LOCK_VIOLATION: (
        "The process cannot access the file '{path}' because another process has locked a "
        "portion of the file."
    ),
    ERROR_UNABLE_TO_REMOVE_REPLACED: "Unable to remove the file to be replaced.",
    ERROR_UNABLE_TO_MOVE_REPLACEMENT: (
        "Unable to move the replacement file to the file to be replaced. The file to be "
        "replaced has retained its original name."
    ),
    ERROR_UNABLE_TO_MOVE_REPLACEMENT_2: (
        "Unable to move the replacement file to the file to be replaced. The file to be "
        "replaced has been renamed using the backup name."
    ),
}
""".NET's messages for the Win32 errors the lab injects (``IOException.Message``)."""

_DRIVE = re.compile(r"^([A-Za-z]):(?:[\\/](.*))?$")
_UNC = re.compile(r"^[\\/]{2}([^\\/?.][^\\/]*)[\\/]([^\\/]+)(?:[\\/](.*))?$")
_BAD_NAME = re.compile(r'[<>:"|?*\x00-\x1f]')
_SEPARATOR = re.compile(r"[\\/]")


# --- DACLs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ace:
    """One allow entry: ``sid`` gets ``rights`` where ``scope`` says."""

    sid: str
    rights: Rights
    scope: Scope = "object"

    def applies_to(self, is_dir: bool) -> bool:
        """True when this entry grants access to the object that holds it."""
        if self.sid == CREATOR_OWNER:
            return False
        return self.scope in ("object", "all") or (self.scope == "folders" and is_dir)


@dataclass(frozen=True)
class Acl:
    """An explicit DACL; ``protected``: inheritance from the parent is cut."""

    aces: tuple[Ace, ...]
    protected: bool = True

    def rights(self) -> dict[str, Rights]:
        """SID to rights, for assertions."""
        return {ace.sid: ace.rights for ace in self.aces}


def protected_acl(rights: dict[str, Rights], *, folder: bool = False) -> Acl:
    """A protected DACL granting ``rights``; a folder's entries are inherited by its contents."""
    scope: Scope = "all" if folder else "object"
    return Acl(tuple(Ace(sid, right, scope) for sid, right in rights.items()))


@dataclass
class Meta:
    """What Windows keeps per file object."""

    owner: str
    acl: Acl | None = None
    readonly: bool = False


@dataclass(frozen=True)
class Entry:
    """One object as ``lab show`` lists it."""

    path: str
    kind: Literal["file", "folder", "junction", "symlink"]
    owner: str
    acl: Acl | None
    inherited: tuple[Ace, ...]
    readonly: bool
    links: int
    size: int
    target: str | None


# --- errors -------------------------------------------------------------------------------------


class FileError(Exception):
    """A file operation failed; ``code`` is the agent protocol's error code."""

    def __init__(self, code: str, message: str, *, win32: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.win32 = win32


class Crashed(Exception):
    """The agent process died (``crash_after_temp``); nothing after this point runs."""


@dataclass
class Handle:
    """A file the agent holds open without sharing write or delete, as ``FileStream`` with
    ``FileShare.Read`` holds it: reads and DACL changes go to the object it was opened on,
    whatever its names become, and nobody may rename or delete that object, nor rename the
    folder it lies in (MS-FSA 2.1.5.14.11), while it is open. ``delete_on_close``: a lock file
    (``FileOptions.DeleteOnClose``), gone when it is closed, even when the agent dies."""

    path: str
    real: str
    key: tuple[int, int]
    fd: int
    delete_on_close: bool = False


def win32_error(number: int, path: str) -> FileError:
    """The FileError a .NET call raises for Win32 error ``number`` on ``path``."""
    code = {
        ERROR_ACCESS_DENIED: "read-only",
        ERROR_SHARING_VIOLATION: "locked",
        ERROR_LOCK_VIOLATION: "locked",
    }.get(number, "internal")
    return FileError(code, WIN32_MESSAGES[number].format(path=path), win32=number)


# --- faults -------------------------------------------------------------------------------------


@dataclass
class WorkstationFaults:
    """What goes wrong on the file system; change it between commands.

    * ``disk_full``: every file write fails (``disk-full``) after writing half of its bytes;
    * ``locked``: paths held open by another process with read sharing: they can be read but
      not written, replaced, renamed or deleted (``locked``, Win32 error 32);
    * ``read_only``: paths (and everything under them) that deny writing (access denied);
    * ``replace_errors``: per replaced path, the Win32 errors its next ``ReplaceFile`` calls
      fail with, one per call (5, 32, 33, 1175, 1176, 1177), then it succeeds: an antivirus or
      backup agent holding the file for a moment is ``[32]``;
    * ``acl_errors``: paths whose next DACL change fails with access denied, one per call;
    * ``attributes_denied``: paths whose attributes (and links) the agent may not read: a user
      who owns a folder may deny Administrators "read attributes" on what is in it;
    * ``move_denied``: target paths a ``File.Move`` to which fails with access denied;
    * ``fail_verify``: how many of the next managed-file temp writes get corrupted bytes;
    * ``crash_after_temp``: the agent dies right after the Nth next managed-file temp write,
      before it replaces anything (0: off; 1: the next one).

    Paths are Windows paths in any letter case or form: they are compared as :func:`path_key`
    folds them.
    """

    disk_full: bool = False
    locked: set[str] = field(default_factory=set)
    read_only: set[str] = field(default_factory=set)
    replace_errors: dict[str, list[int]] = field(default_factory=dict)
    acl_errors: dict[str, int] = field(default_factory=dict)
    attributes_denied: set[str] = field(default_factory=set)
    move_denied: set[str] = field(default_factory=set)
    fail_verify: int = 0
    crash_after_temp: int = 0


def corrupt(data: bytes) -> bytes:
    """The bytes a ``fail_verify`` write lands on disk instead of ``data``."""
    return data[:-1] + bytes([data[-1] ^ 0xFF]) if data else b"\x00"


# --- paths --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def split(path: str) -> tuple[str, tuple[str, ...]]:
    """``(volume, components)``: volume ``C`` for a drive, ``\\\\server\\share`` for a share.

    Components are normalised as Win32 does (trailing dots and spaces dropped); ``.``, ``..``,
    ``\\\\?\\`` forms and invalid characters are refused.
    """
    drive = _DRIVE.match(path)
    if drive is not None:
        volume, rest = drive.group(1).upper(), drive.group(2) or ""
    else:
        unc = _UNC.match(path)
        if unc is None:
            raise FileError("internal", f"'{path}' is not an absolute path.")
        volume, rest = f"\\\\{unc.group(1).casefold()}\\{unc.group(2).casefold()}", unc.group(3)
        rest = rest or ""
    parts = []
    for raw in _SEPARATOR.split(rest):
        if not raw:
            continue
        part = raw.rstrip(". ")
        if raw in (".", "..") or not part or _BAD_NAME.search(part):
            raise FileError("internal", f"'{path}' contains an invalid path component.")
        parts.append(part)
    return volume, tuple(parts)


def full_path(path: str) -> str:
    """``[IO.Path]::GetFullPath``: ``.`` and ``..`` folded (never above the volume root),
    trailing dots and spaces dropped. Only the agent's checks take such paths; every file
    operation refuses ``..`` (:func:`split`)."""
    drive = _DRIVE.match(path)
    unc = None if drive is not None else _UNC.match(path)
    if drive is None and unc is None:
        raise FileError("internal", f"'{path}' is not an absolute path.")
    if drive is not None:
        head, rest = f"{drive.group(1).upper()}:", drive.group(2) or ""
    else:
        assert unc is not None  # noqa: S101 - one of the two matched
        head, rest = f"\\\\{unc.group(1)}\\{unc.group(2)}", unc.group(3) or ""
    parts: list[str] = []
    for raw in _SEPARATOR.split(rest):
        if raw in ("", "."):
            continue
        if raw == "..":
            if parts:
                parts.pop()
            continue
        parts.append(raw.rstrip(". ") or raw)
    return normalize(head + "\\" + "\\".join(parts))


def _prefix(volume: str) -> str:
    return f"{volume}:\\" if len(volume) == 1 else f"{volume}\\"


def normalize(path: str) -> str:
    """``path`` as ``GetFullPath`` writes it: one separator, no trailing dots or spaces."""
    volume, parts = split(path)
    return _prefix(volume) + "\\".join(parts)


@functools.lru_cache(maxsize=8192)
def path_key(path: str) -> str:
    """A canonical, case-folded form of a Windows path (for fault sets and comparisons)."""
    return normalize(path).casefold()


def _fault_key(faults: Mapping[str, object], path: str) -> str | None:
    """The key of ``faults`` that names ``path`` (in any letter case), or None."""
    if not faults:
        return None
    key = path_key(path)
    return next((given for given in faults if path_key(given) == key), None)


def parent(path: str) -> str:
    """The folder of ``path``."""
    volume, parts = split(path)
    return _prefix(volume) + "\\".join(parts[:-1])


def leaf(path: str) -> str:
    """The last component of ``path``."""
    parts = split(path)[1]
    if not parts:
        raise FileError("internal", f"'{path}' is the root of its volume.")
    return parts[-1]


def join(folder: str, *names: str) -> str:
    """``folder\\name\\...`` without doubled separators."""
    return "\\".join([folder.rstrip("\\/"), *names])


def is_within(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or below it (case-insensitive, whole components)."""
    inner, outer = path_key(path), path_key(folder).rstrip("\\")
    return inner == outer or inner.startswith(outer + "\\")


def components(path: str) -> Iterator[str]:
    """``path`` and each of its ancestors, from the volume root down (root excluded)."""
    volume, parts = split(path)
    for depth in range(1, len(parts) + 1):
        yield _prefix(volume) + "\\".join(parts[:depth])


# --- the file system ----------------------------------------------------------------------------


def _stat(real: str, *, follow: bool = True) -> os.stat_result | None:
    """``os.stat`` (or ``lstat``), None where the object does not exist."""
    try:
        return os.stat(real) if follow else os.lstat(real)
    except OSError as failed:
        if failed.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return None
        raise
    except ValueError:  # a name the file system cannot encode
        return None


def _is_dir(found: os.stat_result | None) -> bool:
    return found is not None and stat.S_ISDIR(found.st_mode)


def _is_file(found: os.stat_result | None) -> bool:
    return found is not None and stat.S_ISREG(found.st_mode)


def _key(found: os.stat_result) -> tuple[int, int]:
    return found.st_dev, found.st_ino


class FileSystem:
    """The volumes of one emulated machine; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults = WorkstationFaults()
        self._meta: dict[tuple[int, int], Meta] = {}
        self._observers: list[Callable[[str], None]] = []
        self._held: dict[int, Handle] = {}
        root.mkdir(parents=True, exist_ok=True)
        self._real_root = os.path.realpath(root)

    # --- looking ---------------------------------------------------------------------------

    def host_path(self, path: str) -> Path:
        """The real path of a Windows path, matching existing names case-insensitively."""
        return Path(self._resolve(path)[0])

    def exists(self, path: str) -> bool:
        """True if the file or folder exists (a dangling link does not)."""
        return self._resolve(path)[1] is not None

    def is_dir(self, path: str) -> bool:
        """True if ``path`` is a folder (or a link to one)."""
        return _is_dir(self._resolve(path)[1])

    def is_file(self, path: str) -> bool:
        """True if ``path`` is a file (or a link to one)."""
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

    def is_reparse_point(self, path: str) -> bool:
        """``FileAttributes.ReparsePoint`` of the object named ``path`` itself (not followed);
        access denied where ``faults.attributes_denied`` says so."""
        self._check_attributes(path)
        real, _ = self._resolve(path)
        found = _stat(real, follow=False)
        return found is not None and stat.S_ISLNK(found.st_mode)

    def link_count(self, path: str) -> int:
        """How many names the file has (``NumberOfLinks``); 0 if absent."""
        self._check_attributes(path)
        found = self._resolve(path)[1]
        return 0 if found is None else found.st_nlink

    def link_target(self, path: str) -> str | None:
        """The Windows path a junction or symbolic link points to (None for other objects)."""
        real, _ = self._resolve(path)
        try:
            target = os.readlink(real)
        except OSError:
            return None
        return self._windows_path(target)

    def acl(self, path: str) -> Acl | None:
        """The explicit DACL of the object (None: it only inherits)."""
        meta = self._meta_at(path)
        return None if meta is None else meta.acl

    def owner(self, path: str) -> str | None:
        """The owner SID of the object (None if absent)."""
        meta = self._meta_at(path)
        if meta is None:
            return SYSTEM if self.exists(path) else None
        return meta.owner

    def readonly(self, path: str) -> bool:
        """The read-only attribute of the object."""
        meta = self._meta_at(path)
        return meta is not None and meta.readonly

    def effective_aces(self, path: str) -> tuple[Ace, ...]:
        """The entries that apply to the object: explicit, then inherited (owner substituted)."""
        real = os.path.realpath(self.host_path(path))
        chain = self._real_chain(real)
        passed: list[Ace] = []
        applying: list[Ace] = []
        for index, link in enumerate(chain):
            found = _stat(link)
            is_dir = _is_dir(found)
            meta = self._meta.get(_key(found)) if found is not None else None
            owner = meta.owner if meta is not None else SYSTEM
            explicit = meta.acl.aces if meta is not None and meta.acl is not None else ()
            protected = meta is not None and meta.acl is not None and meta.acl.protected
            received = [] if protected or index == 0 else _inherited(passed, owner, is_dir)
            own = [*explicit, *received]
            applying = [ace for ace in own if ace.applies_to(is_dir)]
            passed = [ace for ace in own if ace.scope != "object"]
        return tuple(applying)

    def allows(self, sid: str, access: Access, path: str, *, admin: bool = False) -> bool:
        """Whether account ``sid`` (a member of Users, or of Administrators when ``admin``) may
        ``access`` the object; its owner may always change its DACL."""
        if access == "change_acl" and self.owner(path) == sid:
            return True
        principals = {sid, EVERYONE, AUTHENTICATED_USERS, ADMINISTRATORS if admin else USERS}
        return any(
            ace.sid in principals and access in RIGHTS[ace.rights]
            for ace in self.effective_aces(path)
        )

    def entry(self, path: str) -> Entry:
        """What ``lab show`` lists for one object."""
        real, found = self._resolve(path)
        link = _stat(real, follow=False)
        if link is None:
            raise FileError("internal", f"'{path}' does not exist.")
        kind: Literal["file", "folder", "junction", "symlink"]
        target = None
        meta = self._meta.get(_key(link))
        acl: Acl | None = None
        inherited: tuple[Ace, ...] = ()
        if stat.S_ISLNK(link.st_mode):
            target = self.link_target(path)
            kind = "junction" if _is_dir(found) else "symlink"
        else:
            kind = "folder" if _is_dir(found) else "file"
            acl = meta.acl if meta is not None else None
            explicit = set(acl.aces) if acl is not None else set()
            inherited = tuple(a for a in self.effective_aces(path) if a not in explicit)
        return Entry(
            path=normalize(path),
            kind=kind,
            owner=meta.owner if meta is not None else SYSTEM,
            acl=acl,
            inherited=inherited,
            readonly=meta is not None and meta.readonly,
            links=link.st_nlink if kind == "file" else 1,
            size=link.st_size if kind == "file" else 0,
            target=target,
        )

    def on_disk(self, path: str) -> str:
        """``path`` normalised, each existing component spelled as it is on disk."""
        volume, _ = split(path)
        real = self.host_path(path)
        relative = os.path.relpath(real, self._volume_root(volume))
        if relative == os.curdir:
            return _prefix(volume)
        return _prefix(volume) + "\\".join(relative.split(os.sep))

    def volumes(self) -> list[str]:
        """The root of every drive and share that exists (``C:\\``, ``\\\\server\\share\\``)."""
        found = [f"{name}:\\" for name in sorted(os.listdir(self.root)) if len(name) == 1]
        shares = os.path.join(self.root, "UNC")
        for server in sorted(os.listdir(shares)) if os.path.isdir(shares) else []:
            for share in sorted(os.listdir(os.path.join(shares, server))):
                found.append(f"\\\\{server}\\{share}\\")
        return found

    def walk(self, path: str) -> Iterator[str]:
        """``path`` and everything below it, folders first, never through a link."""
        yield normalize(path)
        real, _ = self._resolve(path)
        found = _stat(real, follow=False)
        if found is None or not stat.S_ISDIR(found.st_mode):
            return
        for name in sorted(os.listdir(real), key=str.casefold):
            yield from self.walk(join(normalize(path), name))

    # --- changing, as a test or a user sets things up ----------------------------------------

    def observe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(event)`` after every change the agent makes on disk, and after each
        of its path checks (``check <path>``): where a racing user would act."""
        self._observers.append(callback)

    def notify(self, event: str) -> None:
        """Tell the observers of a step that changes nothing (the agent's checks)."""
        self._notify(event)

    def put(
        self,
        path: str,
        data: bytes,
        acl: Acl | None = None,
        *,
        owner: str | None = None,
        readonly: bool = False,
    ) -> None:
        """Set-up: write a file directly (no faults, no events), creating folders."""
        real = self.host_path(path)
        real.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._forget(str(real))
            real.unlink()
        real.write_bytes(data)
        self._set_meta(str(real), Meta(owner or self.default_owner(path), acl, readonly))

    def add_share(self, unc: str) -> None:
        """Set-up: a reachable share ``\\\\server\\share`` (SYSTEM and Administrators own it,
        Users may create folders in it, as Folder Redirection needs)."""
        volume, parts = split(unc)
        if len(volume) == 1 or parts:
            raise ValueError(f"{unc!r} is not \\\\server\\share")
        share = Acl(
            (
                Ace(CREATOR_OWNER, "FullControl", "children"),
                Ace(SYSTEM, "FullControl", "all"),
                Ace(ADMINISTRATORS, "FullControl", "all"),
                Ace(USERS, "Write", "object"),
            )
        )
        self.put_dir(volume + "\\", share, owner=ADMINISTRATORS)

    def put_dir(self, path: str, acl: Acl | None = None, *, owner: str | None = None) -> None:
        """Set-up: create a folder and its missing parents; the last one gets ``acl``."""
        real = self.host_path(path)
        missing = [p for p in components(path) if not self.exists(p)]
        real.mkdir(parents=True, exist_ok=True)
        for folder in missing:
            self._set_meta(str(self.host_path(folder)), Meta(owner or self.default_owner(folder)))
        if acl is not None or owner is not None:
            meta = self._meta_at(path) or Meta(owner or self.default_owner(path))
            self._set_meta(str(real), replace(meta, acl=acl, owner=owner or meta.owner))

    def set_owner(self, path: str, owner: str) -> None:
        """Set-up: the owner of an existing object (through links, as ``SetOwner`` does)."""
        if not self.exists(path):
            raise FileError("internal", f"Cannot set the owner of '{path}': it does not exist.")
        meta = self._meta_at(path) or Meta(owner)
        self._set_meta(str(self.host_path(path)), replace(meta, owner=owner))

    def set_readonly(self, path: str, readonly: bool = True) -> None:
        """Set-up: the read-only attribute of an existing file."""
        meta = self._meta_at(path) or Meta(self.default_owner(path))
        self._set_meta(str(self.host_path(path)), replace(meta, readonly=readonly))

    def make_link(
        self, path: str, target: str, kind: LinkKind = "junction", *, owner: str | None = None
    ) -> None:
        """Set-up: ``mklink /J`` (junction), ``mklink`` / ``mklink /D`` (symlink) or
        ``mklink /H`` (hardlink) at ``path`` to ``target``, made by ``owner``."""
        real = self.host_path(path)
        if _stat(str(real), follow=False) is not None:
            raise FileError("internal", f"'{path}' exists already.")
        real.parent.mkdir(parents=True, exist_ok=True)
        target_real = self.host_path(target)
        if kind == "hardlink":
            if not _is_file(_stat(str(target_real))):
                raise FileError("internal", f"a hard link needs an existing file: '{target}'.")
            os.link(target_real, real)
            return
        if kind == "junction" and not _is_dir(_stat(str(target_real))):
            target_real.mkdir(parents=True, exist_ok=True)
        os.symlink(target_real, real)
        self._meta[_key(os.lstat(real))] = Meta(owner or self.default_owner(path))

    def default_owner(self, path: str) -> str:
        """Who owns an object created at ``path`` without saying: Administrators."""
        return ADMINISTRATORS

    # --- changing, as the agent does -------------------------------------------------------

    def make_dir(self, path: str, acl: Acl) -> bool:
        """``Directory.CreateDirectory(path, security)``: create ``path`` and missing parents,
        each new folder with ``acl``; True if created. An existing folder is left as it is."""
        if self.is_dir(path):
            return False
        created = False
        for folder in components(path):
            real, found = self._resolve(folder)
            if _is_dir(found):
                continue
            if found is not None or _stat(real, follow=False) is not None:
                raise FileError("internal", f"'{folder}' exists and is not a folder.")
            self._check_writable(folder)
            os.mkdir(real)
            self._set_meta(real, Meta(ADMINISTRATORS, acl))
            created = True
            self._notify(f"mkdir {folder}")
        return created

    def write_new(self, path: str, data: bytes, acl: Acl, *, managed: bool = False) -> None:
        """``File.Create(path, ..., security)``: a new file with ``acl``, then ``data``.

        ``managed`` marks the temp file of a managed file: ``fail_verify`` and
        ``crash_after_temp`` apply to those writes only.

        The agent flushes its temp file to disk (``Flush($true)``) before it replaces anything,
        for power-loss durability on the real machine. The lab does not fsync: nothing in it can
        observe durability, while atomicity, which the tests do observe, comes from the
        write-then-rename order alone.
        """
        self._check_writable(path)
        real, _ = self._resolve(path)
        if managed and self.faults.fail_verify > 0:
            self.faults.fail_verify -= 1
            data = corrupt(data)
        full = self.faults.disk_full or len(data) > self.free_space()
        try:
            fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise FileError("internal", f"'{path}' exists already.") from None
        except FileNotFoundError:
            raise FileError("internal", f"The folder of '{path}' does not exist.") from None
        self._meta[_key(os.fstat(fd))] = Meta(ADMINISTRATORS, acl)
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

    def free_space(self) -> int:
        """Bytes free on the volume (the emulated figure)."""
        return 1 << 62

    def replace(self, source: str, target: str, backup: str | None) -> None:
        """``[IO.File]::Replace(source, target, backup)``: ``ReplaceFile`` with its documented
        results. The new ``target`` keeps the replaced file's DACL; the replaced file goes to
        ``backup`` (overwritten) with its own, or away. Injected errors leave the documented
        partial states: 1175 and (with a backup name) 1176 change nothing; 1177 leaves the
        replaced file under the backup name and nothing under ``target``."""
        real_source, source_found = self._resolve(source)
        real_target, target_found = self._resolve(target)
        if not _is_file(source_found) or not _is_file(target_found):
            raise FileError("internal", f"Cannot replace '{target}': a file is missing.")
        assert source_found is not None and target_found is not None  # noqa: S101 - checked
        for path in (source, target, *([backup] if backup else [])):
            self._check_unlocked(path)
            self._check_writable(path)
        replaced = self._meta.get(_key(target_found))
        if replaced is not None and replaced.readonly:
            raise win32_error(ERROR_ACCESS_DENIED, target)
        injected = self._take_replace_error(target)
        if injected in (ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION):
            raise win32_error(injected, target)
        if injected == ERROR_UNABLE_TO_REMOVE_REPLACED or (
            injected == ERROR_UNABLE_TO_MOVE_REPLACEMENT and backup is not None
        ):
            raise win32_error(injected, target)
        # The replacement takes over the replaced file's DACL (and streams and attributes).
        incoming = self._meta.get(_key(source_found)) or Meta(ADMINISTRATORS)
        self._meta[_key(source_found)] = replace(
            incoming, acl=replaced.acl if replaced is not None else None
        )
        if backup is not None:
            real_backup, backup_found = self._resolve(backup)
            if _is_dir(backup_found):
                raise FileError("internal", f"'{backup}' is a folder.")
            if _stat(real_backup, follow=False) is not None:
                self._forget(real_backup)
                os.unlink(real_backup)
            # A second name first, so that the target is never missing while it is replaced.
            os.link(real_target, real_backup)
            self._notify(f"backup {target} -> {backup}")
            if injected == ERROR_UNABLE_TO_MOVE_REPLACEMENT_2:
                os.unlink(real_target)
                raise win32_error(injected, target)
        elif injected == ERROR_UNABLE_TO_MOVE_REPLACEMENT:
            self._forget(real_target)
            os.unlink(real_target)
            raise win32_error(injected, target)
        elif injected == ERROR_UNABLE_TO_MOVE_REPLACEMENT_2:
            os.replace(real_target, f"{real_target}.~{os.getpid()}")  # a name nobody knows
            raise win32_error(injected, target)
        else:
            self._forget(real_target)
        os.replace(real_source, real_target)
        self._notify(f"replace {source} -> {target}")

    def move(self, source: str, target: str, *, overwrite: bool = False) -> None:
        """``[IO.File]::Move`` (``overwrite``: delete the target first, as ``Move-Item -Force``).
        The moved file keeps its own owner and DACL."""
        real_source, source_found = self._resolve(source)
        real_target, target_found = self._resolve(target)
        if not _is_file(source_found):
            raise FileError("internal", f"Cannot move '{source}': it does not exist.")
        for path in (source, target):
            self._check_unlocked(path)
            self._check_writable(path)
        if target_found is not None and not overwrite:
            raise FileError("internal", f"Cannot move to '{target}': it exists.")
        if any(path_key(target) == path_key(denied) for denied in self.faults.move_denied):
            raise win32_error(ERROR_ACCESS_DENIED, target)
        if _is_dir(target_found):
            raise FileError("internal", f"'{target}' is a folder.")
        if target_found is not None:
            self._forget(real_target)
        os.replace(real_source, real_target)
        self._notify(f"move {source} -> {target}")

    def delete(self, path: str) -> bool:
        """``[IO.File]::Delete``: False if it did not exist. A symbolic link to a file goes, not
        its target; the read-only attribute refuses it."""
        real, found = self._resolve(path)
        link = _stat(real, follow=False)
        if link is None or (not stat.S_ISLNK(link.st_mode) and not _is_file(found)):
            return False
        self._check_unlocked(path)
        self._check_writable(path)
        if self.readonly(path) and not stat.S_ISLNK(link.st_mode):
            raise win32_error(ERROR_ACCESS_DENIED, path)
        self._forget(real)
        os.unlink(real)
        self._notify(f"delete {path}")
        return True

    def remove_dir(self, path: str) -> bool:
        """``[IO.Directory]::Delete(path)`` of an empty folder, or of a junction itself (never
        its target); False if absent."""
        real, _ = self._resolve(path)
        link = _stat(real, follow=False)
        if link is None:
            return False
        self._check_writable(path)
        self._forget(real)
        if stat.S_ISLNK(link.st_mode):
            os.unlink(real)
        else:
            try:
                os.rmdir(real)
            except OSError:
                raise FileError("internal", f"The directory '{path}' is not empty.") from None
        self._notify(f"rmdir {path}")
        return True

    def set_acl(self, path: str, acl: Acl) -> None:
        """``SetAccessControl``: on the object ``path`` names, through any link, as Windows does."""
        found = self._resolve(path)[1]
        if found is None:
            raise FileError("internal", f"Cannot set the ACL of '{path}': it does not exist.")
        self._check_writable(path)
        given = _fault_key(self.faults.acl_errors, path)
        if given is not None and self.faults.acl_errors[given] > 0:
            self.faults.acl_errors[given] -= 1
            raise win32_error(ERROR_ACCESS_DENIED, path)
        meta = self._meta.get(_key(found)) or Meta(self.default_owner(path))
        self._meta[_key(found)] = replace(meta, acl=acl)
        self._notify(f"acl {path}")

    # --- open handles: what the agent holds, and what that forbids ---------------------------

    def open_held(self, path: str) -> Handle:
        """``FileStream(path, Open, Read | ChangePermissions, FileShare.Read)``: the file
        ``path`` names now (links followed, as ``CreateFile`` follows them), held open."""
        real, found = self._resolve(path)
        if found is None:
            raise FileError("internal", f"Could not find file '{path}'.")
        if not _is_file(found):
            raise FileError("internal", f"Access to the path '{path}' is denied.", win32=5)
        fd = os.open(real, os.O_RDONLY)
        handle = Handle(path, os.path.realpath(real), _key(os.fstat(fd)), fd)
        self._held[fd] = handle
        return handle

    def create_lock(self, folder: str, name: str, data: bytes, acl: Acl) -> Handle:
        """``FileStream(path, CreateNew, ..., FileShare.Read, ..., DeleteOnClose, security)``:
        a new file ``name`` in ``folder`` holding ``data``, created with ``acl`` and held open
        in the same call (the agent's folder lock).

        A few bytes live in the file's MFT record: no cluster is allocated, so a full disk
        still takes them (``disk_full`` does not apply); a folder that denies writing does not.
        """
        path = join(folder, name)
        self._check_writable(path)
        real, _ = self._resolve(path)
        try:
            fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise FileError("internal", f"'{path}' exists already.") from None
        except FileNotFoundError:
            raise FileError("internal", f"The folder of '{path}' does not exist.") from None
        os.write(fd, data)
        key = _key(os.fstat(fd))
        self._meta[key] = Meta(ADMINISTRATORS, acl)
        handle = Handle(path, os.path.realpath(real), key, fd, delete_on_close=True)
        self._held[fd] = handle
        self._notify(f"lock {path}")
        return handle

    def read_held(self, handle: Handle) -> bytes:
        """The bytes of the object ``handle`` holds."""
        os.lseek(handle.fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(handle.fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def held_acl(self, handle: Handle) -> Acl | None:
        """``FileStream.GetAccessControl()``: the explicit DACL of the held object."""
        meta = self._meta.get(handle.key)
        return None if meta is None else meta.acl

    def set_held_acl(self, handle: Handle, acl: Acl) -> None:
        """``FileStream.SetAccessControl()``: on the held object, whatever its names are now."""
        given = _fault_key(self.faults.acl_errors, handle.path)
        if given is not None and self.faults.acl_errors[given] > 0:
            self.faults.acl_errors[given] -= 1
            raise win32_error(ERROR_ACCESS_DENIED, handle.path)
        meta = self._meta.get(handle.key) or Meta(self.default_owner(handle.path))
        self._meta[handle.key] = replace(meta, acl=acl)
        self._notify(f"acl {handle.path}")

    def close(self, handle: Handle) -> None:
        """Close ``handle``; a lock file goes with it."""
        if self._held.pop(handle.fd, None) is None:
            return
        os.close(handle.fd)
        if handle.delete_on_close:
            with contextlib.suppress(FileNotFoundError):
                self._forget(handle.real)
                os.unlink(handle.real)

    def held_paths(self) -> list[str]:
        """The real paths of every file the agent holds open (a test's view)."""
        return sorted(h.real for h in self._held.values())

    def rename_as_user(self, path: str, new_path: str) -> None:
        """A user renames the object ``path`` names itself (a link, not its target) to
        ``new_path`` in the same volume, as Windows allows it: a folder that holds a file
        someone has open is not renamed (access denied), nor is a file held without sharing
        delete (sharing violation)."""
        real = self._entry_real(path)
        entry = _stat(real, follow=False)
        if entry is None:
            raise FileError("internal", f"Could not find '{path}'.")
        if stat.S_ISDIR(entry.st_mode) and any(
            os.path.dirname(h.real) == os.path.realpath(real) for h in self._held.values()
        ):
            raise win32_error(ERROR_ACCESS_DENIED, path)
        if stat.S_ISREG(entry.st_mode) and any(h.key == _key(entry) for h in self._held.values()):
            raise win32_error(ERROR_SHARING_VIOLATION, path)
        os.rename(real, self._entry_real(new_path))

    def _entry_real(self, path: str) -> str:
        """The real path of the entry ``path`` names, its last component not followed."""
        folder, _ = self._resolve(parent(path))
        return self._child(folder, True, leaf(path))[0]

    # --- internals -------------------------------------------------------------------------

    def _volume_root(self, volume: str) -> str:
        if len(volume) == 1:
            return os.path.join(self.root, volume)
        server, share = volume.lstrip("\\").split("\\", 1)
        return os.path.join(self.root, "UNC", server, share)

    def _resolve(self, path: str) -> tuple[str, os.stat_result | None]:
        """The real path of a Windows path and its ``stat`` (None: it does not exist).

        Each component matches an existing name case-insensitively; a missing component keeps
        the case it was given. An exact match (one ``stat`` of the whole path, the usual case)
        is taken as it is. Links are followed by the host, as Windows follows reparse points.
        """
        volume, parts = split(path)
        return self._walk(self._volume_root(volume), parts)

    def _walk(self, base: str, parts: tuple[str, ...]) -> tuple[str, os.stat_result | None]:
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
        candidate = f"{folder}/{name}"
        if not folder_is_dir:
            return candidate, None
        if candidate != missing:
            found = _stat(candidate)
            if found is not None or _stat(candidate, follow=False) is not None:
                return candidate, found
        wanted = name.casefold()
        for entry in os.listdir(folder):
            if entry.casefold() == wanted:
                real = f"{folder}/{entry}"
                return real, _stat(real)
        return candidate, None

    def _real_chain(self, real: str) -> list[str]:
        """The real folders from the volume root down to ``real`` (all links resolved)."""
        relative = os.path.relpath(real, self._real_root)
        parts = relative.split(os.sep)
        if parts[0] == os.pardir:
            raise FileError("internal", f"'{real}' is outside the workstation.")
        depth = 3 if parts[0] == "UNC" else 1
        chain = [os.path.join(self._real_root, *parts[:depth])]
        for index in range(depth, len(parts)):
            chain.append(os.path.join(chain[-1], parts[index]))
        return chain

    def _windows_path(self, real: str) -> str | None:
        relative = os.path.relpath(os.path.realpath(real), self._real_root).split(os.sep)
        if relative[0] == os.pardir:
            return None
        if relative[0] == "UNC" and len(relative) >= 3:
            return "\\\\" + "\\".join(relative[1:])
        return f"{relative[0]}:\\" + "\\".join(relative[1:])

    def _meta_at(self, path: str) -> Meta | None:
        found = self._resolve(path)[1]
        return None if found is None else self._meta.get(_key(found))

    def _set_meta(self, real: str, meta: Meta) -> None:
        found = _stat(real)
        if found is not None:
            self._meta[_key(found)] = meta

    def _forget(self, real: str) -> None:
        """Drop the metadata of the object ``real`` names if this is its last name."""
        found = _stat(real, follow=False)
        if found is not None and (stat.S_ISLNK(found.st_mode) or found.st_nlink <= 1):
            self._meta.pop(_key(found), None)

    def _take_replace_error(self, target: str) -> int:
        given = _fault_key(self.faults.replace_errors, target)
        if given is None or not self.faults.replace_errors[given]:
            return 0
        pending = self.faults.replace_errors[given]
        number = pending.pop(0)
        if not pending:
            del self.faults.replace_errors[given]
        return number

    def _check_writable(self, path: str) -> None:
        if not self.faults.read_only:
            return
        for denied in self.faults.read_only:
            if is_within(path, denied):
                raise win32_error(ERROR_ACCESS_DENIED, path)

    def _check_attributes(self, path: str) -> None:
        if self.faults.attributes_denied and any(
            path_key(path) == path_key(denied) for denied in self.faults.attributes_denied
        ):
            raise win32_error(ERROR_ACCESS_DENIED, path)

    def _check_unlocked(self, path: str) -> None:
        if not self.faults.locked:
            return
        key = path_key(path)
        if any(path_key(locked) == key for locked in self.faults.locked):
            raise win32_error(ERROR_SHARING_VIOLATION, path)

    def _notify(self, event: str) -> None:
        for callback in self._observers:
            callback(event)

    def remove_tree(self, path: str) -> None:
        """Set-up: remove a folder and everything in it (links themselves, never targets)."""
        real, _ = self._resolve(path)
        for below in reversed(list(self.walk(path))):
            with contextlib.suppress(FileError):
                self._forget(str(self.host_path(below)))
        shutil.rmtree(real, ignore_errors=True)


def _inherited(passed: list[Ace], owner: str, is_dir: bool) -> list[Ace]:
    """What a child receives from its parent's inheritable entries."""
    received: list[Ace] = []
    for ace in passed:
        if ace.scope == "folders":
            if is_dir:
                received.append(ace)
            continue
        if ace.sid == CREATOR_OWNER:
            received.append(Ace(owner, ace.rights, "object"))
            if is_dir:
                received.append(Ace(CREATOR_OWNER, ace.rights, "children"))
            continue
        received.append(Ace(ace.sid, ace.rights, "all"))
    return received
