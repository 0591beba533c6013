"""The layering rules of docs/architecture.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import typer.main

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "provisioner"

LAYERS: dict[str, int] = {
    "errors": 0,
    "names": 0,
    "model": 1,
    "credscope": 1,
    "schema": 1,
    "inidoc": 1,
    "keytable": 1,
    "atomicfile": 1,
    "winpath": 1,
    "fingerprint": 1,
    "parallel": 1,
    "gcpause": 1,
    "budget": 1,
    "yamldoc": 1,
    "vault": 2,
    "inventory": 2,
    "resolve": 2,
    "render": 2,
    "plan": 2,
    "report": 2,
    "state": 2,
    "results": 1,
    "revision": 1,
    "transport": 2,
    "build": 3,
    "lab": 5,
    "push": 4,
    "connections": 4,
    "lanes": 4,
    "doctor": 5,
    "runner": 5,
    "ini": 2,
    "lint": 2,
    "secretstore": 3,
    "engine": 6,
    "cli": 7,
}
# Each third-party library lives in exactly one adapter (module prefix).
ADAPTERS = {
    "cryptography": ("vault", "lab.certs"),
    "ruamel": ("yamldoc",),
    "jinja2": ("render",),
    "typer": ("cli",),
    "rich": ("cli",),
    "winrm": ("transport.winrm",),
    "requests": ("transport.winrm",),
    "yarl": ("transport.winrm",),
    "spnego": ("lab",),
    # Forked processes: Phase 1's workers and the push lanes.
    "multiprocessing": ("parallel", "lanes"),
}
# transport.winrm hands the WinRM password to pywinrm; the lab configures an emulated account.
REVEAL_ALLOWED = {
    "model",
    "vault",
    "secretstore",
    "render",
    "transport.winrm",
    "lab.inventory_lab",
}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        name = "" if name == "__init__" else name.removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "provisioner":
                names.update(f"provisioner.{alias.name}" for alias in node.names)
    return names


def _layer(module: str) -> int:
    top = module.split(".")[0]
    assert top in LAYERS, f"provisioner/{module} has no layer; add it to LAYERS and the docs"
    return LAYERS[top]


def test_imports_point_down_and_l2_modules_stay_independent() -> None:
    for module, tree in _modules().items():
        if module == "":
            continue
        mine = _layer(module)
        for imported in _imports(tree):
            if not imported.startswith("provisioner."):
                continue
            target = imported.removeprefix("provisioner.")
            if target.split(".")[0] == module.split(".")[0]:
                continue
            theirs = _layer(target)
            # L1 holds small leaf helpers (model, schema, yamldoc...) that may build on each other.
            ok = theirs < mine or theirs == mine == 1
            assert ok, f"{module} (L{mine}) imports {target} (L{theirs})"


def test_the_parallel_machinery_is_used_through_its_interface() -> None:
    # The domain modules call what provisioner/parallel/__init__.py exports, never its parts.
    for module, tree in _modules().items():
        if module.split(".")[0] == "parallel":
            continue
        for imported in _imports(tree):
            inside = imported.startswith("provisioner.parallel.")
            assert not inside, f"{module} imports {imported}; use provisioner.parallel"


def test_each_third_party_library_has_one_adapter() -> None:
    for module, tree in _modules().items():
        for imported in _imports(tree):
            top = imported.split(".")[0]
            if top in ADAPTERS:
                assert module.startswith(ADAPTERS[top]), f"{module} imports {top}"


def _modules_using(attribute: str) -> list[str]:
    """The modules that touch ``.attribute`` anywhere."""
    return [
        module
        for module, tree in _modules().items()
        if any(isinstance(n, ast.Attribute) and n.attr == attribute for n in ast.walk(tree))
    ]


def test_only_the_renderer_and_the_sealing_code_reveal_secrets() -> None:
    for module in _modules_using("reveal"):
        allowed = module in REVEAL_ALLOWED or module.split(".")[0] in REVEAL_ALLOWED
        assert allowed, f"{module} calls .reveal()"


def test_only_phase1_compares_guesses_with_secrets() -> None:
    # Secret.matches_text is not constant-time: fine for checking our own rendered output, not for
    # anything that compares input from elsewhere.
    for name in ("matches_text", "occurs_in", "count_in"):
        for module in _modules_using(name):
            assert module in {"build", "model"}, f"{module} calls Secret.{name}"


def test_no_command_takes_a_secret_as_an_argument() -> None:
    from provisioner.cli import app

    command = typer.main.get_command(app)
    seen = 0

    def walk(cmd: object) -> None:
        nonlocal seen
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)
        for param in getattr(cmd, "params", []):
            seen += 1
            name = param.name.lower()
            if "passphrase" in name or "password" in name:
                assert name.endswith(("_file", "_fd")), f"--{name} would put a secret in argv"
            assert "password" not in (param.envvar or "").lower()

    walk(command)
    assert seen > 20


def test_environment_is_read_only_in_known_places() -> None:
    allowed = {"secretstore", "cli.common", "cli", "lab.ntlmusers"}
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                assert module in allowed, f"{module} reads the environment"


def test_the_engine_never_imports_its_client() -> None:
    for module, tree in _modules().items():
        if module.split(".")[0] == "cli":
            continue
        for imported in _imports(tree):
            assert imported.split(".")[0] != "typer", f"{module} imports typer"
            assert not imported.startswith("provisioner.cli"), f"{module} imports the CLI"


# What a run is made of: the engine composes these, a command only asks the engine.
ENGINE_ONLY = {
    "run_fleet",
    "executor",
    "RunJournal",
    "open_transport",
    "push_host",
    "rollback_host",
}


def test_commands_run_changes_through_the_engine() -> None:
    for module, tree in _modules().items():
        if module.split(".")[0] != "cli":
            continue
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not names & ENGINE_ONLY, f"{module} uses {sorted(names & ENGINE_ONLY)}"


def _test_modules_imported(tree: ast.Module) -> set[str]:
    """Test modules (``test_*``) that ``tree`` imports, in any form, ``import_module`` too."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base.rstrip('.')}.{alias.name}".lstrip(".") for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return {name for name in names if name.rsplit(".", 1)[-1].startswith("test_")}


@pytest.mark.parametrize(
    "source",
    [
        "from tests.test_build import BASE",
        "from .test_build import BASE",
        "from . import test_build",
        "from tests import test_build",
        "import tests.test_build",
        "import test_build as helpers",
        "importlib.import_module('tests.test_build')",
    ],
)
def test_an_import_of_a_test_module_is_seen(source: str) -> None:
    assert _test_modules_imported(ast.parse(source)) != set()


def test_no_test_module_imports_another() -> None:
    """Helpers shared by tests (and benchmarks) live in kits (``tests/*kit.py``), so that a test
    module can be run, moved or deleted on its own."""
    found = {}
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        imported = _test_modules_imported(ast.parse(path.read_text(), filename=str(path)))
        if imported:
            found[str(path.relative_to(ROOT))] = sorted(imported)
    assert found == {}, "move what these import from test modules into a kit"
