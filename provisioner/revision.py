"""Which version of the inventory a run used: its git commit, and whether the files differ.

Layer 1: the standard library and the ``git`` program only. Outside a git working tree, or
without git, a run has no revision; nothing here ever fails a run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

GIT_TIMEOUT_S = 10
DIRTY = "+dirty"
INVENTORY_SUFFIXES = (".yaml", ".yml", ".j2")


def inventory_revision(folder: Path) -> str:
    """``<commit>`` for an inventory in a git working tree, ``<commit>+dirty`` when a file of it
    differs from that commit (or git cannot tell), and ``""`` outside git."""
    git = shutil.which("git")
    if git is None:
        return ""
    commit = _git(git, folder, "rev-parse", "--verify", "--quiet", "HEAD")
    if not commit or not _git(git, folder, "ls-files", "--", "."):
        return ""  # no commit, or a folder git ignores (a copy): no version describes it
    changes = _git(git, folder, "status", "--porcelain", "--ignored=matching", "--", ".")
    if changes is None:
        return commit + DIRTY
    # An ignored file counts only where the inventory would read it (YAML, templates): the
    # lab's files and the like are ignored by design.
    differing = [
        line
        for line in changes.splitlines()
        if not line.startswith("!! ") or line.endswith(INVENTORY_SUFFIXES)
    ]
    return commit + DIRTY if differing else commit


def short(revision: str) -> str:
    """A revision as shown in lists: 12 hex digits and the dirty mark."""
    commit, dirty, _ = revision.partition(DIRTY)
    return commit[:12] + dirty


def _git(git: str, folder: Path, *args: str) -> str | None:
    """The command's output, stripped; None when it failed."""
    try:
        done = subprocess.run(
            [git, "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
