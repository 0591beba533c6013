"""Where a credential may go: host names and IP literals, credential scopes, transport security.

A :class:`Scope` is sealed with the WinRM password (``sipvault:v2`` tokens, see
:mod:`provisioner.secrets.vault`): the address patterns the password may be sent to and the least
transport security it may travel over. The inventory cannot widen it; only sealing the
password again can. Standard library only, so that the loader, the vault and the transport
can all use it.

Pattern grammar (``--scope``):

* ``ws01.corp.example.com``: that host name exactly (case-insensitive);
* ``*.corp.example.com``: any name below ``corp.example.com``, at any depth;
* ``*`` inside the first label matches within that label only: ``ber-ws-*`` matches the
  single-label name ``ber-ws-001`` but not ``ber-ws-001.elsewhere.net``; the other labels are
  literal, and no pattern matches every host or address (``*``, ``**``, ``0.0.0.0/0``);
* ``10.20.1.5``, ``10.20.0.0/16``, ``fd00::/8``: an IP address or network.

A scope may also pin a CA file (``--ca``): TLS counts as verified only when the certificate is
checked with the system's CAs or with that file, never with a CA the inventory merely names.

A host name matches name patterns only and an IP literal matches address patterns only: names
are not resolved to decide, so DNS answers cannot widen a scope.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

SECURITY_LEVELS = ("none", "encrypted", "tls")
"""Transport security, weakest first: ``tls`` is HTTPS with certificate validation against the
system's CAs or a CA file the scope pins;
``encrypted`` also allows NTLM, Kerberos or CredSSP message encryption over HTTP; ``none``
allows anything (the only use: letting ``doctor`` diagnose a lab's weak settings)."""
DEFAULT_MIN_SECURITY = "encrypted"
MESSAGE_ENCRYPTING = frozenset({"ntlm", "kerberos", "credssp"})
MAX_PATTERNS = 64
MAX_SCOPE_BYTES = 4096
"""The longest scope text a token may carry (checked when sealing and when reading)."""
MAX_CA_FILE_BYTES = 1 << 20
_CA_PIN = re.compile(r"^[0-9a-f]{64}$")

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_PATTERN_LABEL = re.compile(r"^[a-z0-9_*](?:[a-z0-9_*-]{0,61}[a-z0-9_*])?$")
_NUMERIC = re.compile(r"^(?:\d+|0x[0-9a-f]*)$")
_IPV4_LIKE = re.compile(r"^[0-9.]+$")
_SHOWN = 80


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def address_problem(address: str) -> str | None:
    """Why ``address`` is not a host name or an IP literal, or None.

    IPv4 is dotted-quad only (``127.1``, ``0x7f000001`` and ``2130706433`` are what the C
    resolver reads as 127.0.0.1, so a name whose last label is a number is refused); IPv6
    without brackets or a zone; names are letters, digits, '-' and '_' in dot-separated labels.
    """
    if not address:
        return "the address is empty"
    if "/" in address or "@" in address:
        return (
            f"{_shown(address)} is not a host name or an IP address (no URL, path or user "
            "belongs here; the port is winrm.port and the scheme winrm.scheme)"
        )
    if ":" in address:
        if address.count(":") == 1:
            return f"{_shown(address)}: the port does not belong in the address; set winrm.port"
        if "%" in address:
            return f"{_shown(address)}: IPv6 zone identifiers are not supported"
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return (
                f"{_shown(address)} is not an IPv6 address (write it without brackets and "
                "without a port; the port is winrm.port)"
            )
        return None
    if _IPV4_LIKE.match(address):
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            return f"{_shown(address)} is not a dotted-quad IPv4 address such as 10.20.1.5"
        return None
    if len(address) > 253:
        return "the host name is longer than 253 characters"
    labels = address.lower().split(".")
    if not all(_LABEL.match(label) for label in labels):
        return (
            f"{_shown(address)} is not a host name (letters, digits, '-' and '_' in "
            "dot-separated labels, no trailing dot) or an IP address"
        )
    if _NUMERIC.match(labels[-1]):
        return (
            f"{_shown(address)}: a name ending in a number is read as an IPv4 address by the "
            "resolver; write the address as a dotted quad such as 10.20.1.5"
        )
    return None


def is_ip_literal(address: str) -> bool:
    """True for an IPv4 or IPv6 address (as :func:`address_problem` accepts them)."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def is_loopback(address: str) -> bool:
    """True for an IP literal in 127.0.0.0/8 or ::1."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def security_level(
    *,
    scheme: str,
    transport: str,
    cert_validation: str,
    message_encryption: str,
    trusted_ca: bool,
) -> str:
    """The transport security a connection with these WinRM options gives the credential.

    ``trusted_ca``: the certificate is checked with the system's CAs or a CA file the scope
    pins. A CA file the inventory names and the scope does not pin gives no TLS credit: whoever
    edits the inventory could name their own CA and read what the connection carries.
    """
    if scheme == "https" and cert_validation == "validate" and trusted_ca:
        return "tls"
    if transport in MESSAGE_ENCRYPTING and (
        (scheme == "http" and message_encryption != "never") or message_encryption == "always"
    ):
        return "encrypted"
    return "none"


def ca_fingerprint(data: bytes) -> str:
    """The SHA-256 (hex) that pins a CA file: of its bytes, with CRLF read as LF.

    Every byte counts (another certificate appended changes it); only line endings may differ,
    as a Git checkout on Windows may change them.
    """
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def at_least(level: str, minimum: str) -> bool:
    """True when ``level`` is ``minimum`` or stronger."""
    return SECURITY_LEVELS.index(level) >= SECURITY_LEVELS.index(minimum)


def _canonical_pattern(pattern: str) -> str:
    """The canonical form of one pattern; ValueError with the reason when it is malformed."""
    text = pattern.strip().lower()
    if not text:
        raise ValueError("an empty pattern")
    if "/" in text or (":" in text and "*" not in text) or _IPV4_LIKE.match(text):
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError:
            raise ValueError(
                f"{_shown(pattern)} is not an IP address or network such as 10.20.0.0/16 "
                "(host bits must be zero)"
            ) from None
        if "%" in text:
            raise ValueError(f"{_shown(pattern)}: IPv6 zone identifiers are not supported")
        if network.prefixlen == 0:
            raise ValueError(f"{_shown(pattern)} matches every address; name your networks")
        return str(network)
    labels = text.split(".")
    if not labels[0].strip("*") and (len(labels) == 1 or labels[0] != "*"):
        raise ValueError(
            f"{_shown(pattern)}: '*' alone matches every host; use '*.DOMAIN', or '*' inside "
            "a label such as 'ber-ws-*'"
        )
    if any("*" in label for label in labels[1:]):
        raise ValueError(
            f"{_shown(pattern)}: '*' may stand in the first label only (as in '*.DOMAIN' or "
            "'ber-ws-*.DOMAIN'), so that the domain itself is always named"
        )
    if len(text) > 253 or not all(_PATTERN_LABEL.match(label) for label in labels):
        raise ValueError(
            f"{_shown(pattern)} is not a host name pattern such as '*.corp.example.com' "
            "or 'ber-ws-*', nor an IP network such as 10.20.0.0/16"
        )
    return text


def _name_matches(pattern: str, name: str) -> bool:
    wanted, labels = pattern.split("."), name.split(".")
    if wanted[0] == "*":
        suffix = wanted[1:]
        tail = labels[-len(suffix) :]
        return len(labels) > len(suffix) and all(
            fnmatchcase(label, want) for label, want in zip(tail, suffix, strict=True)
        )
    return len(labels) == len(wanted) and all(
        fnmatchcase(label, want) for label, want in zip(labels, wanted, strict=True)
    )


@dataclass(frozen=True)
class Scope:
    """Address patterns and the least transport security a credential may be used with."""

    patterns: tuple[str, ...]
    min_security: str = DEFAULT_MIN_SECURITY
    ca: str = ""
    """The :func:`ca_fingerprint` of the one CA file, besides the system's CAs, that may verify
    the workstations' certificates ("": the system's CAs only)."""

    @classmethod
    def build(cls, patterns: list[str] | tuple[str, ...], min_security: str, ca: str = "") -> Scope:
        """A canonical scope (patterns lower-cased, de-duplicated, sorted); ValueError if bad."""
        if min_security not in SECURITY_LEVELS:
            raise ValueError(f"the least security is one of {', '.join(SECURITY_LEVELS)}")
        if not patterns:
            raise ValueError("a scope needs at least one address pattern")
        if len(patterns) > MAX_PATTERNS:
            raise ValueError(f"a scope holds at most {MAX_PATTERNS} patterns")
        if ca and not _CA_PIN.match(ca):
            raise ValueError("a pinned CA is the SHA-256 of its file, in lower-case hex")
        canonical = sorted({_canonical_pattern(p) for p in patterns})
        scope = cls(tuple(canonical), min_security, ca)
        if len(scope.text) > MAX_SCOPE_BYTES:
            raise ValueError(
                f"the scope is {len(scope.text)} characters, more than {MAX_SCOPE_BYTES}: "
                "use fewer, wider patterns such as '*.corp.example.com' or 10.20.0.0/16"
            )
        return scope

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Read the canonical text sealed into a token; ValueError unless canonical."""
        match = re.fullmatch(r"min=([a-z]+);(?:ca=([0-9a-f]+);)?hosts=([^;]+)", text)
        if match is None:
            raise ValueError("malformed scope")
        scope = cls.build(match.group(3).split(","), match.group(1), match.group(2) or "")
        if scope.text != text:
            raise ValueError("the scope is not in canonical form")
        return scope

    @property
    def text(self) -> str:
        """The canonical text that is sealed (``min=LEVEL;[ca=SHA256;]hosts=P1,P2``)."""
        pinned = f"ca={self.ca};" if self.ca else ""
        return f"min={self.min_security};{pinned}hosts={','.join(self.patterns)}"

    def allows(self, address: str) -> bool:
        """True when ``address`` (a valid host name or IP literal) matches a pattern."""
        if address_problem(address) is not None:
            return False
        if is_ip_literal(address):
            ip = ipaddress.ip_address(address)
            return any(
                ip in ipaddress.ip_network(p) for p in self.patterns if _is_network_pattern(p)
            )
        name = address.lower()
        return any(_name_matches(p, name) for p in self.patterns if not _is_network_pattern(p))

    def __str__(self) -> str:
        pinned = f", CA file sha256 {self.ca[:16]}..." if self.ca else ""
        return f"{', '.join(self.patterns)} (at least {self.min_security}{pinned})"


def _is_network_pattern(pattern: str) -> bool:
    return "/" in pattern
