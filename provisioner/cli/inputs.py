"""Reading passphrases and passwords: prompts, files and file descriptors, never argv or env."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, ClassVar

from provisioner.errors import ProvisionerError

if TYPE_CHECKING:
    from provisioner.inventory.model import Secret

_MAX_STDIN = 4096
# A passphrase is one line; reading stops past this many bytes (a file or fd given by mistake,
# such as /dev/zero, must not fill the memory).
MAX_PASSPHRASE = 1024


class InputError(ProvisionerError):
    """A passphrase or password could not be read."""

    code: ClassVar[str] = "input"


def _strip_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def _first_line(handle: BinaryIO, source: str) -> bytes:
    line = handle.readline(MAX_PASSPHRASE + 2)
    if len(_strip_newline(line)) > MAX_PASSPHRASE:
        raise InputError(f"the first line of {source} is longer than {MAX_PASSPHRASE} bytes")
    return _strip_newline(line)


def _read_fd(fd: int) -> bytes:
    with os.fdopen(fd, "rb", closefd=False) as handle:
        return _first_line(handle, f"fd {fd}")


def _read_file(file: Path) -> bytes:
    from provisioner.secrets import secretstore

    with file.open("rb") as handle:
        # Checked on the open file: the name cannot be swapped between the check and the read.
        secretstore.require_owner_only(file, fd=handle.fileno())
        return _first_line(handle, str(file))


def read_passphrase(
    file: Path | None, fd: int | None, *, confirm: bool, prompt: str = "Passphrase"
) -> bytes:
    """A passphrase from a file, a file descriptor, or the terminal (twice when confirming)."""
    if file is not None and fd is not None:
        raise InputError("give a passphrase file or a file descriptor, not both")
    if file is not None:
        try:
            value = _read_file(file)
        except OSError as exc:
            raise InputError(f"cannot read passphrase file {file}: {exc.strerror}") from None
    elif fd is not None:
        try:
            value = _read_fd(fd)
        except OSError as exc:
            raise InputError(f"cannot read passphrase from fd {fd}: {exc.strerror}") from None
    else:
        if not sys.stdin.isatty():
            raise InputError(
                "no terminal to ask for the passphrase; use --passphrase-file or --passphrase-fd"
            )
        first = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} (again): ") != first:
            raise InputError("the passphrases do not match")
        value = first.encode("utf-8")
    if not value:
        raise InputError("the passphrase is empty")
    if confirm and len(value) < 12:
        raise InputError("use a passphrase of at least 12 characters (6 diceware words is better)")
    return value


def read_new_password(*, from_stdin: bool) -> Secret:
    """The new password from the terminal (asked twice, no echo) or one line of stdin."""
    from provisioner.inventory.model import Secret

    if from_stdin or not sys.stdin.isatty():
        # All of stdin, one trailing newline dropped: an embedded CR or LF must reach the
        # policy check instead of silently cutting the password short.
        data = sys.stdin.buffer.read(_MAX_STDIN + 1)
        if len(data) > _MAX_STDIN:
            raise InputError("the password on stdin is too long")
        try:
            text = _strip_newline(data).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("the password on stdin is not UTF-8") from None
        if not text:
            raise InputError("no password on stdin")
        return Secret(text)
    first = getpass.getpass("New password: ")
    if getpass.getpass("New password (again): ") != first:
        raise InputError("the passwords do not match")
    return Secret(first)
