"""The NTLM credential file that pyspnego's acceptor reads, shared by every lab of the process.

pyspnego finds the accounts an NTLM acceptor may authenticate through the environment
variable ``NTLM_USER_FILE``, read when the context is created *and* again when the
AUTHENTICATE message is checked. Flipping that variable per request would race between
threads, so the variable is set once for the process, under a lock, by the first lab that
registers NTLM accounts; it points to one file in a private temp folder. The file holds the
union of the accounts of every registered host (``DOMAIN:USER:PASSWORD`` lines) and is
replaced atomically when hosts come and go. The lab then checks that the authenticated user
is an account of the host that was contacted. One consequence: two hosts of one process may
not give the same account different passwords (``register`` raises ``ValueError``).
When the last registration is released the variable gets its previous value back and the
folder is removed.
"""

from __future__ import annotations

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

    def register(self, owner: int, credentials: Mapping[str, str]) -> None:
        with self._lock:
            entries = {
                account_key(user): (user, password) for user, password in credentials.items()
            }
            for other, known in self._owners.items():
                if other == owner:
                    continue
                for key, (user, password) in entries.items():
                    if key in known and known[key][1] != password:
                        raise ValueError(
                            f"NTLM account {user!r} already has another password in this process; "
                            "lab hosts that accept NTLM must agree on each account's password"
                        )
            merged = dict(self._owners.get(owner, {}))
            merged.update(entries)
            self._owners[owner] = merged
            self._rewrite()

    def release(self, owner: int) -> None:
        with self._lock:
            if self._owners.pop(owner, None) is None:
                return
            if self._owners:
                self._rewrite()
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


def register(owner: int, credentials: Mapping[str, str]) -> None:
    """Add ``credentials`` (user -> password) for ``owner`` (an id) to the process file."""
    for user, password in credentials.items():
        if ":" in user or ":" in password or "\n" in user + password:
            raise ValueError(f"NTLM account {user!r}: ':' and newlines cannot be stored")
    _REGISTRY.register(owner, credentials)


def release(owner: int) -> None:
    """Forget ``owner``'s accounts; the last release restores the environment."""
    _REGISTRY.release(owner)
