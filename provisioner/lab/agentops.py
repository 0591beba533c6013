"""What the agent scripts do, executed on an emulated :class:`Workstation`.

docs/agent-protocol.md is the contract; where it is silent this module does what the packaged
scripts (``provisioner/transport/agent/*.ps1``) do, step for step and with the same error codes,
so that the controller meets the same answers in the lab as on Windows. The function names
follow the scripts' (``Assert-SafePath`` is :func:`assert_safe_path`, and so on).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from provisioner.lab.ntfs import (
    ERROR_LOCK_VIOLATION,
    ERROR_SHARING_VIOLATION,
    ERROR_UNABLE_TO_MOVE_REPLACEMENT_2,
    Handle,
    components,
    full_path,
    is_within,
    normalize,
    path_key,
    split,
)
from provisioner.lab.workstation import (
    ADMINISTRATORS,
    AGENT_ACCOUNT,
    OVERRIDE_ACL,
    STATE_ACL,
    STATE_ROOT,
    SYSTEM,
    SYSTEM_VARIABLES,
    Acl,
    Crashed,
    FileError,
    Process,
    User,
    Workstation,
    expand,
    image_version,
    ini_name,
    join,
    leaf,
    parent,
    state_folder_acl,
    user_file_acl,
    user_folder_acl,
)

PROTOCOL = 1
POLICIES = ("skip", "stop", "force")
KINDS = ("microsip", "override")
PENDING = "backup.new"
"""Where apply keeps the replaced content until the new file is verified."""
LEGACY_ITEMS = ("applied", "backup.1", "backup.2", "backup.3", PENDING, "rolled-back")
"""What agents before the ProgramData state kept beside the file."""
HISTORY = "history"
"""Each write of the tool to the file, newest first: what a rollback undoes."""
STATE_ITEMS = (*LEGACY_ITEMS, HISTORY)
BACKUPS = 3
RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_TICKS = re.compile(r"[0-9]+")
_LONG_MAX = 2**63 - 1
"""``[long]::MaxValue``: ``TryParse`` fails above it."""
_EPOCH_TICKS = 621_355_968_000_000_000
"""``DateTime.Ticks`` (100 ns since 0001-01-01) of the Unix epoch."""
REPLACE_ATTEMPTS = 5
"""ReplaceFile attempts while another program holds the file (antivirus, backup, indexer)."""

Json = dict[str, Any]
_UNEXPANDED = re.compile(r"%[^%\\]+%")
_SID = re.compile(r"^S-1-\d+(-\d+)+$")
_OWNERS = frozenset({SYSTEM, ADMINISTRATORS, AGENT_ACCOUNT})
"""``Get-TrustedOwners``: who owns what the agent creates."""


# --- small helpers --------------------------------------------------------------------------------


def ps_text(value: object) -> str:
    """``[string]$value`` in PowerShell: null is empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def items(value: object) -> list[Json]:
    """``@($list)`` without nulls; a non-object item reads as an object with no fields."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [item if isinstance(item, dict) else {} for item in values if item is not None]


def error(code: str, message: str) -> Json:
    """An error object of the contract."""
    return {"code": code, "message": message}


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _temp_name(folder: str, name: str, suffix: str = "tmp") -> str:
    return join(folder, f".{name}.{secrets.token_hex(6)}.{suffix}")


def _discard(ws: Workstation, path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(FileError):
            ws.delete(path)


def _unsafe(message: str) -> FileError:
    return FileError("unsafe-path", message)


# --- paths the workstation's users control --------------------------------------------------------


def expand_roots(roots: list[str], user: User | None) -> list[str]:
    """The inventory's ``appdata_roots`` for ``user``: ``%USERNAME%``, ``%USERDOMAIN%`` and
    ``%USERPROFILE%`` expanded; a root that stays unexpanded or is not absolute is dropped."""
    if user is None:
        return []
    expanded = []
    for root in roots:
        value = expand(root, user.variables())
        if _UNEXPANDED.search(value):
            continue
        with contextlib.suppress(FileError):
            expanded.append(full_path(value))
    return expanded


def check_start(ws: Workstation, path: str, sid: str | None, roots: list[str]) -> str:
    """Where the reparse-point check of ``path`` begins: below the user's profile folder or an
    allowed root when ``path`` lies inside one, else below the volume root."""
    user = ws.profile_of(sid) if sid else None
    if user is not None and user.profile is not None and is_within(path, user.profile):
        return normalize(user.profile)
    for root in expand_roots(roots, user or (ws.account_of(sid) if sid else None)):
        if is_within(path, root):
            if _is_link(ws, root):
                raise _unsafe(
                    f"{root} is a junction or symbolic link; the agent never writes through one."
                )
            return root
    volume, _ = split(path)
    return normalize(f"{volume}:\\" if len(volume) == 1 else volume + "\\")


def _is_link(ws: Workstation, path: str) -> bool:
    """A reparse point; attributes the agent may not read are unsafe, not absent."""
    try:
        return ws.is_reparse_point(path)
    except FileError as failed:
        raise _unsafe(f"cannot read the attributes of {path}: {failed.message}") from None


def assert_safe_path(ws: Workstation, path: str, start: str) -> None:
    """``Assert-SafePath``: no existing component of ``path`` below ``start`` is a junction or
    symbolic link, and the file itself (if it exists) has one name; else ``unsafe-path``.
    Attributes the agent may not read count as unsafe, not absent."""
    depth = len(split(start)[1])
    for component in list(components(path))[depth:]:
        if _is_link(ws, component):
            raise _unsafe(
                f"{component} is a junction or symbolic link; the agent never writes through one."
            )
        if not ws.exists(component):
            return
    if ws.is_file(path):
        try:
            names = ws.link_count(path)
        except FileError as failed:
            raise _unsafe(f"cannot tell whether {path} has other names: {failed.message}") from None
        if names > 1:
            raise _unsafe(
                f"{path} is a hard link to another file; the agent never writes through one."
            )
    ws.notify(f"check {path}")


def assert_own_path(ws: Workstation, path: str, sid: str) -> None:
    """``Assert-OwnPath``: a user's ini never lies in another user's profile folder."""
    for user in ws.users:
        if user.sid != sid and user.profile is not None and is_within(path, user.profile):
            raise _unsafe(f"{path} lies in the profile {user.profile} of another user.")


def is_plain_file(ws: Workstation, path: str) -> bool:
    """``Test-PlainFile``: a file that is no link and has no other name."""
    try:
        return ws.is_file(path) and not ws.is_reparse_point(path) and ws.link_count(path) == 1
    except FileError:
        return False


# A folder that holds a file someone has open is not renamed (MS-FSA 2.1.5.14.11), and a folder
# that is not empty cannot become a junction: with a lock file of the agent's open in every
# folder below the start, a checked path stays as it was checked until the locks go.


@dataclass
class Locks:
    """``Lock-Folders``: the agent's lock files, one per folder, each with its nonce."""

    held: list[tuple[Handle, bytes]]


def lock_folders(ws: Workstation, path: str, start: str, locks: Locks | None = None) -> Locks:
    """``Lock-Folders``: a lock file (SYSTEM and Administrators only, a random nonce, deleted
    on close) held open in each existing folder between ``start`` and ``path``'s own, added to
    ``locks``; then the path is checked and every lock read back through its path."""
    assert_safe_path(ws, path, start)  # a link already there gets no lock through it
    locks = locks if locks is not None else Locks([])
    taken = {path_key(parent(h.path)) for h, _ in locks.held}
    depth = len(split(start)[1])
    try:
        for folder in list(components(parent(path)))[depth:]:
            if not ws.is_dir(folder):
                break
            if path_key(folder) in taken:
                continue
            nonce = secrets.token_bytes(16)
            name = f".microsip-provisioner.{secrets.token_hex(6)}.lock"
            try:
                handle = ws.create_lock(folder, name, nonce, STATE_ACL)
            except FileError as failed:
                raise FileError(
                    failed.code, f"cannot lock {folder}: {failed.message}", win32=failed.win32
                ) from None
            locks.held.append((handle, nonce))
        assert_safe_path(ws, path, start)
        for handle, nonce in locks.held:
            try:
                seen, names = ws.read(handle.path), ws.link_count(handle.path)
            except FileError:
                seen, names = None, 0
            if seen != nonce or names != 1:
                raise _unsafe(
                    f"a folder on the path of {path} changed while the agent was locking it."
                )
    except BaseException:
        unlock_folders(ws, locks)
        raise
    return locks


def unlock_folders(ws: Workstation, locks: Locks) -> None:
    """Close every lock file (each goes with its handle)."""
    while locks.held:
        ws.close(locks.held.pop()[0])


def open_plain(ws: Workstation, path: str) -> Handle:
    """``Open-PlainFile``: the file held open without sharing write or delete (its name cannot
    change meanwhile), then checked to be no link and to have no other name."""
    handle = ws.open_held(path)
    try:
        if _is_link(ws, path) or ws.link_count(path) != 1:
            raise _unsafe(f"{path} is a link or has other names; the agent never acts through one.")
    except BaseException:
        ws.close(handle)
        raise
    return handle


def read_checked(ws: Workstation, path: str, start: str) -> bytes | None:
    """``Read-CheckedFile``: the bytes of a file in a folder a user controls, read with its
    folders locked and itself held; None when absent, ``unsafe-path`` when a link is in the
    way."""
    locks = lock_folders(ws, path, start)
    try:
        if not ws.exists(path):
            return None
        handle = open_plain(ws, path)
        try:
            return ws.read_held(handle)
        finally:
            ws.close(handle)
    finally:
        unlock_folders(ws, locks)


def read_user_file(ws: Workstation, path: str, start: str) -> bytes | None:
    """``Read-UserFile``: :func:`read_checked`, None when unsafe or absent."""
    try:
        return read_checked(ws, path, start)
    except FileError:
        return None


# --- the agent's own state ------------------------------------------------------------------------


@dataclass(frozen=True)
class StateFolder:
    """``<state root>\\users\\<SID>\\<name>`` (``machine\\<name>``): merge base and backups."""

    folder: str

    def item(self, name: str) -> str:
        """A file of the state folder."""
        return join(self.folder, name)


def state_folder(sid: str | None, name: str) -> StateFolder:
    """Where the state of the managed file ``name`` of ``sid`` (None: the workstation) lives."""
    return StateFolder(Workstation.state_path(sid, name))


def check_state_root(ws: Workstation) -> bool:
    """``Test-StateRoot``: False when the root is absent; ``unsafe-path`` when it is a link or
    is owned by someone else than SYSTEM or Administrators (a user may create folders in
    ``C:\\ProgramData`` and would own one created before the agent's)."""
    if _is_link(ws, STATE_ROOT):
        raise _unsafe(f"{STATE_ROOT} is a junction or symbolic link; remove it.")
    if not ws.exists(STATE_ROOT):
        return False
    assert_agent_owned(ws, STATE_ROOT)
    return True


def assert_agent_owned(ws: Workstation, folder: str) -> None:
    """``Assert-AgentOwned``: a user may create folders in ``C:\\ProgramData`` (and below a
    root an administrator made before the agent, where its inherited rules allow) and owns
    what they create; an owner can always grant themselves access."""
    owner = ws.owner(folder)
    if owner not in _OWNERS:
        raise _unsafe(
            f"{folder} is owned by {owner}, not by SYSTEM or Administrators: a user created "
            "it; remove it (rmdir /s /q) so that the agent can create its own."
        )


def open_state(ws: Workstation, state: StateFolder) -> None:
    """``Open-StateFolder``: the root (created protected if absent, its DACL reset), then the
    file's folder below it; every component checked for links and owners."""
    if not check_state_root(ws):
        ws.make_dir(STATE_ROOT, state_folder_acl())
    ws.set_acl(STATE_ROOT, state_folder_acl())
    # checked before anything is created in them, and again after
    for first in (True, False):
        assert_state_owned(ws, state)
        if first:
            ws.make_dir(state.folder, state_folder_acl())


def assert_state_owned(ws: Workstation, state: StateFolder) -> None:
    """``Assert-StateOwned``: every folder that exists from the state root down to the file's
    state folder has no link and is owned by SYSTEM, Administrators or the agent; what a user's
    own folder holds was written by that user, whatever it says."""
    assert_safe_path(ws, state.folder, STATE_ROOT)
    for folder in list(components(state.folder))[len(split(STATE_ROOT)[1]) :]:
        if not ws.is_dir(folder):
            break
        assert_agent_owned(ws, folder)


def read_state(ws: Workstation, state: StateFolder, item: str) -> bytes | None:
    """``Read-StateFile``: a state file as the agent reads it (nothing when the root is
    absent); a folder a user made first is refused before it is read."""
    if not check_state_root(ws):
        return None
    assert_state_owned(ws, state)
    assert_safe_path(ws, state.item(item), STATE_ROOT)
    return ws.read(state.item(item))


def write_state_file(ws: Workstation, state: StateFolder, item: str, data: bytes) -> None:
    """A state file replaced through a temp file; SYSTEM and Administrators only."""
    temp = _temp_name(state.folder, item)
    try:
        ws.write_new(temp, data, STATE_ACL)
        move_over(ws, temp, state.item(item))
    finally:
        _discard(ws, temp)


def move_over(ws: Workstation, source: str, target: str) -> None:
    """.NET Framework's File.Move cannot overwrite; File.Replace can."""
    if ws.exists(target):
        ws.replace(source, target, None)
    else:
        ws.move(source, target)


def backups_down(ws: Workstation, state: StateFolder) -> None:
    """``backup.new`` becomes ``backup.1``, the others moving down to the first free slot."""
    pending = state.item(PENDING)
    if not ws.exists(pending):
        return
    backup1, backup2 = state.item("backup.1"), state.item("backup.2")
    free = 3
    if not ws.exists(backup1):
        free = 1
    elif not ws.exists(backup2):
        free = 2
    if free >= 3:
        move_over(ws, backup2, state.item("backup.3"))
    if free >= 2:
        move_over(ws, backup1, backup2)
    move_over(ws, pending, backup1)


def settle_pending(ws: Workstation, state: StateFolder, path: str) -> None:
    """``Resolve-PendingBackup``: a ``backup.new`` left by an agent that died. Written before its
    replace, it is the newest generation once the file holds something else; while the file
    still holds the same bytes the replace never happened, and it goes (with the record of its
    write)."""
    pending = state.item(PENDING)
    data = ws.read(pending)
    if data is None:
        return
    if data == read_held_file(ws, path):
        remove_unmade_write(ws, state, _sha(data))
        ws.delete(pending)
        return
    backups_down(ws, state)


def backups_up(ws: Workstation, state: StateFolder) -> None:
    """``backup.2`` becomes ``backup.1``, ``backup.3`` becomes ``backup.2``."""
    for number in (2, 3):
        source = state.item(f"backup.{number}")
        if ws.exists(source):
            move_over(ws, source, state.item(f"backup.{number - 1}"))


# --- what each run wrote ---------------------------------------------------------------------


class Refused(Exception):
    """A request refused as a whole: ``ok: false`` with this message."""


@dataclass(frozen=True)
class Write:
    """One line of a file's history: a write of the tool, in the run it belonged to."""

    ticks: int
    run: str
    action: str
    """``created`` (there was no file) or ``replaced``."""
    before: str
    """The SHA-256 of the content replaced; ``-`` when created or unknown."""
    path: str

    def line(self) -> str:
        """The history line."""
        return f"{self.ticks}\t{self.run}\t{self.action}\t{self.before}\t{self.path}\r\n"


def parse_history(data: bytes) -> list[Write]:
    """``ConvertFrom-WriteHistory``: the entries, newest first; a line that does not parse ends
    it: ticks in ASCII digits that fit a long, a run id as apply takes it, an action in lower
    case."""
    entries = []
    for line in data.decode("utf-8", errors="replace").split("\n"):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 5 or not _TICKS.fullmatch(fields[0]) or int(fields[0]) > _LONG_MAX:
            break
        if not RUN_ID.fullmatch(fields[1]) or fields[2] not in ("created", "replaced"):
            break
        entries.append(Write(int(fields[0]), fields[1], fields[2], fields[3], fields[4]))
    return entries


def read_history(ws: Workstation, state: StateFolder) -> list[Write] | None:
    """``Get-WriteHistory``: None when the file has none (an agent before this one)."""
    data = read_state(ws, state, HISTORY)
    return None if data is None else parse_history(data)


def save_history(ws: Workstation, state: StateFolder, entries: list[Write]) -> None:
    """``Save-WriteHistory``."""
    write_state_file(ws, state, HISTORY, "".join(e.line() for e in entries).encode("utf-8"))


def utc_ticks() -> int:
    """``[DateTime]::UtcNow.Ticks``."""
    return _EPOCH_TICKS + time.time_ns() // 100


def add_write_record(
    ws: Workstation,
    state: StateFolder,
    run: str,
    before: str | None,
    path: str,
    user_made: bool = False,
) -> None:
    """``Add-WriteRecord``: before a write its line goes first. A write that creates the file
    ends the history; only as many replacements are kept as there are backups. A write that
    replaces a file a user made (``user_made``) ends it too: nothing older describes it."""
    history = read_history(ws, state)
    ticks = utc_ticks()
    if history and history[0].ticks >= ticks:
        ticks = history[0].ticks + 1
    action = "replaced" if before else "created"
    kept = [Write(ticks, run, action, before or "-", path)]
    if action == "replaced" and history is not None and not user_made:
        replaced = 1
        for entry in history:
            replaced += entry.action == "replaced"
            if replaced > BACKUPS:
                break
            kept.append(entry)
            if entry.action == "created":
                break
    save_history(ws, state, kept)


def restore_history(ws: Workstation, state: StateFolder, data: bytes | None) -> None:
    """``Restore-WriteHistory``: the history as it was before a write that failed and left the
    file as it was. Cleanup only."""
    with contextlib.suppress(FileError):
        if data is None:
            _discard(ws, state.item(HISTORY))
        else:
            write_state_file(ws, state, HISTORY, data)


def remove_unmade_write(ws: Workstation, state: StateFolder, content: str | None) -> None:
    """``Remove-UnmadeWrite``: the file holds again the content (``content``: its hash) the
    newest recorded write replaced; that write never happened, and its record goes."""
    history = read_history(ws, state)
    if history and history[0].before == (content or ""):
        remove_last_write(ws, state)


def remove_last_write(ws: Workstation, state: StateFolder) -> None:
    """``Remove-LastWrite``: the write a rollback undid leaves; an empty history stays."""
    history = read_history(ws, state)
    if history is not None:
        save_history(ws, state, history[1:])


def request_run(request: Json) -> str:
    """The run an apply request belongs to; a run of its own without one."""
    run = ps_text(request.get("run")) or secrets.token_hex(16)
    if not RUN_ID.fullmatch(run):
        raise Refused("the run id must be 1 to 64 letters, digits, - or _")
    return run


def remove_stale(ws: Workstation, folder: str, name: str, suffixes: tuple[str, ...]) -> None:
    """``.<name>.<12 hex>.<suffix>`` left by an agent that died: best effort, exact names only."""
    alternatives = "|".join(re.escape(s) for s in suffixes)
    stale = re.compile(rf"^\.{re.escape(name)}\.[0-9a-f]{{12}}\.({alternatives})$", re.IGNORECASE)
    for entry in ws.listdir(folder):
        if stale.match(entry):
            _discard(ws, join(folder, entry))


def legacy_folder(path: str) -> str:
    """``<folder>\\.provisioner\\<name>``: the state of agents before the ProgramData one."""
    return join(parent(path), ".provisioner", leaf(path))


def read_legacy(ws: Workstation, path: str, start: str, item: str) -> bytes | None:
    """A legacy state file, only when no link stands in its way (the user could edit it)."""
    return read_user_file(ws, join(legacy_folder(path), item), start)


def migrate_legacy(ws: Workstation, path: str, start: str, state: StateFolder) -> None:
    """``Move-LegacyState``: copy what the old ``.provisioner`` folder beside ``path`` holds into
    the state folder (where the state has none), then remove it. A folder that is a link is
    left alone; a file that is a link or has other names is not read, only its name removed."""
    folder = legacy_folder(path)
    container = parent(folder)
    try:
        assert_safe_path(ws, folder, start)
    except FileError:
        return
    if not ws.is_dir(folder):
        return
    for item in LEGACY_ITEMS:
        source = join(folder, item)
        if not ws.exists(source) and not ws.is_reparse_point(source):
            continue
        if ws.is_dir(source):
            continue  # a folder, or a junction: left alone
        if not ws.exists(state.item(item)):
            data = read_user_file(ws, source, start)
            if data is not None:
                write_state_file(ws, state, item, data)
        with contextlib.suppress(FileError):
            assert_safe_path(ws, folder, start)
            ws.delete(source)
    with contextlib.suppress(FileError):
        assert_safe_path(ws, folder, start)
        remove_stale(ws, folder, "applied", ("tmp",))
    with contextlib.suppress(FileError):
        assert_safe_path(ws, folder, start)
        ws.remove_dir(folder)
    if not ws.listdir(container):
        with contextlib.suppress(FileError):
            ws.remove_dir(container)


# --- accounts, hives and MicroSIP's own rule ------------------------------------------------------


def resolve_account(ws: Workstation, account: str) -> User:
    """``Resolve-Account``: ``.\\name`` becomes ``<COMPUTERNAME>\\name`` (``NTAccount`` does not
    resolve ``.``), then the SID; ``no-account`` if it cannot be translated."""
    name = account
    if name.startswith(".\\"):
        name = f"{ws.computer}\\{name[2:]}"
    user = ws.lookup_account(name)
    if user is None:
        raise FileError("no-account", f"the Windows account {account} cannot be resolved to a SID.")
    return user


def roaming_appdata(user: User) -> str:
    """``Get-RoamingAppData``: the hive's raw AppData expanded with the user's variables."""
    assert user.profile is not None  # noqa: S101 - callers checked the profile
    raw = user.shell_appdata or "%USERPROFILE%\\AppData\\Roaming"
    variables = {"USERPROFILE": user.profile, "USERDOMAIN": user.domain, "USERNAME": user.sam}
    expanded = expand(raw, {**variables, **SYSTEM_VARIABLES})
    if _UNEXPANDED.search(expanded):
        raise FileError("internal", f"cannot expand the AppData folder '{raw}' for this user.")
    return expanded


def check_appdata(appdata: str, user: User, roots: list[str]) -> str:
    """``Test-AppData``: the folder, normalised, when it lies inside the user's profile or an
    allowed root; a share elsewhere is ``redirected``, a local folder elsewhere ``unsafe-path``."""
    try:
        folder = full_path(appdata)
    except FileError:
        raise _unsafe(f"the AppData folder '{appdata}' is not a plain absolute path.") from None
    assert user.profile is not None  # noqa: S101 - callers checked the profile
    if is_within(folder, user.profile):
        return folder
    if any(is_within(folder, root) for root in expand_roots(roots, user)):
        return folder
    if folder.startswith("\\\\"):
        raise FileError(
            "redirected",
            f"AppData is redirected to {folder}; MicroSIP reads its ini there. Allow that "
            "location with microsip.appdata_roots to write it.",
        )
    raise _unsafe(
        f"AppData points to {folder}, outside the profile {user.profile}; set by the user, or "
        "a redirection to allow with microsip.appdata_roots."
    )


# --- inspect --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    """Where MicroSIP was found; ``per_user``: the inventory's folder is in each user's
    profile (``%LOCALAPPDATA%\\...``), found for each user by :func:`locate_for`."""

    found: bool
    dir: str | None
    exe_path: str | None
    source: str | None
    exe: str
    per_user: str | None = None


def _install_in(ws: Workstation, folder: str, exe: str, source: str) -> Install | None:
    folder = folder.strip().strip('"').rstrip("\\")
    try:
        exe_path = join(folder, exe)
        return Install(True, folder, exe_path, source, exe) if ws.is_file(exe_path) else None
    except FileError:
        return None


def locate(ws: Workstation, wanted: Json) -> Install:
    """``Find-MicroSip``: the inventory's folder, else the installer's markers (registry, MSI).
    A folder below a user's own variable (``%LOCALAPPDATA%``) is looked for per user."""
    exe = ps_text(wanted.get("exe")) or "microsip.exe"
    candidates: list[tuple[str, str]] = []
    if ps_text(wanted.get("install_dir")):
        folder = expand(ps_text(wanted.get("install_dir")), SYSTEM_VARIABLES)
        if _UNEXPANDED.search(folder):
            return Install(True, None, None, "inventory", exe, per_user=folder)
        candidates.append(("inventory", folder))
    if ws.hklm_microsip:
        candidates.append(("registry", ws.hklm_microsip))
    candidates += [
        ("msi", product.install_location)
        for product in ws.msi_products
        if product.user_sid is None
        and product.name.casefold() == "microsip"
        and product.install_location
    ]
    for source, raw in candidates:
        found = _install_in(ws, raw, exe, source)
        if found is not None:
            return found
    return Install(False, None, None, None, exe)


def locate_for(ws: Workstation, install: Install, user: User, appdata: str) -> Install:
    """``Find-UserMicroSip``: a per-user folder expanded with the user's own variables; where
    the exe is not there, the folder the user's own installer recorded (HKCU), then the
    machine's markers."""
    if install.per_user is None:
        return install
    assert user.profile is not None  # noqa: S101 - callers checked the profile
    variables = {
        "USERPROFILE": user.profile,
        "LOCALAPPDATA": f"{user.profile}\\AppData\\Local",
        "APPDATA": appdata,
    }
    folder = expand(install.per_user, variables)
    candidates = [("inventory", folder)] if not _UNEXPANDED.search(folder) else []
    if user.hkcu_microsip:
        candidates.append(("hkcu", user.hkcu_microsip))
    for source, raw in candidates:
        # The user writes their own HKCU: only a local folder inside their own profile counts
        # (a share there would make the agent's account authenticate to it).
        try:
            local = full_path(raw.strip().strip('"'))
        except FileError:
            continue
        if local.startswith("\\\\") or not is_within(local, user.profile):
            continue
        # nor one reached through a link (a junction to an object-manager link could still
        # lead to a share): looked at with its folders locked
        locks = lock_folders(ws, join(local, install.exe), normalize(user.profile))
        try:
            found = _install_in(ws, local, install.exe, source)
        finally:
            unlock_folders(ws, locks)
        if found is not None:
            return found
    machine = locate(ws, {"exe": install.exe})
    if machine.found:
        return machine
    raise FileError(
        "not-installed",
        f"MicroSIP was not found in {folder} for this user, nor by registry or MSI.",
    )


class ProcessTable:
    """``Get-MicroSipProcesses``: one query per request, owners looked up once per process."""

    def __init__(self, ws: Workstation, image: str) -> None:
        self._ws = ws
        self._image = image
        self._rows: list[Process] | None = None

    def of(self, sid: str) -> list[Process]:
        """The processes of ``image`` owned by ``sid``."""
        if self._rows is None:
            self._rows = self._ws.process_table(self._image)
        return [p for p in self._rows if p.sid == sid and p.running]

    def refresh(self) -> None:
        """Query again at the next look (after stopping some)."""
        self._rows = None


def exe_version(ws: Workstation, path: str) -> str | None:
    """``Get-ExeVersion``: the FileVersion text of the exe's version resource, read with the
    file held as a plain file (no link, no other name), at most 64 characters; None when it
    cannot be read."""
    try:
        handle = open_plain(ws, path)
    except FileError:
        return None
    try:
        text = image_version(ws.read_held(handle))
    finally:
        ws.close(handle)
    return None if text is None else text[:64]


def file_facts(data: bytes | None) -> Json:
    """``ConvertTo-FileState``."""
    return {"exists": data is not None, "sha256": _sha(data), "content_b64": _b64(data)}


def inspect(ws: Workstation, request: Json) -> Json:
    """The ``inspect`` operation."""
    wanted = request.get("install")
    install = locate(ws, wanted if isinstance(wanted, dict) else {})
    mode = ps_text((wanted or {}).get("mode") if isinstance(wanted, dict) else None)
    roots = [ps_text(r) for r in request.get("appdata_roots") or [] if ps_text(r)]
    table = ProcessTable(ws, install.exe)
    override = inspect_override(ws, install) if request.get("override") else None
    users = [
        inspect_user(ws, user, install, mode or "installed", roots, table)
        for user in items(request.get("users"))
    ]
    return {
        "protocol": PROTOCOL,
        "op": "inspect",
        "ok": True,
        "host": {
            "computer": ws.computer,
            "ps_version": ws.ps_version,
            "free_bytes": ws.free_bytes,
            "language_mode": ws.language_mode,
        },
        "install": {
            "found": install.found,
            "dir": install.dir if install.per_user is None else install.per_user,
            "exe_path": install.exe_path,
            "source": install.source,
            "per_user": install.per_user is not None,
            "version": (
                exe_version(ws, install.exe_path)
                if install.exe_path is not None and install.per_user is None
                else None
            ),
        },
        "override": override,
        "users": users,
    }


def _not_installed() -> FileError:
    return FileError(
        "not-installed", "MicroSIP was not found where the inventory says, nor by registry or MSI."
    )


def inspect_override(ws: Workstation, install: Install) -> Json:
    """``Get-OverrideState``."""
    entry: Json = {"path": None}
    if install.per_user is not None:
        # No machine-wide folder: the enforced keys reach each user's file through the merge.
        entry.update({"per_user": True, "error": None})
        return entry
    try:
        if install.dir is None:
            raise _not_installed()
        path = join(install.dir, "override.ini")
        entry["path"] = path
        facts = file_facts(read_checked(ws, path, check_start(ws, path, None, [])))
        facts["read_only"] = ws.readonly(path)
        applied = read_state(ws, state_folder(None, "override.ini"), "applied")
        facts["applied"] = _applied_facts(applied, False)
        entry.update(facts)
        entry["error"] = None
    except FileError as failed:
        entry["error"] = error(failed.code, failed.message)
    return entry


def _applied_facts(data: bytes | None, legacy: bool) -> Json:
    return {
        "exists": data is not None,
        "sha256": _sha(data),
        "content_b64": _b64(data),
        "legacy": legacy and data is not None,
    }


def inspect_user(
    ws: Workstation,
    wanted: Json,
    install: Install,
    mode: str,
    roots: list[str],
    table: ProcessTable,
) -> Json:
    """``Get-UserState``: where this user's MicroSIP reads its ini, and what it holds."""
    entry: Json = {
        "name": wanted.get("name"),
        "windows": wanted.get("windows"),
        "sid": None,
        "profile": None,
        "appdata": None,
        "path": None,
    }
    try:
        if not install.found:
            raise _not_installed()
        account = ps_text(entry["windows"])
        if not account:
            raise FileError("no-account", "no Windows account is given for this user.")
        user = resolve_account(ws, account)
        entry["sid"] = user.sid
        if user.profile is None or not ws.is_dir(user.profile):
            raise FileError(
                "no-profile", f"{account} has no profile on this workstation (never logged on)."
            )
        entry["profile"] = user.profile
        hive = ws.read_hive(user)
        entry["appdata"] = roaming_appdata(hive)
        appdata = check_appdata(entry["appdata"], hive, roots)
        entry["appdata"] = appdata
        per_user = install.per_user is not None
        install = locate_for(ws, install, hive, appdata)
        assert install.dir is not None and install.exe_path is not None  # noqa: S101 - found
        # a per-user exe is read (its PE header) with its folders locked, as it was found
        exe_locks = Locks([])
        if is_within(install.exe_path, user.profile):
            exe_locks = lock_folders(ws, install.exe_path, normalize(user.profile))
        try:
            decided = ws.microsip_mode(hive, install.dir)
            # each user's own exe for a per-user install; the machine's is in install.version
            if per_user:
                entry["exe_version"] = exe_version(ws, install.exe_path)
        finally:
            unlock_folders(ws, exe_locks)
        entry["mode"], entry["mode_rule"], entry["mode_detail"] = (
            decided.mode,
            decided.rule,
            decided.detail,
        )
        if decided.mode != mode:
            raise FileError(
                "mode-mismatch",
                f"MicroSIP runs {decided.mode} for this user (rule {decided.rule}: "
                f"{decided.detail}); the inventory says {mode}.",
            )
        name = ini_name(install.exe)
        if decided.mode == "portable":
            path = join(install.dir, name)
        else:
            path = join(appdata, "MicroSIP", name)
        entry["path"] = path
        start = check_start(ws, path, user.sid, roots)
        assert_own_path(ws, path, user.sid)
        facts = file_facts(read_checked(ws, path, start))
        facts["read_only"] = ws.readonly(path)
        applied = read_state(ws, state_folder(user.sid, name), "applied")
        legacy = applied is None
        if legacy:
            applied = read_legacy(ws, path, start, "applied")
        facts["applied"] = _applied_facts(applied, legacy)
        facts["running"] = bool(table.of(user.sid))
        entry.update(facts)
        entry["error"] = None
    except FileError as failed:
        entry["error"] = error(failed.code, failed.message)
    return entry


# --- apply and rollback ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    """A file entry of an apply or rollback request, checked."""

    kind: str
    path: str
    sid: str
    process: str
    acl: Acl

    @property
    def folder(self) -> str:
        return parent(self.path)

    @property
    def name(self) -> str:
        return leaf(self.path)

    @property
    def folder_acl(self) -> Acl:
        return user_folder_acl(self.sid)


def parse_file(entry: Json) -> FileSpec:
    """``Test-FileRequest``."""
    kind, path, sid = (ps_text(entry.get(key)) for key in ("kind", "path", "sid"))
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
    return FileSpec(kind, full_path(path), sid, ps_text(entry.get("process")), acl)


def new_result(entry: Json) -> Json:
    """The answer item before anything happened."""
    return {
        "path": entry.get("path"),
        "status": "error",
        "old_sha256": None,
        "new_sha256": None,
        "backup": None,
        "stopped": 0,
        "error": None,
    }


def running_policy(
    ws: Workstation, spec: FileSpec, policy: str, result: Json, table: ProcessTable
) -> bool:
    """``Invoke-RunningPolicy``; False (and ``busy``) when the file must be left alone."""
    if spec.kind != "microsip" or not spec.process:
        return True
    running = table.of(spec.sid)
    if not running or policy == "force":
        return True
    if policy == "stop":
        result["stopped"] = ws.stop(running)
        table.refresh()
        if not table.of(spec.sid):
            return True
        text = f"{spec.process} still runs for this user 5 s after being stopped."
    else:
        text = f"{spec.process} is running for this user ({len(running)} process(es))."
    result["status"] = "busy"
    result["error"] = error("busy", text)
    return False


def _decode(entry: Json, name: str) -> bytes:
    try:
        return base64.b64decode(ps_text(entry.get(name)), validate=True)
    except binascii.Error:
        raise FileError("internal", f"'{name}' is not valid base64.") from None


@dataclass
class Prepared:
    """What the prelude of apply and rollback established for one file: its folders stay
    locked until :func:`unlock_folders` (the caller's ``finally``)."""

    state: StateFolder
    start: str
    locks: Locks
    replaced: bool = False
    """Whether :func:`write_managed` got as far as replacing the file."""


def prepare(ws: Workstation, spec: FileSpec, roots: list[str]) -> Prepared:
    """``Initialize-ManagedFile``: the folders locked and the path checked, stale files gone,
    the state opened and the legacy state migrated, a pending backup rotated in."""
    start = check_start(ws, spec.path, spec.sid or None, roots)
    if spec.kind == "microsip":
        assert_own_path(ws, spec.path, spec.sid)
    locks = lock_folders(ws, spec.path, start)
    try:
        state = state_folder(spec.sid or None, spec.name)
        open_state(ws, state)
        restore_interrupted(ws, spec, state)
        if ws.is_dir(spec.folder):
            remove_stale(ws, spec.folder, spec.name, ("tmp", "old"))
        migrate_legacy(ws, spec.path, start, state)
        for item in STATE_ITEMS:
            remove_stale(ws, state.folder, item, ("tmp",))
        settle_pending(ws, state, spec.path)
        if ws.readonly(spec.path):
            raise FileError("read-only", f"{spec.path} has the read-only attribute.")
    except BaseException:
        unlock_folders(ws, locks)
        raise
    return Prepared(state, start, locks)


def restore_interrupted(ws: Workstation, spec: FileSpec, state: StateFolder) -> None:
    """``Restore-Interrupted``: no file under its name, but its content waits as backup.new
    (written before every replace of an existing file) or as the .old of a replace that died
    half-way: put it back."""
    if ws.exists(spec.path):
        return
    pending = state.item(PENDING)
    if ws.exists(pending):
        put_back(ws, spec, pending, True)
        remove_unmade_write(ws, state, _sha(ws.read(pending)))
        ws.delete(pending)
        return
    old = re.compile(rf"^\.{re.escape(spec.name)}\.[0-9a-f]{{12}}\.old$", re.IGNORECASE)
    for entry in ws.listdir(spec.folder):
        candidate = join(spec.folder, entry)
        if old.match(entry) and is_plain_file(ws, candidate):
            ws.move(candidate, spec.path)  # a rename inside the locked folder
            remove_unmade_write(ws, state, _sha(read_held_file(ws, spec.path)))
            return


def write_managed(
    ws: Workstation,
    spec: FileSpec,
    content: bytes,
    old_backup: str | None,
    prepared: Prepared,
) -> bytes:
    """``Write-ManagedFile``: ``content`` replaces the file atomically with its final ACL;
    returns the bytes read back.

    The final ACL goes on the existing file first (``ReplaceFile`` keeps the replaced file's
    DACL), so the new content is never readable under a wider one; on the temp file too (a
    first write moves it); and is checked after. Each goes through a handle on the file, in
    folders the caller holds locked: a name swapped in between cannot redirect it. A failed
    replace leaves the old file; a failed ACL check puts the old content back from
    ``old_backup`` (a state file)."""
    temp: str | None = None
    try:
        if not ws.is_dir(spec.folder):
            # override.ini lives in the install folder: creating that would fake an install
            if spec.kind != "microsip":
                raise FileError(
                    "not-installed", f"the MicroSIP folder {spec.folder} does not exist."
                )
            ws.make_dir(spec.folder, spec.folder_acl)
            lock_folders(ws, spec.path, prepared.start, prepared.locks)
        had_file = ws.exists(spec.path)
        if had_file:
            held = open_plain(ws, spec.path)
            try:
                ws.set_held_acl(held, spec.acl)
            finally:
                ws.close(held)
        temp = _temp_name(spec.folder, spec.name)
        ws.write_new(temp, content, spec.acl, managed=True)
        if had_file:
            replace_file(ws, temp, spec)
        else:
            ws.move(temp, spec.path)
        temp = None
        prepared.replaced = True
        held = open_plain(ws, spec.path)
        try:
            if ws.held_acl(held) != spec.acl:
                with contextlib.suppress(FileError):
                    ws.set_held_acl(held, spec.acl)
                if ws.held_acl(held) != spec.acl:
                    ws.close(held)
                    put_back(ws, spec, old_backup, had_file)
                    raise FileError(
                        "acl-failed",
                        "the file's permissions could not be set after the write; the "
                        "previous content was put back.",
                    )
            return ws.read_held(held)
        finally:
            ws.close(held)
    except Crashed:
        temp = None  # the agent died: nothing removes its temp file
        raise
    finally:
        _discard(ws, temp)


def replace_file(ws: Workstation, temp: str, spec: FileSpec) -> None:
    """``Invoke-ReplaceFile``: ``ReplaceFile`` with a backup name beside the file, retried while
    another program holds it; after 1177 the old file is put back under its name."""
    old = _temp_name(spec.folder, spec.name, "old")
    for attempt in range(1, REPLACE_ATTEMPTS + 1):
        try:
            ws.replace(temp, spec.path, old)
            break
        except FileError as failed:
            if failed.win32 == ERROR_UNABLE_TO_MOVE_REPLACEMENT_2 and not ws.exists(spec.path):
                try:
                    ws.move(old, spec.path)
                except FileError:
                    # The previous content stays under the .old name; the next request puts
                    # it back.
                    raise FileError(
                        "locked",
                        f"the file could not be replaced (1177) nor put back yet; its previous "
                        f"content waits as {old}.",
                    ) from None
            held = failed.win32 in (ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION)
            if held and attempt < REPLACE_ATTEMPTS:
                continue  # the script waits 200 ms
            if failed.win32 in (1175, 1176, ERROR_UNABLE_TO_MOVE_REPLACEMENT_2):
                raise FileError(
                    "locked",
                    f"the file could not be replaced ({failed.win32}: {failed.message}); the "
                    "previous content is in place.",
                    win32=failed.win32,
                ) from None
            raise
    _discard(ws, old)


def put_back(ws: Workstation, spec: FileSpec, backup: str | None, had_file: bool) -> None:
    """The file's previous content again (from the state file ``backup``), or no file."""
    if not had_file:
        ws.delete(spec.path)
        return
    data = ws.read(backup) if backup is not None else None
    if data is None:
        return
    temp = _temp_name(spec.folder, spec.name)
    try:
        ws.write_new(temp, data, spec.acl)
        if ws.exists(spec.path):
            replace_file(ws, temp, spec)
        else:
            ws.move(temp, spec.path)
    except BaseException:
        _discard(ws, temp)
        raise


@dataclass
class Batch:
    """What every file of an apply or rollback request shares."""

    policy: str
    roots: list[str]
    table: ProcessTable
    run: str = ""
    """apply: the run its writes are recorded under."""


def _batch(ws: Workstation, request: Json, policy: str) -> tuple[Batch, list[Json]]:
    roots = [ps_text(r) for r in request.get("appdata_roots") or [] if ps_text(r)]
    entries = items(request.get("files"))
    image = next((ps_text(e.get("process")) for e in entries if ps_text(e.get("process"))), "")
    return Batch(policy, roots, ProcessTable(ws, image or "microsip.exe")), entries


def apply_files(ws: Workstation, request: Json, policy: str) -> Json:
    """``apply.ps1`` once its policy is checked: the run, then every file, independently and in
    order; the answer's fields. Raises :class:`Refused` for a run id it cannot record."""
    run = request_run(request)
    batch, entries = _batch(ws, request, policy)
    batch.run = run
    return {"files": [apply_file(ws, entry, batch) for entry in entries]}


def apply_file(ws: Workstation, entry: Json, batch: Batch) -> Json:
    """``Invoke-ApplyFile``: one file of an apply request."""
    result = new_result(entry)
    return reported(result, lambda: _apply(ws, entry, batch, result))


def _apply(ws: Workstation, entry: Json, batch: Batch, result: Json) -> None:
    spec = parse_file(entry)
    intended = ps_text(entry.get("sha256")).lower()
    # refused rather than guessed: a missing content would truncate the user's file
    if entry.get("content_b64") is None or not intended:
        raise FileError("internal", "the request gives no content_b64 or no sha256 for this file.")
    content = _decode(entry, "content_b64")
    prepared = prepare(ws, spec, batch.roots)
    try:
        _apply_prepared(ws, entry, batch, result, spec, content, intended, prepared)
    finally:
        unlock_folders(ws, prepared.locks)


def _apply_prepared(
    ws: Workstation,
    entry: Json,
    batch: Batch,
    result: Json,
    spec: FileSpec,
    content: bytes,
    intended: str,
    prepared: Prepared,
) -> None:
    state = prepared.state
    old = read_held_file(ws, spec.path)
    current = _sha(old)
    result["old_sha256"] = current
    expected = entry.get("expect_sha256")
    if current != (expected.lower() if isinstance(expected, str) else expected):
        result["status"] = "conflict"
        result["error"] = error("conflict", "the file changed since inspect.")
        return
    if not running_policy(ws, spec, batch.policy, result, batch.table):
        return
    # a file a user made in place of the tool's: its history starts anew
    user_made = old is not None and is_user_made(ws, spec.path)
    pending = state.item(PENDING)
    if old is not None:
        write_state_file(ws, state, PENDING, old)
    # recorded before the write: an agent that dies after the replace leaves the record
    history = read_state(ws, state, HISTORY)
    try:
        add_write_record(ws, state, batch.run, current, spec.path, user_made)
    except FileError:
        if old is not None:
            _discard(ws, pending)
        raise
    try:
        backup = pending if old is not None else None
        written_bytes = write_managed(ws, spec, content, backup, prepared)
    except FileError:
        # Until the replace happened backup.new is no generation yet, nor the write a write of
        # its run; once it has, or while the file is missing (a replace that died half-way),
        # backup.new is the only copy of the old content and stays for the next request to
        # rotate in or put back (which then settles the record too).
        if not prepared.replaced and ws.exists(spec.path) == (old is not None):
            if old is not None:
                _discard(ws, pending)
            restore_history(ws, state, history)
        raise
    written = _sha(written_bytes)
    result["new_sha256"] = written
    if written != intended:
        put_back(ws, spec, pending if old is not None else None, old is not None)
        _discard(ws, pending)
        undone = "the previous file was put back" if old is not None else "it was removed"
        restore_history(ws, state, history)
        raise FileError(
            "verify-failed",
            f"the file read back differs from the intended content; {undone}.",
        )
    if old is not None:
        # written and verified: a failed rotation leaves backup.new for the next request
        try:
            backups_down(ws, state)
            result["backup"] = state.item("backup.1")
        except FileError:
            result["backup"] = pending
    if entry.get("applied_b64") is not None:
        try:
            write_state_file(ws, state, "applied", _decode(entry, "applied_b64"))
        except FileError as failed:
            # the file itself is written: say so, or nothing would seem to have changed
            raise FileError(
                failed.code,
                f"the file was written, but not its applied copy: {failed.message}",
            ) from None
    result["status"] = "written"


def read_held_file(ws: Workstation, path: str) -> bytes | None:
    """``Read-HeldFile``: a file of a locked folder, read through a handle after its name is
    checked (None when absent)."""
    if not ws.exists(path):
        return None
    handle = open_plain(ws, path)
    try:
        return ws.read_held(handle)
    finally:
        ws.close(handle)


def reported(result: Json, step: Callable[[], None]) -> Json:
    """The answer item of one file: a failure is reported in it, never raised (but a crash)."""
    try:
        step()
    except Crashed:
        raise
    except FileError as failed:
        result["status"] = "error"
        result["error"] = error(failed.code, failed.message)
    except OSError as failed:
        result["status"] = "error"
        result["error"] = error("internal", f"{failed.strerror or failed}.")
    return result


# --- rollback -------------------------------------------------------------------------------------


def last_write(ws: Workstation, spec: FileSpec) -> Write | None:
    """``Get-LastWrite``: the first entry of the file's history. A state an older agent kept
    (no history) counts its backup.1 as the write of a run older than any recorded one."""
    state = state_folder(spec.sid or None, spec.name)
    history = read_history(ws, state)
    if history is not None:
        return history[0] if history else None
    if read_state(ws, state, "backup.1") is None:
        return None
    return Write(0, "", "replaced", "-", "")


def find_last_write(ws: Workstation, spec: FileSpec, roots: list[str]) -> Write | None:
    """``Find-LastWrite``: :func:`last_write` once a write whose agent died is settled (a
    backup.new waits): it may not have happened. Best effort."""
    if read_state(ws, state_folder(spec.sid or None, spec.name), PENDING) is not None:
        with contextlib.suppress(FileError):
            unlock_folders(ws, prepare(ws, spec, roots).locks)
    return last_write(ws, spec)


def rollback_files(ws: Workstation, request: Json, policy: str) -> Json:
    """``rollback.ps1`` once its policy is checked: each file's last write, then the newest of
    them; its run is undone, file by file and in order. The answer's fields."""
    batch, entries = _batch(ws, request, policy)
    found: list[tuple[Json, FileSpec | None, Write | None]] = []
    for entry in entries:
        result = new_result(entry)
        spec: FileSpec | None = None
        write: Write | None = None
        try:
            spec = parse_file(entry)
            write = find_last_write(ws, spec, batch.roots)
        except FileError as failed:
            spec = None
            result["error"] = error(failed.code, failed.message)
        found.append((result, spec, write))
    newest: Write | None = None
    for _, _, write in found:
        if write is not None and (newest is None or write.ticks > newest.ticks):
            newest = write
    for result, spec, write in found:
        if spec is None:
            continue
        if newest is None or write is None or write.run != newest.run:
            result["status"] = "unchanged"
            continue
        reported(result, functools.partial(_undo, ws, spec, newest.run, batch, result))
    return {
        "run": newest.run if newest is not None and newest.run else None,
        "files": [result for result, _, _ in found],
    }


def _undo(ws: Workstation, spec: FileSpec, run: str, batch: Batch, result: Json) -> None:
    """``Invoke-UndoFile``."""
    prepared = prepare(ws, spec, batch.roots)
    try:
        # looked at again with the folders locked and the state settled
        write = last_write(ws, spec)
        if write is None or write.run != run:
            result["status"] = "unchanged"
            return
        if write.path and path_key(write.path) != path_key(spec.path):
            raise _unsafe(f"run {run} wrote {write.path}, not {spec.path}; nothing was changed.")
        if write.action == "created":
            _remove_created(ws, spec, prepared, batch, result)
        else:
            _restore_replaced(ws, spec, prepared, batch, result, write)
        if result["status"] not in ("removed", "restored"):
            return
        remove_last_write(ws, prepared.state)
        # without a merge base the next push treats the file as new
        _discard(ws, prepared.state.item("applied"))
    finally:
        unlock_folders(ws, prepared.locks)


def is_user_made(ws: Workstation, path: str) -> bool:
    """``Test-UserMade``: the file is owned by anybody but SYSTEM, Administrators or the agent
    (every write of the tool leaves it owned by Administrators). Through a handle."""
    handle = open_plain(ws, path)
    try:
        return ws.owner(path) not in _OWNERS
    finally:
        ws.close(handle)


def read_own_file(ws: Workstation, path: str) -> bytes:
    """``Read-OwnFile``: the bytes of a file the agent created, read through a handle; a file a
    user made in its place is theirs, and refused."""
    handle = open_plain(ws, path)
    try:
        owner = ws.owner(path)
        if owner not in _OWNERS:
            raise _unsafe(
                f"{path} is owned by {owner}: not the file the tool created; nothing was removed."
            )
        return ws.read_held(handle)
    finally:
        ws.close(handle)


def _remove_created(
    ws: Workstation, spec: FileSpec, prepared: Prepared, batch: Batch, result: Json
) -> None:
    """``Invoke-PreparedRemoval``: the run created the file; it goes, kept as rolled-back.
    Checked before anybody's MicroSIP is stopped, and again through the handle it is read
    with."""
    rolled = prepared.state.item("rolled-back")
    if not ws.exists(spec.path):
        _discard(ws, rolled)
        result["status"] = "removed"
        return
    read_own_file(ws, spec.path)
    if not running_policy(ws, spec, batch.policy, result, batch.table):
        return
    old = read_own_file(ws, spec.path)
    result["old_sha256"] = _sha(old)
    try:
        write_state_file(ws, prepared.state, "rolled-back", old)
        result["backup"] = rolled
        # a name in a locked folder, checked again: deleting it never reaches another file
        assert_safe_path(ws, spec.path, prepared.start)
        ws.delete(spec.path)
    except FileError:
        result["backup"] = None
        _discard(ws, rolled)
        raise
    result["status"] = "removed"


def _restore_replaced(
    ws: Workstation,
    spec: FileSpec,
    prepared: Prepared,
    batch: Batch,
    result: Json,
    write: Write,
) -> None:
    """``Invoke-PreparedRestore``: the run replaced the file; backup.1, which must hold what it
    replaced, goes back."""
    state = prepared.state
    backup = state.item("backup.1")
    content = ws.read(backup)
    if content is None:
        raise FileError("no-backup", f"there is no backup of {spec.path} to restore.")
    if write.before != "-" and _sha(content) != write.before:
        raise FileError(
            "no-backup",
            f"the backup of {spec.path} is not what run {write.run} replaced; nothing was "
            "restored.",
        )
    if not running_policy(ws, spec, batch.policy, result, batch.table):
        return
    old = read_held_file(ws, spec.path)
    rolled = state.item("rolled-back")
    previous = rolled if old is not None else None
    try:
        if old is not None:
            result["old_sha256"] = _sha(old)
            write_state_file(ws, state, "rolled-back", old)
            result["backup"] = rolled
        else:
            _discard(ws, rolled)
        written = write_managed(ws, spec, content, previous, prepared)
        if written != content:
            put_back(ws, spec, previous, old is not None)
            raise FileError(
                "verify-failed",
                "the file read back differs from the backup; the previous content was put back.",
            )
    except FileError:
        result["backup"] = None
        if ws.exists(spec.path):
            _discard(ws, rolled)
        raise
    ws.delete(backup)
    backups_up(ws, state)
    result["new_sha256"] = _sha(written)
    result["status"] = "restored"
