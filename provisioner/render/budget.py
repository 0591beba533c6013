"""What rendering one file may use, and the checks that hold a template to it.

A template is code that people who may not read passwords write; it must not hang CI or fill
its memory. :class:`ValueLimits` refuses an operator, filter or method call whose result
would be too large *before* it is made (a single ``'x' * 10 ** 10`` allocates before any
timer could stop it); :class:`Clock` looks at a running render every few milliseconds of CPU
time (SIGPROF) and ends it when it runs too long or grows the process's memory too much.
The renderer (:mod:`provisioner.render.jinja`) counts the output. Standard library only.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import string
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from types import FrameType, ModuleType
from typing import Any, NoReturn

_resource: ModuleType | None
try:
    import resource as _resource
except ImportError:  # Windows: no memory check
    _resource = None


class OverBudget(Exception):
    """A render went over its budget; the message says which limit."""


@dataclass(frozen=True)
class RenderBudget:
    """What one render (one file) may use: CPU seconds, characters of output and of any value.

    Ordinary templates use a thousandth of a second and a few hundred characters.
    """

    seconds: float = 1.0
    output: int = 1024 * 1024
    # Growth of the process's memory during one render (from its first look), in bytes.
    memory: int = 256 * 1024 * 1024
    # The largest integer an operator may make, in bits (about 30,000 digits).
    int_bits: int = 100_000


DEFAULT_BUDGET = RenderBudget()


SIZED = (str, bytes, bytearray, list, tuple, dict)
COLLECTIONS = (list, tuple, dict, set, frozenset)
_TEXT = (str, bytes, bytearray)


def size_of(value: object) -> int:
    """The length of a string, bytes or container (0 for anything else)."""
    return len(value) if isinstance(value, SIZED) else 0


def _leaf_size(value: object) -> int:
    if isinstance(value, _TEXT):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() * 3 // 10 + 1  # about its decimal digits
    return 1


def _members(value: Any) -> Iterator[object]:
    return chain.from_iterable(value.items()) if isinstance(value, dict) else iter(value)


def expanded_size(value: object, limit: int) -> int:
    """The size of ``value`` with everything it holds, each reference counted again.

    This is what ``str()`` or a comparison walks in one C call that no clock can stop:
    characters of text, digits of a number, at least one per item. Counting stops past
    ``limit`` (the result is then ``limit + 1``); each distinct list is walked once.
    """
    if not isinstance(value, COLLECTIONS):
        return _leaf_size(value)
    known: dict[int, int] = {}
    walking = {id(value)}
    stack: list[list[Any]] = [[value, _members(value), 0]]  # collection, its items, size so far
    while True:
        top = stack[-1]
        for item in top[1]:
            if isinstance(item, COLLECTIONS):
                size = known.get(id(item))
                if size is None:
                    if id(item) not in walking:
                        walking.add(id(item))
                        stack.append([item, _members(item), 0])
                        break
                    size = 1  # a list that holds itself: str() writes [...]
            else:
                size = _leaf_size(item)
            top[2] += max(1, size)
            if top[2] > limit:
                return limit + 1
        else:
            stack.pop()
            walking.discard(id(top[0]))
            known[id(top[0])] = top[2]
            if not stack:
                return int(top[2])
            stack[-1][2] += max(1, top[2])
            if stack[-1][2] > limit:
                return limit + 1


def _big_int(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|[0-9]+)?(?:\.(\*|[0-9]+))?")


def _widths(fmt: str, *, braces: bool) -> tuple[list[int], bool]:
    """The widths and precisions a %-format (or str.format) string writes, and whether one
    of them is taken from the arguments."""
    widths: list[int] = []
    from_arguments = False
    if braces:
        try:
            specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
        except ValueError:
            return [], False  # formatting raises the same error
        for spec in specs:
            widths += [int(n) for n in re.findall(r"[0-9]+", spec)]
            from_arguments = from_arguments or "{" in spec
    else:
        for match in _PERCENT_FIELD.finditer(fmt):
            for part in match.groups():
                if part == "*":
                    from_arguments = True
                elif part:
                    widths.append(int(part))
    return widths, from_arguments


class ValueLimits:
    """Checks of a budget on the values a template makes, before they are made."""

    def __init__(self, budget: RenderBudget) -> None:
        self.budget = budget

    def over(self, what: str) -> NoReturn:
        """Refuse ``what``: it would be larger than the budget's output."""
        raise OverBudget(
            f"{what} would exceed the render budget of {self.budget.output:,} characters"
        )

    def over_bits(self, what: str) -> NoReturn:
        """Refuse ``what``: a number larger than the budget allows."""
        raise OverBudget(
            f"{what} would exceed the render budget of {self.budget.int_bits:,} bits for a number"
        )

    def result(self, value: Any) -> Any:
        """``value``, unless it is larger than the budget's output."""
        if size_of(value) > self.budget.output:
            self.over("a value")
        return value

    def expanded(self, value: Any) -> Any:
        """``value``, unless it holds more than the budget's output (see expanded_size)."""
        limit = self.budget.output
        if expanded_size(value, limit) > limit:
            self.over("a value")
        return value

    def binop(self, operator: str, left: Any, right: Any) -> None:
        """Refuse an operation whose result would be too large, before it is computed."""
        limit, bits = self.budget.output, self.budget.int_bits
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > bits:
                    self.over_bits("a product")
            elif isinstance(left, int) or isinstance(right, int):
                count, sized = (left, right) if isinstance(left, int) else (right, left)
                if isinstance(sized, SIZED) and count * expanded_size(sized, limit) > limit:
                    self.over("a repetition")
        elif operator == "+" and isinstance(left, SIZED) and isinstance(right, SIZED):
            if expanded_size(left, limit) + expanded_size(right, limit) > limit:
                self.over("a concatenation")
        elif operator == "**":
            ints = isinstance(left, int) and isinstance(right, int) and abs(left) > 1
            if ints and right * left.bit_length() > bits:
                self.over_bits("a power")
        elif operator == "%" and isinstance(left, str):
            self.check_format(left, right if isinstance(right, tuple) else (right,), braces=False)

    def check_format(self, fmt: str, args: Sequence[Any], *, braces: bool) -> None:
        """Refuse a %-format (or ``braces``: str.format) string that pads past the budget."""
        limit = self.budget.output
        widths, from_arguments = _widths(fmt, braces=braces)
        if any(w > limit for w in widths) or (
            from_arguments and any(_big_int(a, limit) for a in args)
        ):
            self.over("a formatted value")

    def call(self, function: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Refuse a method call whose result would be too large, before it is made."""
        name = getattr(function, "__name__", "")
        owner = getattr(function, "__self__", None)
        limit = self.budget.output
        values = (*args, *kwargs.values())
        if name in ("format", "format_map"):
            # The sandbox hands out str.format wrapped; the string is the wrapped method's.
            owner = getattr(getattr(function, "__wrapped__", None), "__self__", owner)
            if isinstance(owner, str):
                mapped = list(args[0].values()) if args and isinstance(args[0], Mapping) else []
                self.check_format(owner, [*values, *mapped], braces=True)
        elif isinstance(owner, int) and name == "to_bytes":
            if any(_big_int(a, limit) for a in values):
                self.over("a byte string")
        elif isinstance(owner, str | bytes | bytearray):
            if name in _PADDING and any(_big_int(a, limit) for a in values):
                self.over("a padded value")
            elif name == "replace" and len(args) >= 2:
                self.check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1)
            elif name == "expandtabs":
                tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
                size = args[0] if args else kwargs.get("tabsize", 8)
                if isinstance(size, int) and tabs * size > limit:
                    self.over("a value")
            elif name == "join" and args and isinstance(args[0], list | tuple):
                self.check_join(owner, args[0])
        elif (
            isinstance(owner, list | dict)
            and name in _GROWING
            # The collection's whole size again (linear): templates rarely grow one.
            and expanded_size(owner, limit) + expanded_size(values, limit) > limit
        ):
            self.over("a list" if isinstance(owner, list) else "a dict")

    def check_replace(self, text: Any, old: Any, new: Any, count: Any) -> None:
        """Refuse a replacement whose result would be larger than the budget."""
        texts = isinstance(text, str) and isinstance(old, str)
        if not texts and not (isinstance(text, bytes) and isinstance(old, bytes)):
            return
        found = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            found = min(found, count)
        if len(text) + found * max(0, size_of(new) - len(old)) > self.budget.output:
            self.over("a replacement")

    def check_join(self, separator: Any, items: Sequence[Any]) -> None:
        """Refuse a join whose result would be larger than the budget."""
        total = size_of(separator) * max(0, len(items) - 1) + sum(size_of(i) for i in items)
        if total > self.budget.output:
            self.over("a joined value")

    def filter(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Refuse a filter whose result would be too large (``args[0]`` is the value)."""
        limit = self.budget.output
        value = args[0] if args else None
        sizes = [args[1]] if len(args) > 1 else [kwargs.get(k) for k in _SIZE_ARGUMENTS]
        if name in _SIZE_FILTERS and any(_big_int(a, limit) for a in sizes):
            self.over(f"the {name} filter")
        elif name == "replace" and len(args) >= 3:
            self.check_replace(value, args[1], args[2], args[3] if len(args) > 3 else -1)
        elif name == "join" and isinstance(value, list | tuple):
            self.check_join(args[1] if len(args) > 1 else kwargs.get("d", ""), value)
        elif name == "indent" and isinstance(value, str):
            width = args[1] if len(args) > 1 else kwargs.get("width", 4)
            each = width if isinstance(width, int) else size_of(width)
            if len(value) + (value.count("\n") + 1) * each > limit:
                self.over("the indent filter")
        elif name == "wordwrap" and isinstance(value, str):
            wrap = args[4] if len(args) > 4 else kwargs.get("wrapstring")
            if len(value) * max(1, size_of(wrap)) > limit:
                self.over("the wordwrap filter")
        elif name == "format" and isinstance(value, str):
            self.check_format(value, [*args[1:], *kwargs.values()], braces=False)


# Methods and filters whose result grows with an integer argument.
_PADDING = frozenset({"center", "ljust", "rjust", "zfill"})
# Methods that add to a list or dict.
_GROWING = frozenset({"append", "insert", "extend", "update", "setdefault"})
SIZING_CALLS = (
    _PADDING
    | _GROWING
    | {
        "format",
        "format_map",
        "to_bytes",
        "replace",
        "expandtabs",
        "join",
    }
)
_SIZE_FILTERS = frozenset({"center", "batch", "slice"})
_SIZE_ARGUMENTS = ("width", "linecount", "slices")
_TICK = 0.05  # seconds of CPU between two looks at a running render
_SIGNALS = hasattr(signal, "setitimer")


def _peak_rss() -> int:
    """The most memory the process ever held, in bytes; 0 where it cannot be read (Windows)."""
    if _resource is None:
        return 0
    peak: int = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Clock:
    """Looks at the running render every _TICK seconds of CPU time (SIGPROF), ending it when
    it goes over its budget's time or memory.

    Signals reach only the main thread: renders elsewhere keep the output and value limits
    only. Setting a timer costs a system call, so the timer is left running between the
    renders of a build and stops itself at the first tick that finds no render running; the
    handler is installed once per process, and passes that tick on to the one it replaced.
    The time charged is the rendering thread's own CPU time since the render started: a
    signal that arrives during a long C call is handled once, after it, and the timer also
    ticks for the CPU time of other threads.
    """

    def __init__(self) -> None:
        self.budget: RenderBudget | None = None
        self.started = 0.0
        self.baseline = 0
        # Renders between two ticks share one baseline, read at the first of them: reading it
        # at every start cost Phase 1 at 10,000 users a third of its wall time. A tick makes
        # the next start read it again, so a baseline is always a reading taken before a
        # render began, never one inflated by what an earlier render held.
        self.baseline_stale = True
        self.statm = -1  # /proc/self/statm, opened once per process; -2 where there is none
        self.previous: Any = None
        self.installed = False  # a forked child inherits the handler, and this flag with it
        self.running = False  # the timer is set (a forked child has none)

    def forked(self) -> None:
        """In a forked child: no timer runs there, and /proc/self was the parent's."""
        self.budget, self.running, self.baseline_stale = None, False, True
        if self.statm >= 0:
            os.close(self.statm)
            self.statm = -1

    def memory(self) -> int:
        """The process's memory in bytes: what it holds now (Linux), else the most it ever
        held (a render's growth then shows only past an earlier peak)."""
        if self.statm == -1:
            try:
                self.statm = os.open("/proc/self/statm", os.O_RDONLY)
            except OSError:
                self.statm = -2
        if self.statm < 0:
            return _peak_rss()
        return int(os.pread(self.statm, 200, 0).split()[1]) * _PAGE

    def start(self, budget: RenderBudget) -> bool:
        """A render begins; False where no timer can run (not the main thread, no SIGPROF)."""
        if not _SIGNALS or threading.current_thread() is not threading.main_thread():
            return False
        if not self.installed:
            self.previous = signal.signal(signal.SIGPROF, self.handle)
            os.register_at_fork(after_in_child=self.forked)
            self.installed = True
        if self.baseline_stale or not self.running:  # a stopped timer: another build
            self.baseline, self.baseline_stale = self.memory(), False
        self.budget, self.started = budget, time.thread_time()
        if not self.running:
            self.running = True
            signal.setitimer(signal.ITIMER_PROF, _TICK, _TICK)
        return True

    def stop(self) -> None:
        """A render ended."""
        self.budget = None  # the next tick stops the timer, unless a render has started again

    def halt(self) -> None:
        """Stop the timer now."""
        self.budget = None
        if self.running:
            self.running = False
            signal.setitimer(signal.ITIMER_PROF, 0)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The SIGPROF handler: a tick of CPU time."""
        budget = self.budget
        if budget is None:
            self.running = False
            signal.setitimer(signal.ITIMER_PROF, 0)
            if callable(self.previous):
                self.previous(signum, frame)
            return
        # Once over, every tick raises again until the render stops the clock: an exception
        # raised where Python only prints it (a __del__ method) must not end the budget.
        if time.thread_time() - self.started >= budget.seconds:
            raise OverBudget(f"the template ran for more than {budget.seconds:g} s of CPU time")
        self.baseline_stale = True
        if self.memory() - self.baseline > budget.memory:
            raise OverBudget(
                f"the template used more than {budget.memory // (1024 * 1024)} MiB of memory"
            )


CLOCK = Clock()


def stop_clock() -> None:
    """Stop the CPU timer that renders leave running between files: when a build ends.

    At exit too: Python restores SIGPROF's default action (end the process) as it shuts down.
    """
    CLOCK.halt()


atexit.register(stop_clock)
