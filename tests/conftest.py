"""Shared fixtures: the frozen test identity, throwaway realms, and the CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.inventory import yamldoc
from provisioner.secrets import secretstore, vault
from tests.agentkit import lab, station, time_budget  # noqa: F401 - the agent tests' fixtures

VECTORS = Path(__file__).parent / "vectors"
TEST_PASSPHRASE = b"sipvault test vectors only"


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the state directory of whoever runs the tests (subprocesses
    given their own HOME have their own anyway)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture(scope="session")
def vector_data() -> dict[str, object]:
    return json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def test_keyring(tmp_path_factory: pytest.TempPathFactory) -> vault.Keyring:
    """The frozen test identity, unlocked once per session (git does not keep mode 600)."""
    folder = tmp_path_factory.mktemp("identity")
    copy = folder / "test-identity.sipid"
    shutil.copyfile(VECTORS / "test-identity.sipid", copy)
    copy.chmod(0o600)
    recipients = vault.Recipients.from_mapping(
        yamldoc.load_data(VECTORS / "recipients.yaml"), source="recipients.yaml"
    )
    keyring = vault.Keyring(recipients)
    keyring.add(secretstore.unlock(secretstore.read_identity(copy), TEST_PASSPHRASE))
    return keyring


@dataclass
class Realm:
    """A throwaway realm: inventory dir, identity dir, passphrase file and an environment."""

    root: Path
    inventory: Path
    config: Path
    passphrase_file: Path
    env: dict[str, str]

    def run(
        self,
        *args: str,
        stdin: str | bytes | None = None,
        check: bool = False,
        pass_fds: tuple[int, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run the real CLI in a subprocess with a private TMPDIR and config dir."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        proc = subprocess.run(
            [sys.executable, "-m", "provisioner.cli", *args],
            input=data,
            capture_output=True,
            env=self.env,
            cwd=self.root,
            timeout=120,
            check=False,
            pass_fds=pass_fds,
        )
        result = subprocess.CompletedProcess(
            proc.args,
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    @property
    def identity_files(self) -> list[Path]:
        return sorted((self.config / "microsip-provisioner").glob("*.sipid"))


@pytest.fixture
def realm(tmp_path: Path) -> Iterator[Realm]:
    root = tmp_path / "work"
    inventory = root / "inv"
    config = tmp_path / "config"
    temp = tmp_path / "tmp"
    for folder in (inventory, config, temp):
        folder.mkdir(parents=True)
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text("correct horse battery staple\n")
    passphrase_file.chmod(0o600)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(config),
        "TMPDIR": str(temp),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }
    yield Realm(tmp_path, inventory, config, passphrase_file, env)


USERS_YAML = """\
# Users of the example realm
users:
  alice:
    display_name: "Alice Müller"   # Berlin
    accounts:
      - sip_uri: 1001@pbx.example.com
        password:
  bob:
    accounts:
      - {sip_uri: 1002@pbx.example.com, password: ~}
"""


def make_realm(realm: Realm, name: str = "acme-voip") -> None:
    """``keys init`` in a realm fixture."""
    realm.run(
        "keys",
        "init",
        "--realm",
        name,
        "-i",
        str(realm.inventory),
        "--passphrase-file",
        str(realm.passphrase_file),
        check=True,
    )
