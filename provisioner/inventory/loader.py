"""Load an inventory directory into the model: schema, types and cross-references checked.

Every YAML file of the directory contributes to one namespace with four top-level sections:
``defaults``, ``groups``, ``workstations`` and ``users``. All problems of a load are collected
and raised together as :class:`InventoryErrors`, each naming file:line:column and key path.
MicroSIP keys are checked against the key table (:mod:`provisioner.microsip.keytable`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from provisioner import gcpause, parallel
from provisioner.errors import InventoryError, ProvisionerError
from provisioner.inventory import winpath, yamldoc
from provisioner.inventory.model import (
    Group,
    Inventory,
    Layer,
    SipAccount,
    Source,
    Sourced,
    User,
    Workstation,
)
from provisioner.inventory.names import closest, unknown
from provisioner.inventory.schema import TOKEN_PREFIX, is_secret_path, join_pointer
from provisioner.microsip.inidoc import unquote
from provisioner.microsip.keytable import KeySpec, KeyTable, load_key_table
from provisioner.microsip.version import parse_version
from provisioner.secrets.credscope import address_problem

RECIPIENTS_FILE = "recipients.yaml"
SKIPPED_DIRS = {"build", "templates", "state", "node_modules", "__pycache__"}

# Below about this much YAML per process, forking composers costs more than it saves.
BYTES_PER_COMPOSE_WORKER = 1_000_000
TOP_LEVEL = ("defaults", "groups", "workstations", "users")
LAYER_BLOCKS = ("settings", "account", "enforced", "winrm", "microsip")
GROUP_KEYS = (*LAYER_BLOCKS, "parents", "description")
WORKSTATION_KEYS = (*LAYER_BLOCKS, "address", "groups", "users", "description")
USER_KEYS = (
    "windows",
    "display_name",
    "groups",
    "workstations",
    "settings",
    "account",
    "accounts",
    "description",
)
ACCOUNT_EXTRA = ("sip_uri", "active")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
WINDOWS_USER_RE = re.compile(
    r"^(?:[A-Za-z0-9][A-Za-z0-9.-]{0,62}|\.)\\[^\\/\[\]:;|=,+*?<>\"@]{1,104}$"
)
SIP_URI_RE = re.compile(r"^(?:sips?:)?([^@\s:;]+)@([A-Za-z0-9.-]+(?::\d{1,5})?)$")
# Line breaks, control characters (TAB and the C1 set included: the profile API and the
# agent's line handling would not keep them as written) and lone surrogates (not UTF-16).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Keys MicroSIP itself saves wrapped in quotes, so a value enclosed in quotes survives its
# rewrites when the renderer adds the outer pair (see render.jinja.ini_value).
_PLAIN_TOKEN = re.compile(r"[^\s,\]}#]+")
_SAVED_QUOTED = frozenset(
    {"audioRingDevice", "audioOutputDevice", "audioInputDevice", "videoCaptureDevice"}
)


class InventoryErrors(ProvisionerError):
    """Every problem found while loading an inventory."""

    code: ClassVar[str] = "inventory"

    what = "the inventory"

    def __init__(self, errors: Sequence[InventoryError]) -> None:
        self.errors = tuple(errors)
        super().__init__(f"{len(self.errors)} problem(s) in {self.what}")

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


@dataclass(frozen=True)
class OptionSpec:
    """A non-MicroSIP option of a block (winrm, microsip)."""

    type: str
    allowed: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None


WINRM_OPTIONS: dict[str, OptionSpec] = {
    "transport": OptionSpec("enum", ("ntlm", "basic", "kerberos", "credssp")),
    "scheme": OptionSpec("enum", ("https", "http")),
    "port": OptionSpec("int", minimum=1, maximum=65535),
    "username": OptionSpec("string"),
    "password": OptionSpec("secret"),
    "ca_trust_path": OptionSpec("string"),
    "server_cert_validation": OptionSpec("enum", ("validate", "ignore")),
    "allow_basic_over_http": OptionSpec("bool"),
    "message_encryption": OptionSpec("enum", ("auto", "always", "never")),
    "operation_timeout": OptionSpec("int", minimum=1, maximum=3600),
    "read_timeout": OptionSpec("int", minimum=2, maximum=3600),
}
MICROSIP_OPTIONS: dict[str, OptionSpec] = {
    "mode": OptionSpec("enum", ("installed", "portable")),
    "install_dir": OptionSpec("folder"),
    "exe": OptionSpec("file"),
    "appdata_roots": OptionSpec("roots"),
    "min_version": OptionSpec("version"),
}


@dataclass
class _Context:
    table: KeyTable
    errors: list[InventoryError] = field(default_factory=list)
    lines: dict[str, list[str]] = field(default_factory=dict)
    # Where each name of a list of references was written (keyed by the list's key path), so
    # that a wrong reference is reported at the list item rather than at its entity.
    item_sources: dict[tuple[str, ...], dict[str, Source]] = field(default_factory=dict)
    # Files that could not be read or parsed: what they define is unknown.
    unparsed: list[str] = field(default_factory=list)
    # Definitions refused for their name, by section: where each was written.
    refused: dict[str, dict[str, Source]] = field(default_factory=dict)
    # Errors that follow from another one (a reference to a refused definition).
    follow_ons: list[InventoryError] = field(default_factory=list)

    def item_source(self, segments: tuple[str, ...], name: str, fallback: Source) -> Source:
        """Where ``name`` was written in the list at ``segments`` (``fallback`` if unknown)."""
        return self.item_sources.get(segments, {}).get(name, fallback)

    def plain_text(self, file: str, line: int, column: int) -> str | None:
        """The text of the plain scalar written at ``line``:``column`` of ``file``, if any."""
        if file not in self.lines:
            try:
                self.lines[file] = yamldoc.read_text(Path(file)).split("\n")
            except InventoryError:
                self.lines[file] = []
        lines = self.lines[file]
        if not 1 <= line <= len(lines):
            return None
        match = _PLAIN_TOKEN.match(lines[line - 1], column - 1)
        return match.group(0) if match else None

    def __post_init__(self) -> None:
        self.account_keys = frozenset(s.key for s in self.table.keys("Account") if not s.is_runtime)

    def error(
        self, message: str, source: Source, segments: Sequence[str], *, follow_on: bool = False
    ) -> None:
        """Record a problem; ``follow_on``: one that another error already explains."""
        (self.follow_ons if follow_on else self.errors).append(
            InventoryError(
                message,
                file=source.file,
                line=source.line,
                column=source.column,
                path=join_pointer(list(segments)),
            )
        )

    def unknown_references(
        self,
        section: str,
        names: Iterable[str],
        known: Collection[str],
        what: str,
        where: tuple[str, ...],
        fallback: Source,
    ) -> None:
        """A :meth:`reference_error` for each of ``names`` (listed at ``where`` + ``section``)
        that is not among ``known``."""
        at = (*where, section)
        for name in names:
            if name not in known:
                source = self.item_source(at, name, fallback)
                self.reference_error(section, name, list(known), what, source, at)

    def reference_error(
        self,
        section: str,
        name: str,
        known: Sequence[str],
        what: str,
        source: Source,
        segments: Sequence[str],
    ) -> None:
        """An unknown ``name`` in a list of references to ``section``; when its definition was
        refused, said as a consequence of that error."""
        refused = self.refused.get(section, {}).get(name)
        if refused is None:
            self.error(unknown(name, known, what), source, segments)
            return
        self.error(
            f"unknown {what} {name!r}: its definition at {refused.file}:{refused.line} was "
            "refused (see that error)",
            source,
            segments,
            follow_on=True,
        )


@dataclass
class _Raw:
    """Top-level entries collected from every file: defaults and groups as trees (checked once
    all files are read), workstations and users already checked."""

    defaults: list[tuple[str, yamldoc.YNode]] = field(default_factory=list)
    groups: dict[str, tuple[str, yamldoc.YNode, Source]] = field(default_factory=dict)
    # Workstations and users are checked as soon as their file is read, so that each file's
    # tree can be dropped before the next one is composed (peak memory of large inventories).
    workstations: dict[str, Workstation] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=dict)
    # Where each name of each section was first defined, for the duplicate check.
    sources: dict[str, dict[str, Source]] = field(default_factory=dict)


def inventory_files(root: Path) -> list[Path]:
    """The YAML files of an inventory directory in a stable order (recipients.yaml excluded).

    Hidden and :data:`SKIPPED_DIRS` folders are not entered, and links to folders not
    followed.
    """
    if not root.is_dir():
        raise InventoryError(f"inventory directory {root} does not exist")
    found: list[Path] = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS]
        found += (
            Path(directory) / name
            for name in filenames
            if not name.startswith(".")
            and name != RECIPIENTS_FILE
            and name.endswith((".yaml", ".yml"))
            and os.path.isfile(os.path.join(directory, name))
        )
    return sorted(found)


def load_inventory(root: Path, *, workers: int | None = None) -> Inventory:
    """Load, check and cross-reference every file of an inventory directory.

    ``workers``: the processes that may compose the YAML files (default: as many as the
    inventory's size is worth; 1: this process only).
    """
    with gcpause.paused_gc():
        return _load_inventory(root, workers)


def inventory_realm(root: Path) -> str:
    """The realm named in the inventory's ``recipients.yaml``; its keys are not checked here."""
    path = root / RECIPIENTS_FILE
    if not path.is_file():
        raise InventoryError(
            f"{path} does not exist: the inventory has no realm yet (create it with "
            "'provisioner keys init')"
        )
    data = yamldoc.load_data(path)
    realm = data.get("realm") if isinstance(data, Mapping) else None
    if not isinstance(realm, str) or not realm.strip():
        raise InventoryError("names no realm (realm: NAME)", file=str(path))
    return realm


def _load_inventory(root: Path, workers: int | None) -> Inventory:
    files = inventory_files(root)
    context = _Context(load_key_table())
    raw = _Raw()
    for path, loaded in _trees(files, workers):
        if isinstance(loaded, InventoryError):
            context.errors.append(loaded)
            context.unparsed.append(str(path))
            continue
        tree, problems = loaded
        for problem in problems:
            context.error(
                problem.message, Source(str(path), problem.line, problem.column), problem.segments
            )
        if tree is not None:
            _collect(context, raw, str(path), tree)
    defaults = _defaults(context, raw)
    groups = {
        name: _group(context, name, node, source) for name, (_, node, source) in raw.groups.items()
    }
    workstations = raw.workstations
    users = raw.users
    inventory = Inventory(
        root=str(root),
        defaults=defaults,
        groups=groups,
        workstations=_link_users(workstations, users),
        users=users,
        files=tuple(str(p) for p in files),
    )
    if not context.unparsed:
        # A file that did not parse may define the groups, workstations and users others refer
        # to: checking references without it buries the real error under false ones.
        _cross_check(context, inventory)
    if context.errors or context.follow_ons:
        # Entities are checked file by file as they are read: report in file order; a reference
        # to an entity whose definition was refused follows from that error, so it comes after
        # every other one.
        raise InventoryErrors(
            [*_in_file_order(context.errors), *_in_file_order(context.follow_ons)]
        )
    return inventory


def _in_file_order(errors: Sequence[InventoryError]) -> list[InventoryError]:
    return sorted(errors, key=lambda e: (e.file or "", e.line or 0, e.column or 0))


_Composed = tuple[yamldoc.YNode | None, tuple[yamldoc.Problem, ...]] | InventoryError


def _trees(files: Sequence[Path], workers: int | None) -> Iterator[tuple[Path, _Composed]]:
    """Every file's positioned tree (or why it has none), in order.

    Composing is the larger half of a load; for a large inventory forked workers compose the
    files while this process checks the ones already composed (``workers``: forced count).
    """
    if workers is None:
        size = sum(_size(path) for path in files)
        workers = parallel.workers_for(size, per_worker=BYTES_PER_COMPOSE_WORKER)
    return zip(files, parallel.map_ordered(_composed, files, workers), strict=True)


def _composed(path: Path) -> _Composed:
    """The file's tree and problems, or why it has none (returned: the load goes on)."""
    try:
        return yamldoc.load_tree(path)
    except InventoryError as exc:
        return exc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reading it reports why


# --------------------------------------------------------------------------- top level


def _collect(context: _Context, raw: _Raw, file: str, tree: yamldoc.YNode) -> None:
    if tree.kind != "map":
        context.error(
            "an inventory file must be a mapping with defaults, groups, workstations or users",
            Source(file, tree.line, tree.column),
            (),
        )
        return
    for (section, node), (line, column) in zip(tree.items, tree.key_positions, strict=True):
        source = Source(file, line, column)
        if section not in TOP_LEVEL:
            context.error(unknown(section, TOP_LEVEL, "top-level section"), source, (section,))
            continue
        if section == "defaults":
            raw.defaults.append((file, node))
            continue
        if node.kind == "scalar" and node.value is None:
            continue
        if node.kind != "map":
            context.error(f"{section} must be a mapping of names", source, (section,))
            continue
        seen = raw.sources.setdefault(section, {})
        for (name, child), (kline, kcol) in zip(node.items, node.key_positions, strict=True):
            entry_source = Source(file, kline, kcol)
            if not NAME_RE.match(name):
                context.error(
                    "names are 1-63 letters, digits, '.', '_' or '-', starting with a letter or "
                    "digit",
                    entry_source,
                    (section, name),
                )
                context.refused.setdefault(section, {})[name] = entry_source
                continue
            if name in seen:
                first = seen[name]
                context.error(
                    f"{section[:-1]} {name!r} is defined twice (first at {first.file}:"
                    f"{first.line})",
                    entry_source,
                    (section, name),
                )
                continue
            reserved = winpath.reserved_name_problem(name) if section != "groups" else None
            if reserved is not None:
                # Names become folder names (render's output) and are shown on Windows.
                context.error(
                    f"{section[:-1]} name {name!r} {reserved}; rename it",
                    entry_source,
                    (section, name),
                )
                context.refused.setdefault(section, {})[name] = entry_source
                continue
            seen[name] = entry_source
            if section == "groups":
                raw.groups[name] = (file, child, entry_source)
            elif section == "workstations":
                raw.workstations[name] = _workstation(context, name, child, entry_source)
            else:
                raw.users[name] = _user(context, name, child, entry_source)


def _mapping(
    context: _Context,
    node: yamldoc.YNode,
    file: str,
    segments: tuple[str, ...],
    allowed: Sequence[str],
    what: str,
) -> dict[str, tuple[yamldoc.YNode, Source]]:
    """The children of a mapping node, unknown keys reported."""
    if node.kind == "scalar" and node.value is None:
        return {}
    if node.kind != "map":
        context.error(f"{what} must be a mapping", Source(file, node.line, node.column), segments)
        return {}
    out: dict[str, tuple[yamldoc.YNode, Source]] = {}
    for (key, child), (line, column) in zip(node.items, node.key_positions, strict=True):
        source = Source(file, line, column)
        if key not in allowed:
            context.error(unknown(key, allowed, f"key of {what}"), source, (*segments, key))
            continue
        out[key] = (child, source)
    return out


# --------------------------------------------------------------------------- values


def _text(
    context: _Context, node: yamldoc.YNode, source: Source, segments: tuple[str, ...]
) -> str | None:
    if node.kind != "scalar" or node.value is None or isinstance(node.value, bool):
        context.error("expected a text value", source, segments)
        return None
    if isinstance(node.value, float):
        context.error("expected a text value; quote it", source, segments)
        return None
    value = str(node.value)
    if _CONTROL.search(value):
        context.error(
            "the value contains a line break or control character (it would inject INI lines)",
            source,
            segments,
        )
        return None
    if value.lower().startswith(TOKEN_PREFIX):
        # Where the token starts, as `secrets lint` says it.
        context.error(
            "a sipvault token outside a secret field", _value_source(source, node), segments
        )
        return None
    return value


def _names(
    context: _Context, node: yamldoc.YNode, source: Source, segments: tuple[str, ...]
) -> tuple[str, ...]:
    if node.kind == "scalar" and node.value is None:
        return ()
    if node.kind != "seq":
        context.error("expected a list of names", source, segments)
        return ()
    names: list[str] = []
    positions = context.item_sources.setdefault(segments, {})
    for index, item in node.items:
        item_source = Source(source.file, item.line, item.column)
        value = _text(context, item, item_source, (*segments, index))
        if value is not None and value in names:
            context.error(f"{value!r} is listed twice", item_source, (*segments, index))
        elif value is not None:
            names.append(value)
            positions[value] = item_source
    return tuple(names)


def _coerce_microsip(
    context: _Context, spec: KeySpec, node: yamldoc.YNode, source: Source, segments: tuple[str, ...]
) -> object:
    """A MicroSIP value in its canonical form (ints for 0/1 and numbers, text otherwise)."""
    name = segments[-1]  # as written: display_name stands for displayName
    value = node.value
    if node.kind == "seq" and spec.type in ("list", "codecs"):
        parts = []
        for index, item in node.items:
            item_source = Source(source.file, item.line, item.column)
            if _number_for_text(context, spec, item, item_source, (*segments, index)):
                return None
            part = _text(context, item, item_source, (*segments, index))
            if part is None:
                return None
            parts.append(part)
        separator = " " if spec.type == "codecs" or spec.key == "proxy" else ";"
        value = separator.join(parts)
    elif node.kind != "scalar":
        context.error(f"{name} takes a single value", source, segments)
        return None
    if value is None:
        value = ""
    if spec.type == "bool01":
        if isinstance(value, bool) or value in (0, 1, "0", "1"):
            return int(value)
        context.error(f"{name} is 0 or 1 (or true/false), got {value!r}", source, segments)
        return None
    if spec.type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
                value = int(value)
            else:
                context.error(f"{name} is a whole number, got {value!r}", source, segments)
                return None
        if (spec.min is not None and value < spec.min) or (
            spec.max is not None and value > spec.max
        ):
            context.error(
                f"{name} must be between {spec.min} and {spec.max}, got {value}",
                source,
                segments,
            )
            return None
        return value
    if isinstance(value, bool):
        context.error(f"{name} takes text; quote {str(value).lower()!r}", source, segments)
        return None
    if isinstance(value, float) and not math.isfinite(value):
        context.error(f"{name} takes text", source, segments)
        return None
    if spec.type != "enum" and _number_for_text(context, spec, node, source, segments):
        return None
    text = str(value)
    if text.lower().startswith(TOKEN_PREFIX):
        # Where the token starts, as `secrets lint` says it.
        context.error(
            "a sipvault token outside a secret field", _value_source(source, node), segments
        )
        return None
    if _CONTROL.search(text):
        context.error(
            "the value contains a line break or control character (it would inject INI lines)",
            source,
            segments,
        )
        return None
    if spec.type == "enum" and text not in spec.allowed:
        shown = ", ".join(repr(a) for a in spec.allowed)
        close = closest(text, spec.allowed, cutoff=0.5)
        hint = f"; did you mean {close!r}?" if close else ""
        context.error(f"{name} must be one of {shown}, got {text!r}{hint}", source, segments)
        return None
    if len(text) > spec.max_len:
        context.error(
            f"{name} is {len(text)} characters long, more than the {spec.max_len} MicroSIP "
            "keeps (it would truncate it)",
            source,
            segments,
        )
        return None
    problem = _readback_problem(name, text, quotes_kept=_quotes_kept(spec))
    if problem is not None:
        context.error(problem, source, segments)
        return None
    return text


def _quotes_kept(spec: KeySpec) -> bool:
    """True for keys MicroSIP saves wrapped in quotes (hooks, device names)."""
    return spec.type == "command" or spec.key in _SAVED_QUOTED


def _readback_problem(key: str, text: str, *, quotes_kept: bool) -> str | None:
    """Why MicroSIP would read ``text`` back differently, or None.

    ``GetPrivateProfileString`` strips surrounding whitespace and one pair of enclosing quotes.
    For keys MicroSIP itself saves in quotes the renderer adds a protective pair instead.
    """
    if text != text.strip():
        return f"{key} starts or ends with whitespace, which Windows strips when MicroSIP reads it"
    if not quotes_kept and unquote(text) != text:
        return (
            f"{key} is enclosed in quotes, which Windows strips when MicroSIP reads it "
            "(and MicroSIP saves this key without them); remove the quotes"
        )
    return None


def _number_for_text(
    context: _Context,
    spec: KeySpec,
    node: yamldoc.YNode,
    source: Source,
    segments: tuple[str, ...],
) -> bool:
    """Report a number YAML would not keep as written (0049 reads as 49, 1.10 as 1.1)."""
    if node.kind != "scalar" or node.tag not in ("int", "float"):
        return False
    written = context.plain_text(source.file, node.line, node.column)
    if written is not None and written == str(node.value):
        return False
    shown = f"{written!r} " if written else ""
    context.error(
        f"{spec.key} takes text, and YAML reads {shown}as the number {node.value!r}; "
        "quote the value to keep it as written",
        source,
        segments,
    )
    return True


def _microsip_block(
    context: _Context,
    node: yamldoc.YNode,
    file: str,
    segments: tuple[str, ...],
    section: str,
    layer: str,
) -> dict[str, Sourced]:
    """A block of MicroSIP keys of one section (Settings or Account)."""
    if node.kind == "scalar" and node.value is None:
        return {}
    if node.kind != "map":
        context.error(
            f"{segments[-1]} must be a mapping of MicroSIP keys",
            Source(file, node.line, node.column),
            segments,
        )
        return {}
    out: dict[str, Sourced] = {}
    for (key, child), (line, column) in zip(node.items, node.key_positions, strict=True):
        source = Source(file, line, column, layer)
        key_segments = (*segments, key)
        spec = context.table.lookup(section, key)
        if spec is None or (spec.key != key and spec.key.lower() == key.lower()):
            context.error(_microsip_unknown(context.table, section, key), source, key_segments)
            continue
        if spec.is_runtime:
            context.error(
                f"MicroSIP rewrites {key} itself (window, volume, toggle or history state); "
                "do not manage it",
                source,
                key_segments,
            )
            continue
        if section == "Settings" and key == "accountId":
            context.error(
                "accountId is written for the account marked 'active: true'; mark that "
                "account instead",
                source,
                key_segments,
            )
            continue
        if section == "Account" and key == "password":
            context.error(
                "passwords belong in an account entry (users.NAME.accounts.ID.password)",
                source,
                key_segments,
            )
            continue
        value = _coerce_microsip(context, spec, child, source, key_segments)
        if value is not None:
            out[key] = Sourced(value, source, join_pointer(list(key_segments)))  # type: ignore[arg-type]
    return out


def _microsip_unknown(table: KeyTable, section: str, key: str) -> str:
    label = "[Settings]" if section == "Settings" else "[AccountN]"
    reason = table.non_key(section, key)
    suggestion = table.suggest(section, key)
    spec = table.lookup(section, key)
    if suggestion is None and spec is not None and spec.key != key:
        suggestion = spec.key  # the inventory takes the exact spelling
    message = f"{key} is not a MicroSIP {label} key"
    if reason:
        message += f" ({reason})"
    if suggestion:
        message += f"; did you mean {suggestion}?"
    return message


def _options_block(
    context: _Context,
    node: yamldoc.YNode,
    file: str,
    segments: tuple[str, ...],
    options: Mapping[str, OptionSpec],
    layer: str,
) -> dict[str, Sourced]:
    entries = _mapping(context, node, file, segments, tuple(options), segments[-1])
    out: dict[str, Sourced] = {}
    for key, (child, key_source) in entries.items():
        source = Source(key_source.file, key_source.line, key_source.column, layer)
        spec = options[key]
        key_segments = (*segments, key)
        value: object = child.value
        if spec.type == "roots":
            roots = _roots(context, child, source, key_segments)
            if roots is not None:
                out[key] = Sourced(roots, source, join_pointer(list(key_segments)))
            continue
        if child.kind != "scalar":
            context.error(f"{key} takes a single value", source, key_segments)
            continue
        if spec.type == "secret":
            source = _value_source(source, child)
            if not (isinstance(value, str) and value.startswith(TOKEN_PREFIX)):
                context.error(
                    "plain text in a secret field; seal it with 'provisioner secrets set "
                    f"--path {join_pointer(list(key_segments))}'",
                    source,
                    key_segments,
                )
                continue
        elif spec.type == "bool":
            if not isinstance(value, bool):
                context.error(f"{key} is true or false", source, key_segments)
                continue
        elif spec.type == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                context.error(f"{key} is a whole number", source, key_segments)
                continue
            if (spec.minimum is not None and value < spec.minimum) or (
                spec.maximum is not None and value > spec.maximum
            ):
                context.error(
                    f"{key} must be between {spec.minimum} and {spec.maximum}",
                    source,
                    key_segments,
                )
                continue
        else:
            text = _text(context, child, source, key_segments)
            if text is None:
                continue
            if spec.type == "enum" and text not in spec.allowed:
                context.error(
                    f"{key} must be one of {', '.join(spec.allowed)}, got {text!r}",
                    source,
                    key_segments,
                )
                continue
            problem = (
                winpath.install_dir_problem(text)
                if spec.type == "folder"
                else winpath.file_name_problem(text)
                if spec.type == "file"
                else "is not a version like '3.21.6' (digits and dots)"
                if spec.type == "version" and parse_version(text) is None
                else None
            )
            if problem is not None:
                context.error(f"{key} '{text}' {problem}", source, key_segments)
                continue
            value = text
        out[key] = Sourced(value, source, join_pointer(list(key_segments)))
    if "exe" in out and not str(out["exe"].value).lower().endswith(".exe"):
        context.error(
            "exe is the program's file name, e.g. microsip.exe",
            out["exe"].source,
            (*segments, "exe"),
        )
    return out


def _roots(
    context: _Context, node: yamldoc.YNode, source: Source, segments: tuple[str, ...]
) -> tuple[str, ...] | None:
    """``microsip.appdata_roots``: a list of folders where users' AppData may be redirected."""
    if node.kind != "seq":
        context.error(
            "expected a list of folders, e.g. ['\\\\fs01\\redirect$\\%USERNAME%']",
            source,
            segments,
        )
        return None
    roots: list[str] = []
    for index, item in node.items:
        item_source = Source(source.file, item.line, item.column, source.layer)
        text = _text(context, item, item_source, (*segments, index))
        if text is None:
            return None
        problem = winpath.appdata_root_problem(text)
        if problem is not None:
            context.error(f"appdata root '{text}' {problem}", item_source, (*segments, index))
            return None
        roots.append(text)
    return tuple(roots)


def _layer(
    context: _Context,
    entries: Mapping[str, tuple[yamldoc.YNode, Source]],
    file: str,
    segments: tuple[str, ...],
    layer: str,
) -> Layer:
    blocks: dict[str, dict[str, Sourced]] = {}
    for block in ("settings", "account"):
        if block in entries:
            section = "Settings" if block == "settings" else "Account"
            blocks[block] = _microsip_block(
                context, entries[block][0], file, (*segments, block), section, layer
            )
    if "enforced" in entries:
        enforced = _mapping(
            context,
            entries["enforced"][0],
            file,
            (*segments, "enforced"),
            ("settings", "account"),
            "enforced",
        )
        for block, (node, _) in enforced.items():
            section = "Settings" if block == "settings" else "Account"
            blocks[f"enforced_{block}"] = _microsip_block(
                context,
                node,
                file,
                (*segments, "enforced", block),
                section,
                f"{layer} (enforced)",
            )
    if "winrm" in entries:
        blocks["winrm"] = _options_block(
            context, entries["winrm"][0], file, (*segments, "winrm"), WINRM_OPTIONS, layer
        )
    if "microsip" in entries:
        blocks["microsip"] = _options_block(
            context,
            entries["microsip"][0],
            file,
            (*segments, "microsip"),
            MICROSIP_OPTIONS,
            layer,
        )
    return Layer(**blocks)


# --------------------------------------------------------------------------- entities


def _defaults(context: _Context, raw: _Raw) -> Layer:
    if len(raw.defaults) > 1:
        files = ", ".join(f for f, _ in raw.defaults)
        file, node = raw.defaults[1]
        context.error(
            f"defaults are defined in more than one file ({files})",
            Source(file, node.line, node.column),
            ("defaults",),
        )
    if not raw.defaults:
        return Layer()
    file, node = raw.defaults[0]
    entries = _mapping(context, node, file, ("defaults",), LAYER_BLOCKS, "defaults")
    return _layer(context, entries, file, ("defaults",), "defaults")


def _group(context: _Context, name: str, node: yamldoc.YNode, source: Source) -> Group:
    segments = ("groups", name)
    entries = _mapping(context, node, source.file, segments, GROUP_KEYS, f"group {name}")
    parents: tuple[str, ...] = ()
    if "parents" in entries:
        parents = _names(context, *entries["parents"], (*segments, "parents"))
    description = ""
    if "description" in entries:
        description = _text(context, *entries["description"], (*segments, "description")) or ""
    layer = _layer(context, entries, source.file, segments, f"group {name}")
    return Group(name, parents, layer, source, description)


def _workstation(context: _Context, name: str, node: yamldoc.YNode, source: Source) -> Workstation:
    segments = ("workstations", name)
    entries = _mapping(
        context, node, source.file, segments, WORKSTATION_KEYS, f"workstation {name}"
    )
    address = _address(context, name, entries, source, segments)
    groups = (
        _names(context, *entries["groups"], (*segments, "groups")) if "groups" in entries else ()
    )
    users = _names(context, *entries["users"], (*segments, "users")) if "users" in entries else ()
    description = ""
    if "description" in entries:
        description = _text(context, *entries["description"], (*segments, "description")) or ""
    layer = _layer(context, entries, source.file, segments, f"workstation {name}")
    return Workstation(name, address, groups, users, layer, source, description)


def _address(
    context: _Context,
    name: str,
    entries: Mapping[str, tuple[yamldoc.YNode, Source]],
    source: Source,
    segments: tuple[str, ...],
) -> str:
    """The workstation's address (its name when absent): a host name or an IP literal only.

    An inventory editor controls it; anything else (a URL, ``host:port``, a user@, a number
    the resolver reads as an IPv4 address) would change where the controller connects.
    """
    at = (*segments, "address")
    if "address" not in entries:
        problem = address_problem(name)
        if problem is not None:
            context.error(
                f"the workstation's name is its address unless 'address' is set: {problem}",
                source,
                at,
            )
        return name
    node, key_source = entries["address"]
    value = _text(context, node, Source(key_source.file, node.line, node.column), at)
    if value is None:
        return name
    problem = address_problem(value)
    if problem is not None:
        context.error(problem, Source(key_source.file, node.line, node.column), at)
    return value


def _user(context: _Context, name: str, node: yamldoc.YNode, source: Source) -> User:
    segments = ("users", name)
    entries = _mapping(context, node, source.file, segments, USER_KEYS, f"user {name}")
    windows = name
    if "windows" in entries:
        value = _text(context, *entries["windows"], (*segments, "windows"))
        if value is not None and not WINDOWS_USER_RE.match(value):
            context.error(
                r"windows is DOMAIN\user, or .\user for a local account",
                entries["windows"][1],
                (*segments, "windows"),
            )
        windows = value or name
    else:
        windows = f".\\{name}"
    display_name = ""
    if "display_name" in entries:
        display_name = _text(context, *entries["display_name"], (*segments, "display_name")) or ""
    groups = (
        _names(context, *entries["groups"], (*segments, "groups")) if "groups" in entries else ()
    )
    stations = (
        _names(context, *entries["workstations"], (*segments, "workstations"))
        if "workstations" in entries
        else ()
    )
    layer = _layer(context, entries, source.file, segments, f"user {name}")
    if layer.enforced_settings or layer.enforced_account or layer.winrm or layer.microsip:
        context.error("users cannot carry enforced, winrm or microsip blocks", source, segments)
    if display_name and "displayName" not in layer.account:
        layer = _with_display_name(context, layer, entries["display_name"], segments, name)
    accounts: tuple[SipAccount, ...] = ()
    if "accounts" in entries:
        accounts = _accounts(context, name, *entries["accounts"], (*segments, "accounts"))
    else:
        context.error("a user needs at least one SIP account under accounts", source, segments)
    return User(name, windows, display_name, groups, stations, layer, accounts, source)


def _with_display_name(
    context: _Context,
    layer: Layer,
    entry: tuple[yamldoc.YNode, Source],
    segments: tuple[str, ...],
    name: str,
) -> Layer:
    """``display_name`` is the user's default account ``displayName`` (an account's own wins)."""
    node, at = entry
    source = Source(at.file, at.line, at.column, f"user {name}")
    key_segments = (*segments, "display_name")
    spec = context.table.lookup("Account", "displayName")
    assert spec is not None  # noqa: S101 - displayName is in the key table
    value = _coerce_microsip(context, spec, node, source, key_segments)
    if value is None:
        return layer
    shown = Sourced(value, source, join_pointer(list(key_segments)))  # type: ignore[arg-type]
    return replace(layer, account={"displayName": shown, **layer.account})


def _accounts(
    context: _Context,
    user: str,
    node: yamldoc.YNode,
    source: Source,
    segments: tuple[str, ...],
) -> tuple[SipAccount, ...]:
    if node.kind == "seq":
        context.error(
            "accounts is a mapping keyed by a stable id (e.g. 'main:'), not a list: a "
            "password is sealed for its path, and list positions move",
            source,
            segments,
        )
        return ()
    if node.kind != "map" or not node.items:
        context.error("accounts must map an account id to its settings", source, segments)
        return ()
    allowed = context.account_keys
    accounts: list[SipAccount] = []
    for (account_id, child), (line, column) in zip(node.items, node.key_positions, strict=True):
        account_source = Source(source.file, line, column, f"account {user}/{account_id}")
        account_segments = (*segments, account_id)
        if not NAME_RE.match(account_id):
            context.error(
                "account ids are 1-63 letters, digits, '.', '_' or '-', starting with a letter "
                "or digit",
                account_source,
                account_segments,
            )
            continue
        if child.kind != "map":
            context.error("an account is a mapping of keys", account_source, account_segments)
            continue
        keys: dict[str, Sourced] = {}
        active = False
        for (key, value), (kline, kcol) in zip(child.items, child.key_positions, strict=True):
            key_source = Source(source.file, kline, kcol, f"account {user}/{account_id}")
            key_segments = (*account_segments, key)
            if key == "active":
                if not isinstance(value.value, bool):
                    context.error("active must be true or false", key_source, key_segments)
                active = value.value is True
                continue
            if key == "sip_uri":
                text = _text(context, value, key_source, key_segments)
                match = SIP_URI_RE.match(text or "")
                if text is not None and match is None:
                    context.error(
                        "sip_uri is user@domain, e.g. 1001@pbx.example.com",
                        key_source,
                        key_segments,
                    )
                elif match is not None and unquote(match.group(1)) != match.group(1):
                    context.error(
                        "the user part of sip_uri is enclosed in quotes, which Windows strips "
                        "when MicroSIP reads username; remove them",
                        key_source,
                        key_segments,
                    )
                elif match is not None:
                    pointer = join_pointer(list(key_segments))
                    keys.setdefault("username", Sourced(match.group(1), key_source, pointer))
                    keys.setdefault("domain", Sourced(match.group(2), key_source, pointer))
                continue
            if key == "password":
                keys[key] = _password(context, value, key_source, key_segments)
                continue
            if key not in allowed:
                context.error(
                    _microsip_unknown(context.table, "Account", key), key_source, key_segments
                )
                continue
            spec = context.table.lookup("Account", key)
            assert spec is not None  # noqa: S101 - allowed keys come from the table
            coerced = _coerce_microsip(context, spec, value, key_source, key_segments)
            if coerced is not None:
                keys[key] = Sourced(coerced, key_source, join_pointer(list(key_segments)))  # type: ignore[arg-type]
        accounts.append(SipAccount(account_id, active, keys, account_source))
    actives = [a for a in accounts if a.active]
    if len(accounts) == 1 and not actives:
        accounts[0] = SipAccount(accounts[0].id, True, accounts[0].keys, accounts[0].source)
    elif len(actives) != 1 and accounts:
        if actives:
            named = ", ".join(f"{a.id!r} (line {a.source.line})" for a in actives)
            message = (
                f"two or more accounts are active: {named}; exactly one may be, remove "
                "'active: true' from all but one"
            )
        else:
            message = "several accounts and none is active; mark exactly one 'active: true'"
        context.error(message, source, segments)
    return tuple(accounts)


def _value_source(key_source: Source, node: yamldoc.YNode) -> Source:
    """Where a secret's written value starts, where `secrets lint` points at it too (a value
    left empty: where its key is)."""
    if node.kind == "scalar" and isinstance(node.value, str) and node.value:
        return Source(key_source.file, node.line, node.column, key_source.layer)
    return key_source


def _password(
    context: _Context, node: yamldoc.YNode, source: Source, segments: tuple[str, ...]
) -> Sourced:
    pointer = join_pointer(list(segments))
    value = node.value
    if not is_secret_path(segments):
        context.error("this path is not a declared secret field", source, segments)
    at = _value_source(source, node)
    if node.kind != "scalar" or not (isinstance(value, str) and value.startswith(TOKEN_PREFIX)):
        if value is None or value == "":
            context.error(
                f"no password set; run 'provisioner secrets set --path {pointer}'",
                source,
                segments,
            )
        else:
            context.error(
                f"plain text in a secret field; seal it with 'provisioner secrets set --path "
                f"{pointer}'",
                at,
                segments,
            )
        return Sourced(None, source, pointer)
    return Sourced(value, at, pointer)


# --------------------------------------------------------------------------- cross references


def _link_users(
    workstations: Mapping[str, Workstation], users: Mapping[str, User]
) -> dict[str, Workstation]:
    """Users may name their workstations, workstations their users: make both views agree."""
    named_by_users: dict[str, list[str]] = {}
    for user in users.values():
        for station_name in user.workstations:
            named_by_users.setdefault(station_name, []).append(user.name)
    linked: dict[str, Workstation] = {}
    for name, station in workstations.items():
        names = list(station.users)
        for user_name in named_by_users.get(name, ()):
            if user_name not in names:
                names.append(user_name)
        linked[name] = Workstation(
            station.name,
            station.address,
            station.groups,
            tuple(names),
            station.layer,
            station.source,
            station.description,
        )
    return linked


def _cross_check(context: _Context, inventory: Inventory) -> None:
    groups = inventory.groups
    at: tuple[str, ...]
    for group in groups.values():
        at = ("groups", group.name, "parents")
        for parent in group.parents:
            if parent not in groups:
                context.reference_error(
                    "groups",
                    parent,
                    list(groups),
                    "parent group",
                    context.item_source(at, parent, group.source),
                    at,
                )
    for cycle in _group_cycles(groups):
        first = groups[cycle[0]]
        context.error(
            "group cycle: " + " -> ".join([*cycle, cycle[0]]),
            first.source,
            ("groups", first.name, "parents"),
        )
    for station in inventory.workstations.values():
        where = ("workstations", station.name)
        context.unknown_references("groups", station.groups, groups, "group", where, station.source)
        # A user that names this workstation is known; only listed names can be wrong.
        context.unknown_references(
            "users", station.users, inventory.users, "user", where, station.source
        )
    placed = {name for s in inventory.workstations.values() for name in s.users}
    for user in inventory.users.values():
        where = ("users", user.name)
        context.unknown_references("groups", user.groups, groups, "group", where, user.source)
        context.unknown_references(
            "workstations",
            user.workstations,
            inventory.workstations,
            "workstation",
            where,
            user.source,
        )
        if user.name not in placed:
            context.error(
                "the user is on no workstation; list it under a workstation's users or the "
                "user's workstations",
                user.source,
                where,
            )


def _group_cycles(groups: Mapping[str, Group]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for parent in groups[name].parents:
            if parent not in groups:
                continue
            if state.get(parent) == 1:
                cycles.append(stack[stack.index(parent) :])
            elif parent not in state:
                visit(parent, stack)
        stack.pop()
        state[name] = 2

    for name in groups:
        if name not in state:
            visit(name, [])
    return cycles
