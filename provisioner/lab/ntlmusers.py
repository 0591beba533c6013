"""The NTLM credential file that pyspnego's acceptor reads, shared by every lab of the process.

pyspnego finds the accounts an NTLM acceptor may authenticate through the environment
variable ``NTLM_USER_FILE``, read when the context is created *and* again when the
AUTHENTICATE message is checked. Flipping that variable per request would race between
threads, so the variable is set once for the process, under a lock, by the first lab that
registers NTLM accounts; it points to one file in a private temp folder. The file holds the
union of the accounts of every registered host (``DOMAIN:USER:PASSWORD`` lines); it is
replaced atomically when a host brings a new account (accounts of hosts that are gone stay
until the last release, which is harmless). The lab then checks that the authenticated user
is an account of the host that was contacted. One consequence: two hosts of one process may
not give the same account different passwords (``register`` raises ``ValueError``).
When the last registration is released the variable gets its previous value back and the
folder is removed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

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


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[int, dict[Account, tuple[str, str]]] = {}
        self._folder: Path | None = None
        self._previous: str | None = None
        self._tokens = itertools.count(1)

    def register(self, credentials: Mapping[str, str]) -> int:
        with self._lock:
            known = {
                key: password
                for entries in self._owners.values()
                for key, (_, password) in entries.items()
            }
            entries = {
                account_key(user): (user, password) for user, password in credentials.items()
            }
            for key, (user, password) in entries.items():
                if known.get(key, password) != password:
                    raise ValueError(
                        f"NTLM account {user!r} already has another password in this process; "
                        "lab hosts that accept NTLM must agree on each account's password"
                    )
            owner = next(self._tokens)
            self._owners[owner] = entries
            if any(key not in known for key in entries):
                self._rewrite()
            return owner

    def release(self, owner: int) -> None:
        with self._lock:
            if self._owners.pop(owner, None) is None or self._owners:
                return
            if self._previous is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = self._previous
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
            self._previous = None

    def _rewrite(self) -> None:
        first = self._folder is None
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="microsip-lab-ntlm-"))
        path = self._folder / "users"
        lines = []
        for entries in self._owners.values():
            for user, password in entries.values():
                domain, name = split_account(user)
                lines.append(f"{domain}:{name}:{password}\n")
        fd, temp = tempfile.mkstemp(dir=self._folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(sorted(set(lines)))
        os.replace(temp, path)
        if first:
            self._previous = os.environ.get(ENV_VAR)
            os.environ[ENV_VAR] = str(path)


_REGISTRY = _Registry()


def register(credentials: Mapping[str, str]) -> int:
    """Add ``credentials`` (user -> password) to the process file; returns a release token."""
    for user, password in credentials.items():
        if ":" in user or ":" in password or "\n" in user + password:
            raise ValueError(f"NTLM account {user!r}: ':' and newlines cannot be stored")
    return _REGISTRY.register(credentials)


def release(token: int) -> None:
    """Forget the accounts registered under ``token``; the last release restores the environment."""
    _REGISTRY.release(token)
