"""Rendering: data-driven golden inventories, template errors and the INI value filters.

Golden cases live in ``tests/golden/inventories/<case>/``:

* ``inventory/`` holds the YAML files (and optionally ``templates/``); ``SEAL`` stands for a
  password token, sealed at test time for exactly its place (``recipients.yaml`` is made then);
* ``expected/<relative path>.txt`` is the logical INI text of every file the build must produce
  (decoded, CRLF shown as LF); ``{placeholder:/users/U/accounts/A/password}`` stands for that
  path's ``PH-<pathtag>``;
* ``expected/findings.txt``, when present, lists the findings, one per line, file paths
  relative to the inventory. Without it the build must be clean.

A new case is new files. Set ``UPDATE_GOLDEN=1`` to (re)write the expected files, then review
them like code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import jinja2
import pytest

import provisioner.microsip.lint as ini_lint
from provisioner.inventory.model import Secret, Source
from provisioner.microsip import ini
from provisioner.render import build, jinja
from provisioner.secrets import vault
from tests.phase1kit import (
    BASE,
    REALM,
    build_files,
    files_of,
    real_opener,
    recipients,
    write_inventory,
)

GOLDEN = Path(__file__).parent / "golden" / "inventories"
GOLDEN_REALM = "golden-test"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "inventory").is_dir())
PLACEHOLDER = re.compile(r"\{placeholder:(/[^}]+)\}")


def _copy_case(case: str, root: Path) -> Path:
    source = GOLDEN / case / "inventory"
    files = {
        path.relative_to(source).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(source.rglob("*"))
        if path.is_file()
    }
    return write_inventory(root, files, realm=GOLDEN_REALM, dedent=False)


def _expand(text: str) -> str:
    return PLACEHOLDER.sub(lambda m: vault.placeholder_for(GOLDEN_REALM, m.group(1)), text)


def _findings_text(result: build.BuildResult, root: Path) -> str:
    lines = [str(f).replace(f"{root}/", "") for f in result.findings]
    return "".join(line + "\n" for line in lines)


def _write_expected(case: str, result: build.BuildResult, root: Path) -> None:
    expected = GOLDEN / case / "expected"
    shutil.rmtree(expected, ignore_errors=True)
    pointers = {
        vault.placeholder_for(GOLDEN_REALM, path): path
        for built in result.files
        for path in built.secret_paths
    }
    for relative, text in files_of(result).items():
        for placeholder, pointer in pointers.items():
            text = text.replace(placeholder, f"{{placeholder:{pointer}}}")
        target = expected / f"{relative}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    if result.findings:
        expected.mkdir(parents=True, exist_ok=True)
        (expected / "findings.txt").write_text(_findings_text(result, root), encoding="utf-8")


@pytest.mark.parametrize("case", CASES)
def test_golden_inventory(case: str, tmp_path: Path) -> None:
    root = _copy_case(case, tmp_path / "inv")
    result = build.build(root)
    if os.environ.get("UPDATE_GOLDEN"):
        _write_expected(case, result, root)
    expected_dir = GOLDEN / case / "expected"
    findings_file = expected_dir / "findings.txt"
    expected_findings = findings_file.read_text(encoding="utf-8") if findings_file.exists() else ""
    assert _findings_text(result, root) == expected_findings
    expected = {
        path.relative_to(expected_dir).as_posix().removesuffix(".txt"): _expand(
            path.read_text(encoding="utf-8")
        )
        for path in sorted(expected_dir.rglob("*.ini.txt"))
    }
    produced = files_of(result)
    assert sorted(produced) == sorted(expected)
    for relative, text in expected.items():
        assert produced[relative] == text, relative
        built = next(f for f in result.files if f.relative_path == relative)
        # The bytes are exactly the expected text in MicroSIP's encoding.
        assert built.data == b"\xff\xfe" + text.replace("\n", "\r\n").encode("utf-16-le")
        assert ini.parse_ini(text) == built.document


def test_golden_cases_are_all_there() -> None:
    assert {
        "precedence",
        "sip-uri",
        "two-accounts",
        "portable",
        "custom-template",
        "many-errors",
    } <= set(CASES)
    for case in CASES:
        assert (GOLDEN / case / "expected").is_dir(), f"{case}: run with UPDATE_GOLDEN=1"


# --------------------------------------------------------------------------- template errors


def test_template_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    template = "; header\n[Settings]\naccountId={{ active_account }}\n{% for x in %}\n"
    root, result = build_files(tmp_path / "inv", {"templates/microsip.ini.j2": template})
    [finding] = result.findings
    assert finding.code == "template"
    assert finding.file == ""  # the template, not a target: the message names it
    path = root / "templates" / "microsip.ini.j2"
    assert finding.message.startswith(f"{path}:4: template syntax error")
    assert "4 | {% for x in %}" in finding.message
    # The override.ini still renders from the built-in template.
    assert [f.relative_path for f in result.files] == ["ws1/override.ini"]


def test_template_syntax_error_is_reported_once_for_many_targets(tmp_path: Path) -> None:
    users = "".join(
        f"  u{i}:\n    accounts:\n      main: {{sip_uri: 100{i}@pbx.example.com, password: SEAL}}\n"
        for i in range(3)
    )
    _, result = build_files(
        tmp_path / "inv",
        {
            "templates/microsip.ini.j2": "[Settings]\n{% if %}\n",
            "users.yaml": "users:\n" + users,
            "workstations.yaml": "workstations:\n  ws1:\n    users: [u0, u1, u2]\n",
        },
    )
    assert [f.code for f in result.findings] == ["template"]
    assert len(result.files) == 1  # override.ini


def test_undefined_variables_name_file_and_line(tmp_path: Path) -> None:
    files = {
        "templates/microsip.ini.j2": "[Settings]\naccountId={{ active_account }}\n"
        "userAgent={{ user.nickname }}\n",
        "templates/override.ini.j2": "[Settings]\n\n\nEC={{ enforced_settings | ini }}\n",
    }
    root, result = build_files(tmp_path / "inv", files)
    by_file = {f.file: f.message for f in result.findings}
    assert sorted(by_file) == ["ws1/override.ini", "ws1/u1/microsip.ini"]
    override, microsip = by_file["ws1/override.ini"], by_file["ws1/u1/microsip.ini"]
    assert override.startswith(f"{root / 'templates' / 'override.ini.j2'}:4: ")
    assert "'enforced_settings' is undefined" in override
    assert "(rendering ws1/override.ini)" in override
    assert microsip.startswith(f"{root / 'templates' / 'microsip.ini.j2'}:3: ")
    assert "has no attribute 'nickname'" in microsip
    assert result.files == []
    # CI annotations go to the template line, a file of the repository.
    sources = {f.file: f.source for f in result.findings}
    assert sources["ws1/u1/microsip.ini"] == Source(
        str(root / "templates" / "microsip.ini.j2"), 3, 0, "template"
    )


def test_template_cannot_escape_the_sandbox_or_inject_lines(tmp_path: Path) -> None:
    files = {
        "templates/microsip.ini.j2": "[Settings]\naccountId={{ active_account }}\n"
        "{{ ''.__class__.__mro__ }}\n",
        "templates/override.ini.j2": "[Settings]\nuserAgent={{ 'x\\r\\n[Account1]' | ini }}\n",
    }
    _, result = build_files(tmp_path / "inv", files)
    by_file = {f.file: f.message for f in result.findings}
    assert "line break or control character" in by_file["ws1/override.ini"]
    assert "unsafe" in by_file["ws1/u1/microsip.ini"]
    assert result.files == []


PLACEHOLDER_U1 = vault.placeholder_for(REALM, "/users/u1/accounts/main/password")


def test_a_password_text_outside_its_key_is_caught(tmp_path: Path) -> None:
    # A template cannot move a password (the ini filter writes it only into its own key), but
    # it can write text that happens to be one: in CI the placeholder, anyone can compute it.
    template = (
        "[Settings]\naccountId={{ active_account }}\n"
        f"userAgent={PLACEHOLDER_U1}\n"
        "[Account1]\ndomain=x.example.com\nusername=u\npassword=wrong\n"
    )
    _, result = build_files(tmp_path / "inv", {"templates/microsip.ini.j2": template})
    codes = sorted(f.code for f in result.findings)
    assert codes == ["secret-misplaced", "secret-misplaced"]
    messages = " ".join(f.message for f in result.findings)
    assert "[Account1] password does not hold the value sealed at" in messages
    assert "[Settings] userAgent holds a password" in messages
    # Lint never looked at that line, so nothing of it is cached.
    assert not any(PLACEHOLDER_U1 in key[-1] for key in ini_lint._ENTRY_CACHE)


def test_a_password_text_inside_another_value_or_a_comment_is_caught(tmp_path: Path) -> None:
    template = (
        f"; for {PLACEHOLDER_U1}\n"
        "[Settings]\naccountId={{ active_account }}\n"
        "[Account1]\ndomain=x.example.com\nusername=u\n"
        f"label=x{PLACEHOLDER_U1}y\n"
        "password={{ accounts[0].fields.password | ini }}\n"
    )
    _, result = build_files(tmp_path / "inv", {"templates/microsip.ini.j2": template})
    found = sorted((f.code, f.line, f.message.split(";")[0]) for f in result.findings)
    assert found == [
        ("secret-misplaced", 1, "a comment holds a password (or contains one)"),
        ("secret-misplaced", 7, "[Account1] label holds a password (or contains one)"),
    ]


def test_a_short_password_as_a_whole_value_elsewhere_is_caught(tmp_path: Path) -> None:
    pointer = "/users/u1/accounts/main/password"
    token = vault.seal(
        Secret("1234"), realm=REALM, path=pointer, recipient=recipients().active_key()
    )
    account = f"{{sip_uri: 1001@x.example.com, password: {token}}}"
    users = f"users:\n  u1:\n    accounts:\n      main: {account}\n"
    template = (
        "[Settings]\naccountId={{ active_account }}\n"
        "[Account1]\ndomain=x.example.com\nusername=u\n"
        "displayName=1234\n"
        "label=ext 1234 main\n"  # a short password inside other text is no finding
        "password={{ accounts[0].fields.password | ini }}\n"
    )
    files = {"users.yaml": users, "templates/microsip.ini.j2": template}
    _, result = build_files(tmp_path / "inv", files, opener_factory=real_opener)
    found = [(f.code, f.line, f.message.split(";")[0]) for f in result.findings]
    assert found == [
        ("secret-misplaced", 6, "[Account1] displayName holds a password (or contains one)")
    ]


def test_a_password_written_without_the_ini_filter_is_an_error(tmp_path: Path) -> None:
    template = (
        "[Settings]\naccountId={{ active_account }}\n"
        "[Account1]\ndomain=x.example.com\nusername=u\n"
        "password={{ accounts[0].fields.password }}\n"
    )
    root, result = build_files(tmp_path / "inv", {"templates/microsip.ini.j2": template})
    [finding] = result.findings
    assert finding.message.startswith(f"{root / 'templates' / 'microsip.ini.j2'}:6: ")
    assert "a password is written only through the ini filter" in finding.message
    assert result.files == [f for f in result.files if f.target.kind == "override"]


def test_rendered_output_is_linted(tmp_path: Path) -> None:
    template = "[Settings]\naccountId=3\nvolumeOutput=5\n[Account1]\ndomain=x\nusername=u\n"
    _, result = build_files(tmp_path / "inv", {"templates/microsip.ini.j2": template})
    codes = {f.code for f in result.findings}
    assert {"account-id", "runtime-key", "secret-misplaced"} <= codes
    lint_finding = next(f for f in result.findings if f.code == "runtime-key")
    assert (lint_finding.file, lint_finding.line) == ("ws1/u1/microsip.ini", 3)
    assert lint_finding.path == "[Settings] volumeOutput"


def test_templates_option_points_elsewhere(tmp_path: Path) -> None:
    elsewhere = tmp_path / "tpl"
    elsewhere.mkdir()
    (elsewhere / "override.ini.j2").write_text("; custom\n[Settings]\n")
    root = write_inventory(tmp_path / "inv", BASE)
    result = build.build(root, templates=elsewhere)
    assert result.findings == []
    assert files_of(result)["ws1/override.ini"] == "; custom\n[Settings]\n"


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "1"),
        (False, "0"),
        (None, ""),
        (5, "5"),
        (1.5, "1.5"),
        (["opus/48000/2", "PCMA/8000/1"], "opus/48000/2 PCMA/8000/1"),
        ("a=b;c [d]", "a=b;c [d]"),
        ('"C:\\a b.exe"', '""C:\\a b.exe""'),
        ("'x'", "\"'x'\""),
        ('"', '"'),
        ('a "b" c', 'a "b" c'),
        ("tab\tinside", "tab\tinside"),
    ],
)
def test_ini_filter_reads_back_exactly(value: object, text: str) -> None:
    assert jinja.ini_value(value) == text
    read_back = ini.parse_ini(f"[S]\nk={text}\n").get("S", "k")
    # Text reads back as itself; other values as their INI spelling.
    assert read_back == (value if isinstance(value, str) else text)


def test_a_sealed_password_reads_back_exactly() -> None:
    env = jinja.make_environment([])
    template = env.from_string("[S]\npassword={{ pw | ini }}\n")
    text = jinja.render(template, {"pw": jinja.sealed(Secret("p=w;[x]'"))}, "t")
    assert ini.parse_ini(text).get("S", "password") == "p=w;[x]'"


@pytest.mark.parametrize("value", [Secret("pw"), jinja.sealed(Secret("pw"))])
def test_the_ini_filter_refuses_a_password_outside_a_render(value: object) -> None:
    with pytest.raises(jinja._SealedUse):
        jinja.ini_value(value)


@pytest.mark.parametrize(
    "value", ["a\nb", "a\rb", "a\x00b", "a\u2028b", "a\x85b", " lead", "trail ", float("nan")]
)
def test_ini_filter_refuses_what_would_not_read_back(value: object) -> None:
    with pytest.raises(jinja._ValueError):
        jinja.ini_value(value)


@pytest.mark.parametrize("plaintext", [b"a\nb", b" pw", b'"pw"', b"a\x00b"])
def test_a_password_sealed_around_the_policy_never_reaches_a_file(
    tmp_path: Path, plaintext: bytes
) -> None:
    # Anyone can seal with the public recipients file, past the policy check of seal().
    pointer = "/users/u1/accounts/main/password"
    token = vault.seal_padded(
        vault.pad_plaintext(plaintext),
        realm=REALM,
        path=pointer,
        recipient=recipients().active_key(),
    )
    users = BASE["users.yaml"].replace("SEAL", token)
    _, result = build_files(tmp_path / "inv", {"users.yaml": users}, opener_factory=real_opener)
    [finding] = result.findings
    assert (finding.code, finding.path) == ("policy", pointer)
    assert [f.relative_path for f in result.files] == ["ws1/override.ini"]


def test_quoted_and_bool01_filters() -> None:
    assert jinja.quoted("Speakers (USB)") == '"Speakers (USB)"'
    assert jinja.quoted('"C:\\a b.exe" --x') == '""C:\\a b.exe" --x"'
    doc = ini.parse_ini('[S]\nk=""C:\\a b.exe" --x"\n')
    assert doc.get("S", "k") == '"C:\\a b.exe" --x'
    assert [jinja.bool01(v) for v in (1, 0, "0", "false", "yes", "", None, True)] == [
        "1",
        "0",
        "0",
        "0",
        "1",
        "0",
        "0",
        "1",
    ]


def test_environment_is_sandboxed_and_strict() -> None:
    env = jinja.make_environment([])
    assert isinstance(env, jinja2.sandbox.SandboxedEnvironment)
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ nothing }}").render()
