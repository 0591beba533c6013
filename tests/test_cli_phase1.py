"""validate, render, explain and inventory: a few real subprocess runs, the rest in-process.

In-process runs go through ``provisioner.cli.main`` exactly like the console script (argv,
exit codes, error handling), only without a new interpreter.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from provisioner.render import build
from provisioner.secrets import secretstore, vault
from tests.conftest import Realm
from tests.phase1kit import (
    BASE,
    DEMO_KEY,
    EXAMPLE,
    IDENTITY,
    cli,
    secret_for,
    write_inventory,
)

GOLDEN = Path(__file__).parent / "golden" / "inventories"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _xml(text: str) -> ET.Element:
    return ET.fromstring(text)  # noqa: S314 - the tool's own JUnit output


def _example_copy(root: Path) -> Path:
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".demo-key"))
    return root


def _demo_key(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    identity = folder / "demo-only.sipid"
    shutil.copyfile(DEMO_KEY / "demo-only.sipid", identity)
    identity.chmod(0o600)
    passphrase = folder / "demo-only.passphrase"
    shutil.copyfile(DEMO_KEY / "demo-only.passphrase", passphrase)
    passphrase.chmod(0o600)
    return identity, passphrase


def _fast_identity(folder: Path) -> Path:
    """An unprotected identity for the test realm (no KDF: keeps real-key runs fast)."""
    path = folder / "test.sipid"
    secretstore.write_identity(path, IDENTITY, None, protection="none")
    return path


def _git_repo(path: Path, ignore: str = "") -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True, capture_output=True)
    if ignore:
        (path / ".gitignore").write_text(ignore)
    return path


def _bad_inventory(root: Path) -> Path:
    source = GOLDEN / "many-errors" / "inventory"
    files = {p.relative_to(source).as_posix(): p.read_text() for p in source.rglob("*.yaml")}
    return write_inventory(root, files, dedent=False)


# --------------------------------------------------------------------------- real processes


def test_process_validate_clean_and_broken(realm: Realm) -> None:
    inventory = _example_copy(realm.root / "example")
    clean = realm.run("validate", str(inventory))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    [warning, summary] = clean.stdout.splitlines()
    # The example keeps alice's second account to show that the free MicroSIP never registers it.
    assert warning.startswith("ber-ws-001/alice/microsip.ini:34: warning[inactive-account]: ")
    assert summary == (
        "21 file(s) rendered for 21 target(s) with placeholders (no private key): "
        "0 error(s), 1 warning(s)"
    )
    broken = realm.run("validate", str(_bad_inventory(realm.root / "bad")))
    assert broken.returncode == 1
    assert "Traceback" not in broken.stdout + broken.stderr
    lines = broken.stdout.splitlines()
    errors = [line for line in lines if "error[" in line]
    assert len(errors) == 11
    for line in errors:
        file, line_no, column, rest = line.split(":", 3)
        assert file.endswith(".yaml") and int(line_no) > 0 and int(column) > 0
        assert rest.startswith(" error[inventory]: /")
    assert lines[-1].endswith("11 error(s), 0 warning(s)")


def test_process_errors_never_show_a_traceback(realm: Realm) -> None:
    inventory = _example_copy(realm.root / "example")
    listing = realm.run("inventory", "list", "-i", str(inventory), "--limit", "site:berlin")
    assert listing.returncode == 1
    assert listing.stderr.startswith("error: unknown --limit term 'site:berlin'")
    broken = realm.run("explain", "anna", "-i", str(_bad_inventory(realm.root / "bad")))
    assert broken.returncode == 1
    assert broken.stderr.startswith("error: the inventory has problems")
    assert "groups.yaml:3:3" in broken.stderr
    for result in (listing, broken):
        assert "Traceback" not in result.stdout + result.stderr


@needs_git
def test_process_render_with_the_demo_key(realm: Realm) -> None:
    inventory = _example_copy(realm.root / "example")
    identity, passphrase = _demo_key(realm.root / "key")
    repo = _git_repo(realm.root / "repo", ignore="build/\n")
    keys = ("--identity", str(identity), "--passphrase-file", str(passphrase))
    refused = realm.run("render", str(inventory), "--out", str(repo / "out"), *keys)
    assert refused.returncode == 1
    assert "inside a git working tree and not ignored" in refused.stderr
    assert not (repo / "out").exists()
    done = realm.run("render", str(inventory), "--out", str(repo / "build"), *keys)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "21 files, real passwords (files are 0600)" in done.stdout
    out = repo / "build"
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 21
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (p for p in out.rglob("*") if p.is_dir()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    alice = (out / "ber-ws-001" / "alice" / "microsip.ini").read_bytes()
    assert alice.startswith(b"\xff\xfe")
    assert "password=Demo-alice-main-" in alice.decode("utf-16-le")
    assert (out / "ham-kiosk-01" / "microsip.ini").exists()


def test_process_explain(realm: Realm) -> None:
    result = realm.run("explain", "alice", "transport", "-i", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "alice on ber-ws-001 (groups: site-berlin, sales)",
        "  [Account1 (main)] transport = tls",
        f"      tls                              {EXAMPLE}/groups.yaml:9:7 (group site-berlin)",
        "  [Account2 (hotline)] transport = tls",
        f"      tls                              {EXAMPLE}/groups.yaml:9:7 (group site-berlin)",
    ]


# --------------------------------------------------------------------------- validate formats


def test_validate_json() -> None:
    code, out, _ = cli("validate", str(EXAMPLE), "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"ok", "secrets", "targets", "files", "findings", "timings"}
    assert report["ok"] is True
    assert report["secrets"] == "placeholders (no private key)"
    assert len(report["targets"]) == 21 and len(report["files"]) == 21
    assert "ham-kiosk-01/microsip.ini" in report["files"]
    assert [(f["severity"], f["code"], f["file"]) for f in report["findings"]] == [
        ("warning", "inactive-account", "ber-ws-001/alice/microsip.ini")
    ]
    assert set(report["timings"]) >= {"load", "render", "lint"}


def test_validate_json_with_errors(tmp_path: Path) -> None:
    code, out, _ = cli("validate", str(_bad_inventory(tmp_path / "bad")), "--format", "json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and report["files"] == []
    first = report["findings"][0]
    assert set(first) == {
        "severity",
        "code",
        "file",
        "line",
        "column",
        "path",
        "message",
        "source",
    }
    assert first["source"] is None  # an inventory finding is at its place already
    assert (first["line"], first["column"], first["path"]) == (3, 3, "/groups/site/parents")
    assert first["file"].endswith("groups.yaml")
    assert len(report["findings"]) == 11


def test_validate_junit_clean_and_broken(tmp_path: Path) -> None:
    code, out, _ = cli("validate", str(EXAMPLE), "--format", "junit")
    assert code == 0
    suite = _xml(out)
    assert suite.tag == "testsuite"
    cases = suite.findall("testcase")
    names = [c.get("name") for c in cases]
    assert names[0] == "inventory"
    assert len(names) == 22 == int(suite.get("tests", "0"))
    assert "ber-ws-001/alice/microsip.ini" in names and "ber-ws-001/override.ini" in names
    assert suite.get("failures") == "0"
    assert all(c.find("failure") is None for c in cases)

    code, out, _ = cli("validate", str(_bad_inventory(tmp_path / "bad")), "--format", "junit")
    assert code == 1
    suite = _xml(out)
    [case] = suite.findall("testcase")
    assert case.get("name") == "inventory"
    failure = case.find("failure")
    assert failure is not None and suite.get("failures") == "1"
    assert (failure.text or "").count("\n") == 10
    assert "group cycle" in failure.get("message", "")


def test_validate_junit_puts_target_findings_on_their_testcase(tmp_path: Path) -> None:
    template = "[Settings]\naccountId={{ active_account }}\nfoo={{ nothere }}\n"
    root = write_inventory(tmp_path / "inv", {**BASE, "templates/microsip.ini.j2": template})
    code, out, _ = cli("validate", str(root), "--format", "junit")
    assert code == 1
    cases = {c.get("name"): c for c in _xml(out).findall("testcase")}
    assert set(cases) == {"inventory", "ws1/override.ini", "ws1/u1/microsip.ini"}
    failure = cases["ws1/u1/microsip.ini"].find("failure")
    assert failure is not None and "'nothere' is undefined" in failure.get("message", "")
    assert cases["inventory"].find("failure") is None


def test_validate_github_annotations(tmp_path: Path) -> None:
    code, out, _ = cli("validate", str(_bad_inventory(tmp_path / "bad")), "--format", "github")
    assert code == 1
    annotations = [line for line in out.splitlines() if line.startswith("::")]
    assert len(annotations) == 11
    first = annotations[0]
    assert first.startswith("::error file=")
    properties, message = first[len("::error ") :].split("::", 1)
    fields = dict(part.split("=", 1) for part in properties.split(","))
    assert fields["file"].endswith("groups.yaml")
    assert (fields["line"], fields["col"]) == ("3", "3")
    assert fields["title"] == "inventory /groups/site/parents"
    assert message == "group cycle: site -> region -> site"
    assert out.splitlines()[-1].endswith("11 error(s), 0 warning(s)")


def test_validate_strict_fails_on_a_warning(tmp_path: Path) -> None:
    files = {
        **BASE,
        "defaults.yaml": "defaults:\n  settings:\n    audioCodecs: [opus/48000/2, foo/8000/1]\n",
    }
    root = write_inventory(tmp_path / "inv", files)
    code, out, _ = cli("validate", str(root))
    assert code == 0
    assert "warning[unknown-codec]" in out and "0 error(s), 1 warning(s)" in out
    code, out, _ = cli("validate", str(root), "--strict")
    assert code == 1
    code, out, _ = cli("validate", str(root), "--strict", "--format", "github")
    assert code == 1
    # The annotation lands on the inventory line the value came from, not on a rendered file
    # that is not in the repository; the message names the rendered line.
    defaults = root / "defaults.yaml"
    assert out.startswith(
        f"::warning file={defaults},line=3,col=5,title=unknown-codec [Settings] audioCodecs::"
        "ws1/u1/microsip.ini:5 [Settings] audioCodecs: "
    )
    code, out, _ = cli("validate", str(root), "--format", "json")
    [finding] = json.loads(out)["findings"]
    assert (finding["file"], finding["line"]) == ("ws1/u1/microsip.ini", 5)
    assert finding["source"] == {"file": str(defaults), "line": 3, "column": 5}


def test_validate_with_real_keys_and_limit(tmp_path: Path) -> None:
    root = write_inventory(tmp_path / "inv", BASE)
    identity = _fast_identity(tmp_path)
    code, out, _ = cli(
        "validate", str(root), "--identity", str(identity), "--limit", "u1", "--format", "json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["secrets"] == "real keys"
    assert report["targets"] == ["ws1/override.ini", "ws1/u1/microsip.ini"]


def test_validate_names_limit_typos_and_fails_on_an_empty_selection() -> None:
    code, out, _ = cli("validate", str(EXAMPLE), "--limit", "ber-ws-001,group:salse")
    assert code == 0  # a warning: ber-ws-001 was still validated
    assert (
        "warning[limit-unmatched]: --limit term 'group:salse' matches nothing; did you mean " in out
    )
    assert "1 error" not in out and "2 file(s) rendered" in out
    code, out, _ = cli("validate", str(EXAMPLE), "--limit", "user:alcie", "--format", "json")
    assert code == 1
    findings = {f["code"]: f["message"] for f in json.loads(out)["findings"]}
    assert findings == {
        "limit": "no target matches the selection --limit 'user:alcie'",
        "limit-unmatched": "--limit term 'user:alcie' matches nothing; did you mean 'user:alice'?",
    }


def test_real_keys_without_any_identity_is_one_error_not_one_per_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("unused\n")
    code, out, err = cli("validate", str(EXAMPLE), "--passphrase-file", str(passphrase))
    assert code == 1 and out == ""
    assert err == (
        "error: no identity for key k54bgbx6f: pass --identity FILE, or keep the identity file "
        f"in {tmp_path / 'config' / 'microsip-provisioner'}\n"
    )


def test_one_cause_in_many_rendered_files_is_reported_once(tmp_path: Path) -> None:
    root = tmp_path / "inventory"
    shutil.copytree(EXAMPLE, root)
    groups = root / "groups.yaml"
    text = groups.read_text(encoding="utf-8")
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "cmdIncomingCall:" in t)
    groups.write_text(
        re.sub(r"cmdIncomingCall: .*", 'cmdIncomingCall: crm.exe "a b"', text), encoding="utf-8"
    )
    code, out, _ = cli("validate", str(root))
    assert code == 0
    # Besides the example's own inactive-account warning (alice's second account):
    [finding, _inactive, summary] = out.splitlines()
    assert finding.startswith("ber-ws-001/alice/microsip.ini:18: warning[hook-quotes]: ")
    assert finding.endswith(
        f"(value set at {groups}:{line}:7 (group sales)) (and 2 more file(s): "
        "ber-ws-002/bob/microsip.ini, ham-ws-001/frank/microsip.ini)"
    )
    assert summary.endswith("0 error(s), 4 warning(s)")
    code, out, _ = cli("validate", str(root), "--format", "json")
    found = [f["code"] for f in json.loads(out)["findings"]]
    assert found.count("hook-quotes") == 3  # machine-readable output keeps every one


def test_different_causes_on_one_template_line_are_not_folded(tmp_path: Path) -> None:
    line = "{% if user.name == 'u1' %}{{ user.nope1 }}{% else %}{{ user.nope2 }}{% endif %}"
    files = {
        **BASE,
        "workstations.yaml": "workstations:\n  ws1:\n    users: [u1, u2, u3]\n",
        "users.yaml": "users:\n"
        + "".join(
            f"  {u}:\n    accounts:\n      main: {{sip_uri: 10{i}@x.example.com, password: SEAL}}\n"
            for i, u in enumerate(("u1", "u2", "u3"))
        ),
        "templates/microsip.ini.j2": f"[Settings]\nuserAgent={line}\n",
    }
    root = write_inventory(tmp_path / "inv", files, dedent=False)
    code, out, _ = cli("validate", str(root))
    assert code == 1
    errors = out.split("error[template]")[1:]  # each with its template snippet line
    assert len(errors) == 2
    assert "'nope1'" in errors[0] and "more file(s)" not in errors[0]
    assert "'nope2'" in errors[1] and "(and 1 more file(s): ws1/u3/microsip.ini)" in errors[1]


def test_validate_rejects_an_unknown_format() -> None:
    code, _, err = cli("validate", str(EXAMPLE), "--format", "xml")
    assert code == 1
    assert err == "error: --format must be text, json, junit or github\n"


# --------------------------------------------------------------------------- explain


def test_explain_json_chain_and_masked_secrets() -> None:
    code, out, _ = cli("explain", "alice", "-i", str(EXAMPLE), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["user"] == "alice"
    [station] = report["workstations"]
    assert station["workstation"] == "ber-ws-001"
    assert station["groups"] == ["site-berlin", "sales"]
    entries = {(e["section"], e["key"]): e for e in station["entries"]}
    updates = entries[("Settings", "updatesInterval")]
    assert updates["value"] == "never" and updates["enforced"] is True
    assert [link["source"] for link in updates["chain"]] == [
        f"{EXAMPLE}/defaults.yaml:5:5 (defaults)",
        f"{EXAMPLE}/defaults.yaml:22:7 (defaults (enforced))",
    ]
    recording = entries[("Settings", "recordingButton")]
    assert recording["value"] == "1" and recording["enforced"] is False
    assert [link["value"] for link in recording["chain"]] == ["0", "1"]
    assert recording["chain"][1]["source"].endswith("groups.yaml:38:7 (group sales)")
    password = entries[("Account1 (main)", "password")]
    assert password["value"] == "(sealed, key k54bgbx6f)"
    assert password["chain"] == [
        {
            "value": "(sealed, key k54bgbx6f)",
            # The token itself, where validate and secrets lint point at it too.
            "source": f"{EXAMPLE}/users/berlin.yaml:13:19 (account alice/main)",
        }
    ]
    assert "sipvault:" not in out
    username = entries[("Account2 (hotline)", "username")]
    assert username["value"] == "1901"
    assert username["chain"][0]["source"].endswith("berlin.yaml:15:9 (account alice/hotline)")


def test_explain_key_filter_workstation_and_errors() -> None:
    code, out, _ = cli("explain", "carol", "AUTOANSWER", "-i", str(EXAMPLE))
    assert code == 0
    assert out.splitlines()[1] == "  [Settings] autoAnswer = header"
    assert out.splitlines()[2:] == [
        f"      {'':<32} {EXAMPLE}/defaults.yaml:8:5 (defaults)",
        f"      {'header':<32} {EXAMPLE}/groups.yaml:43:7 (group support)",
    ]
    code, out, err = cli("explain", "alice", "-i", str(EXAMPLE), "-w", "ham-ws-001")
    assert code == 1 and out == ""
    assert err == "error: alice is not on ham-ws-001; alice is on ber-ws-001\n"
    code, _, err = cli("explain", "zoe", "-i", str(EXAMPLE))
    assert code == 1 and err.startswith("error: no user 'zoe'")


def test_explain_user_on_two_workstations(tmp_path: Path) -> None:
    files = {**BASE, "more.yaml": "workstations:\n  ws2:\n    users: [u1]\n"}
    root = write_inventory(tmp_path / "inv", files)
    code, out, _ = cli("explain", "u1", "domain", "-i", str(root), "--json")
    assert code == 0
    stations = json.loads(out)["workstations"]
    assert [s["workstation"] for s in stations] == ["ws1", "ws2"]


# --------------------------------------------------------------------------- inventory


def test_inventory_list_json_and_limit() -> None:
    code, out, _ = cli("inventory", "list", "-i", str(EXAMPLE), "--json")
    assert code == 0
    report = json.loads(out)
    assert len(report["users"]) == 12
    rows = {r["workstation"]: r for r in report["workstations"]}
    assert len(rows) == 9
    assert rows["ham-kiosk-01"] == {
        "workstation": "ham-kiosk-01",
        "address": "ham-kiosk-01.corp.example.com",
        "groups": ["site-hamburg", "kiosk"],
        "mode": "portable",
        "users": ["reception"],
        "accounts": 1,
    }
    assert rows["ber-ws-001"]["accounts"] == 2
    code, out, _ = cli("inventory", "list", "-i", str(EXAMPLE), "--json", "-l", "group:rds,!dave")
    rows = {r["workstation"]: r for r in json.loads(out)["workstations"]}
    assert list(rows) == ["ber-rds-01"] and rows["ber-rds-01"]["users"] == ["carol", "erin"]
    assert json.loads(out)["users"] == ["carol", "erin"]  # the selected users only
    code, out, _ = cli("inventory", "list", "-i", str(EXAMPLE))
    assert code == 0 and "9 workstation(s), 12 user(s)" in out
    code, out, err = cli("inventory", "list", "-i", str(EXAMPLE), "-l", "group:sales,&ws:ham-*,x")
    assert code == 0 and "1 workstation(s), 1 user(s)" in out
    assert err == "warning: --limit term 'x' matches nothing\n"


def test_inventory_graph_json() -> None:
    code, out, _ = cli("inventory", "graph", "-i", str(EXAMPLE), "--json")
    assert code == 0
    graph = json.loads(out)
    assert sorted(graph) == ["kiosk", "rds", "sales", "site-berlin", "site-hamburg", "support"]
    assert graph["site-berlin"]["children"] == ["rds"]
    assert graph["rds"]["parents"] == ["site-berlin"]
    assert graph["kiosk"]["members"] == ["workstation ham-kiosk-01"]
    assert graph["sales"]["members"] == ["user alice", "user bob", "user frank"]
    code, out, _ = cli("inventory", "graph", "-i", str(EXAMPLE))
    assert code == 0 and "site-hamburg" in out and "workstation ham-kiosk-01" in out


# --------------------------------------------------------------------------- render


def _modes(out: Path) -> tuple[set[int], set[int]]:
    files = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_dir()}
    return files, dirs


@needs_git
def test_render_refuses_real_passwords_in_a_git_tree(tmp_path: Path) -> None:
    root = write_inventory(tmp_path / "inv", BASE)
    identity = ("--identity", str(_fast_identity(tmp_path)))
    repo = _git_repo(tmp_path / "repo", ignore="build/\n*.secret/\n")
    out = repo / "deep" / "out"
    code, stdout, err = cli("render", str(root), "--out", str(out), *identity)
    assert code == 1
    assert err.startswith(f"error: {out} is inside a git working tree and not ignored")
    assert "--allow-in-git" in err
    assert not out.exists() and stdout == ""
    # Ignored (even before the folder exists), told to, or outside any repository: written.
    for target, extra in (
        (repo / "build", ()),
        (repo / "x.secret" / "y", ()),
        (out, ("--allow-in-git",)),
        (tmp_path / "elsewhere", ()),
    ):
        code, stdout, err = cli("render", str(root), "--out", str(target), *identity, *extra)
        assert code == 0, err
        assert "2 files, real passwords (files are 0600)" in stdout
        text = (target / "ws1" / "u1" / "microsip.ini").read_bytes().decode("utf-16-le")
        assert f"password={secret_for('/users/u1/accounts/main/password')}\r\n" in text
        assert _modes(target) == ({0o600}, {0o700})


@needs_git
def test_render_placeholders_go_anywhere(tmp_path: Path) -> None:
    root = write_inventory(tmp_path / "inv", BASE)
    repo = _git_repo(tmp_path / "repo")
    code, stdout, _ = cli("render", str(root), "--out", str(repo / "out"))
    assert code == 0
    assert "2 files, placeholders PH-<pathtag>" in stdout
    realm = vault.load_recipients_file(root / "recipients.yaml").realm
    text = (repo / "out" / "ws1" / "u1" / "microsip.ini").read_bytes().decode("utf-16-le")
    placeholder = vault.placeholder_for(realm, "/users/u1/accounts/main/password")
    assert f"password={placeholder}\r\n" in text
    assert _modes(repo / "out") == ({0o600}, {0o700})


def test_render_writes_nothing_when_there_are_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, _ = cli("render", str(_bad_inventory(tmp_path / "bad")), "--out", str(out))
    assert code == 1
    assert stdout.splitlines()[-1] == "nothing written: fix the errors above first"
    assert len([line for line in stdout.splitlines() if "error[" in line]) == 11
    assert not out.exists()


def test_render_overwrites_and_keeps_modes(tmp_path: Path) -> None:
    root = write_inventory(tmp_path / "inv", BASE)
    out = tmp_path / "out"
    (out / "ws1").mkdir(parents=True)
    (out / "ws1").chmod(0o755)
    (out / "ws1" / "override.ini").write_text("stale")
    (out / "ws1" / "override.ini").chmod(0o644)
    code, _, _ = cli("render", str(root), "--out", str(out))
    assert code == 0
    data = (out / "ws1" / "override.ini").read_bytes()
    assert data.startswith(b"\xff\xfe")
    # Files written earlier with looser modes are tightened: they may hold passwords.
    assert _modes(out) == ({0o600}, {0o700})


# --------------------------------------------------------------------------- hostile paths

PORTABLE = {
    **BASE,
    "defaults.yaml": """\
        defaults:
          settings:
            updatesInterval: never
          microsip:
            mode: portable
            install_dir: C:\\Tools\\MicroSIP
            exe: {exe}
        """,
}


def test_render_of_a_hostile_exe_writes_nothing_outside_out(tmp_path: Path) -> None:
    # An inventory editor names the program so that its ini lands beside OUT: a key-less
    # render (what CI runs on every merge request) replaced that file.
    victim = tmp_path / "victim.ini"
    victim.write_text("the admin's own file")
    out = tmp_path / "out"
    for exe in ("../victim.exe", "..\\..\\victim.exe", "sub/../../../victim.exe"):
        files = {**PORTABLE, "defaults.yaml": PORTABLE["defaults.yaml"].format(exe=exe)}
        root = write_inventory(tmp_path / "inv", files)
        code, stdout, _ = cli("render", str(root), "--out", str(out))
        assert code == 1, (exe, stdout)
        assert "/defaults/microsip/exe" in stdout and "is a file name only" in stdout, stdout
        assert victim.read_text() == "the admin's own file"
        assert not out.exists()


def test_render_never_writes_outside_out_even_for_an_unchecked_path(tmp_path: Path) -> None:
    from provisioner.atomicfile import UnsafeTreeError, write_tree

    out = tmp_path / "out"
    for relative in ("ws/../../victim.ini", "/etc/victim.ini", "ws//x.ini", "ws\\..\\x.ini"):
        with pytest.raises(UnsafeTreeError, match="not a plain relative path"):
            write_tree(out, [(relative, b"x")])
    assert not (tmp_path / "victim.ini").exists()


def _planted(tmp_path: Path) -> tuple[Path, Path, Path]:
    """OUT from an earlier render, where someone who can write into OUT planted links."""
    root = write_inventory(tmp_path / "inv", BASE)
    out = tmp_path / "out"
    assert cli("render", str(root), "--out", str(out))[0] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    (elsewhere / "keep.txt").write_text("not the tool's")
    return root, out, elsewhere


def test_render_does_not_follow_a_folder_link_inside_out(tmp_path: Path) -> None:
    root, out, elsewhere = _planted(tmp_path)
    shutil.rmtree(out / "ws1")
    (out / "ws1").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = cli("render", str(root), "--out", str(out))
    assert code == 1
    assert "'ws1' is a symbolic link or not a folder" in err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]  # nothing written there
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755  # and its mode untouched
    assert (out / "ws1").is_symlink()  # the link itself is left for its owner to look at


def test_render_does_not_write_through_or_remove_a_file_link(tmp_path: Path) -> None:
    root, out, elsewhere = _planted(tmp_path)
    target = out / "ws1" / "u1" / "microsip.ini"
    target.unlink()
    target.symlink_to(elsewhere / "keep.txt")
    (out / "ws1" / "notes.txt").write_text("someone's notes")
    code, _, err = cli("render", str(root), "--out", str(out))
    assert code == 1
    assert "ws1/u1/microsip.ini: a symbolic link or another non-file stands there" in err
    assert (elsewhere / "keep.txt").read_text() == "not the tool's"
    assert stat.S_IMODE((elsewhere / "keep.txt").stat().st_mode) == 0o644
    assert target.is_symlink()  # not removed: the render did not write it
    assert (out / "ws1" / "notes.txt").read_text() == "someone's notes"
    assert not [p for p in out.rglob("*.tmp")]  # no temp file left behind
    target.unlink()
    assert cli("render", str(root), "--out", str(out))[0] == 0
    assert (out / "ws1" / "notes.txt").read_text() == "someone's notes"


# --------------------------------------------------------------------------- MicroSIP's pitfalls

PITFALLS = {
    "groups.yaml": """\
        groups:
          office:
            account:
              dialingPrefix: "0"
            settings:
              cmdOutgoingCall: C:\\Tools\\dial.exe --auth {password}
              cmdIncomingCall: C:\\Scripts\\crm-popup.bat --source microsip
              autoRecording: 1
        """,
    "workstations.yaml": """\
        workstations:
          ws1:
            groups: [office]
            users: [u1]
          kiosk:
            groups: [office]
            users: [k1]
            microsip:
              mode: portable
              install_dir: C:\\Kiosk\\MicroSIP
              exe: microsip.exe
        """,
    "users.yaml": """\
        users:
          u1:
            windows: ACME\\u1
            accounts:
              main:
                sip_uri: 1001@pbx.example.com
                active: true
                password: SEAL
              hotline:
                sip_uri: 1901@pbx.example.com
                password: SEAL
          k1:
            windows: .\\kiosk
            accounts:
              main:
                sip_uri: 3000@pbx.example.com
                password: SEAL
        """,
}


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_microsip_pitfalls_through_validate_and_render(tmp_path: Path) -> None:
    root = write_inventory(tmp_path / "inv", {**BASE, **PITFALLS})
    identity = ("--identity", str(_fast_identity(tmp_path)))
    code, out, _ = cli("validate", str(root), *identity)
    assert code == 1
    *lines, summary = out.splitlines()
    assert summary.endswith("2 error(s), 7 warning(s)")
    groups, users = root / "groups.yaml", root / "users.yaml"

    def set_at(path: Path, text: str, layer: str) -> str:
        return f"(value set at {path}:{_line_of(path, text)}:7 ({layer}))"

    office = "group office"
    expected = [
        # errors first: the password in the command line, in both profiles (one cause)
        (
            "kiosk/k1/microsip.ini",
            "error[password-expansion]: [Settings] cmdOutgoingCall: ",
            set_at(groups, "cmdOutgoingCall", office)
            + " (and 1 more file(s): ws1/u1/microsip.ini)",
        ),
        (
            "kiosk/k1/microsip.ini",
            "warning[hook-batch]: [Settings] cmdIncomingCall: ",
            set_at(groups, "cmdIncomingCall", office)
            + " (and 1 more file(s): ws1/u1/microsip.ini)",
        ),
        (
            "kiosk/k1/microsip.ini",
            "warning[dialing-prefix]: [Account1] dialingPrefix: ",
            set_at(groups, "dialingPrefix", office) + " (and 1 more file(s): ws1/u1/microsip.ini)",
        ),
        # a portable MicroSIP records next to itself: only ws1's profile records to the Desktop
        (
            "ws1/u1/microsip.ini",
            "warning[recording-path]: [Settings] autoRecording: ",
            set_at(groups, "autoRecording", office),
        ),
        (
            "ws1/u1/microsip.ini",
            "warning[inactive-account]: [Account2]: ",
            set_at(users, "hotline:", "account u1/hotline"),
        ),
        (
            "ws1/u1/microsip.ini",
            "warning[dialing-prefix]: [Account2] dialingPrefix: ",
            set_at(groups, "dialingPrefix", office),
        ),
    ]
    assert len(lines) == len(expected), lines
    for line, (file, start, end) in zip(lines, expected, strict=True):
        assert re.match(rf"{re.escape(file)}:\d+: {re.escape(start)}", line), line
        assert line.endswith(end), line
    # render says the same, and writes nothing (there are errors).
    rendered = tmp_path / "out"
    code, render_out, _ = cli("render", str(root), "--out", str(rendered), *identity)
    assert code == 1 and not rendered.exists()
    assert render_out.splitlines() == [*lines, "nothing written: fix the errors above first"]
    # No output quotes a password, and JSON keeps each finding with its inventory place.
    code, json_out, _ = cli("validate", str(root), *identity, "--format", "json")
    for pointer in ("/users/u1/accounts/main/password", "/users/u1/accounts/hotline/password"):
        assert secret_for(pointer) not in out + render_out + json_out
    findings = json.loads(json_out)["findings"]
    assert {f["code"] for f in findings} == {
        "password-expansion",
        "hook-batch",
        "dialing-prefix",
        "recording-path",
        "inactive-account",
    }
    # Each finding's line is the rendered line of its key (the section header for an account).
    documents = {f.target.name: f.document for f in build.build(root).files}
    for finding in findings:
        path = re.fullmatch(r"\[(.+?)\] ?(.*)", finding["path"])
        assert path is not None, finding
        section, key = path.groups()
        document = documents[finding["file"]]
        [where] = [s for s in document.sections if s.name == section]
        entry = where.entry(key) if key else None
        assert finding["line"] == (entry.line if entry else where.line), finding
        assert finding["source"]["line"] > 0
    # The same inventory with each pitfall avoided is clean.
    avoided = {
        "groups.yaml": """\
            groups:
              office:
                account:
                  dialingPrefix: "0"
                  dialPlan: (xxxx|0x.)
                settings:
                  cmdOutgoingCall: C:\\Tools\\dial.exe --user {extension}
                  cmdIncomingCall: powershell.exe -File C:\\Scripts\\crm-popup.ps1
                  autoRecording: 1
                  recordingPath: D:\\Recordings
            """,
        "users.yaml": """\
            users:
              u1:
                windows: ACME\\u1
                accounts:
                  main:
                    sip_uri: 1001@pbx.example.com
                    password: SEAL
              k1:
                windows: .\\kiosk
                accounts:
                  main:
                    sip_uri: 3000@pbx.example.com
                    password: SEAL
            """,
    }
    root = write_inventory(tmp_path / "avoided", {**BASE, **PITFALLS, **avoided})
    code, out, _ = cli("validate", str(root))
    assert code == 0
    assert out.splitlines() == [
        "4 file(s) rendered for 4 target(s) with placeholders (no private key): "
        "0 error(s), 0 warning(s)"
    ]
