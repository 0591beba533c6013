"""What the command line imports before it runs a command: only what that command needs.

Each case runs ``python -m provisioner.cli ARGS`` in a fresh interpreter (through ``runpy``,
which is what ``-m`` does) and then lists the modules it loaded. pywinrm and requests cost
most of a second at start-up and only the commands that reach a workstation need them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.phase1kit import EXAMPLE

DRIVER = """\
import json, runpy, sys
sys.argv = ["provisioner", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("provisioner.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
print("\\n" + json.dumps({"exit": code, "modules": sorted(sys.modules)}))
"""

REPO = Path(__file__).resolve().parent.parent
# The package of this checkout, whatever the interpreter has installed.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}
REMOTE_ONLY = {"winrm", "requests", "requests_ntlm", "urllib3", "spnego"}
ENGINE_LIBS = {"cryptography", "jinja2", "ruamel"}


def loaded_after(*args: str, cwd: Path) -> tuple[int, set[str], str]:
    """Exit code, top-level packages loaded, and the output of one CLI run."""
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
        timeout=120,
        check=False,
    )
    *output, last = result.stdout.rstrip("\n").split("\n")
    report = json.loads(last)
    tops = {name.split(".")[0] for name in report["modules"]}
    return report["exit"], tops, "\n".join(output) + result.stderr


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("startup") / "inventory"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".demo-key"))
    return root


def test_help_loads_neither_pywinrm_nor_the_engine_libraries(tmp_path: Path) -> None:
    code, tops, output = loaded_after("--help", cwd=tmp_path)
    assert code == 0 and "rollout" in output, output
    assert tops & (REMOTE_ONLY | ENGINE_LIBS) == set()
    assert "provisioner" in tops  # the CLI did run in this interpreter


@pytest.mark.parametrize(
    "args",
    [
        ("rollout", "--help"),
        ("validate", "{inventory}"),
        ("user", "show", "alice", "-i", "{inventory}", "--state", "{state}"),
        ("inventory", "list", "-i", "{inventory}", "--json"),
    ],
    ids=["rollout-help", "validate", "user-show", "inventory-list"],
)
def test_offline_commands_do_not_load_pywinrm(
    args: tuple[str, ...], inventory: Path, tmp_path: Path
) -> None:
    filled = [a.format(inventory=inventory, state=tmp_path / "state") for a in args]
    code, tops, output = loaded_after(*filled, cwd=tmp_path)
    assert code == 0, output
    assert tops & REMOTE_ONLY == set()
    if args[0] == "user":
        assert tops & {"cryptography", "jinja2"} == set()


def test_the_check_sees_pywinrm_when_a_command_loads_it(tmp_path: Path) -> None:
    # Negative control: the same driver does report pywinrm once the transport is imported.
    result = subprocess.run(
        [sys.executable, "-c", "import provisioner.transport.winrm\n" + DRIVER, "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=ENV,
        timeout=120,
        check=False,
    )
    modules = json.loads(result.stdout.rstrip("\n").split("\n")[-1])["modules"]
    assert {"winrm", "requests"} <= {name.split(".")[0] for name in modules}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_at_a_prompt_says_interrupted(tmp_path: Path) -> None:
    # The helpdesk presses Ctrl-C while set-password waits for the password on stdin.
    inventory = tmp_path / "inventory"
    shutil.copytree(EXAMPLE, inventory)
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "provisioner.cli"),
            *("user", "set-password", "alice", "-i", str(inventory), "--stdin"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell starts background jobs with Ctrl-C ignored, and Python keeps an ignored
        # SIGINT ignored: the helpdesk's terminal is what this plays, so the default it has.
        preexec_fn=_default_sigint,
    )
    try:
        time.sleep(3)  # start-up and loading; then it blocks reading stdin
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, (out, err)
    assert err.strip().endswith("interrupted") and "Traceback" not in err
    assert (inventory / "users/berlin.yaml").read_text() == (
        EXAMPLE / "users/berlin.yaml"
    ).read_text()
