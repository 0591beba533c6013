"""Phase 1 composed: load, resolve, open, render, serialise and lint every selected target.

Nothing here touches the network. The result lists every finding of the run at once; a run
with an error finding must not proceed to any workstation.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import provisioner.microsip.lint as ini_lint
from provisioner import gcpause, parallel
from provisioner.errors import InventoryError, ProvisionerError, RenderError, VaultError
from provisioner.inventory import resolve
from provisioner.inventory.loader import RECIPIENTS_FILE, InventoryErrors, load_inventory
from provisioner.inventory.model import TEMPLATE_LAYER, Finding, Inventory, Secret, Source
from provisioner.inventory.resolve import Profile, Selection, StationPlan, TargetRef
from provisioner.microsip import ini
from provisioner.microsip.inidoc import PASSWORD_KEY, IniDocument, IniEntry, is_password_key
from provisioner.microsip.keytable import load_key_table
from provisioner.render import jinja
from provisioner.render.budget import DEFAULT_BUDGET, RenderBudget, stop_clock
from provisioner.secrets import vault

TEMPLATES_DIR = "templates"


@dataclass(frozen=True, slots=True)
class BuiltFile:
    """A rendered target in MicroSIP's encoding. ``data`` may hold plaintext passwords."""

    target: TargetRef
    relative_path: str
    data: bytes = field(repr=False)
    install: resolve.Install
    secret_paths: tuple[str, ...] = ()
    windows: str = ""
    accounts: int = 0

    @property
    def document(self) -> IniDocument:
        """The file as MicroSIP reads it; parsed on demand, as most callers need only bytes."""
        return ini.parse_ini(ini.decode_ini_bytes(self.data))


@dataclass
class BuildResult:
    """What Phase 1 produced: files, findings and timings."""

    inventory: Inventory | None = None
    recipients: vault.Recipients | None = None
    targets: list[TargetRef] = field(default_factory=list)
    files: list[BuiltFile] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    workers: int = 1

    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return not any(f.severity == "error" for f in self.findings)

    def counts(self) -> Counter[str]:
        """Findings per severity."""
        return Counter(f.severity for f in self.findings)


OpenerFactory = Callable[[vault.Recipients], vault.Opener]

# Below this many targets per process, forking costs more than it saves.
TARGETS_PER_WORKER = 1000
# A worker sends its files on in parts of this many targets (about 1 MB).
TARGETS_PER_PART = 500


def placeholder_opener(recipients: vault.Recipients) -> vault.Opener:
    """Key-less opener for CI: ``PH-<pathtag>`` per path after every structural check."""
    return vault.PlaceholderOpener(recipients)


def build(
    root: Path,
    *,
    selection: Selection | None = None,
    opener_factory: OpenerFactory = placeholder_opener,
    templates: Path | None = None,
    workers: int | None = None,
    budget: RenderBudget = DEFAULT_BUDGET,
) -> BuildResult:
    """Run Phase 1 for every selected target of the inventory at ``root``.

    ``workers``: the processes Phase 1 may use, for the load and for the targets (default: as
    many as the work is worth, see :func:`parallel.workers_for`; 1: everything in this
    process). ``budget``: what rendering one file may use (CPU time, output, memory).
    """
    with gcpause.paused_gc():
        return _build(root, selection, opener_factory, templates, workers, budget)


def _build(
    root: Path,
    selection: Selection | None,
    opener_factory: OpenerFactory,
    templates: Path | None,
    workers: int | None,
    budget: RenderBudget,
) -> BuildResult:
    result = BuildResult()
    clock = _Clock(result.timings)
    with clock("load"):
        try:
            inventory = load_inventory(root, workers=workers)
        except InventoryErrors as exc:
            # In the loader's order: a reference's error after the error that caused it.
            result.findings.extend(_inventory_finding(e) for e in exc.errors)
            return result
        except InventoryError as exc:
            result.findings.append(_inventory_finding(exc))
            return result
        try:
            recipients = vault.load_recipients_file(root / RECIPIENTS_FILE)
        except ProvisionerError as exc:
            result.findings.append(Finding("error", "recipients", str(exc)))
            return result
    result.inventory, result.recipients = inventory, recipients
    selection = selection or Selection()
    try:
        result.targets = resolve.select_targets(inventory, selection)
        unmatched = selection.unmatched(inventory) if selection.expression.strip() else []
    except ProvisionerError as exc:
        result.findings.append(Finding("error", "limit", str(exc)))
        return result
    result.findings.extend(Finding("warning", "limit-unmatched", text) for text in unmatched)
    if not result.targets:
        return result  # nothing to open: no key is asked for
    opener = opener_factory(recipients)
    env = jinja.make_environment([templates or root / TEMPLATES_DIR], budget=budget)
    builder = _Builder(inventory, recipients, opener, env)
    try:
        result.findings.extend(builder.compile_templates())
        if workers is None:
            workers = parallel.workers_for(len(result.targets), per_worker=TARGETS_PER_WORKER)
        result.workers = max(1, min(workers, len(result.targets)))
        for part in parallel.map_chunks(builder.build_all, result.targets, result.workers):
            result.files.extend(part.files)
            result.findings.extend(part.findings)
            for phase, seconds in part.timings.items():
                # With several workers, a phase's figure is the sum over the processes.
                result.timings[phase] = result.timings.get(phase, 0.0) + seconds
    finally:
        stop_clock()  # the timer renders leave running between files
    _copied_tokens(inventory, result)
    result.findings.sort(key=lambda f: (f.severity != "error", f.file, f.line, f.column))
    return result


class _Clock:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    def __call__(self, phase: str) -> _Timer:
        return _Timer(self.timings, phase)


class _Timer:
    def __init__(self, timings: dict[str, float], phase: str) -> None:
        self.timings, self.phase = timings, phase

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        self.timings[self.phase] = self.timings.get(self.phase, 0.0) + elapsed


def _inventory_finding(exc: InventoryError) -> Finding:
    return Finding("error", exc.code, str(exc.args[0]), exc.file, exc.line, exc.column, exc.path)


@dataclass
class _Part:
    """What one worker built from its chunk of targets (picklable: no Secret in it)."""

    files: list[BuiltFile] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class _Builder:
    def __init__(
        self,
        inventory: Inventory,
        recipients: vault.Recipients,
        opener: vault.Opener,
        env: jinja.TemplateEnvironment,
    ) -> None:
        self.inventory = inventory
        self.recipients = recipients
        self.opener = opener
        self.env = env
        self.result = _Part()
        self.clock = _Clock(self.result.timings)
        self.stations: dict[str, StationPlan] = {}
        self.table = load_key_table()
        self.order = {(s.section, s.key): i for i, s in enumerate(self.table.specs)}
        self.templates: dict[str, jinja.Template] = {}
        self.broken_templates: set[str] = set()

    def compile_templates(self) -> list[Finding]:
        """Compile both templates once, before any target: a syntax error is reported once."""
        findings = []
        for name in (jinja.MICROSIP_TEMPLATE, jinja.OVERRIDE_TEMPLATE):
            try:
                self.template(name)
            except ProvisionerError as exc:
                self.broken_templates.add(name)
                findings.append(Finding("error", exc.code, str(exc)))
        return findings

    def template(self, name: str) -> jinja.Template:
        if name in self.broken_templates:
            raise _Skip  # reported once by compile_templates
        if name not in self.templates:
            self.templates[name] = jinja.load_template(self.env, name)
        return self.templates[name]

    def station(self, name: str) -> StationPlan:
        if name not in self.stations:
            self.stations[name] = resolve.resolve_station(self.inventory, name)
        return self.stations[name]

    def build_all(self, targets: Sequence[TargetRef]) -> Iterator[_Part]:
        """Build ``targets``, a part every :data:`TARGETS_PER_PART` (a worker sends each on)."""
        for start in range(0, len(targets), TARGETS_PER_PART):
            self.result = _Part()
            self.clock = _Clock(self.result.timings)
            for target in targets[start : start + TARGETS_PER_PART]:
                self.build(target)
            yield self.result

    def build(self, target: TargetRef) -> None:
        try:
            if target.kind == "override":
                self._override(target)
            else:
                self._microsip(target)
        except _Skip:
            return
        except ProvisionerError as exc:
            at = None
            if isinstance(exc, RenderError) and exc.file:
                at = Source(exc.file, exc.line, 0, TEMPLATE_LAYER)
            self.result.findings.append(
                Finding("error", exc.code, str(exc), target.name, source=at)
            )

    def _override(self, target: TargetRef) -> None:
        plan = self.station(target.workstation)
        context = {
            "workstation": _station_context(plan),
            "install": _install_context(plan.install),
            "enforced": self._sorted("Settings", plan.enforced_settings),
            "users": list(plan.workstation.users),
        }
        with self.clock("render"):
            text = jinja.render(self.template(jinja.OVERRIDE_TEMPLATE), context, target.name)
        path = f"{target.workstation}/override.ini"
        origin = _origin({"settings": plan.enforced_settings}, ())
        self._finish(target, path, text, plan.install, ini_lint.lint_override_ini, origin)

    def _microsip(self, target: TargetRef) -> None:
        assert target.user is not None  # noqa: S101 - microsip targets always have a user
        plan = self.station(target.workstation)
        if plan.install.mode == "portable" and len(plan.workstation.users) != 1:
            raise InventoryError(
                f"workstation {target.workstation} runs MicroSIP in portable mode, where one "
                f"{plan.install.ini_name} next to the program serves every user; it can have "
                "only one user"
            )
        with self.clock("resolve"):
            profile = resolve.resolve_profile(self.inventory, target.workstation, target.user, plan)
        for name in profile.unapplied_groups:
            source = self.inventory.groups[name].source
            self.result.findings.append(
                Finding(
                    "warning",
                    "unapplied-group-blocks",
                    f"the enforced, winrm and microsip blocks of group {name} do not apply to "
                    f"{target.name}: they are per workstation, and the group reaches "
                    f"{target.workstation} only through user {target.user}; list the group "
                    "under the workstation's groups",
                    source.file,
                    source.line,
                    source.column,
                    f"/groups/{name}",
                )
            )
        with self.clock("open"):
            secrets = self._open(profile)
        context = self._microsip_context(profile, secrets)
        with self.clock("render"):
            text = jinja.render(self.template(jinja.MICROSIP_TEMPLATE), context, target.name)
        path = (
            f"{target.workstation}/{plan.install.ini_name}"
            if plan.install.mode == "portable"
            else f"{target.workstation}/{target.user}/{plan.install.ini_name}"
        )
        lint = functools.partial(
            ini_lint.lint_microsip_ini, portable=plan.install.mode == "portable"
        )
        self._finish(
            target,
            path,
            text,
            plan.install,
            lint,
            _origin(
                {"settings": profile.settings},
                profile.accounts,
                [account.source for account in profile.user.accounts],
            ),
            windows=profile.user.windows,
            secrets=secrets,
        )

    def _open(self, profile: Profile) -> list[tuple[int, str, Secret]]:
        opened = []
        for account in profile.accounts:
            password = account.keys.get("password")
            if password is None or password.value is None:
                continue
            pointer = password.final.pointer
            try:
                secret = self.opener.open(str(password.value), pointer)
                vault.check_policy(secret, where=pointer)
            except VaultError as exc:
                source = password.final.source
                self.result.findings.append(
                    Finding(
                        "error",
                        exc.code,
                        str(exc),
                        source.file,
                        source.line,
                        source.column,
                        pointer,
                    )
                )
                raise _Skip from None
            opened.append((account.index, pointer, secret))
        return opened

    def _sorted(self, section: str, values: Mapping[str, resolve.Resolved]) -> dict[str, object]:
        keys = sorted(values, key=lambda k: self.order.get((section, k), len(self.order)))
        return {k: values[k].value for k in keys}

    def _microsip_context(
        self, profile: Profile, secrets: Iterable[tuple[int, str, Secret]]
    ) -> dict[str, object]:
        by_index = {index: secret for index, _, secret in secrets}
        accounts = []
        for account in profile.accounts:
            keys = self._sorted("Account", account.keys)
            if "password" in keys:
                secret = by_index.get(account.index)
                keys["password"] = None if secret is None else jinja.sealed(secret)
            accounts.append(
                {"index": account.index, "id": account.id, "active": account.active, "fields": keys}
            )
        settings = self._sorted("Settings", profile.settings)
        settings.pop("accountId", None)
        return {
            "workstation": _station_context(self.station(profile.workstation.name)),
            "install": _install_context(profile.install),
            "user": {
                "name": profile.user.name,
                "windows": profile.user.windows,
                "display_name": profile.user.display_name,
                "groups": list(profile.groups),
            },
            "settings": settings,
            "accounts": accounts,
            "active_account": profile.active_index,
            "enforced": self._sorted("Settings", profile.enforced_settings),
        }

    def _finish(
        self,
        target: TargetRef,
        path: str,
        text: str,
        install: resolve.Install,
        lint: Callable[..., list[Finding]],
        origin: ini_lint.Origin,
        windows: str = "",
        secrets: Sequence[tuple[int, str, Secret]] = (),
    ) -> None:
        with self.clock("lint"):
            document = ini.parse_ini(text)
            # Before lint forms any message about the file: a line that holds a password
            # outside its key is reported as such, and lint never looks at it (its messages
            # quote values).
            hidden = self._check_secrets_landed(target, text, document, secrets)
            findings = lint(document, file=target.name, hidden=hidden, origin=origin)
            self.result.findings.extend(findings)
        with self.clock("encode"):
            data = ini.encode_ini(text)
        accounts = sum(1 for s in document.sections if ini.is_account_section(s.name))
        paths = tuple(pointer for _, pointer, _ in secrets)
        built = BuiltFile(target, path, data, install, paths, windows, accounts)
        self.result.files.append(built)

    def _check_secrets_landed(
        self,
        target: TargetRef,
        text: str,
        document: IniDocument,
        secrets: Sequence[tuple[int, str, Secret]],
    ) -> frozenset[int]:
        """Each account's password field holds its own secret, and no secret lands elsewhere.

        Returns the lines that hold a secret outside its password key (in a value, a key, a
        section name or a comment); no message may quote them.
        """
        if not secrets:
            return frozenset()
        landed = True
        for index, pointer, secret in secrets:
            section = document.section(f"Account{index}")
            value = section.get(PASSWORD_KEY) if section else None
            if value is None or not secret.matches_text(value):
                landed = False
                self.result.findings.append(
                    Finding(
                        "error",
                        "secret-misplaced",
                        f"[Account{index}] password does not "
                        f"hold the value sealed at {pointer}; check the template",
                        target.name,
                    )
                )
        if landed and all(secret.count_in(text) == 1 for _, _, secret in secrets):
            return frozenset()  # each stands once: in its own password line, nowhere else

        def holds(*texts: str) -> bool:
            # A text whole (any length) or containing a long password.
            return any(s.occurs_in(t) for _, _, s in secrets for t in texts)

        hidden: set[int] = set()
        lines: list[tuple[str, IniEntry]] = [("", entry) for entry in document.preamble]
        for section in document.sections:
            if holds(section.name):  # lint skips the whole section: its messages name it
                hidden.add(section.line)
                self._misplaced(target, section.line, "a section name")
            else:
                lines += [(section.name, entry) for entry in section.entries]
        for section_name, entry in lines:
            if is_password_key(entry.key):
                continue
            if entry.key is None:
                found, where = holds(entry.raw_value), "a comment"
            elif holds(entry.key):
                found, where = True, "a key"  # named without its text
            else:
                found, where = holds(entry.value, entry.raw_value), f"[{section_name}] {entry.key}"
            if found:
                hidden.add(entry.line)
                self._misplaced(target, entry.line, where)
        return frozenset(hidden)

    def _misplaced(self, target: TargetRef, line: int, where: str) -> None:
        self.result.findings.append(
            Finding(
                "error",
                "secret-misplaced",
                f"{where} holds a password (or contains one); the template puts a secret "
                "outside its password key",
                target.name,
                line,
            )
        )


def _origin(
    blocks: Mapping[str, Mapping[str, resolve.Resolved]],
    accounts: Sequence[resolve.ResolvedAccount],
    account_sources: Sequence[Source] = (),
) -> ini_lint.Origin:
    """Where the value of a rendered ``[section] key`` was set in the inventory, if it was.

    For a whole ``[AccountN]`` section (an empty key): where that account is defined.
    """

    def origin(section: str, key: str) -> Source | None:
        values = blocks.get(section.lower())
        if values is None and ini.is_account_section(section):
            index = int(section[len("account") :]) - 1
            if not key:
                return account_sources[index] if 0 <= index < len(account_sources) else None
            values = accounts[index].keys if 0 <= index < len(accounts) else None
        resolved = values.get(key) if values is not None and key else None
        return resolved.final.source if resolved is not None else None

    return origin


class _Skip(ProvisionerError):
    """A target whose inputs already produced findings."""


def _station_context(plan: StationPlan) -> dict[str, object]:
    station = plan.workstation
    return {
        "name": station.name,
        "address": station.address,
        "groups": list(plan.groups),
        "description": station.description,
    }


def _install_context(install: resolve.Install) -> dict[str, object]:
    return {
        "mode": install.mode,
        "install_dir": install.install_dir,
        "exe": install.exe,
        "ini_name": install.ini_name,
    }


def _copied_tokens(inventory: Inventory, result: BuildResult) -> None:
    """A token standing at two paths is a copy: every seal makes a fresh ephemeral key."""
    seen: dict[str, str] = {}
    for user in inventory.users.values():
        for account in user.accounts:
            password = account.keys.get("password")
            if password is None or not isinstance(password.value, str):
                continue
            token = password.value
            if token in seen and seen[token] != password.pointer:
                source = password.source
                result.findings.append(
                    Finding(
                        "error",
                        "copied-token",
                        f"the same token also stands at {seen[token]}; set each value anew",
                        source.file,
                        source.line,
                        source.column,
                        password.pointer,
                    )
                )
            seen.setdefault(token, password.pointer)
