"""Which version of the inventory a run used: its git commit, and whether the files differ.

Layer 1: the standard library and the ``git`` program only. Outside a git working tree, or
without git, a run has no revision; nothing here ever fails a run. Also the one place that asks
git whether files would be committed (rendered files, the state folder).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

GIT_TIMEOUT_S = 10
# check-ignore may be given every file of a large render at once.
CHECK_IGNORE_TIMEOUT_S = 60
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


def work_tree(path: Path) -> Path | None:
    """The top of the git working tree that holds ``path`` (which need not exist yet), or
    None. Found by its ``.git`` (a folder, or a file in a linked worktree): no git needed."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    return next((p for p in (probe, *probe.parents) if (p / ".git").exists()), None)


def not_ignored(top: Path, paths: Sequence[Path]) -> list[Path]:
    """Those of ``paths`` (inside the working tree ``top``) that git does not ignore: what
    ``git add -A`` would commit once they exist. All of them when git cannot tell.

    Ask about files, not their folder: a pattern such as ``build/`` matches a folder only once
    it exists, but always matches the files below it.
    """
    if not paths:
        return []
    git = shutil.which("git")
    if git is None:
        return list(paths)
    names = [str(path.resolve()) for path in paths]
    done = _run(
        git,
        top,
        "check-ignore",
        "--stdin",
        "-z",
        input="\0".join(names),
        timeout=CHECK_IGNORE_TIMEOUT_S,
    )
    # Exit 0: some are ignored; 1: none is; anything else: git could not tell.
    if done is None or done.returncode not in (0, 1):
        return list(paths)
    ignored = set(done.stdout.split("\0"))
    return [path for path, name in zip(paths, names, strict=True) if name not in ignored]


def _run(
    git: str, folder: Path, *args: str, input: str | None = None, timeout: float = GIT_TIMEOUT_S
) -> subprocess.CompletedProcess[str] | None:
    """The finished command (whatever its exit code); None when it could not run."""
    try:
        return subprocess.run(
            [git, "--no-optional-locks", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None


def _git(git: str, folder: Path, *args: str, strip: bool = True) -> str | None:
    """The command's output (stripped); None when it failed."""
    done = _run(git, folder, *args)
    if done is None or done.returncode != 0:
        return None
    return done.stdout.strip() if strip else done.stdout
