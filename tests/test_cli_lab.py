"""``provisioner lab up --scenario``, ``lab show`` and ``lab down`` from the shell.

A lab holds what nobody else should read: rendered files with plaintext passwords on its
emulated disks, the NTLM accounts file, a test CA key. Each test plays someone who finds a lab
in a bad state (killed, its lab file pointing at another process or at someone else's folder)
and checks that ``lab down`` removes everything it wrote and signals nothing but the lab.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.errors import ProvisionerError
from provisioner.inventory.loader import load_inventory
from provisioner.lab.control import alive, take_down
from provisioner.lab.workstation import DOMAIN_SID
from provisioner.microsip import ini
from provisioner.rollout.connections import LabMap
from provisioner.secrets import secretstore, vault
from tests.labkit import clean_env, copy_example, free_lab_addresses, run_cli

SCENARIO = """\
# Awkward workstations for the example inventory.
workstations:
  ber-ws-001:
    users:
      alice: {sid: 1500, logged_on: true}
    paths:
      C:\\Users\\alice\\AppData\\Roaming\\MicroSIP:
        junction: C:\\Windows\\System32\\Tasks
        owner: alice
      C:\\Data\\notes.txt:
        content: test data, never a password
        owner: alice
        acl: ['alice:Modify', 'Administrators:FullControl']
        read_only: true
      "C:\\\\Data\\\\evil\\x9b2J": {content: a name with a terminal control sequence}
  ber-ws-002:
    remote_shells: false
"""


@dataclass
class Shell:
    """A copy of the example inventory, its demo key and a private temporary folder."""

    root: Path
    inventory: Path
    keys: list[str]
    env: dict[str, str]
    temp: Path

    @property
    def lab_file(self) -> Path:
        return self.inventory / ".lab.json"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = run_cli(self.root, *args, env=self.env)
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def up_options(self) -> list[str]:
        """``lab up``'s options for this inventory, in the background on free ports."""
        return ["-i", "inventory", "--detach", "--port", "0", *self.keys]

    def up(self, *extra: str) -> LabMap:
        self.cli("lab", "up", *self.up_options(), *extra)
        return LabMap.load(self.lab_file)

    def leftovers(self) -> list[Path]:
        return sorted(self.temp.rglob("*"))

    def password(self, pointer: str) -> str:
        """A SIP password of the example, opened with the demo key."""
        keyring = vault.Keyring(vault.load_recipients_file(self.inventory / "recipients.yaml"))
        identity, passphrase = Path(self.keys[1]), Path(self.keys[3])
        secret = passphrase.read_bytes().split(b"\n", 1)[0]
        keyring.add(secretstore.unlock(secretstore.read_identity(identity), secret))
        segments = pointer.strip("/").split("/")
        data = json.loads(json.dumps(_yaml(self.inventory / "users" / "berlin.yaml")))
        for segment in segments:
            data = data[segment]
        return keyring.open(str(data), pointer).reveal()


def _yaml(path: Path) -> object:
    from provisioner.inventory import yamldoc

    return yamldoc.load_data(path)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    inventory, identity, passphrase = copy_example(tmp_path)
    # A short private TMPDIR: the lab's control socket path must fit in sun_path.
    temp = Path(tempfile.mkdtemp(prefix="lab-t-"))
    env = {**clean_env(tmp_path), "TMPDIR": str(temp)}
    keys = ["--identity", str(identity), "--passphrase-file", str(passphrase)]
    found = Shell(tmp_path, inventory, keys, env, temp)
    try:
        yield found
    finally:
        if os.path.lexists(found.lab_file):
            run_cli(tmp_path, "lab", "down", "-i", "inventory", env=env)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours that is not a lab."""
    process = subprocess.Popen(["sleep", "120"])
    try:
        yield process
    finally:
        process.kill()
        process.wait(10)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


# --- scenario and show ----------------------------------------------------------------------


def test_a_scenario_lab_from_the_shell_and_what_lab_show_lists(shell: Shell) -> None:
    (shell.root / "awkward.yaml").write_text(SCENARIO, encoding="utf-8")
    shell.up("--scenario", "awkward.yaml")
    args = ["-i", "inventory", *shell.keys, "--lab", "inventory/.lab.json"]

    listed = json.loads(shell.cli("lab", "show", "ber-ws-001", "-i", "inventory", "--json").stdout)
    assert (listed["workstation"], listed["computer"]) == ("ber-ws-001", "BER-WS-001")
    entries = {e["path"]: e for e in listed["entries"]}
    junction = entries["C:\\Users\\alice\\AppData\\Roaming\\MicroSIP"]
    assert (junction["kind"], junction["target"]) == ("junction", "C:\\Windows\\System32\\Tasks")
    assert junction["owner"] == {"sid": f"{DOMAIN_SID}-1500", "name": "ACME\\alice"}
    notes = entries["C:\\Data\\notes.txt"]
    assert notes["read_only"] is True and notes["acl"]["protected"] is True
    assert [(a["name"], a["rights"], a["scope"]) for a in notes["acl"]["entries"]] == [
        ("ACME\\alice", "Modify", "object"),
        ("BUILTIN\\Administrators", "FullControl", "object"),
    ]
    assert "size" not in notes and "content" not in json.dumps(notes)

    pushed = shell.cli("push", "ber-ws-001", "--yes", *args, check=False)
    assert pushed.returncode == 3, pushed.stdout
    assert "unsafe-path" in pushed.stdout and "junction" in pushed.stdout
    shell.cli("push", "ber-ws-003", "--yes", *args)
    human = shell.cli(
        "lab", "show", "ber-ws-003", "C:\\users\\GRACE\\appdata", "-i", "inventory"
    ).stdout
    assert human.splitlines()[0] == "ber-ws-003 (BER-WS-003)"
    assert "C:\\Users\\grace\\AppData  folder  owner ACME\\grace" in human
    assert "      microsip.ini  file  owner BUILTIN\\Administrators" in human
    assert (
        "acl (protected): ACME\\grace:FullControl:object, NT AUTHORITY\\SYSTEM:FullControl:object"
        in human
    )
    # A C1 control character in a name never reaches the terminal.
    data = shell.cli("lab", "show", "ber-ws-001", "C:\\Data", "-i", "inventory").stdout
    assert "  evil?2J  file" in data and "\x9b" not in data
    listing = shell.cli("lab", "show", "ber-ws-001", "-i", "inventory", "--json").stdout
    assert "evil\\u009b2J" in listing
    doctor = shell.cli("doctor", "ber-ws-002", *args, check=False)
    assert "AllowRemoteShellAccess" in doctor.stdout

    missing = shell.cli("lab", "show", "ber-ws-01", "-i", "inventory", check=False)
    assert missing.returncode == 1 and "did you mean 'ber-ws-001'?" in missing.stderr
    absent = shell.cli("lab", "show", "ber-ws-001", "C:\\nowhere", "-i", "inventory", check=False)
    assert absent.returncode == 1 and "'C:\\nowhere' does not exist" in absent.stderr

    down = shell.cli("lab", "down", "-i", "inventory")
    assert down.stdout.strip() == "lab down"
    assert shell.leftovers() == [] and not shell.lab_file.exists()


def test_a_bad_scenario_starts_nothing(shell: Shell) -> None:
    (shell.root / "bad.yaml").write_text(
        "workstations:\n  ber-ws-01:\n    remote_shells: false\n", encoding="utf-8"
    )
    result = shell.cli(
        "lab", "up", "-i", "inventory", "--detach", "--scenario", "bad.yaml", check=False
    )
    assert result.returncode == 1
    assert (
        "bad.yaml:2:3: /workstations/ber-ws-01: the inventory has no workstation" in result.stderr
    )
    assert "did you mean 'ber-ws-001'?" in result.stderr
    assert not os.path.lexists(shell.lab_file) and shell.leftovers() == []


def test_a_detached_lab_says_where_the_inventory_is_wrong(shell: Shell) -> None:
    # Without a scenario only the lab process loads the inventory: its words reach the shell.
    stations = shell.inventory / "workstations.yaml"
    stations.write_text(
        stations.read_text(encoding="utf-8") + "  ber-ws-009: {adress: x}\n", encoding="utf-8"
    )
    line = len(stations.read_text(encoding="utf-8").splitlines())
    result = shell.cli("lab", "up", *shell.up_options(), check=False)
    assert result.returncode == 1
    assert "the inventory has problems" in result.stderr
    assert f"workstations.yaml:{line}:" in result.stderr and "did you mean 'address'" in (
        result.stderr
    ), result.stderr
    assert not os.path.lexists(shell.lab_file) and shell.leftovers() == []
    assert not os.path.lexists(shell.lab_file.with_suffix(".log"))


def test_an_account_the_lab_cannot_set_up_is_named_at_its_line(shell: Shell) -> None:
    # Not "is another lab running?", and not the path of the lab's private folder.
    (shell.root / "bad.yaml").write_text(
        "workstations:\n  ber-ws-001:\n    users:\n"
        "      bob: {profile: 'C:\\Users\\alice\\NTUSER.DAT'}\n",
        encoding="utf-8",
    )
    result = shell.cli("lab", "up", "--scenario", "bad.yaml", *shell.up_options(), check=False)
    assert result.returncode == 1
    assert (
        "bad.yaml:4:7: /workstations/ber-ws-001/users/bob: cannot set up ACME\\bob: File exists."
        in result.stderr
    ), result.stderr
    assert "another lab" not in result.stderr and str(shell.temp) not in result.stderr
    assert not os.path.lexists(shell.lab_file) and shell.leftovers() == []


def test_the_foreground_lab_serves_show_and_cleans_up_when_its_terminal_closes(
    shell: Shell,
) -> None:
    command = [sys.executable, "-m", "provisioner.cli", "lab", "up", "-i", "inventory"]
    process = subprocess.Popen(
        [*command, "--port", "0", *shell.keys],
        cwd=shell.root,
        env=shell.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                lab = LabMap.load(shell.lab_file)
                break
            except ProvisionerError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        listed = shell.cli("lab", "show", "ham-kiosk-01", "C:\\Users", "-i", "inventory", "--json")
        assert json.loads(listed.stdout)["entries"][0]["path"] == "C:\\Users"
        assert lab.pid == process.pid and Path(lab.folder).parent == shell.temp
        process.send_signal(signal.SIGHUP)
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait(10)
    assert not os.path.lexists(shell.lab_file) and shell.leftovers() == []


# --- where the lab listens ---------------------------------------------------------------------


@contextlib.contextmanager
def _listening(address: str, port: int) -> Iterator[None]:
    """Something else listens on ``address:port`` (or already did: just as well)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
            sock.listen()
        except OSError as failed:
            assert failed.errno == errno.EADDRINUSE, failed
        yield


def test_a_lab_starts_where_it_is_told_whatever_listens_on_the_default_addresses(
    shell: Shell,
) -> None:
    count = len(load_inventory(shell.inventory).workstations)
    base, port = free_lab_addresses(count)
    where = ["--base-address", base, "--port", str(port)]
    up = ["lab", "up", "-i", "inventory", "--detach", *where, *shell.keys]
    with _listening(base, port):  # something on the place asked for: the message names it
        taken = shell.cli(*up, check=False)
    assert taken.returncode == 1
    assert f"cannot listen on {base}:{port}" in taken.stderr, taken.stderr
    assert "--base-address, --port" in taken.stderr
    assert not os.path.lexists(shell.lab_file) and shell.leftovers() == []

    # Another lab, or a real WinRM listener, on the default 127.0.0.2:5985 (held only while
    # this lab starts: labs of other tests on this machine may want it).
    with _listening("127.0.0.2", 5985):
        shell.cli(*up)
    lab = LabMap.load(shell.lab_file)
    first = ipaddress.IPv4Address(base)
    assert sorted(ipaddress.IPv4Address(e.address) for e in lab.hosts.values()) == [
        first + n for n in range(count)
    ]
    assert {e.port for e in lab.hosts.values()} == {port}
    shell.cli(
        "push",
        "ber-ws-001",
        "--yes",
        "-i",
        "inventory",
        *shell.keys,
        "--lab",
        "inventory/.lab.json",
    )
    shell.cli("lab", "down", "-i", "inventory")


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("10.0.0.1", "10.0.0.1 is outside 127.0.0.0/8: the lab listens on loopback only"),
        ("127.0.0", "'127.0.0' is not an IPv4 address"),
        ("::1", "'::1' is not an IPv4 address"),
        ("127.255.255.255", "127.255.255.255 is the loopback broadcast address"),
    ],
)
def test_a_base_address_off_loopback_is_refused(shell: Shell, address: str, why: str) -> None:
    for given in (["--base-address", address], []):
        env = {**shell.env, "PROVISIONER_LAB_BASE_ADDRESS": address} if not given else shell.env
        result = run_cli(
            shell.root, "lab", "up", "-i", "inventory", "--detach", *given, *shell.keys, env=env
        )
        assert result.returncode == 2 and why in result.stderr, result.stderr
        assert not os.path.lexists(shell.lab_file)


# --- the clean-up ---------------------------------------------------------------------------


def test_lab_up_never_writes_through_a_log_someone_put_there(shell: Shell) -> None:
    # The inventory folder is shared with its editors: a link committed as .lab.log.
    precious = shell.root / "precious.txt"
    precious.write_text("keep me", encoding="utf-8")
    log = shell.lab_file.with_suffix(".log")
    log.symlink_to(precious)
    result = shell.cli("lab", "up", *shell.up_options(), check=False)
    assert result.returncode == 1
    assert f"{log.relative_to(shell.root)} exists, and a lab never writes over a file" in (
        result.stderr
    )
    assert precious.read_text(encoding="utf-8") == "keep me"
    assert log.is_symlink() and not os.path.lexists(shell.lab_file) and shell.leftovers() == []


def test_a_detached_lab_stopped_by_sigterm_leaves_nothing_and_starts_again(shell: Shell) -> None:
    log = shell.lab_file.with_suffix(".log")
    lab = shell.up()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    os.kill(lab.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while alive(lab.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(lab.pid)
    assert not os.path.lexists(shell.lab_file) and not os.path.lexists(log)
    assert shell.leftovers() == []
    again = shell.up()
    assert shell.cli("lab", "down", "-i", "inventory").stdout.strip() == "lab down"
    assert not alive(again.pid) and not os.path.lexists(log)
    shell.up()  # and once more after lab down


def test_lab_down_removes_everything_a_killed_lab_left(shell: Shell) -> None:
    lab = shell.up()
    args = ["-i", "inventory", *shell.keys, "--lab", "inventory/.lab.json"]
    shell.cli("push", "ber-ws-001", "--yes", *args)
    _kill(lab.pid)
    # What a reader of the temporary folder finds after the lab died.
    left = shell.leftovers()
    password = shell.password("/users/alice/accounts/main/password")
    inis = [p for p in left if p.name == "microsip.ini" and p.is_file()]
    assert any(password in ini.decode_ini_bytes(p.read_bytes()) for p in inis)
    [users] = [p for p in left if p.name == "users" and p.parent.name.startswith("microsip-lab-")]
    line = users.read_text(encoding="utf-8").splitlines()[0]
    assert line.split(":")[2] == "0" * 32  # no LM hash, only the NT hash
    assert stat.S_IMODE(Path(lab.folder).stat().st_mode) == 0o700
    assert all(Path(lab.folder) in (p, *p.parents) for p in left)  # one folder holds all

    down = shell.cli("lab", "down", "-i", "inventory")
    assert down.stdout.splitlines() == [
        f"the lab (process {lab.pid}) was not running",
        "removed what it left:",
        f"  {lab.folder}",
        f"  {shell.lab_file.relative_to(shell.root)}",
        f"  {shell.lab_file.with_suffix('.log').relative_to(shell.root)}",
    ]
    assert shell.leftovers() == []
    assert not os.path.lexists(shell.lab_file)
    assert not os.path.lexists(shell.lab_file.with_suffix(".log"))


def test_lab_down_never_signals_a_process_that_is_not_the_lab(
    shell: Shell, sleeper: subprocess.Popen[bytes]
) -> None:
    # A running lab whose file names another process: nothing is signalled or removed.
    lab = shell.up()
    original = shell.lab_file.read_text(encoding="utf-8")
    shell.lab_file.write_text(original.replace(f'"pid": {lab.pid}', f'"pid": {sleeper.pid}'))
    refused = shell.cli("lab", "down", "-i", "inventory", check=False)
    assert refused.returncode == 1
    assert f"names process {sleeper.pid}, but the lab in {lab.folder} is process {lab.pid}" in (
        refused.stderr
    )
    assert sleeper.poll() is None and alive(lab.pid) and Path(lab.folder).is_dir()

    # The lab died and its PID now belongs to another process (played by the file again).
    _kill(lab.pid)
    down = shell.cli("lab", "down", "-i", "inventory")
    assert f"process {sleeper.pid} is not the lab" in down.stdout and "not signalled" in down.stdout
    time.sleep(0.2)
    assert sleeper.poll() is None
    assert shell.leftovers() == [] and not os.path.lexists(shell.lab_file)


@pytest.mark.parametrize("kind", ["open-folder", "not-a-lab-folder", "link"])
def test_lab_down_removes_no_folder_but_a_private_lab_folder(
    shell: Shell, sleeper: subprocess.Popen[bytes], kind: str
) -> None:
    # The lab file may sit in the inventory folder: whoever edits it must not make lab down
    # remove a folder of the admin's.
    precious = shell.root / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    if kind == "open-folder":
        named = shell.temp / "microsip-lab-abcdefgh"
        named.mkdir(mode=0o755)
        (named / "keep.txt").write_text("keep")
        named.chmod(0o755)
    elif kind == "not-a-lab-folder":
        named = precious
    else:
        named = shell.temp / "microsip-lab-abcdefgh"
        named.symlink_to(precious)
    lab_file = LabMap("", {}, sleeper.pid, str(named))
    shell.lab_file.write_text(lab_file.dump(), encoding="utf-8")
    result = shell.cli("lab", "down", "-i", "inventory", check=False)
    assert result.returncode == 1 and "not a" in result.stderr, result.stderr
    assert (precious / "keep.txt").read_text() == "keep"
    assert named.is_dir() and sleeper.poll() is None
    shell.lab_file.unlink()
    if kind == "open-folder":
        shutil.rmtree(named)


def test_a_lab_that_does_not_stop_is_killed_then_cleaned_up(shell: Shell) -> None:
    # A stopped (SIGSTOP) lab cannot act on SIGTERM, like a hung one; the kernel still says
    # it listens on the control socket, so it is the lab, and SIGKILL is safe.
    lab = shell.up()
    os.kill(lab.pid, signal.SIGSTOP)
    try:
        done = take_down(shell.lab_file, grace=1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(lab.pid, signal.SIGCONT)
    assert (done.was_running, done.killed) == (True, True)
    assert not alive(lab.pid)
    assert lab.folder in done.removed and str(shell.lab_file) in done.removed
    assert shell.leftovers() == [] and not os.path.lexists(shell.lab_file)


def test_a_lab_file_without_a_folder_signals_nothing(
    shell: Shell, sleeper: subprocess.Popen[bytes]
) -> None:
    # As an older version wrote it: a PID and nothing to check it against.
    shell.lab_file.write_text(LabMap("", {}, sleeper.pid).dump(), encoding="utf-8")
    down = shell.cli("lab", "down", "-i", "inventory")
    assert f"names no lab folder (an older version wrote it): process {sleeper.pid}" in down.stdout
    time.sleep(0.2)
    assert sleeper.poll() is None and not os.path.lexists(shell.lab_file)


def test_a_workstation_added_after_lab_up_is_served_once_the_lab_starts_again(
    shell: Shell,
) -> None:
    shell.up()
    workstations = shell.inventory / "workstations.yaml"
    workstations.write_text(
        workstations.read_text(encoding="utf-8")
        + "  ber-ws-009:\n"
        + "    address: ber-ws-009.corp.example.com\n"
        + "    groups: [site-berlin]\n"
        + "    users: [heidi]\n",
        encoding="utf-8",
    )
    push = [
        "push",
        "ber-ws-009",
        "--yes",
        "-i",
        "inventory",
        "--lab",
        "inventory/.lab.json",
        *shell.keys,
    ]
    refused = shell.cli(*push, check=False)
    assert refused.returncode == 1, refused.stdout
    # It said "restart 'provisioner lab up'", which fails while the lab runs.
    assert "restart" not in refused.stderr
    assert "Stop it with 'provisioner lab down', then start it again with 'provisioner lab up'" in (
        refused.stderr
    )
    # Doing what it says is enough.
    shell.cli("lab", "down", "-i", "inventory")
    shell.up()
    assert "ber-ws-009: changed" in shell.cli(*push).stdout
