"""``validate``, ``render`` and ``explain``: the offline commands (Phase 1 only)."""

from __future__ import annotations

import difflib
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from provisioner.cli.common import (
    IdentityOpt,
    PassFdOpt,
    PassFileOpt,
    echo,
    keyring_for_keys_in_use,
    load_model,
    make_console,
)
from provisioner.cli.helpstyle import choices
from provisioner.errors import NotFoundError, OptionError

if TYPE_CHECKING:
    from provisioner.inventory.model import Finding
    from provisioner.render import build as phase1
    from provisioner.secrets import vault

VALIDATE_FORMATS = ("text", "json", "junit", "github")

InventoryArg = Annotated[
    Path,
    typer.Argument(
        metavar="INVENTORY",
        help="Inventory directory.",
        envvar="PROVISIONER_INVENTORY",
        file_okay=False,
    ),
]
InventoryOpt = Annotated[
    Path | None,
    typer.Option(
        "--inventory",
        "-i",
        metavar="DIR",
        help="Inventory directory, as for the other commands (instead of INVENTORY).",
        file_okay=False,
    ),
]
LimitOpt = Annotated[
    str,
    typer.Option(
        "--limit",
        "-l",
        metavar="TARGETS",
        help="Targets: comma-separated globs on workstation or user names, group:NAME, "
        "user:GLOB, ws:GLOB; !TERM excludes, &TERM requires.",
    ),
]
TemplatesOpt = Annotated[
    Path | None,
    typer.Option(
        "--templates",
        metavar="DIR",
        help="Templates folder (default: INVENTORY/templates, then the built-in templates).",
        file_okay=False,
    ),
]


def pick_inventory(ctx: typer.Context, positional: Path, option: Path | None) -> Path:
    """INVENTORY or -i/--inventory (which wins over PROVISIONER_INVENTORY); both must agree."""
    if option is None:
        return positional
    source = ctx.get_parameter_source("inventory")
    given = source is not None and source.name == "COMMANDLINE"
    if given and positional.resolve() != option.resolve():
        raise OptionError(f"two inventories given: {positional} and -i {option}; give one of them")
    return option


def run_build(
    inventory: Path,
    limit: str,
    templates: Path | None,
    identities: list[Path] | None,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
) -> phase1.BuildResult:
    """Phase 1 with real keys when an identity is given, placeholders otherwise."""
    from provisioner.inventory import resolve
    from provisioner.inventory.model import Finding
    from provisioner.render import build as phase1

    factory: phase1.OpenerFactory = phase1.placeholder_opener
    if identities or passphrase_file or passphrase_fd is not None:

        def factory(recipients: vault.Recipients) -> vault.Opener:
            return keyring_for_keys_in_use(recipients, identities, passphrase_file, passphrase_fd)

    result = phase1.build(
        inventory,
        selection=resolve.Selection(limit),
        opener_factory=factory,
        templates=templates,
    )
    if limit.strip() and result.inventory is not None and not result.targets:
        # A typo in CI's --limit must not pass as "0 errors".
        result.findings.append(
            Finding("error", "limit", f"no target matches the selection --limit {limit!r}")
        )
    return result


def validate(
    ctx: typer.Context,
    inventory: InventoryArg = Path("."),
    inventory_option: InventoryOpt = None,
    limit: LimitOpt = "",
    output: Annotated[
        str, typer.Option("--format", metavar=choices(VALIDATE_FORMATS), help="Report format.")
    ] = "text",
    strict: Annotated[bool, typer.Option("--strict", help="Warnings fail too.")] = False,
    templates: TemplatesOpt = None,
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
) -> None:
    """Load, resolve, render and lint every target; report every finding at once.

    Exit 0 when clean (warnings allowed unless --strict), 1 when there are findings.
    """
    if output not in VALIDATE_FORMATS:
        raise OptionError("--format must be text, json, junit or github")
    inventory = pick_inventory(ctx, inventory, inventory_option)
    result = run_build(inventory, limit, templates, identities, passphrase_file, passphrase_fd)
    real = bool(identities or passphrase_file or passphrase_fd is not None)
    keys = "real keys" if real else "placeholders (no private key)"
    failed = not result.ok or (strict and result.findings)
    if output == "json":
        echo(json.dumps(_json_report(result, keys), indent=2))
    elif output == "junit":
        echo(_junit_report(result))
    else:
        for line in finding_lines(result.findings, github=output == "github"):
            echo(line)
        counts = result.counts()
        echo(
            f"{len(result.files)} file(s) rendered for {len(result.targets)} target(s) with "
            f"{keys}: {counts.get('error', 0)} error(s), {counts.get('warning', 0)} warning(s)"
        )
    if failed:
        raise typer.Exit(1)


def finding_lines(findings: Sequence[Finding], *, github: bool = False) -> list[str]:
    """One line per finding (GitHub annotations with ``github``), repeats of one cause folded."""
    lines = []
    for finding, others in _grouped(findings):
        line = _github(finding) if github else str(finding)
        if others:
            shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
            line += f" (and {len(others)} more file(s): {shown})"
        lines.append(line)
    return lines


def _grouped(findings: Sequence[Finding]) -> list[tuple[Finding, list[str]]]:
    """Findings with one cause (the same code at the same inventory or template line) once.

    One undefined template variable, or one bad value in a group, would otherwise repeat for
    every rendered file; the first stands for the others, whose files are listed.
    """
    groups: dict[object, tuple[Finding, list[str]]] = {}
    for finding in findings:
        # A render error's message ends with the target it was rendering; the rest is the cause.
        cause = finding.message.replace(f" (rendering {finding.file})", "")
        key: object = (
            (finding.severity, finding.code, finding.path, finding.source, cause)
            if finding.source is not None
            else id(finding)
        )
        if key in groups:
            groups[key][1].append(finding.file)
        else:
            groups[key] = (finding, [])
    return list(groups.values())


def _json_report(result: phase1.BuildResult, keys: str) -> dict[str, object]:
    return {
        "ok": result.ok,
        "secrets": keys,
        "targets": [t.name for t in result.targets],
        "files": [f.relative_path for f in result.files],
        "findings": [f.to_dict() for f in result.findings],
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }


def _github_escape(text: str, *, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def _github(finding: Finding) -> str:
    """An annotation on a file of the repository: for a rendered file, where its value came from."""
    kind = "error" if finding.severity == "error" else "warning"
    file, line, column, message = finding.file, finding.line, finding.column, finding.message
    if finding.source is not None:
        file, line, column = finding.source.file, finding.source.line, finding.source.column
        if finding.value_source:  # say which rendered line the inventory value ended up on
            message = f"{finding.where} {finding.path}: {message}"
    place = f"file={_github_escape(file, prop=True)},line={line or 1}"
    if column:
        place += f",col={column}"
    message = _github_escape(message)
    title = _github_escape(f"{finding.code} {finding.path}".strip(), prop=True)
    return f"::{kind} {place},title={title}::{message}"


def _junit_report(result: phase1.BuildResult) -> str:
    from xml.sax.saxutils import escape, quoteattr

    by_target: dict[str, list[Finding]] = defaultdict(list)
    names = [t.name for t in result.targets]
    for finding in result.findings:
        key = finding.file if finding.file in names else "inventory"
        by_target[key].append(finding)
    cases = ["inventory", *names]
    failures = sum(1 for c in cases if any(f.severity == "error" for f in by_target[c]))
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuite name="provisioner validate" tests="{len(cases)}" failures="{failures}">',
    ]
    for case in cases:
        errors = [f for f in by_target[case] if f.severity == "error"]
        warnings = [f for f in by_target[case] if f.severity != "error"]
        lines.append(f'  <testcase classname="validate" name={quoteattr(case)}>')
        if errors:
            body = escape("\n".join(str(f) for f in errors))
            lines.append(f"    <failure message={quoteattr(errors[0].message)}>{body}</failure>")
        if warnings:
            lines.append(
                f"    <system-out>{escape(chr(10).join(str(f) for f in warnings))}</system-out>"
            )
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines)


def _in_git_tree_and_not_ignored(out: Path, relative_paths: list[str]) -> bool:
    """True when any file to be written under ``out`` would be inside a git tree, not ignored."""
    from provisioner.records import revision

    top = revision.work_tree(out)
    if top is None:
        return False
    return bool(revision.not_ignored(top, [out / relative for relative in relative_paths]))


def render(
    ctx: typer.Context,
    inventory: InventoryArg = Path("."),
    inventory_option: InventoryOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output folder.")] = Path(
        "build"
    ),
    limit: LimitOpt = "",
    templates: TemplatesOpt = None,
    identities: IdentityOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_fd: PassFdOpt = None,
    allow_in_git: Annotated[
        bool,
        typer.Option("--allow-in-git", help="Write real passwords inside a git working tree."),
    ] = False,
) -> None:
    """Write OUT/<workstation>/<user>/microsip.ini and OUT/<workstation>/override.ini.

    Files are UTF-16LE with BOM and CRLF, as MicroSIP writes them, readable by you only.
    """
    from provisioner.atomicfile import write_tree

    inventory = pick_inventory(ctx, inventory, inventory_option)
    real = bool(identities or passphrase_file or passphrase_fd is not None)
    result = run_build(inventory, limit, templates, identities, passphrase_file, passphrase_fd)
    for line in finding_lines(result.findings):
        echo(line)
    if not result.ok:
        echo("nothing written: fix the errors above first")
        raise typer.Exit(1)
    relative_paths = [built.relative_path for built in result.files]
    if real and not allow_in_git and _in_git_tree_and_not_ignored(out, relative_paths):
        raise OptionError(
            f"{out} is inside a git working tree and not ignored: rendered files would hold "
            "plaintext passwords; choose another --out, add it to .gitignore, or pass "
            "--allow-in-git"
        )
    old_umask = os.umask(0o077)
    try:
        # Below OUT, links are never followed and nothing but the rendered files is replaced.
        write_tree(out, ((built.relative_path, built.data) for built in result.files))
    finally:
        os.umask(old_umask)
    _summary(result, out, real)


def _summary(result: phase1.BuildResult, out: Path, real: bool) -> None:
    from rich.table import Table

    console = make_console()
    table = Table(title=f"Rendered into {out}", title_justify="left")
    for column in ("workstation", "mode", "users", "files", "accounts"):
        table.add_column(column)
    per_station: dict[str, list[phase1.BuiltFile]] = defaultdict(list)
    for built in result.files:
        per_station[built.target.workstation].append(built)
    for name, files in sorted(per_station.items()):
        users = [f.target.user for f in files if f.target.user]
        accounts = sum(f.accounts for f in files)
        table.add_row(
            name,
            files[0].install.mode,
            ", ".join(u for u in users if u),
            str(len(files)),
            str(accounts),
        )
    console.print(table)
    secrets = "real passwords (files are 0600)" if real else "placeholders PH-<pathtag>"
    console.print(
        f"{len(result.files)} files, {secrets}; {result.counts().get('warning', 0)} warning(s)"
    )


def explain(
    user: Annotated[str, typer.Argument(help="User name as in the inventory.")],
    key: Annotated[
        str | None,
        typer.Argument(help="A key (e.g. transport, updatesInterval); all keys if omitted."),
    ] = None,
    inventory: Annotated[
        Path,
        typer.Option(
            "--inventory", "-i", metavar="DIR", envvar="PROVISIONER_INVENTORY", file_okay=False
        ),
    ] = Path("."),
    workstation: Annotated[
        str | None,
        typer.Option("--workstation", "-w", metavar="NAME", help="Only this workstation."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show a user's final values and every layer they came from (passwords masked)."""
    from provisioner.inventory import resolve

    model = load_model(inventory)
    if user not in model.users:
        raise NotFoundError(f"no user {user!r} in {inventory}{_did_you_mean(user, model.users)}")
    on = sorted(s.name for s in model.workstations.values() if user in s.users)
    if workstation is not None and workstation not in on:
        if workstation not in model.workstations:
            hint = _did_you_mean(workstation, model.workstations)
            raise NotFoundError(f"no workstation {workstation!r} in {inventory}{hint}")
        raise NotFoundError(
            f"{user} is not on {workstation}; {user} is on " + (", ".join(on) or "no workstation")
        )
    stations = [name for name in on if workstation is None or name == workstation]
    report: list[dict[str, Any]] = []
    known: set[str] = set()
    for station in stations:
        profile = resolve.resolve_profile(model, station, user)
        sections: list[tuple[str, dict[str, resolve.Resolved]]] = [
            ("Settings", dict(profile.settings))
        ]
        sections += [(f"Account{a.index} ({a.id})", dict(a.keys)) for a in profile.accounts]
        entries: list[dict[str, Any]] = []
        for section, values in sections:
            for name, resolved in values.items():
                if key is not None and name.lower() != key.lower():
                    continue
                entries.append(
                    {
                        "section": section,
                        "key": name,
                        "value": _shown(name, resolved.value),
                        "enforced": name in profile.enforced_settings and section == "Settings",
                        "chain": [
                            {"value": _shown(name, s.value), "source": str(s.source)}
                            for s in resolved.chain
                        ],
                    }
                )
        known.update(name for _, values in sections for name in values)
        report.append({"workstation": station, "groups": list(profile.groups), "entries": entries})
    if key is not None and report and not any(r["entries"] for r in report):
        # Keys match case-insensitively: suggest in lower case, show the key's own spelling.
        folded = {name.lower(): name for name in known}
        matches = difflib.get_close_matches(key.lower(), list(folded), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(folded[m] for m in matches)}?" if matches else ""
        raise NotFoundError(f"{user} has no key {key!r}{hint}")
    if as_json:
        echo(json.dumps({"user": user, "workstations": report}, indent=2))
        return
    for station_report in report:
        groups = ", ".join(station_report["groups"]) or "-"
        echo(f"{user} on {station_report['workstation']} (groups: {groups})")
        for entry in station_report["entries"]:
            flag = "  (enforced)" if entry["enforced"] else ""
            echo(f"  [{entry['section']}] {entry['key']} = {entry['value']}{flag}")
            for link in entry["chain"]:
                echo(f"      {link['value']!s:<32} {link['source']}")
    if not report:
        echo(f"{user} is on no workstation")


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``; did you mean X?`` for the closest names (difflib), or nothing."""
    matches = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


def _shown(key: str, value: object) -> str:
    if key == "password":
        from provisioner.inventory.schema import token_kid

        kid = token_kid(value) if isinstance(value, str) else ""
        return f"(sealed, key {kid})" if kid else "(not set)"
    return str(value)
