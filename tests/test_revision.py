"""The inventory's git commit as a run records it, with a real git in a temporary folder."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from provisioner.records import revision

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_folder_with_spaces_and_an_ignored_yaml_file_in_it(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    inventory = tmp_path / "inv dir"
    inventory.mkdir()
    (inventory / "a.yaml").write_text("users: {}\n")
    (tmp_path / ".gitignore").write_text("/inv dir/*.local.yaml\n")
    commit = commit_all(tmp_path, "first")
    assert revision.inventory_revision(inventory) == commit
    (inventory / "c.local.yaml").write_text("groups: {}\n")
    assert revision.inventory_revision(inventory) == commit + "+dirty"


def commit_all(repo: Path, message: str) -> str:
    """Commit every file of ``repo``; the new commit."""
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def test_outside_git_there_is_no_revision(tmp_path: Path) -> None:
    assert revision.inventory_revision(tmp_path) == ""
    assert revision.inventory_revision(tmp_path / "missing") == ""


def test_the_commit_and_whether_the_inventory_differs_from_it(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    (inventory / "users.yaml").write_text("users: {}\n")
    (tmp_path / "notes.txt").write_text("outside the inventory\n")
    assert revision.inventory_revision(inventory) == ""  # no commit yet
    commit = commit_all(tmp_path, "first")
    assert revision.inventory_revision(inventory) == commit
    (tmp_path / "notes.txt").write_text("changed, but not in the inventory\n")
    assert revision.inventory_revision(inventory) == commit
    (inventory / "users.yaml").write_text("users: {alice: {}}\n")
    assert revision.inventory_revision(inventory) == commit + "+dirty"
    git(tmp_path, "checkout", "-q", "--", ".")
    (inventory / "new.yaml").write_text("groups: {}\n")  # untracked: the load reads it too
    assert revision.inventory_revision(inventory) == commit + "+dirty"
    (inventory / "new.yaml").unlink()
    (tmp_path / ".gitignore").write_text("/inventory/.lab.json\n/inventory/local.yaml\n/copy/\n")
    commit = commit_all(tmp_path, "ignore")
    (inventory / ".lab.json").write_text("{}")  # ignored, and not read by the load
    assert revision.inventory_revision(inventory) == commit
    (inventory / "local.yaml").write_text("groups: {}\n")  # ignored, but the load reads it
    assert revision.inventory_revision(inventory) == commit + "+dirty"
    (inventory / "local.yaml").unlink()
    ignored = inventory / "ign"  # an ignored folder the load would still read
    (tmp_path / ".gitignore").write_text("/inventory/.lab.json\n/inventory/ign/\n/copy/\n")
    ignored.mkdir()
    (ignored / "more.yaml").write_text("groups: {}\n")
    commit = commit_all(tmp_path, "ignore a folder")
    assert revision.inventory_revision(inventory) == commit + "+dirty"
    shutil.rmtree(ignored)
    assert revision.inventory_revision(inventory) == commit
    git(tmp_path, "config", "status.showUntrackedFiles", "no")  # a repository's own setting
    assert revision.inventory_revision(inventory) == commit
    (inventory / "new.yaml").write_text("groups: {}\n")
    assert revision.inventory_revision(inventory) == commit + "+dirty"
    (inventory / "new.yaml").unlink()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "users.yaml").write_text("users: {}\n")
    assert revision.inventory_revision(copy) == ""  # an ignored copy: no commit describes it
    assert revision.short(commit + "+dirty") == commit[:12] + "+dirty"
    assert revision.short(commit) == commit[:12]
