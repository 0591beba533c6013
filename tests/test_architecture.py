"""The layering rules of docs/architecture.md, checked on the source."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import typer.main

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "provisioner"

ARCHITECTURE = ROOT / "docs" / "architecture.md"

# A module's layer, by its path below provisioner/. A key without a module of its own names a
# package whose modules all share one layer (cli/, lab/, transport/, parallel/); a domain
# package (DOMAINS) holds modules of different layers, each listed.
LAYERS: dict[str, int] = {
    # shared leaves
    "errors": 0,
    "atomicfile": 1,
    "gcpause": 1,
    "parallel": 1,
    # microsip/
    "microsip.inidoc": 1,
    "microsip.keytable": 1,
    "microsip.version": 1,
    "microsip.ini": 2,
    "microsip.lint": 2,
    # inventory/
    "inventory.names": 0,
    "inventory.model": 1,
    "inventory.schema": 1,
    "inventory.winpath": 1,
    "inventory.yamldoc": 1,
    "inventory.loader": 2,
    "inventory.resolve": 2,
    # secrets/
    "secrets.credscope": 1,
    "secrets.vault": 2,
    "secrets.secretstore": 3,
    # render/
    "render.budget": 1,
    "render.jinja": 2,
    "render.build": 3,
    # records/
    "records.fingerprint": 1,
    "records.results": 1,
    "records.revision": 1,
    "records.report": 2,
    "records.state": 2,
    # transport/
    "transport": 2,
    # rollout/
    "rollout.plan": 2,
    "rollout.connections": 4,
    "rollout.lanes": 4,
    "rollout.push": 4,
    "rollout.doctor": 5,
    "rollout.runner": 5,
    "rollout.engine": 6,
    # clients of the engine
    "lab": 5,
    "cli": 7,
}
# Folders that group modules by domain; their __init__.py holds a docstring only.
DOMAINS = ("microsip", "inventory", "secrets", "render", "records", "rollout")
# Each third-party library lives in exactly one adapter (module prefix).
ADAPTERS = {
    "cryptography": ("secrets.vault", "lab.certs"),
    "ruamel": ("inventory.yamldoc",),
    "jinja2": ("render.jinja",),
    "typer": ("cli",),
    "rich": ("cli",),
    "winrm": ("transport.winrm",),
    "requests": ("transport.winrm",),
    "yarl": ("transport.winrm",),
    "spnego": ("lab",),
    # Forked processes: Phase 1's workers and the push lanes.
    "multiprocessing": ("parallel", "rollout.lanes"),
}
# transport.winrm hands the WinRM password to pywinrm; the lab configures an emulated account.
REVEAL_ALLOWED = {
    "inventory.model",
    "secrets.vault",
    "secrets.secretstore",
    "render.jinja",
    "transport.winrm",
    "lab.inventory_lab",
}


@functools.cache
def _paths() -> dict[str, Path]:
    """Every module of the package by dotted name below ``provisioner`` (the package: "")."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found["" if name == "__init__" else name.removesuffix(".__init__")] = path
    return found


@functools.cache
def _modules() -> dict[str, ast.Module]:
    return {
        name: ast.parse(path.read_text(), filename=str(path)) for name, path in _paths().items()
    }


def _is_docstring_only(tree: ast.Module) -> bool:
    return all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in tree.body
    )


@functools.cache
def _code_modules() -> dict[str, ast.Module]:
    """The modules that hold code: a package's ``__init__`` with only a docstring does not."""
    return {
        name: tree
        for name, tree in _modules().items()
        if name and not (_paths()[name].name == "__init__.py" and _is_docstring_only(tree))
    }


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module.startswith("provisioner"):
                # `from provisioner.inventory import model` imports a module, not a name
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _imported_modules(tree: ast.Module) -> set[str]:
    """The modules of the package (holding code) that ``tree`` imports."""
    found = set()
    for imported in _imports(tree):
        parts = imported.split(".")
        if parts[0] != "provisioner":
            continue
        # the longest prefix that is a module: `provisioner.microsip.ini.encode_ini` is `ini`
        prefixes = (".".join(parts[1:end]) for end in range(len(parts), 1, -1))
        module = next((prefix for prefix in prefixes if prefix in _code_modules()), None)
        if module is not None:
            found.add(module)
    return found


def _unit(module: str) -> str:
    """The LAYERS key that gives ``module`` its layer: itself or its package."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return ".".join(parts[:end])
    raise AssertionError(f"provisioner/{module} has no layer; add it to LAYERS and the docs")


def _layer(module: str) -> int:
    return LAYERS[_unit(module)]


def test_every_module_has_a_layer_and_every_layer_a_module() -> None:
    modules = _code_modules()
    for module in modules:
        _unit(module)
    for key in LAYERS:
        assert any(m == key or m.startswith(f"{key}.") for m in modules), f"no module {key}"


def test_the_domain_packages_only_group_modules() -> None:
    # Importing provisioner.inventory.model must not load the loader (nor anything else).
    for domain in DOMAINS:
        init = PACKAGE / domain / "__init__.py"
        assert _is_docstring_only(ast.parse(init.read_text())), f"{init} holds code"
        assert domain not in LAYERS, f"{domain}/ holds modules of several layers: list each"


def test_imports_point_down_and_l2_modules_stay_independent() -> None:
    for module, tree in _code_modules().items():
        mine = _layer(module)
        for target in _imported_modules(tree):
            if _unit(target) == _unit(module):
                continue
            theirs = _layer(target)
            # L1 holds small leaf helpers (model, schema, yamldoc...) that may build on each other.
            ok = theirs < mine or theirs == mine == 1
            assert ok, f"{module} (L{mine}) imports {target} (L{theirs})"


def _documented_modules() -> dict[str, int]:
    """The paths (below provisioner/) docs/architecture.md's module table lists, with layers."""
    table = ARCHITECTURE.read_text().split("## Layers and modules", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"L\d", cells[0]):
            continue
        for path in re.findall(r"`([\w/.]+)`", cells[1]):
            if path.endswith((".py", "/")):
                documented[path] = int(cells[0][1:])
    return documented


def test_every_module_is_in_the_documented_table_with_its_layer() -> None:
    documented = _documented_modules()
    for path in documented:
        assert (PACKAGE / path).exists(), f"docs/architecture.md lists {path}, which is gone"
    for module in _code_modules():
        path = _paths()[module].relative_to(PACKAGE)
        names = [path.as_posix(), *(f"{folder.as_posix()}/" for folder in path.parents)]
        listed = [name for name in names if name in documented]
        assert listed, f"add provisioner/{path} to the module table of docs/architecture.md"
        shown = documented[listed[0]]
        assert shown == _layer(module), f"{listed[0]}: L{shown} in the docs, L{_layer(module)} here"


def test_every_folder_is_in_the_documented_layout() -> None:
    layout = ARCHITECTURE.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        folder = f"`provisioner/{init.parent.name}/`"
        assert folder in layout, f"say what {folder} holds in the Layout of docs/architecture.md"


def test_the_parallel_machinery_is_used_through_its_interface() -> None:
    # The domain modules call what provisioner/parallel/__init__.py exports, never its parts.
    for module, tree in _modules().items():
        if module.split(".")[0] == "parallel":
            continue
        for imported in _imported_modules(tree):
            inside = imported.startswith("parallel.")
            assert not inside, f"{module} imports provisioner.{imported}; use provisioner.parallel"


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
            assert module in {"render.build", "inventory.model"}, f"{module} calls Secret.{name}"


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
    allowed = {"secrets.secretstore", "cli.common", "cli", "lab.ntlmusers"}
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
