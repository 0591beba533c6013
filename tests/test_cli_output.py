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
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.lab.faults import Faults
from tests.labkit import ExampleLab, clean_env, copy_example, example_lab

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
