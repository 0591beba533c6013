"""Resolving values with provenance, group chains, and ``--limit`` selections."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import InventoryError, ProvisionerError, ResolveError
from provisioner.inventory import resolve
from provisioner.inventory.loader import load_inventory
from provisioner.inventory.model import Inventory
from provisioner.render import build
from tests.phase1kit import BASE, EXAMPLE, build_files, write_inventory

GOLDEN_PRECEDENCE = Path(__file__).parent / "golden" / "inventories" / "precedence" / "inventory"


@pytest.fixture(scope="module")
def example() -> Inventory:
    return load_inventory(EXAMPLE)


@pytest.fixture(scope="module")
def precedence(tmp_path_factory: pytest.TempPathFactory) -> Inventory:
    files = {p.name: p.read_text() for p in GOLDEN_PRECEDENCE.glob("*.yaml")}
    return load_inventory(write_inventory(tmp_path_factory.mktemp("p") / "inv", files))


def _layers(resolved: resolve.Resolved) -> list[str]:
    return [s.source.layer for s in resolved.chain]


def test_group_chain_parents_first_in_listed_order(precedence: Inventory) -> None:
    assert resolve.group_chain(precedence, ["site", "floor", "lockdown", "dept", "region"]) == [
        "region",
        "legacy",
        "site",
        "floor",
        "lockdown",
        "dept",
    ]
    assert resolve.group_chain(precedence, ["nope"]) == []


def test_chains_list_every_layer_in_precedence_order(precedence: Inventory) -> None:
    profile = resolve.resolve_profile(precedence, "ws1", "alice")
    assert profile.groups == ("region", "legacy", "site", "floor", "lockdown", "dept")
    settings = profile.settings
    assert _layers(settings["featureCodeCP"]) == [
        "defaults",
        "group region",
        "group site",
        "group floor",
    ]
    assert settings["forwardingNumber"].value == "from-dept"
    assert _layers(settings["forwardingNumber"]) == [
        "defaults",
        "group legacy",
        "group floor",
        "group dept",
    ]
    assert _layers(settings["usersDirectory"]) == [
        "defaults",
        "group dept",
        "workstation ws1",
        "user alice",
    ]
    volume = settings["volumeRing"]
    assert [s.value for s in volume.chain] == [10, 20, 30, 80, 90]
    assert _layers(volume)[-2:] == ["defaults (enforced)", "group lockdown (enforced)"]
    [account] = profile.accounts
    label = account.keys["label"]
    assert [s.value for s in label.chain] == [
        "from-defaults",
        "from-ws",
        "from-user",
        "from-account",
    ]
    assert _layers(label)[-1] == "account alice/main"
    transport = account.keys["transport"]
    assert transport.value == "tls"
    assert _layers(transport) == ["account alice/main", "group lockdown (enforced)"]
    # Every link names file:line:column.
    for resolved in [*settings.values(), *account.keys.values()]:
        for link in resolved.chain:
            assert link.source.file.endswith(".yaml") and link.source.line > 0
            assert link.source.column > 0
    assert profile.active_index == 1
    assert set(profile.enforced_settings) == {"volumeRing"}


def test_station_plan_install_and_winrm(example: Inventory) -> None:
    kiosk = resolve.resolve_station(example, "ham-kiosk-01")
    assert kiosk.install == resolve.Install("portable", "C:\\Kiosk\\MicroSIP", "microsip.exe")
    assert set(kiosk.enforced_settings) == {
        "updatesInterval",
        "enableLocalAccount",
        "disableMessaging",
        "noResize",
    }
    desk = resolve.resolve_station(example, "ber-ws-001")
    assert desk.install.mode == "installed"
    assert desk.winrm["port"].value == 5985
    assert resolve.Install("portable", "x", "Qphone.exe").ini_name == "Qphone.ini"


def test_install_defaults_when_nothing_is_said(tmp_path: Path) -> None:
    inventory = load_inventory(write_inventory(tmp_path / "inv", BASE))
    plan = resolve.resolve_station(inventory, "ws1")
    assert plan.install == resolve.Install(
        "installed", resolve.DEFAULT_INSTALL_DIR, resolve.DEFAULT_EXE
    )


def test_station_only_blocks_reached_through_a_user_are_flagged(tmp_path: Path) -> None:
    files = {
        "groups.yaml": """\
            groups:
              dept:
                enforced:
                  settings: {EC: 1}
              tools:
                microsip: {mode: portable}
              plain:
                settings: {EC: 0}
            """,
        "users.yaml": """\
            users:
              u1:
                groups: [dept, tools, plain]
                accounts:
                  main: {sip_uri: 1001@pbx.example.com, password: SEAL}
            """,
    }
    root, result = build_files(tmp_path / "inv", files)
    # The blocks do not apply: enforced EC=1 is neither enforced nor rendered, nor portable.
    assert result.ok
    assert [(f.severity, f.code, f.path, f.line, f.column) for f in result.findings] == [
        ("warning", "unapplied-group-blocks", "/groups/dept", 2, 3),
        ("warning", "unapplied-group-blocks", "/groups/tools", 5, 3),
    ]
    assert result.findings[0].file == str(root / "groups.yaml")
    assert "reaches ws1 only through user u1" in result.findings[0].message
    microsip = next(f for f in result.files if f.target.kind == "microsip")
    assert microsip.relative_path == "ws1/u1/microsip.ini"
    assert microsip.document.get("Settings", "EC") == "0"
    profile = resolve.resolve_profile(load_inventory(root), "ws1", "u1")
    assert profile.unapplied_groups == ("dept", "tools")
    # The same groups on the workstation apply, and nothing is flagged.
    files["workstations.yaml"] = (
        "workstations:\n  ws1:\n    groups: [dept, tools]\n    users: [u1]\n"
    )
    _, result = build_files(tmp_path / "inv2", files)
    assert result.findings == []
    assert [f.relative_path for f in result.files] == ["ws1/override.ini", "ws1/microsip.ini"]


# --------------------------------------------------------------------------- --limit


def _select(inventory: Inventory, expression: str) -> list[str]:
    return [t.name for t in resolve.select_targets(inventory, resolve.Selection(expression))]


def _users(inventory: Inventory, expression: str) -> list[str]:
    return [
        t.user
        for t in resolve.select_targets(inventory, resolve.Selection(expression))
        if t.user is not None
    ]


ALL_USERS = [
    "carol",
    "dave",
    "erin",
    "alice",
    "bob",
    "grace",
    "heidi",
    "reception",
    "frank",
    "ivan",
    "judy",
    "mallory",
]


@pytest.mark.parametrize(
    ("expression", "users"),
    [
        ("", ALL_USERS),
        ("alice", ["alice"]),
        ("alice,bob", ["alice", "bob"]),
        ("ber-ws-00[12]", ["alice", "bob"]),
        ("ham-*", ["reception", "frank", "ivan", "judy", "mallory"]),
        ("user:[cd]a*", ["carol", "dave"]),
        ("user:?a?e", ["dave"]),
        ("ws:ber-rds-01", ["carol", "dave", "erin"]),
        ("workstation:ham-ws-002", ["ivan", "judy"]),
        ("group:sales", ["alice", "bob", "frank"]),
        ("group:rds", ["carol", "dave", "erin"]),
        # site-berlin directly (workstations) and as the parent of rds
        ("group:site-berlin", ["carol", "dave", "erin", "alice", "bob", "grace", "heidi"]),
        ("group:site-hamburg", ["reception", "frank", "ivan", "judy", "mallory"]),
        ("group:site-hamburg,!group:kiosk", ["frank", "ivan", "judy", "mallory"]),
        ("group:site-berlin,&group:sales", ["alice", "bob"]),
        ("group:sales,&ham-*", ["frank"]),
        ("!group:site-berlin", ["reception", "frank", "ivan", "judy", "mallory"]),
        ("*,!user:[a-e]*", ["grace", "heidi", "reception", "frank", "ivan", "judy", "mallory"]),
        ("&user:judy", ["judy"]),
        ("group:nonexistent", []),
        (" alice , , bob ", ["alice", "bob"]),
        ("ALICE", []),
    ],
)
def test_limit_terms(example: Inventory, expression: str, users: list[str]) -> None:
    assert _users(example, expression) == users


def test_limit_includes_the_workstation_override(example: Inventory) -> None:
    assert _select(example, "dave") == ["ber-rds-01/override.ini", "ber-rds-01/dave/microsip.ini"]
    assert _select(example, "ham-kiosk-01") == [
        "ham-kiosk-01/override.ini",
        "ham-kiosk-01/reception/microsip.ini",
    ]
    assert _select(example, "nobody") == []


def test_limit_selects_a_workstation_without_users(tmp_path: Path) -> None:
    root = write_inventory(
        tmp_path / "inv",
        {**BASE, "spare.yaml": "workstations:\n  spare-1:\n    description: no users yet\n"},
    )
    inventory = load_inventory(root)
    assert _select(inventory, "spare-*") == ["spare-1/override.ini"]
    assert _select(inventory, "user:*") == ["ws1/override.ini", "ws1/u1/microsip.ini"]


@pytest.mark.parametrize("term", ["site:berlin", "host:x", "!grp:sales", "&usr:alice"])
def test_unknown_term_kind_is_an_error(example: Inventory, term: str) -> None:
    with pytest.raises(InventoryError, match="unknown --limit term"):
        _select(example, term)
    result = build.build(EXAMPLE, selection=resolve.Selection(term))
    assert [f.code for f in result.findings] == ["limit"]
    assert result.files == []


def test_resolve_error_is_a_provisioner_error() -> None:
    assert issubclass(ResolveError, ProvisionerError)


def test_display_name_is_the_default_account_display_name(tmp_path: Path) -> None:
    files = {
        "groups.yaml": """\
            groups:
              sales:
                account: {displayName: ACME}
            """,
        "users.yaml": """\
            users:
              u1:
                display_name: Ann Lee
                groups: [sales]
                accounts:
                  main: {sip_uri: 1001@pbx.example.com, password: SEAL, active: true}
                  hotline: {sip_uri: 1901@pbx.example.com, password: SEAL, displayName: Sales}
              u2:
                display_name: Bo Kim
                account: {displayName: Bo K.}
                accounts:
                  main: {sip_uri: 1002@pbx.example.com, password: SEAL}
              u3:
                accounts:
                  main: {sip_uri: 1003@pbx.example.com, password: SEAL}
            """,
        "workstations.yaml": """\
            workstations:
              ws1:
                users: [u1, u2, u3]
            """,
    }
    root, result = build_files(tmp_path / "inv", files)
    # u1's second account is only in the account menu: the free MicroSIP never registers it.
    assert [(f.code, f.file, f.path) for f in result.findings] == [
        ("inactive-account", "ws1/u1/microsip.ini", "[Account2]")
    ]
    inventory = load_inventory(root)
    u1 = resolve.resolve_profile(inventory, "ws1", "u1")
    main, hotline = (account.keys["displayName"] for account in u1.accounts)
    # The user's name beats the group's, and the account's own beats the user's.
    assert main.value == "Ann Lee"
    assert [s.pointer for s in main.chain] == [
        "/groups/sales/account/displayName",
        "/users/u1/display_name",
    ]
    assert main.final.source.layer == "user u1" and main.final.source.line == 3
    assert hotline.value == "Sales"
    # A user's own account: block says displayName explicitly: it wins over display_name.
    (u2,) = resolve.resolve_profile(inventory, "ws1", "u2").accounts
    assert u2.keys["displayName"].value == "Bo K."
    (u3,) = resolve.resolve_profile(inventory, "ws1", "u3").accounts
    assert "displayName" not in u3.keys
    rendered = {f.target.user: f.document for f in result.files if f.target.user}
    assert rendered["u1"].get("Account1", "displayName") == "Ann Lee"
    assert rendered["u3"].get("Account1", "displayName") is None


def test_display_name_too_long_for_microsip_points_at_display_name(tmp_path: Path) -> None:
    files = {
        "users.yaml": f"""\
            users:
              u1:
                display_name: {"x" * 1100}
                accounts:
                  main: {{sip_uri: 1001@pbx.example.com, password: SEAL}}
            """,
    }
    _, result = build_files(tmp_path / "inv", files)
    errors = [f for f in result.findings if f.severity == "error"]
    assert [(f.path, f.line) for f in errors] == [("/users/u1/display_name", 3)]
    assert "display_name is 1100 characters long, more than the 1040" in errors[0].message


@pytest.mark.parametrize(
    ("expression", "unmatched"),
    [
        ("alice,group:sales,!ws:ham-*", []),
        ("ber-ws-001,ber-ws-0002", ["'ber-ws-0002' matches nothing; did you mean 'ber-ws-002'?"]),
        ("group:salse", ["'group:salse' matches nothing; did you mean 'group:sales'?"]),
        ("!user:alcie", ["'!user:alcie' matches nothing; did you mean 'user:alice'?"]),
        ("&ws:zz-*", ["'&ws:zz-*' matches nothing"]),
        ("ALICE", ["'ALICE' matches nothing; did you mean 'alice'?"]),
    ],
)
def test_limit_terms_that_match_nothing_are_named(
    example: Inventory, expression: str, unmatched: list[str]
) -> None:
    found = resolve.Selection(expression).unmatched(example)
    assert found == [f"--limit term {text}" for text in unmatched]
