"""Write files so that readers see the old content or the new one, never a mix."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import ClassVar

from provisioner.errors import ProvisionerError


def write_atomic(
    path: Path, data: bytes, *, mode: int | None = None, force_mode: bool = False
) -> None:
    """Replace ``path`` with ``data`` through a temp file in the same folder and os.replace.

    Keeps the file's permission bits when it exists, unless ``force_mode``; ``mode`` applies
    to new files (default 0o600, because what we write is often sensitive).
    """
    directory = path.parent
    keep = 0o600 if mode is None else mode
    if not force_mode:
        with contextlib.suppress(FileNotFoundError):
            keep = stat.S_IMODE(path.stat().st_mode)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, keep)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def create_exclusive(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create a new file with ``mode``; refuse to overwrite an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def create_once(path: Path, data: bytes) -> bool:
    """Create ``path`` (mode 0600) holding ``data``, unless it exists; True when this call did.

    Written whole under a temp name, then linked in: a concurrent reader sees no file or the
    whole file, never a part, and of two creators the first link wins.
    """
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
    finally:
        os.unlink(temp)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class UnsafeTreeError(ProvisionerError):
    """A file of a tree would be written through a link or outside its root."""

    code: ClassVar[str] = "unsafe-path"


class TreeWriteError(ProvisionerError):
    """A file of a tree could not be written; the message names it and the system's reason."""

    code: ClassVar[str] = "write"


def _parts(relative: str) -> list[str]:
    """The names of ``relative`` (``/``-separated), each a plain name inside the root."""
    parts = relative.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\\" in part or "\x00" in part or ":" in part:
            raise UnsafeTreeError(
                f"{relative!r} is not a plain relative path: it could reach outside the folder"
            )
    return parts


def write_tree(
    root: Path, files: Iterable[tuple[str, bytes]], *, mode: int = 0o600, dir_mode: int = 0o700
) -> None:
    """Write each ``(relative path, data)`` below ``root``, never outside it.

    Folders are created with ``dir_mode`` and existing ones inside ``root`` are set to it;
    each file is replaced atomically with ``mode``. No symbolic link below ``root`` is
    followed (a link where a folder or a file should be is an error, and it is left alone),
    no permission outside ``root`` is changed, and nothing is removed but this call's own temp
    files. ``root`` itself is created if needed and may be a link. A file the system refuses
    (no space, no permission) raises :class:`TreeWriteError` naming it.
    """
    relative = ""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=dir_mode)
        with _tree_writer(root, mode=mode, dir_mode=dir_mode) as write:
            for relative, data in files:
                write(relative, data)
    except OSError as exc:
        where = root / relative if relative else root
        raise TreeWriteError(f"cannot write {where}: {exc.strerror or exc}") from exc


# Folder file descriptors with O_NOFOLLOW make every step of a path safe from a link swapped
# in at any time; without them (Windows) the names are checked just before use.
_SAFE_DIR_FD = (
    os.open in os.supports_dir_fd
    and os.mkdir in os.supports_dir_fd
    and hasattr(os, "O_NOFOLLOW")
    and hasattr(os, "O_DIRECTORY")
)
# What opening a link with O_NOFOLLOW, or a non-folder with O_DIRECTORY, fails with: ELOOP
# (Linux, macOS), EMLINK (FreeBSD), EFTYPE (NetBSD), ENOTDIR.
_NOT_A_FOLDER = {
    errno.ELOOP,
    errno.EMLINK,
    errno.ENOTDIR,
    *((errno.EFTYPE,) if hasattr(errno, "EFTYPE") else ()),
}


@contextlib.contextmanager
def _tree_writer(root: Path, *, mode: int, dir_mode: int) -> Iterator[Callable[[str, bytes], None]]:
    """A function writing one file below ``root``; what it holds open is closed at the end."""
    if not _SAFE_DIR_FD:
        yield functools.partial(_write_by_name, root, mode=mode, dir_mode=dir_mode)
        return
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    # Only the folders of the path in hand stay open, from the root down: one descriptor per
    # folder of the whole tree would run out of descriptors on a large fleet.
    opened: list[tuple[str, int]] = []

    def write(relative: str, data: bytes) -> None:
        parts = _parts(relative)
        shared = 0
        while shared < min(len(opened), len(parts) - 1) and opened[shared][0] == parts[shared]:
            shared += 1
        _close_below(opened, shared)
        for name in parts[shared:-1]:
            parent = opened[-1][1] if opened else root_fd
            opened.append((name, _open_folder(parent, name, relative, dir_mode)))
        _replace_in(opened[-1][1] if opened else root_fd, parts[-1], data, mode, relative)

    try:
        yield write
    finally:
        _close_below(opened, 0)
        os.close(root_fd)


def _close_below(opened: list[tuple[str, int]], depth: int) -> None:
    """Close the open folders deeper than ``depth``, deepest first."""
    while len(opened) > depth:
        os.close(opened.pop()[1])


def make_private_folder(path: Path, *, mode: int = 0o700) -> bool:
    """Create the folder ``path`` with ``mode``, its missing parents too; True when this call
    created it.

    A folder already there keeps its permissions. A symbolic link or anything but a folder
    standing at ``path`` is left alone and refused (:class:`UnsafeTreeError`): the folder is
    never created or used at the place a link points to.
    """
    path = Path(os.path.abspath(path))
    for parent in reversed([path.parent, *path.parent.parents]):
        if not parent.exists():
            parent.mkdir(mode=mode, exist_ok=True)
    refused = UnsafeTreeError(
        f"{path} is a symbolic link or not a folder (left as it is; remove it or choose "
        "another folder)"
    )
    if not _SAFE_DIR_FD:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise refused
        created = not path.exists()
        path.mkdir(mode=mode, exist_ok=True)
        if created:
            path.chmod(mode)
        return created
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        created = True
        try:
            os.mkdir(path.name, mode, dir_fd=parent_fd)
        except FileExistsError:
            created = False
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno not in _NOT_A_FOLDER:
                raise
            raise refused from exc
        try:
            if created:
                os.fchmod(fd, mode)  # mkdir's mode went through the umask
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)
    return created


def _open_folder(parent: int, name: str, relative: str, dir_mode: int) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, dir_mode, dir_fd=parent)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in _NOT_A_FOLDER:
            raise
        raise UnsafeTreeError(
            f"cannot write {relative}: {name!r} is a symbolic link or not a folder "
            "(left as it is; remove it or choose another folder)"
        ) from exc
    try:
        os.fchmod(fd, dir_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _replace_in(folder: int, name: str, data: bytes, mode: int, relative: str) -> None:
    try:
        existing = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        raise UnsafeTreeError(
            f"cannot write {relative}: a symbolic link or another non-file stands there "
            "(left as it is; remove it or choose another folder)"
        )
    temp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed or widened it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # rename replaces a link or file standing at ``name`` itself, never what a link names.
        os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=folder)
        raise
    with contextlib.suppress(OSError):
        os.fsync(folder)


def _write_by_name(root: Path, relative: str, data: bytes, *, mode: int, dir_mode: int) -> None:
    parts = _parts(relative)
    folder = root
    for part in parts[:-1]:
        folder = folder / part
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise UnsafeTreeError(
                f"cannot write {relative}: {part!r} is a symbolic link or not a folder"
            )
        folder.mkdir(exist_ok=True, mode=dir_mode)
        folder.chmod(dir_mode)
    target = folder / parts[-1]
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise UnsafeTreeError(f"cannot write {relative}: a symbolic link stands there")
    write_atomic(target, data, mode=mode, force_mode=True)
