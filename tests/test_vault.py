"""Unit tests of tokens, the Secret type, identity files and recipients."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import errors
from provisioner.inventory import yamldoc
from provisioner.inventory.model import Secret
from provisioner.secrets import vault

REALM = "acme-voip"
PATH = "/users/alice/accounts/0/password"


@pytest.fixture(scope="module")
def identity() -> vault.Identity:
    return vault.generate_identity()


@pytest.fixture(scope="module")
def keyring(identity: vault.Identity) -> vault.Keyring:
    ring = vault.Keyring(vault.new_recipients(REALM, identity.recipient()))
    ring.add(identity)
    return ring


def test_secret_is_masked_everywhere() -> None:
    secret = Secret("Canary-Pw-7731")
    assert "Canary" not in repr(secret)
    assert "Canary" not in str(secret)
    assert "Canary" not in f"{secret}"
    assert "Canary" not in f"{secret!r:>40}"
    assert "Canary" not in "%s %r" % (secret, secret)  # noqa: UP031 - the old style too
    assert "Canary" not in repr([secret, {"pw": secret}])
    assert secret.reveal() == "Canary-Pw-7731"


@pytest.mark.parametrize("dump", [pickle.dumps, copy.copy, copy.deepcopy, json.dumps])
def test_secret_refuses_serialisation(dump: object) -> None:
    with pytest.raises(TypeError):
        dump(Secret("Canary-Pw-7731"))  # type: ignore[operator]


def test_secret_compares_in_constant_time_and_is_unhashable() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    with pytest.raises(TypeError):
        hash(Secret("a"))
    with pytest.raises(AttributeError):
        Secret("a")._plain = "b"  # type: ignore[misc]


def test_token_shape_and_fixed_length(keyring: vault.Keyring) -> None:
    key = keyring.recipients.active_key()
    token = vault.seal(Secret("x"), realm=REALM, path=PATH, recipient=key)
    assert len(token) == 138
    assert vault.TOKEN_RE.match(token)
    assert token.split(":")[3] == vault.compute_pathtag(REALM, PATH)
    assert len(vault.seal(Secret("y" * 30), realm=REALM, path=PATH, recipient=key)) == 138
    assert len(vault.seal(Secret("y" * 31), realm=REALM, path=PATH, recipient=key)) == 181


def test_every_seal_is_fresh(keyring: vault.Keyring) -> None:
    key = keyring.recipients.active_key()
    tokens = {vault.seal(Secret("same"), realm=REALM, path=PATH, recipient=key) for _ in range(5)}
    assert len(tokens) == 5


def test_token_copied_to_another_user_fails(keyring: vault.Keyring) -> None:
    key = keyring.recipients.active_key()
    token = vault.seal(Secret("alice-pw"), realm=REALM, path=PATH, recipient=key)
    with pytest.raises(errors.PathMismatchError):
        keyring.open(token, "/users/mallory/accounts/0/password")
    forged = token.split(":")
    forged[3] = vault.compute_pathtag(REALM, "/users/mallory/accounts/0/password")
    with pytest.raises(errors.CannotDecryptError):
        keyring.open(":".join(forged), "/users/mallory/accounts/0/password")


@pytest.mark.parametrize(
    "value",
    [
        "pw\r\n[Account1]",
        "pw\nserver=evil",
        "nul\x00",
        "bell\x07",
        "del\x7f",
        "nel\x85",
        "ls\u2028x",
        "zw\u200bsp",
        " lead",
        "trail ",
        '"quoted"',
        "'quoted'",
        "",
        "x" * 257,
    ],
)
def test_policy_refuses_ini_unsafe_values(keyring: vault.Keyring, value: str) -> None:
    key = keyring.recipients.active_key()
    with pytest.raises(errors.PolicyViolationError) as caught:
        vault.seal(Secret(value), realm=REALM, path=PATH, recipient=key)
    if value.strip():
        assert value.strip() not in str(caught.value)


def test_policy_accepts_unicode_and_punctuation() -> None:
    for value in ["Zürich-Ωmega-東京", "a;b=c#d", 'in"side', "x" * 256, "🙂smile"]:
        assert vault.policy_problem(value) is None


def test_retired_and_decrypt_only_keys_cannot_be_sealed_to(identity: vault.Identity) -> None:
    for status in ("decrypt-only", "retired"):
        key = identity.recipient(status=status)  # type: ignore[arg-type]
        with pytest.raises(errors.RetiredKeyError):
            vault.seal(Secret("pw"), realm=REALM, path=PATH, recipient=key)


def test_retired_key_tokens_are_refused(identity: vault.Identity) -> None:
    other = vault.generate_identity()
    token = vault.seal(Secret("pw"), realm=REALM, path=PATH, recipient=identity.recipient())
    recipients = vault.new_recipients(REALM, other.recipient()).with_key(
        identity.recipient(status="retired"), make_active=False
    )
    with pytest.raises(errors.RetiredKeyError):
        vault.check_token(token, PATH, recipients)


def test_identity_round_trip_and_wrong_passphrase(identity: vault.Identity) -> None:
    text = vault.wrap_identity(identity, b"a long passphrase", protection="scrypt")
    data = yamldoc.compose_text(text, "x")  # parses
    assert data.scalars
    parsed = _load(text)
    assert vault.unlock_identity(parsed, b"a long passphrase", source="f").kid == identity.kid
    with pytest.raises(errors.IdentityError, match="wrong passphrase, or the identity file"):
        vault.unlock_identity(parsed, b"not it", source="f")


def _load(text: str) -> object:
    import io

    from ruamel.yaml import YAML

    return YAML(typ="safe").load(io.StringIO(text))


def test_identity_with_lowered_kdf_is_refused(identity: vault.Identity) -> None:
    parsed = _load(vault.wrap_identity(identity, b"a long passphrase", protection="scrypt"))
    assert isinstance(parsed, dict)
    parsed["kdf"]["log_n"] = 10
    with pytest.raises(errors.IdentityError, match="lowered below the minimum"):
        vault.unlock_identity(parsed, b"a long passphrase", source="id.sipid")


def test_identity_with_edited_fields_does_not_unlock(identity: vault.Identity) -> None:
    parsed = _load(vault.wrap_identity(identity, b"a long passphrase", protection="scrypt"))
    assert isinstance(parsed, dict)
    parsed["kdf"]["log_n"] = 18  # raised, so above the floor: the AAD still catches it
    with pytest.raises(errors.IdentityError, match="wrong passphrase, or the identity file"):
        vault.unlock_identity(parsed, b"a long passphrase", source="f")


def test_argon2id_identity_unlocks(identity: vault.Identity) -> None:
    if not vault.argon2id_available():
        pytest.skip("this cryptography build has no Argon2id")
    parsed = _load(vault.wrap_identity(identity, b"a long passphrase", protection="argon2id"))
    assert vault.unlock_identity(parsed, b"a long passphrase", source="f").kid == identity.kid


def test_recipients_reject_a_substituted_public_key(identity: vault.Identity) -> None:
    text = vault.new_recipients(REALM, identity.recipient()).to_text()
    other = vault.b64url_encode(vault.generate_identity().public_raw)
    tampered = text.replace(vault.b64url_encode(identity.public_raw), other)
    with pytest.raises(errors.RecipientsError, match="does not match its public key"):
        vault.Recipients.from_mapping(_load(tampered), source="recipients.yaml")


def test_recipients_round_trip(identity: vault.Identity) -> None:
    recipients = vault.new_recipients(REALM, identity.recipient(created="2026-01-01", note="n"))
    again = vault.Recipients.from_mapping(_load(recipients.to_text()), source="r")
    assert again.keys == recipients.keys
    assert again.realm == REALM


def test_placeholder_is_unique_per_path_and_checks_structure(keyring: vault.Keyring) -> None:
    key = keyring.recipients.active_key()
    opener = vault.PlaceholderOpener(keyring.recipients)
    paths = [f"/users/u{i}/accounts/0/password" for i in range(200)]
    values = set()
    for path in paths:
        token = vault.seal(Secret("pw"), realm=REALM, path=path, recipient=key)
        value = opener.open(token, path).reveal()
        assert vault.policy_problem(value) is None
        values.add(value)
    assert len(values) == len(paths)
    with pytest.raises(errors.PathMismatchError):
        opener.open(token, paths[0])


ini_safe = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn", "Zs"),
    ),
    min_size=1,
    max_size=64,
).filter(lambda s: vault.policy_problem(s) is None and len(s.encode()) <= 256)


@settings(max_examples=60, deadline=None)
@given(value=ini_safe)
def test_property_round_trip(keyring: vault.Keyring, value: str) -> None:
    key = keyring.recipients.active_key()
    token = vault.seal(Secret(value), realm=REALM, path=PATH, recipient=key)
    assert keyring.open(token, PATH).reveal() == value


@settings(max_examples=60, deadline=None)
@given(value=ini_safe)
def test_property_length_depends_only_on_bucket(keyring: vault.Keyring, value: str) -> None:
    key = keyring.recipients.active_key()
    token = vault.seal(Secret(value), realm=REALM, path=PATH, recipient=key)
    assert len(token) == vault.token_length(len(value.encode()))
    bucket = (len(value.encode()) + 2 + 31) // 32
    assert len(token) == vault.token_length(bucket * 32 - 2)


@settings(max_examples=40, deadline=None)
@given(flip=st.integers(min_value=0, max_value=79), bit=st.integers(min_value=0, max_value=7))
def test_property_any_bit_flip_is_rejected(keyring: vault.Keyring, flip: int, bit: int) -> None:
    key = keyring.recipients.active_key()
    token = vault.seal(Secret("pw"), realm=REALM, path=PATH, recipient=key)
    parts = token.split(":")
    payload = bytearray(vault.b64url_decode(parts[4], what="p"))
    payload[flip] ^= 1 << bit
    parts[4] = vault.b64url_encode(bytes(payload))
    with pytest.raises(errors.CannotDecryptError):
        keyring.open(":".join(parts), PATH)
