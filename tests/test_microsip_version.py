"""Which MicroSIP is out there: the exe's file version, read by inspect, against the lab.

The version text comes from whoever controls the exe (a per-user install is the user's): the
tests below play that user with crafted version resources, and check that only a strictly
parsed version, or ``unreadable``, ever reaches a result, a report, doctor or the terminal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provisioner.inventory.loader import InventoryErrors, load_inventory
from provisioner.lab.workstation import LAB_MICROSIP_VERSION, Workstation, exe_image
from provisioner.microsip.keytable import load_key_table
from provisioner.microsip.version import (
    MAX_VERSION_CHARS,
    Version,
    parse_exe_version,
    parse_version,
)
from provisioner.records import report
from provisioner.records.fingerprint import Fingerprints
from provisioner.records.results import Status
from provisioner.rollout import connections, doctor, push
from provisioner.rollout.runner import RolloutOptions, RunResult
from tests.labkit import Kit, example_lab, lab_kit
from tests.runkit import STARTED

PER_USER_DIR = "%LOCALAPPDATA%\\Programs\\MicroSIP"
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m3.22.3"
"""A version resource a user crafted: a window title, a cleared screen, red text."""
HUGE = "3." + "9" * 100_000


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [("3", (3,)), ("3.21", (3, 21)), ("3.21.6", (3, 21, 6)), ("3.21.6.0", (3, 21, 6, 0))],
)
def test_a_version_is_one_to_four_dotted_numbers(text: str, parts: tuple[int, ...]) -> None:
    assert parse_version(text) == Version(parts)
    assert str(parse_version(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3.21 beta",
        " 3.21",
        "3.21\n",
        "3..21",
        "3.21.",
        "3.21.6.0.1",
        "3, 21, 6, 0",
        "\uff13.21",  # a fullwidth digit
        "\u0663.21",  # an Arabic-Indic digit
        "123456.1",
        "1." * 20 + "1",
        ESCAPES,
        HUGE,
        None,
        3.21,
    ],
)
def test_anything_else_does_not_parse(text: object) -> None:
    assert parse_version(text) is None


def test_an_exes_version_may_use_the_resource_templates_commas() -> None:
    # Older Visual Studio resource templates write FileVersion as "3, 22, 3, 0".
    assert parse_exe_version("3, 22, 3, 0") == Version((3, 22, 3, 0))
    assert parse_exe_version("3,22,3") == Version((3, 22, 3))
    assert parse_exe_version("3.22.3") == Version((3, 22, 3))
    for text in ("3,, 22", "3 ,22", "3, 22, ", ESCAPES, HUGE, None):
        assert parse_exe_version(text) is None, text
    assert parse_version("3, 22, 3, 0") is None  # the inventory and key table write dots


def test_versions_compare_part_by_part_and_missing_parts_are_zero() -> None:
    v = parse_version
    assert v("3.9") is not None and v("3.21") is not None
    assert v("3.9").below(v("3.21"))  # type: ignore[union-attr,arg-type]
    assert not v("3.21").below(v("3.21.0"))  # type: ignore[union-attr,arg-type]
    assert v("3.21").below(v("3.21.0.1"))  # type: ignore[union-attr,arg-type]
    assert not v("3.22.3").below(v("3.21.6"))  # type: ignore[union-attr,arg-type]


def test_the_key_tables_since_and_removed_are_versions() -> None:
    # The loader refuses any other (tests/test_keytable.py); the table keeps what it knows.
    versions = [v for spec in load_key_table().specs for v in (spec.since, spec.removed) if v]
    assert versions and all(parse_version(v) is not None for v in versions)


# --- the inventory -------------------------------------------------------------------------------


def _with_min_version(root: Path, value: str) -> None:
    inventory = root / "inventory.yaml"
    text = inventory.read_text()
    marker = "  microsip:\n"
    assert text.count(marker) == 1
    inventory.write_text(text.replace(marker, f"{marker}    min_version: {value}\n", 1))


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("'3.21 beta'", "min_version '3.21 beta' is not a version like '3.21.6'"),
        ("3.21", "expected a text value; quote it"),
        ("[3, 21]", "takes a single value"),
    ],
)
def test_a_bad_min_version_names_its_file_line_and_column(
    tmp_path: Path, value: str, says: str
) -> None:
    with lab_kit(tmp_path, workstations=1) as kit:
        _with_min_version(kit.root, value)
        with pytest.raises(InventoryErrors) as caught:
            load_inventory(kit.root)
        message = str(caught.value)
        assert says in message, message
        assert "inventory.yaml:" in message, message


# --- the lab, through the real client ------------------------------------------------------------


def test_each_workstation_reports_its_version_and_old_ones_are_warned_of(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    microsip: {version: '3.20.1'}\n"
    with lab_kit(tmp_path, scenario=scenario) as kit:
        _with_min_version(kit.root, "'3.21'")
        kit.rebuild()
        old, new = kit.push("ws01"), kit.push("ws02")
        assert old.status == new.status == Status.CHANGED, (old.message, new.message)
        assert old.microsip_versions == ["3.20.1"] and old.microsip_outdated
        assert "MicroSIP 3.20.1 is below microsip.min_version 3.21: update it" in old.warnings
        assert new.microsip_versions == [LAB_MICROSIP_VERSION] and not new.microsip_outdated
        assert new.warnings == []
        # The version comes in the inspect every push runs: an unchanged workstation still
        # costs one agent command.
        before = kit.lab.hosts["ws01"].stats().commands
        again = kit.push("ws01")
        assert again.status == Status.UNCHANGED and again.microsip_versions == ["3.20.1"]
        assert kit.lab.hosts["ws01"].stats().commands - before == 1
        data = report.run_json(_run(old, new), fingerprints=Fingerprints(b"k" * 32))
        assert data["microsip_versions"] == {"3.20.1": 1, LAB_MICROSIP_VERSION: 1}
        assert data["microsip_outdated"] == ["ws01"]
        hosts = {h["workstation"]: h for h in data["hosts"]}
        assert hosts["ws01"]["microsip_versions"] == ["3.20.1"]
        assert hosts["ws01"]["microsip_outdated"] is True


def test_a_comma_written_version_resource_is_read(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    microsip: {version: '3, 20, 1, 0'}\n"
    with lab_kit(tmp_path, scenario=scenario) as kit:
        _with_min_version(kit.root, "'3.21'")
        kit.rebuild()
        old = kit.push("ws01")
        assert old.microsip_versions == ["3.20.1.0"] and old.microsip_outdated, old.warnings


def test_without_a_minimum_nothing_is_warned_of(tmp_path: Path) -> None:
    scenario = "workstations:\n  ws01:\n    microsip: {version: null}\n"
    with lab_kit(tmp_path, workstations=1, scenario=scenario) as kit:
        result = kit.push("ws01")
        assert result.status == Status.CHANGED, result.message
        # An exe without a version resource is shown as such, but no minimum asks for more.
        assert result.microsip_versions == ["unreadable"]
        assert result.warnings == [] and not result.microsip_outdated


def _run(*results: object) -> RunResult:
    run = RunResult("0123456789ab", STARTED, RolloutOptions(), {})
    for result in results:
        run.results[result.host] = result  # type: ignore[attr-defined]
    return run


def _per_user(kit: Kit, versions: dict[str, bytes]) -> Workstation:
    """ws01 with MicroSIP installed by each user in their own profile, each exe's bytes given."""
    ws = kit.lab.workstations["ws01"]
    ws.uninstall_microsip()
    for name, image in versions.items():
        user = ws.lookup_account(f"ACME\\{name}")
        assert user is not None and user.profile is not None
        folder = f"{user.profile}\\AppData\\Local\\Programs\\MicroSIP"
        ws.put(f"{folder}\\microsip.exe", image, owner=user.sid)
        user.hkcu_microsip = folder  # what MicroSIP's installer records when run by the user
    inventory = kit.root / "inventory.yaml"
    inventory.write_text(
        inventory.read_text().replace(
            "install_dir: C:\\Program Files\\MicroSIP", f"install_dir: '{PER_USER_DIR}'"
        )
    )
    return ws


def test_a_users_crafted_version_resource_is_unreadable_everywhere(tmp_path: Path) -> None:
    with lab_kit(tmp_path, workstations=1, users_per_ws=3) as kit:
        _per_user(
            kit,
            {
                "u1x1": exe_image(ESCAPES),
                "u1x2": exe_image(HUGE),
                "u1x3": exe_image("3.21.6"),
            },
        )
        _with_min_version(kit.root, "'3.21'")
        kit.rebuild()
        result = kit.push("ws01")
        assert result.status == Status.CHANGED, result.message
        assert result.microsip_versions == ["3.21.6", "unreadable"]
        assert result.microsip_outdated
        assert result.warnings == [
            "MicroSIP's version is unreadable: microsip.min_version 3.21 cannot be checked"
        ]
        answer = kit.transport("ws01").request(
            push.inspect_request(kit.station("ws01"), kit.files("ws01"))
        )
        assert {u.name: u.exe_version for u in answer.users} == {
            "u1x1": "unreadable",
            "u1x2": "unreadable",
            "u1x3": "3.21.6",
        }
        assert answer.install.version is None  # no machine-wide exe
        shown = json.dumps(report.run_json(_run(result), fingerprints=Fingerprints(b"k" * 32)))
        options = connections.winrm_options(kit.station("ws01"), kit.keyring, kit.lab.lab_map())
        checks = doctor.remote_checks(
            kit.station("ws01"), kit.files("ws01"), kit.transport("ws01"), options
        )
        version = next(c for c in checks if c.name == "version")
        assert version.ok and version.warning and "unreadable" in version.detail
        everything = shown + repr(result) + repr(answer) + repr(checks)
        for raw in ("\x1b", "\\u001b", "owned", "9" * (MAX_VERSION_CHARS + 1)):
            assert raw not in everything


def test_a_per_user_exe_with_other_names_is_not_read(tmp_path: Path) -> None:
    # The user hard-links their exe elsewhere: the agent reads no version through it.
    with lab_kit(tmp_path, workstations=1, users_per_ws=1) as kit:
        ws = _per_user(kit, {"u1x1": exe_image("3.21.6")})
        user = ws.lookup_account("ACME\\u1x1")
        assert user is not None and user.profile is not None
        exe = f"{user.profile}\\AppData\\Local\\Programs\\MicroSIP\\microsip.exe"
        ws.make_link(f"{user.profile}\\Documents\\other.exe", exe, "hardlink", owner=user.sid)
        kit.rebuild()
        result = kit.push("ws01")
        assert result.status == Status.FAILED and "unsafe-path" in result.message
        assert result.microsip_versions == []  # nothing read through it
        assert ws.held_paths() == []


# --- the CLI --------------------------------------------------------------------------------------


def test_the_rollout_summary_and_doctor_show_the_fleets_versions(tmp_path: Path) -> None:
    with example_lab(tmp_path) as example:
        old = example.machine("ber-ws-002")
        assert old.install is not None
        old.put(old.install.exe_path, exe_image("3.20.1"))
        crafted = example.machine("ham-ws-001")
        assert crafted.install is not None
        crafted.put(crafted.install.exe_path, exe_image(ESCAPES))
        defaults = example.inventory / "defaults.yaml"
        text = defaults.read_text()
        marker = "    exe: microsip.exe\n"
        assert marker in text
        defaults.write_text(text.replace(marker, f"{marker}    min_version: '3.21'\n", 1))
        report_file = example.root / "run.json"
        run = example.cli("rollout", "--yes", "--report-json", str(report_file))
        assert run.returncode == 0, (run.stdout, run.stderr)
        out = run.stdout
        assert "MicroSIP versions" in out
        assert "3.20.1" in out and "unreadable" in out
        assert "warning: 2 workstation(s) run MicroSIP below microsip.min_version" in out
        assert "ber-ws-002, ham-ws-001" in out
        assert "\x1b" not in out + run.stderr and "owned" not in out + run.stderr
        data = json.loads(report_file.read_text(encoding="utf-8"))
        assert data["microsip_versions"]["3.20.1"] == 1
        assert data["microsip_versions"]["unreadable"] == 1
        assert data["microsip_outdated"] == ["ber-ws-002", "ham-ws-001"]
        assert "owned" not in report_file.read_text(encoding="utf-8")
        checked = example.cli("doctor", "ber-ws-002")
        assert checked.returncode == 0, (checked.stdout, checked.stderr)
        assert "WARN version" in checked.stdout
        assert "MicroSIP 3.20.1 is below microsip.min_version 3.21" in checked.stdout
        assert "fix: update MicroSIP to 3.21 or later" in checked.stdout
        assert "1 warning(s)" in checked.stdout
