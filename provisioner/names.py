"""The closest known name to a mistyped one, for "did you mean" hints."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
