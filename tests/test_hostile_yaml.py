"""Hostile YAML from anyone who can edit the inventory: refused with file:line, in bounded memory.

A few hundred bytes of nested aliases expand to billions of values, thousands of nested ``[``
crash ruamel's C composer (it recurses in C), a recursive alias loops. Every command that reads
the inventory is run on such files in a child process under a memory limit, so that a
regression fails the test instead of taking the machine down; how long each takes and how much
memory it uses is measured by ``bench/hostile_bench.py``, not here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import InventoryError
from provisioner.inventory import yamldoc
from provisioner.inventory.loader import InventoryErrors, load_inventory
from provisioner.secrets.secretstore import scan_inventory
from tests.hostilekit import HOSTILE, run_limited
from tests.phase1kit import BASE, write_inventory

COMMANDS: dict[str, tuple[str, ...]] = {
    "validate": ("validate",),
    "secrets lint": ("secrets", "lint"),
    "inventory list": ("inventory", "list"),
    "user show": ("user", "show", "u1"),
}


@pytest.fixture(scope="module")
def hostile_inventories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A clean inventory per hostile file, with that file added (written as is, never parsed)."""
    roots = {}
    for name, (text, _) in HOSTILE.items():
        root = write_inventory(tmp_path_factory.mktemp(name) / "inv", BASE)
        (root / "hostile.yaml").write_text(text, encoding="utf-8")
        roots[name] = root
    return roots


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_every_command_refuses_hostile_yaml_with_file_and_line(
    name: str, command: str, hostile_inventories: dict[str, Path]
) -> None:
    root = hostile_inventories[name]
    result = run_limited(*COMMANDS[command], "-i", str(root), cwd=root.parent)
    output = result.stdout + result.stderr
    # 1: an input error. Not 70 (an internal error), nor killed by a signal or the memory limit.
    assert result.returncode == 1, (result.returncode, output[-2000:])
    assert "Traceback" not in output and "MemoryError" not in output
    assert f"hostile.yaml:{HOSTILE[name][1]}:" in output, output[-2000:]


# --------------------------------------------------------------------------- the limits


def _compose_error(text: str) -> InventoryError:
    with pytest.raises(InventoryError) as caught:
        yamldoc.compose_tree(text, "f.yaml")
    with pytest.raises(InventoryError) as again:
        yamldoc.compose_text(text, "f.yaml")
    assert str(again.value) == str(caught.value)  # the loader and the secret scanner agree
    return caught.value


def _nested(levels: int) -> str:
    return "a: " + "[" * (levels - 1) + "x" + "]" * (levels - 1) + "\n"


def test_nesting_up_to_the_limit_is_read_and_one_more_is_not() -> None:
    assert yamldoc.compose_tree(_nested(yamldoc.MAX_DEPTH), "f.yaml")[0] is not None
    yamldoc.compose_text(_nested(yamldoc.MAX_DEPTH), "f.yaml")
    error = _compose_error(_nested(yamldoc.MAX_DEPTH + 1))
    assert (error.file, error.line) == ("f.yaml", 1)
    assert "nested too deeply" in str(error)


def test_block_nesting_past_the_limit_names_its_line() -> None:
    keys = "".join("  " * (i + 1) + f"k{i}:\n" for i in range(70))
    error = _compose_error("ok: 1\nx:\n" + keys + "  " * 71 + "v\n")
    # Line 3 holds the second level (under x), so line 2 + MAX_DEPTH the first one too deep.
    assert error.line == 2 + yamldoc.MAX_DEPTH


def test_aliases_used_deeper_than_the_limit_are_refused() -> None:
    levels = yamldoc.MAX_DEPTH // 2 + 1
    text = f"a: &x {'[' * levels}1{']' * levels}\nb: {'[' * levels}*x{']' * levels}\n"
    assert "nested too deeply" in str(_compose_error(text))


def test_alias_expansion_counts_each_use_with_what_it_repeats() -> None:
    # a1 repeats a0 (10 values) 10 times, a2 repeats a1 10 times...: 10**n values at level n.
    def laughs(levels: int) -> str:
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        for i in range(1, levels + 1):
            lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
        return "\n".join(lines) + "\n"

    yamldoc.compose_tree(laughs(3), "f.yaml")  # about 12,000 values: within the allowance
    error = _compose_error(laughs(5))  # about 1.2 million values
    assert error.line == 5  # a4: repeated ten times by a5, it adds the most
    assert "aliases expand this file to" in str(error)


def test_a_file_may_hold_a_million_values_and_its_aliases_do_not_multiply_that() -> None:
    # 100,000 values written, ten times that with the aliases: the old allowance (ten per
    # value written) let the tree builder make a node for each.
    text = "a: &a [" + "x, " * 100_000 + "]\nb: [" + "*a, " * 9 + "]\n"
    error = _compose_error(text)
    assert "aliases expand this file to 1,000," in str(error)
    assert "more than the 1,000,000 a file may hold" in str(error)
    assert (error.line, error.column) == (1, 4)


def test_a_file_of_more_values_than_allowed_is_refused_before_composing() -> None:
    # 3 MB of short scalars; at 16 MiB, composing took 70 s and 3.3 GiB.
    text = "a: [" + "x, " * yamldoc.MAX_VALUES + "]\n"
    error = _compose_error(text)
    assert "more than 1,000,000 values" in str(error)
    column = 5 + 3 * (yamldoc.MAX_VALUES - 3)  # the mapping, its key and the list count too
    assert (error.line, error.column) == (1, column)


def test_recursive_aliases_are_refused() -> None:
    for text in ("a: &a [*a]\n", "a: &a\n  b: *a\n", "a: &a {b: [c, {d: *a}]}\n"):
        error = _compose_error(text)
        assert "recursive alias" in str(error) and error.line == 1


def test_many_flow_collections_are_read_when_shallow() -> None:
    # More '[' than the cheap bound allows: the depth is measured by the parser first.
    text = "".join(f"k{i}: [[a], [b]]\n" for i in range(3_000))
    tree, _ = yamldoc.compose_tree(text, "f.yaml")
    assert tree is not None and len(tree.items) == 3_000
    error = _compose_error(text + "deep: " + "[" * 100 + "]" * 100 + "\n")
    assert error.line == 3_001


def test_a_file_larger_than_the_limit_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("w", encoding="utf-8") as file:
        file.write("users:\n")
        file.write("# padding\n" * (yamldoc.MAX_FILE_BYTES // 10))
    with pytest.raises(InventoryError) as caught:
        yamldoc.read_text(path)
    assert (caught.value.file, caught.value.line) == (str(path), 1)
    assert "larger than 16 MiB" in str(caught.value)


def test_anchors_an_inventory_really_uses_still_load(tmp_path: Path) -> None:
    groups = """\
        groups:
          berlin:
            account: &pbx {server: pbx.example.com, transport: tls}
          hamburg:
            account: *pbx
          munich:
            account: *pbx
        """
    root = write_inventory(tmp_path / "inv", {**BASE, "groups.yaml": groups})
    inventory = load_inventory(root)
    assert inventory.groups["munich"].layer.account["server"].value == "pbx.example.com"
    assert scan_inventory(root).problems == ()


def test_the_loader_reports_every_hostile_file_with_its_line(tmp_path: Path) -> None:
    # In-process, only the files that cannot hurt the test process without the limits.
    texts = {
        "a.yaml": "users: &u\n  u9: *u\n",
        "b.yaml": "groups:\n  g9: " + "[" * 80 + "]" * 80 + "\n",
    }
    root = write_inventory(tmp_path / "inv", BASE)
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    with pytest.raises(InventoryErrors) as caught:
        load_inventory(root)
    found = sorted((Path(e.file).name, e.line) for e in caught.value.errors)
    assert found == [("a.yaml", 1), ("b.yaml", 2)]
