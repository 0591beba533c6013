"""An emulated Windows workstation: accounts and their hives, MicroSIP's install facts, processes.

The files live on an emulated NTFS (:mod:`provisioner.lab.ntfs`, which this class extends):
owners, DACLs with inheritance, junctions, symbolic and hard links, the read-only attribute and
``ReplaceFile``'s documented results, on a real folder. The agent (``provisioner.lab.agent``)
writes a temp file in the target folder and moves or replaces it, so a managed file is at every
moment either its old or its new content, byte for byte.

What the agent may learn about the machine goes through the facts a PowerShell script can query:
accounts (``NTAccount.Translate``, which does not resolve ``.\\name``), ``ProfileList``, the
user's hive (loaded while they are logged on; otherwise readable from a copy of ``NTUSER.DAT``
unless it is in use or absent), the default values of ``HKCU`` and ``HKLM\\Software\\MicroSIP``,
the MSI products, the processes (one query per request is what the agent should cost), the
PowerShell language mode, and the files.

Typical use::

    ws = Workstation(tmp_path / "ws1", computer="BER-WS-001")
    alice = ws.add_user("ACME\\alice")
    ws.add_user("ACME\\bob", has_profile=False)        # account, but no profile
    ws.install_microsip("installed")                    # registry value set, exe created
    ws.start_microsip(alice)
    ws.faults.locked.add(ws.ini_path(alice))
    ws.make_link("C:\\Users\\alice\\AppData\\Roaming\\MicroSIP", "C:\\Windows\\Tasks")
    host.state = ws                                     # a Lab host running LabAgent
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from provisioner.lab.ntfs import (
    ADMINISTRATORS,
    AUTHENTICATED_USERS,
    CREATOR_OWNER,
    EVERYONE,
    SYSTEM,
    USERS,
    Ace,
    Acl,
    Crashed,
    FileError,
    FileSystem,
    Rights,
    WorkstationFaults,
    corrupt,
    is_within,
    join,
    leaf,
    parent,
    path_key,
    protected_acl,
)

__all__ = [
    "ADMINISTRATORS",
    "AGENT_ACCOUNT",
    "AUTHENTICATED_USERS",
    "CREATOR_OWNER",
    "DOMAIN_SID",
    "EVERYONE",
    "MACHINE_SID",
    "OVERRIDE_ACL",
    "STATE_ACL",
    "STATE_ROOT",
    "SYSTEM",
    "SYSTEM_VARIABLES",
    "USERS",
    "WELL_KNOWN_ACCOUNTS",
    "Ace",
    "Acl",
    "Crashed",
    "FileError",
    "Install",
    "LanguageMode",
    "Mode",
    "MsiProduct",
    "Process",
    "Rights",
    "User",
    "Workstation",
    "WorkstationFaults",
    "corrupt",
    "expand",
    "ini_name",
    "join",
    "leaf",
    "parent",
    "path_key",
    "state_folder_acl",
    "user_file_acl",
    "user_folder_acl",
]

Mode = Literal["installed", "portable"]
LanguageMode = Literal["FullLanguage", "ConstrainedLanguage", "RestrictedLanguage", "NoLanguage"]

DOMAIN_SID = "S-1-5-21-1000-2000-3000"
"""The domain's SID prefix; domain accounts get ``<prefix>-<rid>``."""
MACHINE_SID = "S-1-5-21-4000-5000-6000"
"""This machine's SID prefix; local accounts get ``<prefix>-<rid>``."""
AGENT_ACCOUNT = f"{DOMAIN_SID}-500"
"""The account the agent runs as (the WinRM administrator). What it creates is owned by
Administrators, as an elevated administrator's objects are; it still trusts its own."""

SYSTEM_VARIABLES = {
    "SystemDrive": "C:",
    "SystemRoot": "C:\\Windows",
    "windir": "C:\\Windows",
    "ProgramData": "C:\\ProgramData",
    "ALLUSERSPROFILE": "C:\\ProgramData",
    "PUBLIC": "C:\\Users\\Public",
    "ProgramFiles": "C:\\Program Files",
    "ProgramFiles(x86)": "C:\\Program Files (x86)",
}
"""Machine-wide environment variables a shell folder or install folder may use."""

STATE_ROOT = "C:\\ProgramData\\MicroSIP-provisioner"
"""Where the agent keeps its merge bases and backups (docs/agent-protocol.md)."""

_EXE_IMAGE = b"MZ\x90\x00lab MicroSIP stand-in\r\n"
LAB_MICROSIP_VERSION = "3.22.3"
"""The file version of the exe the lab installs unless told otherwise."""
_VERSION_KEY = "FileVersion\0".encode("utf-16-le")
_VARIABLE = re.compile(r"%([^%\\]+)%")


def exe_image(version: str | None = LAB_MICROSIP_VERSION) -> bytes:
    """The lab's stand-in for ``microsip.exe``: its version resource holds ``version`` as the
    ``FileVersion`` string (UTF-16LE, NUL-terminated, as in a real one); None: no resource."""
    if version is None:
        return _EXE_IMAGE
    return _EXE_IMAGE + _VERSION_KEY + (version + "\0").encode("utf-16-le", "surrogatepass")


def image_version(image: bytes) -> str | None:
    """What ``FileVersionInfo.FileVersion`` gives for an exe's bytes (None: no resource)."""
    start = image.find(_VERSION_KEY)
    if start < 0:
        return None
    text = image[start + len(_VERSION_KEY) :]
    end = next((i for i in range(0, len(text) - 1, 2) if text[i : i + 2] == b"\0\0"), len(text))
    return text[: end - end % 2].decode("utf-16-le", "replace")


def user_file_acl(sid: str) -> Acl:
    """``microsip.ini``: full control for the user, SYSTEM and Administrators; protected."""
    return protected_acl({sid: "FullControl", SYSTEM: "FullControl", ADMINISTRATORS: "FullControl"})


def user_folder_acl(sid: str) -> Acl:
    """A MicroSIP folder the agent creates for a user: as the file, inherited by its contents."""
    rights: dict[str, Rights] = {sid: "FullControl", SYSTEM: "FullControl"}
    rights[ADMINISTRATORS] = "FullControl"
    return protected_acl(rights, folder=True)


OVERRIDE_ACL = protected_acl(
    {SYSTEM: "FullControl", ADMINISTRATORS: "FullControl", USERS: "ReadAndExecute"}
)
"""``override.ini``: full control for SYSTEM and Administrators, read (and execute) for Users."""

WELL_KNOWN_ACCOUNTS = {
    SYSTEM: "NT AUTHORITY\\SYSTEM",
    ADMINISTRATORS: "BUILTIN\\Administrators",
    USERS: "BUILTIN\\Users",
    EVERYONE: "Everyone",
    AUTHENTICATED_USERS: "NT AUTHORITY\\Authenticated Users",
    CREATOR_OWNER: "CREATOR OWNER",
}
"""The names Windows shows for the well-known SIDs the lab uses."""

STATE_ACL = protected_acl({SYSTEM: "FullControl", ADMINISTRATORS: "FullControl"})
"""Every file of the agent's state: SYSTEM and Administrators only."""


def state_folder_acl() -> Acl:
    """The agent's state folders: SYSTEM and Administrators only, inherited by their contents."""
    return protected_acl({SYSTEM: "FullControl", ADMINISTRATORS: "FullControl"}, folder=True)


def ini_name(exe: str) -> str:
    """MicroSIP's ini name: the exe base name without its extension, plus ``.ini``."""
    base, dot, _ = exe.rpartition(".")
    return f"{base if dot else exe}.ini"


def image_name(name: str) -> str:
    """A process's image name as ``Win32_Process.Name`` gives it: with its ``.exe``."""
    return name if name.casefold().endswith(".exe") else f"{name}.exe"


def _same_image(process: str, wanted: str) -> bool:
    # The agent's WQL filter compares the whole name (case-insensitively).
    return image_name(process).casefold() == image_name(wanted).casefold()


def expand(raw: str, variables: dict[str, str]) -> str:
    """``%NAME%`` replaced case-insensitively; an unknown one is left as written."""
    folded = {name.casefold(): value for name, value in variables.items()}
    return _VARIABLE.sub(lambda m: folded.get(m.group(1).casefold(), m.group(0)), raw)


# --- accounts, install facts, processes ---------------------------------------------------------


@dataclass(eq=False)
class User:
    """A Windows account known to the workstation, and what its hive holds.

    ``profile`` is ``ProfileList\\<SID>\\ProfileImagePath`` (None: never logged on here).
    ``shell_appdata`` is the raw ``User Shell Folders\\AppData`` value of the user's hive (None:
    absent, so ``%USERPROFILE%\\AppData\\Roaming``); ``hkcu_microsip`` the default value of
    ``HKCU\\Software\\MicroSIP``. The hive is in ``HKU\\<SID>`` while ``hive_loaded`` (the user is
    logged on); otherwise it is the file ``NTUSER.DAT`` in the profile, which the agent reads
    from a copy, and which is absent when ``hive_file`` is False (a profile disk or a roaming
    profile that is not on the machine while the user is logged off).
    """

    domain: str
    sam: str
    sid: str
    profile: str | None
    shell_appdata: str | None = None
    hive_loaded: bool = False
    hkcu_microsip: str | None = None
    hive_file: bool = True

    @property
    def windows(self) -> str:
        """``DOMAIN\\sam``."""
        return f"{self.domain}\\{self.sam}"

    def variables(self) -> dict[str, str]:
        """The environment variables of the user's logon, as far as the workstation knows them."""
        if self.profile is None:
            return dict(SYSTEM_VARIABLES)
        return {
            **SYSTEM_VARIABLES,
            "USERPROFILE": self.profile,
            "USERDOMAIN": self.domain,
            "USERNAME": self.sam,
            "APPDATA": self.appdata or "",
            "LOCALAPPDATA": f"{self.profile}\\AppData\\Local",
        }

    @property
    def appdata(self) -> str | None:
        """The roaming AppData folder MicroSIP uses for this user (None without a profile).

        The raw shell folder value expanded with the user's variables; one that stays
        unexpanded (``%FOO%``) is left in place.
        """
        if self.profile is None:
            return None
        if not self.shell_appdata:
            return f"{self.profile}\\AppData\\Roaming"
        variables = {
            **SYSTEM_VARIABLES,
            "USERPROFILE": self.profile,
            "USERDOMAIN": self.domain,
            "USERNAME": self.sam,
        }
        return expand(self.shell_appdata, variables)


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
    """An installed MSI product: its name, ``InstallLocation``, and the SID of the user it was
    installed for (None: per machine)."""

    name: str
    install_location: str
    user_sid: str | None = None


@dataclass
class Process:
    """A running process: image name and owner SID."""

    pid: int
    name: str
    sid: str
    running: bool = True


@dataclass(frozen=True)
class ModeDecision:
    """Installed or portable for one user, and the rule of MicroSIP's that decided it."""

    mode: Mode
    rule: Literal["hkcu", "hklm", "msi", "msi-any-location", "none"]
    detail: str


@dataclass
class ProcessQueries:
    """How many process queries and owner lookups the agent made (the RDS cost)."""

    queries: int = 0
    owner_lookups: int = 0


# --- the workstation ----------------------------------------------------------------------------


class Workstation(FileSystem):
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
        super().__init__(root)
        self.computer = computer.upper()
        self.domain = domain.upper()
        self.ps_version = ps_version
        self.free_bytes = free_bytes
        self.language_mode: LanguageMode = "FullLanguage"
        self.module_logging = False
        """PowerShell Module Logging for every module (``*``): cmdlet parameters to the log."""
        self.event_log: list[str] = []
        """What the PowerShell Operational log recorded (event 4103), in order."""
        self.answer_filter: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        """A broken or foreign agent on this machine: every answer passes through this before it
        is written (tests use it to answer off the contract). None: the packaged agent's."""
        self.users: list[User] = []
        self.install: Install | None = None
        self.hklm_microsip: str | None = None
        """Default value of ``HKLM\\Software\\MicroSIP`` in the registry view of MicroSIP's
        bitness (None: absent)."""
        self.msi_products: list[MsiProduct] = []
        self.processes: list[Process] = []
        self.stopped: list[Process] = []
        """Processes the agent stopped, in order."""
        self.process_queries = ProcessQueries()
        self.hives_read: list[str] = []
        """SIDs whose offline hive the agent read (from a copy of ``NTUSER.DAT``), in order."""
        self.hive_locked: set[str] = set()
        """SIDs whose ``NTUSER.DAT`` cannot be copied just now (the user is logging on)."""
        self.hive_denied: set[str] = set()
        """SIDs whose ``NTUSER.DAT`` denies the agent reading it (its owner removed
        Administrators from its DACL): no retry will help."""
        self._next_rid = {"domain": 1104, "local": 1001}
        self._next_pid = 4100
        self._system_folders()

    def __repr__(self) -> str:
        return f"Workstation({self.computer} at {self.root})"

    def _system_folders(self) -> None:
        """The Windows defaults the agent meets: who may create what where."""
        everyone_reads: dict[str, Rights] = {
            SYSTEM: "FullControl",
            ADMINISTRATORS: "FullControl",
            USERS: "ReadAndExecute",
        }
        self.put_dir("C:\\", protected_acl(everyone_reads, folder=True), owner=SYSTEM)
        for folder in ("C:\\Users", "C:\\Program Files", "C:\\Windows", "C:\\Windows\\System32"):
            self.put_dir(folder, protected_acl(everyone_reads, folder=True), owner=SYSTEM)
        # C:\ProgramData: Users may create files and folders and own what they create.
        program_data = Acl(
            (
                Ace(CREATOR_OWNER, "FullControl", "children"),
                Ace(SYSTEM, "FullControl", "all"),
                Ace(ADMINISTRATORS, "FullControl", "all"),
                Ace(USERS, "ReadAndExecute", "all"),
                Ace(USERS, "Write", "folders"),
            )
        )
        self.put_dir("C:\\ProgramData", program_data, owner=SYSTEM)

    def free_space(self) -> int:
        """Bytes free on the system drive."""
        return self.free_bytes

    def default_owner(self, path: str) -> str:
        """Objects in a user's profile belong to that user; elsewhere to Administrators."""
        for user in self.users:
            inside = user.profile is not None and is_within(path, user.profile)
            if inside and path_key(path) != path_key(user.profile or ""):
                return user.sid
        return ADMINISTRATORS

    # --- set-up ---------------------------------------------------------------------------

    def add_user(
        self,
        windows: str,
        *,
        rid: int | None = None,
        sid: str | None = None,
        has_profile: bool = True,
        profile: str | None = None,
        shell_appdata: str | None = None,
        hive_loaded: bool = False,
        hkcu_microsip: str | None = None,
        hive_file: bool = True,
    ) -> User:
        """Create an account (``ACME\\alice`` or ``.\\kiosk``) and, if ``has_profile``, its profile.

        Its SID is ``sid`` when given, else the domain's (or this machine's) prefix and ``rid``,
        else the next RID no account has.
        The profile defaults to ``C:\\Users\\<sam>``: its folder (protected: the user, SYSTEM and
        Administrators), ``NTUSER.DAT`` (unless ``hive_file`` is False) and the roaming AppData
        folder when it lies inside the profile (owned by the user, inheriting).
        """
        domain, sep, sam = windows.rpartition("\\")
        if not sep or not sam or not domain:
            raise ValueError(f"{windows!r}: use DOMAIN\\name or .\\name")
        local = domain == "." or domain.upper() == self.computer
        domain = self.computer if local else domain.upper()
        if self.find_account(domain, sam) is not None:
            raise ValueError(f"{windows!r} exists already")
        kind = "local" if local else "domain"
        prefix = MACHINE_SID if local else DOMAIN_SID
        taken = {user.sid for user in self.users}
        if sid is None and rid is None:
            while f"{prefix}-{self._next_rid[kind]}" in taken:
                self._next_rid[kind] += 1
            rid = self._next_rid[kind]
            self._next_rid[kind] += 1
        if sid is None:
            sid = f"{prefix}-{rid}"
        if sid in taken:
            raise ValueError(f"SID {sid} is taken")
        home = (profile or f"C:\\Users\\{sam}") if has_profile else None
        user = User(domain, sam, sid, home, shell_appdata, hive_loaded, hkcu_microsip, hive_file)
        self.users.append(user)
        if user.profile is not None:
            rights: dict[str, Rights] = {SYSTEM: "FullControl", ADMINISTRATORS: "FullControl"}
            rights[sid] = "FullControl"
            self.put_dir(user.profile, protected_acl(rights, folder=True), owner=SYSTEM)
            if hive_file:
                self.put(join(user.profile, "NTUSER.DAT"), b"regf lab hive\r\n", owner=sid)
            appdata = user.appdata or ""
            try:
                inside = "%" not in appdata and is_within(appdata, user.profile)
            except FileError:  # no plain path ('..' in it): the agent judges the raw value
                inside = False
            if inside:
                self.put_dir(appdata)
        return user

    def install_microsip(
        self,
        mode: Mode = "installed",
        *,
        install_dir: str = "C:\\Program Files\\MicroSIP",
        exe: str = "microsip.exe",
        registry: bool | None = None,
        msi: bool = False,
        version: str | None = LAB_MICROSIP_VERSION,
    ) -> Install:
        """Put the exe (its file version ``version``, None: no version resource) in
        ``install_dir``; the HKLM default value defaults to installed mode."""
        install = Install(mode, install_dir.rstrip("\\/"), exe)
        self.put_dir(install.install_dir)
        self.put(install.exe_path, exe_image(version))
        self.install = install
        if registry if registry is not None else mode == "installed":
            self.hklm_microsip = install.install_dir
        if msi:
            self.msi_products.append(MsiProduct("MicroSIP", install.install_dir))
        return install

    def uninstall_microsip(self) -> None:
        """Remove the install folder, the registry value and the MSI product."""
        if self.install is not None:
            self.remove_tree(self.install.install_dir)
        self.install = None
        self.hklm_microsip = None
        self.msi_products = [p for p in self.msi_products if p.name.casefold() != "microsip"]

    def start_microsip(self, user: User | str, name: str | None = None) -> Process:
        """Start a MicroSIP process owned by ``user`` (a User or a SID)."""
        sid = user.sid if isinstance(user, User) else user
        image = image_name(name or (self.install.exe if self.install else "microsip.exe"))
        process = Process(self._next_pid, image, sid)
        self._next_pid += 4
        self.processes.append(process)
        return process

    @property
    def running_sids(self) -> set[str]:
        """SIDs that own a running MicroSIP-like process (any image name)."""
        return {p.sid for p in self.processes if p.running}

    def microsip_mode(self, user: User, exe_dir: str | None = None) -> ModeDecision:
        """Installed or portable, as MicroSIP 3.22.3 decides it for ``user`` (``settings.cpp``,
        ``AccountSettings::Init``): the default value of ``HKCU\\Software\\MicroSIP``, else of
        ``HKLM\\Software\\MicroSIP``; when that is empty or not the exe's folder, the first MSI
        product named MicroSIP (its ``InstallLocation`` without a trailing backslash, or the
        exe's folder when empty). Installed when the result equals the exe's folder, compared
        case-insensitively and exactly (a registry value with a trailing backslash never does).
        """
        folder = exe_dir or (self.install.install_dir if self.install else "")
        value, rule = user.hkcu_microsip or "", "hkcu"
        if not value:
            value, rule = self.hklm_microsip or "", "hklm"
        seen = f"HKCU={user.hkcu_microsip!r} HKLM={self.hklm_microsip!r}"
        if not value or value.casefold() != folder.casefold():
            for product in self.msi_products_for(user.sid):
                if product.name.casefold() == "microsip":
                    location = product.install_location
                    value = location.rstrip("\\") if location else folder
                    rule = "msi" if location else "msi-any-location"
                    seen += f" MSI InstallLocation={location!r}"
                    break
        if value and value.casefold() == folder.casefold():
            return ModeDecision("installed", rule, seen)  # type: ignore[arg-type]
        return ModeDecision("portable", "none", seen)

    def msi_products_for(self, sid: str) -> list[MsiProduct]:
        """The products ``MsiEnumProducts`` lists when run as ``sid``: per machine and theirs."""
        return [p for p in self.msi_products if p.user_sid in (None, sid)]

    def ini_path(self, user: User) -> str:
        """Where this user's MicroSIP reads its ini, given the install facts."""
        if self.install is None:
            raise ValueError("MicroSIP is not installed")
        if self.microsip_mode(user).mode == "portable":
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
    def state_path(owner: User | str | None, name: str, item: str = "") -> str:
        """``<state root>\\users\\<SID>\\<name>\\<item>`` for a user's ini (``owner`` a User or
        SID), ``<state root>\\machine\\<name>\\<item>`` for the workstation's override.ini."""
        sid = owner.sid if isinstance(owner, User) else owner
        folder = join(STATE_ROOT, "users", sid) if sid else join(STATE_ROOT, "machine")
        return join(folder, name, item) if item else join(folder, name)

    def state_for(self, path: str, item: str) -> str:
        """:meth:`state_path` of the managed file at ``path`` (a user's ini or override.ini)."""
        if self.install is not None and path_key(path) == path_key(self.override_path()):
            return self.state_path(None, leaf(path), item)
        for user in self.users:
            with contextlib.suppress(ValueError, FileError):
                if path_key(self.ini_path(user)) == path_key(path):
                    return self.state_path(user, leaf(path), item)
        raise ValueError(f"{path} is no managed file of {self.computer}")

    @staticmethod
    def legacy_state_path(path: str, item: str) -> str:
        """``<folder>\\.provisioner\\<name>\\<item>``: where agents before the ProgramData state
        kept the merge base and backups of ``path``."""
        return join(parent(path), ".provisioner", leaf(path), item)

    # --- queries the agent makes ----------------------------------------------------------

    def find_account(self, domain: str, sam: str) -> User | None:
        """The account ``domain\\sam`` (the computer name for local accounts)."""
        for user in self.users:
            if (
                user.sam.casefold() == sam.casefold()
                and user.domain.casefold() == domain.casefold()
            ):
                return user
        return None

    def lookup_account(self, name: str) -> User | None:
        """``NTAccount.Translate``: ``DOMAIN\\sam`` or a bare ``sam`` (local accounts first).
        ``.\\sam`` does not resolve: Windows knows no domain named ``.``."""
        domain, sep, sam = name.rpartition("\\")
        if sep:
            return self.find_account(domain, sam)
        candidates = [u for u in self.users if u.sam.casefold() == sam.casefold()]
        candidates.sort(key=lambda u: u.domain != self.computer)
        return candidates[0] if candidates else None

    def user(self, name: str) -> User | None:
        """The account an inventory names (``.\\name`` is this computer's): for set-up and
        assertions; the agent itself goes through :meth:`lookup_account`."""
        if name.startswith(".\\"):
            name = f"{self.computer}\\{name[2:]}"
        return self.lookup_account(name)

    def account_of(self, sid: str) -> User | None:
        """The account whose SID is ``sid``."""
        return next((user for user in self.users if user.sid == sid), None)

    def account_name(self, sid: str) -> str | None:
        """``DOMAIN\\name`` of an account of this machine or a well-known SID (None: unknown)."""
        account = self.account_of(sid)
        return account.windows if account is not None else WELL_KNOWN_ACCOUNTS.get(sid)

    def profile_of(self, sid: str) -> User | None:
        """The user whose ``ProfileList`` entry exists for ``sid``."""
        for user in self.users:
            if user.sid == sid and user.profile is not None:
                return user
        return None

    def process_table(self, image: str) -> list[Process]:
        """One ``Win32_Process`` query for ``image`` and one ``GetOwnerSid`` per match."""
        found = [p for p in self.processes if p.running and _same_image(p.name, image)]
        self.process_queries.queries += 1
        self.process_queries.owner_lookups += len(found)
        return found

    def processes_of(self, sid: str, image: str) -> list[Process]:
        """Running processes named like ``image`` owned by ``sid`` (no query is counted)."""
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

    def read_hive(self, user: User) -> User:
        """The user's hive as the agent reads it: loaded, or from a copy of ``NTUSER.DAT``.

        Raises ``no-profile`` when the file is absent, ``locked`` while it is in use (sharing
        violation) and ``unsafe-path`` when its DACL denies the agent.
        """
        if user.hive_loaded:
            return user
        if user.profile is None or not user.hive_file:
            raise FileError(
                "no-profile",
                f"{user.windows} is logged off and their registry hive is not on this "
                "workstation (profile disk or roaming profile).",
            )
        if user.sid in self.hive_locked:
            raise FileError(
                "locked",
                f"The registry hive of {user.windows} is in use (a logon or logoff is under "
                "way); try again.",
            )
        if user.sid in self.hive_denied:
            raise FileError(
                "unsafe-path",
                f"cannot read the registry hive of {user.windows}: Access to the path "
                f"'{user.profile}\\NTUSER.DAT' is denied.",
            )
        self.hives_read.append(user.sid)
        return user
