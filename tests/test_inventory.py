"""Loading inventories: the model, and every kind of bad input with file:line:column and path."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import InventoryError
from provisioner.inventory.loader import InventoryErrors, inventory_files, load_inventory
from provisioner.render import build
from tests.phase1kit import BASE, EXAMPLE, build_files, write_inventory

# --------------------------------------------------------------------------- the model


def test_example_model() -> None:
    inventory = load_inventory(EXAMPLE)
    assert len(inventory.users) == 12
    assert len(inventory.workstations) == 9
    assert inventory.groups["rds"].parents == ("site-berlin",)
    alice = inventory.users["alice"]
    assert alice.windows == "ACME\\alice"
    assert [a.id for a in alice.accounts] == ["main", "hotline"]
    assert [a.active for a in alice.accounts] == [True, False]
    main = alice.accounts[0].keys
    assert main["username"].value == "1001"
    assert main["domain"].value == "pbx.example.com"
    assert main["username"].pointer == "/users/alice/accounts/main/sip_uri"
    assert main["password"].pointer == "/users/alice/accounts/main/password"
    assert str(main["password"].value).startswith("sipvault:v1:")
    # Users named by workstations and workstations named by users agree.
    assert inventory.workstations["ber-rds-01"].users == ("carol", "dave", "erin")
    assert inventory.users["reception"].windows == ".\\kiosk"
    # Values keep their canonical type and their source.
    ec = inventory.defaults.settings["EC"]
    assert ec.value == 1
    assert ec.source.file.endswith("defaults.yaml") and ec.source.line == 10
    codecs = inventory.defaults.settings["audioCodecs"].value
    assert codecs == "opus/48000/2 G722/16000/1 PCMA/8000/1 PCMU/8000/1"


def test_inventory_files_skip_recipients_templates_and_hidden(tmp_path: Path) -> None:
    root = write_inventory(
        tmp_path / "inv",
        {
            **BASE,
            "templates/x.yaml": "not: loaded\n",
            ".hidden/y.yaml": "not: loaded\n",
            "build/z.yaml": "not: loaded\n",
            "notes.txt": "ignored\n",
            "more/users.yml": "users:\n",
        },
    )
    names = [p.relative_to(root).as_posix() for p in inventory_files(root)]
    assert names == ["defaults.yaml", "more/users.yml", "users.yaml", "workstations.yaml"]


def test_users_and_workstations_link_both_ways(tmp_path: Path) -> None:
    root = write_inventory(
        tmp_path / "inv",
        {
            **BASE,
            "more.yaml": """\
                users:
                  u2:
                    workstations: [ws1]
                    accounts:
                      main: {sip_uri: 1002@pbx.example.com, password: SEAL}
                """,
        },
    )
    inventory = load_inventory(root)
    assert inventory.workstations["ws1"].users == ("u1", "u2")


def test_single_account_is_active_without_saying_so(tmp_path: Path) -> None:
    inventory = load_inventory(write_inventory(tmp_path / "inv", BASE))
    assert inventory.users["u1"].accounts[0].active is True


def test_sip_uri_forms_and_explicit_username_wins(tmp_path: Path) -> None:
    root = write_inventory(
        tmp_path / "inv",
        {
            **BASE,
            "users.yaml": """\
                users:
                  u1:
                    accounts:
                      a: {sip_uri: "sips:2001@pbx.example.com:5061", password: SEAL, active: true}
                      b: {username: alice, sip_uri: 2002@pbx.example.com, password: SEAL}
                      c: {sip_uri: 2003@pbx.example.com, username: bob, password: SEAL}
                """,
        },
    )
    accounts = load_inventory(root).users["u1"].accounts
    assert [(a.keys["username"].value, a.keys["domain"].value) for a in accounts] == [
        ("2001", "pbx.example.com:5061"),
        ("alice", "pbx.example.com"),
        ("bob", "pbx.example.com"),
    ]


def test_canonical_numbers_are_accepted_for_text_keys(tmp_path: Path) -> None:
    root = write_inventory(
        tmp_path / "inv",
        {
            **BASE,
            "users.yaml": """\
                users:
                  u1:
                    accounts:
                      main:
                        sip_uri: 1001@pbx.example.com
                        password: SEAL
                        voicemailNumber: 97
                        label: 2001
                        dialingPrefix: "0049"
                """,
        },
    )
    keys = load_inventory(root).users["u1"].accounts[0].keys
    assert keys["voicemailNumber"].value == "97"
    assert keys["label"].value == "2001"
    assert keys["dialingPrefix"].value == "0049"


# --------------------------------------------------------------------------- bad input

# (case id, files laid over BASE, [(file, line, column, path, text in the message)])
Expected = tuple[str, int, int, str, str]
BAD: list[tuple[str, dict[str, str], list[Expected]]] = [
    (
        "malformed-yaml",
        {"bad.yaml": "groups:\n  a: [1, 2\n  b: {}\n"},
        [("bad.yaml", 3, 4, "", "invalid YAML")],
    ),
    (
        "duplicate-key",
        {"bad.yaml": "groups:\n  a:\n    description: x\n    description: y\n"},
        [("bad.yaml", 4, 5, "/groups/a", "duplicate key 'description' (first at line 3)")],
    ),
    (
        "unknown-top-level",
        {"bad.yaml": "group:\n  a: {}\n"},
        [("bad.yaml", 1, 1, "/group", "did you mean 'groups'?")],
    ),
    (
        "unknown-entity-key",
        {"bad.yaml": "groups:\n  a:\n    setting: {}\n    parent: [b]\n"},
        [
            ("bad.yaml", 3, 5, "/groups/a/setting", "did you mean 'settings'?"),
            ("bad.yaml", 4, 5, "/groups/a/parent", "did you mean 'parents'?"),
        ],
    ),
    (
        "unknown-workstation-and-user-keys",
        {
            "workstations.yaml": "workstations:\n  ws1:\n    user: [u1]\n    users: [u1]\n",
            "more.yaml": "users:\n  u2:\n    display: x\n    workstations: [ws1]\n"
            "    accounts: {main: {sip_uri: 1@x.example.com, password: SEAL}}\n",
        },
        [
            ("workstations.yaml", 3, 5, "/workstations/ws1/user", "did you mean 'users'?"),
            ("more.yaml", 3, 5, "/users/u2/display", "did you mean 'display_name'?"),
        ],
    ),
    (
        "microsip-non-keys",
        {
            "bad.yaml": "groups:\n  a:\n    settings:\n      updateInterval: never\n"
            "      disableLocalAccount: 1\n      ListenPort: 5060\n    account:\n"
            "      STUN: stun.example.com\n      lable: x\n      Transport: udp\n"
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/settings/updateInterval", "did you mean updatesInterval"),
            (
                "bad.yaml",
                5,
                7,
                "/groups/a/settings/disableLocalAccount",
                "did you mean enableLocalAccount=0",
            ),
            ("bad.yaml", 6, 7, "/groups/a/settings/ListenPort", "did you mean sourcePort"),
            ("bad.yaml", 8, 7, "/groups/a/account/STUN", "did you mean [Settings] STUN"),
            ("bad.yaml", 9, 7, "/groups/a/account/lable", "did you mean label"),
            ("bad.yaml", 10, 7, "/groups/a/account/Transport", "did you mean transport"),
        ],
    ),
    (
        "stun-inside-an-account",
        {
            "users.yaml": "users:\n  u1:\n    accounts:\n      main:\n"
            "        sip_uri: 1001@pbx.example.com\n        password: SEAL\n"
            "        STUN: stun.example.com\n        updatesinterval: never\n"
        },
        [
            ("users.yaml", 7, 9, "/users/u1/accounts/main/STUN", "[Settings] key"),
            ("users.yaml", 8, 9, "/users/u1/accounts/main/updatesinterval", "[Settings]"),
        ],
    ),
    (
        "wrong-types",
        {
            "bad.yaml": "groups:\n  a:\n    settings:\n      EC: 2\n      sourcePort: abc\n"
            "      volumeRing: 101\n      audioCodecs: {a: b}\n    account:\n"
            "      transport: TLS\n      keepAlive: 1.5\n      hideCID: yes please\n"
            "    winrm:\n      port: abc\n      allow_basic_over_http: 1\n"
            "    microsip:\n      mode: roaming\n      exe: microsip\n"
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/settings/EC", "EC is 0 or 1"),
            ("bad.yaml", 5, 7, "/groups/a/settings/sourcePort", "whole number, got 'abc'"),
            ("bad.yaml", 6, 7, "/groups/a/settings/volumeRing", "between 0 and 100"),
            ("bad.yaml", 7, 7, "/groups/a/settings/audioCodecs", "takes a single value"),
            ("bad.yaml", 9, 7, "/groups/a/account/transport", "got 'TLS'; did you mean 'tls'?"),
            ("bad.yaml", 10, 7, "/groups/a/account/keepAlive", "whole number"),
            ("bad.yaml", 11, 7, "/groups/a/account/hideCID", "0 or 1"),
            ("bad.yaml", 13, 7, "/groups/a/winrm/port", "whole number"),
            ("bad.yaml", 14, 7, "/groups/a/winrm/allow_basic_over_http", "true or false"),
            ("bad.yaml", 16, 7, "/groups/a/microsip/mode", "got 'roaming'"),
            ("bad.yaml", 17, 7, "/groups/a/microsip/exe", "microsip.exe"),
        ],
    ),
    (
        "numbers-yaml-would-change",
        {
            "bad.yaml": "groups:\n  a:\n    account:\n      dialingPrefix: 0049\n"
            "      label: 1.10\n    settings:\n      autoAnswerNumber: [100, 0123]\n"
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/account/dialingPrefix", "reads '0049' as the number 49"),
            ("bad.yaml", 5, 7, "/groups/a/account/label", "reads '1.10' as the number 1.1"),
            ("bad.yaml", 7, 31, "/groups/a/settings/autoAnswerNumber/1", "'0123'"),
        ],
    ),
    (
        "user-without-accounts",
        {"users.yaml": "users:\n  u1:\n    windows: ACME\\u1\n"},
        [("users.yaml", 2, 3, "/users/u1", "at least one SIP account")],
    ),
    (
        "accounts-as-a-list",
        {"users.yaml": "users:\n  u1:\n    accounts:\n      - sip_uri: 1@pbx.example.com\n"},
        [("users.yaml", 3, 5, "/users/u1/accounts", "mapping keyed by a stable id")],
    ),
    (
        "two-active-accounts",
        {
            "users.yaml": "users:\n  u1:\n    accounts:\n"
            "      a: {sip_uri: 1@x.example.com, active: true, password: SEAL}\n"
            "      b: {sip_uri: 2@x.example.com, active: true, password: SEAL}\n"
        },
        [
            (
                "users.yaml",
                3,
                5,
                "/users/u1/accounts",
                "two or more accounts are active: 'a' (line 4), 'b' (line 5)",
            )
        ],
    ),
    (
        "active-not-a-boolean",
        {
            "users.yaml": "users:\n  u1:\n    accounts:\n"
            "      a: {sip_uri: 1@x.example.com, active: 'yes', password: SEAL}\n"
        },
        [("users.yaml", 4, 37, "/users/u1/accounts/a/active", "active must be true or false")],
    ),
    (
        "group-reference-in-block-list",
        {
            "workstations.yaml": "workstations:\n  ws1:\n    users: [u1]\n"
            "    groups:\n      - site-berlin\n      - nope\n",
            "groups.yaml": "groups:\n  site-berlin: {}\n",
        },
        [("workstations.yaml", 6, 9, "/workstations/ws1/groups", "unknown group 'nope'")],
    ),
    (
        "no-active-account",
        {
            "users.yaml": "users:\n  u1:\n    accounts:\n"
            "      a: {sip_uri: 1@x.example.com, password: SEAL}\n"
            "      b: {sip_uri: 2@x.example.com, active: no, password: SEAL}\n"
        },
        [("users.yaml", 3, 5, "/users/u1/accounts", "none is active")],
    ),
    (
        "bad-account-id-and-sip-uri",
        {
            "users.yaml": "users:\n  u1:\n    accounts:\n"
            '      "main line": {sip_uri: 1@x.example.com, password: SEAL}\n'
            "      b: {sip_uri: not-a-uri, password: SEAL, active: true}\n"
        },
        [
            ("users.yaml", 4, 7, "/users/u1/accounts/main line", "account ids are"),
            ("users.yaml", 5, 11, "/users/u1/accounts/b/sip_uri", "user@domain"),
        ],
    ),
    (
        "unknown-references",
        {
            "bad.yaml": "groups:\n  a:\n    parents: [nope]\nworkstations:\n  ws2:\n"
            "    groups: [zz]\n    users: [nobody]\n",
            "users.yaml": "users:\n  u1:\n    groups: [sals]\n    workstations: [ws3]\n"
            "    accounts: {main: {sip_uri: 1@x.example.com, password: SEAL}}\n",
        },
        [
            # Each wrong reference is reported at the list item that names it.
            ("bad.yaml", 3, 15, "/groups/a/parents", "unknown parent group 'nope'"),
            ("bad.yaml", 6, 14, "/workstations/ws2/groups", "unknown group 'zz'"),
            ("bad.yaml", 7, 13, "/workstations/ws2/users", "unknown user 'nobody'"),
            ("users.yaml", 3, 14, "/users/u1/groups", "unknown group 'sals'"),
            ("users.yaml", 4, 20, "/users/u1/workstations", "unknown workstation 'ws3'"),
        ],
    ),
    (
        "group-cycle",
        {
            "bad.yaml": "groups:\n  a:\n    parents: [b]\n  b:\n    parents: [c]\n"
            "  c:\n    parents: [a]\n  self:\n    parents: [self]\n"
        },
        [
            ("bad.yaml", 2, 3, "/groups/a/parents", "group cycle: a -> b -> c -> a"),
            ("bad.yaml", 8, 3, "/groups/self/parents", "group cycle: self -> self"),
        ],
    ),
    (
        "duplicates-across-files",
        {
            "zz.yaml": "users:\n  u1:\n    accounts: {main: {sip_uri: 1@x.example.com}}\n"
            "workstations:\n  ws1:\n    users: [u1]\n"
        },
        [
            ("zz.yaml", 2, 3, "/users/u1", "user 'u1' is defined twice (first at "),
            ("zz.yaml", 5, 3, "/workstations/ws1", "workstation 'ws1' is defined twice"),
        ],
    ),
    (
        "user-on-no-workstation",
        {"more.yaml": "users:\n  u9:\n    accounts: {main: {sip_uri: 9@x.example.com}}\n"},
        [("more.yaml", 2, 3, "/users/u9", "on no workstation")],
    ),
    (
        "control-characters",
        {
            "bad.yaml": 'groups:\n  a:\n    settings:\n      userAgent: "x\\r\\n[Account1]"\n'
            '      ringingSound: "a\\0b"\n      cmdIncomingCall: "x\\u2028y"\n'
            '    account:\n      label: "a\\x1bb"\n      authID: "a\\x85b"\n'
            '      displayName: "a\\ud800b"\n    description: "line\\nbreak"\n'
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/settings/userAgent", "control character"),
            ("bad.yaml", 5, 7, "/groups/a/settings/ringingSound", "control character"),
            ("bad.yaml", 6, 7, "/groups/a/settings/cmdIncomingCall", "control character"),
            ("bad.yaml", 8, 7, "/groups/a/account/label", "control character"),
            ("bad.yaml", 9, 7, "/groups/a/account/authID", "control character"),
            ("bad.yaml", 10, 7, "/groups/a/account/displayName", "control character"),
            ("bad.yaml", 11, 5, "/groups/a/description", "control character"),
        ],
    ),
    (
        "control-character-in-user-fields",
        {
            "users.yaml": 'users:\n  u1:\n    windows: "ACME\\\\u1\\n[x]"\n'
            '    display_name: "a\\tb\\rc"\n    accounts:\n      main:\n'
            '        sip_uri: "1001@pbx.example.com\\n"\n        password: SEAL\n'
        },
        [
            ("users.yaml", 3, 5, "/users/u1/windows", "control character"),
            ("users.yaml", 4, 5, "/users/u1/display_name", "control character"),
            ("users.yaml", 7, 9, "/users/u1/accounts/main/sip_uri", "control character"),
        ],
    ),
    (
        "values-windows-would-read-differently",
        {
            "bad.yaml": "groups:\n  a:\n    settings:\n      userAgent: ' padded'\n"
            "      ringingSound: '\"C:\\ring.wav\"'\n    account:\n      label: \"'x'\"\n"
            "      server: 'pbx.example.com '\n",
            "users.yaml": "users:\n  u1:\n    accounts:\n      main:\n"
            "        sip_uri: '\"1001\"@pbx.example.com'\n        password: SEAL\n",
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/settings/userAgent", "whitespace"),
            ("bad.yaml", 5, 7, "/groups/a/settings/ringingSound", "enclosed in quotes"),
            ("bad.yaml", 7, 7, "/groups/a/account/label", "enclosed in quotes"),
            ("bad.yaml", 8, 7, "/groups/a/account/server", "whitespace"),
            ("users.yaml", 5, 9, "/users/u1/accounts/main/sip_uri", "enclosed in quotes"),
        ],
    ),
    (
        "over-long-values",
        {
            "bad.yaml": "groups:\n  a:\n    settings:\n      userAgent: "
            + "u" * 256
            + "\n    account:\n      server: "
            + "s" * 1041
            + "\n      proxy: "
            + "p" * 1040
            + "\n      label: "
            + "l" * 255
            + "\n"
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/settings/userAgent", "more than the 255"),
            ("bad.yaml", 6, 7, "/groups/a/account/server", "more than the 1040"),
        ],
    ),
    (
        "tokens-and-plaintext",
        {
            "bad.yaml": "groups:\n  a:\n    description: sipvault:v1:kaaaaaaaa:aaaaaaaa:xx\n"
            "    settings:\n      userAgent: SIPVAULT:v1:x\n    account:\n      password: x\n",
            "users.yaml": "users:\n  u1:\n    accounts:\n      main:\n"
            "        sip_uri: 1001@pbx.example.com\n        password: hunter2\n"
            "        label: sipvault:v1:kaaaaaaaa:aaaaaaaa:xx\n",
            "workstations.yaml": "workstations:\n  ws1:\n    users: [u1]\n"
            "    winrm: {password: plain}\n",
        },
        [
            # A written value that is wrong is shown where the value starts (as `secrets lint`).
            ("bad.yaml", 3, 18, "/groups/a/description", "token outside a secret field"),
            ("bad.yaml", 5, 18, "/groups/a/settings/userAgent", "token outside a secret field"),
            ("bad.yaml", 7, 7, "/groups/a/account/password", "passwords belong in an account"),
            ("users.yaml", 6, 19, "/users/u1/accounts/main/password", "plain text in a secret"),
            ("users.yaml", 7, 16, "/users/u1/accounts/main/label", "token outside a secret"),
            ("workstations.yaml", 4, 23, "/workstations/ws1/winrm/password", "plain text"),
        ],
    ),
    (
        "empty-password",
        {
            "users.yaml": "users:\n  u1:\n    accounts:\n      main:\n"
            "        sip_uri: 1001@pbx.example.com\n        password:\n"
        },
        [("users.yaml", 6, 9, "/users/u1/accounts/main/password", "no password set")],
    ),
    (
        "runtime-owned-keys",
        {
            "bad.yaml": "groups:\n  a:\n    settings:\n      mainX: 10\n      volumeOutput: 50\n"
            "      AA: 1\n    enforced:\n      settings:\n        DND: 0\n"
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/settings/mainX", "MicroSIP rewrites mainX itself"),
            ("bad.yaml", 5, 7, "/groups/a/settings/volumeOutput", "rewrites volumeOutput"),
            ("bad.yaml", 6, 7, "/groups/a/settings/AA", "rewrites AA"),
            ("bad.yaml", 9, 9, "/groups/a/enforced/settings/DND", "rewrites DND"),
        ],
    ),
    (
        "user-only-blocks-and-bad-names",
        {
            "users.yaml": "users:\n  u1:\n    enforced: {settings: {EC: 1}}\n"
            "    accounts: {main: {sip_uri: 1@x.example.com, password: SEAL}}\n"
            "  bad name:\n    accounts: {}\n",
        },
        [
            ("users.yaml", 3, 5, "/users/u1/enforced", "unknown key of user u1 'enforced'"),
            ("users.yaml", 5, 3, "/users/bad name", "names are 1-63"),
        ],
    ),
    (
        "account-id-and-names-listed-twice",
        {
            "bad.yaml": "groups:\n  a:\n    settings:\n      accountId: 2\n"
            "    enforced:\n      settings:\n        accountId: 1\n",
            "workstations.yaml": "workstations:\n  ws1:\n    users: [u1, u1]\n",
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/settings/accountId", "marked 'active: true'"),
            ("bad.yaml", 7, 9, "/groups/a/enforced/settings/accountId", "marked 'active"),
            ("workstations.yaml", 3, 17, "/workstations/ws1/users/1", "'u1' is listed twice"),
        ],
    ),
    (
        # What an inventory editor could point the agent (administrator on every workstation)
        # at: a system folder, a relative path, a path out of the folder, a device name.
        "hostile-install-dir-and-exe",
        {
            "bad.yaml": "groups:\n"
            "  a:\n    microsip: {install_dir: 'C:\\Windows\\System32', exe: '..\\..\\evil.exe'}\n"
            "  b:\n    microsip: {install_dir: 'MicroSIP', exe: 'con.exe'}\n"
            "  c:\n    microsip: {install_dir: 'C:\\', exe: 'x/microsip.exe'}\n"
            "  d:\n    microsip: {install_dir: 'C:\\Program Files', exe: 'microsip.exe.'}\n"
            "  e:\n    microsip: {install_dir: '\\\\server\\share\\MicroSIP'}\n"
            "  f:\n    microsip: {install_dir: 'C:\\Apps\\..\\Windows'}\n"
            "  g:\n    microsip: {install_dir: '%SystemRoot%\\MicroSIP'}\n"
            "  h:\n    microsip: {install_dir: 'C:\\PROGRA~1'}\n"
            "  i:\n    microsip: {install_dir: 'C:\\Windows.\\Temp'}\n"
            "  ok:\n    microsip: {install_dir: '%LOCALAPPDATA%\\Programs\\MicroSIP'}\n",
        },
        [
            ("bad.yaml", 3, 16, "/groups/a/microsip/install_dir", "belongs to Windows"),
            ("bad.yaml", 3, 52, "/groups/a/microsip/exe", "is a file name only"),
            ("bad.yaml", 5, 16, "/groups/b/microsip/install_dir", "not an absolute path"),
            ("bad.yaml", 5, 41, "/groups/b/microsip/exe", "device name Windows reserves"),
            ("bad.yaml", 7, 16, "/groups/c/microsip/install_dir", "is a drive root"),
            ("bad.yaml", 7, 36, "/groups/c/microsip/exe", "is a file name only"),
            ("bad.yaml", 9, 16, "/groups/d/microsip/install_dir", "is a system folder"),
            ("bad.yaml", 9, 49, "/groups/d/microsip/exe", "ends with a dot"),
            ("bad.yaml", 11, 16, "/groups/e/microsip/install_dir", "network or device path"),
            ("bad.yaml", 13, 16, "/groups/f/microsip/install_dir", "'..'"),
            ("bad.yaml", 15, 16, "/groups/g/microsip/install_dir", "%SystemRoot%"),
            ("bad.yaml", 17, 16, "/groups/h/microsip/install_dir", "short (8.3) name"),
            ("bad.yaml", 19, 16, "/groups/i/microsip/install_dir", "ends with a dot"),
        ],
    ),
    (
        # Redirection roots let the agent accept a user's AppData there: each must be the
        # user's own (a root shared by all would let one user aim at another's folder).
        "appdata-roots-are-per-user",
        {
            "bad.yaml": "groups:\n"
            "  a:\n    microsip: {appdata_roots: '\\\\fs01\\redirect$\\%USERNAME%'}\n"
            "  b:\n    microsip: {appdata_roots: ['\\\\fs01\\redirect$']}\n"
            "  c:\n    microsip: {appdata_roots: ['\\\\fs01\\r$\\%USERNAME%\\..\\bob']}\n"
            "  d:\n    microsip: {appdata_roots: ['redirect\\%USERNAME%']}\n"
            "  e:\n    microsip: {appdata_roots: ['\\\\fs01\\r$\\%USERPROFILE%\\%USERNAME%']}\n"
            "  ok:\n    microsip: {appdata_roots: ['\\\\fs01\\r$\\%USERDOMAIN%\\%USERNAME%',"
            " 'D:\\Profiles\\%USERNAME%\\AppData']}\n",
        },
        [
            ("bad.yaml", 3, 16, "/groups/a/microsip/appdata_roots", "a list of folders"),
            ("bad.yaml", 5, 32, "/groups/b/microsip/appdata_roots/0", "%USERNAME% as a folder"),
            ("bad.yaml", 7, 32, "/groups/c/microsip/appdata_roots/0", "'..'"),
            ("bad.yaml", 9, 32, "/groups/d/microsip/appdata_roots/0", "is not absolute"),
            ("bad.yaml", 11, 32, "/groups/e/microsip/appdata_roots/0", "%USERPROFILE%"),
        ],
    ),
    (
        "names-windows-reserves",
        {
            "workstations.yaml": "workstations:\n  con:\n    users: [u1]\n  ws.:\n"
            "    users: [u1]\n  COM1:\n    users: [u1]\n",
            "users.yaml": "users:\n  u1:\n    accounts: {main: {sip_uri: 1@x.example.com, "
            "password: SEAL}}\n  nul.x:\n    accounts: {main: {sip_uri: 2@x.example.com, "
            "password: SEAL}}\n  aux:\n    accounts: {}\n",
        },
        [
            ("workstations.yaml", 2, 3, "/workstations/con", "device name Windows reserves"),
            ("workstations.yaml", 4, 3, "/workstations/ws.", "ends with a dot"),
            ("workstations.yaml", 6, 3, "/workstations/COM1", "device name"),
            ("users.yaml", 4, 3, "/users/nul.x", "user name 'nul.x' is a device name"),
            ("users.yaml", 6, 3, "/users/aux", "device name"),
        ],
    ),
    (
        "tab-and-c1-controls-reach-no-ini-line",
        {
            "bad.yaml": 'groups:\n  a:\n    settings:\n      userAgent: "a\\tb"\n'
            '    account:\n      label: "x\\u0085y"\n      authID: "x\\x9by"\n'
            '    microsip:\n      install_dir: "C:\\\\Apps\\tMicroSIP"\n'
            '    winrm:\n      username: "svc\\tx"\n',
        },
        [
            ("bad.yaml", 4, 7, "/groups/a/settings/userAgent", "control character"),
            ("bad.yaml", 6, 7, "/groups/a/account/label", "control character"),
            ("bad.yaml", 7, 7, "/groups/a/account/authID", "control character"),
            ("bad.yaml", 9, 7, "/groups/a/microsip/install_dir", "control character"),
            ("bad.yaml", 11, 7, "/groups/a/winrm/username", "control character"),
        ],
    ),
    (
        "not-a-mapping",
        {"bad.yaml": "- just\n- a list\n", "more.yaml": "groups: [a, b]\n"},
        [
            ("bad.yaml", 1, 1, "", "must be a mapping"),
            ("more.yaml", 1, 1, "/groups", "groups must be a mapping of names"),
        ],
    ),
]


@pytest.mark.parametrize(("files", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_names_file_line_column_and_path(
    tmp_path: Path, files: dict[str, str], expected: list[Expected]
) -> None:
    root, result = build_files(tmp_path / "inv", files)
    assert not result.ok
    assert result.files == []
    found = [
        (Path(f.file).relative_to(root).as_posix(), f.line, f.column, f.path, f.message)
        for f in result.findings
        if f.severity == "error"
    ]
    for file, line, column, path, text in expected:
        hits = [f for f in found if f[:4] == (file, line, column, path) and text in f[4]]
        assert hits, f"no finding {file}:{line}:{column} {path} ~ {text!r} in:\n" + "\n".join(
            map(str, found)
        )
    for finding in result.findings:
        assert finding.file and finding.line > 0 and finding.column > 0, finding
        assert "Traceback" not in finding.message


# A file that does not parse must not bury its error under false reference errors: here the
# other files refer to users (or hold users placed by) what the broken file defines.
CASCADES = {
    "colon-in-a-value": (
        "users.yaml",
        "users:\n  u1:\n    display_name: Bob: Schneider\n    accounts:\n"
        "      main: {sip_uri: 1001@pbx.example.com, password: SEAL}\n",
        (3, 22),
        "quoted",
    ),
    "key-out-of-line": (
        "users.yaml",
        "users:\n  u1:\n    accounts:\n      main: {sip_uri: 1@x.example.com, password: SEAL}\n"
        "   windows: ACME\\u1\n",
        (5, 4),
        "check the indentation of this line and the lines just above it",
    ),
    "tab-in-workstations": (
        "workstations.yaml",
        "workstations:\n  ws1:\n\tusers: [u1, u2]\n",
        (3, 1),
        "'\\t'",
    ),
}
MORE_USERS = "users:\n  u2:\n    accounts: {main: {sip_uri: 2@x.example.com, password: SEAL}}\n"


@pytest.mark.parametrize("case", sorted(CASCADES))
def test_unparsable_file_reports_only_its_own_error(tmp_path: Path, case: str) -> None:
    name, text, (line, column), hint = CASCADES[case]
    more = "workstations:\n  ws2:\n    users: [u1]\n" if name == "users.yaml" else MORE_USERS
    root = write_inventory(tmp_path / "inv", {**BASE, "more.yaml": more, name: text})
    with pytest.raises(InventoryErrors) as caught:
        load_inventory(root)
    errors = caught.value.errors
    assert [(Path(e.file or "").name, e.line, e.column) for e in errors] == [(name, line, column)]
    assert "invalid YAML" in str(errors[0]) and hint in str(errors[0])


def test_load_inventory_raises_all_errors_as_one_exception(tmp_path: Path) -> None:
    root = write_inventory(
        tmp_path / "inv",
        {**BASE, "bad.yaml": "groups:\n  a:\n    settings: {EC: 2, mainX: 1}\n  b: [x]\n"},
    )
    with pytest.raises(InventoryErrors) as caught:
        load_inventory(root)
    errors = caught.value.errors
    assert [(e.line, e.path) for e in errors] == [
        (3, "/groups/a/settings/EC"),
        (3, "/groups/a/settings/mainX"),
        (4, "/groups/b"),
    ]
    assert str(caught.value).count("\n") == 2
    assert all(isinstance(e, InventoryError) for e in errors)


def test_missing_directory_and_unreadable_file(tmp_path: Path) -> None:
    result = build.build(tmp_path / "nope")
    assert [f.code for f in result.findings] == ["inventory"]
    assert "does not exist" in result.findings[0].message
    root = write_inventory(tmp_path / "inv", BASE)
    (root / "latin1.yaml").write_bytes(b"groups:\n  a:\n    description: M\xfcller\n")
    result = build.build(root)
    [finding] = result.findings
    assert finding.file.endswith("latin1.yaml") and "not UTF-8" in finding.message


def test_recipients_problems_are_a_finding(tmp_path: Path) -> None:
    root = write_inventory(tmp_path / "inv", BASE)
    (root / "recipients.yaml").write_text("format: nope\n")
    result = build.build(root)
    assert [f.code for f in result.findings] == ["recipients"]
    (root / "recipients.yaml").unlink()
    result = build.build(root)
    assert "keys init" in result.findings[0].message
