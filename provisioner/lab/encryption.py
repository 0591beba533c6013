"""MS-WSMV message encryption framing (``multipart/encrypted``, SPNEGO/NTLM flavour).

Only the framing lives here; sealing is done by the connection's NTLM session. A body is::

    --Encrypted Boundary\\r\\n
    \\tContent-Type: application/HTTP-SPNEGO-session-encrypted\\r\\n
    \\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=<n>\\r\\n
    --Encrypted Boundary\\r\\n
    \\tContent-Type: application/octet-stream\\r\\n
    <signature length, 4 bytes LE><signature><sealed data>--Encrypted Boundary--\\r\\n
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

PROTOCOL = "application/HTTP-SPNEGO-session-encrypted"
CONTENT_TYPE = f'multipart/encrypted;protocol="{PROTOCOL}";boundary="Encrypted Boundary"'

_BOUNDARY = b"--Encrypted Boundary\r\n"
_END = b"--Encrypted Boundary--\r\n"
_OCTETS = b"\tContent-Type: application/octet-stream\r\n"
_LENGTH = re.compile(rb"Length=(\d+)")


class FramingError(ValueError):
    """The body is not a well-formed single-part encrypted message."""


def is_encrypted(content_type: str) -> bool:
    """True if the Content-Type announces an SPNEGO-encrypted body."""
    lowered = content_type.lower()
    return lowered.startswith("multipart/encrypted") and PROTOCOL.lower() in lowered


def unpack(body: bytes) -> tuple[int, bytes, bytes]:
    """Split an encrypted body into (plaintext length, signature, sealed data)."""
    if not body.startswith(_BOUNDARY):
        raise FramingError("missing the first boundary")
    header_end = body.find(_BOUNDARY, len(_BOUNDARY))
    if header_end < 0:
        raise FramingError("missing the second boundary")
    found = _LENGTH.search(body, len(_BOUNDARY), header_end)
    if found is None:
        raise FramingError("missing OriginalContent Length")
    length = int(found.group(1))
    start = header_end + len(_BOUNDARY)
    if not body.startswith(_OCTETS, start):
        raise FramingError("missing the octet-stream part")
    payload = body[start + len(_OCTETS) :]
    if len(payload) < 4:
        raise FramingError("truncated payload")
    (sig_len,) = struct.unpack("<I", payload[:4])
    sealed_start = 4 + sig_len
    sealed = payload[sealed_start : sealed_start + length]
    if len(sealed) != length or payload[sealed_start + length :] != _END:
        raise FramingError("payload length does not match OriginalContent Length")
    return length, payload[4:sealed_start], sealed


def pack(plaintext: bytes, seal: Callable[[bytes], tuple[bytes, bytes]]) -> bytes:
    """Seal ``plaintext`` with ``seal`` (-> signature, sealed) and frame it."""
    signature, sealed = seal(plaintext)
    return b"".join(
        (
            _BOUNDARY,
            b"\tContent-Type: " + PROTOCOL.encode() + b"\r\n",
            b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=",
            str(len(plaintext)).encode(),
            b"\r\n",
            _BOUNDARY,
            _OCTETS,
            struct.pack("<I", len(signature)),
            signature,
            sealed,
            _END,
        )
    )
