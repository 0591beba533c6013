"""Every command's ``--help`` as a person reads it on an 80-column terminal."""

from __future__ import annotations

import io
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pytest
import typer.main

from provisioner.cli import app, main

# Typer's labels for Python types (<bool>, <str>, <int range>, <path>, <list[Path]>) and the
# braces it puts around a required argument in the usage line.
TYPE_LABEL = re.compile(r"<(bool|str|int|float|path|dir|file|list\[)[^>]*>|[{}]")


def _commands() -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = [()]

    def walk(command: object, path: tuple[str, ...]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            found.append((*path, name))
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = _commands()


def _help(path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    out, err = io.StringIO(), io.StringIO()
    with (
        redirect_stdout(out),
        redirect_stderr(err),
        mock.patch.object(sys, "argv", ["provisioner", *path, "--help"]),
        pytest.raises(SystemExit) as exited,
    ):
        main()
    assert exited.value.code == 0, err.getvalue()
    return out.getvalue()


def test_every_command_is_walked() -> None:
    assert len(COMMANDS) > 30
    assert ("user", "set-password") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "provisioner")
def test_help_reads_at_80_columns(path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    text = _help(path, monkeypatch)
    assert "Usage: provisioner" in text
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{' '.join(path) or 'provisioner'} --help, line {number}: {line!r}"
        assert len(line) <= 80, where
        assert not TYPE_LABEL.search(line), where
        # A word wider than its column is cut with an ellipsis.
        assert "\N{HORIZONTAL ELLIPSIS}" not in line, where


def test_every_value_option_declares_its_metavar() -> None:
    missing = []

    def walk(command: object, path: tuple[str, ...]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))
        for param in getattr(command, "params", []):
            flag = getattr(param, "is_flag", False)
            if param.param_type_name == "option" and not flag and param.metavar is None:
                missing.append(f"{' '.join(path)} {param.opts[0]}")

    walk(typer.main.get_command(app), ())
    assert not missing


def test_flags_choices_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    push = _help(("push",), monkeypatch)
    assert "Usage: provisioner push [OPTIONS] WORKSTATION" in push
    assert re.search(r"--check +Change nothing", push)
    assert re.search(r"--if-running +skip\|stop\|force ", push)
    assert re.search(r"--identity +FILE ", push)
    assert re.search(r"--inventory +-i +DIR ", push)
    validate = _help(("validate",), monkeypatch)
    assert "Usage: provisioner validate [OPTIONS] [INVENTORY]" in validate
    assert "text|json|junit|github" in validate
    assert "argon2id|scrypt" in _help(("keys", "init"), monkeypatch)
    assert "none|encrypted|tls" in _help(("secrets", "set"), monkeypatch)
    assert "text|json|github" in _help(("secrets", "lint"), monkeypatch)


def test_docstrings_wrap_as_paragraphs(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _help(("rollout",), monkeypatch)
    # Its docstring breaks lines at 90 columns: kept, each would wrap again at 80 and the
    # paragraph would take five ragged lines instead of three.
    lines = text[text.index(" Exit 0") :].splitlines()
    paragraph = lines[: [line.strip() for line in lines].index("")]
    assert len(paragraph) == 3, paragraph
