"""The command line: thin typer commands over the library; the only place that prints."""

from __future__ import annotations

import os
import sys

import typer

from provisioner.cli import helpdesk, inventory_cmds, keys, lab, phase1, remote, rollout, secrets
from provisioner.cli.helpstyle import App
from provisioner.errors import InternalError, ProvisionerError, UsageError

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70

app = App(
    help="Configure MicroSIP on fleets of Windows workstations.",
    no_args_is_help=True,
    # Rich tracebacks show local variables; a local may hold a decrypted value.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.command()(phase1.validate)
app.command()(phase1.render)
app.command()(phase1.explain)
app.command("push")(remote.push_cmd)
app.command("diff")(remote.diff_cmd)
app.command("rollback")(remote.rollback_cmd)
app.command("doctor")(remote.doctor_cmd)
app.command("rollout")(rollout.rollout)
app.add_typer(rollout.runs_app, name="runs")
app.command("audit")(rollout.audit)
app.add_typer(helpdesk.app, name="user")
app.add_typer(lab.app, name="lab")
app.add_typer(inventory_cmds.app, name="inventory")
app.add_typer(keys.app, name="keys")
app.add_typer(secrets.app, name="secrets")


# Options whose value may be left out, and what a bare option means. Typer has no optional
# option values (its flag_value is ignored), so a bare one gets its value here.
OPTIONAL_VALUES = {"--only-failed": "last"}


def fill_optional_values(argv: list[str]) -> list[str]:
    """``rollout --only-failed`` (no RUN, or another option next) means ``--only-failed last``."""
    filled: list[str] = []
    for index, arg in enumerate(argv):
        filled.append(arg)
        if arg == "--":
            return filled + argv[index + 1 :]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg in OPTIONAL_VALUES and (following is None or following.startswith("-")):
            filled.append(OPTIONAL_VALUES[arg])
    return filled


def exit_code_for(exc: Exception) -> int:
    """The exit code of an error that ends a command: 2 for a usage error, 1 for any other
    error of the tree, 70 for an internal one (an :class:`InternalError`, or a bug)."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, ProvisionerError) and not isinstance(exc, InternalError):
        return EXIT_INPUT
    return EXIT_INTERNAL


def main() -> None:
    """Run the CLI, turning every error into one message and an exit code."""
    try:
        app(args=fill_optional_values(sys.argv[1:]), standalone_mode=True)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as exc:
        # typer turns Ctrl-C into a silent exit 130; say what happened.
        if exc.code == 130:
            typer.echo("interrupted", err=True)
        raise
    except Exception as exc:
        code = exit_code_for(exc)
        if code != EXIT_INTERNAL:
            typer.echo(f"error: {exc}", err=True)
            sys.exit(code)
        if os.environ.get("PROVISIONER_DEBUG"):
            raise
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else ""
        typer.echo(
            f"internal error: {type(exc).__name__}{where}; please report it "
            "(set PROVISIONER_DEBUG=1 for a traceback)",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
