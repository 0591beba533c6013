"""How every command's ``--help`` reads, decided once for the whole command line.

Typer labels each value with its Python type (``<bool>`` beside a flag, ``<str>``,
``<list[Path]>``) and writes a required argument as ``{user}`` in the usage line. Every group
and command is built from :class:`App`, whose commands show instead:

- nothing beside a flag (``--check``, never ``--check true``);
- the metavar the option declares (``FILE``, ``DIR``, ``N``, or its choices ``a|b|c``), else
  its name in capitals;
- arguments by name in capitals: ``provisioner push [OPTIONS] WORKSTATION``;
- docstrings as paragraphs, wrapped to the terminal rather than at the source's line breaks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import typer
import typer.core
from typer.models import CommandFunctionType


def choices(values: Iterable[str]) -> str:
    """The metavar of an option that takes one of ``values``: ``skip|stop|force``."""
    return "|".join(values)


def _capitals(param: typer.core.TyperArgument | typer.core.TyperOption) -> str:
    return (param.name or "value").upper()


class PlainArgument(typer.core.TyperArgument):
    """An argument shown by its metavar alone, ``[NAME]`` when it may be left out."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.metavar or _capitals(self)
        if self.nargs != 1:
            name += "..."
        return [name if self.required else f"[{name}]"]


class PlainOption(typer.core.TyperOption):
    """An option shown with its metavar; a flag with nothing beside it."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        return self.metavar or _capitals(self)


def _plain(param: object) -> None:
    # Typer builds its own parameter objects and has no hook to choose their class; the
    # subclasses above only change how a parameter is displayed, never how it parses.
    if isinstance(param, typer.core.TyperArgument):
        if param.metavar is None:
            param.metavar = _capitals(param)
        param.__class__ = PlainArgument
    elif isinstance(param, typer.core.TyperOption):
        param.__class__ = PlainOption


def paragraphs(text: str | None) -> str | None:
    """A docstring with each paragraph on one line, for the terminal to wrap."""
    if not text:
        return text
    return "\n\n".join(
        block if block.startswith("\b") else " ".join(block.split("\n"))
        for block in inspect.cleandoc(text).split("\n\n")
    )


class _PlainHelp:
    """This module's rules for a click command or group: paragraphs, plain metavars."""

    help: str | None
    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = paragraphs(self.help)
        for param in self.params:
            _plain(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        _plain(option)
        return option


class Command(_PlainHelp, typer.core.TyperCommand):
    """A command whose help follows this module's rules."""


class Group(_PlainHelp, typer.core.TyperGroup):
    """A command group whose help follows this module's rules."""


class App(typer.Typer):
    """A typer application whose groups and commands are :class:`Group` and :class:`Command`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", Group)
        super().__init__(**kwargs)

    def command(
        self, name: str | None = None, **kwargs: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        kwargs.setdefault("cls", Command)
        return super().command(name, **kwargs)
