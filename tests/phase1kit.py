"""Phase 1 inputs for tests: throwaway inventories, the example inventory, the CLI in-process.

``write_inventory`` builds an inventory in a temporary folder: ``SEAL`` anywhere in a YAML file
becomes a token sealed for exactly that place, so tests never depend on list positions or
hand-made tokens. Placeholders (``PH-<pathtag>``) depend only on realm and path, so they are
stable.
"""

from __future__ import annotations

import contextlib
import io
import sys
import textwrap
from collections.abc import Mapping
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

from provisioner.errors import ProvisionerError
from provisioner.inventory import yamldoc
from provisioner.inventory.model import Secret
from provisioner.render import build
from provisioner.secrets import vault

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "inventory"
DEMO_KEY = EXAMPLE / ".demo-key"
REALM = "phase1-test"
SEAL = "SEAL"
IDENTITY = vault.generate_identity()


def secret_for(pointer: str) -> str:
    """The password a ``SEAL`` marker at ``pointer`` is sealed with (ini-safe, unique)."""
    return "pw" + pointer.replace("/", "-")


def recipients(realm: str = REALM) -> vault.Recipients:
    return vault.new_recipients(realm, IDENTITY.recipient())


def seal_markers(path: Path, realm: str = REALM) -> None:
    """Replace every ``SEAL`` scalar of a YAML file by a token sealed for its own path."""
    doc = yamldoc.load_text(path)
    key = recipients(realm).active_key()
    edits = {
        ref.segments: vault.seal(
            Secret(secret_for(ref.pointer)), realm=realm, path=ref.pointer, recipient=key
        )
        for ref in doc.scalars
        if ref.value == SEAL and ref.style == ""
    }
    if edits:
        path.write_text(yamldoc.replace_scalars(doc, edits), encoding="utf-8")


def write_inventory(
    root: Path, files: Mapping[str, str], *, realm: str = REALM, dedent: bool = True
) -> Path:
    """An inventory directory with ``recipients.yaml`` and the given files, tokens sealed."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipients.yaml").write_text(recipients(realm).to_text(), encoding="utf-8")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text) if dedent else text, encoding="utf-8")
        if path.suffix == ".yaml" and "templates" not in path.relative_to(root).parts:
            # Malformed YAML is written on purpose by some tests; loading reports it.
            with contextlib.suppress(ProvisionerError):
                seal_markers(path, realm)
    return root


def real_opener(recipients_: vault.Recipients) -> vault.Opener:
    """An opener holding the private half of ``IDENTITY``."""
    keyring = vault.Keyring(recipients_)
    keyring.add(IDENTITY)
    return keyring


def logical(data: bytes) -> str:
    """A rendered file as text: BOM and UTF-16LE checked, CRLF shown as LF."""
    assert data[:2] == b"\xff\xfe"
    text = data[2:].decode("utf-16-le")
    assert "\n" not in text.replace("\r\n", "")
    assert "\r" not in text.replace("\r\n", "")
    return text.replace("\r\n", "\n")


def files_of(result: build.BuildResult) -> dict[str, str]:
    return {f.relative_path: logical(f.data) for f in result.files}


# Minimal valid inventory pieces that tests extend.
BASE = {
    "defaults.yaml": """\
        defaults:
          settings:
            updatesInterval: never
        """,
    "workstations.yaml": """\
        workstations:
          ws1:
            users: [u1]
        """,
    "users.yaml": """\
        users:
          u1:
            windows: ACME\\u1
            accounts:
              main:
                sip_uri: 1001@pbx.example.com
                password: SEAL
        """,
}


def build_files(
    root: Path, files: Mapping[str, str], **kw: object
) -> tuple[Path, build.BuildResult]:
    """Write ``BASE`` overlaid with ``files`` and run Phase 1 with placeholders."""
    merged = {**BASE, **files}
    inventory = write_inventory(root, merged)
    return inventory, build.build(inventory, **kw)  # type: ignore[arg-type]


def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, stderr."""
    from provisioner.cli import main  # only here: the other helpers need no CLI

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with (
        redirect_stdout(out),
        redirect_stderr(err),
        mock.patch.object(sys, "argv", ["provisioner", *args]),
    ):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()
