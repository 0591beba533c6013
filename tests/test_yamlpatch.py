"""Golden tests: setting or re-keying a token changes nothing but the token text."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from provisioner.errors import YamlEditError
from provisioner.inventory.model import Secret
from provisioner.secrets import secretstore, vault

GOLDEN = Path(__file__).parent / "golden" / "yamlpatch"
CASES = json.loads((GOLDEN / "cases.json").read_text())
TOKEN = re.compile(r"sipvault:v1:k[a-z2-7]{8}:[A-Za-z0-9_-]{8}:[A-Za-z0-9_-]+")


@pytest.fixture(scope="module")
def identity() -> vault.Identity:
    return vault.generate_identity()


def _realm(tmp_path: Path, identity: vault.Identity) -> vault.Recipients:
    recipients = vault.new_recipients("golden", identity.recipient())
    secretstore.write_recipients(tmp_path, recipients)
    return recipients


@pytest.mark.parametrize("case", sorted(CASES))
def test_set_changes_only_the_token(tmp_path: Path, identity: vault.Identity, case: str) -> None:
    recipients = _realm(tmp_path, identity)
    target = tmp_path / f"{case}.yaml"
    shutil.copyfile(GOLDEN / f"{case}.yaml", target)
    path = CASES[case]["path"]
    secretstore.set_secret(tmp_path, path, Secret("New-Pw-1"), recipients)
    result = target.read_bytes().decode("utf-8")
    new_tokens = [t for t in TOKEN.findall(result) if t.split(":")[2] == identity.kid]
    assert len(new_tokens) == 1
    expected = (GOLDEN / f"{case}.expected").read_bytes().decode("utf-8")
    assert result.replace(new_tokens[0], "@@TOKEN@@") == expected
    keyring = vault.Keyring(recipients, {identity.kid: identity})
    assert keyring.open(new_tokens[0], path).reveal() == "New-Pw-1"


@pytest.mark.parametrize("case", ["comments", "crlf", "odd_indent", "flow", "mapping_accounts"])
def test_rekey_diff_is_limited_to_token_spans(tmp_path: Path, case: str) -> None:
    old, new = vault.generate_identity(), vault.generate_identity()
    recipients = vault.new_recipients("golden", old.recipient())
    secretstore.write_recipients(tmp_path, recipients)
    target = tmp_path / f"{case}.yaml"
    shutil.copyfile(GOLDEN / f"{case}.yaml", target)
    # Seal every secret field of the case to the old key first.
    for ref in secretstore.scan_inventory(tmp_path).secret_fields:
        secretstore.set_secret(tmp_path, ref.pointer, Secret(f"pw-{case}"), recipients)
    before = target.read_bytes()
    rotated = recipients.with_key(new.recipient(), make_active=True)
    secretstore.write_recipients(tmp_path, rotated)
    keyring = vault.Keyring(rotated, {old.kid: old, new.kid: new})
    report = secretstore.rekey(secretstore.scan_inventory(tmp_path), keyring, new.kid)
    assert report.resealed == len(TOKEN.findall(before.decode())) > 0
    assert report.verified_by_opening
    after = target.read_bytes()
    assert TOKEN.sub("T", after.decode()) == TOKEN.sub("T", before.decode())
    assert after.count(b"\r\n") == before.count(b"\r\n")
    assert {t.split(":")[2] for t in TOKEN.findall(after.decode())} == {new.kid}
    findings = secretstore.lint_secrets(secretstore.scan_inventory(tmp_path), rotated)
    assert [f for f in findings if f.severity == "error"] == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("users:\n  a:\n    accounts:\n      - password: |\n          old\n", "block scalar"),
        (
            "x: &pw old\nusers:\n  a:\n    accounts:\n      - password: *pw\n",
            "anchor, alias or tag",
        ),
        ("users:\n  a:\n    accounts:\n      - password: !secret old\n", "anchor, alias or tag"),
        ("users:\n  a:\n    accounts: [{password: old}]\n  b: {accounts: [{}]}\n", "cannot add"),
    ],
)
def test_unpatchable_files_are_refused_and_left_alone(
    tmp_path: Path, identity: vault.Identity, text: str, message: str
) -> None:
    recipients = _realm(tmp_path, identity)
    target = tmp_path / "users.yaml"
    target.write_text(text)
    path = "/users/b/accounts/0/password" if "b:" in text else "/users/a/accounts/0/password"
    with pytest.raises(YamlEditError, match=message):
        secretstore.set_secret(tmp_path, path, Secret("pw"), recipients)
    assert target.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipients.yaml", "users.yaml"]


def test_set_refuses_paths_that_are_not_secret_fields(
    tmp_path: Path, identity: vault.Identity
) -> None:
    recipients = _realm(tmp_path, identity)
    (tmp_path / "u.yaml").write_text("users:\n  a:\n    display_name: A\n")
    with pytest.raises(Exception, match="not a secret field"):
        secretstore.set_secret(tmp_path, "/users/a/display_name", Secret("pw"), recipients)


def test_set_refuses_a_path_defined_in_two_files(tmp_path: Path, identity: vault.Identity) -> None:
    recipients = _realm(tmp_path, identity)
    text = "users:\n  a:\n    accounts:\n      - password: old\n"
    (tmp_path / "one.yaml").write_text(text)
    (tmp_path / "two.yaml").write_text(text)
    with pytest.raises(YamlEditError, match="more than one file"):
        secretstore.set_secret(tmp_path, "/users/a/accounts/0/password", Secret("pw"), recipients)
