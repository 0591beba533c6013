"""What the commands print, as a person reads it: tables, times, positions, folded errors."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.lab.faults import Faults
from tests.labkit import ExampleLab, clean_env, copy_example, example_lab, run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def example(tmp_path: Path) -> Iterator[ExampleLab]:
    with example_lab(tmp_path) as running:
        yield running


def _on_a_terminal(cwd: Path, *args: str, columns: int = 80) -> str:
    """The output of ``provisioner ARGS`` on a terminal ``columns`` wide."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**clean_env(cwd), "COLUMNS": str(columns), "TERM": "dumb", "NO_COLOR": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "provisioner.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        cwd=cwd,
        env=env,
    )
    os.close(terminal)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=60) == 0
    return b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


# --------------------------------------------------------------------------- tables


def test_inventory_list_never_cuts_a_name_at_80_columns(tmp_path: Path) -> None:
    inventory, _, _ = copy_example(tmp_path)
    long_name = "ham-reception-desk-ground-floor-01"
    workstations = inventory / "workstations.yaml"
    workstations.write_text(
        workstations.read_text(encoding="utf-8").replace("ham-kiosk-01", long_name),
        encoding="utf-8",
    )
    shown = _on_a_terminal(tmp_path, "inventory", "list", "-i", "inventory")
    assert "\N{HORIZONTAL ELLIPSIS}" not in shown, shown
    assert all(len(line) <= 80 for line in shown.splitlines()), shown
    for name in (long_name, "ber-rds-01", "ham-ws-003"):
        assert any(name in line for line in shown.splitlines()), (name, shown)


# --------------------------------------------------------------------------- times


def test_a_host_that_failed_every_attempt_shows_the_time_of_all_of_them(
    example: ExampleLab,
) -> None:
    example.lab.hosts["ber-ws-002"].set_faults(Faults(refuse=True))
    run = example.cli("rollout", "--yes", "--quiet", "--limit", "ber-ws-002", "--retries", "2")
    assert run.returncode == 3, (run.stdout, run.stderr)
    [line] = [x for x in run.stdout.splitlines() if x.startswith("[1/1] ber-ws-002: failed")]
    assert "after 3 attempts" in line
    # Two waits between the attempts: at least 0.5 s and 1 s (1 s backoff, halved by jitter).
    seconds = float(re.findall(r"\((\d+\.\d)s\)$", line)[0])
    assert seconds >= 1.5, line


# --------------------------------------------------------------------------- positions


def test_validate_and_secrets_lint_point_at_the_same_column(tmp_path: Path) -> None:
    inventory, _, _ = copy_example(tmp_path)
    users = inventory / "users" / "berlin.yaml"
    lines = users.read_text(encoding="utf-8").splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines) if "password: sipvault:" in line)
    # A token whose payload is damaged: both commands see it without any key.
    lines[number] = re.sub(r"(sipvault:v\d:[^:]+:[^:]+:)", r"\1!", lines[number])
    users.write_text("".join(lines), encoding="utf-8")
    value_column = lines[number].index("sipvault:") + 1
    where = f"inventory/users/berlin.yaml:{number + 1}:{value_column}: "
    env = clean_env(tmp_path)
    validated = run_cli(tmp_path, "validate", "inventory", env=env)
    linted = run_cli(tmp_path, "secrets", "lint", "-i", "inventory", env=env)
    assert validated.returncode == linted.returncode == 1
    assert any(line.startswith(where) for line in validated.stdout.splitlines()), validated.stdout
    assert any(line.startswith(where) for line in linted.stdout.splitlines()), linted.stdout


def test_plain_text_and_a_stray_token_are_shown_where_the_value_starts(tmp_path: Path) -> None:
    inventory, _, _ = copy_example(tmp_path)
    defaults = inventory / "defaults.yaml"
    text = defaults.read_text(encoding="utf-8")
    token = re.search(r"password: (sipvault:\S+)", text)
    assert token is not None
    defaults.write_text(text.replace(token.group(1), "hunter2"), encoding="utf-8")
    line = text[: token.start()].count("\n") + 1
    column = token.start(1) - text.rfind("\n", 0, token.start())
    users = inventory / "users" / "berlin.yaml"
    text = users.read_text(encoding="utf-8")
    label = "label: Alice (direct)"
    assert label in text
    users.write_text(text.replace(label, "label: sipvault:v1:kaaaaaaaa:aaaaaaaa:xx"), "utf-8")
    stray = text[: text.index(label)].count("\n") + 1
    stray_column = text.index(label) - text.rfind("\n", 0, text.index(label)) + len("label: ")
    places = [
        f"inventory/defaults.yaml:{line}:{column}: ",
        f"inventory/users/berlin.yaml:{stray}:{stray_column}: ",
    ]
    env = clean_env(tmp_path)
    validated = run_cli(tmp_path, "validate", "inventory", env=env).stdout.splitlines()
    linted = run_cli(tmp_path, "secrets", "lint", "-i", "inventory", env=env).stdout.splitlines()
    for where in places:
        assert any(x.startswith(where) for x in validated), (where, validated)
        assert any(x.startswith(where) for x in linted), (where, linted)


# --------------------------------------------------------------------------- errors


def test_render_folds_one_template_error_as_validate_does(tmp_path: Path) -> None:
    inventory, _, _ = copy_example(tmp_path)
    templates = inventory / "templates"
    templates.mkdir()
    for source in (ROOT / "templates").glob("*.j2"):
        (templates / source.name).write_text(source.read_text(encoding="utf-8"), "utf-8")
    template = templates / "microsip.ini.j2"
    template.write_text(
        template.read_text(encoding="utf-8") + "; {{ user.nothing.here }}\n", "utf-8"
    )
    env = clean_env(tmp_path)
    validated = run_cli(tmp_path, "validate", "inventory", env=env)
    rendered = run_cli(tmp_path, "render", "inventory", "--out", "out", env=env)
    assert rendered.returncode == validated.returncode == 1
    cause = "has no attribute 'nothing'"
    assert validated.stdout.count(cause) == 1, validated.stdout
    assert rendered.stdout.count(cause) == 1, rendered.stdout
    assert "(and 11 more file(s): " in rendered.stdout
    assert not (tmp_path / "out").exists()


def test_the_cause_comes_before_the_errors_that_follow_from_it(tmp_path: Path) -> None:
    inventory, _, _ = copy_example(tmp_path)
    # A workstation whose name is refused, and a user who names it: the user's file sorts
    # first, but its "unknown workstation" follows from the other file's error.
    workstations = inventory / "workstations.yaml"
    workstations.write_text(
        workstations.read_text(encoding="utf-8").replace(
            "workstations:\n", "workstations:\n  ber-ws-0#9:\n    groups: [site-berlin]\n", 1
        ),
        encoding="utf-8",
    )
    users = inventory / "users" / "berlin.yaml"
    users.write_text(
        users.read_text(encoding="utf-8").replace(
            "    groups: [sales]\n", "    groups: [sales]\n    workstations: [ber-ws-0#9]\n", 1
        ),
        encoding="utf-8",
    )
    env = clean_env(tmp_path)
    for command in (("validate", "inventory"), ("inventory", "list", "-i", "inventory")):
        done = run_cli(tmp_path, *command, env=env)
        shown = done.stdout + done.stderr
        cause = shown.index("/workstations/ber-ws-0#9: names are")
        effect = shown.index("unknown workstation 'ber-ws-0#9'")
        assert cause < effect, (command, shown)


# --------------------------------------------------------------------------- install


def test_the_licence_is_an_spdx_expression() -> None:
    # A TOML table made every install print setuptools' deprecation warning.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]  # SPDX strings need it
    # Every folder of the package is listed: setuptools warns about one that is not.
    listed = set(project["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(path.relative_to(ROOT).parts)
        for path in (ROOT / "provisioner").rglob("*")
        if path.is_dir() and path.name != "__pycache__"
    }
    assert folders <= listed, folders - listed
