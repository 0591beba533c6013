"""The Jinja environment and rendering of one target; the only jinja2 user.

Templates produce logical INI text; :mod:`provisioner.ini` turns it into MicroSIP's bytes.
The environment is sandboxed, undefined variables are errors, and every value written through
the ``ini`` filter is checked so that no value can add a line to the file.
"""

from __future__ import annotations

import importlib.resources
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from provisioner.errors import PolicyViolationError, RenderError
from provisioner.inidoc import unquote
from provisioner.model import Secret

TemplateEnvironment = SandboxedEnvironment
Template = jinja2.Template
MICROSIP_TEMPLATE = "microsip.ini.j2"
OVERRIDE_TEMPLATE = "override.ini.j2"
_LINE_BREAKING = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


class _ValueError(Exception):
    """Raised by filters; turned into a RenderError that names the template line."""


def default_template_dir() -> Path:
    """The templates shipped with the tool (the repository's ``templates/`` folder)."""
    packaged = importlib.resources.files("provisioner").joinpath("templates")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "templates"


def ini_value(value: object) -> str:
    """Text for one INI value: booleans as 0/1, lists joined by spaces, secrets revealed.

    The result reads back as exactly the value through ``GetPrivateProfileString``: a value
    enclosed in quotes gets one protective pair more (the profile API strips one pair, and
    MicroSIP writes hooks and device names that way); surrounding whitespace, which the
    profile API strips, is refused.
    """
    text = _plain_value(value)
    if text != text.strip():
        raise _ValueError("a value starts or ends with whitespace, which Windows strips")
    return f'"{text}"' if unquote(text) != text else text


def _plain_value(value: object) -> str:
    if isinstance(value, Secret):
        text = value.reveal()
        if _LINE_BREAKING.search(text):
            raise PolicyViolationError("a secret value contains a line break or control character")
        return text
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
        return " ".join(_plain_value(v) for v in value)
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises its own error, which names the variable
        raise _ValueError("undefined value")
    text = str(value)
    if _LINE_BREAKING.search(text):
        raise _ValueError("a value contains a line break or control character")
    return text


def _refuse_raw_secret(value: object) -> object:
    """``{{ password }}`` without ``| ini`` would write ``Secret(***)`` into the file."""
    if isinstance(value, Secret):
        raise _ValueError("a password is written only through the ini filter: {{ ... | ini }}")
    return value


def bool01(value: object) -> str:
    """``1`` or ``0`` for anything truthy or falsy (``"0"`` counts as false)."""
    if isinstance(value, str):
        return "0" if value.strip().lower() in ("", "0", "false", "no", "off") else "1"
    return "1" if value else "0"


def quoted(value: object) -> str:
    """The value wrapped in double quotes, as MicroSIP writes device names and hooks.

    The profile API strips exactly that pair, so the value reads back unchanged.
    """
    text = _plain_value(value)
    if text != text.strip():
        raise _ValueError("a value starts or ends with whitespace, which Windows strips")
    return f'"{text}"'


def make_environment(template_dirs: Sequence[Path]) -> SandboxedEnvironment:
    """A sandboxed, strict environment looking in ``template_dirs`` then the defaults."""
    search = [str(p) for p in template_dirs if p.is_dir()] + [str(default_template_dir())]
    env = SandboxedEnvironment(
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
    )
    env.filters["ini"] = ini_value
    env.filters["bool01"] = bool01
    env.filters["quoted"] = quoted
    return env


def load_template(env: SandboxedEnvironment, name: str) -> jinja2.Template:
    """Compile a template; syntax errors become RenderError with file and line."""
    try:
        return env.get_template(name)
    except jinja2.TemplateNotFound:
        raise RenderError(f"template {name} not found") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(
            f"{exc.filename or name}:{exc.lineno}: template syntax error: {exc.message}"
            + _snippet(exc.filename, exc.lineno)
        ) from None


def render(template: jinja2.Template, context: Mapping[str, object], target: str) -> str:
    """Render one target; every failure names the template file and line."""
    try:
        return template.render(context)
    except (jinja2.UndefinedError, _ValueError, jinja2.TemplateError, TypeError) as exc:
        file, line = _template_frame(exc.__traceback__, template)
        detail = exc.message if isinstance(exc, jinja2.TemplateError) else str(exc)
        raise RenderError(
            f"{file}:{line}: {detail} (rendering {target})" + _snippet(file, line),
            file=file,
            line=line,
        ) from None


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
