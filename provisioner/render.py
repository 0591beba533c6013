"""The Jinja environment and rendering of one target; the only jinja2 user.

Templates produce logical INI text; :mod:`provisioner.ini` turns it into MicroSIP's bytes.
The environment is sandboxed, undefined variables are errors, and every value written through
the ``ini`` filter is checked so that no value can add a line to the file.

Templates are code written by people who may not read passwords, so:

- a password reaches a template only as an opaque :class:`SealedValue`; the ``ini`` filter is
  its only way out, and only into the whole value of a ``password`` key (the filter writes a
  marker that is replaced after rendering, once its place is checked); anything else done with
  it is a render error naming the template line;
- a render has a budget (:class:`RenderBudget`): CPU time, output, and the size of any value
  an operator, filter or method makes, so that a template cannot hang CI or fill its memory.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import importlib.resources
import math
import os
import re
import resource
import signal
import string
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn

import jinja2
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.nodes import Concat
from jinja2.sandbox import SandboxedEnvironment, is_internal_attribute

from provisioner.errors import PolicyViolationError, RenderError
from provisioner.inidoc import unquote
from provisioner.model import Secret

Template = jinja2.Template
MICROSIP_TEMPLATE = "microsip.ini.j2"
OVERRIDE_TEMPLATE = "override.ini.j2"
_LINE_BREAKING = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
PASSWORD_KEY = "password"  # noqa: S105 - the INI key name
# A password in rendered text until its place is checked: control characters, which no value
# written through a filter can contain (they are refused) and lint reports anywhere else.
_MARK_START, _MARK_END = "\x02", "\x03"


class _ValueError(Exception):
    """Raised by filters; turned into a RenderError that names the template line."""


class _SealedUse(_ValueError):
    """A template did something with a password other than writing it with the ini filter."""

    def __init__(self) -> None:
        super().__init__(
            "a password is written only through the ini filter, whole, as the value of a"
            " password key: password={{ account.fields.password | ini }}"
        )


class _OverBudget(_ValueError):
    """A render went over its budget."""


@dataclass(frozen=True)
class RenderBudget:
    """What one render (one file) may use: CPU seconds, characters of output and of any value.

    Ordinary templates use a thousandth of a second and a few hundred characters.
    """

    seconds: float = 1.0
    output: int = 1024 * 1024
    # Growth of the process's peak memory during one render, in bytes.
    memory: int = 256 * 1024 * 1024
    # The largest integer an operator may make, in bits (about 30,000 digits).
    int_bits: int = 100_000


DEFAULT_BUDGET = RenderBudget()


# --------------------------------------------------------------------------- sealed values


def _refuse(*_: object, **__: object) -> NoReturn:
    raise _SealedUse


class SealedValue:
    """A password as a template sees it: no attribute, method, operator or conversion works.

    The ``ini`` filter is its only way out. Everything else raises a render error that names
    the template line and never the value.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: Secret) -> None:
        object.__setattr__(self, "_secret", secret)

    def __bool__(self) -> bool:
        return True  # every password is at least one character: this tells nothing

    __str__ = __repr__ = __format__ = __len__ = __iter__ = __reversed__ = _refuse
    __contains__ = __getitem__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = __add__ = __radd__ = __mul__ = __rmul__ = __mod__ = __rmod__ = _refuse
    __int__ = __float__ = __index__ = __setattr__ = __reduce__ = __reduce_ex__ = _refuse


def sealed(secret: Secret) -> SealedValue:
    """``secret`` as templates may see it."""
    return SealedValue(secret)


_SEALED = (SealedValue, Secret)  # a tuple: isinstance with it is a little faster than with a union
_SIZED = (str, bytes, bytearray, list, tuple, dict)


def _is_sealed(value: object) -> bool:
    return isinstance(value, _SEALED)


# A password the ini filter wrote as a marker, and where in the templates it did: the
# template and its compiled code's line (a tuple: one is made per password per render).
_Placement = tuple[Secret, tuple[jinja2.Template, int] | None]


class _Placements(list[_Placement]):
    def mark(self, secret: Secret) -> str:
        self.append((secret, _calling_template()))
        return f"{_MARK_START}{len(self) - 1}{_MARK_END}"


_PLACEMENTS: contextvars.ContextVar[_Placements | None] = contextvars.ContextVar(
    "placements", default=None
)


def _calling_template() -> tuple[jinja2.Template, int] | None:
    """The template (and compiled line) whose code is running: the innermost Jinja frame."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        template = frame.f_globals.get("__jinja_template__")
        if template is not None:
            return template, frame.f_lineno
        frame = frame.f_back
    return None


class _AtLine(Exception):
    """A render error found outside the template's own frames, with the position it is about."""

    def __init__(self, position: tuple[jinja2.Template, int] | None, detail: str) -> None:
        super().__init__(detail)
        self.position, self.detail = position, detail


def _place_secrets(text: str, placements: _Placements) -> str:
    """``text`` with each marker replaced by its password, once each stands alone in its key."""
    places = []
    for index, (secret, frame) in enumerate(placements):
        marker = f"{_MARK_START}{index}{_MARK_END}"
        start = text.find(marker)
        line_start = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", start)
        key, sep, value = text[line_start : line_end if line_end >= 0 else None].partition("=")
        if start < 0 or not sep or key.strip().lower() != PASSWORD_KEY or value.strip() != marker:
            raise _AtLine(frame, str(_SealedUse()))
        places.append((start, start + len(marker), secret))
    if text.count(_MARK_START) != len(placements):  # a marker written twice (or forged)
        raise _AtLine(placements[0][1], str(_SealedUse()))
    for start, end, secret in sorted(places, key=lambda place: place[0], reverse=True):
        text = text[:start] + _secret_text(secret) + text[end:]
    return text


# --------------------------------------------------------------------------- filters


def default_template_dir() -> Path:
    """The templates shipped with the tool (the repository's ``templates/`` folder)."""
    packaged = importlib.resources.files("provisioner").joinpath("templates")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "templates"


def ini_value(value: object) -> str:
    """Text for one INI value (the ``ini`` filter): booleans as 0/1, lists joined by spaces.

    The result reads back as exactly the value through ``GetPrivateProfileString``: a value
    enclosed in quotes gets one protective pair more (the profile API strips one pair, and
    MicroSIP writes hooks and device names that way); surrounding whitespace, which the
    profile API strips, is refused. A password, while a template renders, becomes a marker
    that :func:`render` checks and fills; outside a render a :class:`Secret` is revealed.
    """
    text = _plain_value(value)
    if text != text.strip():
        raise _ValueError("a value starts or ends with whitespace, which Windows strips")
    return f'"{text}"' if unquote(text) != text else text


def _plain_value(value: object) -> str:
    if type(value) is str:  # most values: one check instead of eight
        if _LINE_BREAKING.search(value):
            raise _ValueError("a value contains a line break or control character")
        return value
    if isinstance(value, _SEALED):
        placements = _PLACEMENTS.get()
        if placements is not None:
            return placements.mark(_secret_of(value))
        if isinstance(value, SealedValue):
            raise _SealedUse
        return _secret_text(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _ValueError(f"{value!r} is not a number MicroSIP can read")
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        if any(_is_sealed(v) for v in value):
            raise _SealedUse
        return " ".join(_plain_value(v) for v in value)
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises its own error, which names the variable
        raise _ValueError("undefined value")
    text = str(value)
    if _LINE_BREAKING.search(text):
        raise _ValueError("a value contains a line break or control character")
    return text


def _secret_of(value: SealedValue | Secret) -> Secret:
    return value if isinstance(value, Secret) else object.__getattribute__(value, "_secret")


def _secret_text(secret: Secret) -> str:
    """The password as it goes into its key, with the checks every value gets."""
    text = secret.reveal()
    if _LINE_BREAKING.search(text):
        raise PolicyViolationError("a secret value contains a line break or control character")
    if text != text.strip():
        raise _ValueError("a value starts or ends with whitespace, which Windows strips")
    return f'"{text}"' if unquote(text) != text else text


def _refuse_raw_secret(value: object) -> object:
    """``{{ password }}`` without ``| ini`` would write the value somewhere unchecked."""
    if isinstance(value, _SEALED):
        raise _SealedUse
    return value


def bool01(value: object) -> str:
    """``1`` or ``0`` for anything truthy or falsy (``"0"`` counts as false)."""
    if _is_sealed(value):
        raise _SealedUse
    if isinstance(value, str):
        return "0" if value.strip().lower() in ("", "0", "false", "no", "off") else "1"
    return "1" if value else "0"


def quoted(value: object) -> str:
    """The value wrapped in double quotes, as MicroSIP writes device names and hooks.

    The profile API strips exactly that pair, so the value reads back unchanged.
    """
    if _is_sealed(value):
        raise _SealedUse
    text = _plain_value(value)
    if text != text.strip():
        raise _ValueError("a value starts or ends with whitespace, which Windows strips")
    return f'"{text}"'


# --------------------------------------------------------------------------- the budget


def _size(value: object) -> int:
    return len(value) if isinstance(value, _SIZED) else 0


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


class _Limits:
    """Checks of one environment's budget on values that templates make."""

    def __init__(self, budget: RenderBudget) -> None:
        self.budget = budget

    def over(self, what: str) -> NoReturn:
        raise _OverBudget(
            f"{what} would exceed the render budget of {self.budget.output:,} characters"
        )

    def over_bits(self, what: str) -> NoReturn:
        raise _OverBudget(
            f"{what} would exceed the render budget of {self.budget.int_bits:,} bits for a number"
        )

    def result(self, value: Any) -> Any:
        if _size(value) > self.budget.output:
            self.over("a value")
        return value

    def binop(self, operator: str, left: Any, right: Any) -> None:
        """Refuse an operation whose result would be too large, before it is computed."""
        if _is_sealed(left) or _is_sealed(right):
            raise _SealedUse
        limit, bits = self.budget.output, self.budget.int_bits
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > bits:
                    self.over_bits("a product")
            elif isinstance(left, int) or isinstance(right, int):
                count, sized = (left, right) if isinstance(left, int) else (right, left)
                if count > 0 and _size(sized) * count > limit:
                    self.over("a repetition")
        elif operator == "**":
            ints = isinstance(left, int) and isinstance(right, int) and abs(left) > 1
            if ints and right * left.bit_length() > bits:
                self.over_bits("a power")
        elif operator == "%" and isinstance(left, str):
            self.check_format(left, right if isinstance(right, tuple) else (right,), braces=False)

    def check_format(self, fmt: str, args: Sequence[Any], *, braces: bool) -> None:
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
        elif name == "extend" and isinstance(owner, list) and args:
            grown = len(owner) + _size(args[0])
            if grown > limit:
                self.over("a list")

    def check_replace(self, text: Any, old: Any, new: Any, count: Any) -> None:
        texts = isinstance(text, str) and isinstance(old, str)
        if not texts and not (isinstance(text, bytes) and isinstance(old, bytes)):
            return
        found = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            found = min(found, count)
        if len(text) + found * max(0, _size(new) - len(old)) > self.budget.output:
            self.over("a replacement")

    def check_join(self, separator: Any, items: Sequence[Any]) -> None:
        total = _size(separator) * max(0, len(items) - 1) + sum(_size(i) for i in items)
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
            each = width if isinstance(width, int) else _size(width)
            if len(value) + (value.count("\n") + 1) * each > limit:
                self.over("the indent filter")
        elif name == "wordwrap" and isinstance(value, str):
            wrap = args[4] if len(args) > 4 else kwargs.get("wrapstring")
            if len(value) * max(1, _size(wrap)) > limit:
                self.over("the wordwrap filter")
        elif name == "format" and isinstance(value, str):
            self.check_format(value, [*args[1:], *kwargs.values()], braces=False)
        elif name == "sum" and isinstance(value, list | tuple):
            total = sum(_size(v) for v in value) + _size(kwargs.get("start"))
            if total > limit:
                self.over("the sum filter")


# Methods and filters whose result grows with an integer argument.
_PADDING = frozenset({"center", "ljust", "rjust", "zfill"})
_SIZING_CALLS = _PADDING | {"format", "format_map", "to_bytes", "replace", "expandtabs"}
_SIZING_CALLS |= {"join", "extend"}
_SIZE_FILTERS = frozenset({"center", "batch", "slice"})
_SIZE_ARGUMENTS = ("width", "linecount", "slices")
_TICK = 0.05  # seconds of CPU between two looks at a running render
_CHUNKS_PER_LOOK = 64
_SIGNALS = hasattr(signal, "setitimer")


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _Clock:
    """Looks at the running render every _TICK seconds of CPU time (SIGPROF), ending it when
    it goes over its budget's time or memory.

    Signals reach only the main thread: renders elsewhere keep the output and value limits
    only. Setting a timer costs a system call, so the timer is left running between the
    renders of a build and stops itself at the first tick that finds no render running; the
    handler is installed once per process, and passes that tick on to the one it replaced.
    """

    def __init__(self) -> None:
        self.budget: RenderBudget | None = None
        self.ticks = 0
        self.baseline = 0
        self.previous: Any = None
        self.installed = False  # a forked child inherits the handler, and this flag with it
        self.running = False  # the timer is set (a forked child has none)

    def forked(self) -> None:
        self.budget, self.running = None, False

    def start(self, budget: RenderBudget) -> bool:
        if not _SIGNALS or threading.current_thread() is not threading.main_thread():
            return False
        if not self.installed:
            self.previous = signal.signal(signal.SIGPROF, self.handle)
            os.register_at_fork(after_in_child=self.forked)
            self.installed = True
        self.budget, self.ticks, self.baseline = budget, 0, 0
        if not self.running:
            self.running = True
            signal.setitimer(signal.ITIMER_PROF, _TICK, _TICK)
        return True

    def stop(self) -> None:
        self.budget = None  # the next tick stops the timer, unless a render has started again

    def halt(self) -> None:
        self.budget = None
        if self.running:
            self.running = False
            signal.setitimer(signal.ITIMER_PROF, 0)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        budget = self.budget
        if budget is None:
            self.running = False
            signal.setitimer(signal.ITIMER_PROF, 0)
            if callable(self.previous):
                self.previous(signum, frame)
            return
        # Once over, every tick raises again until the render stops the clock: an exception
        # raised where Python only prints it (a __del__ method) must not end the budget.
        self.ticks += 1
        if self.ticks * _TICK >= budget.seconds:
            raise _OverBudget(f"the template ran for more than {budget.seconds:g} s of CPU time")
        peak = _peak_rss()
        if not self.baseline:
            self.baseline = peak
        elif peak - self.baseline > budget.memory:
            raise _OverBudget(
                f"the template used more than {budget.memory // (1024 * 1024)} MiB of memory"
            )


_CLOCK = _Clock()


def stop_clock() -> None:
    """Stop the CPU timer that renders leave running between files: when a build ends.

    At exit too: Python restores SIGPROF's default action (end the process) as it shuts down.
    """
    _CLOCK.halt()


atexit.register(stop_clock)


# --------------------------------------------------------------------------- the environment


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator with ``~`` checked like the other operators."""

    @optimizeconst
    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        self.write("environment.concat_values((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class TemplateEnvironment(SandboxedEnvironment):
    """The sandbox, with passwords opaque and every value within the render budget."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *args: Any, budget: RenderBudget = DEFAULT_BUDGET, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget
        self.limits = _Limits(budget)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # The sandbox's rule, and no attribute of a password is safe. (A SealedValue has none:
        # looking one up tries its items, which raises.)
        return not (
            isinstance(obj, _SEALED) or attr.startswith("_") or is_internal_attribute(obj, attr)
        )

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        self.limits.binop(operator, left, right)
        return self.limits.result(self.binop_table[operator](left, right))

    def call(  # the sandbox's own parameter names, which keep keyword arguments free
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if isinstance(__obj, _SEALED):
            raise _SealedUse
        name = getattr(__obj, "__name__", "")
        if name in _SIZING_CALLS:
            if name == "join" and args and not isinstance(args[0], list):
                args = (list(args[0]), *args[1:])  # measured before joining
            __self.limits.call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, _SIZED) and len(result) > __self.budget.output:
            __self.limits.over("a value")
        return result

    def concat_values(self, values: Sequence[Any]) -> str:
        """``a ~ b``: the parts as text, joined, within the budget."""
        parts = [str(value) for value in values]  # a sealed value raises here
        if sum(map(len, parts)) > self.budget.output:
            self.limits.over("a joined value")
        return "".join(parts)


def _guarded_filter(name: str, function: Callable[..., Any], limits: _Limits) -> Callable[..., Any]:
    """A built-in filter that refuses passwords and results over the budget."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if any(_is_sealed(a) for a in args) or any(_is_sealed(v) for v in kwargs.values()):
            raise _SealedUse
        if name == "join" and len(args) > skip and not isinstance(args[skip], list | tuple):
            args = (*args[:skip], list(args[skip]), *args[skip + 1 :])  # measured before joining
        limits.filter(name, args[skip:], kwargs)
        return limits.result(function(*args, **kwargs))

    return guarded


def make_environment(
    template_dirs: Sequence[Path], *, budget: RenderBudget = DEFAULT_BUDGET
) -> TemplateEnvironment:
    """A sandboxed, strict environment looking in ``template_dirs`` then the defaults."""
    search = [str(p) for p in template_dirs if p.is_dir()] + [str(default_template_dir())]
    env = TemplateEnvironment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # INI text, not HTML
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        # One process renders one run: checking every template file's mtime per render
        # (a stat per target) buys nothing.
        auto_reload=False,
        finalize=_refuse_raw_secret,
        budget=budget,
    )
    for name, function in list(env.filters.items()):
        env.filters[name] = _guarded_filter(name, function, env.limits)
    env.filters["ini"] = ini_value
    env.filters["bool01"] = bool01
    env.filters["quoted"] = quoted
    return env


def load_template(env: TemplateEnvironment, name: str) -> jinja2.Template:
    """Compile a template; syntax errors become RenderError with file and line."""
    clocked = _CLOCK.start(env.budget)  # constant folding runs filters at compile time
    try:
        return env.get_template(name)
    except jinja2.TemplateNotFound:
        raise RenderError(f"template {name} not found") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(
            f"{exc.filename or name}:{exc.lineno}: template syntax error: {exc.message}"
            + _snippet(exc.filename, exc.lineno)
        ) from None
    except _ValueError as exc:
        raise RenderError(f"{name}: {exc} (while compiling it)") from None
    finally:
        if clocked:
            _CLOCK.stop()


# --------------------------------------------------------------------------- rendering

_TEMPLATE_ERRORS = (
    jinja2.UndefinedError,
    _ValueError,
    jinja2.TemplateError,
    TypeError,
    ValueError,
    ArithmeticError,
    LookupError,
    RecursionError,
)


def render(template: jinja2.Template, context: Mapping[str, object], target: str) -> str:
    """Render one target; every failure names the template file and line, never a password."""
    env = template.environment
    budget = env.budget if isinstance(env, TemplateEnvironment) else DEFAULT_BUDGET
    placements = _Placements()
    token = _PLACEMENTS.set(placements)
    try:
        clocked = _CLOCK.start(budget)
        try:
            text = _generate(template, context, budget)
        finally:
            if clocked:
                _CLOCK.stop()
        return _place_secrets(text, placements) if placements else text
    except _AtLine as exc:
        file, line = _position(exc.position, template)
        detail = exc.detail
    except _TEMPLATE_ERRORS as exc:
        file, line = _template_frame(exc.__traceback__, template)
        detail = str(exc)
        if isinstance(exc, jinja2.TemplateError):
            detail = exc.message or detail
        elif isinstance(exc, RecursionError):
            detail = "templates include or call each other without end"
    finally:
        _PLACEMENTS.reset(token)
    raise RenderError(
        f"{file}:{line}: {detail} (rendering {target})" + _snippet(file, line),
        file=file,
        line=line,
    )


def _generate(
    template: jinja2.Template, context: Mapping[str, object], budget: RenderBudget
) -> str:
    """The rendered text, stopped as soon as it is longer than the budget allows.

    Chunks are taken a few dozen at a time (a Python loop per chunk cost more than the rest of
    the render); no single chunk is larger than the budget, which every value is held to.
    """
    chunks: list[str] = []
    size = 0
    generator = template.root_render_func(template.new_context(dict(context)))
    try:
        while True:
            batch = list(islice(generator, _CHUNKS_PER_LOOK))
            size += sum(map(len, batch))
            if size > budget.output:
                raise _AtLine(
                    _running_template(generator),
                    f"the template wrote more than {budget.output:,} characters",
                )
            if len(batch) < _CHUNKS_PER_LOOK:  # the end: most files need one look
                return "".join(chunks + batch if chunks else batch)
            chunks += batch
    except _AtLine:
        raise
    except Exception:
        template.environment.handle_exception()  # raises, with template lines in the traceback


def _running_template(generator: Any) -> tuple[jinja2.Template, int] | None:
    """Where a suspended render is: the innermost template generator and its code line."""
    found = None
    while generator is not None:
        frame = getattr(generator, "gi_frame", None)
        if frame is not None and "__jinja_template__" in frame.f_globals:
            found = (frame.f_globals["__jinja_template__"], frame.f_lineno)
        generator = getattr(generator, "gi_yieldfrom", None)
    return found


def _position(
    position: tuple[jinja2.Template, int] | None, template: jinja2.Template
) -> tuple[str, int]:
    """Template file and line of a (template, compiled code line) position."""
    if position is None:
        return template.filename or template.name or "?", 0
    where, code_line = position
    return where.filename or where.name or "?", where.get_corresponding_lineno(code_line)


def _template_frame(tb: TracebackType | None, template: jinja2.Template) -> tuple[str, int]:
    file, line = template.filename or template.name or "?", 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == template.filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return file, line


def _snippet(file: str | None, line: int | None) -> str:
    if not file or not line:
        return ""
    try:
        text = Path(file).read_text(encoding="utf-8").splitlines()[line - 1]
    except (OSError, IndexError, UnicodeDecodeError):
        return ""
    return f"\n    {line} | {text.strip()[:120]}"
