"""Problems found by an admin's docs-only walkthrough of the CLI, each pinned by a test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from provisioner.cli import common
from provisioner.cli.progress import print_summary
from provisioner.errors import ConnectError
from provisioner.inventory.model import Secret
from provisioner.records.results import FileChange, HostResult, Status
from provisioner.rollout import push
from provisioner.rollout.runner import RolloutOptions, RunResult
from provisioner.secrets.credscope import Scope
from provisioner.transport.winrm import WinrmOptions, WinrmTransport
from tests.labkit import INSPECT_NOTHING, clean_env, copy_example, run_cli
from tests.phase1kit import EXAMPLE, cli
from tests.runkit import STARTED


def _subprocess(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(cwd)
    env.pop("COLUMNS")  # as in a cron job or CI: not a terminal, no COLUMNS
    return run_cli(cwd, *args, env=env)


# --------------------------------------------------------------------------- 1. no wrapping


def test_tables_are_not_truncated_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    result = _subprocess(tmp_path, "inventory", "list", "-i", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    row = next(line for line in result.stdout.splitlines() if "ber-rds-01 " in line)
    assert "ber-rds-01.corp.example.com" in row and "site-berlin, rds" in row
    assert "carol, dave, erin" in row


def _run(*, check: bool, diff: str) -> RunResult:
    change = FileChange(
        "microsip", "alice", r"C:\Users\alice\AppData\Roaming\MicroSIP\microsip.ini",
        Status.CHANGED, diff=diff,
    )  # fmt: skip
    host = HostResult("ws1", Status.CHANGED, "1 changed", [change], dry_run=check)
    return RunResult("feedc0ffee01", STARTED, RolloutOptions(check=check), {"ws1": host})


def test_diff_lines_are_not_wrapped_when_stdout_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    long_line = "+displayName=" + "x" * 300
    diff = f"--- a/microsip.ini\n+++ b/microsip.ini\n@@ -1 +1 @@\n-displayName=a\n{long_line}"
    print_summary(common.make_console(), _run(check=False, diff=diff), {}, diffs=True)
    lines = capsys.readouterr().out.splitlines()
    assert long_line in lines
    assert "x" * 100 not in "".join(line for line in lines if line != long_line)


# --------------------------------------------------------------------------- 2. --if-running


@pytest.mark.parametrize(
    "command",
    [
        ("rollout", "--yes"),
        ("push", "ber-ws-001"),
        ("rollback", "ber-ws-001"),
        ("user", "regenerate", "alice", "--yes"),
    ],
)
def test_an_unknown_if_running_policy_is_a_usage_error(command: tuple[str, ...]) -> None:
    code, out, err = cli(*command, "-i", str(EXAMPLE), "--if-running", "kill")
    assert code == 2, (out, err)
    assert "'kill' is not one of skip, stop, force" in err
    assert "selected" not in out  # refused before Phase 1


def test_the_cli_policies_are_the_push_policies() -> None:
    assert common.IF_RUNNING == push.IF_RUNNING


# --------------------------------------------------------------------------- 3. dry-run ids


def test_a_dry_run_shows_no_run_id_that_runs_show_would_not_know(
    capsys: pytest.CaptureFixture[str],
) -> None:
    print_summary(common.make_console(), _run(check=True, diff=""), {}, diffs=False)
    out = capsys.readouterr().out
    assert "feedc0ffee01" not in out
    assert "(dry run)" in out and "not recorded" in out
    print_summary(common.make_console(), _run(check=False, diff=""), {}, diffs=False)
    assert "Run feedc0ffee01" in capsys.readouterr().out


# --------------------------------------------------------------------------- 4. DNS failures


def test_an_unresolvable_host_name_gives_a_clean_message() -> None:
    scope = Scope.build(["*.invalid"], "encrypted")
    options = WinrmOptions(
        "ws-does-not-exist.invalid", "admin", Secret("pw"), read_timeout=30, scope=scope
    )
    transport = WinrmTransport("ws1", options)
    with pytest.raises(ConnectError) as caught:
        transport.request(INSPECT_NOTHING)
    assert str(caught.value).endswith("cannot resolve host name ws-does-not-exist.invalid")
    assert "Error" not in str(caught.value) and "HTTPConnection" not in str(caught.value)


def test_a_rollout_to_an_unresolvable_host_says_attempts_once(tmp_path: Path) -> None:
    inventory, identity, passphrase = copy_example(tmp_path)
    stations = inventory / "workstations.yaml"
    text = stations.read_text(encoding="utf-8")
    stations.write_text(text.replace("corp.example.com", "corp.invalid"), encoding="utf-8")
    keys = ["--identity", str(identity), "--passphrase-file", str(passphrase)]
    # The WinRM password may go to corp.invalid only once an admin has sealed it so.
    rescoped = _subprocess(
        tmp_path,
        "secrets", "scope", "-i", "inventory", "--path", "/defaults/winrm/password",
        "--scope", "*.corp.invalid", *keys,
    )  # fmt: skip
    assert rescoped.returncode == 0, rescoped.stderr
    result = _subprocess(
        tmp_path,
        "rollout", "-i", "inventory", "--check", "--limit", "ber-ws-001", "--retries", "2",
        "--identity", str(identity), "--passphrase-file", str(passphrase),
    )  # fmt: skip
    assert result.returncode == 3, (result.stdout, result.stderr)
    final = [line for line in result.stdout.splitlines() if line.startswith("  ber-ws-001:")]
    assert final == [
        "  ber-ws-001: failed - cannot resolve host name ber-ws-001.corp.invalid (after 3 attempts)"
    ]
    progress = next(line for line in result.stdout.splitlines() if line.startswith("[1/1]"))
    assert progress.count("3 attempts") == 1 and "NameResolutionError" not in progress


# --------------------------------------------------------------------------- 5. -i everywhere


@pytest.mark.parametrize("command", ["validate", "render"])
def test_validate_and_render_take_the_inventory_option(command: str, tmp_path: Path) -> None:
    extra = ["-o", str(tmp_path / "out")] if command == "render" else []
    code, out, err = cli(command, "-i", str(EXAMPLE), *extra)
    assert code == 0, (out, err)
    code, out, err = cli(command, str(EXAMPLE), "--inventory", str(EXAMPLE), *extra)
    assert code == 0, (out, err)
    code, out, err = cli(command, str(tmp_path), "-i", str(EXAMPLE), *extra)
    assert code == 1 and "two inventories given" in err, (out, err)


def test_the_inventory_option_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROVISIONER_INVENTORY", str(tmp_path))
    code, out, err = cli("validate", "-i", str(EXAMPLE))
    assert code == 0 and "0 error(s)" in out, (out, err)


# --------------------------------------------------------------------------- 6. explain


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("alice", "tranport"), "error: alice has no key 'tranport'; did you mean transport?"),
        (("alicee",), "did you mean alice?"),
        (
            ("alice", "-w", "ber-ws-002"),
            "error: alice is not on ber-ws-002; alice is on ber-ws-001",
        ),
        (("alice", "-w", "ber-ws-0001"), "no workstation 'ber-ws-0001'"),
    ],
)
def test_explain_refuses_what_it_cannot_show(args: tuple[str, ...], message: str) -> None:
    code, out, err = cli("explain", *args, "-i", str(EXAMPLE))
    assert code == 1, (out, err)
    assert message in err


def test_explain_matches_keys_in_any_case() -> None:
    code, out, err = cli("explain", "alice", "TRANSPORT", "-i", str(EXAMPLE))
    assert code == 0 and "transport = tls" in out, (out, err)
