"""An independent RFC 9180 base-mode opener built from X25519, HMAC and AES-GCM primitives.

It shares no code with provisioner.secrets.vault, so a library upgrade that silently changed the
wire format would make the tool's tokens stop opening here.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEM_X25519 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001
AEAD_AES_256_GCM = 0x0002
_KEY_LENGTH = {AEAD_AES_128_GCM: 16, AEAD_AES_256_GCM: 32}


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or b"\x00" * 32, ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + info
    return _expand(prk, labeled_info, length)


def decap(enc: bytes, sk_r: bytes) -> bytes:
    """DHKEM(X25519, HKDF-SHA256) decapsulation."""
    private = X25519PrivateKey.from_private_bytes(sk_r)
    dh = private.exchange(X25519PublicKey.from_public_bytes(enc))
    pk_rm = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    kem_suite = b"KEM" + struct.pack(">H", KEM_X25519)
    eae_prk = _labeled_extract(kem_suite, b"", b"eae_prk", dh)
    return _labeled_expand(kem_suite, eae_prk, b"shared_secret", enc + pk_rm, 32)


def key_schedule(shared_secret: bytes, info: bytes, aead_id: int) -> tuple[bytes, bytes]:
    """Base-mode key schedule: returns (key, base_nonce)."""
    suite_id = b"HPKE" + struct.pack(">HHH", KEM_X25519, KDF_HKDF_SHA256, aead_id)
    psk_id_hash = _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(suite_id, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = _labeled_extract(suite_id, shared_secret, b"secret", b"")
    key = _labeled_expand(suite_id, secret, b"key", context, _KEY_LENGTH[aead_id])
    nonce = _labeled_expand(suite_id, secret, b"base_nonce", context, 12)
    return key, nonce


def open_base(
    sk_r: bytes, enc: bytes, ciphertext: bytes, info: bytes, aad: bytes, aead_id: int
) -> bytes:
    """Open the first message (sequence 0) of a base-mode HPKE context."""
    key, nonce = key_schedule(decap(enc, sk_r), info, aead_id)
    return AESGCM(key).decrypt(nonce, ciphertext, aad)
