"""The keys and secrets commands driven from the shell, workflows and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from provisioner.secrets import vault
from tests.conftest import USERS_YAML, Realm, make_realm

PW_FILE_ARGS = ("--passphrase-file",)


def _setup(realm: Realm) -> None:
    make_realm(realm)
    (realm.inventory / "users.yaml").write_text(USERS_YAML)
    for path, value in (
        ("/users/alice/accounts/0/password", "alice-pw-1"),
        ("/users/bob/accounts/0/password", "bob-pw-2"),
    ):
        realm.run(
            "secrets", "set", "--path", path, "-i", str(realm.inventory), stdin=value, check=True
        )


def _pp(realm: Realm) -> tuple[str, str]:
    return ("--passphrase-file", str(realm.passphrase_file))


def _assert_clean_error(result: object, *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)  # type: ignore[attr-defined]
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    assert stderr.startswith("error: ")
    assert stderr.count("\n") == 1
    for needle in needles:
        assert needle in stderr, stderr


def test_init_creates_recipients_and_private_identity(realm: Realm) -> None:
    make_realm(realm)
    recipients = (realm.inventory / "recipients.yaml").read_text()
    assert "realm: acme-voip" in recipients
    [identity] = realm.identity_files
    assert oct(identity.stat().st_mode & 0o777) == "0o600"
    kid = re.search(r"active: (k\w+)", recipients)
    assert kid and kid.group(1) in identity.name
    again = realm.run(
        "keys", "init", "--realm", "acme-voip", "-i", str(realm.inventory), *_pp(realm)
    )
    _assert_clean_error(again, "already exists")


def test_helpdesk_set_then_admin_verify_and_ci_lint(realm: Realm) -> None:
    _setup(realm)
    text = (realm.inventory / "users.yaml").read_text()
    assert text.count("sipvault:v1:") == 2
    assert "# Berlin" in text and "{sip_uri: 1002@pbx.example.com, password: " in text
    lint = realm.run("secrets", "lint", "-i", str(realm.inventory), check=True)
    assert "2 token(s) checked, 0 error(s)" in lint.stdout
    verify = realm.run("secrets", "verify", "-i", str(realm.inventory), *_pp(realm), check=True)
    assert "2 value(s) opened and checked, 0 failed" in verify.stdout


def test_set_works_without_any_private_key(realm: Realm) -> None:
    make_realm(realm)
    (realm.inventory / "users.yaml").write_text(USERS_YAML)
    for identity in realm.identity_files:
        identity.unlink()
    result = realm.run(
        "secrets",
        "set",
        "--path",
        "/users/alice/accounts/0/password",
        "-i",
        str(realm.inventory),
        stdin="new-pw",
        check=True,
    )
    assert "updated /users/alice/accounts/0/password" in result.stdout


def test_passphrase_from_file_descriptor(realm: Realm) -> None:
    _setup(realm)
    read_end, write_end = os.pipe()
    os.write(write_end, b"correct horse battery staple\n")
    os.close(write_end)
    try:
        result = realm.run(
            "secrets",
            "verify",
            "-i",
            str(realm.inventory),
            "--passphrase-fd",
            str(read_end),
            pass_fds=(read_end,),
        )
    finally:
        os.close(read_end)
    assert result.returncode == 0, result.stderr


def test_rekey_without_the_new_identity_says_the_tokens_were_not_opened(realm: Realm) -> None:
    _setup(realm)
    inv = str(realm.inventory)
    [old_identity] = realm.config.rglob("*.sipid")
    realm.run("keys", "rotate", "-i", inv, *_pp(realm), check=True)
    rekey = realm.run(
        "secrets", "rekey", "-i", inv, "--identity", str(old_identity), *_pp(realm), check=True
    )
    assert "re-sealed 2 value(s)" in rekey.stdout and "(structure checked)" in rekey.stdout
    assert "note: the new tokens were not opened again" in rekey.stdout


def test_rotation_rekey_and_retire(realm: Realm) -> None:
    _setup(realm)
    inv = str(realm.inventory)
    before = (realm.inventory / "users.yaml").read_text()
    rotate = realm.run("keys", "rotate", "-i", inv, *_pp(realm), check=True)
    new_kid = re.search(r"new active key (k\w+)", rotate.stdout)
    assert new_kid
    stale = realm.run("secrets", "lint", "-i", inv, check=True)
    assert "0 error(s), 2 warning(s)" in stale.stdout
    assert stale.stdout.count("warning[stale-key]") == 2
    old_kid = re.search(r"(k\w+) is now decrypt-only", rotate.stdout)
    assert old_kid
    refused = realm.run("keys", "retire", old_kid.group(1), "-i", inv)
    _assert_clean_error(refused, "still use key")
    rekey = realm.run("secrets", "rekey", "-i", inv, *_pp(realm), check=True)
    assert f"re-sealed 2 value(s) to {new_kid.group(1)}" in rekey.stdout
    assert "checked by opening it" in rekey.stdout
    after = (realm.inventory / "users.yaml").read_text()
    token = re.compile(r"sipvault:[\w:-]+")
    assert token.sub("T", after) == token.sub("T", before)
    realm.run("keys", "retire", old_kid.group(1), "-i", inv, check=True)
    listing = realm.run("keys", "list", "-i", inv, check=True).stdout
    assert re.search(rf"{old_kid.group(1)}\s+retired\s+0 tokens", listing)
    assert re.search(rf"{new_kid.group(1)}\s+active\s+2 tokens", listing)
    clean = realm.run("secrets", "lint", "-i", inv, check=True)
    assert "0 error(s), 0 warning(s)" in clean.stdout
    realm.run("secrets", "verify", "-i", inv, *_pp(realm), check=True)


def test_rebind_after_a_user_was_renamed(realm: Realm) -> None:
    _setup(realm)
    inv = str(realm.inventory)
    users = realm.inventory / "users.yaml"
    users.write_text(users.read_text().replace("  alice:", "  alice.mueller:"))
    lint = realm.run("secrets", "lint", "-i", inv)
    assert lint.returncode == 1 and "path-mismatch" in lint.stdout
    result = realm.run(
        "secrets",
        "rebind",
        "/users/alice/accounts/0/password",
        "/users/alice.mueller/accounts/0/password",
        "-i",
        inv,
        *_pp(realm),
        check=True,
    )
    assert "rebound" in result.stdout
    realm.run("secrets", "lint", "-i", inv, check=True)
    realm.run("secrets", "verify", "-i", inv, *_pp(realm), check=True)


def test_add_admin_copy_unlocks_with_its_own_passphrase(realm: Realm) -> None:
    _setup(realm)
    [identity] = realm.identity_files
    new_pp = realm.root / "new-admin-passphrase"
    new_pp.write_text("another long passphrase here\n")
    new_pp.chmod(0o600)
    copy = realm.root / "new-admin.sipid"
    realm.run(
        "keys",
        "add-admin",
        "--identity",
        str(identity),
        "--out",
        str(copy),
        *_pp(realm),
        "--new-passphrase-file",
        str(new_pp),
        check=True,
    )
    assert oct(copy.stat().st_mode & 0o777) == "0o600"
    realm.run(
        "secrets",
        "verify",
        "-i",
        str(realm.inventory),
        "--identity",
        str(copy),
        "--passphrase-file",
        str(new_pp),
        check=True,
    )
    wrong = realm.run(
        "secrets", "verify", "-i", str(realm.inventory), "--identity", str(copy), *_pp(realm)
    )
    _assert_clean_error(wrong, str(copy), "wrong passphrase")


def test_wrong_passphrase_names_the_file(realm: Realm) -> None:
    _setup(realm)
    bad = realm.root / "bad-pp"
    bad.write_text("not the passphrase\n")
    bad.chmod(0o600)
    result = realm.run(
        "secrets", "verify", "-i", str(realm.inventory), "--passphrase-file", str(bad)
    )
    _assert_clean_error(result, ".sipid", "wrong passphrase")


def test_identity_with_lowered_kdf_parameters(realm: Realm) -> None:
    _setup(realm)
    [identity] = realm.identity_files
    text = identity.read_text()
    identity.write_text(
        re.sub(r"m_kib: \d+", "m_kib: 1024", re.sub(r'"?log_n"?: \d+', "log_n: 4", text))
    )
    result = realm.run("secrets", "verify", "-i", str(realm.inventory), *_pp(realm))
    _assert_clean_error(result, str(identity), "lowered below the minimum")


def test_identity_readable_by_others_is_refused(realm: Realm) -> None:
    _setup(realm)
    [identity] = realm.identity_files
    identity.chmod(0o644)
    result = realm.run("secrets", "verify", "-i", str(realm.inventory), *_pp(realm))
    _assert_clean_error(result, "chmod 600")


def test_password_with_control_characters_is_refused_and_nothing_written(realm: Realm) -> None:
    _setup(realm)
    users = realm.inventory / "users.yaml"
    before = users.read_bytes()
    for bad in ("a\r\n[Account1]\r\nserver=evil", "x\x00y", "tab\there"):
        result = realm.run(
            "secrets",
            "set",
            "--path",
            "/users/alice/accounts/0/password",
            "-i",
            str(realm.inventory),
            stdin=bad,
        )
        _assert_clean_error(result, "/users/alice/accounts/0/password", "character")
    assert users.read_bytes() == before
    assert sorted(p.name for p in realm.inventory.iterdir()) == ["recipients.yaml", "users.yaml"]


def test_unpatchable_yaml_is_refused_with_file_and_path(realm: Realm) -> None:
    make_realm(realm)
    users = realm.inventory / "users.yaml"
    users.write_text("users:\n  a:\n    accounts:\n      - password: |\n          old\n")
    result = realm.run(
        "secrets",
        "set",
        "--path",
        "/users/a/accounts/0/password",
        "-i",
        str(realm.inventory),
        stdin="pw",
    )
    _assert_clean_error(result, str(users), "/users/a/accounts/0/password", "block scalar")


def test_lint_catches_every_kind_of_bad_token(realm: Realm) -> None:
    _setup(realm)
    inv = realm.inventory
    text = (inv / "users.yaml").read_text()
    tokens = re.findall(r"sipvault:[\w:-]+", text)
    alice, bob = tokens
    parts = alice.split(":")
    payload = parts[4]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(payload[-1])
    noncanonical = ":".join([*parts[:4], payload[:-1] + alphabet[last ^ 1]])
    extra = f"""\
users:
  carol:
    accounts:
      - sip_uri: 1003@pbx.example.com
        password: {bob}
      - sip_uri: 1004@pbx.example.com
        password: plain-text-oops
      - sip_uri: 1005@pbx.example.com
        password: {":".join([*parts[:2], "kaaaaaaaa", *parts[3:]])}
      - sip_uri: 1006@pbx.example.com
        password: {noncanonical}
  dave:
    display_name: {alice}
"""
    (inv / "more.yaml").write_text(extra)
    result = realm.run("secrets", "lint", "-i", str(inv), "--format", "json")
    assert result.returncode == 1
    findings = json.loads(result.stdout)
    codes = {(f["path"], f["code"]) for f in findings}
    assert ("/users/carol/accounts/0/password", "path-mismatch") in codes
    assert ("/users/carol/accounts/1/password", "plaintext") in codes
    assert ("/users/carol/accounts/2/password", "unknown-key") in codes
    assert ("/users/carol/accounts/3/password", "token-format") in codes
    assert ("/users/dave/display_name", "stray-token") in codes
    plain = next(f for f in findings if f["code"] == "plaintext")
    assert plain["file"].endswith("more.yaml") and plain["line"] == 7
    assert "plain-text-oops" not in result.stdout
    github = realm.run("secrets", "lint", "-i", str(inv), "--format", "github")
    assert "::error file=" in github.stdout


def test_copied_token_is_detected(realm: Realm) -> None:
    _setup(realm)
    users = realm.inventory / "users.yaml"
    text = users.read_text()
    alice = re.findall(r"sipvault:[\w:-]+", text)[0]
    users.write_text(text + f"  carol:\n    accounts:\n      - password: {alice}\n")
    result = realm.run("secrets", "lint", "-i", str(realm.inventory), "--format", "json")
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"copied-token", "path-mismatch"} <= codes


def test_verify_reports_tampered_and_moved_tokens_uniformly(realm: Realm) -> None:
    _setup(realm)
    users = realm.inventory / "users.yaml"
    text = users.read_text()
    alice, _ = re.findall(r"sipvault:[\w:-]+", text)
    parts = alice.split(":")
    raw = bytearray(vault.b64url_decode(parts[4], what="p"))
    raw[50] ^= 0x10
    tampered = ":".join([*parts[:4], vault.b64url_encode(bytes(raw))])
    users.write_text(text.replace(alice, tampered))
    result = realm.run("secrets", "verify", "-i", str(realm.inventory), *_pp(realm))
    assert result.returncode == 1
    assert "/users/alice/accounts/0/password: cannot decrypt value" in result.stdout
    assert "cannot-decrypt: 1" in result.stdout
    assert "1 value(s) opened and checked, 1 failed" in result.stdout


def test_verify_without_the_needed_identity(realm: Realm) -> None:
    _setup(realm)
    shutil.rmtree(realm.config)
    result = realm.run("secrets", "verify", "-i", str(realm.inventory), *_pp(realm))
    assert result.returncode == 1
    assert "no-identity: 2" in result.stdout
    # One line for the key, not one per value.
    [line] = [line for line in result.stdout.splitlines() if "error[no-identity]" in line]
    assert "pass --identity FILE" in line and "2 value(s) sealed to it were not checked" in line


def test_missing_recipients_and_bad_paths(realm: Realm) -> None:
    result = realm.run("secrets", "lint", "-i", str(realm.inventory))
    _assert_clean_error(result, "recipients.yaml does not exist", "keys init")
    make_realm(realm)
    (realm.inventory / "users.yaml").write_text(USERS_YAML)
    result = realm.run(
        "secrets",
        "set",
        "--path",
        "/users/zoe/accounts/0/password",
        "-i",
        str(realm.inventory),
        stdin="pw",
    )
    _assert_clean_error(result, "no entry /users/zoe/accounts/0")
    result = realm.run(
        "secrets", "set", "--path", "users/alice", "-i", str(realm.inventory), stdin="pw"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_malformed_yaml_reports_file_line_column(realm: Realm) -> None:
    make_realm(realm)
    (realm.inventory / "users.yaml").write_text("users:\n  alice: [unclosed\n  bob: 1\n")
    result = realm.run("secrets", "lint", "-i", str(realm.inventory))
    _assert_clean_error(result, "users.yaml:3:")


def test_duplicate_keys_are_lint_errors(realm: Realm) -> None:
    make_realm(realm)
    (realm.inventory / "users.yaml").write_text(
        "users:\n  alice:\n    accounts: []\n  alice:\n    accounts: []\n"
    )
    result = realm.run("secrets", "lint", "-i", str(realm.inventory))
    assert result.returncode == 1
    assert (
        "users.yaml:4:3: error[yaml]: /users: duplicate key 'alice' (first at line 2)"
        in result.stdout
    )


# --------------------------------------------------------------------------- hostile key files


def _limited_cli(realm: Realm, *args: str, pass_fds: tuple[int, ...] = ()) -> object:
    """The CLI under a 2 GB address-space limit and a deadline: a hostile file must fail fast."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2_000_000_000, 2_000_000_000))

    return subprocess.run(
        [sys.executable, "-m", "provisioner.cli", *args],
        capture_output=True,
        text=True,
        env=realm.env,
        cwd=realm.root,
        timeout=60,
        check=False,
        preexec_fn=limit,
        pass_fds=pass_fds,
    )


# What an attacker who can edit a copy of an identity file writes into its kdf line: each
# used to hang for hours, raise MemoryError or OverflowError, or end in a traceback.
ABSURD_KDF = [
    ("argon2id", r"t: \d+", "t: 100000", "t=100000 (maximum 10)"),
    ("argon2id", r"t: \d+", "t: 1000000000000", "maximum 10"),
    ("argon2id", r"p: \d+", "p: 100000000", "p=100000000 (maximum 16)"),
    ("argon2id", r"m_kib: \d+", "m_kib: 3000000", "m_kib=3000000 (maximum 1048576)"),
    ("argon2id", r"t: \d+", "t: 3.5", "missing or malformed"),
    ("argon2id", r"t: \d+", "t: true", "missing or malformed"),
    ("argon2id", r'salt: "[\w-]+"', 'salt: ""', "the kdf salt is 0 bytes"),
    ("argon2id", r', salt: "[\w-]+"', "", "salt is missing or not text"),
    ("argon2id", r'nonce: "[\w-]+"', 'nonce: "AAAA"', "wrong length"),
    ("argon2id", r'\nnonce: "[\w-]+"', "", "nonce is missing or not text"),
    ("scrypt", r"log_n: \d+", "log_n: 40", "log_n=40 (maximum 20)"),
    ("scrypt", r"log_n: \d+", "log_n: 100000", "maximum 20"),
    ("scrypt", r"r: \d+", "r: 1000000", "r=1000000 (maximum 16)"),
    ("scrypt", r"p: \d+", "p: 100000", "p=100000 (maximum 4)"),
    ("scrypt", r"log_n: \d+, r: \d+", "log_n: 20, r: 16", "needs 2048 MiB (maximum 1024)"),
]


def test_identity_with_absurd_kdf_parameters_is_refused_at_once(realm: Realm) -> None:
    _setup(realm)
    [identity] = realm.identity_files
    scrypt_copy = realm.root / "scrypt-copy.sipid"
    realm.run(
        "keys",
        "add-admin",
        "--identity",
        str(identity),
        "--out",
        str(scrypt_copy),
        "--kdf",
        "scrypt",
        *_pp(realm),
        "--new-passphrase-file",
        str(realm.passphrase_file),
        check=True,
    )
    texts = {"argon2id": identity.read_text(), "scrypt": scrypt_copy.read_text()}
    for index, (protection, pattern, replacement, message) in enumerate(ABSURD_KDF):
        tampered, count = re.subn(pattern, replacement, texts[protection], count=1)
        assert count == 1, (pattern, texts[protection])
        path = realm.root / f"tampered-{index}.sipid"
        path.write_text(tampered)
        path.chmod(0o600)
        result = _limited_cli(
            realm, "keys", "check", "-i", str(realm.inventory), "--identity", str(path), *_pp(realm)
        )
        assert result.returncode == 1, (replacement, result.stdout, result.stderr)  # type: ignore[attr-defined]
        _assert_clean_error(result, str(path), message)


def test_passphrase_file_readable_by_others_is_refused(realm: Realm) -> None:
    _setup(realm)
    realm.passphrase_file.chmod(0o644)
    result = realm.run("secrets", "verify", "-i", str(realm.inventory), *_pp(realm))
    _assert_clean_error(result, str(realm.passphrase_file), "chmod 600")
    realm.passphrase_file.chmod(0o600)
    realm.run("secrets", "verify", "-i", str(realm.inventory), *_pp(realm), check=True)


def test_an_endless_passphrase_is_refused_in_bounded_memory(realm: Realm) -> None:
    _setup(realm)
    endless = os.open("/dev/zero", os.O_RDONLY)
    try:
        result = _limited_cli(
            realm,
            "secrets",
            "verify",
            "-i",
            str(realm.inventory),
            "--passphrase-fd",
            str(endless),
            pass_fds=(endless,),
        )
    finally:
        os.close(endless)
    _assert_clean_error(result, f"fd {endless}", "longer than 1024 bytes")


def test_rekey_runs_unattended_with_a_passphrase_for_each_identity(realm: Realm) -> None:
    _setup(realm)
    inv = str(realm.inventory)
    [old_identity] = realm.identity_files
    new_pp = realm.root / "new-key-passphrase"
    new_pp.write_text("a different passphrase for the new key\n")
    new_pp.chmod(0o600)
    rotate = realm.run("keys", "rotate", "-i", inv, "--passphrase-file", str(new_pp), check=True)
    new_identity = Path(rotate.stdout.split("identity file: ", 1)[1].split()[0])
    both = ("--identity", str(old_identity), "--identity", str(new_identity))
    # One passphrase for both cannot open the new identity...
    one = realm.run("secrets", "rekey", "-i", inv, *both, *_pp(realm))
    _assert_clean_error(one, str(new_identity), "wrong passphrase")
    # ...a passphrase for each does, with no terminal, and every new token is opened again.
    rekey = realm.run(
        "secrets",
        "rekey",
        "-i",
        inv,
        *both,
        *_pp(realm),
        "--new-passphrase-file",
        str(new_pp),
        stdin="",
        check=True,
    )
    assert "re-sealed 2 value(s)" in rekey.stdout and "checked by opening it" in rekey.stdout
    realm.run(
        "secrets",
        "verify",
        "-i",
        inv,
        "--identity",
        str(new_identity),
        "--passphrase-file",
        str(new_pp),
        check=True,
    )
    # The same from file descriptors: the old passphrase on one, the new one on another.
    realm.run("keys", "rotate", "-i", inv, "--passphrase-file", str(new_pp), check=True)
    newest = max(realm.identity_files, key=lambda p: p.stat().st_mtime_ns)
    old_read, old_write = os.pipe()
    new_read, new_write = os.pipe()
    os.write(old_write, new_pp.read_bytes())
    os.write(new_write, new_pp.read_bytes())
    os.close(old_write)
    os.close(new_write)
    try:
        by_fd = realm.run(
            "secrets",
            "rekey",
            "-i",
            inv,
            "--identity",
            str(new_identity),
            "--identity",
            str(newest),
            "--passphrase-fd",
            str(old_read),
            "--new-passphrase-fd",
            str(new_read),
            pass_fds=(old_read, new_read),
        )
    finally:
        os.close(old_read)
        os.close(new_read)
    assert by_fd.returncode == 0, by_fd.stderr
    assert "checked by opening it" in by_fd.stdout
