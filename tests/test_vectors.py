"""Frozen known-answer and negative vectors (tests/vectors/vectors.json, never regenerated)."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner import errors
from provisioner.secrets import vault
from tests.conftest import VECTORS
from tests.hpke_reference import AEAD_AES_128_GCM, AEAD_AES_256_GCM, open_base


def _vectors(kind: str) -> list[dict[str, Any]]:
    import json

    return json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))[kind]  # type: ignore[no-any-return]


@pytest.mark.parametrize("vector", _vectors("positive"), ids=lambda v: v["path"])
def test_known_answer_vectors_open(vector: dict[str, Any], test_keyring: vault.Keyring) -> None:
    secret = test_keyring.open(vector["token"], vector["path"])
    assert secret.reveal() == vector["plaintext"]


@pytest.mark.parametrize("vector", _vectors("negative"), ids=lambda v: v["name"])
def test_negative_vectors_fail_with_their_class(
    vector: dict[str, Any], test_keyring: vault.Keyring
) -> None:
    expected = getattr(errors, vector["error"])
    recipients = test_keyring.recipients
    if vector["realm"] != recipients.realm:
        recipients = vault.Recipients(
            realm=vector["realm"], active=recipients.active, keys=recipients.keys
        )
    keyring = vault.Keyring(recipients, dict(test_keyring.identities))
    with pytest.raises(expected) as caught:
        secret = keyring.open(vector["token"], vector["path"])
        vault.check_policy(secret)
    if expected is errors.CannotDecryptError:
        # After the structure checks every failure reads the same: no oracle.
        assert str(caught.value) == "cannot decrypt"


def test_negative_vectors_cover_the_design_list() -> None:
    names = {v["name"] for v in _vectors("negative")}
    for required in (
        "wrong-path",
        "wrong-realm",
        "unknown-kid",
        "kid-edited-to-other-valid-kid",
        "flip-enc",
        "flip-ct",
        "flip-tag",
        "truncated",
        "extended",
        "non-canonical-base64",
        "trailing-equals",
        "upper-case-prefix",
        "version-v2",
        "trailing-whitespace",
        "pathtag-mismatch",
        "padding-not-zero",
        "length-beyond-plaintext",
        "invalid-utf8",
        "control-cr-lf",
    ):
        assert required in names


# RFC 9180 appendix A.1.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM), sequence 0.
RFC_SK_R = "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8"
RFC_ENC = "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431"
RFC_INFO = "4f6465206f6e2061204772656369616e2055726e"
RFC_AAD = "436f756e742d30"
RFC_CT = (
    "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"
)
RFC_PT = "4265617574792069732074727574682c20747275746820626561757479"


def test_reference_opener_matches_rfc9180_vector() -> None:
    plaintext = open_base(
        bytes.fromhex(RFC_SK_R),
        bytes.fromhex(RFC_ENC),
        bytes.fromhex(RFC_CT),
        bytes.fromhex(RFC_INFO),
        bytes.fromhex(RFC_AAD),
        AEAD_AES_128_GCM,
    )
    assert plaintext == bytes.fromhex(RFC_PT)


def _private_raw(keyring: vault.Keyring) -> bytes:
    from cryptography.hazmat.primitives import serialization

    identity = next(iter(keyring.identities.values()))
    return identity._private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


@pytest.mark.parametrize("vector", _vectors("positive"), ids=lambda v: v["path"])
def test_reference_opener_opens_frozen_tokens(
    vector: dict[str, Any], test_keyring: vault.Keyring
) -> None:
    _check_with_reference(vector["token"], vector["path"], vector["plaintext"], test_keyring)


def test_reference_opener_opens_fresh_tokens(test_keyring: vault.Keyring) -> None:
    from provisioner.inventory.model import Secret

    key = test_keyring.recipients.active_key()
    path = "/users/fresh/accounts/0/password"
    token = vault.seal(
        Secret("fresh-Ä-1"), realm=test_keyring.recipients.realm, path=path, recipient=key
    )
    _check_with_reference(token, path, "fresh-Ä-1", test_keyring)


def _check_with_reference(token: str, path: str, plaintext: str, keyring: vault.Keyring) -> None:
    import struct

    _, version, kid, _, payload_text = token.split(":")
    assert version == "v1"
    payload = vault.b64url_decode(payload_text, what="payload")
    realm = keyring.recipients.realm
    info = (
        b"sipvault/v1"
        + struct.pack(">H", len(realm))
        + realm.encode()
        + struct.pack(">H", len(kid))
        + kid.encode()
        + struct.pack(">H", len(path.encode()))
        + path.encode()
    )
    padded = open_base(
        _private_raw(keyring), payload[:32], payload[32:], info, b"", AEAD_AES_256_GCM
    )
    length = struct.unpack(">H", padded[:2])[0]
    assert padded[2 : 2 + length].decode() == plaintext
    assert not any(padded[2 + length :])
    assert len(padded) % 32 == 0
