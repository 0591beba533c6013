"""A lab scenario: how each emulated workstation differs from what the inventory implies.

``provisioner lab up --scenario FILE`` reads a YAML file (docs/lab.md describes every key)
that says, per inventory workstation, what its emulated machine has that the default does not:
accounts with given SIDs, profile paths and hive states, AppData redirected, MicroSIP's install
facts, the PowerShell version and language mode, remote shells disabled, shares, files and
folders with owners, DACLs and the read-only attribute, junctions and links made by a user,
locked files and the Win32 errors ``ReplaceFile`` fails with. The default is what
:func:`provisioner.lab.inventory_lab.start_inventory_lab` builds from the inventory alone.

:func:`load_scenario` checks the whole file against the inventory and reports every problem
at ``file:line:column`` (no machine is touched before the file is right); a
:class:`WorkstationSetup` then builds the machine from the default :class:`WorkstationSpec`
with its install facts, adds every account and applies the rest to the :class:`Workstation`
and its host, and reports what cannot be set up at its line too. A scenario never holds a
password: file contents in it are test data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

from provisioner.errors import InventoryError, LintError
from provisioner.inventory import winpath, yamldoc
from provisioner.inventory.loader import InventoryErrors
from provisioner.inventory.model import Inventory
from provisioner.inventory.names import did_you_mean, unknown
from provisioner.inventory.schema import join_pointer
from provisioner.lab import ntfs
from provisioner.lab.fleet import UserSpec, WorkstationSpec, add_account, add_workstation
from provisioner.lab.host import HostConfig, LabHost
from provisioner.lab.server import Lab
from provisioner.lab.workstation import (
    DOMAIN_SID,
    MACHINE_SID,
    WELL_KNOWN_ACCOUNTS,
    Ace,
    Acl,
    FileError,
    LanguageMode,
    MsiProduct,
    Rights,
    Workstation,
    exe_image,
)
from provisioner.microsip import ini

TOP_KEYS = ("workstations",)
WORKSTATION_KEYS = (
    "users",
    "microsip",
    "powershell",
    "remote_shells",
    "shares",
    "paths",
    "locked",
    "replace_errors",
)
USER_KEYS = (
    "sid",
    "profile",
    "logged_on",
    "ntuser_dat",
    "hive_in_use",
    "appdata",
    "hkcu",
    "running",
)
MICROSIP_KEYS = ("mode", "install_dir", "exe", "hklm", "msi", "version")
MSI_KEYS = ("location", "user")
POWERSHELL_KEYS = ("version", "language_mode")
PATH_KINDS = ("folder", "content", "junction", "symlink", "hardlink")
PATH_KEYS = (*PATH_KINDS, "encoding", "owner", "acl", "inherit", "read_only")
MODES = ("installed", "portable", "absent")
LANGUAGE_MODES: tuple[LanguageMode, ...] = (
    "FullLanguage",
    "ConstrainedLanguage",
    "RestrictedLanguage",
    "NoLanguage",
)
ENCODINGS = ("utf-8", "utf-16")
RIGHTS: tuple[Rights, ...] = ("FullControl", "Modify", "ReadAndExecute", "Write")
SCOPES: tuple[ntfs.Scope, ...] = ("object", "all", "children", "folders")
REPLACE_ERRORS = (5, 32, 33, 1175, 1176, 1177)
MAX_PROCESSES = 64
MAX_ERRORS = 64

_ACCOUNT_SID = re.compile(r"^S-1-5-21-\d{1,10}-\d{1,10}-\d{1,10}-\d{1,10}$", re.IGNORECASE)
_ANY_SID = re.compile(r"^S-1-\d{1,14}(-\d{1,10}){1,15}$", re.IGNORECASE)
_VERSION = re.compile(r"^\d{1,5}(\.\d{1,10}){0,3}$")
# A drive path, a share, or a value that starts with a variable (%USERPROFILE%\...).
_APPDATA = re.compile(r"^(?:[A-Za-z]:[\\/]|[\\/]{2}[^\\/]|%[^%\\/]+%)")
# Narrower than the inventory's rule on purpose: the inventory's values become INI lines, a
# scenario's describe what a workstation holds, and a file name a hostile user gave C1
# controls is part of that (lab show must not print it raw).
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_WELL_KNOWN_BY_NAME = {
    **{name.casefold(): sid for sid, name in WELL_KNOWN_ACCOUNTS.items()},
    **{name.rpartition("\\")[2].casefold(): sid for sid, name in WELL_KNOWN_ACCOUNTS.items()},
}


class ScenarioErrors(InventoryErrors):
    """Every problem of a scenario file, each at ``file:line:column``."""

    code: ClassVar[str] = "scenario"

    what = "the scenario"


@dataclass(frozen=True)
class Where:
    """A place in the scenario file, for the messages of problems found while applying it."""

    file: str
    line: int
    column: int
    pointer: str

    def error(self, message: str) -> ScenarioErrors:
        """A one-problem :class:`ScenarioErrors` at this place."""
        problem = InventoryError(
            message, file=self.file, line=self.line, column=self.column, path=self.pointer
        )
        return ScenarioErrors([problem])

    @contextmanager
    def setting_up(self, what: str) -> Iterator[None]:
        """A failure to set up ``what`` on the machine becomes a problem at this place."""
        try:
            yield
        except (FileError, OSError, ValueError) as failed:
            if isinstance(failed, FileError):
                reason = failed.message
            elif isinstance(failed, OSError):  # its text would name the lab's real folder
                reason = f"{failed.strerror or type(failed).__name__}."
            else:
                reason = str(failed)
            raise self.error(f"cannot set up {what}: {reason}") from None


@dataclass(frozen=True)
class Principal:
    """Who an owner or a DACL entry names: a SID, or an inventory user (SID known once built)."""

    sid: str = ""
    user: str = ""

    def resolve(self, ws: Workstation, inventory: Inventory) -> str:
        """The SID on ``ws``."""
        if self.sid:
            return self.sid
        account = ws.user(inventory.users[self.user].windows)
        if account is None:  # pragma: no cover - load_scenario checked the account exists
            raise ValueError(f"{self.user} has no account on {ws.computer}")
        return account.sid


@dataclass(frozen=True)
class AceSetup:
    """One allow entry of a scenario DACL."""

    who: Principal
    rights: Rights
    scope: ntfs.Scope | None
    """None: ``object`` on a file, ``all`` on a folder."""


@dataclass(frozen=True)
class PathSetup:
    """One entry of ``paths``: a folder, a file, a link, or (kind None) an existing object."""

    path: str
    where: Where
    kind: Literal["folder", "file", "junction", "symlink", "hardlink"] | None
    content: bytes = b""
    target: str = ""
    owner: Principal | None = None
    acl: tuple[AceSetup, ...] | None = None
    inherit: bool = False
    read_only: bool | None = None


@dataclass(frozen=True)
class UserSetup:
    """One account of a workstation as the scenario gives it (None: the default)."""

    name: str
    where: Where
    rid: int | None = None
    sid: str | None = None
    no_profile: bool = False
    profile: str | None = None
    logged_on: bool | None = None
    ntuser_dat: bool | None = None
    hive_in_use: bool = False
    appdata: str | None = None
    hkcu: str | None = None
    running: int | None = None


@dataclass(frozen=True)
class MsiSetup:
    """An MSI product named MicroSIP; ``user``: installed for that inventory user only."""

    location: str
    user: str | None


@dataclass(frozen=True)
class InstallSetup:
    """MicroSIP's install facts (None or unset: the inventory's)."""

    mode: Literal["installed", "portable", "absent"] | None = None
    install_dir: str | None = None
    exe: str | None = None
    hklm_given: bool = False
    hklm: str | None = None
    msi: tuple[MsiSetup, ...] | None = None
    version_given: bool = False
    version: str | None = None
    """The exe's file version (its version resource's FileVersion; None: it has none)."""


@dataclass(frozen=True)
class WorkstationSetup:
    """How one workstation differs from the default; see the module docstring."""

    name: str
    where: Where
    users: Mapping[str, UserSetup]
    install: InstallSetup
    ps_version: str | None = None
    language_mode: LanguageMode | None = None
    remote_shells: bool | None = None
    shares: tuple[str, ...] = ()
    paths: tuple[PathSetup, ...] = ()
    locked: tuple[str, ...] = ()
    replace_errors: Mapping[str, tuple[int, ...]] | None = None

    def build(
        self, lab: Lab, config: HostConfig, default: WorkstationSpec, inventory: Inventory
    ) -> tuple[LabHost, Workstation]:
        """Start the host of the default machine as this scenario changes it.

        :class:`ScenarioErrors` names the place in the scenario of what cannot be set up.
        """
        install = self.install
        mode = install.mode or default.mode
        spec = replace(
            default,
            users=(),
            mode=None if mode == "absent" else mode,
            install_dir=install.install_dir or default.install_dir,
            exe=install.exe or default.exe,
        )
        host, ws = add_workstation(lab, config, spec)
        with host.lock:
            self._add_accounts(ws, inventory, spec.exe)
            self._apply(ws, host, inventory)
        return host, ws

    def _add_accounts(self, ws: Workstation, inventory: Inventory, exe: str) -> None:
        """The inventory's accounts and the scenario's, those with a SID given first (so
        that the lab's own RIDs never take theirs)."""
        station = inventory.workstations[self.name]
        names = [*station.users, *(n for n in self.users if n not in station.users)]
        given = [n for n in names if n in self.users and self._has_sid(n)]
        for name in given + [n for n in names if n not in given]:
            spec = self._user_spec(name, inventory)
            # A default account fails only for what the scenario did to this machine.
            where = self.users[name].where if name in self.users else self.where
            with where.setting_up(spec.windows):
                add_account(ws, spec, exe)

    def _apply(self, ws: Workstation, host: LabHost, inventory: Inventory) -> None:
        if self.ps_version is not None:
            ws.ps_version = self.ps_version
        if self.language_mode is not None:
            ws.language_mode = self.language_mode
        if self.remote_shells is not None:
            host.set_remote_shells(self.remote_shells)
        if self.install.hklm_given:
            ws.hklm_microsip = self.install.hklm
        if self.install.version_given and ws.install is not None:
            ws.put(ws.install.exe_path, exe_image(self.install.version))
        if self.install.msi is not None:
            ws.msi_products = [
                MsiProduct(
                    "MicroSIP",
                    product.location,
                    Principal(user=product.user).resolve(ws, inventory) if product.user else None,
                )
                for product in self.install.msi
            ]
        for setup in self.users.values():
            if setup.hive_in_use:
                ws.hive_locked.add(Principal(user=setup.name).resolve(ws, inventory))
        for share in self.shares:
            ws.add_share(share)
        for entry in self.paths:
            with entry.where.setting_up(entry.path):
                _apply_path(ws, entry, inventory)
        ws.faults.locked.update(self.locked)
        for path, codes in (self.replace_errors or {}).items():
            ws.faults.replace_errors[path] = list(codes)

    def _has_sid(self, name: str) -> bool:
        setup = self.users[name]
        return setup.rid is not None or setup.sid is not None

    def _user_spec(self, name: str, inventory: Inventory) -> UserSpec:
        windows = inventory.users[name].windows
        setup = self.users.get(name)
        if setup is None:
            return UserSpec(windows)
        return UserSpec(
            windows,
            has_profile=not setup.no_profile,
            running=setup.running or 0,
            rid=setup.rid,
            sid=setup.sid,
            profile=setup.profile,
            shell_appdata=setup.appdata,
            hive_loaded=bool(setup.logged_on),
            hkcu_microsip=setup.hkcu,
            hive_file=setup.ntuser_dat is not False,
        )


@dataclass(frozen=True)
class Scenario:
    """A checked scenario file: one :class:`WorkstationSetup` per workstation it names."""

    source: str
    workstations: Mapping[str, WorkstationSetup]


def _apply_path(ws: Workstation, entry: PathSetup, inventory: Inventory) -> None:
    owner = entry.owner.resolve(ws, inventory) if entry.owner is not None else None
    is_dir = entry.kind == "folder" or (entry.kind is None and ws.is_dir(entry.path))
    acl = None
    if entry.acl is not None:
        aces = tuple(
            Ace(ace.who.resolve(ws, inventory), ace.rights, ace.scope or _default_scope(is_dir))
            for ace in entry.acl
        )
        acl = Acl(aces, protected=not entry.inherit)
    if entry.kind == "folder":
        ws.put_dir(entry.path, acl, owner=owner)
    elif entry.kind == "file":
        ws.put(entry.path, entry.content, acl, owner=owner, readonly=bool(entry.read_only))
    elif entry.kind is not None:
        if ws.is_reparse_point(entry.path) or ws.exists(entry.path):
            # A user replaces what was there: their own folder, or the profile's default one.
            if ws.is_dir(entry.path) and not ws.is_reparse_point(entry.path):
                ws.remove_tree(entry.path)
            elif ws.is_dir(entry.path):
                ws.remove_dir(entry.path)
            else:
                ws.delete(entry.path)
        ws.make_link(entry.path, entry.target, entry.kind, owner=owner)
    else:
        if not ws.exists(entry.path):
            raise ValueError("it does not exist (give folder: true or content to create it)")
        if owner is not None:
            ws.set_owner(entry.path, owner)
        if acl is not None:
            ws.set_acl(entry.path, acl)
        if entry.read_only is not None:
            if ws.is_dir(entry.path):
                raise ValueError("read_only is an attribute of files")
            ws.set_readonly(entry.path, entry.read_only)


def _default_scope(is_dir: bool) -> ntfs.Scope:
    return "all" if is_dir else "object"


# --- reading the file -----------------------------------------------------------------------


def load_scenario(path: Path, inventory: Inventory) -> Scenario:
    """Read and check a scenario file against ``inventory``; :class:`ScenarioErrors` lists every
    problem (an unreadable file or bad YAML is one :class:`InventoryError`)."""
    tree, problems = yamldoc.load_tree(path)
    reader = _Reader(str(path), inventory)
    for problem in problems:
        reader.errors.append(
            InventoryError(
                problem.message,
                file=str(path),
                line=problem.line,
                column=problem.column,
                path=join_pointer(list(problem.segments)),
            )
        )
    workstations = reader.document(tree) if tree is not None else {}
    if reader.errors:
        raise ScenarioErrors(reader.errors)
    return Scenario(str(path), workstations)


Node = yamldoc.YNode
Segments = tuple[str, ...]
Position = tuple[int, int]


class _Reader:
    def __init__(self, file: str, inventory: Inventory) -> None:
        self.file = file
        self.inventory = inventory
        self.errors: list[InventoryError] = []

    # --- helpers ----------------------------------------------------------------------------

    def where(self, line: int, column: int, segments: Segments) -> Where:
        return Where(self.file, line, column, join_pointer(list(segments)))

    def error(self, message: str, line: int, column: int, segments: Segments) -> None:
        self.errors.append(
            InventoryError(
                message,
                file=self.file,
                line=line,
                column=column,
                path=join_pointer(list(segments)),
            )
        )

    def node_error(self, message: str, node: Node, segments: Segments) -> None:
        self.error(message, node.line, node.column, segments)

    def entries(
        self, node: Node, segments: Segments, allowed: Sequence[str] | None, what: str
    ) -> Iterator[tuple[str, Node, Segments, Position]]:
        """The children of a mapping with the line and column of their keys; unknown keys
        (when ``allowed`` is given) reported."""
        if node.kind == "scalar" and node.value is None:
            return
        if node.kind != "map":
            self.node_error(f"{what} must be a mapping", node, segments)
            return
        if node.shared:
            self.node_error("anchors and aliases are not allowed in a scenario", node, segments)
            return
        for (key, child), (line, column) in zip(node.items, node.key_positions, strict=True):
            at = (*segments, key)
            if allowed is not None and key not in allowed:
                self.error(unknown(key, allowed, f"key of {what}"), line, column, at)
                continue
            if child.shared:  # the alias's own node is the anchor's: say where the key is
                self.error("anchors and aliases are not allowed in a scenario", line, column, at)
                continue
            yield key, child, at, (line, column)

    def items(self, node: Node, segments: Segments, what: str) -> Iterator[tuple[Node, Segments]]:
        if node.kind == "scalar" and node.value is None:
            return
        if node.kind != "seq":
            self.node_error(f"{what} must be a list", node, segments)
            return
        for index, child in node.items:
            at = (*segments, index)
            if child.shared:
                self.node_error("anchors and aliases are not allowed in a scenario", node, at)
                continue
            yield child, at

    def text(self, node: Node, segments: Segments, *, empty: bool = False) -> str | None:
        if node.kind != "scalar" or not isinstance(node.value, str):
            self.node_error("expected a text value", node, segments)
            return None
        if _CONTROL.search(node.value):
            self.node_error("the value contains a line break or control character", node, segments)
            return None
        if not node.value and not empty:
            self.node_error("expected a text value, not an empty one", node, segments)
            return None
        return node.value

    def optional_text(self, node: Node, segments: Segments) -> tuple[bool, str | None]:
        """``(ok, value)``: null is a value here (the registry value is absent)."""
        if node.kind == "scalar" and node.value is None:
            return True, None
        value = self.text(node, segments)
        return value is not None, value

    def boolean(self, node: Node, segments: Segments) -> bool | None:
        if node.kind != "scalar" or not isinstance(node.value, bool):
            self.node_error("expected true or false", node, segments)
            return None
        return node.value

    def choice(self, node: Node, segments: Segments, allowed: Sequence[str]) -> str | None:
        value = self.text(node, segments)
        if value is None:
            return None
        if value not in allowed:
            self.node_error(unknown(value, allowed, "value"), node, segments)
            return None
        return value

    def windows_path(self, node: Node, segments: Segments, shares: Sequence[str]) -> str | None:
        """An absolute Windows path, normalised; a share's path must name a declared share."""
        value = self.text(node, segments)
        if value is None:
            return None
        try:
            volume, _ = ntfs.split(value)
            normal = ntfs.normalize(value)
        except FileError:
            self.node_error(
                f"'{value}' is not an absolute Windows path (C:\\folder or \\\\server\\share"
                "\\folder, without '.' or '..' components)",
                node,
                segments,
            )
            return None
        if len(volume) > 1 and not any(ntfs.path_key(s) == ntfs.path_key(volume) for s in shares):
            self.node_error(
                f"'{value}' is on the share {volume}, which this workstation's shares do not "
                "list; add it under shares",
                node,
                segments,
            )
            return None
        return normal

    # --- the document -----------------------------------------------------------------------

    def document(self, tree: Node) -> dict[str, WorkstationSetup]:
        found: dict[str, WorkstationSetup] = {}
        if tree.kind != "map":
            self.node_error("a scenario is a mapping with the key workstations", tree, ())
            return found
        for key, node, at, _ in self.entries(tree, (), TOP_KEYS, "the scenario"):
            if key != "workstations":  # pragma: no cover - entries() allows only TOP_KEYS
                continue
            known = self.inventory.workstations
            stations = self.entries(node, at, None, "workstations")
            for name, child, segments, (line, column) in stations:
                if name not in known:
                    more = did_you_mean(name, known)
                    self.error(
                        f"the inventory has no workstation {name!r}{more}", line, column, segments
                    )
                    continue
                where = self.where(line, column, segments)
                found[name] = self.workstation(name, child, segments, where)
        return found

    def workstation(
        self, name: str, node: Node, segments: Segments, where: Where
    ) -> WorkstationSetup:
        entries = {
            k: (n, at) for k, n, at, _ in self.entries(node, segments, WORKSTATION_KEYS, name)
        }
        station_users = self.inventory.workstations[name].users
        shares: list[str] = []
        if "shares" in entries:
            shares = self.shares(*entries["shares"])
        users: dict[str, UserSetup] = {}
        if "users" in entries:
            users = self.users(name, *entries["users"], shares)
        accounts = {*station_users, *users}
        install = InstallSetup()
        if "microsip" in entries:
            install = self.install(*entries["microsip"], shares, accounts)
        ps_version: str | None = None
        language_mode: LanguageMode | None = None
        if "powershell" in entries:
            ps_version, language_mode = self.powershell(*entries["powershell"])
        remote_shells = None
        if "remote_shells" in entries:
            remote_shells = self.boolean(*entries["remote_shells"])
        paths: tuple[PathSetup, ...] = ()
        if "paths" in entries:
            paths = self.paths(*entries["paths"], shares, accounts)
        locked: list[str] = []
        if "locked" in entries:
            for item, at in self.items(*entries["locked"], "locked"):
                path = self.windows_path(item, at, shares)
                if path is not None:
                    locked.append(path)
        replace_errors: dict[str, tuple[int, ...]] | None = None
        if "replace_errors" in entries:
            replace_errors = self.replace_errors(*entries["replace_errors"], shares)
        return WorkstationSetup(
            name,
            where,
            users,
            install,
            ps_version,
            language_mode,
            remote_shells,
            tuple(shares),
            paths,
            tuple(locked),
            replace_errors,
        )

    def users(
        self, station: str, node: Node, segments: Segments, shares: Sequence[str]
    ) -> dict[str, UserSetup]:
        found: dict[str, UserSetup] = {}
        sids: dict[str, str] = {}
        for name, child, at, (line, column) in self.entries(node, segments, None, "users"):
            if name not in self.inventory.users:
                more = did_you_mean(name, self.inventory.users)
                self.error(f"the inventory has no user {name!r}{more}", line, column, at)
                continue
            setup = self.user(name, child, at, self.where(line, column, at), shares)
            sid = _account_sid(setup, self.inventory.users[name].windows)
            if sid and sid in sids:
                self.error(f"{name} has the same SID as {sids[sid]}", line, column, at)
            elif sid:
                sids[sid] = name
            found[name] = setup
        return found

    def user(
        self, name: str, node: Node, segments: Segments, where: Where, shares: Sequence[str]
    ) -> UserSetup:
        entries = {k: (n, at) for k, n, at, _ in self.entries(node, segments, USER_KEYS, name)}
        values: dict[str, object] = {}
        if "sid" in entries:
            rid, sid = self.sid(*entries["sid"])
            values.update(rid=rid, sid=sid)
        if "profile" in entries:
            profile_node, at = entries["profile"]
            if profile_node.kind == "scalar" and profile_node.value is None:
                values["no_profile"] = True
                for key in ("logged_on", "ntuser_dat", "hive_in_use", "appdata", "hkcu"):
                    if key in entries:
                        self.node_error(
                            f"{name} has no profile (profile: null): {key} means nothing",
                            entries[key][0],
                            entries[key][1],
                        )
            else:
                profile = self.windows_path(profile_node, at, shares)
                if profile is not None and len(ntfs.split(profile)[1]) == 0:
                    self.node_error("a profile is a folder, not a drive root", profile_node, at)
                values["profile"] = profile
        for key in ("logged_on", "ntuser_dat", "hive_in_use"):
            if key in entries:
                values[key] = self.boolean(*entries[key])
        if "appdata" in entries:
            appdata_node, at = entries["appdata"]
            appdata = self.text(appdata_node, at)
            if appdata is not None and not _APPDATA.match(appdata):
                self.node_error(
                    "appdata is an absolute path (D:\\Redirected\\%USERNAME%, "
                    "\\\\server\\share\\...) or starts with a variable "
                    "(%USERPROFILE%\\...)",
                    appdata_node,
                    at,
                )
            values["appdata"] = appdata
        if "hkcu" in entries:
            values["hkcu"] = self.optional_text(*entries["hkcu"])[1]
        if "running" in entries:
            values["running"] = self.count(*entries["running"])
        values["hive_in_use"] = bool(values.get("hive_in_use"))
        return UserSetup(name, where, **values)  # type: ignore[arg-type]

    def sid(self, node: Node, segments: Segments) -> tuple[int | None, str | None]:
        """A RID (a number) or a whole account SID (``S-1-5-21-...``)."""
        value = node.value
        if node.kind == "scalar" and isinstance(value, str) and value.isdigit():
            value = int(value)
        if node.kind == "scalar" and isinstance(value, int) and not isinstance(value, bool):
            if 1 <= value <= 0xFFFFFFFF:
                return value, None
        elif node.kind == "scalar" and isinstance(value, str) and _ACCOUNT_SID.match(value):
            return None, value.upper()
        self.node_error(
            "sid is a RID (a number from 1 to 4294967295) or an account SID "
            "(S-1-5-21-<three numbers>-<RID>)",
            node,
            segments,
        )
        return None, None

    def count(self, node: Node, segments: Segments) -> int | None:
        value = node.value
        if node.kind == "scalar" and isinstance(value, bool):
            return int(value)
        if node.kind == "scalar" and isinstance(value, int) and 0 <= value <= MAX_PROCESSES:
            return value
        self.node_error(
            f"running is true, false or a number of processes up to {MAX_PROCESSES}",
            node,
            segments,
        )
        return None

    def install(
        self, node: Node, segments: Segments, shares: Sequence[str], accounts: set[str]
    ) -> InstallSetup:
        entries = {
            k: (n, at) for k, n, at, _ in self.entries(node, segments, MICROSIP_KEYS, "microsip")
        }
        values: dict[str, object] = {}
        if "mode" in entries:
            values["mode"] = self.choice(*entries["mode"], MODES)
        if "install_dir" in entries:
            folder_node, at = entries["install_dir"]
            folder = self.windows_path(folder_node, at, shares)
            if folder is not None and len(ntfs.split(folder)[1]) == 0:
                self.node_error("install_dir is a folder, not a drive root", folder_node, at)
            values["install_dir"] = folder
        if "exe" in entries:
            exe_node, at = entries["exe"]
            exe = self.text(exe_node, at)
            problem = winpath.file_name_problem(exe) if exe is not None else None
            if problem is not None:
                self.node_error(f"exe '{exe}' {problem}", exe_node, at)
            values["exe"] = exe
        if "hklm" in entries:
            ok, value = self.optional_text(*entries["hklm"])
            values.update(hklm_given=ok, hklm=value)
        if "version" in entries:
            ok, value = self.optional_text(*entries["version"])
            values.update(version_given=ok, version=value)
        if "msi" in entries:
            products = []
            for item, at in self.items(*entries["msi"], "msi"):
                product = self.msi(item, at, accounts)
                if product is not None:
                    products.append(product)
            values["msi"] = tuple(products)
        return InstallSetup(**values)  # type: ignore[arg-type]

    def msi(self, node: Node, segments: Segments, accounts: set[str]) -> MsiSetup | None:
        entries = {k: (n, at) for k, n, at, _ in self.entries(node, segments, MSI_KEYS, "an MSI")}
        if node.kind != "map":
            return None
        location = ""
        if "location" in entries:
            location = self.text(*entries["location"], empty=True) or ""
        user = None
        if "user" in entries:
            user_node, at = entries["user"]
            user = self.account(user_node, at, accounts)
        return MsiSetup(location, user)

    def account(self, node: Node, segments: Segments, accounts: set[str]) -> str | None:
        """An inventory user who has an account on this workstation."""
        name = self.text(node, segments)
        if name is None:
            return None
        if name in accounts:
            return name
        if name in self.inventory.users:
            self.node_error(
                f"{name} has no account on this workstation; add them under users",
                node,
                segments,
            )
            return None
        more = did_you_mean(name, accounts)
        self.node_error(f"the inventory has no user {name!r}{more}", node, segments)
        return None

    def powershell(self, node: Node, segments: Segments) -> tuple[str | None, LanguageMode | None]:
        entries = {
            k: (n, at)
            for k, n, at, _ in self.entries(node, segments, POWERSHELL_KEYS, "powershell")
        }
        version = None
        if "version" in entries:
            version_node, at = entries["version"]
            value = version_node.value
            text = str(value) if isinstance(value, int | float | str) else ""
            if isinstance(value, bool) or not _VERSION.match(text):
                self.node_error("version is like 5.1.19041.4648 or 4.0", version_node, at)
            else:
                version = text
        mode = None
        if "language_mode" in entries:
            chosen = self.choice(*entries["language_mode"], LANGUAGE_MODES)
            mode = next((m for m in LANGUAGE_MODES if m == chosen), None)
        return version, mode

    def shares(self, node: Node, segments: Segments) -> list[str]:
        found: list[str] = []
        for item, at in self.items(node, segments, "shares"):
            value = self.text(item, at)
            if value is None:
                continue
            try:
                volume, parts = ntfs.split(value)
            except FileError:
                volume, parts = "", ()
            share = volume.rpartition("\\")[2]
            if len(volume) <= 1 or parts or share in (".", ".."):
                self.node_error(f"'{value}' is not \\\\server\\share", item, at)
                continue
            found.append(volume)
        return found

    def paths(
        self, node: Node, segments: Segments, shares: Sequence[str], accounts: set[str]
    ) -> tuple[PathSetup, ...]:
        found: list[PathSetup] = []
        seen: dict[str, int] = {}
        for raw, child, at, (line, column) in self.entries(node, segments, None, "paths"):
            key = Node("scalar", line, column, raw, tag="str")
            path = self.windows_path(key, at, shares)
            if path is None:
                continue
            folded = ntfs.path_key(path)
            if folded in seen:
                self.error(f"{path} is already given at line {seen[folded]}", line, column, at)
                continue
            seen[folded] = line
            where = self.where(line, column, at)
            entry = self.path_entry(path, child, at, where, shares, accounts)
            if entry is not None:
                found.append(entry)
        return tuple(found)

    def path_entry(
        self,
        path: str,
        node: Node,
        segments: Segments,
        where: Where,
        shares: Sequence[str],
        accounts: set[str],
    ) -> PathSetup | None:
        entries = {k: (n, at) for k, n, at, _ in self.entries(node, segments, PATH_KEYS, path)}
        if node.kind != "map":
            return None
        kinds = [k for k in PATH_KINDS if k in entries]
        if len(kinds) > 1:
            second = entries[kinds[1]][0]
            self.node_error(
                f"give only one of {', '.join(PATH_KINDS)} (here: {' and '.join(kinds)})",
                second,
                entries[kinds[1]][1],
            )
            return None
        kind = kinds[0] if kinds else None
        values: dict[str, object] = {}
        is_root = len(ntfs.split(path)[1]) == 0
        if kind is not None and kind != "folder" and is_root:
            self.node_error(f"{path} is the root of its volume", node, segments)
            return None
        if kind == "folder":
            flag = self.boolean(*entries["folder"])
            if flag is False:
                self.node_error(
                    "folder: true creates a folder; leave it out otherwise", *entries["folder"]
                )
        elif kind == "content":
            values["content"] = self.content(entries["content"], entries.get("encoding"))
            kind = "file"
        elif kind is not None:
            target_node, target_at = entries[kind]
            target = self.windows_path(target_node, target_at, shares)
            volume = ntfs.split(target)[0] if target else ""
            if target and kind == "junction" and len(volume) > 1:
                self.node_error("a junction points to a local folder, not a share", *entries[kind])
            elif target and kind == "hardlink" and volume != ntfs.split(path)[0]:
                self.node_error("a hard link is on the volume of its target", *entries[kind])
            values["target"] = target or ""
        if "encoding" in entries and kind != "file":
            self.node_error("encoding goes with content", *entries["encoding"])
        if "owner" in entries:
            if kind == "hardlink":
                self.node_error(
                    "a hard link is its target's file: it has the target's owner", *entries["owner"]
                )
            values["owner"] = self.principal(*entries["owner"], accounts)
        if "acl" in entries:
            if kind in ("junction", "symlink", "hardlink"):
                self.node_error("set the ACL on the link's target instead", *entries["acl"])
            values["acl"] = self.acl(*entries["acl"], accounts)
        if "inherit" in entries:
            values["inherit"] = bool(self.boolean(*entries["inherit"]))
            if "acl" not in entries:
                self.node_error("inherit goes with acl", *entries["inherit"])
        if "read_only" in entries:
            if kind not in ("file", None):
                self.node_error("read_only is an attribute of files", *entries["read_only"])
            values["read_only"] = self.boolean(*entries["read_only"])
        if kind is None and not values:
            self.node_error(
                f"say what {path} is: one of {', '.join(PATH_KINDS)}, or owner, acl or "
                "read_only for an object that exists",
                node,
                segments,
            )
            return None
        return PathSetup(path, where, kind, **values)  # type: ignore[arg-type]

    def content(
        self, content: tuple[Node, Segments], encoding: tuple[Node, Segments] | None
    ) -> bytes:
        node, at = content
        if node.kind != "scalar" or not isinstance(node.value, str):
            self.node_error("content is text (use a | block for several lines)", node, at)
            return b""
        chosen = "utf-8"
        if encoding is not None:
            chosen = self.choice(*encoding, ENCODINGS) or "utf-8"
        if chosen == "utf-16":
            try:
                return ini.encode_ini(node.value)
            except LintError as failed:
                self.node_error(f"content cannot be written as UTF-16: {failed}", node, at)
                return b""
        return node.value.encode("utf-8", errors="surrogatepass")

    def principal(self, node: Node, segments: Segments, accounts: set[str]) -> Principal | None:
        name = self.text(node, segments)
        if name is None:
            return None
        found = self.who(name, accounts)
        if isinstance(found, str):
            self.node_error(found, node, segments)
            return None
        return found

    def who(self, name: str, accounts: set[str]) -> Principal | str:
        """The principal ``name`` names, or why it names none."""
        if _ANY_SID.match(name):
            return Principal(sid=name.upper())
        well_known = _WELL_KNOWN_BY_NAME.get(name.casefold())
        if well_known is not None:
            return Principal(sid=well_known)
        if name in accounts:
            return Principal(user=name)
        for user in accounts:
            windows = self.inventory.users[user].windows
            if windows.casefold() == name.casefold():
                return Principal(user=user)
        if name in self.inventory.users:
            return f"{name} has no account on this workstation; add them under users"
        more = did_you_mean(name, [*sorted(accounts), *WELL_KNOWN_ACCOUNTS.values()])
        return (
            f"{name!r} is neither a user of this workstation, a well-known account "
            f"(SYSTEM, Administrators, Users, ...) nor a SID{more}"
        )

    def acl(
        self, node: Node, segments: Segments, accounts: set[str]
    ) -> tuple[AceSetup, ...] | None:
        aces: list[AceSetup] = []
        ok = True
        for item, at in self.items(node, segments, "acl"):
            text = self.text(item, at)
            if text is None:
                ok = False
                continue
            ace = self.ace(text, accounts)
            if isinstance(ace, str):
                self.node_error(ace, item, at)
                ok = False
                continue
            aces.append(ace)
        return tuple(aces) if ok else None

    def ace(self, text: str, accounts: set[str]) -> AceSetup | str:
        """``WHO:RIGHTS`` or ``WHO:RIGHTS:SCOPE``, as ``lab show`` prints them."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            return f"{text!r}: an entry is WHO:RIGHTS or WHO:RIGHTS:SCOPE, e.g. alice:FullControl"
        who = self.who(parts[0].strip(), accounts)
        if isinstance(who, str):
            return who
        rights = next((r for r in RIGHTS if r.casefold() == parts[1].strip().casefold()), None)
        if rights is None:
            return unknown(parts[1].strip(), RIGHTS, "right")
        scope: ntfs.Scope | None = None
        if len(parts) == 3:
            wanted = parts[2].strip().casefold()
            scope = next((s for s in SCOPES if s == wanted), None)
            if scope is None:
                return unknown(parts[2].strip(), SCOPES, "scope")
        return AceSetup(who, rights, scope)

    def replace_errors(
        self, node: Node, segments: Segments, shares: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        found: dict[str, tuple[int, ...]] = {}
        seen: dict[str, int] = {}
        for raw, child, at, (line, column) in self.entries(node, segments, None, "replace_errors"):
            path = self.windows_path(Node("scalar", line, column, raw, tag="str"), at, shares)
            if path is not None and ntfs.path_key(path) in seen:
                first = seen[ntfs.path_key(path)]
                self.error(f"{path} is already given at line {first}", line, column, at)
                continue
            if path is not None:
                seen[ntfs.path_key(path)] = line
            codes: list[int] = []
            for item, item_at in self.items(child, at, "the errors of a path"):
                value = item.value
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int)
                    or value not in REPLACE_ERRORS
                ):
                    self.node_error(
                        "a ReplaceFile error is one of "
                        + ", ".join(str(code) for code in REPLACE_ERRORS),
                        item,
                        item_at,
                    )
                    continue
                codes.append(value)
            if len(codes) > MAX_ERRORS:
                self.node_error(f"at most {MAX_ERRORS} errors per path", child, at)
                continue
            if path is not None:
                found[path] = tuple(codes)
        return found


def _account_sid(setup: UserSetup, windows: str) -> str:
    """The SID the scenario gives the account (empty: the lab chooses one)."""
    if setup.sid is not None:
        return setup.sid.upper()
    if setup.rid is None:
        return ""
    local = windows.startswith(".\\")
    return f"{MACHINE_SID if local else DOMAIN_SID}-{setup.rid}"
