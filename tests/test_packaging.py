"""The package list in pyproject.toml, which is written by hand, against the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        table: dict[str, object] = tomllib.load(file)["tool"]["setuptools"]
    return table


def test_every_package_of_the_source_is_listed() -> None:
    listed = set(_setuptools()["packages"])  # type: ignore[call-overload]
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "provisioner").rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    # Folders of data only (no __init__.py) are listed too, so that setuptools ships them
    # without warning; the templates come from the repository's templates/ folder.
    for package in listed - found:
        assert _folder(package).is_dir(), f"{package} is listed but has no folder"
        assert not list(_folder(package).glob("*.py")), f"{package} holds code: add __init__.py"


def test_every_file_the_code_reads_at_run_time_is_package_data() -> None:
    data: dict[str, list[str]] = _setuptools()["package-data"]  # type: ignore[assignment]
    shipped = {
        path
        for package, patterns in data.items()
        for pattern in patterns
        for path in _folder(package).glob(pattern)
    }
    # Every file of the source that is not Python: the key table, the agent scripts, py.typed.
    needed = [
        *(
            path
            for path in (ROOT / "provisioner").rglob("*")
            if path.is_file() and path.suffix not in {".py", ".pyc"}
        ),
        *(ROOT / "templates").glob("*.j2"),
    ]
    assert needed and set(needed) <= shipped, sorted(set(needed) - shipped)


def _folder(package: str) -> Path:
    if package == "provisioner.templates":
        return ROOT / "templates"
    return ROOT.joinpath(*package.split("."))
