"""Basic credentials and the NTLM acceptor (pyspnego) of one connection.

NTLM uses ``spnego.server(protocol="ntlm", options=NegotiateOptions.use_ntlm)``: the pure
Python NTLM of pyspnego, which checks the client's answer against the process-wide account
file of :mod:`provisioner.lab.ntlmusers`. The caller must then check the authenticated
principal against the contacted host's accounts (:func:`match_account`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping

import spnego
from spnego.channel_bindings import GssChannelBindings

from provisioner.lab.ntlmusers import account_key

_SIGNATURE = b"NTLMSSP\x00"
_NEGOTIATE = 1
_AUTHENTICATE = 3


class AuthFailed(Exception):
    """The client's NTLM token was rejected."""


def parse_authorization(value: str) -> tuple[str, str]:
    """``"Scheme token"`` -> (scheme in lower case, token); empty parts when absent."""
    scheme, _, token = value.strip().partition(" ")
    return scheme.lower(), token.strip()


def decode_basic(token: str) -> tuple[str, str] | None:
    """The user and password of a Basic token, or None if it is malformed."""
    try:
        raw = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    return (user, password) if sep else None


def match_account(credentials: Mapping[str, str], user: str) -> str | None:
    """The account of ``credentials`` that ``user`` names (case-insensitive), if any."""
    wanted = account_key(user)
    for name in credentials:
        if account_key(name) == wanted:
            return name
    return None


def check_password(credentials: Mapping[str, str], user: str, password: str) -> str | None:
    """The account name if ``user``/``password`` is valid for ``credentials``."""
    name = match_account(credentials, user)
    if name is None:
        return None
    expected = credentials[name].encode("utf-8")
    return name if hmac.compare_digest(expected, password.encode("utf-8")) else None


def _message_type(token: bytes) -> int:
    if len(token) < 12 or token[:8] != _SIGNATURE:
        return 0
    return int.from_bytes(token[8:12], "little")


class NtlmSession:
    """The NTLM acceptor context bound to one TCP connection."""

    def __init__(self, end_point_hash: bytes | None = None) -> None:
        self._bindings = (
            GssChannelBindings(application_data=b"tls-server-end-point:" + end_point_hash)
            if end_point_hash
            else None
        )
        self._context: spnego.ContextProxy | None = None
        self.user = ""

    @property
    def complete(self) -> bool:
        """True once the AUTHENTICATE message was accepted."""
        return self._context is not None and self._context.complete

    def step(self, token: bytes) -> bytes | None:
        """Feed a NEGOTIATE or AUTHENTICATE token; returns the CHALLENGE to send, if any.

        Raises :class:`AuthFailed` for a bad token or wrong credentials; the session is then
        back to its initial state.
        """
        kind = _message_type(token)
        if kind == _NEGOTIATE or self._context is None or self._context.complete:
            self._context = spnego.server(
                protocol="ntlm",
                options=spnego.NegotiateOptions.use_ntlm,
                channel_bindings=self._bindings,
            )
            self.user = ""
        if kind not in (_NEGOTIATE, _AUTHENTICATE):
            self._context = None
            raise AuthFailed("not an NTLM NEGOTIATE or AUTHENTICATE message")
        try:
            answer = self._context.step(token)
        except Exception as err:  # any failure of untrusted input means "access denied"
            self._context = None
            raise AuthFailed(str(err)) from err
        if self._context.complete:
            self.user = self._context.client_principal or ""
        return answer

    def seal(self, data: bytes) -> tuple[bytes, bytes]:
        """Sign and encrypt ``data``: (signature, sealed bytes)."""
        if self._context is None or not self._context.complete:
            raise AuthFailed("no security context")
        result = self._context.wrap_winrm(data)
        return result.header, result.data

    def unseal(self, signature: bytes, sealed: bytes) -> bytes:
        """Decrypt and verify; raises :class:`AuthFailed` on a bad signature."""
        if self._context is None or not self._context.complete:
            raise AuthFailed("no security context")
        try:
            return self._context.unwrap_winrm(signature, sealed)
        except Exception as err:  # a tampered or out-of-sequence message
            raise AuthFailed(f"cannot unseal the message: {err}") from err
