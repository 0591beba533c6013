"""Which version of the inventory a run used: its git commit, and whether the files differ.

Layer 1: the standard library and the ``git`` program only. Outside a git working tree, or
without git, a run has no revision; nothing here ever fails a run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath

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
    prefix = _git(git, folder, "rev-parse", "--show-prefix") or ""
    # Every untracked and ignored file listed one by one, whatever the repository's settings;
    # no index refresh (a check must not take git's lock from under the user's commit).
    changes = _git(
        git,
        folder,
        "status",
        "--porcelain",
        "-z",
        "--ignored=traditional",
        "--untracked-files=all",
        "--",
        ".",
        strip=False,
    )
    if changes is None:
        return commit + DIRTY
    for entry in changes.split("\0"):
        if not entry:
            continue
        if not entry.startswith("!! ") or _read_by_the_load(entry[3:], prefix):
            return commit + DIRTY
    return commit


def short(revision: str) -> str:
    """A revision as shown in lists: 12 hex digits and the dirty mark."""
    commit, dirty, _ = revision.partition(DIRTY)
    return commit[:12] + dirty


def _read_by_the_load(path: str, prefix: str) -> bool:
    """An ignored file counts where the inventory would read it: YAML or a template, not a
    dotfile (the lab's ``.lab.json`` and the like are ignored by design)."""
    relative = PurePosixPath(path.removeprefix(prefix))
    hidden = any(part.startswith(".") for part in relative.parts)
    return relative.suffix in INVENTORY_SUFFIXES and not hidden


def _git(git: str, folder: Path, *args: str, strip: bool = True) -> str | None:
    """The command's output (stripped); None when it failed."""
    try:
        done = subprocess.run(
            [git, "--no-optional-locks", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() if strip else done.stdout
