"""Where the state folder is: per user and per realm by default, never where git commits it.

The commands run from the shell, against a copy of the example inventory in a git repository,
as a helpdesk or an admin would run them.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from provisioner import atomicfile
from provisioner.errors import UsageError
from provisioner.records import revision, state
from tests.labkit import clean_env, copy_example, default_state, run_cli

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

EXIT_USAGE = 2


def git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True)
    return done.stdout


def _repository(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A repository holding the example inventory (committed), and a HOME outside it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    inventory, _, _ = copy_example(repo)
    shutil.rmtree(inventory / ".demo-key")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "inventory")
    home = tmp_path / "home"
    home.mkdir()
    return repo, inventory, clean_env(home)


def _set_password(repo: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        repo,
        *("user", "set-password", "alice", "-i", "inventory", "--stdin", *extra),
        env=env,
        stdin="a new SIP password\n",
    )


def _untracked(repo: Path) -> list[str]:
    return [
        line[3:]
        for line in git(repo, "status", "--porcelain", "-uall").splitlines()
        if "??" in line
    ]


@needs_git
def test_set_password_keeps_its_audit_record_outside_the_repository(tmp_path: Path) -> None:
    repo, _, env = _repository(tmp_path)
    home = Path(env["HOME"])
    done = _set_password(repo, env)
    assert done.returncode == 0, done.stderr
    # The change to the inventory is the only change git sees: no audit log, no lock.
    assert _untracked(repo) == []
    assert [line[3:] for line in git(repo, "status", "--porcelain").splitlines()] == [
        "inventory/users/berlin.yaml"
    ]
    folder = default_state(home)
    assert folder == home / ".local/state/microsip-provisioner/example-voip"
    assert "set-password" in (folder / state.AUDIT_NAME).read_text(encoding="utf-8")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    listed = run_cli(repo, "audit", "-i", "inventory", env=env)
    assert "set-password" in listed.stdout and "1 record(s)" in listed.stdout


@needs_git
def test_xdg_state_home_is_honoured_and_each_realm_has_its_folder(tmp_path: Path) -> None:
    repo, inventory, env = _repository(tmp_path)
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    assert _set_password(repo, env).returncode == 0
    # A second realm: the same inventory under another name.
    other = repo / "other"
    shutil.copytree(inventory, other)
    recipients = other / "recipients.yaml"
    recipients.write_text(
        recipients.read_text(encoding="utf-8").replace("realm: example-voip", "realm: other-voip"),
        encoding="utf-8",
    )
    done = run_cli(
        repo,
        *("user", "set-password", "bob", "-i", "other", "--stdin"),
        env=env,
        stdin="another SIP password\n",
    )
    assert done.returncode == 0, done.stderr
    base = tmp_path / "xdg" / "microsip-provisioner"
    assert sorted(p.name for p in base.iterdir()) == ["example-voip", "other-voip"]
    assert "alice" in (base / "example-voip" / state.AUDIT_NAME).read_text(encoding="utf-8")
    assert "bob" in (base / "other-voip" / state.AUDIT_NAME).read_text(encoding="utf-8")
    assert not (Path(env["HOME"]) / ".local").exists()


def test_a_realm_becomes_a_safe_folder_name() -> None:
    assert state.folder_name("acme-voip") == "acme-voip"
    odd = [state.folder_name(realm) for realm in ("../etc", "..", "a/b", "a\\b", "Acme", "acme")]
    for name in odd:
        assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert len(set(odd)) == len(odd)  # realms that differ keep apart
    assert state.default_directory(Path("/s"), "acme-voip") == Path(
        "/s/microsip-provisioner/acme-voip"
    )


@needs_git
@pytest.mark.parametrize("given", ["option", "environment"])
def test_a_state_folder_git_would_commit_is_refused(tmp_path: Path, given: str) -> None:
    repo, inventory, env = _repository(tmp_path)
    before = (inventory / "users/berlin.yaml").read_bytes()
    extra: tuple[str, ...] = ()
    if given == "option":
        extra = ("--state", "state")
    else:
        env["PROVISIONER_STATE"] = str(repo / "state")
    refused = _set_password(repo, env, *extra)
    assert refused.returncode == EXIT_USAGE, (refused.stdout, refused.stderr)
    assert refused.stderr.startswith("error: the state folder ")
    assert "inside the git working tree" in refused.stderr and ".gitignore" in refused.stderr
    # Refused before anything was written.
    assert (inventory / "users/berlin.yaml").read_bytes() == before
    assert not (repo / "state").exists()
    assert _untracked(repo) == []
    # Reading is refused alike: the folder is the same.
    listed = run_cli(repo, "runs", "list", "-i", "inventory", *extra, env=env)
    assert listed.returncode == EXIT_USAGE


@needs_git
def test_a_state_folder_git_ignores_is_used(tmp_path: Path) -> None:
    repo, _, env = _repository(tmp_path)
    # A folder-only pattern, and the folder does not exist yet.
    (repo / ".gitignore").write_text("state/\n", encoding="utf-8")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore the state")
    old_umask = os.umask(0o022)
    try:
        done = _set_password(repo, env, "--state", "state")
    finally:
        os.umask(old_umask)
    assert done.returncode == 0, done.stderr
    assert (repo / "state" / state.AUDIT_NAME).is_file()
    assert stat.S_IMODE((repo / "state").stat().st_mode) == 0o700
    assert _untracked(repo) == []


@needs_git
def test_commands_that_only_read_create_no_state_folder(tmp_path: Path) -> None:
    repo, _, env = _repository(tmp_path)
    for command in (
        ("runs", "list"),
        ("runs", "list", "--json"),
        ("audit",),
        ("user", "show", "alice"),
        ("inventory", "list"),
    ):
        done = run_cli(repo, *command, "-i", "inventory", env=env)
        assert done.returncode == 0, (command, done.stderr)
    assert run_cli(repo, "runs", "list", "-i", "inventory", "--json", env=env).stdout == "[]\n"
    unknown = run_cli(repo, "runs", "show", "abc", "-i", "inventory", env=env)
    assert unknown.returncode == 1 and "abc" in unknown.stderr
    assert not (Path(env["HOME"]) / ".local").exists()
    assert _untracked(repo) == []


def test_a_store_opened_for_reading_reads_empty_and_records_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "absent"
    store = state.StateStore(folder, create=False)
    assert store.runs() == [] and store.latest_run() is None
    with pytest.raises(state.StateError, match="no rollout is recorded"):
        store.hosts_to_retry()
    with pytest.raises(state.StateError, match="does not exist"):
        store.finish_run("abc", "")
    assert not folder.exists()


def test_a_link_in_place_of_the_state_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "state"
    link.symlink_to(elsewhere)
    with pytest.raises(state.StateError, match="symbolic link"):
        state.StateStore(link)
    with pytest.raises(state.StateError, match="symbolic link"):
        state.AuditLog(link).append([_record()])
    assert list(elsewhere.iterdir()) == []


def _record() -> state.AuditRecord:
    return state.AuditRecord.now(
        who="t", action="set-password", user="alice", file="f", status="changed", message="m"
    )


def test_a_private_folder_is_made_with_its_parents_and_its_mode(tmp_path: Path) -> None:
    old_umask = os.umask(0o002)
    try:
        target = tmp_path / "a" / "b" / "c"
        assert atomicfile.make_private_folder(target) is True
        assert atomicfile.make_private_folder(target) is False
    finally:
        os.umask(old_umask)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(atomicfile.UnsafeTreeError):
        atomicfile.make_private_folder(tmp_path / "file")


@needs_git
def test_git_is_asked_about_the_files_a_folder_will_hold(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("ignored/\n", encoding="utf-8")
    assert revision.work_tree(tmp_path / "x" / "y") == tmp_path.resolve()
    assert revision.work_tree(tmp_path.parent) is None
    kept = [tmp_path / "kept" / "a", tmp_path / "ignored" / "a"]
    assert revision.not_ignored(tmp_path, kept) == [tmp_path / "kept" / "a"]
    with pytest.raises(UsageError):
        state.check_location(tmp_path / "kept")
    state.check_location(tmp_path / "ignored")
    state.check_location(tmp_path.parent / "outside")
