"""Sealed values in an inventory directory: find, lint, set, verify, rekey and rebind them.

Composes :mod:`provisioner.secrets.vault` (crypto) with :mod:`provisioner.inventory.yamldoc`
(positions and surgical edits). Every write replaces a file atomically after re-parsing the
edited text and checking that nothing but the intended token spans changed.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from provisioner import gcpause
from provisioner.atomicfile import create_exclusive, write_atomic
from provisioner.errors import (
    CannotDecryptError,
    IdentityError,
    InventoryError,
    MissingIdentityError,
    PathMismatchError,
    RecipientsError,
    TokenFormatError,
    VaultError,
    YamlEditError,
)
from provisioner.inventory import yamldoc
from provisioner.inventory.loader import RECIPIENTS_FILE, inventory_files
from provisioner.inventory.model import Finding, Secret
from provisioner.inventory.schema import (
    is_scoped_path,
    is_secret_path,
    join_pointer,
    split_pointer,
    token_kid,
)
from provisioner.secrets import vault
from provisioner.secrets.credscope import Scope

IDENTITY_SUFFIX = ".sipid"


# --------------------------------------------------------------------------- files


def load_recipients(root: Path) -> vault.Recipients:
    """Read and validate ``recipients.yaml`` of an inventory."""
    return vault.load_recipients_file(root / RECIPIENTS_FILE)


def write_recipients(root: Path, recipients: vault.Recipients) -> Path:
    """Replace ``recipients.yaml`` atomically (world-readable: it holds public keys only)."""
    path = root / RECIPIENTS_FILE
    write_atomic(path, recipients.to_text().encode("utf-8"), mode=0o644)
    return path


def default_identity_dir() -> Path:
    """Where identities live unless told otherwise: ``$XDG_CONFIG_HOME/microsip-provisioner``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "microsip-provisioner"


def identity_file_name(realm: str, kid: str) -> str:
    """The default file name of an identity."""
    return f"{realm}-{kid}{IDENTITY_SUFFIX}"


@dataclass(frozen=True)
class IdentityFile:
    """A parsed, still locked identity file."""

    path: Path
    kid: str
    needs_passphrase: bool
    data: object = field(repr=False)


def require_owner_only(path: Path, *, fd: int | None = None) -> None:
    """Refuse a file that others may read or write (identity and passphrase files).

    ``fd``: the file already open, checked instead of the name (which could be swapped).
    """
    if os.name == "posix":
        mode = stat.S_IMODE((os.fstat(fd) if fd is not None else path.stat()).st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"{path} is readable by others (mode {mode:o}); run 'chmod 600 {path}'"
            )


def read_identity(path: Path) -> IdentityFile:
    """Parse an identity file without unlocking it; checks owner-only permissions."""
    if not path.is_file():
        raise IdentityError(f"identity file {path} does not exist")
    require_owner_only(path)
    try:
        data = yamldoc.load_data(path)
    except InventoryError as exc:
        raise IdentityError(str(exc)) from None
    kid = data.get("kid") if isinstance(data, dict) else None
    if not isinstance(kid, str):
        raise IdentityError(f"{path}: not a sipvault identity file")
    return IdentityFile(path, kid, vault.identity_needs_passphrase(data), data)


def unlock(identity_file: IdentityFile, passphrase: bytes | None) -> vault.Identity:
    """Unlock a parsed identity file."""
    return vault.unlock_identity(identity_file.data, passphrase, source=str(identity_file.path))


def write_identity(
    path: Path, identity: vault.Identity, passphrase: bytes | None, **kw: str
) -> None:
    """Create a new identity file, owner-only, refusing to overwrite."""
    protection = kw.get("protection", "argon2id")
    if protection not in ("argon2id", "scrypt", "none"):
        raise IdentityError(f"unknown protection {protection!r}")
    text = vault.wrap_identity(
        identity,
        passphrase,
        protection=protection,  # type: ignore[arg-type]
        note=kw.get("note", ""),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        create_exclusive(path, text.encode("utf-8"), mode=0o600)
    except FileExistsError:
        raise IdentityError(f"{path} already exists; choose another --out") from None


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Site:
    """A scalar in an inventory file, with where it stands."""

    file: Path
    ref: yamldoc.ScalarRef

    @property
    def pointer(self) -> str:
        """Its JSON-Pointer path."""
        return self.ref.pointer

    @property
    def where(self) -> str:
        """``file:line:column`` for messages."""
        return f"{self.file}:{self.ref.line}:{self.ref.column}"


@dataclass(frozen=True)
class Scan:
    """Every file of an inventory, its secret fields and everything that looks like a token."""

    root: Path
    docs: tuple[yamldoc.YamlText, ...]
    secret_fields: tuple[Site, ...]
    strays: tuple[Site, ...]
    problems: tuple[tuple[Path, yamldoc.Problem], ...]

    def tokens(self) -> list[Site]:
        """Secret fields that hold something token-shaped."""
        return [s for s in self.secret_fields if vault.looks_like_token(s.ref.value)]


def kids_in_use(scan: Scan) -> Counter[str]:
    """How many tokens of the inventory use each key id (well-formed tokens only)."""
    kids = (token_kid(s.ref.value) for s in scan.tokens())
    return Counter(kid for kid in kids if kid)


def scan_inventory(root: Path, files: Sequence[Path] | None = None) -> Scan:
    """Compose every inventory file and classify its scalars."""
    with gcpause.paused_gc():
        return _scan_inventory(root, files)


def _scan_inventory(root: Path, files: Sequence[Path] | None) -> Scan:
    docs: list[yamldoc.YamlText] = []
    secret_fields: list[Site] = []
    strays: list[Site] = []
    problems: list[tuple[Path, yamldoc.Problem]] = []
    for path in files if files is not None else inventory_files(root):
        doc = yamldoc.load_text(path)
        docs.append(doc)
        problems.extend((path, p) for p in doc.problems)
        for ref in doc.scalars:
            if is_secret_path(ref.segments):
                secret_fields.append(Site(path, ref))
            elif ref.kind == "str" and vault.looks_like_token(ref.value):
                strays.append(Site(path, ref))
    return Scan(root, tuple(docs), tuple(secret_fields), tuple(strays), tuple(problems))


# --------------------------------------------------------------------------- lint


def _finding(site: Site, severity: str, code: str, message: str) -> Finding:
    return Finding(
        severity,
        code,
        message,
        file=str(site.file),
        line=site.ref.line,
        column=site.ref.column,
        path=site.pointer,
    )


def lint_secrets(scan: Scan, recipients: vault.Recipients) -> list[Finding]:
    """The key-less CI check: each secret field holds a valid token for its place, only there.

    A finding never holds a value.
    """
    findings: list[Finding] = [
        Finding(
            "error",
            "yaml",
            p.message,
            file=str(path),
            line=p.line,
            column=p.column,
            path=join_pointer(p.segments),
        )
        for path, p in scan.problems
    ]
    by_pointer: dict[str, list[Site]] = defaultdict(list)
    by_enc: dict[bytes, list[Site]] = defaultdict(list)
    for site in scan.secret_fields:
        by_pointer[site.pointer].append(site)
        ref = site.ref
        if ref.anchored or ref.aliased or ref.tagged:
            findings.append(
                _finding(
                    site,
                    "error",
                    "yaml-feature",
                    "secret values may not use anchors, aliases or tags",
                )
            )
            continue
        if ref.kind == "null" or (ref.kind == "str" and ref.value == ""):
            findings.append(
                _finding(
                    site,
                    "error",
                    "missing",
                    f"no password set; run 'provisioner secrets set --path {site.pointer}'",
                )
            )
            continue
        if ref.kind != "str" or not vault.looks_like_token(ref.value):
            findings.append(
                _finding(
                    site,
                    "error",
                    "plaintext",
                    "plain text in a secret field; seal it with "
                    f"'provisioner secrets set --path {site.pointer}' and purge it from git "
                    "history, then change that password",
                )
            )
            continue
        try:
            by_enc[vault.parse_token(ref.value).enc].append(site)
            parts = vault.check_token(ref.value, site.pointer, recipients)
        except VaultError as exc:
            findings.append(_finding(site, "error", exc.code, str(exc)))
            continue
        if is_scoped_path(site.ref.segments) and parts.scope is None:
            findings.append(
                _finding(
                    site,
                    "warning",
                    "unscoped-credential",
                    "this WinRM password has no scope, so commands that connect refuse it; "
                    f"an admin adds one with 'provisioner secrets scope --path {site.pointer} "
                    "--scope PATTERN' (docs/secrets.md)",
                )
            )
        elif not is_scoped_path(site.ref.segments) and parts.scope is not None:
            findings.append(
                _finding(
                    site,
                    "error",
                    "misplaced-scope",
                    "only WinRM passwords carry a scope; set this value anew without --scope",
                )
            )
        if parts.kid != recipients.active:
            findings.append(
                _finding(
                    site,
                    "warning",
                    "stale-key",
                    f"sealed to {parts.kid}, not the active "
                    f"key {recipients.active}; run 'provisioner secrets rekey'",
                )
            )
    for pointer, sites in by_pointer.items():
        if len(sites) > 1:
            others = ", ".join(s.where for s in sites[1:])
            findings.append(
                _finding(
                    sites[0],
                    "error",
                    "duplicate-path",
                    f"{pointer} is defined more than once across files (also at {others})",
                )
            )
    for sites in by_enc.values():
        if len(sites) > 1:
            for site in sites[1:]:
                findings.append(
                    _finding(
                        site,
                        "error",
                        "copied-token",
                        f"the same token also stands at "
                        f"{sites[0].pointer} ({sites[0].where}); set each value anew",
                    )
                )
    for site in scan.strays:
        findings.append(
            _finding(
                site,
                "error",
                "stray-token",
                "a sipvault token outside a secret field; "
                "tokens belong only in fields the schema marks secret",
            )
        )
    findings.sort(key=lambda f: (f.file, f.line, f.column, f.code))
    return findings


# --------------------------------------------------------------------------- set


@dataclass(frozen=True)
class Written:
    """Where a sealed value was written."""

    file: Path
    line: int
    pointer: str
    kid: str


def _edit_file(doc: yamldoc.YamlText, new_text: str, expected: dict[tuple[str, ...], str]) -> None:
    yamldoc.verify_edit(doc, new_text, expected)
    write_atomic(Path(doc.source), new_text.encode("utf-8"))


def check_scope_fits(pointer: str, scope: Scope | None) -> None:
    """WinRM passwords are sealed with a scope, and nothing else is."""
    scoped = is_scoped_path(split_pointer(pointer))
    if scoped and scope is None:
        raise VaultError(
            f"{pointer} is a WinRM password: seal it with the addresses it may be sent to, "
            "e.g. --scope '*.corp.example.com' --scope 10.20.0.0/16 (docs/secrets.md)"
        )
    if not scoped and scope is not None:
        raise VaultError(f"{pointer} is not a WinRM password; only those take --scope")


def set_secret(
    root: Path,
    pointer: str,
    secret: Secret,
    recipients: vault.Recipients,
    scope: Scope | None = None,
) -> Written:
    """Seal ``secret`` for ``pointer`` (WinRM passwords: with ``scope``) and patch it in."""
    segments = tuple(split_pointer(pointer))
    if not is_secret_path(segments):
        raise VaultError(f"{pointer} is not a secret field of the inventory schema")
    check_scope_fits(pointer, scope)
    key = recipients.active_key()
    token = vault.seal(secret, realm=recipients.realm, path=pointer, recipient=key, scope=scope)
    scan = scan_inventory(root)
    holders = [doc for doc in scan.docs if doc.scalar(segments) is not None]
    if len(holders) > 1:
        raise YamlEditError(
            f"{pointer} is defined in more than one file: " + ", ".join(d.source for d in holders)
        )
    if holders:
        doc = holders[0]
        new_text = yamldoc.replace_scalars(doc, {segments: token})
    else:
        parent = segments[:-1]
        parents = [doc for doc in scan.docs if doc.mapping(parent) is not None]
        if len(parents) != 1:
            raise YamlEditError(
                f"no entry {join_pointer(parent)} in the inventory under {root}; add the user and "
                "account first"
                if not parents
                else f"{join_pointer(parent)} is defined in more than one file"
            )
        doc = parents[0]
        new_text = yamldoc.insert_key(
            doc, parent, segments[-1], yamldoc.scalar_text(token, like=None)
        )
    _edit_file(doc, new_text, {segments: token})
    ref = yamldoc.compose_text(new_text, doc.source).scalar(segments)
    return Written(Path(doc.source), ref.line if ref else 0, pointer, key.kid)


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """Counts per key id and per error class; failures with where, never values."""

    ok_by_kid: Counter[str] = field(default_factory=Counter)
    errors_by_class: Counter[str] = field(default_factory=Counter)
    failures: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every token opened and passed the plaintext policy."""
        return not self.failures


def verify_secrets(scan: Scan, keyring: vault.Keyring) -> VerifyReport:
    """Open every token with the keyring and check the plaintext policy."""
    report = VerifyReport()
    # Values of a known key whose identity was not given: one line per key, not per value.
    unopened: dict[str, list[Site]] = defaultdict(list)
    known = {key.kid for key in keyring.recipients.keys}
    for site in scan.secret_fields:
        ref = site.ref
        if ref.kind != "str" or not vault.looks_like_token(ref.value):
            code = "missing" if ref.kind == "null" or not ref.value else "plaintext"
            report.errors_by_class[code] += 1
            report.failures.append(_finding(site, "error", code, "no token in this secret field"))
            continue
        kid = token_kid(ref.value)
        try:
            if kid in known and kid not in keyring.identities:
                vault.check_token(ref.value, site.pointer, keyring.recipients)  # key-less checks
                unopened[kid].append(site)
                continue
            secret = keyring.open(ref.value, site.pointer)
            vault.check_policy(secret)
        except VaultError as exc:
            code = exc.code
            report.errors_by_class[code] += 1
            message = "cannot decrypt value" if code == "cannot-decrypt" else str(exc)
            report.failures.append(_finding(site, "error", code, message))
            continue
        report.ok_by_kid[vault.parse_token(ref.value).kid] += 1
    for kid, sites in unopened.items():
        report.errors_by_class["no-identity"] += len(sites)
        message = (
            f"no identity for key {kid} was given (pass --identity FILE, or keep it in "
            f"{default_identity_dir()}); {len(sites)} value(s) sealed to it were not checked"
        )
        report.failures.append(_finding(sites[0], "error", "no-identity", message))
    return report


# --------------------------------------------------------------------------- rekey / rebind


@dataclass(frozen=True)
class RekeyReport:
    """What a rekey changed."""

    resealed: int
    files: tuple[Path, ...]
    verified_by_opening: bool


def _reseal_checked(
    keyring: vault.Keyring,
    secret: Secret,
    pointer: str,
    target: vault.RecipientKey,
    scope: Scope | None,
) -> str:
    realm = keyring.recipients.realm
    token = vault.seal(secret, realm=realm, path=pointer, recipient=target, scope=scope)
    if target.kid in keyring.identities:
        again = keyring.open(token, pointer)
        if not hmac.compare_digest(again.reveal().encode(), secret.reveal().encode()):
            raise CannotDecryptError(f"{pointer}: the re-sealed value does not round-trip")
    else:
        vault.check_token(token, pointer, keyring.recipients)
    return token


def rekey(
    scan: Scan, keyring: vault.Keyring, to_kid: str, from_kids: Iterable[str] = ()
) -> RekeyReport:
    """Re-seal every token not sealed to ``to_kid`` (or only those of ``from_kids``).

    All tokens are opened and re-sealed in memory first; files are written only when every
    one succeeded, each file atomically.
    """
    target = keyring.recipients.key(to_kid)
    if target.status != "active":
        raise RecipientsError(f"key {to_kid} is {target.status}; make it the active key first")
    only = set(from_kids)
    edits: dict[str, dict[tuple[str, ...], str]] = defaultdict(dict)
    count = 0
    for site in scan.tokens():
        kid = vault.parse_token(site.ref.value).kid
        if kid == to_kid or (only and kid not in only):
            continue
        try:
            secret = keyring.open(site.ref.value, site.pointer)
        except VaultError as exc:
            raise type(exc)(f"{site.where}: {site.pointer}: {exc}; nothing was changed") from None
        edits[str(site.file)][site.ref.segments] = _reseal_checked(
            keyring, secret, site.pointer, target, vault.token_scope(site.ref.value)
        )
        count += 1
    planned: list[tuple[yamldoc.YamlText, str, dict[tuple[str, ...], str]]] = []
    docs = {doc.source: doc for doc in scan.docs}
    for source, file_edits in edits.items():
        doc = docs[source]
        new_text = yamldoc.replace_scalars(doc, file_edits)
        yamldoc.verify_edit(doc, new_text, file_edits)
        planned.append((doc, new_text, file_edits))
    for doc, new_text, _ in planned:
        write_atomic(Path(doc.source), new_text.encode("utf-8"))
    return RekeyReport(
        count, tuple(Path(d.source) for d, _, _ in planned), to_kid in keyring.identities
    )


def rebind(scan: Scan, keyring: vault.Keyring, old_pointer: str, new_pointer: str) -> Written:
    """Re-seal the token now standing at ``new_pointer`` that was sealed for ``old_pointer``."""
    split_pointer(old_pointer)
    if not is_secret_path(split_pointer(new_pointer)):
        raise VaultError(f"{new_pointer} is not a secret field of the inventory schema")
    site = token_at(scan, new_pointer, moved_from=old_pointer)
    parts = vault.parse_token(site.ref.value)
    check_scope_fits(new_pointer, parts.scope)
    if parts.kid not in keyring.identities:
        raise MissingIdentityError(
            f"no identity for key {parts.kid} was given (pass --identity FILE)"
        )
    if parts.pathtag != vault.compute_pathtag(keyring.recipients.realm, old_pointer):
        raise PathMismatchError(f"the token at {new_pointer} was not sealed for {old_pointer}")
    secret = keyring.open(site.ref.value, old_pointer)
    return _replace_token(scan, keyring, site, new_pointer, secret, parts.scope)


def token_at(scan: Scan, pointer: str, *, moved_from: str = "") -> Site:
    """The one token standing at ``pointer`` (``moved_from``: where it stood before)."""
    segments = tuple(split_pointer(pointer))
    sites = [s for s in scan.secret_fields if s.ref.segments == segments]
    if not sites:
        still_there = moved_from and any(s.pointer == moved_from for s in scan.secret_fields)
        hint = (
            f"; the value still stands at {moved_from}: move the entry in the YAML first"
            if still_there
            else ""
        )
        raise VaultError(f"no value stands at {pointer}{hint}")
    if len(sites) > 1:
        raise YamlEditError(f"{pointer} is defined in more than one file")
    if not vault.looks_like_token(sites[0].ref.value):
        raise TokenFormatError(f"{sites[0].where}: {pointer} does not hold a token")
    return sites[0]


def rescope(scan: Scan, keyring: vault.Keyring, pointer: str, scope: Scope) -> Written:
    """Seal the WinRM password at ``pointer`` again with ``scope`` (the admin's migration).

    The value is opened with the keyring (so only someone who can read it can change where it
    may go), sealed to the active key with the new scope, opened again and compared.
    """
    check_scope_fits(pointer, scope)
    site = token_at(scan, pointer)
    secret = keyring.open(site.ref.value, pointer)
    return _replace_token(scan, keyring, site, pointer, secret, scope)


def _replace_token(
    scan: Scan,
    keyring: vault.Keyring,
    site: Site,
    pointer: str,
    secret: Secret,
    scope: Scope | None,
) -> Written:
    """Seal ``secret`` for ``pointer`` to the active key, check it, and patch it in at ``site``."""
    target = keyring.recipients.active_key()
    token = _reseal_checked(keyring, secret, pointer, target, scope)
    doc = next(d for d in scan.docs if d.source == str(site.file))
    new_text = yamldoc.replace_scalars(doc, {site.ref.segments: token})
    _edit_file(doc, new_text, {site.ref.segments: token})
    return Written(site.file, site.ref.line, pointer, target.kid)
