"""The closest known name to a mistyped one, for "did you mean" hints."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


def closest(name: str, known: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The known name spelled like ``name`` but for letter case, else the most similar one.

    Names are case-sensitive here (``ALICE`` is not ``alice``), which is exactly the mistake
    that deserves the hint first.
    """
    choices = [k for k in known if k]
    folded = [k for k in choices if k.lower() == name.lower()]
    if folded:
        return folded[0]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``; did you mean 'x'?`` for the :func:`closest` known name, or nothing."""
    hint = closest(name, known, cutoff=cutoff)
    return f"; did you mean {hint!r}?" if hint else ""


def unknown(key: str, known: Sequence[str], what: str) -> str:
    """``unknown WHAT 'key'`` with the closest known name, or the list of all of them."""
    hint = did_you_mean(key, known) or f" (expected one of: {', '.join(known)})"
    return f"unknown {what} {key!r}{hint}"
