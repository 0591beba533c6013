"""Every command that reads an inventory, on hostile YAML files: exit status, time, peak memory.

Each hostile file is added to a copy of the example inventory; each command runs in a child
process whose address space is limited (``--memory``, 2 GB by default: the files below used
to take all of a 24 GB machine's memory), so a regression cannot take the machine down. For
each run: the exit status (1 is the expected input error; 70 an internal error; a negative
number the signal that killed it), wall time, the child's peak RSS, and where the message
points. Prints figures; asserts nothing.

    python bench/hostile_bench.py                 # every file, every command
    python bench/hostile_bench.py --files laughs --commands validate,"secrets lint"
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioner.inventory.yamldoc import MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "inventory"
USER, WORKSTATION = "alice", "ber-ws-001"


def load_hostile_kit() -> Any:
    """``tests/hostilekit.py`` of this repository: the tests' hostile files and CLI launcher."""
    root = str(REPO)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("tests.hostilekit")


def write_at_every_limit(path: Path) -> None:
    """A file that passes every limit by a hair: MAX_FILE_BYTES, MAX_DEPTH levels, and
    MAX_VALUES values once its aliases are expanded (half written, half repeated).

    Written in pieces: a child's peak memory includes what this process held when it forked.
    """
    deep = MAX_DEPTH - 1  # under the top-level mapping
    lines = [
        "deep: " + "[" * deep + "x" + "]" * deep,
        "anchor: &a [" + ", ".join(["x"] * 999) + "]",  # 1,000 values with its list
    ]
    written = 500_000
    fixed = 1 + (1 + deep + 1) + (1 + 1000) + 2 + 2  # mapping, deep, anchor, the two lists
    aliases = (MAX_VALUES - fixed - written) // 1000
    lines.append("aliases: [" + ", ".join(["*a"] * aliases) + "]")
    room = MAX_FILE_BYTES - sum(len(line) + 1 for line in lines) - len("long: []\n")
    width = (room + 2) // written - 2  # each scalar and its ", "
    with path.open("w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\nlong: [")
        for start in range(0, written, 10_000):
            end = min(written, start + 10_000)
            chunk = ", ".join(f"v{i:0{width - 1}d}" for i in range(start, end))
            file.write(chunk + (", " if end < written else "]\n"))


def write_oversized(path: Path) -> None:
    """A megabyte of comments more than MAX_FILE_BYTES."""
    with path.open("w", encoding="utf-8") as file:
        file.write("users:\n")
        for _ in range(MAX_FILE_BYTES // (1024 * 1024) + 1):
            file.write("# padding\n" * (1024 * 1024 // 10))


def files() -> dict[str, Callable[[Path], object]]:
    """name -> what writes it: the test suite's hostile files and two of the benchmark's own."""
    found: dict[str, Callable[[Path], object]] = {
        name: functools.partial(Path.write_text, data=text, encoding="utf-8")
        for name, (text, _) in load_hostile_kit().HOSTILE.items()
    }
    found["oversized"] = write_oversized
    found["at-every-limit"] = write_at_every_limit
    return found


COMMANDS: dict[str, tuple[str, ...]] = {
    "validate": ("validate", "{inv}"),
    "render": ("render", "{inv}", "--out", "{out}"),
    "explain": ("explain", USER, "-i", "{inv}"),
    "inventory list": ("inventory", "list", "-i", "{inv}"),
    "inventory graph": ("inventory", "graph", "-i", "{inv}"),
    "user show": ("user", "show", USER, "-i", "{inv}"),
    "secrets lint": ("secrets", "lint", "-i", "{inv}"),
    "secrets verify": ("secrets", "verify", "-i", "{inv}", "{keys}"),
    "keys list": ("keys", "list", "-i", "{inv}"),
    "validate (real keys)": ("validate", "{inv}", "{keys}"),
    "rollout --check": ("rollout", "--check", "-i", "{inv}", "{keys}"),
    "diff": ("diff", WORKSTATION, "-i", "{inv}", "{keys}"),
}


def run(args: list[str], cwd: Path, limit: int, timeout: float) -> tuple[int, float, float, str]:
    """Exit status, wall seconds, peak RSS (MiB) and output of the CLI in a limited child."""
    hostile_kit = load_hostile_kit()
    output = cwd / "output.txt"
    with output.open("wb") as sink:
        start = time.perf_counter()
        child = subprocess.Popen(
            [*hostile_kit.limited_cli(limit), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=hostile_kit.cli_environment(cwd),
        )
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 1024**2
    return child.returncode, wall, peak, output.read_text(encoding="utf-8", errors="replace")


def where(output: str, name: str) -> str:
    """The place the message names in the hostile file, or what went wrong instead."""
    found = re.search(rf"{re.escape(name)}\.yaml(:\d+(?::\d+)?)?", output)
    if found:
        return f"{name}.yaml{found.group(1) or ''}"
    if "Traceback" in output or "MemoryError" in output:
        return "traceback: " + output.strip().splitlines()[-1][:60]
    return output.strip().splitlines()[-1][:70] if output.strip() else "(no output)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    writers = files()
    parser.add_argument("--files", default=",".join(writers))
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--memory", type=int, default=2_000_000_000, help="address-space bytes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    args = parser.parse_args()
    names = [f.strip() for f in args.files.split(",") if f.strip()]
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, limit {args.memory:,} B")
    worst: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        identity = base / "demo-only.sipid"
        shutil.copyfile(EXAMPLE / ".demo-key" / "demo-only.sipid", identity)
        identity.chmod(0o600)
        keys = ["--identity", str(identity), "--passphrase-file"]
        keys.append(str(EXAMPLE / ".demo-key" / "demo-only.passphrase"))
        print(f"{'file':20} {'command':22} {'exit':>5} {'wall s':>7} {'peak MiB':>9}  message")
        for name in names:
            work = base / name
            inventory = work / "inventory"
            shutil.copytree(EXAMPLE, inventory, ignore=shutil.ignore_patterns(".demo-key"))
            hostile = inventory / f"{name}.yaml"
            writers[name](hostile)
            size = hostile.stat().st_size
            print(f"# {name}: {size:,} bytes")
            for command in commands:
                argv: list[str] = []
                for part in COMMANDS[command]:
                    if part == "{keys}":
                        argv += keys
                    else:
                        argv.append(part.format(inv=inventory, out=work / "out"))
                code, wall, peak, output = run(argv, work, args.memory, args.timeout)
                slowest, largest = worst.get(name, (0.0, 0.0))
                worst[name] = (max(slowest, wall), max(largest, peak))
                print(
                    f"{name:20} {command:22} {code:>5} {wall:>7.2f} {peak:>9.0f}  "
                    f"{where(output, name)}"
                )
    print("# worst per file: wall s, peak MiB")
    for name, (slowest, largest) in worst.items():
        print(f"{name:20} {slowest:.2f} s, {largest:.0f} MiB")


if __name__ == "__main__":
    main()
