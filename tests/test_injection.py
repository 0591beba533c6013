"""INI injection: arbitrary text through every user-controlled field.

For each field the property is: either loading reports an error that names exactly that
field's path (file:line:column included), or every rendered file parses back to exactly the
sections and keys of a benign render, each with the same value, and the field's own key reads
back as exactly the text that was written in the inventory.

"Reads back" means what MicroSIP sees through ``GetPrivateProfileString`` (modelled by
:mod:`provisioner.microsip.inidoc`): surrounding whitespace and one pair of enclosing quotes are
stripped. So a value with surrounding whitespace must be refused, and a value enclosed in
quotes must be refused, except for the keys MicroSIP itself saves in quotes (``cmd*`` hooks,
device names), where the renderer adds a protective pair and the value reads back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2.sandbox
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioner.inventory import yamldoc
from provisioner.microsip import ini
from provisioner.microsip.inidoc import IniDocument
from provisioner.render import build, jinja
from provisioner.secrets import vault
from tests.phase1kit import REALM, recipients, write_inventory

PASSWORD_PATH = "/users/u1/accounts/main/password"


def yaml_quoted(value: str) -> str:
    """``value`` as a YAML double-quoted scalar, ASCII only (every other character escaped)."""
    out = []
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


@dataclass(frozen=True)
class Field:
    """Where a value goes in the inventory, and which INI key (if any) must read it back."""

    name: str
    pointer: str
    section: str | None = None  # None: not rendered as an INI value
    key: str | None = None
    also_override: bool = False  # enforced keys land in override.ini too
    compose: Callable[[str], str] | None = None  # the YAML value built from the text


ACCOUNT = "/users/u1/accounts/main"
FIELDS = [
    *(
        Field(key, f"{ACCOUNT}/{key}", "Account1", key)
        for key in (
            "label",
            "server",
            "proxy",
            "authID",
            "displayName",
            "dialingPrefix",
            "voicemailNumber",
            "publicAddr",
        )
    ),
    Field(
        "sip_uri user",
        f"{ACCOUNT}/sip_uri",
        "Account1",
        "username",
        compose=lambda v: f"{v}@pbx.example.com",
    ),
    Field(
        "sip_uri domain", f"{ACCOUNT}/sip_uri", "Account1", "domain", compose=lambda v: f"1001@{v}"
    ),
    *(
        Field(key, f"/users/u1/settings/{key}", "Settings", key)
        for key in (
            "userAgent",
            "ringingSound",
            "cmdIncomingCall",
            "cmdCallEnd",
            "audioRingDevice",
            "recordingPath",
            "usersDirectory",
            "STUN",
        )
    ),
    Field("group account default", "/groups/site/account/dialPlan", "Account1", "dialPlan"),
    Field(
        "defaults setting", "/defaults/settings/forwardingNumber", "Settings", "forwardingNumber"
    ),
    Field(
        "enforced setting",
        "/workstations/ws1/enforced/settings/portKnockerHost",
        "Settings",
        "portKnockerHost",
        also_override=True,
    ),
    Field("display_name", "/users/u1/display_name"),
    Field("windows", "/users/u1/windows", compose=lambda v: f"ACME\\{v}"),
    Field("workstation description", "/workstations/ws1/description"),
    Field("workstation address", "/workstations/ws1/address"),
]

# The benign value every field carries when it is not the one under test.
BENIGN = {
    "/users/u1/windows": "ACME\\u1",
    f"{ACCOUNT}/sip_uri": "1001@pbx.example.com",
}

TEMPLATE = """\
defaults:
  settings:
    updatesInterval: never
    forwardingNumber: {/defaults/settings/forwardingNumber}
groups:
  site:
    account:
      dialPlan: {/groups/site/account/dialPlan}
workstations:
  ws1:
    description: {/workstations/ws1/description}
    address: {/workstations/ws1/address}
    groups: [site]
    users: [u1]
    enforced:
      settings:
        portKnockerHost: {/workstations/ws1/enforced/settings/portKnockerHost}
users:
  u1:
    windows: {/users/u1/windows}
    display_name: {/users/u1/display_name}
    settings:
{settings}
    accounts:
      main:
{account}
        password: {token}
"""


@pytest.fixture(scope="module")
def token() -> str:
    key = recipients().active_key()
    return vault.seal(vault.Secret("pw-1"), realm=REALM, path=PASSWORD_PATH, recipient=key)


def inventory_text(values: dict[str, str], token: str) -> str:
    def value(pointer: str) -> str:
        return yaml_quoted(values.get(pointer, BENIGN.get(pointer, "benign")))

    settings = [f.pointer for f in FIELDS if f.pointer.startswith("/users/u1/settings/")]
    account = [f.pointer for f in FIELDS if f.pointer.startswith(ACCOUNT) and f.compose is None]
    parts = {
        "settings": "\n".join(f"      {p.rsplit('/', 1)[1]}: {value(p)}" for p in settings),
        "account": "\n".join(
            [f"        sip_uri: {value(f'{ACCOUNT}/sip_uri')}"]
            + [f"        {p.rsplit('/', 1)[1]}: {value(p)}" for p in account]
        ),
        "token": token,
    }
    # One pass, so no inserted value is ever read as a placeholder.
    return re.sub(r"\{([^{}]+)\}", lambda m: parts.get(m.group(1)) or value(m.group(1)), TEMPLATE)


def run(root: Path, values: dict[str, str], token: str) -> build.BuildResult:
    (root / "inventory.yaml").write_text(inventory_text(values, token), encoding="utf-8")
    return build.build(root)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The inventory folder every example rewrites.

    Each example runs the whole build; only the Jinja environment (which compiles the same
    unchanged templates every time) is shared between examples, to keep the test fast.
    """
    environments: dict[tuple[str, ...], jinja2.sandbox.SandboxedEnvironment] = {}
    make_environment = jinja.make_environment

    def shared(template_dirs: Sequence[Path], **kw: Any) -> jinja2.sandbox.SandboxedEnvironment:
        key = tuple(str(p) for p in template_dirs)
        if key not in environments:
            environments[key] = make_environment(template_dirs, **kw)
        return environments[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jinja, "make_environment", shared)
        yield write_inventory(tmp_path_factory.mktemp("injection") / "inv", {})


@pytest.fixture(scope="module")
def baseline(root: Path, token: str) -> dict[str, IniDocument]:
    result = run(root, {}, token)
    assert result.findings == []
    docs = {f.relative_path: ini.parse_ini(ini.decode_ini_bytes(f.data)) for f in result.files}
    assert sorted(docs) == ["ws1/override.ini", "ws1/u1/microsip.ini"]
    microsip = docs["ws1/u1/microsip.ini"]
    # Every rendered field really is in the file, so the property below checks something.
    for field in FIELDS:
        if field.section is not None and field.key is not None:
            assert microsip.get(field.section, field.key) is not None, field.name
    return docs


def _shape(doc: IniDocument) -> list[tuple[str, list[tuple[str | None, str]]]]:
    return [(s.name, [(e.key, e.value) for e in s.entries]) for s in doc.sections]


SPECIAL = st.sampled_from(
    [
        *("\r", "\n", "\r\n", "\x00", "\u2028", "\u2029", "\x85", "\x0b", "\x1a", "\x7f", "\t"),
        *("[", "]", "=", ";", "#", '"', "'", " ", "\u00a0", "\u3000", "\ufeff", "sipvault:"),
        *("[Account2]", "accountId=2", "\r\npassword=x", "é", "\U0001f600"),
    ]
)
TEXT = st.one_of(
    st.text(max_size=12),
    st.lists(st.one_of(SPECIAL, st.characters()), max_size=8).map("".join),
    st.lists(st.one_of(SPECIAL, st.sampled_from("ab1.-:@ ")), max_size=8).map("".join),
)


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=TEXT)
def test_field_is_refused_or_reads_back_exactly(
    field: Field, text: str, root: Path, token: str, baseline: dict[str, IniDocument]
) -> None:
    written = field.compose(text) if field.compose else text
    result = run(root, {field.pointer: written}, token)
    errors = [f for f in result.findings if f.severity == "error"]
    if errors:
        assert all(f.path == field.pointer for f in errors), [str(f) for f in errors]
        for finding in errors:
            assert finding.file.endswith("inventory.yaml")
            assert finding.line > 0 and finding.column > 0
        assert result.files == []
        return
    docs = {f.relative_path: ini.parse_ini(ini.decode_ini_bytes(f.data)) for f in result.files}
    assert sorted(docs) == sorted(baseline)
    for relative, doc in docs.items():
        expected = baseline[relative]
        shape, want = _shape(doc), _shape(expected)
        # The field's key holds exactly the text; everything else is as in the benign render.
        if (field.section is not None and field.key is not None) and (
            relative.endswith("microsip.ini") or field.also_override
        ):
            assert doc.get(field.section, field.key) == text
            target = (field.section, field.key)
            want = [
                (name, [(k, text if (name, k) == target else v) for k, v in entries])
                for name, entries in want
            ]
        assert shape == want, relative
        assert len(doc.preamble) == len(expected.preamble)
        for line in doc.preamble:
            assert line.key is None and line.raw_value.startswith(";")
    inventory = result.inventory
    assert inventory is not None
    if field.name == "display_name":
        assert inventory.users["u1"].display_name == text
    if field.name == "windows":
        assert inventory.users["u1"].windows == written
        comment = docs["ws1/u1/microsip.ini"].preamble[0].raw_value
        assert comment == f"; Managed by microsip-provisioner for {written} on ws1.".strip()
    if field.name == "workstation address":
        assert inventory.workstations["ws1"].address == (text or "ws1")


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(text=TEXT)
def test_yaml_encoding_of_the_test_is_exact(text: str) -> None:
    tree, problems = yamldoc.compose_tree(f"k: {yaml_quoted(text)}\n", "t.yaml")
    assert problems == () and tree is not None
    node = tree.get("k")
    assert node is not None and node.value == text
