"""The error tree: raised by its leaves, each class with its code, drawn whole in the docs.

Read from the source and docs/architecture.md (no import), so that a class added anywhere in
the package is seen.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "provisioner"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
ROOT_CLASS = "ProvisionerError"


@dataclass(frozen=True)
class ErrorClass:
    """A class of the tree as the source declares it."""

    name: str
    parent: str
    code: str | None  # its own ``code``, None when it only inherits one
    where: str  # file:line


def _trees() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(ROOT)): ast.parse(path.read_text(), filename=str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _name(node: ast.expr) -> str:
    """``X`` for ``X`` and ``module.X``."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _own_code(node: ast.ClassDef) -> str | None:
    for statement in node.body:
        target, value = None, None
        if isinstance(statement, ast.AnnAssign):
            target, value = statement.target, statement.value
        elif isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        if isinstance(target, ast.Name) and target.id == "code":
            assert isinstance(value, ast.Constant) and isinstance(value.value, str)
            return value.value
    return None


def error_classes(trees: dict[str, ast.Module]) -> dict[str, ErrorClass]:
    """Every class under ProvisionerError in ``trees`` (names are unique in the tree), the
    private ones (``_Skip``: signals that never leave their module) left out."""
    declared: list[tuple[ast.ClassDef, str]] = [
        (node, f"{file}:{node.lineno}")
        for file, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    ]
    root = ErrorClass(ROOT_CLASS, "", None, "")
    for node, where in declared:
        if node.name == ROOT_CLASS:
            root = ErrorClass(ROOT_CLASS, "", _own_code(node), where)
    found = {ROOT_CLASS: root}
    grown = True
    while grown:
        grown = False
        for node, where in declared:
            parents = [_name(base) for base in node.bases]
            parent = next((p for p in parents if p in found), None)
            if parent is None or node.name.startswith("_"):
                continue
            known = found.get(node.name)
            if known is not None:
                assert known.where == where, (
                    f"two error classes {node.name}: {known.where}, {where}"
                )
                continue
            found[node.name] = ErrorClass(node.name, parent, _own_code(node), where)
            grown = True
    return found


@dataclass(frozen=True)
class DrawnClass:
    """A class as docs/architecture.md draws it."""

    name: str
    parent: str
    code: str


_TREE_LINE = re.compile(r"^(?P<indent>(?:[│ ]   )*)(?:[├└]── )?(?P<name>\w+)\s+(?P<code>[\w-]+)")


def drawn_tree(text: str) -> dict[str, DrawnClass]:
    """The classes of the first code block of the section "Errors", with their parents."""
    section = text.split("\n## Errors\n", 1)[1]
    block = section.split("```\n", 2)[1]
    drawn: dict[str, DrawnClass] = {}
    chain: list[str] = []
    for line in block.splitlines():
        match = _TREE_LINE.match(line)
        assert match, f"docs/architecture.md, Errors: cannot read the tree line {line!r}"
        depth = len(match["indent"]) // 4 + (1 if line[len(match["indent"])] in "├└" else 0)
        del chain[depth:]
        name = match["name"]
        assert name not in drawn, f"docs/architecture.md draws {name} twice"
        drawn[name] = DrawnClass(name, chain[-1] if chain else "", match["code"])
        chain.append(name)
    return drawn


def direct_uses_of_the_root(trees: dict[str, ast.Module]) -> list[str]:
    """``file:line`` of every ``raise ProvisionerError`` and ``ProvisionerError(...)``."""
    found = []
    for file, tree in trees.items():
        for node in ast.walk(tree):
            used = (isinstance(node, ast.Call) and _name(node.func) == ROOT_CLASS) or (
                isinstance(node, ast.Raise)
                and node.exc is not None
                and _name(node.exc) == ROOT_CLASS
            )
            if used:
                found.append(f"{file}:{node.lineno}")
    return found


def test_no_module_raises_the_root_itself() -> None:
    found = direct_uses_of_the_root(_trees())
    assert found == [], f"raise a leaf of the tree (docs/architecture.md, Errors), not {ROOT_CLASS}"


def test_every_error_class_has_its_own_code() -> None:
    classes = error_classes(_trees())
    assert len(classes) > 30
    missing = [f"{c.name} ({c.where})" for c in classes.values() if c.code is None]
    assert missing == [], "give these classes a code: ClassVar[str]"


def test_the_docs_draw_the_whole_tree_as_the_code_has_it() -> None:
    classes = error_classes(_trees())
    drawn = drawn_tree(ARCHITECTURE.read_text(encoding="utf-8"))
    assert sorted(set(classes) - set(drawn)) == [], "draw these in docs/architecture.md, Errors"
    assert sorted(set(drawn) - set(classes)) == [], "docs/architecture.md draws classes gone"
    for name, cls in classes.items():
        assert drawn[name].parent == cls.parent, f"{name} is under {cls.parent} ({cls.where})"
        assert drawn[name].code == cls.code, f"{name}'s code is {cls.code!r} ({cls.where})"


# The checks above must be able to fail: each on a small source that breaks its rule.


def _source(text: str) -> dict[str, ast.Module]:
    return {"provisioner/example.py": ast.parse(text)}


@pytest.mark.parametrize(
    "text",
    [
        "raise ProvisionerError('x')",
        "raise errors.ProvisionerError('x')",
        "raise ProvisionerError",
        "def f():\n    return ProvisionerError('x')",
    ],
)
def test_a_use_of_the_root_is_seen(text: str) -> None:
    assert direct_uses_of_the_root(_source(text)) == [
        "provisioner/example.py:" + str(text.count("\n") + 1)
    ]


def test_a_class_without_its_own_code_is_seen() -> None:
    classes = error_classes(
        _source(
            "class A(ProvisionerError):\n    code: ClassVar[str] = 'a'\n"
            "class B(A):\n    pass\n"
            "class _Private(A):\n    pass\n"
            "class Other(Exception):\n    pass\n"
        )
    )
    assert {name: c.code for name, c in classes.items()} == {
        "ProvisionerError": None,
        "A": "a",
        "B": None,
    }


def test_the_tree_is_read_with_parents_and_codes() -> None:
    text = (
        "\n## Errors\n\n```\nProvisionerError      error\n├── A   a     note\n"
        "│   └── B   b\n└── C    c   (exit 2)\n```\n"
    )
    assert drawn_tree(text) == {
        "ProvisionerError": DrawnClass("ProvisionerError", "", "error"),
        "A": DrawnClass("A", "ProvisionerError", "a"),
        "B": DrawnClass("B", "A", "b"),
        "C": DrawnClass("C", "ProvisionerError", "c"),
    }


def test_the_command_line_exits_70_for_an_internal_error_only() -> None:
    from provisioner.cli import exit_code_for
    from provisioner.errors import InternalError, OptionError, UsageError
    from provisioner.parallel import WorkerError

    assert exit_code_for(WorkerError("a worker process ended without a result")) == 70
    assert exit_code_for(InternalError("x")) == 70
    assert exit_code_for(KeyError("x")) == 70
    assert exit_code_for(UsageError("x")) == 2
    assert exit_code_for(OptionError("x")) == 1
