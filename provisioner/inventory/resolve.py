"""Resolve every value of every target with its provenance.

Precedence, lowest first: defaults < groups (each after its parents, in listed order; the
workstation's groups, then the user's) < workstation < user < account. Enforced values
(``enforced:`` blocks of defaults, the workstation's groups and the workstation) come last and
win; they are also what ``override.ini`` carries.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from provisioner.errors import InventoryError, ResolveError
from provisioner.inventory.model import Block, Inventory, Layer, Sourced, User, Workstation
from provisioner.inventory.names import closest

DEFAULT_INSTALL_DIR = "C:\\Program Files\\MicroSIP"
DEFAULT_EXE = "microsip.exe"


@dataclass(frozen=True)
class Resolved:
    """A final value and every layer that set it, lowest precedence first (last one wins)."""

    chain: tuple[Sourced, ...]

    @property
    def final(self) -> Sourced:
        """The winning layer's value."""
        return self.chain[-1]

    @property
    def value(self) -> object:
        """The final value."""
        return self.chain[-1].value


@dataclass(frozen=True)
class ResolvedAccount:
    """An account as MicroSIP will number it ([Account<index>])."""

    index: int
    id: str
    active: bool
    keys: Mapping[str, Resolved]


@dataclass(frozen=True)
class Install:
    """How MicroSIP is installed on a workstation."""

    mode: str
    install_dir: str
    exe: str
    appdata_roots: tuple[str, ...] = ()
    """Where a user's AppData may be redirected (``microsip.appdata_roots``)."""
    min_version: str | None = None
    """The oldest MicroSIP the fleet should run (``microsip.min_version``): older is warned of."""

    @property
    def ini_name(self) -> str:
        """MicroSIP names its ini after the exe: Qphone.exe reads Qphone.ini."""
        return self.exe.rsplit(".", 1)[0] + ".ini"


@dataclass(frozen=True)
class Profile:
    """Everything that goes into one user's microsip.ini on one workstation."""

    workstation: Workstation
    user: User
    groups: tuple[str, ...]
    install: Install
    settings: Mapping[str, Resolved]
    accounts: tuple[ResolvedAccount, ...]
    enforced_settings: Mapping[str, Resolved]
    # Groups reached only through the user whose enforced, winrm or microsip blocks do not
    # apply here: those blocks are per workstation (override.ini, connection, install facts).
    unapplied_groups: tuple[str, ...] = ()

    @property
    def active_index(self) -> int:
        """The [Settings] accountId value."""
        return next(a.index for a in self.accounts if a.active)


@dataclass(frozen=True)
class StationPlan:
    """A workstation's own resolved configuration: install facts, enforced keys, WinRM."""

    workstation: Workstation
    groups: tuple[str, ...]
    install: Install
    enforced_settings: Mapping[str, Resolved]
    winrm: Mapping[str, Resolved]


def _merge(blocks: Iterable[Block]) -> dict[str, Resolved]:
    chains: dict[str, list[Sourced]] = {}
    for block in blocks:
        for key, value in block.items():
            chains.setdefault(key, []).append(value)
    return {key: Resolved(tuple(chain)) for key, chain in chains.items()}


def _layers(inventory: Inventory, groups: Sequence[str]) -> list[Layer]:
    return [inventory.defaults, *(inventory.groups[g].layer for g in groups)]


def resolve_station(inventory: Inventory, name: str) -> StationPlan:
    """Resolve a workstation's install facts, enforced keys and WinRM options."""
    station = inventory.workstations[name]
    groups = tuple(group_chain(inventory, station.groups))
    layers = [*_layers(inventory, groups), station.layer]
    microsip = _merge(layer.microsip for layer in layers)
    install = Install(
        mode=str(microsip["mode"].value) if "mode" in microsip else "installed",
        install_dir=(
            str(microsip["install_dir"].value) if "install_dir" in microsip else DEFAULT_INSTALL_DIR
        ),
        exe=str(microsip["exe"].value) if "exe" in microsip else DEFAULT_EXE,
        appdata_roots=(
            tuple(str(root) for root in microsip["appdata_roots"].value)  # type: ignore[attr-defined]
            if "appdata_roots" in microsip
            else ()
        ),
        min_version=str(microsip["min_version"].value) if "min_version" in microsip else None,
    )
    return StationPlan(
        workstation=station,
        groups=groups,
        install=install,
        enforced_settings=_merge(layer.enforced_settings for layer in layers),
        winrm=_merge(layer.winrm for layer in layers),
    )


def resolve_profile(
    inventory: Inventory, station_name: str, user_name: str, plan: StationPlan | None = None
) -> Profile:
    """Resolve one user's configuration on one workstation (``plan``: its resolved station)."""
    if plan is None or plan.workstation.name != station_name:
        plan = resolve_station(inventory, station_name)
    station = plan.workstation
    user = inventory.users[user_name]
    groups = tuple(group_chain(inventory, [*station.groups, *user.groups]))
    station_groups = plan.groups
    unapplied = tuple(
        name
        for name in groups
        if name not in station_groups and _has_station_blocks(inventory.groups[name].layer)
    )
    lower = [*_layers(inventory, groups), station.layer, user.layer]
    enforced_layers = [*_layers(inventory, station_groups), station.layer]
    settings = _merge(
        [
            *(layer.settings for layer in lower),
            *(layer.enforced_settings for layer in enforced_layers),
        ]
    )
    accounts = []
    for index, account in enumerate(user.accounts, start=1):
        keys = _merge(
            [
                *(layer.account for layer in lower),
                account.keys,
                *(layer.enforced_account for layer in enforced_layers),
            ]
        )
        accounts.append(ResolvedAccount(index, account.id, account.active, keys))
    if not accounts or sum(a.active for a in accounts) != 1:
        raise ResolveError(f"user {user_name} needs exactly one active account")
    return Profile(
        workstation=station,
        user=user,
        groups=groups,
        install=plan.install,
        settings=settings,
        accounts=tuple(accounts),
        enforced_settings=plan.enforced_settings,
        unapplied_groups=unapplied,
    )


def _has_station_blocks(layer: Layer) -> bool:
    return bool(layer.enforced_settings or layer.enforced_account or layer.winrm or layer.microsip)


@dataclass(frozen=True, slots=True)
class TargetRef:
    """One file to produce: a user's microsip.ini, or a workstation's override.ini."""

    kind: str
    workstation: str
    user: str | None

    @property
    def name(self) -> str:
        """A short name for reports: ``ws/user/microsip.ini`` or ``ws/override.ini``."""
        file = "override.ini" if self.kind == "override" else "microsip.ini"
        return "/".join(p for p in (self.workstation, self.user, file) if p)


def select_targets(inventory: Inventory, selection: Selection) -> list[TargetRef]:
    """Every selected target, workstations in name order, users in listed order."""
    targets: list[TargetRef] = []
    for name in sorted(inventory.workstations):
        station = inventory.workstations[name]
        users = [u for u in station.users if selection.matches(inventory, name, u)]
        if users:
            targets.append(TargetRef("override", name, None))
            targets.extend(TargetRef("microsip", name, u) for u in users)
        elif not station.users and selection.matches(inventory, name, None):
            targets.append(TargetRef("override", name, None))
    return targets


def group_chain(inventory: Inventory, names: Sequence[str]) -> list[str]:
    """Groups in precedence order: each group after its parents, in listed order, no repeats."""
    chain: list[str] = []
    for name in names:
        _add_group(inventory, name, (), chain)
    return chain


def _add_group(inventory: Inventory, name: str, trail: tuple[str, ...], chain: list[str]) -> None:
    # A module function, not a closure: a closure that calls itself is a reference cycle, and
    # one per resolved profile would wait for the collector (or, frozen, for the process's end).
    group = inventory.groups.get(name)
    if group is None or name in chain or name in trail:
        return
    for parent in group.parents:
        _add_group(inventory, parent, (*trail, name), chain)
    chain.append(name)


@dataclass(frozen=True)
class Selection:
    """A ``--limit`` expression: comma-separated terms, ``!term`` excludes, ``&term`` requires.

    A term is a glob on workstation or user names, ``group:NAME`` (directly or through a
    parent), ``user:GLOB`` or ``ws:GLOB``.
    """

    expression: str = ""
    option: str = "--limit"  # how messages name the expression

    def matches(self, inventory: Inventory, workstation: str, user: str | None) -> bool:
        """True when the (workstation, user) target is selected."""
        terms = [t.strip() for t in self.expression.split(",") if t.strip()]
        if not terms:
            return True
        include = [t for t in terms if not t.startswith(("!", "&"))]
        required = [t[1:] for t in terms if t.startswith("&")]
        excluded = [t[1:] for t in terms if t.startswith("!")]

        def hit(term: str) -> bool:
            return _term_matches(inventory, term, workstation, user, self.option)

        if include and not any(hit(t) for t in include):
            return False
        if not all(hit(t) for t in required):
            return False
        return not any(hit(t) for t in excluded)

    def unmatched(self, inventory: Inventory) -> list[str]:
        """Why each term that selects nothing in ``inventory`` (most likely a typo) is suspect."""
        terms = [t.strip() for t in self.expression.split(",") if t.strip()]
        pairs = [
            (name, user)
            for name, station in inventory.workstations.items()
            for user in (*station.users, None)
        ]
        found = []
        for term in terms:
            bare = term.lstrip("!&")
            if not any(
                _term_matches(inventory, bare, name, user, self.option) for name, user in pairs
            ):
                hint = _closest(inventory, bare)
                found.append(f"{self.option} term {term!r} matches nothing{hint}")
        return found


def _closest(inventory: Inventory, term: str) -> str:
    kind, _, pattern = term.partition(":") if ":" in term else ("", "", term)
    names = {
        "group": list(inventory.groups),
        "user": list(inventory.users),
        "ws": list(inventory.workstations),
        "workstation": list(inventory.workstations),
        "": [*inventory.workstations, *inventory.users],
    }.get(kind, [])
    if any(c in pattern for c in "*?["):
        return ""  # a glob: no single name to suggest
    close = closest(pattern, names)
    return f"; did you mean {(kind + ':' if kind else '') + close!r}?" if close else ""


def _term_matches(
    inventory: Inventory, term: str, workstation: str, user: str | None, option: str
) -> bool:
    kind, _, pattern = term.partition(":") if ":" in term else ("", "", term)
    station = inventory.workstations.get(workstation)
    if kind == "group":
        names: list[str] = list(station.groups) if station else []
        if user and user in inventory.users:
            names += inventory.users[user].groups
        return pattern in group_chain(inventory, names)
    if kind == "user":
        return user is not None and fnmatch.fnmatchcase(user, pattern)
    if kind in ("ws", "workstation"):
        return fnmatch.fnmatchcase(workstation, pattern)
    if kind:
        raise InventoryError(f"unknown {option} term {term!r}; use group:, user: or ws:")
    return fnmatch.fnmatchcase(workstation, pattern) or (
        user is not None and fnmatch.fnmatchcase(user, pattern)
    )
