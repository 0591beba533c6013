"""``provisioner inventory``: list what an inventory holds and draw its group graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioner.cli.common import InventoryOpt, echo, load_model, make_console
from provisioner.cli.helpstyle import App

app = App(help="Inspect an inventory.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
LimitOpt = Annotated[
    str, typer.Option("--limit", "-l", metavar="TARGETS", help="Target selection (see validate).")
]


@app.command("list")
def list_inventory(
    inventory: InventoryOpt = Path("."), limit: LimitOpt = "", as_json: JsonOpt = False
) -> None:
    """Workstations with their groups, install mode and users."""
    from rich.table import Table

    from provisioner.inventory import resolve

    model = load_model(inventory)
    selection = resolve.Selection(limit)
    rows: list[dict[str, Any]] = []
    for name in sorted(model.workstations):
        station = model.workstations[name]
        users = [u for u in station.users if selection.matches(model, name, u)]
        if limit and not users and not selection.matches(model, name, None):
            continue
        plan = resolve.resolve_station(model, name)
        rows.append(
            {
                "workstation": name,
                "address": station.address,
                "groups": list(plan.groups),
                "mode": plan.install.mode,
                "users": users,
                "accounts": sum(len(model.users[u].accounts) for u in users),
            }
        )
    selected = sorted({u for row in rows for u in row["users"]}) if limit else sorted(model.users)
    for problem in selection.unmatched(model) if limit else []:
        typer.echo(f"warning: {problem}", err=True)
    if as_json:
        echo(json.dumps({"workstations": rows, "users": selected}, indent=2))
        return
    table = Table(
        title=f"{len(rows)} workstation(s), {len(selected)} user(s)", title_justify="left"
    )
    # Nothing is cut short: the other columns narrow first, and what is still too wide folds
    # onto the next line instead of ending in an ellipsis.
    table.add_column("workstation", overflow="fold", no_wrap=True)
    for column in ("address", "groups", "mode", "users", "accounts"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            str(row["workstation"]),
            str(row["address"]),
            ", ".join(row["groups"]),
            str(row["mode"]),
            ", ".join(row["users"]),
            str(row["accounts"]),
        )
    make_console().print(table)


@app.command()
def graph(inventory: InventoryOpt = Path("."), as_json: JsonOpt = False) -> None:
    """The group graph: each group under its parents, with its workstations and users."""
    from rich.tree import Tree

    model = load_model(inventory)
    children: dict[str, list[str]] = {name: [] for name in model.groups}
    for group in model.groups.values():
        for parent in group.parents:
            children.setdefault(parent, []).append(group.name)
    members: dict[str, list[str]] = {name: [] for name in model.groups}
    for station in model.workstations.values():
        for name in station.groups:
            members.setdefault(name, []).append(f"workstation {station.name}")
    for user in model.users.values():
        for name in user.groups:
            members.setdefault(name, []).append(f"user {user.name}")
    if as_json:
        echo(
            json.dumps(
                {
                    name: {
                        "parents": list(g.parents),
                        "children": children[name],
                        "members": members[name],
                        "description": g.description,
                    }
                    for name, g in sorted(model.groups.items())
                },
                indent=2,
            )
        )
        return
    tree = Tree("groups")

    def add(branch: Tree, name: str) -> None:
        group = model.groups[name]
        node = branch.add(f"[bold]{name}[/bold]  {group.description}")
        for member in members[name]:
            node.add(member)
        for child in sorted(children[name]):
            add(node, child)

    for name in sorted(n for n, g in model.groups.items() if not g.parents):
        add(tree, name)
    make_console().print(tree)
