"""The Jinja environment and rendering of one target; the only jinja2 user.

Templates produce logical INI text; :mod:`provisioner.microsip.ini` turns it into MicroSIP's bytes.
The environment is sandboxed, undefined variables are errors, and every value written through
the ``ini`` filter is checked so that no value can add a line to the file.

Templates are code written by people who may not read passwords, so:

- a password reaches a template only as an opaque :class:`SealedValue`; the ``ini`` filter is
  its only way out, and only into the whole value of a ``password`` key (the filter writes a
  marker that is replaced after rendering, once its place is checked); anything else done with
  it is a render error naming the template line;
- a render has a budget (:mod:`provisioner.render.budget`): CPU time, memory, output (counted here)
  and the size of any value an operator, filter or method makes, so that a template cannot
  hang CI or fill its memory.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.resources
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.filters import make_attrgetter
from jinja2.sandbox import SandboxedEnvironment, is_internal_attribute

from provisioner.errors import RenderError
from provisioner.inventory.model import Secret
from provisioner.microsip.inidoc import is_password_key, unquote
from provisioner.render.budget import (
    CLOCK,
    COLLECTIONS,
    DEFAULT_BUDGET,
    SIZED,
    SIZING_CALLS,
    OverBudget,
    RenderBudget,
    ValueLimits,
)

Template = jinja2.Template
MICROSIP_TEMPLATE = "microsip.ini.j2"
OVERRIDE_TEMPLATE = "override.ini.j2"
_LINE_BREAKING = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
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
    """``secret`` as templates may see it; it must have passed ``vault.check_policy``.

    The policy (no control characters, surrounding spaces or quotes) makes a password its own
    INI text: it is written as it is, without the checks other values get.
    """
    return SealedValue(secret)


_SEALED = (SealedValue, Secret)  # a tuple: isinstance with it is a little faster than with a union


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
        if start < 0 or not sep or not is_password_key(key) or value.strip() != marker:
            raise _AtLine(frame, str(_SealedUse()))
        places.append((start, start + len(marker), secret))
    if text.count(_MARK_START) != len(placements):  # a marker written twice (or forged)
        raise _AtLine(placements[0][1], str(_SealedUse()))
    for start, end, secret in sorted(places, key=lambda place: place[0], reverse=True):
        text = text[:start] + secret.reveal() + text[end:]
    return text


# --------------------------------------------------------------------------- filters


def default_template_dir() -> Path:
    """The templates shipped with the tool (the repository's ``templates/`` folder)."""
    packaged = importlib.resources.files("provisioner").joinpath("templates")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "templates"


def ini_value(value: object) -> str:
    """Text for one INI value (the ``ini`` filter): booleans as 0/1, lists joined by spaces.

    The result reads back as exactly the value through ``GetPrivateProfileString``: a value
    enclosed in quotes gets one protective pair more (the profile API strips one pair, and
    MicroSIP writes hooks and device names that way); surrounding whitespace, which the
    profile API strips, is refused. A password, while a template renders, becomes a marker
    that :func:`render` checks and fills; outside a render it is refused.
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
        if placements is None:
            raise _SealedUse
        return placements.mark(_secret_of(value))
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


@jinja2.pass_environment
def _finalize(environment: jinja2.Environment, value: object) -> object:
    """What ``{{ value }}`` writes: no password (without ``| ini`` it would go somewhere
    unchecked), no list or dict larger than the budget (``str()`` writes it in one C call)."""
    if isinstance(value, _SEALED):
        raise _SealedUse
    if isinstance(value, COLLECTIONS) and isinstance(environment, TemplateEnvironment):
        environment.limits.expanded(value)
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


_CHUNKS_PER_LOOK = 64  # output chunks taken between two counts of the output


# --------------------------------------------------------------------------- the environment


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator with ``~`` checked like the other operators, and the lists,
    tuples and dicts a template writes out checked against the budget once made."""

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.limits.expanded(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.limits.expanded(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # the names of {% for a, b in ... %}
            super().visit_Tuple(node, frame)
            return
        self.write("environment.limits.expanded(")
        super().visit_Tuple(node, frame)
        self.write(")")

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
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
        self.limits = ValueLimits(budget)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # The sandbox's rule, and no attribute of a password is safe. (A SealedValue has none:
        # looking one up tries its items, which raises.)
        return not (
            isinstance(obj, _SEALED) or attr.startswith("_") or is_internal_attribute(obj, attr)
        )

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if isinstance(left, _SEALED) or isinstance(right, _SEALED):
            raise _SealedUse
        self.limits.binop(operator, left, right)
        return self.limits.result(self.binop_table[operator](left, right))

    def call(  # the sandbox's own parameter names, which keep keyword arguments free
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if isinstance(__obj, _SEALED):
            raise _SealedUse
        name = getattr(__obj, "__name__", "")
        if name in SIZING_CALLS:
            if name == "join" and args and not isinstance(args[0], list):
                args = (list(args[0]), *args[1:])  # measured before joining
            __self.limits.call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, SIZED) and len(result) > __self.budget.output:
            __self.limits.over("a value")
        return result

    def concat_values(self, values: Sequence[Any]) -> str:
        """``a ~ b``: the parts as text, joined, within the budget."""
        parts = [str(value) for value in values]  # a sealed value raises here
        if sum(map(len, parts)) > self.budget.output:
            self.limits.over("a joined value")
        return "".join(parts)


@jinja2.pass_environment
def _sum(
    environment: jinja2.Environment,
    iterable: Iterable[Any],
    attribute: str | int | None = None,
    start: Any = 0,
) -> Any:
    """Jinja's ``sum`` filter, one checked ``+`` at a time: Python's sum() of lists is one C
    call, quadratic in their number, that no clock could stop."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    limits = environment.limits if isinstance(environment, TemplateEnvironment) else None
    total = start
    for item in iterable:
        if limits is not None:
            limits.binop("+", total, item)
        total = total + item
    return total


def _guarded_filter(
    name: str, function: Callable[..., Any], limits: ValueLimits
) -> Callable[..., Any]:
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
        finalize=_finalize,
        budget=budget,
    )
    env.filters["sum"] = _sum
    # INI needs no JSON, and json's C encoder writes any value whole without the clock looking.
    del env.filters["tojson"]
    for name, function in list(env.filters.items()):
        env.filters[name] = _guarded_filter(name, function, env.limits)
    env.filters["ini"] = ini_value
    env.filters["bool01"] = bool01
    env.filters["quoted"] = quoted
    return env


def load_template(env: TemplateEnvironment, name: str) -> jinja2.Template:
    """Compile a template; syntax errors become RenderError with file and line."""
    clocked = CLOCK.start(env.budget)  # constant folding runs filters at compile time
    try:
        return env.get_template(name)
    except jinja2.TemplateNotFound:
        raise RenderError(f"template {name} not found") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(
            f"{exc.filename or name}:{exc.lineno}: template syntax error: {exc.message}"
            + _snippet(exc.filename, exc.lineno)
        ) from None
    except (_ValueError, OverBudget) as exc:
        raise RenderError(f"{name}: {exc} (while compiling it)") from None
    except RecursionError:  # Jinja's lexer, parser and compiler recurse for each level
        raise RenderError(f"{name}: nested too deeply (while compiling it)") from None
    finally:
        if clocked:
            CLOCK.stop()


# --------------------------------------------------------------------------- rendering

_TEMPLATE_ERRORS = (
    jinja2.UndefinedError,
    _ValueError,
    OverBudget,
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
        clocked = CLOCK.start(budget)
        try:
            text = _generate(template, context, budget, clocked=clocked)
        finally:
            if clocked:
                CLOCK.stop()
        return _place_secrets(text, placements) if placements else text
    except _AtLine as exc:
        file, line = _position(exc.position, template)
        detail = exc.detail
        _release(exc)
    finally:
        _PLACEMENTS.reset(token)
    raise RenderError(
        f"{file}:{line}: {detail} (rendering {target})" + _snippet(file, line),
        file=file,
        line=line,
    )


def _release(exc: BaseException | None) -> None:
    """Let go of a failed render's frames, and so of the values it made, now.

    Its exceptions hold them through their tracebacks; Jinja's traceback rewriting (not used
    here) tied them into cycles that only the garbage collector breaks. Until then the next
    render would start with this one's memory still held, and be measured from there.
    """
    while exc is not None:
        context, exc.__context__, exc.__traceback__ = exc.__context__, None, None
        exc = context


def _generate(
    template: jinja2.Template,
    context: Mapping[str, object],
    budget: RenderBudget,
    *,
    clocked: bool,
) -> str:
    """The rendered text, stopped as soon as it is longer than the budget allows.

    Chunks are taken a few dozen at a time (a Python loop per chunk cost more than the rest of
    the render); no single chunk is larger than the budget, which every value is held to.
    Every failure keeps its template line: the clock, once over, raises at each tick, so it is
    stopped before the error is turned into a message, and a tick that lands here, between
    two chunks, is charged to the line where the template stands.
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
    except _TEMPLATE_ERRORS as exc:
        if clocked:
            CLOCK.stop()
        # Where the template stands when it is suspended; else the innermost template frame.
        position = _running_template(generator) or _raised_in(exc.__traceback__)
        raise _AtLine(position, _detail(exc)) from None
    except Exception:
        template.environment.handle_exception()  # a bug: raises with template lines shown


def _detail(exc: BaseException) -> str:
    if isinstance(exc, jinja2.TemplateError):
        return exc.message or str(exc)
    if isinstance(exc, RecursionError):
        return "templates include or call each other without end"
    return str(exc)


def _raised_in(tb: TracebackType | None) -> tuple[jinja2.Template, int] | None:
    """The innermost template (and compiled line) in a traceback."""
    found = None
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if template is not None:
            found = (template, tb.tb_lineno)
        tb = tb.tb_next
    return found


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


def _snippet(file: str | None, line: int | None) -> str:
    if not file or not line:
        return ""
    try:
        text = Path(file).read_text(encoding="utf-8").splitlines()[line - 1]
    except (OSError, IndexError, UnicodeDecodeError):
        return ""
    return f"\n    {line} | {text.strip()[:120]}"
