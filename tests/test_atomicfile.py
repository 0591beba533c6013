"""Atomic files and trees of files: what the system refuses is a clear error, never a crash."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from provisioner.atomicfile import TreeWriteError, create_once, write_atomic, write_tree
from tests.labkit import clean_env
from tests.phase1kit import BASE, write_inventory

POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptor limits")


def _limited(tmp_path: Path, limit: int, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter allowed ``limit`` open descriptors (numbers below it)."""
    script = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, resource.getrlimit("
        "resource.RLIMIT_NOFILE)[1]))\n" + textwrap.dedent(code)
    )
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(tmp_path),
        timeout=120,
        check=False,
    )


@POSIX_ONLY
def test_a_tree_of_more_folders_than_descriptors_is_written(tmp_path: Path) -> None:
    # 300 workstations with a user each: 600 folders below a process allowed 32 descriptors.
    out = tmp_path / "out"
    result = _limited(
        tmp_path,
        32,
        """
        from pathlib import Path
        from provisioner.atomicfile import write_tree
        files = []
        for n in range(300):
            files += [(f"ws{n}/u{n}/microsip.ini", b"user"), (f"ws{n}/override.ini", b"ws")]
        write_tree(Path(sys.argv[1]), files)
        """,
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert len([p for p in out.iterdir() if p.is_dir()]) == 300
    assert (out / "ws299" / "u299" / "microsip.ini").read_bytes() == b"user"
    assert (out / "ws0" / "override.ini").read_bytes() == b"ws"


@POSIX_ONLY
def test_render_out_of_a_large_fleet_under_a_low_descriptor_limit(tmp_path: Path) -> None:
    # Each file's folders were kept open until the end: exit 70 once the fleet had more
    # folders than the process may open descriptors.
    hosts = "".join(f"  ws{n}:\n    users: [u1]\n" for n in range(60))
    root = write_inventory(
        tmp_path / "inv", {**BASE, "workstations.yaml": f"workstations:\n{hosts}"}
    )
    out = tmp_path / "out"
    result = _limited(
        tmp_path,
        40,
        """
        import runpy
        sys.argv = ["provisioner", *sys.argv[1:]]
        runpy.run_module("provisioner.cli", run_name="__main__")
        """,
        "render",
        str(root),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "120 files" in result.stdout
    assert len(list(out.glob("ws*/u1/microsip.ini"))) == 60


@POSIX_ONLY
def test_a_folder_the_system_cannot_open_is_not_called_a_link(tmp_path: Path) -> None:
    # Every descriptor but one in use: the root takes it, the folder below cannot be opened.
    # That is the system's refusal, said as such, not "a symbolic link or not a folder".
    result = _limited(
        tmp_path,
        64,
        """
        import os
        from pathlib import Path
        from provisioner.atomicfile import TreeWriteError, write_tree
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            os.close(held.pop())
        try:
            write_tree(Path(sys.argv[1]), [("ws1/override.ini", b"x")])
        except TreeWriteError as exc:
            print(exc)
        """,
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert result.stdout.strip() == f"cannot write {out / 'ws1/override.ini'}: Too many open files"


def test_what_the_system_refuses_names_the_file_and_the_reason(tmp_path: Path) -> None:
    out = tmp_path / "out"
    long = "w" * 300
    with pytest.raises(TreeWriteError) as caught:
        write_tree(out, [(f"{long}/override.ini", b"x")])
    assert str(caught.value).startswith(f"cannot write {out / long / 'override.ini'}: ")
    assert "too long" in str(caught.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TreeWriteError, match=f"cannot write {blocker / 'out'}: "):
        write_tree(blocker / "out", [("ws1/override.ini", b"x")])


def test_files_of_one_folder_out_of_order_are_all_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = [("a/1/x", b"1"), ("b/y", b"2"), ("a/z", b"3"), ("a/1/w", b"4"), ("top", b"5")]
    write_tree(out, files)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == {
        "a/1/x": b"1",
        "b/y": b"2",
        "a/z": b"3",
        "a/1/w": b"4",
        "top": b"5",
    }
    assert len(os.listdir(out)) == 3
    assert stat.S_IMODE((out / "a" / "1").stat().st_mode) == 0o700


def test_write_atomic_keeps_a_mode_or_forces_one(tmp_path: Path) -> None:
    path = tmp_path / "file"
    write_atomic(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    write_atomic(path, b"kept")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_atomic(path, b"forced", mode=0o600, force_mode=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"forced"


def test_the_tree_by_name_never_shows_a_file_with_its_old_looser_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where folders cannot be opened without following links (Windows), files are written by
    # name: the new content must not appear, even briefly, with the old file's mode.
    from provisioner import atomicfile

    monkeypatch.setattr(atomicfile, "_SAFE_DIR_FD", False)
    out = tmp_path / "out"
    (out / "ws1").mkdir(parents=True)
    (out / "ws1" / "override.ini").write_bytes(b"old")
    (out / "ws1" / "override.ini").chmod(0o644)
    seen: list[int] = []
    real_replace = os.replace

    def spy(source: str, target: str | os.PathLike[str]) -> None:
        seen.append(stat.S_IMODE(os.stat(source).st_mode))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    write_tree(out, [("ws1/override.ini", b"new")])
    assert seen == [0o600]
    assert (out / "ws1" / "override.ini").read_bytes() == b"new"
    assert stat.S_IMODE((out / "ws1" / "override.ini").stat().st_mode) == 0o600


def test_create_once_keeps_the_first_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    assert create_once(path, b"first") is True
    assert create_once(path, b"second") is False
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["key"]
    if sys.platform != "win32":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
