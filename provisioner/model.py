"""Values that cross module borders."""

from __future__ import annotations

import hmac
from typing import Any, NoReturn

_MASK = "Secret(***)"


class Secret:
    """A decrypted value that masks itself everywhere except :meth:`reveal`.

    ``repr``, ``str`` and ``format`` print ``Secret(***)``; pickling and copying raise;
    ``json.dumps`` refuses it like any foreign object. Only the renderer calls ``reveal``.
    """

    __slots__ = ("_plain",)
    _plain: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_plain", value)

    def reveal(self) -> str:
        """The plaintext. Call only where the value is written to its destination."""
        return self._plain

    def __repr__(self) -> str:
        return _MASK

    def __str__(self) -> str:
        return _MASK

    def __format__(self, format_spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._plain.encode(), other._plain.encode())

    __hash__ = None  # type: ignore[assignment]

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or copied")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or copied")

    def __len__(self) -> int:
        return len(self._plain)
