"""Run files: the JSON document, the JUnit XML, exit codes."""

from __future__ import annotations

import json
import stat
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import pytest

from provisioner.records import report
from provisioner.records.results import HostResult, Status
from provisioner.rollout.runner import RolloutOptions, RunResult
from tests.runkit import (
    CANARY,
    FP,
    SHA_A,
    SHA_B,
    STARTED,
    THRESHOLD,
    ini_change,
    make_check_run,
    make_run,
    override_change,
)


def _only(statuses: list[Status]) -> RunResult:
    hosts = {f"ws{i}": HostResult(f"ws{i}", s) for i, s in enumerate(statuses)}
    return RunResult("e0e0e0e0e0e0", STARTED, RolloutOptions(), hosts)


# --------------------------------------------------------------------------- JSON


def test_run_json_has_the_run_options_counts_and_every_host() -> None:
    data = report.run_json(make_run(), fingerprints=FP)
    assert data["report_version"] == 2
    assert data["run_id"] == "a1b2c3d4e5f6"
    assert data["started"] == "2024-05-01T10:00:00.000000Z"
    assert data["finished"] == "2024-05-01T10:00:12.500000Z"
    assert datetime.fromisoformat(data["started"]) == STARTED
    assert data["duration"] == 12.5
    assert data["stopped"] == THRESHOLD
    assert data["dry_run"] is False
    assert data["ok"] is False
    assert data["exit_code"] == 3
    assert data["options"]["canary"] == "1"
    assert data["options"]["batch"] == "50%"
    assert data["options"]["forks"] == 20
    assert data["options"]["push"] == {"if_running": "skip", "reset": False, "users": ["alice"]}
    assert data["counts"] == {
        "unchanged": 1,
        "changed": 1,
        "busy": 1,
        "skipped": 1,
        "conflict": 1,
        "failed": 3,
    }
    assert data["retry"] == [
        "ws-auth",
        "ws-busy",
        "ws-conflict",
        "ws-down",
        "ws-partial",
        "ws-skipped",
    ]
    hosts = {h["workstation"]: h for h in data["hosts"]}
    assert [h["workstation"] for h in data["hosts"]] == sorted(hosts)
    down = hosts["ws-down"]
    assert down == {
        "workstation": "ws-down",
        "status": "failed",
        "message": "cannot connect to ws-down:5986: connection refused (after 3 attempts)",
        "attempts": 3,
        "duration": 6.0,
        "retryable": True,
        "dry_run": False,
        "batch": 3,
        "warnings": [],
        "microsip_versions": [],
        "microsip_outdated": False,
        "files": [],
    }
    assert hosts["ws-skipped"]["attempts"] == 0
    assert hosts["ws-skipped"]["batch"] is None
    assert hosts["ws-conflict"]["warnings"] == ["MicroSIP was running: some settings may be lost"]
    conflict = hosts["ws-conflict"]["files"][0]
    assert conflict == {
        "kind": "microsip",
        "user": "dave",
        "path": "C:\\Users\\dave\\AppData\\Roaming\\MicroSIP\\microsip.ini",
        "name": "dave/microsip.ini",
        "status": "conflict",
        "message": "the file changed while it was being written, twice",
        "old_sha256": FP.of(SHA_A),
        "new_sha256": FP.of(SHA_A),
        "conflicts": ["[Settings] ringtone"],
    }
    changed = hosts["ws-changed"]["files"]
    assert [f["name"] for f in changed] == ["alice/microsip.ini", "override.ini"]
    assert changed[0]["old_sha256"] == FP.of(SHA_A) and changed[0]["new_sha256"] == FP.of(SHA_B)
    assert SHA_A not in json.dumps(data) and SHA_B not in json.dumps(data)
    assert changed[1]["user"] is None


def test_run_json_never_contains_the_diff() -> None:
    text = json.dumps(report.run_json(make_run(), fingerprints=FP))
    assert CANARY not in text
    assert "diff" not in text
    assert CANARY not in json.dumps(report.run_json(make_check_run(), fingerprints=FP))


def test_run_json_of_a_dry_run() -> None:
    data = report.run_json(make_check_run(), fingerprints=FP)
    assert data["dry_run"] is True
    assert data["options"]["check"] is True
    assert data["exit_code"] == 0 and data["ok"] is True
    assert data["hosts"][0]["dry_run"] is True
    assert data["retry"] == []


def test_write_run_json_writes_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "out" / "run.json"
    path.parent.mkdir()
    path.write_text("an older report")
    path.chmod(0o644)  # written by an older version: tightened
    report.write_run_json(make_run(), path, fingerprints=FP)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text(encoding="utf-8")) == report.run_json(
        make_run(), fingerprints=FP
    )
    assert path.read_bytes().endswith(b"\n")
    report.write_run_json(make_check_run(), path, fingerprints=FP)
    assert json.loads(path.read_text(encoding="utf-8"))["run_id"] == "c0ffee000001"
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]


# --------------------------------------------------------------------------- JUnit


def _parse(text: str) -> ET.Element:
    return ET.fromstring(text)  # noqa: S314 - the tool's own JUnit output


def _cases(root: ET.Element) -> dict[tuple[str, str], ET.Element]:
    found = {(c.get("classname", ""), c.get("name", "")): c for c in root.iter("testcase")}
    assert len(found) == len(list(root.iter("testcase"))), "duplicate test cases"
    return found


def test_junit_has_one_case_per_workstation_and_file_plus_connection_cases() -> None:
    run = make_run()
    root = _parse(report.run_junit(run, fingerprints=FP))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    cases = _cases(root)
    files = sum(len(r.files) for r in run.results.values())
    fileless = [h for h, r in run.results.items() if not r.files]
    assert len(cases) == files + len(fileless)
    assert set(cases) == {
        ("ws-changed", "alice/microsip.ini"),
        ("ws-changed", "override.ini"),
        ("ws-unchanged", "bob/microsip.ini"),
        ("ws-unchanged", "override.ini"),
        ("ws-busy", "carol/microsip.ini"),
        ("ws-busy", "override.ini"),
        ("ws-skipped", "connection"),
        ("ws-down", "connection"),
        ("ws-auth", "connection"),
        ("ws-conflict", "dave/microsip.ini"),
        ("ws-conflict", "override.ini"),
        ("ws-partial", "erin/microsip.ini"),
        ("ws-partial", "frank/microsip.ini"),
    }


def test_junit_failures_skips_and_passes() -> None:
    root = _parse(report.run_junit(make_run(), fingerprints=FP))
    cases = _cases(root)

    def only(case: ET.Element) -> list[str]:
        return [child.tag for child in case if child.tag in ("failure", "skipped", "error")]

    down = cases[("ws-down", "connection")].find("failure")
    assert down is not None
    assert down.get("type") == "failed"
    assert down.get("message") == (
        "cannot connect to ws-down:5986: connection refused (after 3 attempts)"
    )
    auth = cases[("ws-auth", "connection")].find("failure")
    assert auth is not None
    assert auth.get("message") == "ws-auth: the credentials were rejected (check the account)"
    conflict = cases[("ws-conflict", "dave/microsip.ini")].find("failure")
    assert conflict is not None
    assert conflict.get("type") == "conflict"
    assert conflict.get("message") == "the file changed while it was being written, twice"
    assert "[Settings] ringtone" in (conflict.text or "")
    erin = cases[("ws-partial", "erin/microsip.ini")].find("failure")
    assert erin is not None and erin.get("message") == "E_ACCESS: access denied"
    busy = cases[("ws-busy", "carol/microsip.ini")].find("skipped")
    assert busy is not None
    assert (busy.get("message") or "").startswith("MicroSIP is running for carol")
    skipped = cases[("ws-skipped", "connection")].find("skipped")
    assert skipped is not None and skipped.get("message") == THRESHOLD
    for passing in [
        ("ws-changed", "alice/microsip.ini"),
        ("ws-changed", "override.ini"),
        ("ws-unchanged", "bob/microsip.ini"),
        ("ws-busy", "override.ini"),
        ("ws-conflict", "override.ini"),
        ("ws-partial", "frank/microsip.ini"),
    ]:
        assert only(cases[passing]) == [], passing
    out = cases[("ws-changed", "alice/microsip.ini")].find("system-out")
    assert out is not None and (out.text or "").startswith("changed")
    warned = cases[("ws-conflict", "override.ini")].find("system-err")
    assert warned is not None and "MicroSIP was running" in (warned.text or "")


def test_junit_totals_times_and_properties() -> None:
    root = _parse(report.run_junit(make_run(), fingerprints=FP))
    suite = root.find("testsuite")
    assert suite is not None
    cases = list(suite.iter("testcase"))
    failures = sum(1 for c in cases if c.find("failure") is not None)
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    assert (failures, skipped) == (4, 2)
    for element in (root, suite):
        assert element.get("tests") == str(len(cases))
        assert element.get("failures") == str(failures)
        assert element.get("skipped") == str(skipped)
        assert element.get("errors") == "0"
        assert float(element.get("time", "")) == pytest.approx(12.5)
    assert suite.get("timestamp") == "2024-05-01T10:00:00"
    assert suite.get("id") == "a1b2c3d4e5f6"
    assert "a1b2c3d4e5f6" in (suite.get("name") or "")
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["run_id"] == "a1b2c3d4e5f6"
    assert properties["dry_run"] == "false"
    assert properties["stopped"] == THRESHOLD
    assert properties["exit_code"] == "3"
    times = {(c.get("classname"), c.get("name")): float(c.get("time", "")) for c in cases}
    assert times[("ws-changed", "alice/microsip.ini")] == pytest.approx(0.75)
    assert times[("ws-down", "connection")] == pytest.approx(6.0)
    assert sum(times.values()) == pytest.approx(
        sum(r.duration for r in make_run().results.values())
    )


def test_junit_never_contains_the_diff() -> None:
    assert CANARY not in report.run_junit(make_run(), fingerprints=FP)
    assert CANARY not in report.run_junit(make_check_run(), fingerprints=FP)


def test_junit_of_a_dry_run_says_would_change() -> None:
    root = _parse(report.run_junit(make_check_run(), fingerprints=FP))
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("name") or "").startswith("provisioner check")
    case = _cases(root)[("ws1", "alice/microsip.ini")]
    assert case.find("failure") is None and case.find("skipped") is None
    out = case.find("system-out")
    assert out is not None and (out.text or "").startswith("would change")


def test_junit_survives_markup_and_control_characters() -> None:
    message = 'agent said <b>"no" & \x1b[31mred\x00\nsecond line'
    run = _only([Status.FAILED])
    run.results["ws0"].message = message
    run.results["ws<&>"] = HostResult(
        "ws<&>", Status.UNCHANGED, "", [override_change(Status.UNCHANGED)]
    )
    root = _parse(report.run_junit(run, fingerprints=FP))
    failure = root.find("testsuite/testcase/failure")
    assert failure is not None
    assert "\n" not in (failure.get("message") or "")
    assert failure.get("message", "").startswith('agent said <b>"no" &')
    assert ("ws<&>", "override.ini") in _cases(root)


def test_host_failure_outside_its_files_gets_a_connection_case_too() -> None:
    run = _only([])
    run.results["ws9"] = HostResult(
        "ws9", Status.FAILED, "agent: script blocked", [ini_change("zed", Status.UNCHANGED)]
    )
    cases = _cases(_parse(report.run_junit(run, fingerprints=FP)))
    assert set(cases) == {("ws9", "connection"), ("ws9", "zed/microsip.ini")}
    assert cases[("ws9", "connection")].find("failure") is not None


def test_write_run_junit(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    report.write_run_junit(make_run(), path, fingerprints=FP)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    root = _parse(path.read_text(encoding="utf-8"))
    assert len(list(root.iter("testcase"))) == 13
    assert path.read_text(encoding="utf-8").startswith('<?xml version="1.0" encoding="UTF-8"?>')


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    ("statuses", "code", "detailed"),
    [
        ([], 0, 0),
        ([Status.UNCHANGED], 0, 0),
        ([Status.CHANGED, Status.UNCHANGED], 0, 4),
        ([Status.CHANGED, Status.FAILED], 3, 3),
        ([Status.CONFLICT], 3, 3),
        ([Status.UNCHANGED, Status.BUSY], 3, 3),
        ([Status.SKIPPED], 3, 3),
    ],
)
def test_exit_code(statuses: list[Status], code: int, detailed: int) -> None:
    assert report.exit_code(_only(statuses)) == code
    assert report.exit_code(_only(statuses), detailed=True) == detailed


def test_exit_codes_of_the_sample_runs() -> None:
    assert report.exit_code(make_run()) == report.EXIT_HOSTS_FAILED == 3
    assert report.exit_code(make_check_run()) == report.EXIT_OK == 0


def test_jsonable_masks_unknown_objects_through_str() -> None:
    class Masked:
        def __str__(self) -> str:
            return "********"

    data = report.jsonable({"a": Path("x/y"), "b": Status.BUSY, "c": Masked(), "d": {1, 2}})
    assert data == {"a": "x/y", "b": "busy", "c": "********", "d": [1, 2]}
