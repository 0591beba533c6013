"""Fingerprints of written files, for the records: reports, the audit log, the run history.

A rendered ``microsip.ini`` is deterministic from the inventory and the password, so its
SHA-256 in a report would let anyone who reads the report test password guesses offline:
render with a guess, hash, compare. A record therefore holds a keyed fingerprint instead:
HMAC-SHA256 of the file's SHA-256 under a random key kept in the state folder (mode 0600,
by :mod:`provisioner.records.state`), cut to 128 bits. Fingerprints of one state folder compare like
the hashes they stand for (same file, same fingerprint), and without the key they tell
nothing about the content. The real SHA-256 still travels to the workstation, for the
agent's compare-and-swap, and is never recorded. This module only computes: it reads and
writes no file.
"""

from __future__ import annotations

import hashlib
import hmac
import re

KEY_BYTES = 32
_DOMAIN = b"microsip-provisioner/fingerprint/v1\x00"
FINGERPRINT_HEX = 32
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Fingerprints:
    """Turns a file's SHA-256 (hex) into its recordable fingerprint under one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a fingerprint key is {KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "Fingerprints(***)"

    def of(self, sha256: str | None) -> str | None:
        """The fingerprint of a SHA-256 in hex (None stays None)."""
        if sha256 is None:
            return None
        mac = hmac.new(self._key, _DOMAIN + sha256.lower().encode("ascii"), hashlib.sha256)
        return mac.hexdigest()[:FINGERPRINT_HEX]

    def of_legacy(self, value: str | None) -> str | None:
        """A value recorded before fingerprints: a full SHA-256 becomes its fingerprint."""
        if value is not None and _SHA256.match(value):
            return self.of(value)
        return value


def is_legacy_hash(value: str | None) -> bool:
    """True for a full SHA-256 as records held before fingerprints."""
    return value is not None and _SHA256.match(value) is not None
