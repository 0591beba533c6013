"""Hostile YAML files, and the real CLI in a child process whose memory is limited: shared by
the hostile-input tests and ``bench/hostile_bench.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The child's address-space limit: far above a command's needs, far below the machine's memory.
MEMORY_LIMIT = 1024**3


def billion_laughs() -> str:
    """Twelve lines, 700 bytes: a0 is 10 values, each line repeats the previous one 10 times."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "users:\n  u9:\n    description: see below\n" + "\n".join(lines) + "\n"


# name -> (file text, line the message must name)
HOSTILE: dict[str, tuple[str, int]] = {
    "laughs": (billion_laughs(), 14),
    "recursive-alias": ("users: &u\n  u9: *u\n", 1),
    "recursive-list": ("groups:\n  g9:\n    parents: &p [*p]\n", 3),
    # 200 KB: deeper than ruamel's C composer survives (it segfaulted past 26,000 levels).
    "deep-flow": ("users:\n  u9: " + "[" * 100_000 + "]" * 100_000 + "\n", 2),
    # 4 KB: composed safely, refused while walking.
    "deep-flow-small": ("users:\n  u9: " + "{a: " * 1000 + "x" + "}" * 1000 + "\n", 2),
    "deep-block": ("- " * 30_000 + "x\n", 1),
    # libyaml refuses the ':' in a flow scalar, so ruamel's pure parser reads the file; its
    # scanner took seconds per thousand open '['.
    "deep-flow-fallback": ("a: {b: c:d}\nusers: " + "[" * 5_000 + "]" * 5_000 + "\n", 2),
}


def limited_cli(limit: int = MEMORY_LIMIT) -> list[str]:
    """The command line of the real CLI (its arguments follow) with its address space limited
    to ``limit`` bytes."""
    start = (
        "import resource, runpy, sys;"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}));"
        "sys.argv = ['provisioner', *sys.argv[1:]];"
        "runpy.run_module('provisioner.cli', run_name='__main__')"
    )
    return [sys.executable, "-c", start]


def cli_environment(cwd: Path) -> dict[str, str]:
    """A plain environment for the CLI, with its home and configuration inside ``cwd``."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "XDG_CONFIG_HOME": str(cwd / "config"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run_limited(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child whose address space is limited to MEMORY_LIMIT."""
    return subprocess.run(
        [*limited_cli(), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=cli_environment(cwd),
        timeout=120,  # a safety net only: each run takes about a second
        check=False,
    )
