"""sipvault: per-value HPKE tokens bound to realm, key id and path; recipients and identities.

Tokens::

    sipvault:v1:<kid>:<pathtag>:<base64url(enc || ct)>
    sipvault:v2:<kid>:<pathtag>:<base64url(scope)>:<base64url(enc || ct)>

HPKE base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, with
``info = "sipvault/v1" || LP(realm) || LP(kid) || LP(path)`` (v1) or
``info = "sipvault/v2" || LP(realm) || LP(kid) || LP(path) || LP(scope)`` (v2) and a plaintext
padded to a multiple of 32 bytes. A v2 token carries a credential scope
(:class:`provisioner.secrets.credscope.Scope`, WinRM passwords): readable without a key,
authenticated by the seal, so an edited or transplanted scope does not open.
This is the only module that imports ``cryptography``.
Nothing here ever puts a plaintext into an exception, a log record or a return value
other than a :class:`~provisioner.inventory.model.Secret`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from provisioner.errors import (
    CannotDecryptError,
    IdentityError,
    MissingIdentityError,
    PathMismatchError,
    PolicyViolationError,
    RecipientsError,
    RetiredKeyError,
    TokenFormatError,
    UnknownKeyError,
)
from provisioner.inventory import yamldoc
from provisioner.inventory.model import Secret
from provisioner.inventory.schema import TOKEN_PREFIX
from provisioner.secrets.credscope import MAX_SCOPE_BYTES, Scope

PREFIX = TOKEN_PREFIX
VERSION = "v1"
SCOPED_VERSION = "v2"
MAX_SECRET_BYTES = 256
PAD_BLOCK = 32
ENC_LEN = 32
TAG_LEN = 16

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_B64URL = r"[A-Za-z0-9_-]"
TOKEN_RE = re.compile(
    rf"^sipvault:v1:(k[a-z2-7]{{8}}):({_B64URL}{{8}}):({_B64URL}+)$",
)
SCOPED_TOKEN_RE = re.compile(
    rf"^sipvault:v2:(k[a-z2-7]{{8}}):({_B64URL}{{8}}):({_B64URL}+):({_B64URL}+)$",
)
KID_RE = re.compile(r"^k[a-z2-7]{8}$")
REALM_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")

KeyStatus = Literal["active", "decrypt-only", "retired"]
KEY_STATUSES: tuple[KeyStatus, ...] = ("active", "decrypt-only", "retired")


# --------------------------------------------------------------------------- encoding helpers


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url, the only encoding tokens and key files use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, what: str) -> bytes:
    """Decode unpadded base64url, refusing any non-canonical form."""
    if not re.fullmatch(rf"{_B64URL}*", text):
        raise TokenFormatError(f"{what} is not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenFormatError(f"{what} is not valid base64url") from exc
    if b64url_encode(raw) != text:
        raise TokenFormatError(f"{what} is not canonical base64url")
    return raw


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def compute_kid(public_raw: bytes) -> str:
    """Key id: "k" and the first 40 bits of SHA-256 over the raw public key, base32."""
    digest = hashlib.sha256(b"sipvault/v1/kid\x00" + public_raw).digest()
    return "k" + base64.b32encode(digest[:5]).decode("ascii").lower()


def compute_pathtag(realm: str, path: str) -> str:
    """Keyless hint of where a token belongs: 48 bits of SHA-256, base64url."""
    digest = hashlib.sha256(
        b"sipvault/v1/path\x00" + _lp(realm.encode("utf-8")) + path.encode("utf-8")
    ).digest()
    return b64url_encode(digest[:6])


def hpke_info(realm: str, kid: str, path: str, scope: Scope | None = None) -> bytes:
    """The HPKE ``info`` that binds a token to its realm, key, path and (v2) scope."""
    bound = _lp(realm.encode("utf-8")) + _lp(kid.encode("ascii")) + _lp(path.encode("utf-8"))
    if scope is None:
        return b"sipvault/v1" + bound
    return b"sipvault/v2" + bound + _lp(scope.text.encode("ascii"))


def pad_plaintext(secret_bytes: bytes) -> bytes:
    """``uint16-be(L) || secret || zeros`` up to a multiple of 32 bytes."""
    body = struct.pack(">H", len(secret_bytes)) + secret_bytes
    return body + b"\x00" * (-len(body) % PAD_BLOCK)


def token_length(secret_bytes: int) -> int:
    """Length of the token text for a secret of that many UTF-8 bytes."""
    padded = len(pad_plaintext(b"x" * secret_bytes))
    payload = ENC_LEN + padded + TAG_LEN
    return len(f"{PREFIX}{VERSION}:") + 9 + 1 + 8 + 1 + len(b64url_encode(b"\x00" * payload))


# --------------------------------------------------------------------------- policy

# Characters the profile API or a line-based reader would treat as structure.
_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def policy_problem(value: str) -> str | None:
    """Why ``value`` is not safe as a microsip.ini value, or None. Never echoes the value."""
    encoded = value.encode("utf-8", errors="surrogatepass")
    if not value:
        return "the value is empty"
    if len(encoded) > MAX_SECRET_BYTES:
        return f"the value is longer than {MAX_SECRET_BYTES} bytes"
    for position, char in enumerate(value, start=1):
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return (
                f"the value contains a control or invisible character (U+{ord(char):04X}) "
                f"at position {position}"
            )
    if value != value.strip():
        return "the value starts or ends with whitespace, which Windows strips"
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return "the value is wrapped in quotes, which Windows strips"
    return None


def check_policy(secret: Secret, *, where: str = "") -> None:
    """Raise :class:`PolicyViolationError` when a secret is not ini-safe."""
    problem = policy_problem(secret.reveal())
    if problem is not None:
        prefix = f"{where}: " if where else ""
        raise PolicyViolationError(f"{prefix}{problem}")


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenParts:
    """The structure of a token, checked without any key."""

    kid: str
    pathtag: str
    enc: bytes
    ciphertext: bytes
    scope: Scope | None = None
    """The credential scope of a v2 token; authentic only once the token has been opened."""


def looks_like_token(text: str) -> bool:
    """True for anything that claims to be a sipvault token, well-formed or not."""
    return text.strip().lower().startswith(PREFIX)


def parse_token(text: str) -> TokenParts:
    """Check a token's structure (version, kid syntax, canonical base64, lengths)."""
    if not text.startswith(PREFIX):
        if looks_like_token(text):
            raise TokenFormatError("the token must start with 'sipvault:' exactly")
        raise TokenFormatError("the value is not a sipvault token")
    parts = text.split(":")
    if len(parts) >= 2 and parts[1] == SCOPED_VERSION:
        return _parse_scoped(text, parts)
    if len(parts) >= 2 and parts[1] != VERSION:
        raise TokenFormatError(f"unsupported token version {parts[1][:8]!r} (expected v1 or v2)")
    match = TOKEN_RE.match(text)
    if match is None:
        if text != text.strip():
            raise TokenFormatError("the token has surrounding whitespace")
        if len(parts) != 5:
            raise TokenFormatError("the token must have five ':'-separated fields")
        if not KID_RE.match(parts[2]):
            raise TokenFormatError("the token's key id is malformed")
        if not re.fullmatch(rf"{_B64URL}{{8}}", parts[3]):
            raise TokenFormatError("the token's pathtag is malformed")
        raise TokenFormatError("the token's payload is not unpadded base64url")
    kid, pathtag, payload_text = match.groups()
    return _parts(kid, pathtag, payload_text, None)


def _parts(kid: str, pathtag: str, payload_text: str, scope: Scope | None) -> TokenParts:
    payload = b64url_decode(payload_text, what="the token's payload")
    body = len(payload) - ENC_LEN - TAG_LEN
    if body < PAD_BLOCK or body % PAD_BLOCK:
        raise TokenFormatError("the token's payload has an impossible length (truncated?)")
    return TokenParts(
        kid=kid, pathtag=pathtag, enc=payload[:ENC_LEN], ciphertext=payload[ENC_LEN:], scope=scope
    )


def _parse_scoped(text: str, parts: list[str]) -> TokenParts:
    match = SCOPED_TOKEN_RE.match(text)
    if match is None:
        if len(parts) != 6:
            raise TokenFormatError("a v2 token must have six ':'-separated fields")
        if not KID_RE.match(parts[2]):
            raise TokenFormatError("the token's key id is malformed")
        if not re.fullmatch(rf"{_B64URL}{{8}}", parts[3]):
            raise TokenFormatError("the token's pathtag is malformed")
        raise TokenFormatError("the token's scope or payload is not unpadded base64url")
    kid, pathtag, scope_text, payload_text = match.groups()
    raw = b64url_decode(scope_text, what="the token's scope")
    if len(raw) > MAX_SCOPE_BYTES:
        raise TokenFormatError("the token's scope is too long")
    try:
        scope = Scope.parse(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise TokenFormatError("the token's scope is malformed") from None
    return _parts(kid, pathtag, payload_text, scope)


def token_scope(token: str) -> Scope | None:
    """The scope a token claims (None: a v1 token has none). Authentic once it has opened."""
    return parse_token(token).scope


def seal(
    secret: Secret,
    *,
    realm: str,
    path: str,
    recipient: RecipientKey,
    scope: Scope | None = None,
) -> str:
    """Encrypt ``secret`` to ``recipient`` for ``path`` in ``realm`` (and ``scope``: v2)."""
    check_policy(secret, where=path)
    if recipient.status != "active":
        raise RetiredKeyError(f"key {recipient.kid} is {recipient.status}; seal to the active key")
    return seal_padded(
        pad_plaintext(secret.reveal().encode("utf-8")),
        realm=realm,
        path=path,
        recipient=recipient,
        scope=scope,
    )


def seal_padded(
    padded: bytes,
    *,
    realm: str,
    path: str,
    recipient: RecipientKey,
    scope: Scope | None = None,
) -> str:
    """Seal an already padded plaintext. Tests use it to build malformed-plaintext vectors."""
    public = X25519PublicKey.from_public_bytes(recipient.public_raw)
    sealed = _SUITE.encrypt(padded, public, info=hpke_info(realm, recipient.kid, path, scope))
    fields = [recipient.kid, compute_pathtag(realm, path)]
    if scope is not None:
        fields.append(b64url_encode(scope.text.encode("ascii")))
    version = VERSION if scope is None else SCOPED_VERSION
    return f"{PREFIX}{version}:{':'.join(fields)}:{b64url_encode(sealed)}"


def _unpad(padded: bytes) -> str:
    if len(padded) < 2:
        raise ValueError("short")
    length = struct.unpack(">H", padded[:2])[0]
    if length > len(padded) - 2 or length > MAX_SECRET_BYTES:
        raise ValueError("length")
    if any(padded[2 + length :]):
        raise ValueError("padding")
    if len(padded) != len(pad_plaintext(b"\x00" * length)):
        raise ValueError("overpadded")
    return padded[2 : 2 + length].decode("utf-8")


# --------------------------------------------------------------------------- recipients


@dataclass(frozen=True)
class RecipientKey:
    """One public key of the realm's keyring."""

    kid: str
    public_raw: bytes
    status: KeyStatus
    created: str = ""
    note: str = ""

    @property
    def public_text(self) -> str:
        """The public key as stored in recipients.yaml."""
        return b64url_encode(self.public_raw)


@dataclass(frozen=True)
class Recipients:
    """The contents of ``recipients.yaml``: realm, active key, every known public key."""

    realm: str
    active: str
    keys: tuple[RecipientKey, ...]
    source: str = ""

    def key(self, kid: str) -> RecipientKey:
        """The key with this id, or :class:`UnknownKeyError`."""
        for candidate in self.keys:
            if candidate.kid == kid:
                return candidate
        raise UnknownKeyError(f"key id {kid} is not in {self.source or 'recipients.yaml'}")

    def active_key(self) -> RecipientKey:
        """The key that new values are sealed to."""
        return self.key(self.active)

    def with_key(self, new: RecipientKey, *, make_active: bool) -> Recipients:
        """A copy with ``new`` added; the previous active key becomes decrypt-only."""
        keys = [
            RecipientKey(k.kid, k.public_raw, "decrypt-only", k.created, k.note)
            if make_active and k.status == "active"
            else k
            for k in self.keys
        ]
        keys.append(new)
        return Recipients(
            realm=self.realm,
            active=new.kid if make_active else self.active,
            keys=tuple(keys),
            source=self.source,
        )

    def with_status(self, kid: str, status: KeyStatus) -> Recipients:
        """A copy with one key's status changed."""
        self.key(kid)
        if kid == self.active and status != "active":
            raise RecipientsError(f"key {kid} is the active key; rotate to a new key first")
        keys = tuple(
            RecipientKey(k.kid, k.public_raw, status, k.created, k.note) if k.kid == kid else k
            for k in self.keys
        )
        return Recipients(realm=self.realm, active=self.active, keys=keys, source=self.source)

    @classmethod
    def from_mapping(cls, data: Any, *, source: str) -> Recipients:
        """Validate the parsed YAML of recipients.yaml."""

        def fail(message: str) -> RecipientsError:
            return RecipientsError(f"{source}: {message}")

        if not isinstance(data, Mapping):
            raise fail("expected a mapping with format, realm, active and keys")
        if data.get("format") != "sipvault-recipients/1":
            raise fail("format must be 'sipvault-recipients/1'")
        realm = data.get("realm")
        if not isinstance(realm, str) or not REALM_RE.match(realm):
            raise fail("realm must be a short lower-case name such as 'acme-voip'")
        raw_keys = data.get("keys")
        if not isinstance(raw_keys, list) or not raw_keys:
            raise fail("keys must be a non-empty list")
        keys: list[RecipientKey] = []
        for index, item in enumerate(raw_keys):
            if not isinstance(item, Mapping):
                raise fail(f"keys[{index}] must be a mapping")
            kid, public, status = item.get("kid"), item.get("public"), item.get("status")
            if not isinstance(kid, str) or not KID_RE.match(kid):
                raise fail(f"keys[{index}].kid is malformed")
            if not isinstance(public, str):
                raise fail(f"keys[{index}].public is missing")
            try:
                public_raw = b64url_decode(public, what="public key")
            except TokenFormatError as exc:
                raise fail(f"keys[{index}].public: {exc}") from None
            if len(public_raw) != 32:
                raise fail(f"keys[{index}].public must be 32 bytes")
            if compute_kid(public_raw) != kid:
                raise fail(f"keys[{index}]: kid {kid} does not match its public key")
            if status not in KEY_STATUSES:
                raise fail(f"keys[{index}].status must be one of {', '.join(KEY_STATUSES)}")
            if any(k.kid == kid for k in keys):
                raise fail(f"key {kid} is listed twice")
            keys.append(
                RecipientKey(
                    kid=kid,
                    public_raw=public_raw,
                    status=status,
                    created=str(item.get("created", "")),
                    note=str(item.get("note", "")),
                )
            )
        active = data.get("active")
        actives = [k.kid for k in keys if k.status == "active"]
        if actives != [active]:
            raise fail("exactly one key must have status 'active', and 'active' must name it")
        return cls(realm=realm, active=str(active), keys=tuple(keys), source=source)

    def to_text(self) -> str:
        """The canonical YAML text of recipients.yaml."""
        lines = [
            "# Public keys of this inventory's realm. Reviewed like code: a substituted key",
            "# would send new passwords to someone else. Managed by `provisioner keys`.",
            "format: sipvault-recipients/1",
            f"realm: {self.realm}",
            f"active: {self.active}",
            "keys:",
        ]
        for key in self.keys:
            lines += [
                f"  - kid: {key.kid}",
                f'    public: "{key.public_text}"',
                f"    status: {key.status}",
                f"    created: {json.dumps(key.created)}",
                f"    note: {json.dumps(key.note)}",
            ]
        return "\n".join(lines) + "\n"


def load_recipients_file(path: Path) -> Recipients:
    """Read and validate a ``recipients.yaml`` file."""
    if not path.exists():
        raise RecipientsError(
            f"{path} does not exist; create the realm with 'provisioner keys init'"
        )
    return Recipients.from_mapping(yamldoc.load_data(path), source=str(path))


def new_recipients(realm: str, key: RecipientKey) -> Recipients:
    """A fresh realm whose only key is ``key``."""
    if not REALM_RE.match(realm):
        raise RecipientsError(
            "a realm is 1-63 lower-case letters, digits, '.', '_' or '-', such as 'acme-voip'"
        )
    return Recipients(realm=realm, active=key.kid, keys=(key,))


# --------------------------------------------------------------------------- identities

# Floors below which an identity file is refused: a copy with weakened parameters would be
# cheap to brute-force even though its AAD stops silent edits.
ARGON2_DEFAULT: dict[str, int] = {"t": 3, "p": 4, "m_kib": 65536}
SCRYPT_DEFAULT: dict[str, int] = {"log_n": 17, "r": 8, "p": 1}
ARGON2_FLOOR: dict[str, int] = {"t": 3, "p": 1, "m_kib": 65536}
SCRYPT_FLOOR: dict[str, int] = {"log_n": 17, "r": 8, "p": 1}
# Ceilings above which an identity file is refused before any derivation: the parameters are
# read before they can be authenticated, so a tampered file could otherwise ask for hours of
# work or terabytes of memory. At the ceilings an unlock takes seconds and at most 1 GiB.
ARGON2_CEILING: dict[str, int] = {"t": 10, "p": 16, "m_kib": 1024 * 1024}
SCRYPT_CEILING: dict[str, int] = {"log_n": 20, "r": 16, "p": 4}
KDF_MAX_MEMORY = 1024 * 1024 * 1024
SALT_BYTES = (16, 64)
NONCE_BYTES = 12
SEALED_KEY_BYTES = 32 + TAG_LEN

Protection = Literal["argon2id", "scrypt", "none"]


@dataclass(frozen=True)
class Identity:
    """An unlocked private key. Its repr never shows key material."""

    kid: str
    _private: X25519PrivateKey = field(repr=False)
    source: str = ""

    @property
    def public_raw(self) -> bytes:
        """The raw 32-byte public key."""
        return self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def recipient(
        self, *, status: KeyStatus = "active", created: str = "", note: str = ""
    ) -> RecipientKey:
        """The public half, as a recipients.yaml entry."""
        return RecipientKey(self.kid, self.public_raw, status, created, note)

    def decrypt(self, enc_and_ct: bytes, info: bytes) -> bytes:
        """HPKE open; raises :class:`CannotDecryptError` on any failure."""
        try:
            return _SUITE.decrypt(enc_and_ct, self._private, info=info)
        except (InvalidTag, ValueError):
            raise CannotDecryptError("cannot decrypt") from None

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("an Identity cannot be pickled")


def generate_identity() -> Identity:
    """A new random X25519 key pair."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return Identity(kid=compute_kid(public), _private=private)


def argon2id_available() -> bool:
    """False on cryptography builds linked against an OpenSSL without Argon2."""
    try:
        Argon2id(salt=b"\x00" * 16, length=32, iterations=1, lanes=1, memory_cost=8).derive(b"")
    except UnsupportedAlgorithm:
        return False
    return True


def _derive_kek(protection: str, params: Mapping[str, Any], passphrase: bytes) -> bytes:
    salt = b64url_decode(str(params["salt"]), what="kdf salt")
    if protection == "argon2id":
        return Argon2id(
            salt=salt,
            length=32,
            iterations=int(params["t"]),
            lanes=int(params["p"]),
            memory_cost=int(params["m_kib"]),
        ).derive(passphrase)
    return Scrypt(
        salt=salt, length=32, n=2 ** int(params["log_n"]), r=int(params["r"]), p=int(params["p"])
    ).derive(passphrase)


def _identity_aad(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def wrap_identity(
    identity: Identity,
    passphrase: bytes | None,
    *,
    protection: Protection = "argon2id",
    note: str = "",
) -> str:
    """Serialise an identity file; the private key wrapped under a passphrase-derived key."""
    private_raw = identity._private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    fields: dict[str, Any] = {
        "format": "sipvault-identity/1",
        "kid": identity.kid,
        "public": b64url_encode(identity.public_raw),
        "protection": protection,
    }
    if protection == "none":
        if passphrase is not None:
            raise IdentityError("an unprotected identity takes no passphrase")
        fields["private"] = b64url_encode(private_raw)
    else:
        if not passphrase:
            raise IdentityError("a passphrase is required")
        defaults = ARGON2_DEFAULT if protection == "argon2id" else SCRYPT_DEFAULT
        kdf: dict[str, Any] = dict(defaults)
        kdf["salt"] = b64url_encode(os.urandom(16))
        fields["kdf"] = kdf
        nonce = os.urandom(12)
        fields["nonce"] = b64url_encode(nonce)
        kek = _derive_kek(protection, kdf, passphrase)
        sealed = AESGCM(kek).encrypt(nonce, private_raw, _identity_aad(fields))
        fields["sealed"] = b64url_encode(sealed)
    header = [
        "# sipvault identity: a PRIVATE key that decrypts every password of its realm.",
        "# Keep it out of git, readable by its owner only (chmod 600).",
    ]
    if note:
        header.append(f"# {note}")
    body = []
    for key, value in fields.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}: {json.dumps(v)}" for k, v in value.items())
            body.append(f"{key}: {{{inner}}}")
        else:
            body.append(f"{key}: {json.dumps(value)}")
    return "\n".join(header + body) + "\n"


def identity_needs_passphrase(data: Any) -> bool:
    """True when the parsed identity file is passphrase-protected."""
    return not (isinstance(data, Mapping) and data.get("protection") == "none")


def unlock_identity(data: Any, passphrase: bytes | None, *, source: str) -> Identity:
    """Unwrap a parsed identity file; a wrong passphrase and a tampered file look the same."""

    def fail(message: str) -> IdentityError:
        return IdentityError(f"{source}: {message}")

    if not isinstance(data, Mapping) or data.get("format") != "sipvault-identity/1":
        raise fail("not a sipvault identity file (format: sipvault-identity/1)")
    kid, public, protection = data.get("kid"), data.get("public"), data.get("protection")
    if not isinstance(kid, str) or not KID_RE.match(kid) or not isinstance(public, str):
        raise fail("kid or public key missing or malformed")
    try:
        public_raw = b64url_decode(public, what="public key")
    except TokenFormatError as exc:
        raise fail(str(exc)) from None
    if compute_kid(public_raw) != kid:
        raise fail(f"kid {kid} does not match the public key in the file")
    if protection == "none":
        try:
            private_raw = b64url_decode(str(data.get("private", "")), what="private key")
        except TokenFormatError as exc:
            raise fail(str(exc)) from None
    elif protection in ("argon2id", "scrypt"):
        private_raw = _unwrap(data, protection, passphrase, fail)
    else:
        raise fail("protection must be argon2id, scrypt or none")
    if len(private_raw) != 32:
        raise fail("the private key has the wrong length")
    private = X25519PrivateKey.from_private_bytes(private_raw)
    derived = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if derived != public_raw:
        raise fail("the private key does not match the public key in the file")
    return Identity(kid=kid, _private=private, source=source)


def _unwrap(data: Mapping[str, Any], protection: str, passphrase: bytes | None, fail: Any) -> bytes:
    kdf = data.get("kdf")
    _check_kdf(kdf, protection, fail)
    assert isinstance(kdf, Mapping)  # noqa: S101 - _check_kdf refused anything else
    if not passphrase:
        raise fail("a passphrase is required to unlock this identity")
    try:
        nonce = b64url_decode(_field_text(data, "nonce"), what="nonce")
        sealed = b64url_decode(_field_text(data, "sealed"), what="sealed key")
    except TokenFormatError as exc:
        raise fail(str(exc)) from None
    if len(nonce) != NONCE_BYTES or len(sealed) != SEALED_KEY_BYTES:
        raise fail("the nonce or the sealed key has the wrong length (the file is damaged)")
    fields = {k: data[k] for k in ("format", "kid", "public", "protection", "nonce")}
    fields["kdf"] = dict(kdf)
    try:
        kek = _derive_kek(protection, kdf, passphrase)
    except UnsupportedAlgorithm:
        raise fail(
            "this cryptography build has no Argon2id; rewrap the identity with --kdf scrypt"
        ) from None
    try:
        return AESGCM(kek).decrypt(nonce, sealed, _identity_aad(fields))
    except (InvalidTag, ValueError):
        raise fail("wrong passphrase, or the identity file was altered") from None


def _field_text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise TokenFormatError(f"{name} is missing or not text")
    return value


def _check_kdf(kdf: object, protection: str, fail: Any) -> None:
    """Refuse KDF parameters outside [floor, ceiling], before any work is spent on them."""
    floor, ceiling = (
        (ARGON2_FLOOR, ARGON2_CEILING)
        if protection == "argon2id"
        else (SCRYPT_FLOOR, SCRYPT_CEILING)
    )
    names = tuple(floor)
    if not isinstance(kdf, Mapping) or any(
        type(kdf.get(n)) is not int
        for n in names  # bool is an int too: refused
    ):
        raise fail(f"kdf parameters for {protection} are missing or malformed")
    weakened = [f"{n}={kdf[n]} (minimum {floor[n]})" for n in names if kdf[n] < floor[n]]
    if weakened:
        raise fail(
            "the key-derivation parameters were lowered below the minimum ("
            + ", ".join(weakened)
            + "); refusing to use this file"
        )
    excessive = [f"{n}={kdf[n]} (maximum {ceiling[n]})" for n in names if kdf[n] > ceiling[n]]
    if protection == "scrypt" and not excessive:
        memory = 128 * kdf["r"] * 2 ** kdf["log_n"]
        if memory > KDF_MAX_MEMORY:
            excessive.append(
                f"r={kdf['r']} with log_n={kdf['log_n']} needs {memory // 2**20} MiB "
                f"(maximum {KDF_MAX_MEMORY // 2**20})"
            )
    if excessive:
        raise fail(
            "the key-derivation parameters are out of range ("
            + ", ".join(excessive)
            + "); the file was altered or damaged: refusing to use it"
        )
    try:
        salt = b64url_decode(_field_text(kdf, "salt"), what="kdf salt")
    except TokenFormatError as exc:
        raise fail(str(exc)) from None
    if not SALT_BYTES[0] <= len(salt) <= SALT_BYTES[1]:
        raise fail(
            f"the kdf salt is {len(salt)} bytes; it must be {SALT_BYTES[0]} to {SALT_BYTES[1]}"
        )


# --------------------------------------------------------------------------- openers


class Opener(Protocol):
    """Turns a token standing at ``path`` into a :class:`Secret`."""

    def open(self, token: str, path: str) -> Secret:
        """Open (or stand in for) the token at ``path``."""
        ...


def check_token(token: str, path: str, recipients: Recipients) -> TokenParts:
    """Every keyless check: structure, known and usable kid, pathtag of this location."""
    parts = parse_token(token)
    key = recipients.key(parts.kid)
    if key.status == "retired":
        raise RetiredKeyError(f"key {parts.kid} is retired; rekey this value")
    if parts.pathtag != compute_pathtag(recipients.realm, path):
        raise PathMismatchError(
            "the token was sealed for another path (moved or copied?); "
            "use 'secrets rebind' if the entry was renamed, or set it anew"
        )
    return parts


@dataclass
class Keyring:
    """Unlocked identities of one realm; each token picks its key by kid, never by trial."""

    recipients: Recipients
    identities: dict[str, Identity] = field(default_factory=dict)

    def add(self, identity: Identity) -> None:
        """Make an unlocked identity available; its kid must be in the realm."""
        self.recipients.key(identity.kid)
        self.identities[identity.kid] = identity

    def open(self, token: str, path: str) -> Secret:
        """Open one token: keyless checks first, then exactly one decryption."""
        parts = check_token(token, path, self.recipients)
        identity = self.identities.get(parts.kid)
        if identity is None:
            raise MissingIdentityError(
                f"no identity for key {parts.kid} was given (pass --identity FILE)"
            )
        info = hpke_info(self.recipients.realm, parts.kid, path, parts.scope)
        padded = identity.decrypt(parts.enc + parts.ciphertext, info)
        try:
            return Secret(_unpad(padded))
        except (ValueError, UnicodeDecodeError):
            raise CannotDecryptError("cannot decrypt") from None


@dataclass
class PlaceholderOpener:
    """Key-less stand-in for CI: a unique, ini-safe value per path, after every keyless check."""

    recipients: Recipients

    def open(self, token: str, path: str) -> Secret:
        """``PH-<pathtag>`` for a structurally valid token at ``path``."""
        check_token(token, path, self.recipients)
        return Secret(placeholder_for(self.recipients.realm, path))


def placeholder_for(realm: str, path: str) -> str:
    """The placeholder that stands for the secret at ``path`` in key-less renders."""
    return f"PH-{compute_pathtag(realm, path)}"


def distinct_enc(tokens: Iterable[str]) -> dict[bytes, int]:
    """Count each ephemeral key; any count above one means a copied token."""
    counts: dict[bytes, int] = {}
    for token in tokens:
        try:
            enc = parse_token(token).enc
        except TokenFormatError:
            continue
        counts[enc] = counts.get(enc, 0) + 1
    return counts
