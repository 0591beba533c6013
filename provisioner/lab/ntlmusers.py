"""The NTLM credential file that pyspnego's acceptor reads, shared by every lab of the process.

pyspnego finds the accounts an NTLM acceptor may authenticate through the environment
variable ``NTLM_USER_FILE``, read when the context is created *and* again when the
AUTHENTICATE message is checked. Flipping that variable per request would race between
threads, so the variable is set once for the process, under a lock, by the first lab that
registers NTLM accounts; it points to one file in a private temp folder (0700; the file is
0600), created in the system's temporary folder or in the folder given to :func:`use_folder`
(``provisioner lab up`` gives its own private folder, so that ``lab down`` removes it with the
rest whatever state the lab died in). The file holds the union of the accounts of every
registered host, one smbpasswd line each (``[DOMAIN\\]USER:0:LM_HASH:NT_HASH:[U]:LCT-00000000``)
with the NT hash only: the LM field is 32 zeros, which pyspnego takes as "no LM hash" (NTLMv2
never uses it; an LM hash falls to a dictionary in minutes). The password itself is never
written: with a password line pyspnego would derive the hashes on every authentication, and a
reader of the folder would see it. A new account is appended; the file is replaced
atomically only when an account comes back with another password (accounts of hosts that are
gone stay until the last release, which is harmless). The lab then checks that the
authenticated user is an account of the host that was contacted. One consequence: two hosts of
one process may not give the same account different passwords (``register`` raises
``ValueError``). When the last registration is released the variable gets its previous value
back and the folder is removed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

_crypto: ModuleType | None
try:  # pyspnego's own hash functions; private, so a later release may move them
    from spnego._ntlm_raw import crypto as _crypto
except ImportError:  # pragma: no cover - depends on the installed pyspnego
    _crypto = None

ENV_VAR = "NTLM_USER_FILE"

Account = tuple[str, str]
"""(DOMAIN upper-cased or "", user upper-cased): how pyspnego matches accounts."""


def split_account(user: str) -> tuple[str, str]:
    """``DOMAIN\\user`` -> (DOMAIN, user); ``user`` and ``user@realm`` have no domain."""
    domain, sep, name = user.partition("\\")
    return (domain, name) if sep else ("", user)


def account_key(user: str) -> Account:
    """The case-insensitive key pyspnego uses for ``user``."""
    domain, name = split_account(user)
    return domain.upper(), name.upper()


NO_LM_HASH = "0" * 32
"""The LM field of every line: pyspnego reads it as 16 zero bytes, the documented "no LM hash"."""


def _smbpasswd_line(user: str, password: str) -> str:
    if _crypto is None:
        # pyspnego would also read the password itself, but the file must never hold it.
        raise RuntimeError(
            "this pyspnego release has no spnego._ntlm_raw.crypto.ntowfv1; the lab will not "
            "write NTLM passwords to disk in the clear"
        )
    nt_hash = _crypto.ntowfv1(password).hex().upper()
    return f"{user}:0:{NO_LM_HASH}:{nt_hash}:[U]:LCT-00000000\n"


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[int, dict[Account, tuple[str, str]]] = {}
        # Running views of the owners, so that a registration costs O(its accounts), not
        # O(every host): live accounts with their password and owner count, and the line of
        # each account the file holds.
        self._live: dict[Account, tuple[str, int]] = {}
        self._written: dict[Account, tuple[str, str]] = {}
        self._folder: Path | None = None
        self._previous: str | None = None
        self._published = False
        self._tokens = itertools.count(1)
        self.parent: Path | None = None

    def register(self, credentials: Mapping[str, str]) -> int:
        with self._lock:
            entries = {
                account_key(user): (user, password) for user, password in credentials.items()
            }
            for key, (user, password) in entries.items():
                live = self._live.get(key)
                if live is not None and live[0] != password:
                    raise ValueError(
                        f"NTLM account {user!r} already has another password in this process; "
                        "lab hosts that accept NTLM must agree on each account's password"
                    )
            owner = next(self._tokens)
            self._owners[owner] = entries
            for key, (_, password) in entries.items():
                count = self._live.get(key, (password, 0))[1]
                self._live[key] = (password, count + 1)
            stale = [k for k, (_, pw) in entries.items() if self._written.get(k, ("", pw))[0] != pw]
            new = [k for k in entries if k not in self._written]
            if stale:
                self._rewrite()
            elif new:
                self._append({key: entries[key] for key in new})
            return owner

    def release(self, owner: int) -> None:
        with self._lock:
            entries = self._owners.pop(owner, None)
            if entries is None:
                return
            for key in entries:
                password, count = self._live[key]
                if count > 1:
                    self._live[key] = (password, count - 1)
                else:
                    del self._live[key]
            if self._owners:
                return
            if self._previous is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = self._previous
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
            self._previous = None
            self._written.clear()

    def _path(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="microsip-lab-ntlm-", dir=self.parent))
            self._previous = os.environ.get(ENV_VAR)
            self._published = False
        return self._folder / "users"

    def _publish(self, path: Path) -> None:
        if not self._published:
            self._published = True
            os.environ[ENV_VAR] = str(path)

    def _append(self, entries: Mapping[Account, tuple[str, str]]) -> None:
        path = self._path()
        lines = []
        for key, (user, password) in entries.items():
            line = _smbpasswd_line(user, password)
            self._written[key] = (password, line)
            lines.append(line)
        # One write of whole lines: a concurrent reader sees at most a partial last line,
        # which names an account whose host is not listening yet.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, "".join(lines).encode("utf-8"))
        finally:
            os.close(fd)
        self._publish(path)

    def _rewrite(self) -> None:
        path = self._path()
        written: dict[Account, tuple[str, str]] = {}
        for entries in self._owners.values():
            for key, (user, password) in entries.items():
                known = self._written.get(key)
                line = known[1] if known and known[0] == password else None
                written[key] = (password, line or _smbpasswd_line(user, password))
        assert self._folder is not None  # noqa: S101 - _path() created it
        fd, temp = tempfile.mkstemp(dir=self._folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(line for _, line in written.values())
        os.replace(temp, path)
        self._written = written
        self._publish(path)


_REGISTRY = _Registry()


def register(credentials: Mapping[str, str]) -> int:
    """Add ``credentials`` (user -> password) to the process file; returns a release token."""
    for user, password in credentials.items():
        if ":" in user or ":" in password or "\n" in user + password:
            raise ValueError(f"NTLM account {user!r}: ':' and newlines cannot be stored")
    return _REGISTRY.register(credentials)


def use_folder(parent: Path | None) -> None:
    """Create this process's next NTLM folder in ``parent`` (None: the system's temp folder).

    The folder in use, if any, stays where it is until its last registration is released.
    """
    _REGISTRY.parent = parent


def current_file() -> Path | None:
    """The file this process's acceptors read now (None before the first registration)."""
    with _REGISTRY._lock:
        folder = _REGISTRY._folder
    return None if folder is None else folder / "users"


def release(token: int) -> None:
    """Forget the accounts registered under ``token``; the last release restores the environment."""
    _REGISTRY.release(token)
